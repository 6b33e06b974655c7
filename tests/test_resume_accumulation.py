"""Gradient accumulation equals one big batch; resuming from a checkpoint equals an uninterrupted run."""

from __future__ import annotations

import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_dve import (ConfigError, DataValueEmbedding, DataValueEmbeddings, StoreError, UnsupportedError,
                           step_files)
from lightning_dve.store import TrajectoryStore
from tests.conftest import DigitsDict


def scores_of(dve: DataValueEmbedding, model: L.LightningModule, batch: dict) -> torch.Tensor:
    return dve.embeddings.influence(model.double(), {**batch, "x": batch["x"].double()}, per_step=True).scores


def test_accumulating_two_micro_batches_equals_one_batch_of_twice_the_size(
    mlp_cls: type, make_loader: Callable[..., DataLoader], fit: Callable, tmp_path: Path, test_batch: dict
) -> None:
    runs = {}
    for name, batch_size, accumulate in (("big", 16, 1), ("accumulated", 8, 2)):
        model, dve = mlp_cls(), DataValueEmbedding(tmp_path / name, projection_dim=None)
        trainer = fit(model, dve, make_loader(n=64, batch_size=batch_size), max_epochs=2, precision="64-true",
                      accumulate_grad_batches=accumulate)
        store = dve.embeddings.store
        runs[name] = (trainer.global_step, store.steps, store.read_step(0), scores_of(dve, model, test_batch))
    (steps_a, list_a, first_a, scores_a), (steps_b, list_b, first_b, scores_b) = runs["big"], runs["accumulated"]
    assert steps_a == steps_b == 8 and list_a == list_b == list(range(8))
    assert torch.equal(first_a.sample_ids, first_b.sample_ids)
    torch.testing.assert_close(first_b.weights, torch.full((16,), 1 / 16, dtype=torch.float64))
    for name in first_a.grads:
        torch.testing.assert_close(first_b.grads[name], first_a.grads[name], rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(scores_b, scores_a, rtol=1e-8, atol=1e-13)


def records_and_scores(dve: DataValueEmbedding, model: L.LightningModule, batch: dict) -> tuple[list, torch.Tensor]:
    store = dve.embeddings.store
    scores = dve.embeddings.influence(model.double(), {**batch, "x": batch["x"].double()}).scores
    return [store.read_step(step) for step in store.steps], scores


def assert_same_recording(records: list, scores: torch.Tensor, expected: list, expected_scores: torch.Tensor) -> None:
    """Step by step the same ids, rows and ``lr * w`` (the weight and rate the update applied), and the same scores."""
    for record, reference in zip(records, expected, strict=True):
        assert torch.equal(record.sample_ids, reference.sample_ids)
        torch.testing.assert_close(record.weights[:, None] * record.lrs, reference.weights[:, None] * reference.lrs)
        for name, rows in reference.grads.items():
            torch.testing.assert_close(record.grads[name], rows, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(scores, expected_scores, rtol=1e-8, atol=1e-13)


def test_a_batch_whose_gradient_was_reset_unapplied_is_not_recorded(
    mlp_cls: type, fit: Callable, tmp_path: Path, test_batch: dict
) -> None:
    """An ``optimizer_step`` that runs the closure alone on odd batches (no ``optimizer.step()``): the next
    ``zero_grad`` resets their gradients, so they change nothing. The recording equals a fit that never saw them
    (rows, weights, rates, scores); before the fix their rows were merged into the next step as applied."""
    class ClosureOnOddBatches(mlp_cls):
        def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
            optimizer.step(closure=optimizer_closure) if batch_idx % 2 == 0 else optimizer_closure()

    runs = {}
    even_batches = DigitsDict([i for i in range(64) if i // 8 % 2 == 0])
    for name, model, data in (("skipping", ClosureOnOddBatches(), DigitsDict(range(64))),
                              ("even batches only", mlp_cls(), even_batches)):
        dve = DataValueEmbedding(tmp_path / name, projection_dim=None)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fit(model, dve, DataLoader(data, batch_size=8), precision="64-true")
        runs[name] = records_and_scores(dve, model, test_batch), [str(w.message) for w in caught]
    ((records, scores), warned), ((expected, expected_scores), _) = runs["skipping"], runs["even batches only"]
    assert [r.step for r in records] == [0, 2, 4, 6] and len(expected) == 4
    assert all(torch.equal(r.weights, e.weights) and torch.equal(r.lrs, e.lrs) for r, e in zip(records, expected))
    assert_same_recording(records, scores, expected, expected_scores)
    assert any("were reset (zero_grad) before any optimizer step applied them" in w for w in warned)


def test_an_epoch_ended_inside_an_accumulation_window_drops_its_pending_micro_batch_saying_why(
    mlp_cls: type, make_loader: Callable[..., DataLoader], fit: Callable, tmp_path: Path, test_batch: dict
) -> None:
    """``on_train_batch_start`` returning -1 at batch 3 of the first epoch (windows of two): batch 2 was accumulated
    and never applied. It is left out (the replay of the recording lands on the checkpoints, which it refuses
    otherwise), and the warning names the early end of the epoch (it named an optimizer_step override or a
    zero_grad in a hook)."""
    class EndsFirstEpochEarly(mlp_cls):
        def on_train_batch_start(self, batch: dict, batch_idx: int) -> int | None:
            return -1 if self.current_epoch == 0 and batch_idx == 3 else None

    model, dve = EndsFirstEpochEarly(), DataValueEmbedding(tmp_path / "dve", projection_dim=None, report=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(model, dve, make_loader(n=64, batch_size=8), max_epochs=2, precision="64-true", accumulate_grad_batches=2)
    store = dve.embeddings.store
    windows = [list(range(16))] + [list(range(16 * w, 16 * w + 16)) for w in range(4)]  # batch 2 of epoch 0: none
    assert [store.read_step(step).sample_ids.tolist() for step in store.steps] == windows
    assert any("an epoch ended inside an accumulation window: on_train_batch_start returned -1" in str(w.message)
               for w in caught)
    assert dve.embeddings.exact_influence(model, {**test_batch, "x": test_batch["x"].double()}).scores.shape[0] == 12


@pytest.mark.parametrize("projection_dim", [None, 1])
def test_a_reset_near_convergence_is_still_a_reset(fit: Callable, tmp_path: Path, projection_dim: int | None) -> None:
    """Least squares whose two batches share their optimum, trained with closure-only odd batches: once converged
    a batch's summed gradient is tiny while its samples' are not. A version of session 30 judged "adds nothing"
    by that sum, and recorded 41 of 60 reset batches as applied; the reset is read from the gradients' storage
    and version since the micro-batch's end."""
    gen = torch.Generator().manual_seed(0)
    xs, ys = [], []
    for _ in range(2):
        x = torch.randn(4, 2, generator=gen, dtype=torch.float64)
        noise = torch.randn(4, generator=gen, dtype=torch.float64)
        q = torch.linalg.qr(x)[0]
        xs.append(x.float())
        ys.append((x @ torch.tensor([0.7, -0.3], dtype=torch.float64) + noise - q @ (q.T @ noise)).float())
    x, y = torch.cat(xs), torch.cat(ys)

    class ClosureOnOddBatches(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(2, 1, bias=False)
            torch.nn.init.zeros_(self.lin.weight)

        def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
            return (self.lin(batch["x"]).squeeze(-1) - batch["y"]).square().mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.3)

        def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
            optimizer.step(closure=optimizer_closure) if batch_idx % 2 == 0 else optimizer_closure()

    data = [{"x": x[i], "y": y[i], "index": torch.tensor(i)} for i in range(8)]
    dve = DataValueEmbedding(tmp_path / "dve", projection_dim=projection_dim, report=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(ClosureOnOddBatches(), dve, DataLoader(data, batch_size=4), max_epochs=40)
    store = TrajectoryStore.open(tmp_path / "dve")
    assert all(store.read_step(step).sample_ids.tolist() == [0, 1, 2, 3] for step in store.steps)
    assert sum("were reset (zero_grad)" in str(w.message) for w in caught) == 39  # every odd batch but the last


class ZeroGradAfterBatch(L.Callback):
    """Zeroes the gradients of even batches at their end, or (``after_backward``) in its ``on_after_backward``,
    which runs before this package's where it is listed first."""

    def __init__(self, after_backward: bool = False) -> None:
        self.after_backward = after_backward

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self.after_backward and batch_idx % 2 == 0:
            trainer.optimizers[0].zero_grad()

    def on_after_backward(self, trainer, pl_module):
        if self.after_backward and trainer.fit_loop.epoch_loop.batch_idx % 2 == 0:
            trainer.optimizers[0].zero_grad()


@pytest.mark.parametrize("where", ["on_train_batch_start", "on_after_backward", "set_to_none=False",
                                   "callback on_train_batch_end", "callback on_after_backward, listed first"])
def test_a_micro_batch_whose_accumulated_gradient_is_zeroed_is_not_recorded(
    mlp_cls: type, fit: Callable, tmp_path: Path, test_batch: dict, where: str
) -> None:
    """``accumulate_grad_batches=2`` with a hook that zeroes the gradients of each step's first micro-batch (at
    the next batch's start, in the module's ``on_after_backward``, in place, or in another callback at the batch's
    end): each step applies its second micro-batch alone (at half its loss), which a fit on
    those batches at half the rate equals. (A version of session 30 that marked the gradients at the batch's end,
    after the module's on_after_backward had zeroed them, recorded the zeroed batches as applied.)"""
    class Zeroing(mlp_cls):
        def on_train_batch_start(self, batch, batch_idx):
            if where in ("on_train_batch_start", "set_to_none=False"):
                self.optimizers().zero_grad(set_to_none=where != "set_to_none=False")

        def on_after_backward(self):
            if where == "on_after_backward" and self.trainer.fit_loop.epoch_loop.batch_idx % 2 == 0:
                self.optimizers().zero_grad()

    runs = {}
    odd_batches = DigitsDict([i for i in range(64) if i // 8 % 2 == 1])
    for name, model, data, accumulate in (("zeroed", Zeroing(), DigitsDict(range(64)), 2),
                                          ("odd batches only", mlp_cls(lr=0.05), odd_batches, 1)):
        dve = DataValueEmbedding(tmp_path / name, projection_dim=None)
        zeroing = [ZeroGradAfterBatch("after_backward" in where)] if name == "zeroed" and "callback" in where else []
        fit(model, None, DataLoader(data, batch_size=8), precision="64-true", accumulate_grad_batches=accumulate,
            callbacks=[*zeroing, dve])
        runs[name] = records_and_scores(dve, model, test_batch)
    (records, scores), (expected, expected_scores) = runs["zeroed"], runs["odd batches only"]
    assert len(records) == len(expected) == 4
    assert_same_recording(records, scores, expected, expected_scores)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_a_stepping_micro_batch_zeroed_by_a_callback_listed_first_is_not_recorded(
    mlp_cls: type, fit: Callable, tmp_path: Path, accumulate: int
) -> None:
    """A callback before this one zeroes the gradients in its ``on_after_backward`` on the micro-batch that steps
    (odd batches): the optimizer applies nothing, the weights stay, and nothing of that window is recorded (before
    session 30: recorded as applied, silently, as the guard sampled the zeroed gradients too)."""
    class ZeroOddBatches(L.Callback):
        def on_after_backward(self, trainer, pl_module):
            if trainer.fit_loop.epoch_loop.batch_idx % 2 == 1:
                trainer.optimizers[0].zero_grad()

    dve = DataValueEmbedding(tmp_path / "dve", projection_dim=None, report=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(mlp_cls(), None, DataLoader(DigitsDict(range(32)), batch_size=8), accumulate_grad_batches=accumulate,
            callbacks=[ZeroOddBatches(), dve])
    store = TrajectoryStore.open(tmp_path / "dve")
    recorded = [store.read_step(step).sample_ids.tolist() for step in store.steps]
    assert recorded == ([] if accumulate == 2 else [list(range(8)), list(range(16, 24))])
    assert sum("were reset (zero_grad)" in str(w.message) for w in caught) == 2


class DeadFirstInputs(L.LightningModule):
    """Frozen ``Linear(2, 2)`` at ``-I``, ReLU, tracked ``Linear(2, 3)`` (without bias unless ``bias``): a sample of
    positive inputs reaches the head as zeros, so its gradient in the head's weight is exactly zero (a dead ReLU)."""

    def __init__(self, bias: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(2, 2, bias=False), torch.nn.ReLU(),
                                       torch.nn.Linear(2, 3, bias=bias)).double()
        with torch.no_grad():
            self.net[0].weight.copy_(-torch.eye(2))
        self.net[0].weight.requires_grad_(False)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(self.net(batch["x"]), batch["y"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.net[2].parameters(), lr=0.1)


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_a_micro_batch_that_adds_no_gradient_stays_recorded(fit: Callable, tmp_path: Path, bias: bool) -> None:
    """Under accumulation a first micro-batch whose gradient is exactly zero leaves ``.grad`` at zero, which is not
    a reset: its samples are recorded in Lightning's window, with zero weight rows, and nothing warns (before:
    dropped, with a warning blaming a zero_grad in user code; with the head's bias, whose gradient is not zero, until
    session 30, as only the weights' gradients were read). Oracle: per-example gradients by autograd."""
    x = torch.tensor([[1.0, 2.0], [-1.0, -0.5], [0.5, 0.3], [-0.2, -1.0]], dtype=torch.float64)  # 0, 2: dead
    y = torch.tensor([0, 1, 2, 0])
    data = [{"x": x[i], "y": y[i], "index": torch.tensor(i)} for i in range(4)]
    model, dve = DeadFirstInputs(bias), DataValueEmbedding(tmp_path / "dve", projection_dim=None, report=None)
    initial = model.net[2].weight.detach().clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(model, dve, DataLoader(data, batch_size=1), accumulate_grad_batches=2)
    assert not [w for w in caught if "were reset (zero_grad)" in str(w.message)]
    store = TrajectoryStore.open(tmp_path / "dve")
    records = [store.read_step(step) for step in store.steps]
    assert [r.sample_ids.tolist() for r in records] == [[0, 1], [2, 3]]
    assert all(r.weights.tolist() == [0.5, 0.5] for r in records)
    if bias:
        return  # the rows hold the bias column: the per-example oracle below is for the weight alone
    weight = initial
    for record in records:
        for row, i in zip(record.grads["net.2"], record.sample_ids.tolist()):
            w = weight.clone().requires_grad_(True)
            loss = torch.nn.functional.cross_entropy(torch.relu(-x[i : i + 1]) @ w.T, y[i : i + 1])
            torch.testing.assert_close(row, torch.autograd.grad(loss, w)[0].reshape(-1), rtol=1e-12, atol=0)
        weight = weight - 0.1 * (record.weights[:, None] * record.grads["net.2"]).sum(0).reshape(3, 2)
    assert not records[0].grads["net.2"][0].any() and not records[1].grads["net.2"][0].any()


def test_a_micro_batch_whose_samples_gradients_cancel_stays_recorded(fit: Callable, tmp_path: Path) -> None:
    """Two samples of the same input with opposite targets on a zero-initialised linear model: their squared
    errors' gradients cancel, so the micro-batch leaves ``.grad`` at exactly zero though each row is not; it
    is not a reset (before session 30: dropped with the reset warning)."""
    class Linear(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(2, 1, bias=False).double()
            torch.nn.init.zeros_(self.lin.weight)

        def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
            return (self.lin(batch["x"]).squeeze(-1) - batch["y"]).square().mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    x = torch.tensor([[1.0, 2.0], [1.0, 2.0], [0.5, -1.0], [2.0, 0.5]], dtype=torch.float64)
    y = torch.tensor([1.0, -1.0, 0.3, -0.2], dtype=torch.float64)
    data = [{"x": x[i], "y": y[i], "index": torch.tensor(i)} for i in range(4)]
    dve = DataValueEmbedding(tmp_path / "dve", projection_dim=None, report=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(Linear(), dve, DataLoader(data, batch_size=2), accumulate_grad_batches=2)
    assert not [w for w in caught if "were reset (zero_grad)" in str(w.message)]
    store = TrajectoryStore.open(tmp_path / "dve")
    assert [store.read_step(step).sample_ids.tolist() for step in store.steps] == [[0, 1, 2, 3]]
    assert store.read_step(store.steps[0]).grads["lin"][:2].abs().sum() > 0


def test_micro_batches_accumulated_by_optimizer_step_overrides_stay_recorded(
    mlp_cls: type, fit: Callable, tmp_path: Path, test_batch: dict
) -> None:
    """The same override with an ``optimizer_zero_grad`` that keeps the odd batch's gradient: accumulation by
    hand, each batch's mean loss applied whole. It equals one batch of twice the size at twice the rate (rows,
    ``lr * w``, scores)."""
    class AccumulateByHand(mlp_cls):
        def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
            optimizer.step(closure=optimizer_closure) if batch_idx % 2 == 1 else optimizer_closure()

        def optimizer_zero_grad(self, epoch, batch_idx, optimizer):
            if batch_idx % 2 == 0:
                optimizer.zero_grad()

    runs = {}
    for name, model, batch_size in (("by hand", AccumulateByHand(), 8), ("big", mlp_cls(lr=0.2), 16)):
        dve = DataValueEmbedding(tmp_path / name, projection_dim=None)
        fit(model, dve, DataLoader(DigitsDict(range(64)), batch_size=batch_size), precision="64-true")
        runs[name] = records_and_scores(dve, model, test_batch)
    (records, scores), (expected, expected_scores) = runs["by hand"], runs["big"]
    assert [r.step for r in records] == [1, 3, 5, 7] and len(expected) == 4
    assert_same_recording(records, scores, expected, expected_scores)


def checkpointing_trainer(root: Path, epochs: int, callbacks: list) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, precision="64-true", logger=False,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                     callbacks=callbacks)


@pytest.mark.parametrize("pack_steps", [256, 3], ids=["loose steps", "packed steps"])
def test_resume_from_checkpoint_equals_uninterrupted_run(
    mlp_cls: type, make_loader: Callable[..., DataLoader], tmp_path: Path, test_batch: dict, pack_steps: int,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    # packed: the crashed run leaves packs of steps 0-2 and 3-5 and loose steps 6, 7; the resume after step 3
    # rewrites the second pack (step_files.StepFolder.scan)
    monkeypatch.setattr(step_files, "PACK_STEPS", pack_steps)
    # Models start in float64: Lightning restores a checkpoint before precision="64-true" converts the module,
    # so a float32 module would round the restored float64 weights (a 4e-8 change, not the callback's doing).
    reference_model, reference = mlp_cls().double(), DataValueEmbedding(tmp_path / "reference", projection_dim=32)
    checkpointing_trainer(tmp_path, 3, [reference]).fit(reference_model, make_loader())
    expected = scores_of(reference, reference_model, test_batch)

    # "crashed" run: checkpoints every epoch, dies after 2 epochs; we resume from the end of epoch 0 so that the
    # steps it recorded in epoch 1 must be dropped and redone.
    ckpts = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    first = DataValueEmbedding(tmp_path / "resumed", projection_dim=32)
    checkpointing_trainer(tmp_path, 2, [first, ckpts]).fit(mlp_cls().double(), make_loader())
    assert TrajectoryStore.open(tmp_path / "resumed").steps == list(range(8))
    if pack_steps == 3:
        assert sorted(p.name for p in (tmp_path / "resumed" / "steps").iterdir()) == [
            "pack_00000000_00000002.safetensors", "pack_00000003_00000005.safetensors", "step_00000006.safetensors",
            "step_00000007.safetensors"]
    epoch0 = sorted((tmp_path / "ckpt").glob("epoch=0*.ckpt"))[0]

    model, resumed = mlp_cls().double(), DataValueEmbedding(tmp_path / "resumed", projection_dim=32)
    checkpointing_trainer(tmp_path, 3, [resumed, ModelCheckpoint(dirpath=tmp_path / "ckpt2")]).fit(
        model, make_loader(), ckpt_path=epoch0)
    assert resumed.embeddings.steps == list(range(12))
    torch.testing.assert_close(scores_of(resumed, model, test_batch), expected, rtol=1e-9, atol=1e-13)
    loaded = DataValueEmbeddings.load(tmp_path / "resumed")
    torch.testing.assert_close(loaded.influence(model, {**test_batch, "x": test_batch["x"].double()},
                                                per_step=True).scores, expected, rtol=1e-9, atol=1e-13)


def test_a_resume_into_a_store_that_lost_a_step_file_before_the_checkpoint_is_refused(
    mlp_cls: type, make_loader: Callable[..., DataLoader], tmp_path: Path
) -> None:
    """An interrupted store lists its steps from its step files: one deleted before the checkpoint's step left a
    gap that the resume filled silently, step 1's samples gone from every score (an audit of session 39). The
    checkpoint now says how many steps its fit recorded."""

    class Crash(L.Callback):
        def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
            if trainer.global_step == 6:
                raise RuntimeError("the machine went down")

    ckpts = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    with pytest.raises(RuntimeError, match="went down"):
        checkpointing_trainer(tmp_path, 2, [DataValueEmbedding(tmp_path / "dve", projection_dim=32), ckpts,
                                            Crash()]).fit(mlp_cls().double(), make_loader())
    assert TrajectoryStore.open(tmp_path / "dve").steps == list(range(6))
    (tmp_path / "dve" / "steps" / "step_00000001.safetensors").unlink()
    epoch0 = sorted((tmp_path / "ckpt").glob("epoch=0*.ckpt"))[0]  # after step 3
    with pytest.raises(StoreError, match=r"holds 3 steps up to the checkpoint's step 3, of the 4 its fit recorded: "
                                         r"1 steps file\(s\) were deleted or lost"):
        checkpointing_trainer(tmp_path, 2, [DataValueEmbedding(tmp_path / "dve", projection_dim=32)]).fit(
            mlp_cls().double(), make_loader(), ckpt_path=epoch0)
    assert TrajectoryStore.open(tmp_path / "dve").steps == [0, 2, 3, 4, 5]  # nothing else lost


def test_a_resume_whose_replay_checkpoints_were_deleted_warns_and_refuses_exact_replay_by_that_cause(
    mlp_cls: type, make_loader: Callable[..., DataLoader], tmp_path: Path, test_batch: dict
) -> None:
    """With ``checkpoints/`` deleted, a resume started a fresh replay record after the checkpoint's step, silently;
    ``exact_influence`` then failed on "hyper.jsonl has no line for step 0" (an audit of session 39)."""
    ckpts = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    checkpointing_trainer(tmp_path, 1, [DataValueEmbedding(tmp_path / "dve", projection_dim=32), ckpts]).fit(
        mlp_cls().double(), make_loader())
    shutil.rmtree(tmp_path / "dve" / "checkpoints")
    model, resumed = mlp_cls().double(), DataValueEmbedding(tmp_path / "dve", projection_dim=32)
    lost = r"the replay checkpoints up to step 3 were lost before the fit resumed after it \(no replay\.json in "
    with pytest.warns(UserWarning, match=lost + r".*The recording itself continues"):
        checkpointing_trainer(tmp_path, 2, [resumed]).fit(model, make_loader(),
                                                          ckpt_path=sorted((tmp_path / "ckpt").glob("*.ckpt"))[0])
    assert resumed.embeddings.steps == list(range(8))
    with pytest.raises(UnsupportedError, match="exact replay is refused for this run: " + lost):
        resumed.embeddings.exact_influence(model, {**test_batch, "x": test_batch["x"].double()})


def test_a_resume_with_other_sample_ids_is_refused(
    mlp_cls: type, make_loader: Callable[..., DataLoader], tmp_path: Path
) -> None:
    """``sample_ids`` is not in the settings hash: a resume reading the ids through a callable (or another key) was
    accepted and filed the later steps under the new ids, each sample's scores split between two columns (an
    audit of session 39). Two callables cannot be compared (README)."""
    ckpts = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    checkpointing_trainer(tmp_path, 1, [DataValueEmbedding(tmp_path / "dve", projection_dim=32), ckpts]).fit(
        mlp_cls(), make_loader())
    ckpt = sorted((tmp_path / "ckpt").glob("*.ckpt"))[0]
    other = DataValueEmbedding(tmp_path / "dve", projection_dim=32, sample_ids=lambda batch: batch["index"] + 5000)
    with pytest.raises(ConfigError, match=r"the checkpoint's recording read the sample ids from the batch key "
                                          r"'index', this callback through a callable: resuming would file later steps "
                                          r"under other ids") as refused:
        checkpointing_trainer(tmp_path, 2, [other]).fit(mlp_cls(), make_loader(), ckpt_path=ckpt)
    # the folder's lock is released, not left to the refused store's collection (its traceback still holds it)
    take = "import fcntl, os, sys; fcntl.flock(os.open(sys.argv[1], os.O_RDWR), fcntl.LOCK_EX | fcntl.LOCK_NB)"
    subprocess.run([sys.executable, "-c", take, str(tmp_path / "dve" / ".lock")], check=True)
    del refused
    assert TrajectoryStore.open(tmp_path / "dve").steps == list(range(4))
    again = DataValueEmbedding(tmp_path / "dve", projection_dim=32)
    checkpointing_trainer(tmp_path, 2, [again]).fit(mlp_cls(), make_loader(), ckpt_path=ckpt)
    assert again.embeddings.steps == list(range(8))


def test_resume_with_other_settings_is_refused(
    mlp_cls: type, make_loader: Callable[..., DataLoader], tmp_path: Path
) -> None:
    ckpts = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    checkpointing_trainer(tmp_path, 1, [DataValueEmbedding(tmp_path / "dve", projection_dim=32), ckpts]).fit(
        mlp_cls(), make_loader())
    ckpt = sorted((tmp_path / "ckpt").glob("*.ckpt"))[0]
    other = DataValueEmbedding(tmp_path / "dve", projection_dim=32, seed=1)
    state = torch.load(ckpt, weights_only=True)["callbacks"]
    (key,) = [k for k in state if "DataValueEmbedding" in k]
    other.load_state_dict(state[key])  # as Lightning would if the state key matched
    # the setting that changed is named (until session 39 only the two hashes were)
    with pytest.raises(ConfigError, match=r"recorded with settings \w+, this callback has \w+ \(recorded, requested: "
                                          r"\{'seed': \(0, 1\)\}\): resuming would mix two recordings"):
        checkpointing_trainer(tmp_path, 2, [other]).fit(mlp_cls(), make_loader())


def test_resume_with_another_world_size_is_refused(
    mlp_cls: type, make_loader: Callable[..., DataLoader], tmp_path: Path
) -> None:
    ckpts = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    dve = DataValueEmbedding(tmp_path / "dve", projection_dim=32)
    checkpointing_trainer(tmp_path, 1, [dve, ckpts]).fit(mlp_cls(), make_loader())
    state = dve.state_dict() | {"world_size": 4}
    again = DataValueEmbedding(tmp_path / "dve", projection_dim=32)
    again.load_state_dict(state)
    with pytest.raises(ConfigError, match="recorded on 4 process.*Resume with the same number of devices"):
        checkpointing_trainer(tmp_path, 2, [again]).fit(mlp_cls(), make_loader())


def test_resume_with_another_projection_is_refused_and_keeps_the_store(
    mlp_cls: type, make_loader: Callable[..., DataLoader], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same callback settings, but the projection regenerates differently (another lightning_dve version): the
    resumed run is refused before the store drops any step, instead of mixing two projections in one trajectory."""
    from lightning_dve.projection import SideProjection

    ckpts = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    checkpointing_trainer(tmp_path, 2, [DataValueEmbedding(tmp_path / "dve", projection_dim=32), ckpts]).fit(
        mlp_cls().double(), make_loader())
    before = sorted(p.name for p in (tmp_path / "dve").rglob("*") if p.is_file())
    epoch0 = sorted((tmp_path / "ckpt").glob("epoch=0*.ckpt"))[0]
    original = SideProjection._draw  # another torch generator or lightning_dve version draws other matrices
    monkeypatch.setattr(SideProjection, "_draw", lambda self: -original(self))
    resumed = DataValueEmbedding(tmp_path / "dve", projection_dim=32)
    with pytest.raises(StoreError, match=r"recorded layers net\.0 \[16x65\] -> 5x6 \(\w+, \w+\);.* resuming "
                                         r"would mix two projections or models"):
        checkpointing_trainer(tmp_path, 3, [resumed]).fit(mlp_cls().double(), make_loader(), ckpt_path=epoch0)
    assert sorted(p.name for p in (tmp_path / "dve").rglob("*") if p.is_file()) == before
    assert TrajectoryStore.open(tmp_path / "dve").steps == list(range(8))


def test_resuming_a_finished_run_from_its_last_checkpoint_keeps_its_embeddings(
    mlp_cls: type, make_loader: Callable[..., DataLoader], tmp_path: Path, test_batch: dict
) -> None:
    """``fit(ckpt_path=last.ckpt)`` with nothing left to train: Lightning skips the loop (no ``on_train_end``), so
    the reopened store must be left exactly as it was, complete with its embeddings and replay checkpoints, and
    the callback must still report the checkpoint's last step (a later checkpoint would otherwise drop every step)."""
    ckpts = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    model = mlp_cls().double()
    checkpointing_trainer(tmp_path, 2, [DataValueEmbedding(tmp_path / "dve", projection_dim=32), ckpts]).fit(
        model, make_loader())
    before = {p: p.read_bytes() for p in (tmp_path / "dve").rglob("*") if p.is_file()}
    batch = {**test_batch, "x": test_batch["x"].double()}
    expected = DataValueEmbeddings.load(tmp_path / "dve").influence(model, batch).scores
    again = DataValueEmbedding(tmp_path / "dve", projection_dim=32)
    checkpointing_trainer(tmp_path, 2, [again]).fit(mlp_cls().double(), make_loader(),
                                                    ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert {p: p.read_bytes() for p in (tmp_path / "dve").rglob("*") if p.is_file()} == before
    assert again.state_dict()["last_step"] == 7
    torch.testing.assert_close(DataValueEmbeddings.load(tmp_path / "dve").influence(model, batch).scores,
                               expected, rtol=0, atol=0)


def test_resume_into_a_store_another_fit_overwrote_is_refused(
    mlp_cls: type, make_loader: Callable[..., DataLoader], tmp_path: Path
) -> None:
    """Run A checkpoints after epoch 1; a fresh fit B (``overwrite=True``, same settings) then records into the same
    save_dir. Resuming A would splice A's later steps onto B's: refused, and B's store is kept."""
    from lightning_dve import StoreError

    ckpts = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    checkpointing_trainer(tmp_path, 2, [DataValueEmbedding(tmp_path / "dve", projection_dim=32), ckpts]).fit(
        mlp_cls().double(), make_loader())
    epoch1 = sorted((tmp_path / "ckpt").glob("epoch=1*.ckpt"))[0]
    checkpointing_trainer(tmp_path, 2, [DataValueEmbedding(tmp_path / "dve", projection_dim=32, overwrite=True)]).fit(
        mlp_cls(seed=5).double(), make_loader())
    before = {p: p.read_bytes() for p in (tmp_path / "dve").rglob("*") if p.is_file()}
    with pytest.raises(StoreError, match=r"holds another recording than the checkpoint's \(store run \w+, checkpoint "
                                         r"run \w+ after step 7\): it was overwritten"):
        checkpointing_trainer(tmp_path, 3, [DataValueEmbedding(tmp_path / "dve", projection_dim=32)]).fit(
            mlp_cls().double(), make_loader(), ckpt_path=epoch1)
    assert {p: p.read_bytes() for p in (tmp_path / "dve").rglob("*") if p.is_file()} == before


def test_resume_into_a_store_without_the_checkpoints_last_step_is_refused(
    mlp_cls: type, make_loader: Callable[..., DataLoader], tmp_path: Path
) -> None:
    """A checkpoint from before the run id existed (no ``run_id``) whose store lost its later steps."""
    from lightning_dve import StoreError

    dve = DataValueEmbedding(tmp_path / "dve", projection_dim=32)
    checkpointing_trainer(tmp_path, 1, [dve]).fit(mlp_cls(), make_loader())
    state = {k: v for k, v in dve.state_dict().items() if k != "run_id"} | {"last_step": 9}
    again = DataValueEmbedding(tmp_path / "dve", projection_dim=32)
    again.load_state_dict(state)
    with pytest.raises(StoreError, match=r"continues after step 9, which the store at .* does not hold .*after a resume "
                                         r"from an earlier checkpoint\?\): resuming would leave a gap\. Resume from a "
                                         r"checkpoint at or before its last step"):
        checkpointing_trainer(tmp_path, 2, [again]).fit(mlp_cls(), make_loader())


def test_a_checkpoint_saved_after_a_failed_step_write_is_refused_on_resume(
    mlp_cls: type, make_loader: Callable[..., DataLoader], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Step 2's write fails (full disk) and a ModelCheckpoint saves right after: the callback's state does not raise
    inside Lightning's save (on one rank alone), the next agreed check stops the fit with the write error, and the
    checkpoint that names step 2 as recorded is refused on resume, since step 2 never reached the disk."""
    import errno

    from lightning_dve import StoreError
    from lightning_dve.files import write_error

    original = TrajectoryStore.append

    def full_disk_at_step_2(store: TrajectoryStore, record) -> None:
        if record.step == 2:
            raise write_error(store.root / "steps" / "step_2", OSError(errno.ENOSPC, "No space left on device"))
        original(store, record)

    monkeypatch.setattr(TrajectoryStore, "append", full_disk_at_step_2)
    ckpts = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_train_steps=1)
    with pytest.raises(StoreError, match=r"steps/step_2: the disk is full"):
        checkpointing_trainer(tmp_path, 1, [DataValueEmbedding(tmp_path / "dve", projection_dim=32), ckpts]).fit(
            mlp_cls().double(), make_loader())
    monkeypatch.setattr(TrajectoryStore, "append", original)
    assert TrajectoryStore.open(tmp_path / "dve").steps == [0, 1]
    after_step_2 = sorted((tmp_path / "ckpt").glob("*step=3.ckpt"))[0]
    with pytest.raises(StoreError, match="continues after step 2, which the store .* does not hold"):
        checkpointing_trainer(tmp_path, 1, [DataValueEmbedding(tmp_path / "dve", projection_dim=32)]).fit(
            mlp_cls().double(), make_loader(), ckpt_path=after_step_2)


def test_a_resumed_run_that_fails_at_its_first_step_leaves_both_stores_truncated_alike(
    mlp_cls: type, make_loader: Callable[..., DataLoader], tmp_path: Path
) -> None:
    """Resume a finished run from epoch 0; the first resumed step fails (NaN loss) after its optimizer step began.
    The step store and the replay checkpoints are cut back at the same moment (the first optimizer step), so both
    read as an interrupted recording of steps 0..3: never a 'complete' store next to truncated checkpoints."""
    import json

    from lightning_dve import GradientError

    ckpts = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    checkpointing_trainer(tmp_path, 2, [DataValueEmbedding(tmp_path / "dve", projection_dim=32,
                                                           checkpoint_interval=2), ckpts]).fit(
        mlp_cls().double(), make_loader())
    epoch0 = sorted((tmp_path / "ckpt").glob("epoch=0*.ckpt"))[0]

    class NaNAtStep4(mlp_cls):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * float("nan") if self.trainer.global_step == 4 else loss

    with pytest.raises(GradientError):
        checkpointing_trainer(tmp_path, 3, [DataValueEmbedding(tmp_path / "dve", projection_dim=32,
                                                               checkpoint_interval=2)]).fit(
            NaNAtStep4().double(), make_loader(), ckpt_path=epoch0)
    store = TrajectoryStore.open(tmp_path / "dve")
    assert store.manifest["status"] == "recording" and store.steps == [0, 1, 2, 3]
    assert not list((tmp_path / "dve" / "embeddings").glob("*.safetensors"))
    replay = json.loads((tmp_path / "dve" / "checkpoints" / "replay.json").read_text())
    assert replay["final_step"] is None
    assert sorted(p.name for p in (tmp_path / "dve" / "checkpoints").glob("state_*")) == [
        "state_00000000.safetensors", "state_00000002.safetensors", "state_00000004.safetensors"]


def test_resuming_an_earlier_branch_past_the_steps_it_shares_with_the_store_is_refused(
    mlp_cls: type, make_loader: Callable[..., DataLoader], tmp_path: Path
) -> None:
    """Run A checkpoints every epoch; B resumes A's epoch 0 on other data and finishes. A's epoch-1 checkpoint (after
    step 7) would splice B's steps 4..7 into A's trajectory: refused. A's epoch-0 checkpoint (after step 3, which
    both branches share) is accepted."""
    from lightning_dve import StoreError

    def ckpts(name: str) -> ModelCheckpoint:
        return ModelCheckpoint(dirpath=tmp_path / name, save_top_k=-1, every_n_epochs=1)

    checkpointing_trainer(tmp_path, 3, [DataValueEmbedding(tmp_path / "dve", projection_dim=32), ckpts("a")]).fit(
        mlp_cls().double(), make_loader())
    a0, a1 = (sorted((tmp_path / "a").glob(f"epoch={e}*.ckpt"))[0] for e in (0, 1))
    checkpointing_trainer(tmp_path, 3, [DataValueEmbedding(tmp_path / "dve", projection_dim=32), ckpts("b")]).fit(
        mlp_cls().double(), make_loader(offset=200), ckpt_path=a0)
    before = {p: p.read_bytes() for p in (tmp_path / "dve").rglob("*") if p.is_file()}
    with pytest.raises(StoreError, match=r"checkpoint run \w+ after step 7\).* resumed from an earlier checkpoint"):
        checkpointing_trainer(tmp_path, 3, [DataValueEmbedding(tmp_path / "dve", projection_dim=32)]).fit(
            mlp_cls().double(), make_loader(), ckpt_path=a1)
    assert {p: p.read_bytes() for p in (tmp_path / "dve").rglob("*") if p.is_file()} == before
    dve = DataValueEmbedding(tmp_path / "dve", projection_dim=32)
    checkpointing_trainer(tmp_path, 3, [dve]).fit(mlp_cls().double(), make_loader(), ckpt_path=a0)
    store = TrajectoryStore.open(tmp_path / "dve")
    assert store.steps == list(range(12)) and all(int(store.read_step(s).sample_ids[0]) < 64 for s in store.steps)


def test_a_refused_resume_is_not_retried_by_the_next_fit(
    mlp_cls: type, make_loader: Callable[..., DataLoader], tmp_path: Path
) -> None:
    """The checkpoint state is used by one fit only: after a refused resume, a plain ``fit`` starts afresh."""
    dve = DataValueEmbedding(tmp_path / "dve", projection_dim=32)
    checkpointing_trainer(tmp_path, 1, [dve]).fit(mlp_cls(), make_loader())
    again = DataValueEmbedding(tmp_path / "dve", projection_dim=32, overwrite=True)
    again.load_state_dict(dve.state_dict() | {"world_size": 4})
    with pytest.raises(ConfigError, match="recorded on 4 process"):
        checkpointing_trainer(tmp_path, 1, [again]).fit(mlp_cls(), make_loader())
    checkpointing_trainer(tmp_path, 1, [again]).fit(mlp_cls(), make_loader())
    assert again.embeddings.steps == list(range(4))


def test_resume_into_another_save_dir_names_the_recorded_one(
    mlp_cls: type, make_loader: Callable[..., DataLoader], tmp_path: Path
) -> None:
    ckpts = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    first = DataValueEmbedding(tmp_path / "recorded", projection_dim=32, report=None)
    checkpointing_trainer(tmp_path, 1, [first, ckpts]).fit(mlp_cls().double(), make_loader())
    moved = DataValueEmbedding(tmp_path / "elsewhere", projection_dim=32, report=None)
    with pytest.raises(StoreError, match=r"no store at .*elsewhere to resume: the checkpoint's DataValueEmbedding "
                                         r"recorded into .*recorded\. Pass save_dir="):
        checkpointing_trainer(tmp_path, 2, [moved]).fit(mlp_cls().double(), make_loader(),
                                                         ckpt_path=sorted((tmp_path / "ckpt").glob("*.ckpt"))[0])


def test_a_resumed_fit_whose_report_is_skipped_leaves_no_earlier_report(
    mlp_cls: type, make_loader: Callable[..., DataLoader], tmp_path: Path, test_batch: dict
) -> None:
    """The report folder belongs to the embeddings it was made from: a resumed fit whose own report fails (here a
    reference batch that training_step cannot read) or is skipped left the earlier run's report in place,
    unmarked, next to the new embeddings (found by a helper damaging stores). It is deleted once the new
    embeddings are written."""
    ckpts = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    first = DataValueEmbedding(tmp_path / "dve", projection_dim=32, reference=test_batch)
    checkpointing_trainer(tmp_path, 1, [first, ckpts]).fit(mlp_cls().double(), make_loader())
    assert (tmp_path / "dve" / "report" / "summary.json").exists()
    unreadable = {key: value for key, value in test_batch.items() if key != "y"}
    resumed = DataValueEmbedding(tmp_path / "dve", projection_dim=32, reference=unreadable)
    with pytest.warns(UserWarning, match="report"):
        checkpointing_trainer(tmp_path, 2, [resumed]).fit(mlp_cls().double(), make_loader(),
                                                          ckpt_path=sorted((tmp_path / "ckpt").glob("*.ckpt"))[0])
    assert resumed.embeddings.steps == list(range(8)) and not (tmp_path / "dve" / "report").exists()
