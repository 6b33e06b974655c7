"""Replayed embeddings (``DataValueEmbeddings.replay_embeddings``): the projection's rows carried back through the
replayed run. Oracles: without projection the test-agnostic scores equal ``exact_influence`` (itself checked
against an unrolled float64 oracle in ``test_replay.py``) for every optimizer model; with projection they equal
``exact_influence`` of the projected test gradient's directions; the rows are the capture's projection.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn

from lightning_dve import ConfigError, DataValueEmbedding, DataValueEmbeddings, StoreError, replay
from lightning_dve import replay_embeddings as replay_embeddings_module
from lightning_dve.layers import parameter_block
from tests.helpers import DigitsDataset, can_lock_elsewhere, make_loader, make_trainer, split_indices
from tests.test_replay import SETTINGS, ReplayNet, fit_setting

CASES = ["sgd", "sgd momentum dampening decay", "adamw cosine warm-up", "sgd clip norm", "cnn adamw"]


@pytest.fixture(scope="module")
def small_data() -> tuple[DigitsDataset, dict]:
    train, test = split_indices(48, 5, seed=2)
    return DigitsDataset(train), DigitsDataset(test).batch()


@pytest.mark.parametrize("name", CASES)
def test_unprojected_replayed_embeddings_score_as_exact_influence(tmp_path: Path, small_data, name: str) -> None:
    """6 steps, float64: ``influence`` after ``replay_embeddings`` equals ``exact_influence`` to 1e-9 relative,
    and differs from the recursion's scores before it (the test is not vacuous)."""
    dataset, test = small_data
    module, dve, _ = fit_setting(tmp_path / "dve", SETTINGS[name], dataset, epochs=2, batch=16, projection_dim=None)
    emb = dve.embeddings
    before = emb.influence(module, test, per_step=True)
    exact = emb.exact_influence(module, test, per_step=True)
    cost = emb.replay_embeddings(module)
    assert cost.steps == 6 and cost.relative > 0 and emb.replay_cost is cost
    after = emb.influence(module, test, per_step=True)
    assert torch.equal(after.sample_ids, exact.sample_ids) and torch.equal(after.steps, exact.steps)
    scale = float(exact.scores.abs().max())
    assert float((after.scores - exact.scores).abs().max()) < 1e-9 * scale
    assert float((before.scores - exact.scores).abs().max()) > 1e-3 * scale
    loaded = DataValueEmbeddings.load(tmp_path / "dve")  # on disk, for any later process
    assert loaded.store.manifest["embeddings_source"] == "replay"
    torch.testing.assert_close(loaded.influence(module, test, per_step=True).scores, after.scores, rtol=0, atol=0)


def test_projected_rows_are_the_captures_projection(tmp_path: Path, small_data) -> None:
    """Oracle for the rows: ``<row_j, grad>`` over a layer's parameters equals the projected test gradient that the
    capture hooks compute, for every row of every layer (k = 64: both sides of the first layer projected)."""
    dataset, test = small_data
    module, dve, _ = fit_setting(tmp_path / "dve", SETTINGS["sgd"], dataset, epochs=1, batch=16)
    emb = dve.embeddings
    final = {n: p.detach() for n, p in module.named_parameters()}
    rows, ranges = replay_embeddings_module.projection_rows(module, emb.projections, final)
    projected = emb.test_gradients(module, {k: v[:1] for k, v in test.items()})
    module.zero_grad()
    emb.test_losses(module, {k: v[:1] for k, v in test.items()}).sum().backward()
    for name, layer_rows in ranges.items():
        layer = dict(module.named_modules())[name]
        grads = {key: p.grad for key, p in module.named_parameters() if key.startswith(name + ".")}
        expected = projected[name][0]
        got = sum((rows[(key, "param")][layer_rows] * g).flatten(1).sum(1) for key, g in grads.items())
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
        other = [key for key in rows if not key[0].startswith(name + ".")]
        assert all(not rows[key][layer_rows].any() for key in other)  # zero outside the layer
        block = parameter_block(layer, layer.weight.grad, layer.bias.grad)
        assert emb.projections[name].dim == layer_rows.stop - layer_rows.start <= block.numel()


def test_projected_replayed_embeddings_are_exact_influence_through_the_projection(tmp_path: Path,
                                                                                  small_data) -> None:
    """With projection (k = 64 per layer), ``<P g_test, e>`` equals ``exact_influence`` of the test gradient
    ``P^T P g_test`` (a linear target ``theta -> <P^T P g, theta>``), to 1e-9: the only approximation left is
    ``P^T P ~ I`` (float64 storage: the default float16 rows decode to float32 embeddings)."""
    dataset, test = small_data
    module, dve, _ = fit_setting(tmp_path / "dve", SETTINGS["sgd momentum dampening decay"], dataset, epochs=2,
                                 batch=16, storage_dtype="float64")
    emb = dve.embeddings
    emb.replay_embeddings(module)
    single = {k: v[:2] for k, v in test.items()}
    got = emb.influence(module, single, per_step=True)
    final = {n: p.detach() for n, p in module.named_parameters()}
    rows, ranges = replay_embeddings_module.projection_rows(module, emb.projections, final)
    projected = emb.test_gradients(module, single)
    directions = {key: sum(projected[name][:, None, :] @ value[r].flatten(1)[None]
                           for name, r in ranges.items()).squeeze(1).reshape(2, *value.shape[1:])
                  for (key, _), value in rows.items()}

    def linear_target(m: torch.nn.Module) -> torch.Tensor:
        params = dict(m.named_parameters())
        return torch.stack([sum((directions[k][i] * params[k]).sum() for k in directions) for i in range(2)])

    expected = emb.exact_influence(module, single, loss_fn=lambda m, _: linear_target(m), per_step=True)
    scale = float(expected.scores.abs().max())
    assert float((got.scores - expected.scores).abs().max()) < 1e-9 * scale


def test_refuses_segments_and_runs_too_large_keeping_the_embeddings(tmp_path: Path, small_data,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Also a regression: per-sample totals of a float64 model over two segments mixed float32 scores (carried
    through the float32 factors) with float64 ones (the last segment's) and failed in ``index_add_``."""
    dataset, test = small_data
    module, dve, _ = fit_setting(tmp_path / "seg", SETTINGS["sgd"], dataset, epochs=2, batch=16, segments=2)
    before = dve.embeddings.influence(module, test)
    assert before.scores.dtype == torch.float64
    per_step = dve.embeddings.influence(module, test, per_step=True)
    totals = torch.zeros_like(before.scores).index_add_(1, torch.searchsorted(before.sample_ids, per_step.sample_ids),
                                                        per_step.scores)
    torch.testing.assert_close(before.scores, totals, rtol=1e-12, atol=1e-15)
    with pytest.raises(ConfigError, match=r"segments > 1, .* segments=1"):
        dve.embeddings.replay_embeddings(module)
    module, dve, _ = fit_setting(tmp_path / "big", SETTINGS["sgd"], dataset, epochs=2, batch=16)
    before = dve.embeddings.influence(module, test).scores
    monkeypatch.setattr(replay_embeddings_module, "MAX_CARRIED_BYTES", 2**20)
    with pytest.raises(ConfigError, match=r"carries \d+ projection rows .* GiB .* smaller projection_dim"):
        dve.embeddings.replay_embeddings(module)
    torch.testing.assert_close(dve.embeddings.influence(module, test).scores, before, rtol=0, atol=0)
    loaded = DataValueEmbeddings.load(tmp_path / "big")
    with pytest.raises(ConfigError, match="needs the training dataset"):
        loaded.replay_embeddings(module)
    assert loaded.store.manifest["embeddings_source"] == "recursion"


class OldStyleTanh(torch.autograd.Function):
    """A custom tanh whose backward checks its input's values (data-dependent control flow, which
    ``torch.func.vmap`` refuses); twice differentiable."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(x)
        ctx.save_for_backward(x)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        if not bool(torch.isfinite(grad).all()):
            raise FloatingPointError("non-finite gradient")
        return grad * (1 - torch.tanh(x) ** 2)


class CustomTanh(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return OldStyleTanh.apply(x)


def test_a_function_vmap_refuses_is_carried_row_by_row(tmp_path: Path, small_data) -> None:
    """The rows go through one ``torch.func.vmap``; a custom autograd.Function that vmap refuses switches the
    replay to one backward per row, with the same scores as the built-in tanh (the same model)."""
    dataset, test = small_data
    scores, batched = {}, {}
    for name, activation in (("builtin", nn.Tanh()), ("custom", CustomTanh())):
        module, dve, _ = fit_setting(tmp_path / name, SETTINGS["sgd"], dataset, epochs=1, batch=16)
        module.net[1] = activation
        replayer = dve.embeddings._replayer(module, None, None, None, None)
        final = replay.final_parameters(replayer)
        rows, _ = replay_embeddings_module.projection_rows(module, dve.embeddings.projections, final)
        scores[name] = replay.carry_back(replayer, rows)[2]
        batched[name] = replayer.products.batched
    assert batched == {"builtin": True, "custom": False}
    torch.testing.assert_close(scores["custom"], scores["builtin"], rtol=1e-10, atol=1e-14)


def test_callback_option_refusals(tmp_path: Path, small_data) -> None:
    """``embeddings="replay"`` is refused where it cannot run (at construction),
    and where the run turns out not to be replayable (dropout) the recursion's embeddings stay, with a warning."""
    with pytest.raises(ConfigError, match=r"allowed values are 'recursion', 'replay'"):
        DataValueEmbedding(tmp_path / "a", embeddings="exact")
    with pytest.raises(ConfigError, match=r"it needs checkpoint_interval \(got None\)\. Keep"):  # only what is unmet
        DataValueEmbedding(tmp_path / "a", embeddings="replay", checkpoint_interval=None)
    with pytest.raises(ConfigError, match=r"it needs segments=1 \(got 2\)\. Keep"):
        DataValueEmbedding(tmp_path / "a", embeddings="replay", segments=2)
    with pytest.raises(ConfigError, match=r"checkpoint_interval \(got None\) and segments=1 \(got 2\)"):
        DataValueEmbedding(tmp_path / "a", embeddings="replay", segments=2, checkpoint_interval=None)
    dataset, test = small_data
    module = ReplayNet(SETTINGS["sgd"], 3, dropout=0.2)
    dve = DataValueEmbedding(tmp_path / "dropout", report=None, projection_dim=64, embeddings="replay")
    with pytest.warns(UserWarning, match=r"could not replay this run \(.*ran dropout in train mode.*to replay the run "
                                         r"\(exact_influence, embeddings='replay'\)\.\); the report "
                                         "and the store keep the recursion's embeddings"):
        make_trainer(1, callbacks=[dve]).fit(module, make_loader(dataset, 16, seed=1))
    assert dve.embeddings.store.manifest["embeddings_source"] == "recursion"
    module.eval()
    assert dve.embeddings.influence(module, test).scores.abs().sum() > 0


def test_a_failed_write_of_the_replayed_embeddings_keeps_the_recursions(tmp_path: Path, small_data,
                                                                         monkeypatch) -> None:
    """The disk cannot hold the replayed embeddings (their ``begin_embeddings``, after the recursion's): a warning,
    and the recursion's embeddings stay complete and readable."""
    from lightning_dve.store import TrajectoryStore

    begun, original = [], TrajectoryStore.begin_embeddings

    def second_fails(store: TrajectoryStore, *args: Any) -> None:
        begun.append(store.root)
        if len(begun) == 2:
            raise StoreError(f"embeddings in {store.root} do not fit: No space left on device")
        original(store, *args)

    monkeypatch.setattr(TrajectoryStore, "begin_embeddings", second_fails)
    dataset, test = small_data
    module = ReplayNet(SETTINGS["sgd"], 3)
    dve = DataValueEmbedding(tmp_path / "dve", report=None, projection_dim=64, embeddings="replay")
    with pytest.warns(UserWarning, match=r"could not replay this run \(embeddings in .* do not fit: No space left "
                                         r"on device\); the report and the store keep the recursion's embeddings"):
        make_trainer(1, callbacks=[dve]).fit(module, make_loader(dataset, 16, seed=1))
    assert len(begun) == 2
    loaded = DataValueEmbeddings.load(tmp_path / "dve")
    assert loaded.store.manifest["embeddings_source"] == "recursion"
    assert loaded.influence(module, test).scores.abs().sum() > 0


@pytest.mark.parametrize("fault", ["failed rename", "killed after the rename"])
def test_replacing_the_embeddings_never_leaves_them_under_the_wrong_label(tmp_path: Path, small_data, monkeypatch,
                                                                           fault: str) -> None:
    """``write_replayed`` swaps the recursion's embeddings for the replayed ones. A rename that fails keeps the
    recursion's, labelled and loadable; a process killed between the rename and the manifest's update (simulated
    by ``SystemExit`` there) leaves a manifest that calls the embeddings unfinished, so ``load`` refuses them: it
    used to leave the replayed ones labelled ``"recursion"``."""
    from lightning_dve.embedding_arrays import EmbeddingWriter
    from lightning_dve.store import TrajectoryStore

    dataset, test = small_data
    dve = DataValueEmbedding(tmp_path / "dve", report=None, projection_dim=64)
    module = ReplayNet(SETTINGS["sgd"], 3)
    make_trainer(1, callbacks=[dve]).fit(module, make_loader(dataset, 16, seed=1))
    store = dve.embeddings.store
    widths = {name: array.shape[1] for name, array in store.embedding_arrays().step(store.steps[0])[1].items()}
    replaced = ((step, {n: torch.zeros(rows, k) for n, k in widths.items()})
                for step, rows in zip(store.steps, store.manifest["rows"]))
    if fault == "failed rename":
        def finish(writer: EmbeddingWriter, elsewhere: object = ()) -> None:
            raise StoreError("could not rename: No space left on device")
        monkeypatch.setattr(EmbeddingWriter, "finish", finish)
        with pytest.raises(StoreError, match="could not rename"):
            replay_embeddings_module.write_replayed(store, widths, replaced)
        assert TrajectoryStore.open(tmp_path / "dve").manifest["embeddings_source"] == "recursion"
        assert DataValueEmbeddings.load(tmp_path / "dve").influence(module, test).scores.abs().sum() > 0
    else:
        def killed(store: TrajectoryStore) -> None:
            raise SystemExit("killed")
        monkeypatch.setattr(TrajectoryStore, "record_disk_use", killed)
        with pytest.raises(SystemExit):
            replay_embeddings_module.write_replayed(store, widths, replaced)
        assert TrajectoryStore.open(tmp_path / "dve").manifest["embeddings"] is None
        with pytest.raises(StoreError, match="embeddings"):
            DataValueEmbeddings.load(tmp_path / "dve")


class LockProbe(L.Callback):
    """Records at train end (after the DataValueEmbedding before it) whether another process could lock the store."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.free_at_train_end = folder, None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.free_at_train_end = can_lock_elsewhere(self.folder)


def test_replay_keeps_the_fits_lock_and_waits_for_another_process(tmp_path: Path, small_data, holder) -> None:
    """Within a fit the replay reuses the recording's lock (a second lock's release would drop the process's lock:
    POSIX record locks belong to the process); after fit it takes the lock (and replays the same embeddings), and
    refuses while another process holds it, changing nothing."""
    dataset, test = small_data
    module = ReplayNet(SETTINGS["sgd"], 3)
    dve = DataValueEmbedding(tmp_path / "dve", report=None, projection_dim=16, embeddings="replay")
    probe = LockProbe(tmp_path / "dve")
    make_trainer(1, callbacks=[dve, probe]).fit(module, make_loader(dataset, 16, seed=1))
    assert dve.embeddings.store.manifest["embeddings_source"] == "replay"
    assert probe.free_at_train_end is False and can_lock_elsewhere(tmp_path / "dve")  # released at teardown
    before = dve.embeddings.influence(module, test).scores
    dve.embeddings.replay_embeddings(module)  # after fit, from the manifest's projections: the train end's result
    torch.testing.assert_close(dve.embeddings.influence(module, test).scores, before, rtol=1e-9, atol=1e-12)
    holder(tmp_path / "dve")
    with pytest.raises(StoreError, match="is being recorded by another fit"):
        dve.embeddings.replay_embeddings(module)
    torch.testing.assert_close(dve.embeddings.influence(module, test).scores, before, rtol=0, atol=0)
