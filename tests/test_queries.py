"""Queries refuse what they cannot answer: wrong-length or detached test losses, frozen modules, bad boundaries,
damaged embeddings files, a handle of a store recorded again, and bad or NaN rankings."""

from __future__ import annotations

import collections
import copy
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from safetensors import safe_open

from lightning_dve import (ConfigError, DataValueEmbedding, DataValueEmbeddings, InfluenceResult,
                          LossReductionError, StoreError)
from lightning_dve import files
from lightning_dve.batches import on_module_device
from lightning_dve.store import TrajectoryStore
from tests.conftest import TinyMLP


def per_sample_ce(module, batch):
    return F.cross_entropy(module(batch["x"]), batch["y"], reduction="none")


def flags(module):
    return {name: p.requires_grad for name, p in module.named_parameters()}


# --- the test loss -----------------------------------------------------------------------------------------


LOSSES = {  # training_step's loss of the logits z and labels y
    "mean": lambda z, y: F.cross_entropy(z, y),
    "sum": lambda z, y: F.cross_entropy(z, y, reduction="sum"),
    "coupled": lambda z, y: F.cross_entropy(z, y) + F.cross_entropy(z @ z.T, torch.arange(len(z))),  # contrastive
}


@pytest.mark.parametrize("loss, declared", [("sum", "mean"), ("mean", "sum"), ("coupled", "mean")])
def test_a_loss_reduction_other_than_the_loss_is_refused(fit, mlp_cls, save_dir, test_batch, loss, declared):
    # the recording weights each row by the declared reduction: a sum declared as a mean scales the curvature
    # and the test gradients by the batch size, so the scores would be silently meaningless
    class Model(mlp_cls):
        def training_step(self, batch, batch_idx):
            return LOSSES[loss](self(batch["x"]), batch["y"])

    model = Model()
    dve = DataValueEmbedding(save_dir, loss_reduction=declared, reference=test_batch)
    with pytest.warns(UserWarning, match=r"report is skipped: training_step's loss is not the sum of per-sample "
                                         rf"losses weighted as loss_reduction='{declared}' declares"):
        fit(model, dve)
    with pytest.raises(LossReductionError, match=r"Record again with the reduction your loss uses .*a token-level "
                                                 r"mean over a padded batch.*n / n.sum\(\)"):
        dve.embeddings.influence(model, test_batch)
    assert dve.embeddings.influence(model, test_batch, loss_fn=per_sample_ce).scores.shape[0] == 12
    pair, single = ({key: value[:n] for key, value in test_batch.items()} for n in (2, 1))
    if loss != "coupled":  # two samples tell a sum from a mean; on one they are the same loss: not checked
        with pytest.raises(LossReductionError, match=r"on the batch's first two samples"):
            dve.embeddings.influence(model, pair)
        assert dve.embeddings.influence(model, single).scores.shape[0] == 1


@pytest.mark.parametrize("loss", ["mean", "sum"])
def test_a_loss_reduction_that_matches_the_loss_is_accepted(fit, mlp_cls, save_dir, test_batch, loss):
    class Model(mlp_cls):
        def training_step(self, batch, batch_idx):
            return LOSSES[loss](self(batch["x"]), batch["y"])

    model = Model()
    dve = DataValueEmbedding(save_dir, loss_reduction=loss, reference=test_batch)
    fit(model, dve)
    assert (save_dir / "report" / "summary.json").is_file()
    assert dve.embeddings.influence(model, test_batch).scores.shape[0] == 12


@pytest.mark.parametrize("excess, refused", [(0.0, False), (0.02, False), (-0.02, False), (0.1, True),
                                             (-0.1, True)])
def test_the_reduction_check_allows_five_percent(mlp_cls, test_batch, excess, refused):
    """A loss ``(1 + excess (B - 1)) sum_i l_i`` declared as a sum: on the batch's first two samples it is
    ``1 + excess`` times what the declared weights predict, accepted within the check's 5 % and refused beyond."""
    from lightning_dve.config import LossReduction
    from lightning_dve.loss_checks import check_reduction

    class Scaled(mlp_cls):
        def training_step(self, batch, batch_idx):
            return (1 + excess * (len(batch["y"]) - 1)) * LOSSES["sum"](self(batch["x"]), batch["y"])

    if refused:
        with pytest.raises(LossReductionError, match=r"loss_reduction='sum' declares") as refusal:
            check_reduction(Scaled(), test_batch, LossReduction.SUM, None)
        assert isinstance(refusal.value, ConfigError)  # a configuration error, as every other refused setting
    else:
        check_reduction(Scaled(), test_batch, LossReduction.SUM, None)


def test_samples_the_reduction_check_cannot_weigh_are_not_checked(mlp_cls, test_batch):
    """A first sample of loss weight 0 (no per-sample loss to divide out), and a ``training_step`` that skips
    one-sample batches (returns ``None``, as for batch norm): the check passes them by."""
    from lightning_dve.config import LossReduction
    from lightning_dve.loss_checks import check_reduction

    def weights(batch):  # the batch's first sample weighs nothing
        return (batch["index"] != test_batch["index"][0]).double()

    class Weighted(mlp_cls):
        def training_step(self, batch, batch_idx):
            return (weights(batch) * F.cross_entropy(self(batch["x"]), batch["y"], reduction="none")).sum()

    class SkipsSingles(mlp_cls):
        def training_step(self, batch, batch_idx):
            return None if len(batch["y"]) < 2 else LOSSES["mean"](self(batch["x"]), batch["y"])

    check_reduction(Weighted(), test_batch, LossReduction.WEIGHTS, weights)
    check_reduction(SkipsSingles(), test_batch, LossReduction.MEAN, None)


def test_weights_that_depend_on_the_batch_are_checked_as_the_pairs_own(mlp_cls, test_batch):
    """A token-mean-like loss: sample ``i`` weighs ``t_i / sum_j t_j`` in its batch (1 alone), with ``t = 1, 2`` on
    the first two samples, whose per-sample losses are far apart (the first one's is ten times its cross-entropy):
    each loss must take its own weight in the pair."""
    from lightning_dve.config import LossReduction
    from lightning_dve.loss_checks import check_reduction

    first = test_batch["index"][0]

    def weights(batch):
        tokens = 1.0 + (batch["index"] != first).double()
        return tokens / tokens.sum()

    class TokenMean(mlp_cls):
        def training_step(self, batch, batch_idx):
            losses = F.cross_entropy(self(batch["x"]), batch["y"], reduction="none")
            losses = losses * (1 + 9 * (batch["index"] == first))
            return (weights(batch) * losses).sum()

    check_reduction(TokenMean(), test_batch, LossReduction.WEIGHTS, weights)


def test_a_training_step_returning_a_dict_scores_like_one_returning_the_loss(trained, test_batch):
    """``training_step`` may return ``{"loss": ..., ...}`` (Lightning's other form): the query takes its loss."""

    class DictOut(type(trained.model)):
        def training_step(self, batch, batch_idx):
            return {"loss": self.loss(batch), "batch_size": len(batch["y"])}

    model = DictOut()
    model.load_state_dict(trained.model.state_dict())
    expected = trained.dve.embeddings.influence(trained.model, test_batch).scores
    torch.testing.assert_close(trained.dve.embeddings.influence(model, test_batch).scores, expected, rtol=0, atol=0)


def test_an_empty_test_batch_is_refused_saying_so(trained, test_batch):
    """A batch of no sample failed in a layer hook's reshape (``influence``) or in ``torch.stack``
    (``exact_influence``)."""
    empty = {key: value[:0] for key, value in test_batch.items()}
    for query in (trained.dve.embeddings.influence, trained.dve.embeddings.exact_influence,
                  trained.dve.embeddings.test_gradients):
        with pytest.raises(ConfigError, match="the test batch holds no sample"):
            query(trained.model, empty)


def test_a_single_dataset_item_as_the_test_batch_is_refused_naming_the_missing_batch_dimension(trained, test_batch):
    """``influence(model, dataset[i])``: the first layer saw ``x`` of shape ``[64]``; the query said the loss did not
    depend on the tracked layers (or, with ``loss_fn``, that it returned the wrong shape)."""
    item = {key: value[0] for key, value in test_batch.items()}
    for loss_fn in (None, per_sample_ce):
        with pytest.raises(ConfigError, match=r"the test batch cannot be scored: layer 'net.0' \(Linear\) was "
                                              r"called on an unbatched input of shape \(64,\).*default_collate"):
            trained.dve.embeddings.influence(trained.model, item, loss_fn=loss_fn)
    with pytest.raises(ConfigError, match=r"A single dataset item dataset\[i\] has no batch dimension"):
        trained.dve.embeddings.exact_influence(trained.model, item)
    one = {key: value[:1] for key, value in test_batch.items()}  # the batch of that one sample is scored
    torch.testing.assert_close(trained.dve.embeddings.influence(trained.model, one).scores,
                               trained.dve.embeddings.influence(trained.model, test_batch).scores[:1])


def test_a_test_batch_in_another_float_dtype_is_refused_naming_both_dtypes(trained, test_batch):
    """A float64 batch for the float32 module failed in its first layer with torch's "mat1 and mat2 must have the
    same dtype", naming neither the batch nor the fix; other failures of the forward stay torch's own."""
    double = dict(test_batch, x=test_batch["x"].double())
    for loss_fn in (None, per_sample_ce):
        with pytest.raises(ConfigError, match=r"the test batch holds float64 tensors while the module's weights are "
                                              r"float32.*must have the same dtype.*x\.to\(torch\.float32\)"):
            trained.dve.embeddings.influence(trained.model, double, loss_fn=loss_fn)
    from lightning_dve.query_layers import dtype_refusal  # an error about other dtypes is not blamed on the batch

    extra = dict(test_batch, weights=torch.ones(12, dtype=torch.float64))
    assert dtype_refusal(RuntimeError("expected scalar type Long but found Int"), trained.model, extra) is None
    assert dtype_refusal(RuntimeError("must have the same dtype, but got Double and Float"), trained.model, extra)
    narrow = dict(test_batch, x=test_batch["x"][:, :10])
    with pytest.raises(RuntimeError, match="cannot be multiplied") as caught:
        trained.dve.embeddings.influence(trained.model, narrow)
    assert not isinstance(caught.value, ConfigError)


def test_a_training_step_returning_per_sample_losses_needs_loss_fn(trained, test_batch):
    class PerSample(type(trained.model)):
        def training_step(self, batch, batch_idx):
            return per_sample_ce(self, batch)

    model = PerSample()
    model.load_state_dict(trained.model.state_dict())
    with pytest.raises(ConfigError, match=r"training_step did not return a scalar loss on the test batch; pass "
                                          r"loss_fn"):
        trained.dve.embeddings.influence(model, test_batch)


@pytest.mark.parametrize("loss_fn, count", [
    (lambda m, b: per_sample_ce(m, b).mean().reshape(1), 1),
    (lambda m, b: torch.cat([per_sample_ce(m, b), per_sample_ce(m, b)]), 24),
])
def test_loss_fn_of_another_length_than_the_batch(trained, test_batch, loss_fn, count):
    with pytest.raises(ConfigError, match=rf"loss_fn returned {count} losses for a batch of 12 samples .* one loss "
                                          r"per sample of the batch, a Tensor\[B\] with B = 12"):
        trained.dve.embeddings.influence(trained.model, test_batch, loss_fn=loss_fn)


@pytest.mark.parametrize("loss_fn", [
    lambda m, b: per_sample_ce(m, b).detach(),
    lambda m, b: torch.zeros(len(b["y"]), requires_grad=True),  # never calls the module
    lambda m, b: m(b["x"]).detach().sum(1) + m.net[0].weight.sum(),  # reaches a weight, not a tracked output
])
def test_loss_that_does_not_depend_on_the_tracked_layers(trained, test_batch, loss_fn):
    with pytest.raises(ConfigError, match=r"the test loss does not depend on the tracked layers \('net\.0', "
                                          r"'net\.2'\): it is detached"):
        trained.dve.embeddings.influence(trained.model, test_batch, loss_fn=loss_fn)


def centred_ce(module, batch):  # each loss minus the batch mean: they sum to zero
    losses = per_sample_ce(module, batch)
    return losses - losses.mean()


def in_batch_contrastive(module, batch):  # every other test point is a negative
    z = F.normalize(module(batch["x"]), dim=1)
    return F.cross_entropy(z @ z.T / 0.5, torch.arange(len(z)), reduction="none")


@pytest.mark.parametrize("loss_fn", [centred_ce, in_batch_contrastive])
def test_a_loss_fn_whose_losses_couple_the_test_points_is_refused(trained, test_batch, loss_fn):
    """The query takes each test point's gradient from its own forward: a coupled loss gave each one the gradient
    of every point's terms (all-zero scores for the centred loss; correlation 0.15 with exact_influence for the
    contrastive one), silently. exact_influence differentiates each loss by itself and answers."""
    with pytest.raises(ConfigError, match=r"loss_fn's per-sample losses depend on the other samples of the batch: "
                                          r"the first two samples' losses are \[.*\] in the whole batch and \[.*\] "
                                          r"as a batch of their own .*or use exact_influence"):
        trained.dve.embeddings.influence(trained.model, test_batch, loss_fn=loss_fn)


def test_the_coupling_check_passes_reduced_precision_matmuls(trained, test_batch):
    """``set_float32_matmul_precision("medium")`` (bf16 products; "high" is TF32 on GPUs) rounds the pair's and the
    batch's forwards ~6e-4 apart, which a 1e-4 tolerance refused as coupling."""
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        batch = {**test_batch, "x": test_batch["x"].repeat(6, 1), "y": test_batch["y"].repeat(6)}  # 72 samples
        assert trained.dve.embeddings.influence(trained.model, batch, loss_fn=per_sample_ce).scores.shape[0] == 72
    finally:
        torch.set_float32_matmul_precision(precision)


def test_a_loss_fn_of_independent_losses_passes_the_coupling_check(trained, test_batch):
    """Float32 forwards of two samples and of twelve round differently: that is not coupling."""
    scores = trained.dve.embeddings.influence(trained.model, test_batch, loss_fn=per_sample_ce).scores
    assert scores.shape[0] == 12 and bool(scores.abs().sum() > 0)


# --- frozen modules ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("freeze", [
    lambda m: m.freeze(),
    lambda m: m.net[2].bias.requires_grad_(False),
    lambda m: m.net[0].requires_grad_(False),
])
def test_query_on_a_frozen_module_scores_like_the_trained_one(trained, test_batch, freeze):
    reference = trained.dve.embeddings.influence(trained.model, test_batch, per_step=True)
    model = copy.deepcopy(trained.model)
    freeze(model)
    before, training = flags(model), model.training

    result = trained.dve.embeddings.influence(model, test_batch, per_step=True)

    torch.testing.assert_close(result.scores, reference.scores)
    assert flags(model) == before and model.training == training
    assert all(p.grad is None for p in model.parameters())


def _final_weight_warnings(query) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        query()
    return [str(w.message) for w in caught if "not the final weights" in str(w.message)]


def test_a_module_with_other_weights_than_the_final_ones_is_warned_about(trained, test_batch):
    """The manifest keeps 64 sampled coordinates per tracked weight after the last step: a module whose weights
    differ (here net.2 scaled by 1.001, as a best-epoch checkpoint would) is named, through the callback's handle
    and a loaded one; the trained module, and a copy cast to float64 (exact), are not."""
    other = copy.deepcopy(trained.model)
    with torch.no_grad():
        other.net[2].weight.mul_(1.001)
    double, double_batch = copy.deepcopy(trained.model).double(), {k: v.double() if v.is_floating_point() else v
                                                                    for k, v in test_batch.items()}
    for emb in (trained.dve.embeddings, DataValueEmbeddings.load(trained.root)):
        assert _final_weight_warnings(lambda: emb.influence(trained.model, test_batch)) == []
        assert _final_weight_warnings(lambda: emb.influence(double, double_batch)) == []
        said = _final_weight_warnings(lambda: emb.influence(other, test_batch))
        assert len(said) == 1 and said[0].startswith("the weights of tracked layers ['net.2'] are not the final "
                                                     "weights of the recorded run (e.g. a best-epoch checkpoint")


def test_frozen_flags_come_back_after_a_layer_mismatch(trained, mlp_cls, test_batch):
    model = mlp_cls(hidden=8)
    model.freeze()
    with pytest.raises(Exception, match="does not hold the recorded layers"):
        trained.dve.embeddings.influence(model, test_batch)
    assert not any(flags(model).values())


def test_query_uses_the_recorded_bias_layout(fit, mlp_cls, save_dir, test_batch):
    model = mlp_cls()
    model.net[2].bias.requires_grad_(False)  # recorded without net.2's bias column
    dve = DataValueEmbedding(save_dir, projection_dim=64, report=None)
    fit(model, dve)
    reference = dve.embeddings.influence(model, test_batch)
    unfrozen = copy.deepcopy(model)
    unfrozen.net[2].bias.requires_grad_(True)

    torch.testing.assert_close(dve.embeddings.influence(unfrozen, test_batch).scores, reference.scores)
    assert unfrozen.net[2].bias.requires_grad and not model.net[2].bias.requires_grad


@pytest.mark.parametrize("query", ["influence", "exact_influence", "replay_embeddings"])
def test_query_under_inference_mode(trained, test_batch, query):
    """Refused up front with what to do, also for the replays (which raised torch's bare "does not require grad"
    after the whole forward replay, e.g. in an ``on_test_epoch_end`` under ``trainer.test``); the store is kept."""
    emb = trained.dve.embeddings
    before = emb.influence(trained.model, test_batch).scores
    with torch.inference_mode(), pytest.raises(ConfigError, match=r"need autograd, which torch.inference_mode\(\) "
                                                                  r"turns off: call the query outside.*"
                                                                  r"Trainer\(inference_mode=False\)"):
        if query == "replay_embeddings":
            emb.replay_embeddings(trained.model)
        else:
            getattr(emb, query)(trained.model, test_batch)
    assert torch.equal(emb.influence(trained.model, test_batch).scores, before)


# --- segment boundaries ------------------------------------------------------------------------------------


def test_test_gradients_that_require_grad_are_scored_detached(trained, test_batch):
    """Hand-built test gradients with ``requires_grad=True``: the scores' autograd graph kept every streamed chunk
    of embeddings alive (226 MB against one 64 MiB chunk on a 235 MB store). Oracle: the same gradients detached."""
    emb = trained.dve.embeddings
    grads = emb.test_gradients(trained.model, test_batch)
    scored = emb.score({name: g.clone().requires_grad_(True) for name, g in grads.items()})
    assert not scored.scores.requires_grad and torch.equal(scored.scores, emb.score(grads).scores)


def test_a_test_point_with_a_non_finite_gradient_is_named(trained, test_batch):
    """A NaN in one test input made its scores NaN and ``top_k`` over the test points' mean rank nothing, silently.
    A warning names the test point; the others' scores are those of the batch without it."""
    batch = {key: value.clone() for key, value in test_batch.items()}
    batch["x"][2, 5] = float("nan")
    with pytest.warns(UserWarning, match=r"test points \[2\] have a non-finite test gradient .*top_k") as caught:
        result = trained.dve.embeddings.influence(trained.model, batch)
    assert caught[0].filename == __file__  # the line that called influence
    assert bool(result.scores[2].isnan().all()) and bool(result.scores[[0, 1, 3]].isfinite().all())
    assert result.top_k(3)[0].scores.numel() == 0 and result.top_k(3, test_index=0)[0].scores.numel() == 3


def test_score_refuses_a_boundary_out_of_range(fit, mlp_cls, save_dir, test_batch):
    model, dve = mlp_cls(), DataValueEmbedding(save_dir, projection_dim=64, report=None, segments=2)
    fit(model, dve)
    embeddings = dve.embeddings
    grads = embeddings.test_gradients(model, test_batch)
    assert len(embeddings.segment_boundaries) == 2
    for boundary in (-1, 2):
        with pytest.raises(ConfigError, match=rf"boundary {boundary} is out of range: this store has 2 segment "
                                              r"boundaries .* must be one of \[0, 1\] or None"):
            embeddings.score(grads, boundary=boundary)
        with pytest.raises(ConfigError, match=rf"boundary {boundary} is out of range"):
            embeddings.influence_at(boundary, model, test_batch)
    assert embeddings.score(grads, boundary=1).scores.shape == (12, 64)


# --- damaged embeddings files ------------------------------------------------------------------------------


def damaged_copy(trained, tmp_path, name, change) -> Path:
    """A copy of the recording whose ``embeddings/<name>`` is ``change(its contents)`` (``None``: deleted); a
    safetensors file is written whole, with a valid checksum (``lightning_dve.files``), as a file of another
    recording would be: the checks below the checksum's see it."""
    root = Path(shutil.copytree(trained.root, tmp_path / "copy"))
    path = root / "embeddings" / name
    if name.endswith(".npy"):
        array = np.load(path)
        path.unlink()
        if change is not None:
            np.save(path, change(array))
    else:
        with safe_open(str(path), framework="pt") as handle:
            metadata, tensors = handle.metadata(), {key: handle.get_tensor(key) for key in handle.keys()}
        metadata.pop("crc32")
        files.write_atomic(path, change(tensors), metadata)  # (the tensors may map the file: a new one)
    return root


@pytest.mark.parametrize("name, change, message", [
    ("layer_001.npy", None, r"layer_001\.npy is missing"),  # net.2's
    ("layer_000.npy", lambda a: a[:2], r"layer_000\.npy is \(2, 64\) float32, not \(128, 64\)"),
    ("layer_001.npy", lambda a: a[:, :3], r"layer_001\.npy is \(128, 3\) float32, not \(128, 64\)"),
    ("sample_ids.npy", lambda a: a[:, None], r"sample_ids\.npy is \(128, 1\) int64, not \(128,\)"),
    # no file names a layer now (a foreign layer cannot be in one): a layer file of another dtype instead
    ("layer_001.npy", lambda a: a.astype(np.int64), r"layer_001\.npy is .*int64"),
], ids=["layer missing", "rows missing", "other width", "2-D sample ids", "other dtype"])
def test_damaged_embeddings_file(trained, tmp_path, test_batch, name, change, message):
    root = damaged_copy(trained, tmp_path, name, change)
    with pytest.raises(StoreError, match=rf"embeddings file .*embeddings/{message}.* record the run again, or "
                                         r"restore the folder .* from a backup"):
        DataValueEmbeddings.load(root).influence(trained.model, test_batch)


@pytest.mark.parametrize("change", [
    lambda t: {**t, "steps": torch.tensor([0, 1, 2, 1, 4, 5, 6, 7])},  # step 3's rows labelled step 1
    lambda t: {**t, "offsets": torch.tensor([0, 16, 32, 40, 64, 80, 96, 112, 128])},  # 8 | 24 rows
], ids=["steps", "rows"])
def test_embeddings_file_of_another_step(trained, tmp_path, test_batch, change):
    """The index must place every step's rows where the store recorded them: rows labelled with another step (or
    another step's share of the rows) would be scored as that step's."""
    root = damaged_copy(trained, tmp_path, "index.safetensors", change)
    with pytest.raises(StoreError, match=r"embeddings in .* belong to another trajectory\. Record the run again"):
        DataValueEmbeddings.load(root).influence(trained.model, test_batch)


# --- a handle of a store recorded again --------------------------------------------------------------------


def test_handle_of_a_store_recorded_again(fit, mlp_cls, save_dir, test_batch):
    first = DataValueEmbedding(save_dir, projection_dim=64, report=None, segments=2)
    fit(mlp_cls(), first)
    old = DataValueEmbeddings.load(save_dir)
    model = mlp_cls(lr=0.05)
    fit(model, DataValueEmbedding(save_dir, projection_dim=64, report=None, segments=2, overwrite=True))
    grads = old.test_gradients(model, test_batch)
    queries = {"influence": lambda e: e.influence(model, test_batch), "score": lambda e: e.score(grads),
               "influence_at": lambda e: e.influence_at(0, model, test_batch),
               "exact_influence": lambda e: e.exact_influence(model, test_batch),
               "embedding_matrix": lambda e: e.embedding_matrix()}
    for name, query in queries.items():
        for handle in (old, first.embeddings):
            with pytest.raises(StoreError, match=r"was recorded again since this handle was opened .* "
                                                 r"DataValueEmbeddings\.load\(.*\) again"):
                query(handle)
    assert DataValueEmbeddings.load(save_dir).influence(model, test_batch).scores.shape == (12, 64)


def test_handle_of_a_store_whose_manifest_is_gone(trained, tmp_path, test_batch):
    root = Path(shutil.copytree(trained.root, tmp_path / "copy"))
    embeddings = DataValueEmbeddings.load(root)
    (root / "manifest.json").unlink()
    with pytest.raises(StoreError, match=r"has no manifest\.json any more .* DataValueEmbeddings\.load\(.*\) again"):
        embeddings.influence(trained.model, test_batch)


@pytest.mark.parametrize("query", ["influence", "embedding_matrix"])
def test_a_store_recorded_again_between_the_check_and_the_read(trained, tmp_path, test_batch, monkeypatch, query):
    """A fit with ``overwrite=True`` clears the store right after a query checked it (its first write, the real
    ``_clear_replaced``): the query says the store was recorded again, not that a file is missing."""
    root = Path(shutil.copytree(trained.root, tmp_path / "copy"))
    embeddings = DataValueEmbeddings.load(root)
    original = TrajectoryStore.embedding_arrays

    def overwritten_first(store: TrajectoryStore, *args: object) -> object:
        settings = {k: v for k, v in store.manifest.items() if k not in ("run_id", "status", "steps", "rows")}
        other = TrajectoryStore.create(root, settings, overwrite=True)
        other.truncate_for_resume()  # the overwriting fit's first write
        other.unlock()
        return original(store, *args)

    monkeypatch.setattr(TrajectoryStore, "embedding_arrays", overwritten_first)
    call = {"influence": lambda: embeddings.influence(trained.model, test_batch),
            "embedding_matrix": embeddings.embedding_matrix}[query]
    with pytest.raises(StoreError, match=r"(was recorded again|has no manifest\.json any more) since this handle "
                                         r"was opened.* DataValueEmbeddings\.load\(.*\) again") as caught:
        call()
    assert "embeddings" in str(caught.value.__cause__)  # what the read found, kept as the cause


# --- rankings ----------------------------------------------------------------------------------------------


def test_top_k_refuses_a_negative_k_and_a_test_index_out_of_range():
    result = InfluenceResult(torch.arange(4), torch.zeros(4, dtype=torch.int64), torch.randn(3, 4))
    with pytest.raises(ConfigError, match=r"top_k\(k=-1\): k must be an int >= 0"):
        result.top_k(-1)
    for index in (3, -4):
        with pytest.raises(ConfigError, match=rf"top_k\(test_index={index}\) is out of range: the result has 3 "
                                              r"test point\(s\), so test_index must be in \[-3, 2\]"):
            result.top_k(2, test_index=index)
    last, _ = result.top_k(1, test_index=-1)
    assert last.scores.tolist() == [result.scores[2].max().item()]


def test_top_k_leaves_nan_scores_out():
    scores = torch.tensor([[1.0, float("nan"), -2.0, 0.5], [1.0, 3.0, -2.0, float("nan")]])
    result = InfluenceResult(torch.tensor([10, 11, 12, 13]), torch.full((4,), -1), scores)
    helpful, harmful = result.top_k(4)
    assert helpful.sample_ids.tolist() == [10] and harmful.sample_ids.tolist() == [12]
    by_row, against_row = result.top_k(2, test_index=1)
    assert by_row.sample_ids.tolist() == [11, 10] and against_row.sample_ids.tolist() == [12]
    none, _ = InfluenceResult(torch.tensor([1]), torch.tensor([-1]), torch.tensor([[float("nan")]])).top_k(3)
    assert none.scores.numel() == 0


def test_top_k_ranks_tied_scores_in_column_order():
    """``torch.topk`` ordered tied columns as its algorithm happened to (e.g. 31, 0, 1, ... on 32 zeros), so two
    rankings of equal scores could differ between runs and machines."""
    scores = torch.zeros(2, 40, dtype=torch.float64)
    scores[:, ::2], scores[:, 1::2] = 0.5, -0.5  # 20 tied positive columns, 20 tied negative ones
    scores[:, 5], scores[:, 30] = 1.0, -1.0
    result = InfluenceResult(torch.arange(100, 140), torch.full((40,), -1), scores)
    helpful, harmful = result.top_k(6)
    assert helpful.sample_ids.tolist() == [105, 100, 102, 104, 106, 108]
    assert harmful.sample_ids.tolist() == [130, 101, 103, 107, 109, 111]


def test_top_k_lists_helpful_columns_only_as_helpful_and_harmful_only_as_harmful():
    """Until session 40 the rankings were the highest and lowest scores whatever their sign (an audit): with
    every score positive, "harmful" listed samples that helped, and with k >= n every sample was in both."""
    result = InfluenceResult(torch.tensor([10, 11, 12, 13]), torch.full((4,), -1),
                             torch.tensor([[0.3, 0.15, 0.0, 0.2], [0.3, 0.15, 0.0, -0.2]]))
    helpful, harmful = result.top_k(3)
    assert helpful.sample_ids.tolist() == [10, 11] and helpful.scores.tolist() == pytest.approx([0.3, 0.15])
    assert harmful.sample_ids.numel() == 0  # the mean of 13 is 0: in neither, as 12
    helpful, harmful = result.top_k(10, test_index=1)
    assert helpful.sample_ids.tolist() == [10, 11] and harmful.sample_ids.tolist() == [13]
    negated = InfluenceResult(result.sample_ids, result.steps, -result.scores)
    assert negated.top_k(10)[0].sample_ids.numel() == 0 and negated.top_k(10)[1].sample_ids.tolist() == [10, 11]


def test_final_weights_are_compared_within_a_few_ulp_of_the_module_dtype(trained, test_batch):
    """Within 4 ulp of the module's dtype: one float32 ulp off every net.0 weight, and a bfloat16 copy of the
    trained module (up to half a bfloat16 ulp off), are not warned about; 17 float32 ulp off (a further step with a
    tiny learning rate) is, and the warning points at the line that called ``influence``; every layer that differs
    is named."""
    near, off, both = (copy.deepcopy(trained.model) for _ in range(3))
    half = copy.deepcopy(trained.model).to(torch.bfloat16)
    half_batch = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in test_batch.items()}
    with torch.no_grad():
        near.net[0].weight.copy_(torch.nextafter(near.net[0].weight, torch.tensor(float("inf"))))
        off.net[0].weight.mul_(1 + 2e-6)
        both.net[0].weight.mul_(1.001)
        both.net[2].weight.mul_(1.001)
    emb = trained.dve.embeddings
    assert _final_weight_warnings(lambda: emb.influence(near, test_batch)) == []
    assert _final_weight_warnings(lambda: emb.influence(half, half_batch)) == []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        emb.influence(off, test_batch)
    said = [w for w in caught if "not the final weights" in str(w.message)]
    assert len(said) == 1 and str(said[0].message).startswith("the weights of tracked layers ['net.0'] are not")
    assert said[0].filename == __file__
    said = _final_weight_warnings(lambda: emb.influence(both, test_batch))
    assert len(said) == 1 and said[0].startswith("the weights of tracked layers ['net.0', 'net.2'] are not")
    biased = copy.deepcopy(trained.model)  # a bias-only fine-tune: the bias is a column of the layer's block
    with torch.no_grad():
        biased.net[2].bias.add_(0.3)
    said = _final_weight_warnings(lambda: emb.influence(biased, test_batch))
    assert len(said) == 1 and said[0].startswith("the weights of tracked layers ['net.2.bias'] are not")


@pytest.mark.parametrize("per_step", ["no", "yes", 1, None])
def test_per_step_must_be_a_bool(per_step):
    from lightning_dve.results import stream_columns

    chunk = (torch.arange(4), torch.zeros(4, dtype=torch.int64), torch.randn(3, 4))
    with pytest.raises(ConfigError, match=rf"per_step must be a bool .*got {re.escape(repr(per_step))}\."):
        stream_columns([chunk], chunk[0], 3, per_step)


def test_streamed_totals_add_each_chunk_to_its_own_samples():
    """Per-sample totals summed chunk by chunk: sample ids that are neither contiguous nor sorted, repeated across
    chunks; each total is the explicit sum of that sample's columns, and the per-step result is the columns in
    order."""
    from lightning_dve.results import stream_columns

    ids, steps = torch.tensor([30, 10, 20, 30, 50]), torch.tensor([0, 0, 1, 1, 2])
    scores = torch.tensor([[1.0, 2.0, 4.0, 8.0, 16.0], [-1.0, 0.5, 0.25, 3.0, 2.0]], dtype=torch.float64)
    chunks = [(ids[:2], steps[:2], scores[:, :2]), (ids[2:4], steps[2:4], scores[:, 2:4]),
              (ids[4:], steps[4:], scores[:, 4:])]
    totals = stream_columns(iter(chunks), ids, 2, per_step=False)
    assert totals.sample_ids.tolist() == [10, 20, 30, 50]
    assert totals.scores.tolist() == [[2.0, 4.0, 1.0 + 8.0, 16.0], [0.5, 0.25, -1.0 + 3.0, 2.0]]
    columns = stream_columns(iter(chunks), ids, 2, per_step=True)
    assert torch.equal(columns.sample_ids, ids) and torch.equal(columns.steps, steps)
    assert torch.equal(columns.scores, scores)
    empty = stream_columns(iter([]), torch.zeros(0, dtype=torch.int64), 3, per_step=False)
    assert empty.scores.shape == (3, 0) and empty.sample_ids.numel() == 0


@pytest.mark.parametrize("index", [1.0, "1", True, torch.tensor(True), torch.tensor([1]), torch.tensor([[0]])])
def test_top_k_refuses_a_test_index_that_is_not_an_int(index):
    """A float or a string was refused as out of range, naming it as an int in range (``"1"`` as 1); a one-element
    tensor passed the check and failed in indexing with torch's IndexError (until session 40, an audit)."""
    result = InfluenceResult(torch.arange(4), torch.zeros(4, dtype=torch.int64), torch.randn(3, 4))
    with pytest.raises(ConfigError, match=rf"top_k\(test_index={re.escape(repr(index))}\): test_index must be an "
                                          r"int \(a row of scores\) or None"):
        result.top_k(2, test_index=index)
    assert torch.equal(result.top_k(2, test_index=torch.tensor(1))[0].scores, result.top_k(2, test_index=1)[0].scores)


def test_a_dataloader_for_the_test_batch_is_refused_naming_the_fix(trained, test_batch):
    from torch.utils.data import DataLoader

    loader = DataLoader([{k: v[i] for k, v in test_batch.items()} for i in range(4)], batch_size=2)
    with pytest.raises(ConfigError, match=r"the test batch is a DataLoader; .* pass next\(iter\(loader\)\)"):
        trained.dve.embeddings.influence(copy.deepcopy(trained.model), loader)
    # an iterator of batches has no samples either: refused before training_step runs on it (a raw TypeError from
    # the step once the reduction check ran after the query's forward, session 31)
    with pytest.raises(ConfigError, match=r"cannot split the test batch \(_SingleProcessDataLoaderIter\)"):
        trained.dve.embeddings.influence(copy.deepcopy(trained.model), iter(loader))


class RecordingTransfer(TinyMLP):
    """A LightningModule whose ``transfer_batch_to_device`` override records the devices it was asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[torch.device] = []

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        self.asked.append(device)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)


def test_a_query_batch_goes_to_the_module_device_as_the_trainer_moves_it() -> None:
    """``on_module_device``: through the LightningModule's (overridable) ``transfer_batch_to_device`` to its device,
    or for a plain module through nested dicts, lists and named tuples (untouched for one on the CPU). The "meta"
    device stands in for a GPU (tensors move there on any machine)."""
    batch = {"x": torch.ones(2, 64), "pair": (torch.zeros(2), [torch.ones(1)]), "name": "kept"}
    module = RecordingTransfer()
    assert on_module_device(module, batch)["name"] == "kept" and module.asked == [torch.device("cpu")]
    moved = on_module_device(module.to("meta"), batch)
    assert module.asked[1:] == [torch.device("meta")] and moved["x"].is_meta and moved["pair"][1][0].is_meta
    assert on_module_device(nn.Linear(2, 2), batch) is batch
    Pair = collections.namedtuple("Pair", "x y")
    plain = on_module_device(nn.Linear(2, 2).to("meta"), {"p": Pair(torch.ones(1), 3), "l": [torch.ones(1)]})
    assert isinstance(plain["p"], Pair) and plain["p"].x.is_meta and plain["p"].y == 3 and plain["l"][0].is_meta
    assert batch["x"].device.type == "cpu"  # the caller's batch is not changed


class InBatchNegatives(TinyMLP):
    """A contrastive loss with in-batch negatives: each sample's term depends on the others in its batch."""

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        logits = self(batch["x"])
        similarity = logits @ logits.T / 10.0
        return F.cross_entropy(similarity, torch.arange(len(logits))) + F.cross_entropy(logits, batch["y"])


@pytest.mark.parametrize(("module", "warned"), [(InBatchNegatives, True), (TinyMLP, False)])
def test_a_training_loss_that_couples_the_samples_warns_with_the_report_off(fit, save_dir, module, warned):
    """The report's reduction check caught it, but with ``report=None`` (and queries with ``loss_fn=``) nothing
    did: scores 0.87 off with no warning. The same check now runs on the last training batch when the report is
    off; a mean loss of independent samples passes it."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(module(), DataValueEmbedding(save_dir, report=None))
    messages = [str(w.message) for w in caught if "not the sum of per-sample losses" in str(w.message)]
    assert len(messages) == int(warned)
    if warned:
        assert "(tested at train end on a training batch)" in messages[0]


def test_the_not_final_warning_counts_the_layers_it_does_not_name() -> None:
    """Six changed weights and biases: five named and 'and 1 more' (before: the sixth went unmentioned)."""
    from lightning_dve.guards import sampled_entries
    from lightning_dve.query_layers import warn_if_moved

    module = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 3))
    final = {name: (sampled_entries(p.detach()).double() + 1).tolist() for name, p in
             (("0", module[0].weight), ("0.bias", module[0].bias), ("1", module[1].weight),
              ("1.bias", module[1].bias), ("2", module[2].weight), ("2.bias", module[2].bias))}
    with pytest.warns(UserWarning, match=r"tracked layers \['0', '0.bias', '1', '1.bias', '2'\] and 1 more are not"):
        warn_if_moved(module, {"final_weights": final})
