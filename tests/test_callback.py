"""Integration of DataValueEmbedding with the real Lightning Trainer (CPU, a few steps per test).

Bad input must fail early with a specific error class and a message that names the problem and the fix;
supported setups must record exactly one step file per optimizer step, with the learning rates and loss
weights the optimizer actually applied.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_dve import (
    ConfigError,
    DataValueEmbedding,
    DataValueEmbeddings,
    GradientError,
    LossReductionError,
    SampleIdError,
    StoreError,
    UnsupportedError,
)
from lightning_dve.store import TrajectoryStore
from tests.conftest import DigitsDict, TinyMLP


def step_files(root) -> list[str]:
    return sorted(p.name for p in (root / "steps").glob("*.safetensors"))


def stored_ids(root) -> list[int]:
    store = TrajectoryStore.open(root)
    return [i for s in store.steps for i in store.read_step(s).sample_ids.tolist()]


# --- sample ids --------------------------------------------------------------------------------------------


def test_missing_id_key_in_dict_batch(fit, mlp_cls, save_dir):
    """The batch's ids are under 'index': the message suggests that key; without such a key it suggests none."""
    with pytest.raises(SampleIdError, match=r"batch has no key 'idx'.*If 'index' holds the dataset indices, pass "
                                            r"`sample_ids='index'`"):
        fit(mlp_cls(), DataValueEmbedding(save_dir, sample_ids="idx"))
    from lightning_dve.batches import extract_sample_ids

    with pytest.raises(SampleIdError, match=r"batch has no key 'idx' \(keys: \['index', 'x'\]\)\. Return") as info:
        extract_sample_ids({"x": torch.zeros(2, 3), "index": torch.tensor([0.5, 1.5])}, "idx", 2)  # not integers
    assert "If " not in str(info.value)
    with pytest.raises(SampleIdError, match=r"batch has no key 'idx' \(keys: \['index', 'x'\]\)\. Return") as info:
        extract_sample_ids({"x": torch.zeros(2, 3), "index": torch.arange(3)}, "idx", 2)  # not one per sample
    assert "If " not in str(info.value)


def test_tuple_batch_with_key_sample_ids(fit, mlp_cls, save_dir):
    class TupleMLP(mlp_cls):
        def loss(self, batch):
            x, y = batch
            return F.cross_entropy(self(x), y)

    data = DataLoader(TensorDataset(torch.rand(32, 64), torch.randint(0, 10, (32,))), batch_size=8)
    with pytest.raises(SampleIdError, match=r"not a mapping.*sample_ids=callable"):
        fit(TupleMLP(), DataValueEmbedding(save_dir, sample_ids="index"), train=data)


def test_float_sample_ids(fit, mlp_cls, save_dir):
    with pytest.raises(SampleIdError, match=r"must be integers.*float"):
        fit(mlp_cls(), DataValueEmbedding(save_dir, sample_ids=lambda b: b["index"].float()))


def test_string_sample_ids_are_refused_naming_them(fit, mlp_cls, save_dir):
    """File names as ids (the default collate makes them a list of str) get the id error, not torch's."""
    from lightning_dve.batches import extract_sample_ids

    names = lambda b: [f"img_{i}.png" for i in b["index"].tolist()]  # noqa: E731
    with pytest.raises(SampleIdError, match=r"must be integers \(dataset indices\); got a list holding str values "
                                            r"such as 'img_\d+\.png'\. Return the sample's position"):
        fit(mlp_cls(), DataValueEmbedding(save_dir, sample_ids=names))
    assert not (save_dir / "steps").exists() or not list((save_dir / "steps").iterdir())
    with pytest.raises(SampleIdError, match=r"got a NoneType holding NoneType values such as None"):
        extract_sample_ids({"index": None}, "index", 2)


def test_ids_beyond_int64_are_refused_not_wrapped() -> None:
    """64-bit hashes as numpy uint64 were wrapped to negative int64 ids silently (none of the ids fed appeared in
    the results), and the same values as Python ints got a self-contradicting "must be integers" message."""
    import numpy as np

    from lightning_dve.batches import extract_sample_ids

    hashes = np.array([2**63 + 5, 7], dtype=np.uint64)
    with pytest.raises(SampleIdError, match=r"must fit in int64 .*uint64 ids of 2\*\*63 or more .*would wrap"):
        extract_sample_ids({"index": hashes}, "index", 2)
    with pytest.raises(SampleIdError, match=r"must fit in int64 .*got 9223372036854775813\."):
        extract_sample_ids({"index": [7, 2**63 + 5]}, "index", 2)  # the offending id is named, not the first
    for mixed, named in (([1, None], "NoneType values such as None"), ([3, "a"], "str values such as 'a'")):
        with pytest.raises(SampleIdError, match=rf"must be integers \(dataset indices\); got a list holding {named}"):
            extract_sample_ids({"index": mixed}, "index", 2)  # was called an int64 overflow (the first was an int)
    small = np.array([2**63 - 1, 7], dtype=np.uint64)  # within int64: kept exactly
    assert extract_sample_ids({"index": small}, "index", 2).tolist() == [2**63 - 1, 7]


@pytest.mark.parametrize(("ids", "hint"), [
    (lambda b: b["index"].reshape(-1, 1), r"shape \(16, 1\) .*ids\.reshape\(-1\)"),
    (lambda b: torch.cat([b["index"], b["index"] + 1000]), r"shape \(32,\) .*more ids than samples .*CombinedLoader"),
])
def test_a_wrong_number_of_ids_names_its_likely_cause(fit, mlp_cls, save_dir, ids, hint):
    """``[B, 1]`` ids, and two loaders' ids for one forward per loader: the message named only a sequence-first
    layer, the cause of neither."""
    with pytest.raises(SampleIdError, match=hint):
        fit(mlp_cls(), DataValueEmbedding(save_dir, sample_ids=ids))


def test_sample_ids_of_wrong_length(fit, mlp_cls, save_dir):
    with pytest.raises(SampleIdError, match=r"shape \(15,\) but the batch has 16 samples"):
        fit(mlp_cls(), DataValueEmbedding(save_dir, sample_ids=lambda b: b["index"][:-1]))


def test_a_sequence_first_layer_is_named_in_the_error(fit, mlp_cls, save_dir):
    """A Linear on ``[T, B, d]`` (sequence first) sees T as the batch: the error says so instead of only blaming
    the ids."""
    class SequenceFirst(mlp_cls):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)

        def forward(self, x):
            tokens = x.reshape(x.shape[0], 8, 8).transpose(0, 1)  # [T=8, B=16, 8]
            return self.net[2](torch.tanh(self.proj(tokens)).mean(0).repeat(1, 2))

    with pytest.raises(SampleIdError, match=r"shape \(16,\) but the batch has 8 samples .* sequence-first input "
                                            r"\(\[T, B, \.\.\.\], e\.g\. nn\.Transformer without batch_first=True\)"):
        fit(SequenceFirst(), DataValueEmbedding(save_dir, exclude=("net.0", "net.2")))


def test_a_layer_on_flattened_positions_is_named_in_the_error(fit, mlp_cls, save_dir):
    """A head on ``[B*T, d]`` (positions flattened into the batch, as a language model's ``x.view(-1, d)``) sees
    ``B*T`` samples: the error named a sequence-first layer only."""
    class FlattenedHead(mlp_cls):
        def __init__(self) -> None:
            super().__init__()
            self.head = torch.nn.Linear(8, 10)

        def forward(self, x):
            return self.head(x.reshape(-1, 8)).reshape(x.shape[0], 8, 10).mean(1)

    with pytest.raises(SampleIdError, match=r"shape \(16,\) but the batch has 128 samples .* flattened into the "
                                            r"batch dimension \(\[B\*T, d\]"):
        fit(FlattenedHead(), DataValueEmbedding(save_dir, exclude=("net",)))


def test_duplicate_ids_in_one_step(fit, mlp_cls, make_loader, save_dir):
    drawn = [0, 0, 1, 2, 3, 3, 4, 5]  # a sampler with replacement
    loader = make_loader(n=8, batch_size=8, sampler=drawn)
    with pytest.raises(SampleIdError, match=r"\[0, 3\] occur more than once in step 0.*allow_duplicate_ids=True"):
        fit(mlp_cls(), DataValueEmbedding(save_dir, sample_ids="index"), train=loader)


def test_allow_duplicate_ids_records_each_copy(fit, mlp_cls, make_loader, tmp_path, test_batch):
    drawn = [0, 0, 1, 2, 3, 3, 4, 5]
    dve = DataValueEmbedding(tmp_path / "dve", allow_duplicate_ids=True)
    fit(mlp_cls(), dve, train=make_loader(n=8, batch_size=8, sampler=drawn), max_epochs=2)
    assert stored_ids(tmp_path / "dve") == drawn * 2

    model = mlp_cls()  # any module with the same layers scores the embeddings
    per_step = dve.embeddings.influence(model, test_batch, per_step=True)
    assert per_step.sample_ids.tolist() == drawn * 2
    assert per_step.steps.tolist() == [0] * 8 + [1] * 8
    # both copies of a sample in one step saw the same parameters and the same M: equal embeddings
    torch.testing.assert_close(per_step.scores[:, 0], per_step.scores[:, 1])
    assert per_step.scores[:, 0].abs().max() > 0
    totals = dve.embeddings.influence(model, test_batch)
    assert totals.sample_ids.tolist() == [0, 1, 2, 3, 4, 5]
    expected = per_step.scores[:, [0, 1, 8, 9]].sum(dim=1)  # the four occurrences of sample 0
    torch.testing.assert_close(totals.scores[:, 0], expected)


# --- unsupported models ------------------------------------------------------------------------------------


def test_batchnorm_in_train_mode_is_refused(fit, mlp_cls, save_dir):
    class BatchNormMLP(mlp_cls):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(64, 16), nn.BatchNorm1d(16, affine=False), nn.Tanh(),
                                     nn.Linear(16, 10))

    with pytest.raises(UnsupportedError, match=r"'net\.1' \(BatchNorm1d\) is in train mode"):
        fit(BatchNormMLP(), DataValueEmbedding(save_dir))

    class EvalBatchNormMLP(BatchNormMLP):  # the fix the message suggests
        def on_train_epoch_start(self):
            self.net[1].eval()

    trainer = fit(EvalBatchNormMLP(), DataValueEmbedding(save_dir, overwrite=True))
    assert len(step_files(save_dir)) == trainer.global_step == 4


def test_a_trainable_batchnorm_is_tracked_in_eval_mode_and_refused_with_batch_statistics(fit, mlp_cls, save_dir):
    """A BatchNorm with parameters is tracked (its running statistics make it per-sample) in eval mode; in train
    mode it is refused at the batch's start, and when ``training_step`` switches it to train mode after that
    check, by its forward hook."""
    class AffineBatchNormMLP(mlp_cls):
        switch = False

        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(64, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 10))

        def training_step(self, batch, batch_idx):
            self.net[1].train(self.switch)
            return super().training_step(batch, batch_idx)

    with pytest.raises(UnsupportedError, match=r"'net\.1' \(BatchNorm1d\) is in train mode"):
        fit(AffineBatchNormMLP(), DataValueEmbedding(save_dir))

    class EvalBatchNormMLP(AffineBatchNormMLP):
        def on_train_epoch_start(self):
            self.net[1].eval()

    fit(EvalBatchNormMLP(), DataValueEmbedding(save_dir, overwrite=True))
    assert [layer["kind"] for layer in TrajectoryStore.open(save_dir).manifest["layers"]] == \
        ["linear", "batch_norm", "linear"]
    with pytest.raises(UnsupportedError, match=r"^a tracked BatchNorm1d was called with the statistics of its batch "
                                               r"\(in train mode"):
        fit(type("Switched", (EvalBatchNormMLP,), {"switch": True})(), DataValueEmbedding(save_dir, overwrite=True))


def test_untracked_trainable_module_names_it_and_exclude(fit, mlp_cls, save_dir):
    class PReLUMLP(mlp_cls):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(64, 16), nn.PReLU(16), nn.Tanh(), nn.Linear(16, 10))

    with pytest.raises(UnsupportedError, match=r"'net\.1' \(PReLU\).*exclude="):
        fit(PReLUMLP(), DataValueEmbedding(save_dir))

    dve = DataValueEmbedding(save_dir, exclude=("net.1",), overwrite=True)
    trainer = fit(PReLUMLP(), dve)
    assert len(step_files(save_dir)) == trainer.global_step == 4
    assert TrajectoryStore.open(save_dir).layer_names == ["net.0", "net.3"]


def test_parametrised_layer_is_refused(fit, mlp_cls, save_dir):
    class WeightNormMLP(mlp_cls):
        def __init__(self):
            super().__init__()
            first = nn.utils.parametrizations.weight_norm(nn.Linear(64, 16))
            self.net = nn.Sequential(first, nn.Tanh(), nn.Linear(16, 10))

    with pytest.raises(UnsupportedError, match=r"'net\.0' \(\w*Linear\) has a parametrised weight.*exclude="):
        fit(WeightNormMLP(), DataValueEmbedding(save_dir))

    trainer = fit(WeightNormMLP(), DataValueEmbedding(save_dir, exclude=("net.0",), overwrite=True))
    assert TrajectoryStore.open(save_dir).layer_names == ["net.2"]
    assert len(step_files(save_dir)) == trainer.global_step == 4


def test_unknown_layer_name_lists_candidates(fit, mlp_cls, save_dir):
    with pytest.raises(ConfigError, match=r"\['net\.5'\] are not modules.*\['net\.0', 'net\.2'\]"):
        fit(mlp_cls(), DataValueEmbedding(save_dir, layers=["net.5"]))


def test_a_container_named_in_layers_names_its_supported_layers(fit, mlp_cls, save_dir):
    """``layers=("net",)`` (an nn.Sequential, as an attention block of nn.Linear q/k/v would be): the error told
    the user to exclude the module they asked to track."""
    with pytest.raises(ConfigError, match=r"layers= names the layers to track themselves, and 'net' \(Sequential\) "
                                          r"is a container of supported layers: pass layers=\('net\.0', 'net\.2'\)"):
        fit(mlp_cls(), DataValueEmbedding(save_dir, layers=("net",)))


# --- NaN gradients -----------------------------------------------------------------------------------------


def test_nan_gradient_raises_and_keeps_earlier_steps(fit, mlp_cls, save_dir):
    class NanAtStep2(mlp_cls):
        def training_step(self, batch, batch_idx):
            loss = self.loss(batch)
            return loss * float("nan") if batch_idx == 2 else loss

    model = NanAtStep2()
    with pytest.raises(GradientError, match=r"non-finite per-sample gradient in layer 'net\.\d' at step \d+ for "
                                            r"sample ids \[32, 33, .*Steps before this one are kept in the "
                                            r"store: resume from a Lightning checkpoint saved before it"):
        fit(model, DataValueEmbedding(save_dir))
    assert step_files(save_dir) == ["step_00000000.safetensors", "step_00000001.safetensors"]
    assert TrajectoryStore.open(save_dir).manifest["status"] == "recording"
    for name in step_files(save_dir):  # complete, readable files with finite gradients
        tensors = load_file(save_dir / "steps" / name)
        grads = [t for key, t in tensors.items() if key.startswith("grad/")]
        assert len(grads) == 2 and all(torch.isfinite(g).all() for g in grads)
    assert all(len(m._forward_hooks) == 0 for m in model.modules())  # released on the exception too


@pytest.mark.parametrize(("accumulate", "nan_batch"), [(1, 2), (2, 4), (2, 5)])
def test_nan_gradient_error_names_the_failing_optimizer_step(fit, mlp_cls, make_loader, save_dir, accumulate,
                                                            nan_batch):
    # Every case fails inside optimizer step 2 (counted from 0, like the store's step files).
    class NanAt(mlp_cls):
        def training_step(self, batch, batch_idx):
            loss = self.loss(batch)
            return loss * float("nan") if batch_idx == nan_batch else loss

    model = NanAt()
    with pytest.raises(GradientError, match=r"at step 2 "):
        fit(model, DataValueEmbedding(save_dir), train=make_loader(n=64, batch_size=16 // accumulate),
            accumulate_grad_batches=accumulate)
    if nan_batch == 4:  # a NaN before the step's last micro-batch stops the fit there, before the optimizer step
        assert all(bool(p.isfinite().all()) for p in model.parameters())


# --- unsupported trainer settings --------------------------------------------------------------------------


def test_gradient_accumulation_records_one_step_per_optimizer_step(fit, mlp_cls, make_loader, save_dir):
    # Supported since the accumulation release: the micro-batches of a step form one record, and each sample's
    # weight is the one the optimizer applied, 1 / (micro-batch size * micro-batches) for a mean loss.
    trainer = fit(mlp_cls(), DataValueEmbedding(save_dir), train=make_loader(n=64, batch_size=8),
                  accumulate_grad_batches=2)
    assert trainer.global_step == 4
    store = TrajectoryStore.open(save_dir)
    assert store.steps == [0, 1, 2, 3] and len(step_files(save_dir)) == 4
    for step in store.steps:
        record = store.read_step(step)
        assert record.sample_ids.tolist() == list(range(16 * step, 16 * step + 16))
        assert record.weights.tolist() == pytest.approx([1 / 16] * 16)


def test_half_precision_weights_are_refused(fit, mlp_cls, save_dir):
    with pytest.raises(UnsupportedError, match=r"precision='bf16-true' \(use '32-true', '64-true', 'bf16-mixed' or "
                                               r"'16-mixed'\)"):
        fit(mlp_cls(), DataValueEmbedding(save_dir), precision="bf16-true")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_weights_cast_to_half_precision_by_the_user_are_refused(fit, mlp_cls, save_dir, dtype):
    """A module cast to half precision under the default ``"32-true"``: its updates are rounded (3.6-9.5% off
    ``lr g`` per parameter on the probe), so it is refused at fit start like ``"bf16-true"``."""
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(UnsupportedError, match=rf"half-precision weights \(parameter '[\w.]+' is {name}, so each "
                                               r"update is rounded to it; keep the weights in float32"):
        fit(mlp_cls().to(dtype), DataValueEmbedding(save_dir))
    assert not step_files(save_dir)


@pytest.mark.parametrize("layers", [["net.2"], None])
def test_trainable_parameters_outside_the_tracked_layers_are_named(fit, mlp_cls, save_dir, caplog, layers):
    """``layers=`` leaving the first Linear out: its weight and bias train unmeasured, and fit says so (once, at
    its start); with every layer tracked it says nothing."""
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")  # Lightning's logger does not propagate
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger=logger.name):
            fit(mlp_cls(), DataValueEmbedding(save_dir, layers=layers, report=None))
    finally:
        logger.removeHandler(caplog.handler)
    said = [r.getMessage() for r in caplog.records if "in no tracked layer" in r.getMessage()]
    expected = ["DataValueEmbedding: 2 trainable parameter(s) are in no tracked layer (net.0.weight, net.0.bias): "
                "they train, but the scores and the report measure influence through the 1 tracked layer(s) only."]
    assert said == (expected if layers else [])


def _untracked_said(fit, model: nn.Module, dve: DataValueEmbedding, caplog) -> list[str]:
    """Fit ``model`` and return what fit said about trainable parameters in no tracked layer."""
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")  # Lightning's logger does not propagate
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger=logger.name):
            fit(model, dve)
    finally:
        logger.removeHandler(caplog.handler)
    return [r.getMessage() for r in caplog.records if "in no tracked layer" in r.getMessage()]


class WithExtras(TinyMLP):
    """TinyMLP with ``extras`` unused trainable scalars (in a ``ParameterList``) and a frozen bfloat16 table."""

    def __init__(self, extras: int) -> None:
        super().__init__()
        self.extra = nn.ParameterList(nn.Parameter(torch.zeros(1)) for _ in range(extras))
        self.table = nn.Parameter(torch.zeros(3, dtype=torch.bfloat16), requires_grad=False)


@pytest.mark.parametrize(("extras", "freeze_bias", "named"), [
    (0, True, "1 trainable parameter(s) are in no tracked layer (net.0.weight)"),
    (4, False, "6 trainable parameter(s) are in no tracked layer (net.0.weight, net.0.bias, extra.0, extra.1, extra.2 "
               "and 1 more)"),
], ids=["one", "past_five"])
def test_untracked_trainable_parameters_are_counted_and_frozen_ones_left_out(fit, save_dir: Path, caplog,
                                                                             extras: int, freeze_bias: bool,
                                                                             named: str) -> None:
    """Only trainable parameters count (a frozen bias, a frozen bfloat16 table: neither named nor refused as
    half-precision weights); one is named alone, and past five the rest are counted."""
    model = WithExtras(extras)
    model.net[0].bias.requires_grad_(not freeze_bias)
    said = _untracked_said(fit, model, DataValueEmbedding(save_dir, layers=["net.2"], report=None), caplog)
    assert said == [f"DataValueEmbedding: {named}: they train, but the scores and the report measure influence "
                    "through the 1 tracked layer(s) only."]


def test_a_frozen_half_precision_parameter_is_neither_refused_nor_named(fit, save_dir: Path, caplog) -> None:
    """A frozen bfloat16 parameter is never updated, so nothing is rounded: every trainable layer tracked, fit
    records its steps and says nothing about untracked parameters."""
    assert _untracked_said(fit, WithExtras(0), DataValueEmbedding(save_dir, report=None), caplog) == []
    assert step_files(save_dir)


def test_manual_optimization_is_refused(fit, mlp_cls, save_dir):
    class Manual(mlp_cls):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(self.loss(batch))
            opt.step()

    with pytest.raises(UnsupportedError, match=r"manual optimization"):
        fit(Manual(), DataValueEmbedding(save_dir))


def test_two_optimizers_are_refused(fit, mlp_cls, save_dir):
    # Lightning itself only accepts several optimizers under manual optimization.
    class TwoOptimizers(mlp_cls):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

        def configure_optimizers(self):
            return [torch.optim.SGD(self.net[0].parameters(), lr=0.1),
                    torch.optim.SGD(self.net[2].parameters(), lr=0.1)]

    with pytest.raises(UnsupportedError, match=r"2 optimizers \(use exactly one\)"):
        fit(TwoOptimizers(), DataValueEmbedding(save_dir))



def test_sharded_and_model_parallel_strategies_are_refused():
    # FSDP and model parallelism need a GPU in Lightning, so their real strategy objects are checked directly;
    # DeepSpeed is a DDPStrategy subclass that shards the optimizer state (not installed here: same MRO by name)
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy, SingleDeviceStrategy

    from lightning_dve.callback_setup import supported_strategy

    deepspeed = type("DeepSpeedStrategy", (DDPStrategy,), {})()
    assert supported_strategy(SingleDeviceStrategy(device=torch.device("cpu")))
    assert supported_strategy(DDPStrategy(start_method="spawn"))
    assert not supported_strategy(FSDPStrategy())
    assert not supported_strategy(ModelParallelStrategy())
    assert not supported_strategy(deepspeed)
    assert not supported_strategy(type("XLAStrategy", (DDPStrategy,), {})())  # multi-device XLA, by name too
    assert not supported_strategy(type("MyDeepSpeed", (type(deepspeed),), {})())  # a subclass of a refused one


def test_a_ddp_subclass_that_shards_the_optimizer_is_refused_by_a_real_trainer(fit, mlp_cls, save_dir):
    from lightning.pytorch.strategies import DDPStrategy

    # a one-process DDP run sets the rank variables (LOCAL_RANK, ...) in os.environ and a default process group:
    # both must go, or a later test's DDP launcher takes itself for an already launched rank and waits forever
    environ = dict(os.environ)
    deepspeed = type("DeepSpeedStrategy", (DDPStrategy,), {})(process_group_backend="gloo")
    try:
        with pytest.raises(UnsupportedError, match=r"strategy DeepSpeedStrategy \(use one device or DDP: "
                                                   r"strategy='ddp'"):
            fit(mlp_cls(), DataValueEmbedding(save_dir), strategy=deepspeed)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(environ)
    assert not (save_dir / "manifest.json").exists()


# --- save_dir ----------------------------------------------------------------------------------------------


def test_fresh_fit_into_non_empty_save_dir(fit, mlp_cls, save_dir):
    fit(mlp_cls(), DataValueEmbedding(save_dir))
    with pytest.raises(StoreError, match=r"is not empty.*overwrite=True"):
        fit(mlp_cls(), DataValueEmbedding(save_dir))
    trainer = fit(mlp_cls(), DataValueEmbedding(save_dir, overwrite=True), limit_train_batches=2)
    assert step_files(save_dir) == ["step_00000000.safetensors", "step_00000001.safetensors"]
    assert TrajectoryStore.open(save_dir).steps == [0, 1] and trainer.global_step == 2

    model, again = mlp_cls(), save_dir.parent / "again"
    trainer = fit(model, DataValueEmbedding(again))
    trainer.fit_loop.max_epochs = 2  # a second fit of the same Trainer trains on: a new run to record
    with pytest.raises(StoreError, match=r"is not empty: each fit records a new run \(a second fit of the same "
                                         r"Trainer too\).*overwrite=True"):
        trainer.fit(model, train_dataloaders=DataLoader(DigitsDict(range(64)), batch_size=16))
    assert TrajectoryStore.open(again).steps == [0, 1, 2, 3] and trainer.global_step == 4

    other = save_dir.parent / "other"
    other.mkdir()
    (other / "notes.txt").write_text("not a store")
    with pytest.raises(StoreError, match=r"is not empty"):
        fit(mlp_cls(), DataValueEmbedding(other))


def test_default_save_dir_is_under_default_root_dir(fit, mlp_cls, tmp_path):
    dve = DataValueEmbedding()
    fit(mlp_cls(), dve, default_root_dir=tmp_path)
    assert (tmp_path / "dve" / "manifest.json").is_file()
    assert len(step_files(tmp_path / "dve")) == 4
    assert dve.embeddings.store.root == tmp_path / "dve"


def test_embeddings_in_a_process_that_ran_no_fit_follow_the_latest_recording(fit, mlp_cls, save_dir, test_batch):
    """Under ddp_spawn / ddp_notebook every fit runs in child processes: the parent's callback gets no hook, so its
    cached handle must not outlive the recording it was opened on (it kept the first fit's steps, and every query
    was refused as 'recorded again'). Here other callback objects stand in for the children's copies."""
    parent = DataValueEmbedding(save_dir, projection_dim=16)
    fit(mlp_cls(), DataValueEmbedding(save_dir, projection_dim=16))  # 4 steps
    assert parent.embeddings.steps == [0, 1, 2, 3]
    model = mlp_cls()
    fit(model, DataValueEmbedding(save_dir, projection_dim=16, overwrite=True), max_epochs=2)  # 8 steps
    assert parent.embeddings.steps == list(range(8))
    assert parent.embeddings.influence(model, test_batch).scores.shape == (len(test_batch["y"]), 64)


# --- what is recorded --------------------------------------------------------------------------------------


def test_validation_and_sanity_check_record_nothing(fit, mlp_cls, make_loader, save_dir):
    calls = []

    class CountingMLP(mlp_cls):
        def validation_step(self, batch, batch_idx):
            calls.append(self.trainer.sanity_checking)
            self.log("val_loss", self.loss(batch))

    trainer = fit(CountingMLP(), DataValueEmbedding(save_dir), val=make_loader(n=32, batch_size=8, offset=500),
                  num_sanity_val_steps=2, max_epochs=2)
    assert calls.count(True) == 2 and calls.count(False) == 8  # the val loop did run
    assert trainer.global_step == 8
    assert len(step_files(save_dir)) == 8
    assert TrajectoryStore.open(save_dir).steps == list(range(8))
    assert stored_ids(save_dir) == list(range(64)) * 2  # no validation sample anywhere


def test_training_step_returning_none_records_nothing(fit, mlp_cls, save_dir):
    class SkipSecond(mlp_cls):
        def training_step(self, batch, batch_idx):
            return None if batch_idx == 1 else super().training_step(batch, batch_idx)

    trainer = fit(SkipSecond(), DataValueEmbedding(save_dir))
    # Lightning still counts the skipped batch as an optimizer step: the store has a gap at step 1
    assert trainer.global_step == 4
    assert TrajectoryStore.open(save_dir).steps == [0, 2, 3]
    assert step_files(save_dir) == [f"step_0000000{s}.safetensors" for s in (0, 2, 3)]
    assert stored_ids(save_dir) == list(range(16)) + list(range(32, 64))  # batch 1 (ids 16..31) absent


def test_a_fit_that_records_no_step_finishes_with_empty_embeddings(fit, mlp_cls, save_dir, test_batch):
    """Every ``training_step`` returns ``None``: the fit ends normally, the store is complete and empty, and
    queries return no occurrences (the train end crashed on the empty segment before)."""
    class SkipAll(mlp_cls):
        def training_step(self, batch, batch_idx):
            return None

    model, dve = SkipAll(), DataValueEmbedding(save_dir)
    fit(model, dve)
    assert TrajectoryStore.open(save_dir).steps == [] and step_files(save_dir) == []
    result = DataValueEmbeddings.load(save_dir).influence(mlp_cls(), test_batch)  # SkipAll has no loss
    assert result.scores.shape == (len(test_batch["y"]), 0) and dve.embeddings.steps == []
    per_sample = lambda m, b: F.cross_entropy(m(b["x"]), b["y"], reduction="none")  # noqa: E731
    exact = dve.embeddings.exact_influence(model, test_batch, loss_fn=per_sample)
    assert exact.scores.shape == (len(test_batch["y"]), 0) and exact.sample_ids.numel() == 0


def _proxy_warnings(record) -> list[str]:
    """The optimizer warnings (other DataValueEmbedding warnings, e.g. about the reference set, are ignored)."""
    return [str(w.message) for w in record if "treated as plain SGD" in str(w.message)]


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: torch.optim.RMSprop(p, lr=1e-3), "RMSprop is not SGD, Adam or AdamW"),
    (lambda p: torch.optim.Adam(p, lr=1e-3, amsgrad=True), "Adam with amsgrad"),
    (lambda p: type("StepsItsOwnWay", (torch.optim.AdamW,),  # any override: what it does cannot be known
                    {"step": lambda self, closure=None: torch.optim.AdamW.step(self, closure)})(p),
     r"StepsItsOwnWay overrides the step\(\) of torch.optim.Adam"),
])
def test_unmodelled_optimizer_warns_once(fit, mlp_cls, save_dir, make, message):
    class Unmodelled(mlp_cls):
        def configure_optimizers(self):
            return make(self.parameters())

    with pytest.warns(UserWarning, match=message + r".*treated as plain SGD") as record:
        fit(Unmodelled(), DataValueEmbedding(save_dir))
    assert len(_proxy_warnings(record)) == 1
    assert len(step_files(save_dir)) == 4


def test_two_callbacks_recording_into_one_folder_are_refused_before_anything_is_written(fit, mlp_cls, tmp_path):
    """The folder lock excludes other processes, not a second callback of the same Trainer: both would write one
    store (the second with ``overwrite=True`` failed at train end with a message about mixed runs)."""
    # other settings (Lightning itself refuses two of the same settings: their state keys are the same)
    for first, second in ((dict(save_dir=tmp_path / "dve"), dict(save_dir=tmp_path / "dve", overwrite=True,
                                                                  projection_dim=None)),
                          ({}, dict(layers=["net.0"]))):  # save_dir=None: both <default_root_dir>/dve
        with pytest.raises(ConfigError, match=r"two DataValueEmbedding callbacks of this Trainer would record into "
                                              r".*dve: give each its own save_dir"):
            fit(mlp_cls(), DataValueEmbedding(**first), callbacks=[DataValueEmbedding(**second)],
                default_root_dir=tmp_path)
        assert not (tmp_path / "dve").exists()


def test_lbfgs_is_recorded_at_its_first_closure_evaluation(fit, mlp_cls, make_loader, save_dir):
    """LBFGS evaluates the closure several times per step (here 3): each step's rows are the per-sample
    gradients at the step's starting weights (a per-example backward loop along a plain LBFGS loop), not their
    sum over the evaluations (3.0x the gradient before the fix), and the training is the plain loop's."""
    class Lbfgs(mlp_cls):
        def configure_optimizers(self):
            return torch.optim.LBFGS(self.parameters(), lr=0.1, max_iter=3)

    model, reference = Lbfgs(), Lbfgs()
    with pytest.warns(UserWarning, match="LBFGS is not SGD.*first closure evaluation"):
        fit(model, DataValueEmbedding(save_dir, projection_dim=None, report=None, checkpoint_interval=None),
            limit_train_batches=3)
    store, optimizer = TrajectoryStore.open(save_dir), torch.optim.LBFGS(reference.parameters(), lr=0.1, max_iter=3)
    linears = {name: m for name, m in reference.named_modules() if isinstance(m, nn.Linear)}
    evaluations = []
    for step, batch in zip(store.steps, make_loader(), strict=False):
        rows = store.read_step(step).grads
        for name, layer in linears.items():
            expected = []
            for i in range(len(batch["y"])):
                sample = {key: value[i : i + 1] for key, value in batch.items()}
                weight, bias = torch.autograd.grad(reference.loss(sample), [layer.weight, layer.bias])
                expected.append(torch.cat([weight, bias[:, None]], dim=1).flatten())
            torch.testing.assert_close(rows[name], torch.stack(expected), rtol=1e-4, atol=1e-6)

        def closure(batch=batch):
            evaluations.append(step)
            optimizer.zero_grad()
            loss = reference.loss(batch)
            loss.backward()
            return loss

        optimizer.step(closure)
    assert store.steps == [0, 1, 2] and len(evaluations) == 3 * 3
    for trained, replayed in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(trained, replayed)


@pytest.mark.parametrize("make", [
    lambda p: torch.optim.SGD(p, lr=0.1),
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01),
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
    lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=0.01),
    lambda p: torch.optim.AdamW(p, lr=1e-3),
    lambda p: type("NamedSGD", (torch.optim.SGD,), {})(p, lr=0.1),  # a subclass that keeps torch's step()
])
def test_modelled_optimizer_does_not_warn(fit, mlp_cls, save_dir, make):
    class Modelled(mlp_cls):
        def configure_optimizers(self):
            return make(self.parameters())

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fit(Modelled(), DataValueEmbedding(save_dir))
    assert _proxy_warnings(record) == []


def test_learning_rates_follow_step_scheduler(fit, mlp_cls, save_dir):
    class Scheduled(mlp_cls):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.4)
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    fit(Scheduled(), DataValueEmbedding(save_dir))
    store = TrajectoryStore.open(save_dir)
    assert store.steps == [0, 1, 2, 3]
    for step in store.steps:
        lrs = store.read_step(step).lrs
        assert lrs.dtype == torch.float64
        assert lrs.tolist() == pytest.approx([0.4 * 0.5**step] * 2)


def test_learning_rates_per_param_group(fit, mlp_cls, save_dir):
    class TwoGroups(mlp_cls):
        def configure_optimizers(self):
            return torch.optim.SGD([{"params": self.net[2].parameters(), "lr": 0.01},
                                    {"params": self.net[0].parameters(), "lr": 0.3}], lr=0.1)

    fit(TwoGroups(), DataValueEmbedding(save_dir))
    store = TrajectoryStore.open(save_dir)
    assert store.layer_names == ["net.0", "net.2"]
    for step in store.steps:
        assert store.read_step(step).lrs.tolist() == pytest.approx([0.3, 0.01])


# --- loss reductions ---------------------------------------------------------------------------------------


class _Reduced:
    """Mixin: per-sample cross-entropy reduced by sum or by given weights instead of the mean."""

    reduction = "mean"

    def loss(self, batch):
        losses = F.cross_entropy(self(batch["x"]), batch["y"], reduction="none")
        if self.reduction == "sum":
            return losses.sum()
        if self.reduction == "weights":
            return (losses * sample_weights(batch).to(losses.dtype)).sum()
        return losses.mean()


def sample_weights(batch) -> torch.Tensor:
    """Uneven per-sample weights (deterministic in the sample id)."""
    return (1.0 + (batch["index"] % 3).double()) / 30.0


def test_sum_and_weights_store_the_per_sample_gradients_of_the_mean_path(fit, mlp_cls, tmp_path, test_batch):
    def run(reduction, lr, loss_reduction):
        model = type("M", (_Reduced, mlp_cls), {"reduction": reduction})(lr=lr)
        dve = DataValueEmbedding(tmp_path / reduction, loss_reduction=loss_reduction, projection_dim=256)
        fit(model, dve, precision="64-true")
        return dve, model, TrajectoryStore.open(tmp_path / reduction)

    batch = 16
    test_batch = {**test_batch, "x": test_batch["x"].double()}
    mean_dve, mean_model, mean = run("mean", 0.1, "mean")
    sum_dve, sum_model, summed = run("sum", 0.1 / batch, "sum")
    w_dve, w_model, weighted = run("weights", 0.1, sample_weights)

    first = mean.read_step(0)
    assert first.weights.tolist() == [1 / batch] * batch
    assert summed.read_step(0).weights.tolist() == [1.0] * batch
    torch.testing.assert_close(weighted.read_step(0).weights, sample_weights({"index": first.sample_ids}))
    # per-sample gradients of the per-sample loss: the same at theta_0 whatever the reduction
    for other in (summed, weighted):
        record = other.read_step(0)
        assert record.grads.keys() == first.grads.keys()
        for name in first.grads:
            torch.testing.assert_close(record.grads[name], first.grads[name], rtol=1e-9, atol=1e-12)
    # mean with lr and sum with lr / B are the same trajectory, so every step and every embedding agree
    for step in mean.steps:
        for name, g in mean.read_step(step).grads.items():
            torch.testing.assert_close(summed.read_step(step).grads[name], g, rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(sum_dve.embeddings.influence(sum_model, test_batch).scores,
                               mean_dve.embeddings.influence(mean_model, test_batch).scores, rtol=1e-6, atol=1e-10)
    assert math.isfinite(float(w_dve.embeddings.influence(w_model, test_batch).scores.sum()))
    with pytest.raises(LossReductionError, match=r"loss_reduction='weights'"):  # a module with another loss
        w_dve.embeddings.influence(mean_model, test_batch)


@pytest.mark.parametrize("empty", [True, False], ids=["empty mask: 0 / 0", "an infinite weight"])
def test_non_finite_loss_weights_are_refused_by_name_and_keep_the_earlier_steps(fit, mlp_cls, save_dir, empty):
    """A masked loss whose mask is empty at step 2 gives NaN weights (``mask / mask.sum()``): until session 39 that
    was blamed on the gradients ("training diverged"); an infinite weight with a finite loss reached the train end's
    recursion and failed there in torch's eigh (an audit of session 39)."""

    def weights(batch):
        mask = torch.ones(len(batch["y"]), dtype=torch.float64)
        hit = batch["index"] == 32  # the first sample of step 2's batch (no shuffle)
        if empty and bool(hit.any()):
            mask[:] = 0
        return mask / mask.sum() if empty else torch.where(hit, math.inf, 1 / len(mask))

    class Masked(mlp_cls):
        def loss(self, batch):
            losses = F.cross_entropy(self(batch["x"]), batch["y"], reduction="none")
            return (losses * weights(batch).to(losses.dtype)).nansum() if empty else losses.mean()

    dve = DataValueEmbedding(save_dir, loss_reduction=weights, projection_dim=64)
    message = (r"the loss_reduction callable returned (16|1) non-finite weight\(s\) at step 2 \(e\.g\. (nan|inf)\) for "
               r"sample ids \[32.*mask / mask\.sum\(\) is NaN when a batch's mask is empty\. Return finite weights")
    with pytest.raises(ConfigError, match=message):
        fit(Masked(), dve, max_epochs=1)
    assert TrajectoryStore.open(save_dir).steps == [0, 1]


def test_a_nan_learning_rate_is_refused_as_nan_not_as_a_late_change(fit, mlp_cls, save_dir):
    """A schedule that reaches NaN at step 2: the check of late hyperparameter changes compared NaN with NaN and said
    "'lr' was changed from nan to nan after the callback read it" (an audit of session 39)."""

    class NanSchedule(mlp_cls):
        def configure_optimizers(self):
            optimizer = torch.optim.SGD(self.parameters(), lr=self.lr)
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: math.nan if step >= 2 else 1.0)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    with pytest.raises(UnsupportedError, match=r"step 2: param group 0's 'lr' is NaN, so the update and the recorded "
                                               r"step are undefined\. Fix the value set or the LR scheduler"):
        fit(NanSchedule(), DataValueEmbedding(save_dir, projection_dim=64), max_epochs=1)
    assert TrajectoryStore.open(save_dir).steps == [0, 1]


# --- lifecycle ---------------------------------------------------------------------------------------------


def test_embeddings_before_fit_raise(save_dir):
    with pytest.raises(ConfigError, match=r"no embeddings.*call trainer\.fit"):
        DataValueEmbedding(save_dir).embeddings


def test_hooks_are_removed_after_fit(fit, mlp_cls, save_dir, test_batch):
    model = mlp_cls()
    dve = DataValueEmbedding(save_dir)
    fit(model, dve)
    tracked = [model.net[0], model.net[2]]
    assert all(len(m._forward_hooks) == 0 for m in tracked)
    assert all(len(m._forward_hooks) == 0 for m in model.modules())

    model.train()
    loss = model.loss(test_batch)
    loss.backward()
    capture = dve._capture
    assert capture._blocks == {} and capture.outputs == []
    assert all(pending == [] for pending in capture._inputs.values())
    assert len(step_files(save_dir)) == 4  # nothing new recorded


def test_default_layout_resolves_from_the_tracked_sizes_at_each_fit(fit, mlp_cls, tmp_path):
    """``layout="auto"``: TinyMLP has 16*65 + 10*17 = 1210 exact dimensions (one full matrix); with hidden 128
    it has 128*65 + 10*129 = 9610 (one matrix per layer). The same callback object resolves afresh per fit."""
    from lightning_dve.config import AccumulatorLayout

    dve = DataValueEmbedding(tmp_path / "small", projection_dim=None)
    fit(mlp_cls(), dve)
    assert dve.embeddings.store.manifest["settings"]["layout"] == "full"
    dve.save_dir = tmp_path / "wide"
    fit(mlp_cls(hidden=128), dve)
    assert dve.config.layout is AccumulatorLayout.PER_LAYER
    assert dve.embeddings.store.manifest["settings"]["layout"] == "per_layer"


@pytest.mark.parametrize("returned", [torch.tensor(0.25), torch.full((4, 1), 0.25), torch.full((3,), 0.25)])
def test_loss_weights_of_another_shape_than_the_batch_are_refused(returned: torch.Tensor) -> None:
    """Oracle: the batch size. A ``loss_reduction`` callable must give one weight per sample; a scalar (the mean
    weight), a column or a short vector would broadcast over the batch's per-sample gradients without an error."""
    from lightning_dve.batches import reduction_weights
    from lightning_dve.config import LossReduction

    batch = {"x": torch.zeros(4, 2)}
    shape = re.escape(str(tuple(returned.shape)))
    with pytest.raises(ConfigError, match=rf"returned shape {shape}; expected \(4,\)"):
        reduction_weights(LossReduction.WEIGHTS, batch, 4, lambda _: returned)
    weights = reduction_weights(LossReduction.WEIGHTS, batch, 4, lambda _: torch.full((4,), 0.25))
    assert weights.dtype == torch.float64 and weights.tolist() == [0.25] * 4


def test_check_finite_names_the_layer_and_samples_and_ignores_an_overflowing_sum():
    from lightning_dve.batches import check_finite

    ids = torch.tensor([5, 6, 7])
    big = torch.full((3, 4), 3e38)  # finite rows whose float32 sum overflows: no error
    check_finite({"a": torch.zeros(3, 2), "b": big}, ids, step=3)
    for bad in (float("nan"), float("inf"), -float("inf")):
        rows = torch.zeros(3, 4)
        rows[1, 2] = bad
        with pytest.raises(GradientError, match=r"layer 'b' at step 3 for sample ids \[6\]"):
            check_finite({"a": torch.zeros(3, 2), "b": rows}, ids, step=3)
    check_finite({}, ids, step=3)
    with pytest.raises(GradientError, match=r"sample ids \[0, 1, 2, 3, 4, 5, 6, 7, 8, 9\] and 2 more\."):
        check_finite({"a": torch.full((12, 2), float("nan"))}, torch.arange(12), step=0)


def test_float64_rows_beyond_float32_are_refused_for_a_narrower_storage():
    """A finite float64 gradient of 1e39 was stored as NaN (float16, whose float32 row scale overflows) or inf
    (float32, bfloat16), and the embeddings' warning blamed the recursion (an audit). With ``narrow`` (any storage
    dtype but float64) such rows are refused at their step, naming them; float64 storage keeps them."""
    from lightning_dve.batches import check_finite

    ids, rows = torch.tensor([5, 6, 7]), torch.zeros(3, 4, dtype=torch.float64)
    rows[2, 1] = -1e39
    check_finite({"a": rows}, ids, step=3)  # float64 storage
    with pytest.raises(GradientError, match=r"float32-overflowing \(stored as inf or NaN in the narrower "
                                            r"storage_dtype: storage_dtype='float64' keeps it\) per-sample gradient "
                                            r"in layer 'a' at step 3 for sample ids \[7\]"):
        check_finite({"a": rows}, ids, step=3, narrow=True)
    rows[0, 0] = float("nan")
    with pytest.raises(GradientError, match=r"non-finite per-sample gradient in layer 'a' .*sample ids \[5, 7\]"):
        check_finite({"a": rows}, ids, step=3, narrow=True)
    check_finite({"a": torch.full((3, 4), 3e38)}, ids, step=3, narrow=True)  # float32 rows: within range


def test_state_key_of_the_auto_layout_matches_the_earlier_per_layer_default():
    """Lightning finds a callback's state in a checkpoint by ``state_key``: a checkpoint written when
    ``"per_layer"`` was the default must still resume a callback created with today's defaults."""
    assert DataValueEmbedding().state_key == DataValueEmbedding(layout="per_layer").state_key
    assert DataValueEmbedding().state_key != DataValueEmbedding(projection_dim=64).state_key


def test_a_layer_used_by_some_micro_batches_only_is_not_refused(fit, save_dir):
    """Under gradient accumulation a head used by the first micro-batch of a step only has a ``.grad`` but no
    rows from the last one: it was reached, not used functionally."""
    from tests.conftest import TwoHeadMLP

    dve = DataValueEmbedding(save_dir, projection_dim=16, report=None)
    fit(TwoHeadMLP(), dve, accumulate_grad_batches=2)
    assert dve.embeddings.steps == [0, 1]


def test_a_fit_after_one_that_failed_inside_a_step_records_only_its_own_steps(fit, mlp_cls, save_dir):
    """The first fit stops with a NaN loss in the second micro-batch of its second step; the same callback's next
    fit starts clean (the failed step's optimizer terms were left behind and closed its first micro-batch)."""
    class NaNOnce(mlp_cls):
        poison = True

        def training_step(self, batch, batch_idx):
            loss = self.loss(batch)
            return loss * math.nan if self.poison and batch_idx == 3 else loss

    dve = DataValueEmbedding(save_dir, projection_dim=16, report=None, overwrite=True)
    with pytest.raises(GradientError):
        fit(NaNOnce(), dve, accumulate_grad_batches=2)
    healthy = NaNOnce()
    healthy.poison = False
    fit(healthy, dve, accumulate_grad_batches=2)
    store = TrajectoryStore.open(save_dir)
    assert store.steps == [0, 1]
    assert [store.read_step(s).sample_ids.tolist() for s in store.steps] == [list(range(32)), list(range(32, 64))]


def test_embeddings_before_any_fit_say_where_to_load_them_from():
    """Before a fit in this process (e.g. after ``ddp_spawn``, whose fit ran in child processes) the error says to
    load the store, and where the default ``save_dir`` is."""
    with pytest.raises(ConfigError, match=r"no embeddings at None: call trainer.fit.* after strategy='ddp_spawn' .*"
                                          r"DataValueEmbeddings.load\(save_dir\) \(save_dir=None is "
                                          r"<trainer.default_root_dir>/dve\)"):
        DataValueEmbedding().embeddings


def test_layers_made_float64_under_32_true_are_recorded_in_float64(fit, save_dir):
    """A model whose layers were made float64 one by one (``self.net.double()``) trains in float64 under the default
    ``"32-true"``, while the LightningModule's ``dtype`` stays float32: exact rows are stored in float64 and equal a
    per-example backward loop to float64 round-off (they were cast to float32: 5e-8 off)."""

    class Float64Layers(TinyMLP):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x.double())

    model = Float64Layers()
    model.net.double()
    start = copy.deepcopy(model.net)
    train = DataLoader(DigitsDict(range(16)), batch_size=8)
    dve = DataValueEmbedding(save_dir, projection_dim=None, report=None, checkpoint_interval=None)
    fit(model, dve, train, max_epochs=1, max_steps=1)
    assert model.dtype == torch.float32
    store = TrajectoryStore.open(save_dir)
    assert store.manifest["dtype"] == "float64" and store.manifest["storage_dtype"] == "float64"
    record = store.read_step(0)
    batch = next(iter(train))
    for i in range(8):
        start.zero_grad()
        F.cross_entropy(start(batch["x"][i:i + 1].double()), batch["y"][i:i + 1]).backward()
        layer = start[0]
        expected = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], dim=1).flatten()
        assert record.grads["net.0"].dtype == torch.float64  # the gradient of sample i's own loss
        torch.testing.assert_close(record.grads["net.0"][i], expected, rtol=1e-12, atol=1e-15)
