"""SGD with momentum, dampening and weight decay: the two-state recursion against the linearised dynamics, the
recorded optimizer terms against the applied update, and fidelity against exact leave-one-out."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_dve import DataValueEmbedding
from lightning_dve.config import AccumulatorLayout
from lightning_dve.recursion import BackwardRecursion
from lightning_dve.store import StepRecord, TrajectoryStore
from tests.conftest import DigitsDict, TinyMLP

LAYERS = {"a": 3, "b": 2}
LR = 0.02  # SGD momentum 0.9: effective step lr / (1 - momentum) = 0.2


def random_records(seed: int, steps: int = 6, nesterov: bool = False) -> list[StepRecord]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in range(steps):
        n = int(torch.randint(1, 4, (1,), generator=g))
        clip = 0.5 + torch.rand(2, generator=g, dtype=torch.float64)  # a clip factor per step
        optim = {"momentum": torch.tensor([0.9, 0.5], dtype=torch.float64),
                 "gain": torch.tensor([1.0 if t == 0 else 0.8, 1.0 if t == 0 else 0.7], dtype=torch.float64),
                 "weight_decay": torch.tensor([0.05, 0.02], dtype=torch.float64)}
        if nesterov:  # torch: no dampening with Nesterov; clip scales the gradient, not the decay
            optim.update(gain=clip, weight_decay=optim["weight_decay"] / clip, lead=optim["momentum"], direct=clip)
        out.append(StepRecord(t, torch.arange(n), torch.rand(n, generator=g, dtype=torch.float64),
                              0.1 + torch.rand(2, generator=g, dtype=torch.float64),
                              {k: torch.randn(n, d, generator=g, dtype=torch.float64) for k, d in LAYERS.items()},
                              t, optim))
    return out


def columns(record: StepRecord, values: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.full((d,), float(v), dtype=torch.float64) for v, d in zip(values, LAYERS.values())])


def linearised_removal(records: list[StepRecord], t_s: int, z: int, blocks: list[slice]) -> torch.Tensor:
    """delta theta_T when occurrence (t_s, z)'s term is removed, by running the linear (theta, velocity) system."""
    size = sum(LAYERS.values())
    theta, velocity = torch.zeros(size, dtype=torch.float64), torch.zeros(size, dtype=torch.float64)
    for t in range(t_s, len(records)):
        r = records[t]
        grads = torch.cat([r.grads[k] for k in LAYERS], dim=1)
        hessian = torch.zeros(size, size, dtype=torch.float64)
        for block in blocks:  # empirical Fisher, restricted to the layout's blocks
            hessian[block, block] = (grads[:, block] * r.weights[:, None]).T @ grads[:, block]
        lam, mu, gain = (columns(r, r.optim[k]) for k in ("weight_decay", "momentum", "gain"))
        lr = columns(r, r.lrs)
        direct = -r.weights[z] * grads[z] if t == t_s else torch.zeros(size, dtype=torch.float64)
        if "direct" in r.optim:  # Nesterov: g' = clip (H theta + source) + lambda theta; v = mu v + g'; p -= lr (g' + mu v)
            clip = columns(r, r.optim["direct"])
            step_grad = clip * (hessian @ theta + direct) + lam * clip * theta
            velocity = mu * velocity + step_grad
            theta = theta - lr * (step_grad + mu * velocity)
            continue
        velocity = mu * velocity + gain * (hessian @ theta + lam * theta + direct)
        theta = theta - lr * velocity
    return theta


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("layout", ["per_layer", "full"])
@pytest.mark.parametrize("seed", [0, 1])
def test_momentum_recursion_equals_the_linearised_dynamics(layout: str, seed: int, nesterov: bool) -> None:
    records = random_records(seed, nesterov=nesterov)
    blocks = [slice(0, 3), slice(3, 5)] if layout == "per_layer" else [slice(0, 5)]
    recursion = BackwardRecursion(list(LAYERS), AccumulatorLayout.parse(layout))
    embeddings = {r.step: recursion.step(r) for r in reversed(records)}
    for r in records:
        for z in range(len(r.sample_ids)):
            got = torch.cat([embeddings[r.step][k][z] for k in LAYERS])
            torch.testing.assert_close(got, linearised_removal(records, r.step, z, blocks), rtol=1e-10, atol=1e-13)


def test_zero_momentum_and_decay_give_the_plain_sgd_embeddings() -> None:
    zero = {"momentum": torch.zeros(2, dtype=torch.float64), "gain": torch.ones(2, dtype=torch.float64),
            "weight_decay": torch.zeros(2, dtype=torch.float64)}
    plain_records = [StepRecord(r.step, r.sample_ids, r.weights, r.lrs, r.grads, r.epoch) for r in random_records(0)]
    plain, modelled = (BackwardRecursion(list(LAYERS), AccumulatorLayout.PER_LAYER) for _ in range(2))
    for record in reversed(plain_records):
        expected = plain.step(record)
        got = modelled.step(StepRecord(record.step, record.sample_ids, record.weights, record.lrs, record.grads,
                                       record.epoch, zero))
        for name in LAYERS:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-12, atol=1e-15)


class MomentumMLP(TinyMLP):
    options = {"momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, **self.options)


class NesterovMLP(MomentumMLP):
    options = {"momentum": 0.9, "nesterov": True, "weight_decay": 0.01}


class AscentMomentumMLP(MomentumMLP):  # maximize: the gradient enters with its sign flipped, the decay does not
    options = {**MomentumMLP.options, "maximize": True}


class AscentNesterovMLP(MomentumMLP):
    options = {**NesterovMLP.options, "maximize": True}


class UpdateProbe(L.Callback):
    def __init__(self) -> None:
        self.rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (raw grad, theta, update)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        weight = pl_module.net[0].weight
        self.rows.append((weight.grad.detach().clone(), weight.detach().clone(), None))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        grad, theta, _ = self.rows[-1]
        self.rows[-1] = (grad, theta, pl_module.net[0].weight.detach() - theta)


@pytest.mark.parametrize("model", [MomentumMLP, NesterovMLP, AscentMomentumMLP, AscentNesterovMLP])
def test_recorded_momentum_terms_reproduce_the_applied_update(tmp_path: Path, model: type[MomentumMLP]) -> None:
    """With clipping binding, the recorded lr, momentum, gain, decay (and Nesterov's lead and direct terms)
    rebuild torch's momentum buffer and update."""
    probe, dve = UpdateProbe(), DataValueEmbedding(tmp_path / "dve", projection_dim=None, report=None)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, precision="64-true", logger=False,
                        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                        gradient_clip_val=0.05, callbacks=[dve, probe])
    trainer.fit(model().double(), DataLoader(DigitsDict(range(64)), batch_size=16))
    store = TrajectoryStore.open(tmp_path / "dve")
    layer = store.layer_names.index("net.0")
    buffer = None
    for step, (grad, theta, update) in enumerate(probe.rows):
        record = store.read_step(step)
        mu, gain, decay = (float(record.optim[k][layer]) for k in ("momentum", "gain", "weight_decay"))
        # the buffer starts at step 0 (nothing carried into it); clipping binds at 0.05; dampening from step 1
        assert mu == (0.0 if step == 0 else 0.9) and (gain < 1.0)
        contribution = gain * (grad + decay * theta)
        buffer = contribution if buffer is None else mu * buffer + contribution
        applied = buffer
        if "direct" in record.optim:  # Nesterov: p -= lr (g' + mu * buffer), g' = clip grad + lambda theta
            direct, lead = (float(record.optim[k][layer]) for k in ("direct", "lead"))
            assert direct == gain and lead == 0.9
            applied = direct * (grad + decay * theta) + lead * buffer
        torch.testing.assert_close(update, -float(record.lrs[layer]) * applied, rtol=1e-9, atol=1e-14)


def test_segments_with_momentum_are_refused(tmp_path: Path) -> None:
    from lightning_dve import UnsupportedError

    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False,
                        callbacks=[DataValueEmbedding(tmp_path / "dve", segments=2, report=None)])
    with pytest.raises(UnsupportedError, match=r"segments=2 with optimizer state \(SGD momentum, weight decay, Adam; use segments=1\)"):
        trainer.fit(MomentumMLP(), DataLoader(DigitsDict(range(64)), batch_size=16))


class MomentumFromStep2(TinyMLP):
    """Plain SGD at fit start, momentum 0.9 from step 2 on (set by the module's own hook)."""

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        if self.trainer.global_step == 2:
            self.trainer.optimizers[0].param_groups[0]["momentum"] = 0.9


def test_momentum_turned_on_during_a_fit_with_segments_is_refused_at_that_step(tmp_path: Path) -> None:
    """Refused at fit start only, momentum set by a hook at step 5 was recorded with segments=3, and each
    segment's recursion dropped its carry: scores 55 % off exact_influence, silently (an audit)."""
    from lightning_dve import UnsupportedError

    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False,
                        callbacks=[DataValueEmbedding(tmp_path / "dve", segments=3, report=None)])
    with pytest.raises(UnsupportedError, match=r"segments=3 with optimizer state \(SGD momentum, weight decay, "
                                               r"Adam\), turned on during fit at step 2 .*Use segments=1"):
        trainer.fit(MomentumFromStep2(), DataLoader(DigitsDict(range(64)), batch_size=16))
    assert TrajectoryStore.open(tmp_path / "dve").steps == [0, 1]


@pytest.mark.slow
def test_momentum_model_beats_the_sgd_proxy_against_exact_tsloo(tmp_path: Path) -> None:
    """SGD momentum 0.9 (weight decay 1e-3) on the core fidelity problem (384 digits, 3 epochs), exact mode.

    Mean Spearman vs exact TSLOO, seed 0, momentum model vs SGD proxy (the same store with the optimizer terms
    dropped, i.e. the paper's treatment): lr 0.005 -> 0.987 vs 0.866; lr 0.02 -> 0.800 vs 0.430; lr 0.05 ->
    0.282 vs 0.366. The model is exact for the linearised dynamics (test above); at lr 0.05 the effective step
    lr / (1 - momentum) = 0.5 is where the empirical-Fisher curvature breaks down (as for plain SGD at large lr).
    Asserted at lr 0.02 with margin: model > 0.7 and model - proxy > 0.2.
    """
    from tests import oracles
    from tests.helpers import DigitsDataset, DigitsMLP, epoch_batches, make_loader, make_trainer, split_indices

    class Momentum(DigitsMLP):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=LR, momentum=0.9, weight_decay=1e-3)

    train_ids, test_ids = split_indices(384, 16)
    loader = make_loader(DigitsDataset(train_ids), 32, seed=1)
    batches = epoch_batches(make_loader(DigitsDataset(train_ids), 32, seed=1), 3)
    model = Momentum(hidden=32, seed=0)
    initial = copy.deepcopy(model.net)
    dve = DataValueEmbedding(tmp_path / "dve", projection_dim=None, report=None)
    make_trainer(3, callbacks=[dve]).fit(model, loader)
    test = DigitsDataset(test_ids).batch()
    occurrences = oracles.spread_occurrences([len(b["y"]) for b in batches], 40, 0)
    truth = oracles.trainer_tsloo(
        initial, batches, lambda p: torch.optim.SGD(p, lr=LR, momentum=0.9, weight_decay=1e-3), occurrences,
        test["x"], test["y"])[0]
    offsets = torch.tensor([0] + [len(b["y"]) for b in batches]).cumsum(0)
    cols = [int(offsets[t]) + i for t, i in occurrences]
    emb = dve.embeddings
    modelled = emb.influence(model, test, per_step=True).scores[:, cols]
    store = emb.store
    proxy = BackwardRecursion(store.layer_names, AccumulatorLayout.PER_LAYER)
    proxy_embeddings = {}
    for record in store.iter_backward():
        plain = StepRecord(record.step, record.sample_ids, record.weights, record.lrs, record.grads, record.epoch)
        proxy_embeddings[record.step] = proxy.step(plain)
    test_grads = emb.test_gradients(model, test)
    proxy_scores = torch.cat([sum(test_grads[n] @ proxy_embeddings[s][n].T for n in test_grads)
                              for s in store.steps], dim=1)[:, cols]
    model_rho = oracles.mean_spearman(modelled, truth)[0]
    proxy_rho = oracles.mean_spearman(proxy_scores, truth)[0]
    print(f"\nmomentum 0.9: modelled {model_rho:.3f}, SGD proxy {proxy_rho:.3f}")
    assert model_rho > 0.7 and model_rho - proxy_rho > 0.2
