"""Exact replay mode (``DataValueEmbeddings.exact_influence``): functional optimizers, reverse mode against an
independent unrolled oracle in float64, checkpoints, every refusal, and Spearman against exact TSLOO.

The oracle here (``unrolled_first_order``) writes the whole run as one differentiable float64 graph with its own
copy of each optimizer's math (checked first to reproduce the Trainer's trajectory), with the per-sample weights
``W[t]`` as leaves: one backward gives ``dL/dW`` for every occurrence, and ``-W dL/dW`` is the first-order TSLOO.
Ground-truth TSLOO (``tsloo_by_training``) retrains with ``torch.optim`` itself, its scheduler and clipping, with
one occurrence dropped; state is deep-copied when a counterfactual starts from a saved step.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins import MixedPrecision
from scipy.stats import spearmanr
from torch import nn
from torch.func import functional_call

from lightning_dve import ConfigError, DataValueEmbedding, DataValueEmbeddings, StoreError, UnsupportedError
from lightning_dve import batches, influence_replay, replay, replay_optim, replay_vjp, step_files
from lightning_dve.batch_trees import split_batch
from lightning_dve.checkpoints import SEGMENT_STATES, CheckpointStore, auto_interval, parameter_groups
from lightning_dve.replay_data import BatchSource, TrainingData, step_loss_terms
from lightning_dve.sync import StepAssembler
from tests import oracles
from tests.helpers import DigitsDataset, epoch_batches, make_loader, make_trainer, split_indices

WARMUP = 5


# --- settings shared by the module, the oracles and the benchmark -------------------------------------------


def make_optimizer(params: Any, setting: dict[str, Any]) -> torch.optim.Optimizer:
    """``setting["optimizer"]`` in sgd / adam / adamw with the remaining optimizer keyword arguments."""
    kwargs = {k: v for k, v in setting.items()
              if k not in ("optimizer", "schedule", "clip", "net", "clip_algorithm", "momentum_off")}
    return {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[setting["optimizer"]](
        params, **kwargs)


def lr_factor(setting: dict[str, Any], step: int, total: int) -> float:
    """Schedule factor of ``step``: constant, or linear warm-up over ``WARMUP`` steps then cosine to 0."""
    if setting.get("schedule") != "cosine":
        return 1.0
    if step < WARMUP:
        return (step + 1) / WARMUP
    return 0.5 * (1 + math.cos(math.pi * (step - WARMUP) / max(1, total - WARMUP)))


def make_scheduler(optimizer: torch.optim.Optimizer, setting: dict[str, Any], total: int) -> Any:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: lr_factor(setting, t, total))


def make_net(kind: str, seed: int, dropout: float = 0.0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        f64 = {"dtype": torch.float64}
        if kind == "mlp":  # the same initial weights as tests.helpers.DigitsMLP(hidden=32, seed=seed)
            layers = [nn.Linear(64, 32, **f64), nn.Tanh(), *([nn.Dropout(dropout)] if dropout else []),
                      nn.Linear(32, 10, **f64)]
        else:  # a small CNN on the 8x8 digits
            layers = [nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 8, 3, padding=1, **f64), nn.Tanh(), nn.MaxPool2d(2),
                      nn.Flatten(), nn.Linear(8 * 16, 10, **f64)]
        return nn.Sequential(*layers)


class ReplayNet(L.LightningModule):
    """Digits classifier trained with ``setting`` (optimizer, per-step schedule); mean cross-entropy."""

    def __init__(self, setting: dict[str, Any], total_steps: int, seed: int = 0, dropout: float = 0.0) -> None:
        super().__init__()
        self.setting, self.total_steps = setting, total_steps
        self.net = make_net(setting.get("net", "mlp"), seed, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = F.cross_entropy(self(batch["x"]), batch["y"])
        self.log("train_loss", loss)
        return loss

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if "momentum_off" in self.setting:  # those steps without momentum (torch keeps the buffer meanwhile)
            off = self.global_step in self.setting["momentum_off"]
            self.trainer.optimizers[0].param_groups[0]["momentum"] = 0.0 if off else self.setting["momentum"]

    def configure_optimizers(self) -> Any:
        optimizer = make_optimizer(self.parameters(), self.setting)
        if self.setting.get("schedule") is None:
            return optimizer
        scheduler = make_scheduler(optimizer, self.setting, self.total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def fit_setting(root: Path, setting: dict[str, Any], dataset: DigitsDataset, epochs: int, batch: int,
                loader_seed: int = 1, **dve_kwargs: Any) -> tuple[ReplayNet, DataValueEmbedding, nn.Module]:
    """Train with the callback; returns the trained module, the callback and a copy of the initial net."""
    loader = make_loader(dataset, batch, seed=loader_seed)
    module = ReplayNet(setting, epochs * len(loader))
    initial = copy.deepcopy(module.net)
    dve_kwargs.setdefault("projection_dim", 64)
    dve = DataValueEmbedding(root, report=None, **dve_kwargs)
    clip = {"gradient_clip_val": setting["clip"], "gradient_clip_algorithm": setting.get("clip_algorithm", "norm")} \
        if "clip" in setting else {}
    make_trainer(epochs, callbacks=[dve], **clip).fit(module, loader)
    return module, dve, initial


def _clip(grads: list[torch.Tensor], setting: dict[str, Any]) -> list[torch.Tensor]:
    if "clip" not in setting:
        return grads
    if setting.get("clip_algorithm") == "value":
        return [g.clamp(-setting["clip"], setting["clip"]) for g in grads]
    norm = torch.sqrt(sum((g * g).sum() for g in grads))
    return [g * torch.clamp(setting["clip"] / (norm + 1e-6), max=1.0) for g in grads]


def _oracle_step(p: torch.Tensor, g: torch.Tensor, s: dict, h: dict[str, Any], kind: str, lr: float) -> torch.Tensor:
    """The optimizers' math as written in their papers / torch docs (independent of ``replay_optim``); a coordinate
    whose ``v`` is still 0 (no gradient yet) is held in the derivative, as the replay defines its first order."""
    wd = h.get("weight_decay", 0.0)
    if kind == "sgd":
        mu, tau = h.get("momentum", 0.0), h.get("dampening", 0.0)
        g = g + wd * p
        if mu:
            s["b"] = g if "b" not in s else mu * s["b"] + (1 - tau) * g
            g = g + mu * s["b"] if h.get("nesterov") else s["b"]
        return p - lr * g
    beta1, beta2 = h.get("betas", (0.9, 0.999))
    s["k"] = s.get("k", 0) + 1
    if kind == "adamw":
        p = p * (1 - lr * wd)
    elif wd:
        g = g + wd * p
    s["m"] = beta1 * s.get("m", 0) + (1 - beta1) * g
    s["v"] = beta2 * s.get("v", 0) + (1 - beta2) * g * g
    m_hat, v_hat = s["m"] / (1 - beta1 ** s["k"]), s["v"] / (1 - beta2 ** s["k"])
    sqrt_v = torch.where(v_hat > 0, v_hat.clamp_min(torch.finfo(v_hat.dtype).tiny).sqrt(), torch.zeros_like(v_hat))
    m_hat = torch.where(v_hat > 0, m_hat, m_hat.detach())  # (its slope there would be 1 / eps)
    return p - lr * m_hat / (sqrt_v + h.get("eps", 1e-8))


def unrolled_first_order(net: nn.Module, batches: list, setting: dict[str, Any], test: dict
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(-W dL/dW [n_test, m], final params)`` by one differentiable float64 graph over the whole run."""
    return unrolled_steps(net, [[batch] for batch in batches], setting, test, lambda b: 1.0 / len(b["y"]))


def unrolled_steps(net: nn.Module, steps: list[list[dict]], setting: dict[str, Any], test: dict,
                   own_weights: Callable[[dict], Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`unrolled_first_order` over steps of micro-batches, each with its own forward (as training ran them):
    the gradient of a step is ``sum_b sum_z own_weights(b)_z grad l_z / n`` over its ``n`` micro-batches."""
    params = {k: v.detach().clone().requires_grad_(True) for k, v in net.named_parameters()}
    weights = [[(torch.zeros(len(b["y"]), dtype=torch.float64) + torch.as_tensor(own_weights(b)) / len(micro))
                .requires_grad_(True) for b in micro] for micro in steps]
    state: dict[str, dict] = {k: {} for k in params}
    hyper = {k: v for k, v in setting.items()
             if k not in ("optimizer", "lr", "schedule", "clip", "net", "clip_algorithm", "momentum_off")}
    current = dict(params)
    for t, micro in enumerate(steps):
        h = {**hyper, "momentum": 0.0} if t in setting.get("momentum_off", ()) else hyper
        total = sum((w * F.cross_entropy(functional_call(net, current, (b["x"],)), b["y"], reduction="none")).sum()
                    for w, b in zip(weights[t], micro))
        grads = _clip(list(torch.autograd.grad(total, list(current.values()), create_graph=True)), setting)
        lr = setting["lr"] * lr_factor(setting, t, len(steps))
        current = {k: _oracle_step(current[k], g, state[k], h, setting["optimizer"], lr)
                   for k, g in zip(current, grads)}
    test_losses = F.cross_entropy(functional_call(net, current, (test["x"],)), test["y"], reduction="none")
    flat = [w for micro in weights for w in micro]
    rows = []
    for i in range(len(test_losses)):
        dw = torch.autograd.grad(test_losses[i], flat, retain_graph=True)
        rows.append(torch.cat([-w.detach() * d for w, d in zip(flat, dw)]))
    return torch.stack(rows), {k: v.detach() for k, v in current.items()}


def tsloo_by_training(net: nn.Module, batches: list, setting: dict[str, Any], occurrences: list, test: dict
                      ) -> torch.Tensor:
    """Exact TSLOO ``[n_test, m]``: training with torch.optim, its scheduler and clipping, one term dropped.

    The base run saves model, optimizer and scheduler state before every step; a counterfactual for step ``t``
    starts from deep copies of them (``load_state_dict`` would alias the saved tensors)."""
    total = len(batches)

    def run(model: nn.Module, optimizer: Any, scheduler: Any, start: int, remove: tuple[int, int] | None,
            saves: list | None) -> torch.Tensor:
        for t in range(start, total):
            if saves is not None:
                saves.append(copy.deepcopy((model.state_dict(), optimizer.state_dict(), scheduler.state_dict())))
            batch = batches[t]
            losses = F.cross_entropy(model(batch["x"]), batch["y"], reduction="none") / len(batch["y"])
            if remove is not None and remove[0] == t:
                losses = losses * (torch.arange(len(losses)) != remove[1])
            optimizer.zero_grad()
            losses.sum().backward()
            if "clip" in setting:
                if setting.get("clip_algorithm") == "value":
                    torch.nn.utils.clip_grad_value_(model.parameters(), setting["clip"])
                else:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), setting["clip"])
            optimizer.step()
            scheduler.step()
        with torch.no_grad():
            return F.cross_entropy(model(test["x"]), test["y"], reduction="none")

    def fresh() -> tuple[nn.Module, Any, Any]:
        model = copy.deepcopy(net)
        optimizer = make_optimizer(model.parameters(), setting)
        return model, optimizer, make_scheduler(optimizer, setting, total)

    saves: list = []
    base = run(*fresh(), 0, None, saves)
    columns = []
    for step, position in occurrences:
        model, optimizer, scheduler = fresh()
        model_state, optimizer_state, scheduler_state = copy.deepcopy(saves[step])
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)
        scheduler.load_state_dict(scheduler_state)
        columns.append(run(model, optimizer, scheduler, step, (step, position), None) - base)
    return torch.stack(columns, dim=1)


# --- functional optimizers --------------------------------------------------------------------------------

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
    "sgd momentum dampening decay": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.2, weight_decay=0.01),
    "sgd nesterov": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
    "sgd maximize": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.5, maximize=True),
    "sgd momentum off and on": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),  # off at steps 5-9 (the test)
    "adam l2": lambda p: torch.optim.Adam(p, lr=1e-2, betas=(0.8, 0.99), weight_decay=0.01),
    "adamw": lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.01),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_functional_optimizers_reproduce_torch(name: str, dtype: torch.dtype) -> None:
    """Same values and state as torch.optim over 15 steps, with a parameter row that never gets gradient (Adam's
    v = 0) and a second parameter skipped (no gradient) at some steps, as torch skips it; and momentum turned off
    for some steps, where torch keeps the buffer for when it is on again (the replay dropped it: a KeyError in
    exact_influence, found by an audit)."""
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(4, 3, generator=g, dtype=dtype, requires_grad=True),
              torch.randn(5, generator=g, dtype=dtype, requires_grad=True)]
    optimizer = OPTIMIZERS[name](params)
    kind = replay_optim.optimizer_kind(optimizer)
    mine = [p.detach().clone() for p in params]
    states: list[dict] = [{}, {}]
    for step in range(15):
        grads = [torch.randn(4, 3, generator=g, dtype=dtype), torch.randn(5, generator=g, dtype=dtype)]
        grads[0][0] = 0
        grads[1] = None if step % 4 == 1 else grads[1]
        if name == "sgd momentum off and on":
            optimizer.param_groups[0]["momentum"] = 0.0 if 5 <= step < 10 else 0.9
        hyper = replay_optim.group_hyperparameters(optimizer, kind)[0]
        for p, grad in zip(params, grads):
            p.grad = None if grad is None else grad.clone()
        optimizer.step()
        for i, grad in enumerate(grads):
            mine[i], states[i] = replay_optim.update(kind, mine[i], grad, states[i], hyper)
        assert [set(state) for state in states] == [set(optimizer.state[p]) for p in params], step
    for p, m in zip(params, mine):
        torch.testing.assert_close(m, p.detach(), rtol=0, atol=0)


@pytest.mark.parametrize(("algorithm", "value"), [("norm", 0.5), ("norm", 100.0), ("value", 0.1)])
def test_clipping_matches_torch(algorithm: str, value: float) -> None:
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(7, generator=g, dtype=torch.float64)]
    params = [torch.zeros_like(x, requires_grad=True) for x in grads]
    for p, x in zip(params, grads):
        p.grad = x.clone()
    if algorithm == "norm":
        torch.nn.utils.clip_grad_norm_(params, value)
    else:
        torch.nn.utils.clip_grad_value_(params, value)
    for p, mine in zip(params, replay_optim.clip_gradients([*grads, None][:2], value, algorithm)):
        torch.testing.assert_close(mine, p.grad, rtol=1e-15, atol=0)


@pytest.mark.parametrize("make", [lambda p: torch.optim.RMSprop(p), lambda p: torch.optim.Adam(p, amsgrad=True)])
def test_unmodelled_optimizers_are_refused(make) -> None:
    with pytest.raises(UnsupportedError, match="RMSprop|amsgrad=True"):
        replay_optim.optimizer_kind(make([torch.zeros(2, requires_grad=True)]))


# --- reverse mode against the unrolled oracle ------------------------------------------------------------

SETTINGS = {
    "sgd": {"optimizer": "sgd", "lr": 0.3},
    "sgd momentum dampening decay": {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "dampening": 0.1,
                                     "weight_decay": 0.01},
    "sgd nesterov": {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True},
    # off, then on again with the buffer torch kept (the replay dropped it: a KeyError, found by an audit)
    "sgd momentum off at steps 2-3": {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "momentum_off": (2, 3)},
    "adam l2": {"optimizer": "adam", "lr": 1e-2, "weight_decay": 1e-3},
    "adamw cosine warm-up": {"optimizer": "adamw", "lr": 3e-3, "weight_decay": 0.01, "schedule": "cosine"},
    "sgd clip norm": {"optimizer": "sgd", "lr": 0.3, "clip": 0.3},
    "sgd momentum clip value": {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "clip": 0.02,
                                "clip_algorithm": "value"},
    "cnn adamw": {"optimizer": "adamw", "lr": 3e-3, "weight_decay": 0.01, "net": "cnn"},
}


def per_sample_loss(m: nn.Module, batch: dict) -> torch.Tensor:
    """The digits models' per-sample training loss (a batched ``train_loss_fn``)."""
    return F.cross_entropy(m(batch["x"]), batch["y"], reduction="none")


@pytest.fixture(scope="module")
def small_data() -> tuple[DigitsDataset, dict]:
    train, test = split_indices(48, 5, seed=2)
    return DigitsDataset(train), DigitsDataset(test).batch()


def _small_fit(tmp_path: Path, small_data, setting: dict[str, Any], **kwargs: Any):
    dataset, test = small_data
    module, dve, initial = fit_setting(tmp_path / "dve", setting, dataset, epochs=2, batch=16, **kwargs)
    return module, dve, initial, epoch_batches(make_loader(dataset, 16, seed=1), 2), test


@pytest.mark.parametrize("name", list(SETTINGS))
def test_exact_influence_equals_the_unrolled_first_order_oracle(tmp_path: Path, small_data, name: str,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """6 steps (48 digits, batch 16, 2 epochs), a checkpoint every 4 steps: relative error < 1e-9 in float64. Steps
    0-3 are read from a pack (step_files), 4-5 from their own files."""
    monkeypatch.setattr(step_files, "PACK_STEPS", 4)
    module, dve, initial, batches, test = _small_fit(tmp_path, small_data, SETTINGS[name], checkpoint_interval=4)
    assert (tmp_path / "dve" / "steps" / "pack_00000000_00000003.safetensors").is_file()
    expected, final = unrolled_first_order(initial, batches, SETTINGS[name], test)
    for key, value in final.items():  # the oracle's copy of the optimizer is the run the Trainer made
        torch.testing.assert_close(value, dict(module.net.named_parameters())[key].detach(), rtol=1e-10, atol=1e-12)
    result = dve.embeddings.exact_influence(module, test, per_step=True)
    assert torch.equal(result.sample_ids, torch.cat([b["index"] for b in batches]))
    error = float((result.scores - expected).abs().max() / expected.abs().max())
    assert error < 1e-9, error
    cost = dve.embeddings.replay_cost
    assert cost.steps == 6 and cost.forward_steps == 6 and cost.per_sample_forwards and cost.relative > 0


@pytest.mark.parametrize("name", ["sgd momentum dampening decay", "adamw cosine warm-up", "sgd clip norm",
                                  "sgd momentum clip value"])
@pytest.mark.parametrize("per_chunk", [1, 3])
def test_a_step_carried_back_in_chunks_of_samples_equals_the_unrolled_first_order_oracle(
        tmp_path: Path, small_data, name: str, per_chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model whose per-sample gradient graphs pass ``SAMPLE_GRAPH_BYTES`` is carried back a few samples at a time,
    through the update's gradient as a leaf (clipping and Adam's normalisation act on the whole step's gradient):
    the same oracle and bound as one double backward over the whole batch."""
    module, dve, initial, batches, test = _small_fit(tmp_path, small_data, SETTINGS[name])
    size = sum(p.numel() * p.element_size() for p in module.parameters())
    monkeypatch.setattr(replay, "SAMPLE_GRAPH_BYTES", per_chunk * 2 * size)
    chunked = []
    carry = replay.Replayer._carry_in_chunks
    monkeypatch.setattr(replay.Replayer, "_carry_in_chunks",
                        lambda self, *args: chunked.append(len(args[-1])) or carry(self, *args))
    expected, _ = unrolled_first_order(initial, batches, SETTINGS[name], test)
    result = dve.embeddings.exact_influence(module, test, per_step=True)
    assert chunked == [-(-16 // per_chunk)] * 6  # every step, in chunks of per_chunk of its 16 samples
    error = float((result.scores - expected).abs().max() / expected.abs().max())
    assert error < 1e-9, error


def test_train_loss_fn_and_sqrt_segments_give_the_same_scores(tmp_path: Path, small_data, monkeypatch) -> None:
    setting = SETTINGS["sgd momentum dampening decay"]
    module, dve, _, _, test = _small_fit(tmp_path, small_data, setting, checkpoint_interval=None)
    module2, dve2, _, _, _ = _small_fit(tmp_path / "b", small_data, setting, checkpoint_interval=6)
    with pytest.raises(ConfigError, match=r"recorded with checkpoint_interval=None .* checkpoint_interval='auto'"):
        dve.embeddings.exact_influence(module, test)
    base = dve2.embeddings.exact_influence(module2, test)

    fast = dve2.embeddings.exact_influence(module2, test, train_loss_fn=per_sample_loss, loss_fn=per_sample_loss)
    assert not dve2.embeddings.replay_cost.per_sample_forwards
    torch.testing.assert_close(fast.scores, base.scores, rtol=1e-10, atol=1e-14)
    monkeypatch.setattr(replay, "MAX_STATES_IN_MEMORY", 2)  # 6 steps: 2 stretches of 3, each replayed as 2 + 1
    chunked = dve2.embeddings.exact_influence(module2, test)
    assert dve2.embeddings.replay_cost.forward_steps == 12
    torch.testing.assert_close(chunked.scores, base.scores, rtol=1e-12, atol=1e-15)
    assert torch.equal(base.steps, torch.full_like(base.sample_ids, -1))
    mean = dve2.embeddings.exact_influence(module2, test, loss_fn=lambda m, b: per_sample_loss(m, b).mean()[None])
    torch.testing.assert_close(mean.scores[0], base.scores.mean(0), rtol=1e-10, atol=1e-14)  # any targets: a mean


def test_a_segment_in_little_memory_keeps_two_states_per_level_and_gives_the_same_scores(
        tmp_path: Path, small_data, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the available memory holds only two of a segment's states (parameters and AdamW's moments), the
    6-step segment is replayed in three levels of at most two kept states each: 12 forward steps instead of 6,
    the scores of the replay that kept every state."""
    module, dve, _, _, test = _small_fit(tmp_path, small_data, SETTINGS["adamw cosine warm-up"],
                                         checkpoint_interval=6)
    base = dve.embeddings.exact_influence(module, test, per_step=True)
    assert dve.embeddings.replay_cost.forward_steps == 6
    size = sum(3 * p.numel() * p.element_size() for p in module.parameters())  # weights, m and v
    monkeypatch.setattr(replay, "available_bytes", lambda device: int(2 * size / replay.STATES_SHARE))
    held, sweep = [], replay._sweep
    monkeypatch.setattr(replay, "_sweep", lambda *args, **kw: (lambda out: held.append(len(out[0])) or out)(
        sweep(*args, **kw)))
    little = dve.embeddings.exact_influence(module, test, per_step=True)
    assert dve.embeddings.replay_cost.forward_steps == 12 and max(held) == 2
    torch.testing.assert_close(little.scores, base.scores, rtol=1e-12, atol=1e-15)


def test_states_per_level_fit_the_memory_over_the_levels_a_segment_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    """``keep`` states per level over the ``d`` levels with ``keep ** d >= steps``, all ``d * keep`` within the
    share of memory; every state when they fit; never fewer than 2."""
    state = ({"w": torch.zeros(256)}, {"w": {"step": torch.tensor(3.0), "exp_avg": torch.zeros(256)}})
    assert replay.state_bytes(state) == 2048
    cpu = torch.device("cpu")
    for states, steps, keep in ((1000, 40, 64), (1000, 100, 64), (64, 100, 32), (10, 100, 2), (1, 5, 2), (10, 9, 10)):
        monkeypatch.setattr(replay, "available_bytes", lambda device: int(states * 2048 / replay.STATES_SHARE))
        assert replay.states_per_level(2048, steps, cpu) == keep, (states, steps)
    monkeypatch.setattr(replay, "available_bytes", lambda device: None)  # unknown: the most
    assert replay.states_per_level(2048, 1000, cpu) == replay.MAX_STATES_IN_MEMORY


def test_the_auto_interval_of_a_small_model_gives_the_scores_of_short_segments(tmp_path: Path, small_data) -> None:
    """Oracle: the same replay over checkpoints every 2 steps. ``"auto"`` makes the small model's 6 steps one segment
    (the free length, 64 steps): the same scores and forward steps, from 2 snapshots instead of 4."""
    setting = SETTINGS["adam l2"]
    module, dve, _, _, test = _small_fit(tmp_path / "auto", small_data, setting, projection_dim=None)
    module2, dve2, _, _, _ = _small_fit(tmp_path / "two", small_data, setting, projection_dim=None,
                                        checkpoint_interval=2)
    auto = CheckpointStore.open(tmp_path / "auto" / "dve" / "checkpoints")
    assert auto.manifest["interval"] == SEGMENT_STATES and auto.snapshot_steps == [0, 6]
    assert CheckpointStore.open(tmp_path / "two" / "dve" / "checkpoints").snapshot_steps == [0, 2, 4, 6]
    one_segment = dve.embeddings.exact_influence(module, test, per_step=True)
    assert dve.embeddings.replay_cost.forward_steps == 6
    short_segments = dve2.embeddings.exact_influence(module2, test, per_step=True)
    assert dve2.embeddings.replay_cost.forward_steps == 6
    assert torch.equal(one_segment.sample_ids, short_segments.sample_ids)
    torch.testing.assert_close(one_segment.scores, short_segments.scores, rtol=1e-12, atol=1e-15)


def test_after_load_the_dataset_is_required_and_enough(tmp_path: Path, small_data) -> None:
    module, dve, _, _, test = _small_fit(tmp_path, small_data, SETTINGS["sgd"])
    expected = dve.embeddings.exact_influence(module, test, per_step=True).scores
    loaded = DataValueEmbeddings.load(tmp_path / "dve")
    with pytest.raises(ConfigError, match="needs the training dataset .* pass dataset="):
        loaded.exact_influence(module, test)
    got = loaded.exact_influence(module, test, per_step=True, dataset=small_data[0])  # ids mapped by a scan
    torch.testing.assert_close(got.scores, expected, rtol=0, atol=0)


def test_after_load_float32_data_is_converted_as_64_true_training_did(tmp_path: Path, small_data) -> None:
    """Training at ``precision="64-true"`` converts float32 batches to float64; a replay after ``load`` (no trainer
    to ask) applies the recorded precision's conversion too."""
    dataset = DigitsDataset(small_data[0].indices.tolist(), dtype=torch.float32)
    module, dve, _ = fit_setting(tmp_path / "dve", SETTINGS["sgd"], dataset, epochs=1, batch=16)
    expected = dve.embeddings.exact_influence(module, small_data[1]).scores
    got = DataValueEmbeddings.load(tmp_path / "dve").exact_influence(module, small_data[1], dataset=dataset)
    torch.testing.assert_close(got.scores, expected, rtol=0, atol=0)


def test_auto_interval_and_checkpoint_files(tmp_path: Path, small_data) -> None:
    module, dve, _, _, _ = _small_fit(tmp_path, small_data, SETTINGS["adam l2"], projection_dim=None)
    checkpoints = CheckpointStore.open(tmp_path / "dve" / "checkpoints")
    manifest = checkpoints.manifest
    step_bytes = dve.embeddings.store.manifest["bytes_per_step"]
    params = sum(p.numel() * 8 for p in module.parameters())
    assert manifest["interval"] == auto_interval(3 * params, step_bytes) == max(
        SEGMENT_STATES, math.ceil(3 * params / (0.1 * step_bytes)))  # a small model: one segment of 64 steps
    assert checkpoints.snapshot_steps == sorted({0, 6, *range(0, 6, manifest["interval"])})
    assert manifest["final_step"] == 6 and manifest["kind"] == "Adam" and manifest["state_tensors"] == 2
    _, state = checkpoints.read_snapshot(6)
    assert set(state["net.0.weight"]) == {"exp_avg", "exp_avg_sq", "step"}
    assert auto_interval(10, 1000) == SEGMENT_STATES and auto_interval(1000, 10) == 1000


def test_resume_drops_later_checkpoints(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    store = CheckpointStore.create(root, {"settings_hash": "h", "interval": 2, "final_step": 9})
    for step in (0, 2, 4):
        store.write_snapshot(step, {"w": torch.ones(2)}, {})
        store.write_hyper(step, {"groups": [{"lr": step}]})
    store.close()
    reopened = CheckpointStore.reopen(root, last_step=2)
    assert reopened.snapshot_steps == [0, 2, 4]  # nothing changes until the resumed run writes
    reopened.write_manifest()
    assert reopened.snapshot_steps == [0, 2] and reopened.manifest["final_step"] is None
    assert [reopened.read_hyper(step)["groups"] for step in (0, 2)] == [[{"lr": 0}], [{"lr": 2}]]
    with pytest.raises(StoreError, match="hyperparameters of step 4 were not recorded"):
        reopened.read_hyper(4)
    assert [json.loads(line)["step"] for line in (root / "hyper.jsonl").read_text().splitlines()] == [0, 2]


# --- refusals -------------------------------------------------------------------------------------------


class NoisyDigits(DigitsDataset):
    """A random transform: every read adds fresh noise."""

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = super().__getitem__(i)
        return {**item, "x": item["x"] + 0.01 * torch.randn_like(item["x"])}


class StreamOfDigits(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter(())


def test_targets_carried_back_in_groups_by_their_bytes_give_the_scores_of_one_group(
        tmp_path: Path, small_data, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model whose adjoint rows (weights and AdamW's two moments) pass ``VJP_BYTES`` carries its targets back in
    groups, down to one row at a time (faster and lighter on larger models: ``benchmarks/replay_memory.py``). Oracle:
    the same replay with all 5 targets in one batched product; equal to round-off, per step."""
    module, dve, _, _, test = _small_fit(tmp_path, small_data, SETTINGS["adamw cosine warm-up"])
    row = sum(3 * p.numel() * p.element_size() for p in module.parameters())
    assert replay_vjp.vjp_rows([torch.zeros(5, row // 8, dtype=torch.float64)]) == min(
        replay_vjp.VJP_ROWS, replay_vjp.VJP_BYTES // row)
    one_group = dve.embeddings.exact_influence(module, test, per_step=True)
    for group in (1, 2):
        monkeypatch.setattr(replay_vjp, "VJP_BYTES", group * row)
        grouped = dve.embeddings.exact_influence(module, test, per_step=True)
        torch.testing.assert_close(grouped.scores, one_group.scores, rtol=1e-12, atol=1e-15)
    assert replay_vjp.vjp_rows([torch.zeros(5, 2 * replay_vjp.VJP_BYTES)]) == 1


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, small_data):
    """One finished SGD recording to query (copy ``root`` before damaging it)."""
    root = tmp_path_factory.mktemp("recorded") / "dve"
    module, dve, _ = fit_setting(root, SETTINGS["sgd"], small_data[0], epochs=2, batch=16)
    return root, module, dve


def test_a_replay_expected_to_pass_the_available_memory_is_warned_about_naming_the_lighter_way(
        recorded, small_data, monkeypatch: pytest.MonkeyPatch) -> None:
    """The estimate (benchmarks/replay_memory.py's scaling: the weights' bytes times 16 + 5 n with a train_loss_fn,
    and 1.5 + 1.5 n more per sample of a chunk through training_step; here the whole step of 16 samples is one chunk)
    against a device that has less: a warning naming train_loss_fn and the two sizes; none where the memory is
    there, and the scores are the same."""
    _, module, dve = recorded
    test = small_data[1]
    weights = sum(p.numel() * p.element_size() for p in module.parameters())
    lighter = weights * (16 + 5 * 5)
    need = lighter + 16 * weights * (3 + 3 * 5) // 2
    assert influence_replay.available_bytes(torch.device("cpu")) > 2**20  # /proc/meminfo's MemAvailable

    monkeypatch.setattr(influence_replay, "available_bytes", lambda device: need)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exactly enough: no warning
        base = dve.embeddings.exact_influence(module, test)
    monkeypatch.setattr(influence_replay, "available_bytes", lambda device: need - 1)
    with pytest.warns(UserWarning, match=rf"about {need / 2**30:.1f} GiB of cpu memory for 5 test point.*batches of "
                      rf"up to 16 samples.*pass train_loss_fn=.*about {lighter / 2**30:.1f} GiB"):
        warned = dve.embeddings.exact_influence(module, test)
    torch.testing.assert_close(warned.scores, base.scores, rtol=0, atol=0)
    monkeypatch.setattr(influence_replay, "available_bytes", lambda device: lighter - 1)
    with pytest.warns(UserWarning, match=r"GiB are available: query fewer test points") as seen:
        dve.embeddings.exact_influence(module, test, train_loss_fn=per_sample_loss)
    assert "pass train_loss_fn" not in str(seen[0].message)
    monkeypatch.setattr(replay, "SAMPLE_GRAPH_BYTES", 2 * 2 * weights)  # a larger model: chunks of 2 samples
    monkeypatch.setattr(influence_replay, "available_bytes", lambda device: lighter + 2 * weights * (3 + 3 * 5) // 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        chunked = dve.embeddings.exact_influence(module, test)
    torch.testing.assert_close(chunked.scores, base.scores, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("name, moments", [("sgd", 0), ("sgd nesterov", 1), ("adam l2", 2)])
def test_the_memory_estimate_counts_the_optimizers_moments(tmp_path: Path, small_data, name: str, moments: int,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The replay holds more per weight with optimizer state to carry (benchmarks/replay_memory.py --optimizer:
    about 3x under AdamW): the estimate reads the recorded optimizer's moments and uses their row of the table."""
    module, dve, _, _, test = _small_fit(tmp_path, small_data, SETTINGS[name])
    assert influence_replay.optimizer_moments(dve.embeddings._replayer(module, None, None, None, None)) == moments
    base, per_target = influence_replay.REPLAY_MEMORY[moments]
    need = sum(p.numel() * p.element_size() for p in module.parameters()) * (base + per_target * 5)

    monkeypatch.setattr(influence_replay, "available_bytes", lambda device: need)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dve.embeddings.exact_influence(module, test, train_loss_fn=per_sample_loss)
    monkeypatch.setattr(influence_replay, "available_bytes", lambda device: need - 1)
    with pytest.warns(UserWarning, match=rf"about {need / 2**30:.1f} GiB of cpu memory for 5 test point"):
        dve.embeddings.exact_influence(module, test, train_loss_fn=per_sample_loss)


def _damaged(recorded, tmp_path: Path) -> tuple[Path, DataValueEmbeddings]:
    import shutil

    root = tmp_path / "dve"
    shutil.copytree(recorded[0], root)
    return root, DataValueEmbeddings.load(root)


def test_refuses_random_transforms_and_non_indexable_datasets(recorded, small_data) -> None:
    _, module, dve = recorded
    test = small_data[1]
    with pytest.raises(UnsupportedError, match=r"dataset\[\d+\] differs between two reads .* random transform"):
        dve.embeddings.exact_influence(module, test, dataset=NoisyDigits(small_data[0].indices.tolist()))
    with pytest.raises(UnsupportedError, match="StreamOfDigits.* is not indexable"):
        dve.embeddings.exact_influence(module, test, dataset=StreamOfDigits())


def test_refuses_a_dataset_that_is_not_training_s(recorded, small_data) -> None:
    _, module, dve = recorded
    scaled = DigitsDataset(small_data[0].indices.tolist())
    scaled.x = scaled.x * 1.01  # deterministic, same ids, other values: the replay leaves the checkpoints
    with pytest.raises(UnsupportedError, match=r"does not reproduce the parameters checkpointed .*\(relative "
                                               r"deviation .* Exact replay is refused"):
        dve.embeddings.exact_influence(module, small_data[1], dataset=scaled)
    with pytest.raises(ConfigError, match=r"sample ids \[.*\] are not in the dataset"):
        dve.embeddings.exact_influence(module, small_data[1], dataset=DigitsDataset(range(1700, 1710)))


def test_refuses_a_loss_that_depends_on_batch_idx_naming_it(fit, mlp_cls, save_dir, test_batch) -> None:
    """A ``training_step`` that weighs odd batches double: the replay cannot know ``batch_idx``, and says so."""
    class OddBatchesDouble(mlp_cls):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx) * (1 + batch_idx % 2)

    model, dve = OddBatchesDouble(), DataValueEmbedding(save_dir, projection_dim=16, report=None)
    fit(model, dve, precision="64-true")
    with pytest.raises(UnsupportedError, match=r"does not reproduce the parameters .* a loss whose value or gradient "
                                               r"depends on batch_idx, which the replay passes as 0"):
        dve.embeddings.exact_influence(model, {**test_batch, "x": test_batch["x"].double()})


def test_a_collate_fn_that_reorders_the_batch_maps_ids_to_their_own_samples(tmp_path: Path, small_data) -> None:
    """A ``collate_fn`` that sorts each batch (here by label, as one sorts sequences by length) and ids that are not
    positions: the replay finds each id's dataset position from that item alone. It read the ids of collated chunks
    against the chunk's input order, so with full-batch steps (the same set, the checkpoints still reproduced) every
    score went to another id, silently; it equals the default collate's run."""
    dataset, test = small_data

    def sort_by_label(items: list[dict]) -> dict:
        return torch.utils.data.default_collate(sorted(items, key=lambda item: int(item["y"])))

    scores = []
    for name, collate in (("default", None), ("sorted", sort_by_label)):
        loader = torch.utils.data.DataLoader(dataset, batch_size=len(dataset), collate_fn=collate)
        module = ReplayNet(SETTINGS["sgd"], 3)
        dve = DataValueEmbedding(tmp_path / name, report=None, projection_dim=16)
        make_trainer(3, callbacks=[dve]).fit(module, loader)
        result = dve.embeddings.exact_influence(module, test)
        scores.append((result.sample_ids, result.scores))
    (ids, expected), (sorted_ids, got) = scores
    assert torch.equal(ids, sorted_ids) and not torch.equal(ids, torch.arange(len(ids)))
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-12)


class DigitAttention(L.LightningModule):
    """Each digit as 8 tokens of 8 pixels, one causal self-attention layer (2 heads) from ``nn.Linear`` q/k/v, a
    linear head; attention through ``F.scaled_dot_product_attention`` (``fused``) or written out."""

    def __init__(self, fused: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(64, 10)
        self.fused = fused

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = batch["x"].reshape(-1, 8, 8)
        q, k, v = (layer(x).unflatten(-1, (2, 4)).transpose(1, 2) for layer in (self.q, self.k, self.v))  # 2 heads
        if self.fused:
            h = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            causal = torch.ones(8, 8, dtype=torch.bool).tril()
            h = torch.softmax((q @ k.transpose(-1, -2) / 2).masked_fill(~causal, -math.inf), dim=-1) @ v
        return F.cross_entropy(self.head(h.transpose(1, 2).flatten(1)), batch["y"])

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def test_scaled_dot_product_attention_is_replayed_through_its_math_kernel(tmp_path: Path, small_data) -> None:
    """The fused CPU kernel of ``F.scaled_dot_product_attention`` has no double backward, which the replay takes
    (torch's RuntimeError, and a failed fit with ``embeddings="replay"``); the replay runs its math kernel, and
    equals the same attention written out."""
    dataset, test = small_data
    results = {}
    for fused in (True, False):
        module = DigitAttention(fused)
        dve = DataValueEmbedding(tmp_path / str(fused), report=None, projection_dim=16, embeddings="replay")
        make_trainer(1, callbacks=[dve]).fit(module, make_loader(dataset, 16, seed=1))
        assert dve.embeddings.store.manifest["embeddings_source"] == "replay"
        results[fused] = (dve.embeddings.exact_influence(module, test).scores,
                          dve.embeddings.influence(module, test).scores)
    for fused, written_out in zip(results[True], results[False], strict=True):
        torch.testing.assert_close(fused, written_out, rtol=1e-8, atol=1e-12)


def test_refuses_a_module_that_is_not_the_final_one(recorded, small_data) -> None:
    _, module, dve = recorded
    other = copy.deepcopy(module)
    with torch.no_grad():
        other.net[0].weight.add_(0.01)
    with pytest.raises(ConfigError, match="differ from those recorded at the end of training"):
        dve.embeddings.exact_influence(other, small_data[1])
    with pytest.raises(ConfigError, match=r"has no parameters \['net.0.bias', 'net.0.weight'"):
        dve.embeddings.exact_influence(nn.Sequential(nn.Linear(2, 2)), small_data[1], loss_fn=lambda m, b: b)


def test_refuses_bad_loss_functions(recorded, small_data) -> None:
    _, module, dve = recorded
    test = small_data[1]
    with pytest.raises(ConfigError, match=r"train_loss_fn must return per-sample losses as a 1-D Tensor\[16\]"):
        dve.embeddings.exact_influence(module, test, train_loss_fn=lambda m, b: m(b["x"]).sum())
    with pytest.raises(ConfigError, match="the test loss must be per-sample, a 1-D Tensor"):
        dve.embeddings.exact_influence(module, test, loss_fn=lambda m, b: m(b["x"]).sum())
    vector_step = type("VectorLoss", (nn.Module,), {"training_step": lambda self, batch, i: torch.ones(2)})()
    with pytest.raises(ConfigError, match="did not return a scalar loss on a one-sample batch"):
        step_loss_terms(vector_step, [{}], None, None)
    with pytest.raises(ConfigError, match="cannot split the test batch"):
        split_batch({"name": "a"})


def test_refuses_a_replay_that_turns_nan_with_the_cause(recorded, small_data) -> None:
    _, module, dve = recorded
    with pytest.raises(UnsupportedError, match=r"gives NaN parameters before step \d+: a replayed loss .* not finite"):
        dve.embeddings.exact_influence(module, small_data[1], train_loss_fn=lambda m, b: m(b["x"]).sum(1) * math.nan)


class WeightedDigits(torch.utils.data.Dataset):
    """Digits ``0..n-1`` with a loss weight ``w``: 0 where ``absent(i)``, else 1."""

    def __init__(self, n: int, absent: Callable[[int], bool]) -> None:
        self.base, self.absent = DigitsDataset(range(n)), absent

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {**self.base[i], "w": torch.tensor(0.0 if self.absent(i) else 1.0, dtype=torch.float64)}


class WeightedMLP(L.LightningModule):
    """``sum_i w_i l_i / B`` in ``training_step`` (declared as ``loss_reduction=w / B``), SGD with ``options``."""

    def __init__(self, **options: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 10)).double()
        self.options = options

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        losses = F.cross_entropy(self.net(batch["x"]), batch["y"], reduction="none")
        return (batch["w"] * losses).sum() / len(losses)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, **self.options)


def weighted_replays(tmp_path: Path, data: WeightedDigits, module: WeightedMLP, **trainer_kwargs: Any):
    """Fit ``module`` on ``data``; exact replay through ``training_step`` and through per-sample losses."""
    dve = DataValueEmbedding(tmp_path / "dve", projection_dim=None, report=None,
                             loss_reduction=lambda b: b["w"] / len(b["w"]))
    make_trainer(1, [dve], **trainer_kwargs).fit(module, torch.utils.data.DataLoader(data, batch_size=16))
    test = DigitsDataset(range(1500, 1504)).batch()
    per_sample = lambda m, b: F.cross_entropy(m.net(b["x"]), b["y"], reduction="none")  # noqa: E731
    replayed = dve.embeddings.exact_influence(module, test, loss_fn=per_sample, per_step=True)
    reference = dve.embeddings.exact_influence(module, test, loss_fn=per_sample, per_step=True,
                                               train_loss_fn=per_sample)
    return replayed, reference, test, per_sample


def test_zero_weight_samples_replay_as_absent(tmp_path: Path) -> None:
    """Samples whose loss weight is 0 (``loss_reduction`` callable) do not enter their steps: the replay through
    ``training_step`` gives them zero scores, and the same scores as a replay through the per-sample losses."""
    module, data = WeightedMLP(), WeightedDigits(64, lambda i: i % 8 == 0)
    replayed, reference, test, per_sample = weighted_replays(tmp_path, data, module)
    absent = replayed.sample_ids % 8 == 0
    assert bool(absent.any()) and bool((replayed.scores[:, absent] == 0).all())
    torch.testing.assert_close(replayed.scores, reference.scores, rtol=1e-9, atol=1e-12)
    loaded = DataValueEmbeddings.load(tmp_path / "dve")  # without loss_weights=: training_step cannot be split
    with pytest.raises(ConfigError, match=r"pass the same callable as `loss_weights=` .* `train_loss_fn=` for the "
                                          r"replayed training steps"):
        loaded.exact_influence(module, test, loss_fn=per_sample, dataset=data)


@pytest.mark.parametrize("chunked", [False, True])
def test_a_step_whose_samples_all_have_weight_zero_is_replayed(tmp_path: Path, chunked: bool,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole batch of weight 0 still gets a (zero) gradient in training, which moves momentum and decay: the replay
    through ``training_step`` keeps it (and norm clipping of it), as a replay through per-sample losses does, also
    carried back one sample at a time."""
    if chunked:
        monkeypatch.setattr(replay, "SAMPLE_GRAPH_BYTES", 1)
    module, data = WeightedMLP(momentum=0.9, weight_decay=0.01), WeightedDigits(48, lambda i: 16 <= i < 32)
    replayed, reference, _, _ = weighted_replays(tmp_path, data, module, gradient_clip_val=1.0)
    assert bool((replayed.scores[:, replayed.steps == 1] == 0).all())
    torch.testing.assert_close(replayed.scores, reference.scores, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("chunked", [False, True])
def test_a_sample_with_no_tokens_replays_as_absent(tmp_path: Path, chunked: bool,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Token-mean loss with ignored labels: a sequence whose labels are all ignored has weight 0 in its steps and a
    NaN loss on its own (a mean over no tokens, weight 0 / 0). The replay through ``training_step`` gives it zero
    scores, and everything else as a replay through finite per-sample losses; also carried back one sample at a
    time, where that sample's chunk reaches no parameter."""
    if chunked:
        monkeypatch.setattr(replay, "SAMPLE_GRAPH_BYTES", 1)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 5, 8, generator=gen, dtype=torch.float64), torch.randint(0, 4, (32, 5), generator=gen)
    y[0], y[1::2, 3:] = -100, -100  # sequence 0 has no labelled token; others are padded
    data = [{"x": x[i], "y": y[i], "index": i} for i in range(32)]

    class Tokens(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 4)).double()

        def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
            return F.cross_entropy(self.net(batch["x"]).flatten(0, 1), batch["y"].flatten(), ignore_index=-100)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def per_sample(m: nn.Module, b: dict) -> torch.Tensor:
        mask = b["y"] != -100
        ce = F.cross_entropy(m.net(b["x"]).transpose(1, 2), b["y"].clamp_min(0), reduction="none")
        return (ce * mask).sum(1) / mask.sum(1).clamp_min(1)

    def token_share(b: dict) -> torch.Tensor:
        tokens = (b["y"] != -100).sum(1).double()
        return tokens / tokens.sum()

    module = Tokens()
    dve = DataValueEmbedding(tmp_path / "dve", projection_dim=None, report=None, loss_reduction=token_share)
    make_trainer(1, [dve]).fit(module, torch.utils.data.DataLoader(data, batch_size=8))
    test = {"x": x[8:12], "y": y[8:12].clamp_min(0)}
    replayed = dve.embeddings.exact_influence(module, test, loss_fn=per_sample, per_step=True)
    reference = dve.embeddings.exact_influence(module, test, loss_fn=per_sample, per_step=True,
                                               train_loss_fn=per_sample)
    assert bool(replayed.scores.isfinite().all()) and bool((replayed.scores[:, replayed.sample_ids == 0] == 0).all())
    torch.testing.assert_close(replayed.scores, reference.scores, rtol=1e-9, atol=1e-12)


def test_split_batch_slices_tensors_and_lists() -> None:
    singles = split_batch({"x": torch.arange(6).reshape(3, 2), "tags": ["a", "b", "c"], "scale": torch.tensor(2.0)})
    assert len(singles) == 3 and torch.equal(singles[1]["x"], torch.tensor([[2, 3]]))
    assert singles[2]["tags"] == ["c"] and float(singles[0]["scale"]) == 2.0


def test_refuses_missing_or_unfinished_checkpoints(recorded, small_data, tmp_path: Path) -> None:
    module, test, dataset = recorded[1], small_data[1], small_data[0]
    root, emb = _damaged(recorded, tmp_path / "a")
    (root / "checkpoints" / "replay.json").unlink()
    with pytest.raises(StoreError, match="no replay checkpoints .* checkpoint_interval='auto'"):
        emb.exact_influence(module, test, dataset=dataset)
    root, emb = _damaged(recorded, tmp_path / "b")
    manifest = json.loads((root / "checkpoints" / "replay.json").read_text())
    (root / "checkpoints" / "replay.json").write_text(json.dumps({**manifest, "final_step": None}))
    with pytest.raises(StoreError, match="no final state: training did not finish"):
        emb.exact_influence(module, test, dataset=dataset)
    root, emb = _damaged(recorded, tmp_path / "c")
    (root / "checkpoints" / "state_00000000.safetensors").unlink()
    with pytest.raises(StoreError, match="checkpoint files are missing"):
        emb.exact_influence(module, test, dataset=dataset)
    root, emb = _damaged(recorded, tmp_path / "d")
    hyper = root / "checkpoints" / "hyper.jsonl"
    lines = hyper.read_text().splitlines(keepends=True)
    assert [json.loads(line)["step"] for line in lines] == list(range(len(lines)))  # one line per step, in order
    hyper.write_text("".join(line for line in lines if json.loads(line)["step"] != 2))
    with pytest.raises(StoreError, match="hyperparameters of step 2 were not recorded"):
        emb.exact_influence(module, test, dataset=dataset)
    root, emb = _damaged(recorded, tmp_path / "e")
    (root / "checkpoints" / "replay.json").write_text('{"kind": "SG')  # cut off mid-write
    with pytest.raises(StoreError, match=r"replay.json is truncated or corrupt .* Record the run again"):
        emb.exact_influence(module, test, dataset=dataset)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"dropout": 0.2}, r"module 'net.2' ran dropout in train mode, and the random masks are not recorded"),
    ({"optimizer": "rmsprop"}, "exact replay is refused for this run: exact replay models torch.optim SGD, Adam, "
                               "AdamW exactly; the run used RMSprop"),
    ({"precision": "16-mixed"}, r"precision='16-mixed': fp16 loss scaling \(skipped steps\) is not replayed"),
])
def test_refuses_runs_that_cannot_be_replayed(tmp_path: Path, small_data, kwargs: dict, match: str) -> None:
    dataset, test = small_data
    module = ReplayNet(SETTINGS["sgd"], 6, dropout=kwargs.get("dropout", 0.0))
    if kwargs.get("optimizer") == "rmsprop":
        module.configure_optimizers = lambda: torch.optim.RMSprop(module.parameters(), lr=1e-3)
    trainer_kwargs = {"precision": None, "plugins": [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))]} \
        if "precision" in kwargs else {}
    if "precision" in kwargs:
        module = module.float()
        dataset = DigitsDataset(dataset.indices.tolist(), dtype=torch.float32)
        test = {k: v.float() if v.is_floating_point() else v for k, v in test.items()}
    dve = DataValueEmbedding(tmp_path / "dve", projection_dim=64, report=None)
    make_trainer(2, callbacks=[dve], **trainer_kwargs).fit(module, make_loader(dataset, 16, seed=1))
    with pytest.raises(UnsupportedError, match=match):
        dve.embeddings.exact_influence(module, test)


class UnusedDropout(ReplayNet):
    """:class:`ReplayNet` holding a dropout module in train mode that its forward never calls."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.spare = nn.Dropout(0.5)


def test_a_dropout_module_that_is_never_called_is_replayed(tmp_path: Path, small_data) -> None:
    """Only a dropout module the forward calls is refused: a spare one in train mode leaves the scores of the same
    run without it (it was refused up front, listed among the modules that ran dropout)."""
    dataset, test = small_data
    scores = []
    for cls in (ReplayNet, UnusedDropout):
        module = cls(SETTINGS["sgd"], 6)
        dve = DataValueEmbedding(tmp_path / cls.__name__, projection_dim=64, report=None)
        make_trainer(2, callbacks=[dve]).fit(module, make_loader(dataset, 16, seed=1))
        scores.append(dve.embeddings.exact_influence(module, test, per_step=True).scores)
    torch.testing.assert_close(scores[1], scores[0], rtol=1e-9, atol=1e-12)


def test_bf16_autocast_run_is_replayed_under_autocast(tmp_path: Path, small_data) -> None:
    """A ``bf16-mixed`` run replays under the same autocast (landing on its checkpoints within 1e-2) and scores
    like the float32 run of the same data and initialisation (Spearman over all occurrences and test points)."""
    dataset, test = DigitsDataset(small_data[0].indices.tolist(), dtype=torch.float32), small_data[1]
    test = {k: v.float() if v.is_floating_point() else v for k, v in test.items()}
    scores = {}
    for precision in ("bf16-mixed", "32-true"):
        module = ReplayNet(SETTINGS["sgd"], 6).float()
        dve = DataValueEmbedding(tmp_path / precision, projection_dim=64, report=None)
        make_trainer(2, callbacks=[dve], precision=precision).fit(module, make_loader(dataset, 16, seed=1))
        scores[precision] = dve.embeddings.exact_influence(module, test, per_step=True).scores.flatten()
    rho = spearmanr(scores["bf16-mixed"].numpy(), scores["32-true"].numpy())[0]
    assert rho >= 0.95, rho


class ReducedNet(ReplayNet):
    """ReplayNet whose loss is its mean, a sum, or a mean weighted by class (``loss_reduction`` callable
    :func:`class_weights`)."""

    def __init__(self, reduction: str, *args: Any) -> None:
        super().__init__(*args)
        self.reduction = reduction

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.reduction == "mean":
            return super().training_step(batch, batch_idx)
        losses = F.cross_entropy(self(batch["x"]), batch["y"], reduction="none")
        return losses.sum() if self.reduction == "sum" else (class_weights(batch).to(losses) * losses).sum()


def class_weights(batch: dict) -> torch.Tensor:
    """Per-sample loss weights ``(y + 1) / sum (y + 1)`` over the batch."""
    weight = batch["y"].double() + 1
    return weight / weight.sum()


@pytest.mark.parametrize(("name", "reduction", "accumulate", "old_store"), [
    ("adam l2", "mean", 1, False), ("adamw cosine warm-up", "mean", 1, False),
    ("adamw cosine warm-up", "mean", 2, False), ("adamw cosine warm-up", "sum", 2, False),
    ("adamw cosine warm-up", "weights", 1, False), ("adamw cosine warm-up", "mean", 1, True)])
def test_a_bf16_adam_run_is_replayed_with_the_forwards_training_ran(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, reduction: str, accumulate: int, old_store: bool
) -> None:
    """Oracle: the same run unrolled in float32 under the same bf16 autocast, one forward per micro-batch as in
    training (it lands on the trained weights). Replayed from one-sample forwards, which round otherwise under
    autocast, Adam's normalisation of nearly cancelling gradient coordinates gave scores up to 930 times too large
    (Spearman 0.62), or the replay missed its checkpoint; from one forward of a step's whole batch, where training
    accumulated two micro-batches, 1000 times too small. Each step's value now comes from its recorded
    micro-batches: within 2 %, for a mean, a sum and per-sample weights (``loss_reduction`` callable). A store
    written before the micro-batches were recorded is replayed from whole batches, with a warning saying so. (Two
    micro-batches' bf16 gradients cancel exactly in some coordinates with no gradient yet: the oracle held them
    as the replay does; with their slope ``1 / eps`` its scores reached 265, against 0.056 held.)"""
    train, test_indices = split_indices(48, 5, seed=2)
    dataset = DigitsDataset(train, dtype=torch.float32)
    test = DigitsDataset(test_indices, dtype=torch.float32).batch()
    setting, batch = SETTINGS[name], 16 // accumulate
    loader = make_loader(dataset, batch, seed=1)
    module = ReducedNet(reduction, setting, 2 * len(loader) // accumulate).float()
    initial = copy.deepcopy(module.net)
    if old_store:  # the step files of earlier versions: no micro-batch of each row
        close = StepAssembler.close
        monkeypatch.setattr(StepAssembler, "close", lambda *a, **k: dataclasses.replace(close(*a, **k), batches=None))
    dve = DataValueEmbedding(tmp_path / "dve", projection_dim=64, report=None,
                             loss_reduction=class_weights if reduction == "weights" else reduction)
    make_trainer(2, callbacks=[dve], precision="bf16-mixed", accumulate_grad_batches=accumulate).fit(module, loader)
    micro = epoch_batches(make_loader(dataset, batch, seed=1), 2)
    own = {"mean": lambda b: 1.0 / len(b["y"]), "sum": lambda b: 1.0, "weights": class_weights}[reduction]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, final = unrolled_steps(initial, [micro[i:i + accumulate] for i in range(0, len(micro), accumulate)],
                                         setting, test, own)
    for key, value in final.items():
        torch.testing.assert_close(value, dict(module.net.named_parameters())[key].detach(), rtol=1e-3, atol=1e-4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = dve.embeddings.exact_influence(module, test, per_step=True).scores.double()
    assert any("do not record their micro-batches" in str(w.message) for w in caught) == old_store
    error = float((got - expected).abs().max() / expected.abs().max())
    assert error < 0.02, error


def test_parameter_groups_refuses_foreign_parameters() -> None:
    module = nn.Linear(2, 2)
    optimizer = torch.optim.SGD([*module.parameters(), torch.zeros(3, requires_grad=True)], lr=0.1)
    with pytest.raises(ConfigError, match=r"holds 1 parameter\(s\) that are not the module's \(shapes \[\(3,\)\]\)"):
        parameter_groups(module, optimizer)


def test_batch_source_maps_ids_to_positions(small_data) -> None:
    dataset = small_data[0]
    ids = dataset.indices[[5, 0, 7]]
    source = BatchSource(TrainingData(dataset, None, "index"))
    assert source.positions(ids) == [5, 0, 7]
    assert BatchSource(TrainingData(dataset, None, None)).positions(torch.tensor([1, 2])) == [1, 2]


# --- fidelity against exact TSLOO -----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("net", "setting"), [
    ("mlp", {"optimizer": "sgd", "lr": 0.3, "clip": 0.5}),
    ("mlp", {"optimizer": "adamw", "lr": 3e-3, "weight_decay": 0.01}),
    ("cnn", {"optimizer": "sgd", "lr": 0.02, "momentum": 0.9, "schedule": "cosine"}),
])
def test_spearman_against_exact_tsloo(tmp_path: Path, net: str, setting: dict[str, Any]) -> None:
    """The core fidelity problem (384 digits, batch 32, 3 epochs = 36 steps, 16 test points, 40 occurrences).

    Measured here: 0.960, 0.962, 0.995 (deterministic: float64, fixed seeds). ``python benchmarks/replay_cost.py``
    measures 12 settings: 0.90-1.00 (the first-order limit misses 0.95 on the CNN at SGD lr 0.3, 0.904, and with
    norm clipping, 0.947). Asserted: the target, >= 0.95, on these three.
    """
    train_ids, test_ids = split_indices(384, 16)
    dataset, test = DigitsDataset(train_ids), DigitsDataset(test_ids).batch()
    setting = {**setting, "net": net}
    module, dve, initial = fit_setting(tmp_path / "dve", setting, dataset, epochs=3, batch=32)
    batches = epoch_batches(make_loader(dataset, 32, seed=1), 3)
    occurrences = oracles.spread_occurrences([len(b["y"]) for b in batches], 40, 0)
    columns = [32 * t + i for t, i in occurrences]  # every batch holds 32 samples (384 = 12 x 32)

    scores = dve.embeddings.exact_influence(module, test, per_step=True, train_loss_fn=per_sample_loss).scores
    truth = tsloo_by_training(initial, batches, setting, occurrences, test)
    rho = oracles.mean_spearman(scores[:, columns], truth)[0]
    print(f"\nexact replay, {net} {setting}: mean Spearman vs exact TSLOO {rho:.4f}")
    assert rho >= 0.95


class RunningCentre(nn.Module):
    """Identity in train mode, where it updates a running mean of its inputs (a buffer); subtracts it in eval."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(64, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                self.mean.mul_(0.9).add_(0.1 * x.mean(0))
            return x
        return x - self.mean


class CentredNet(ReplayNet):
    def __init__(self) -> None:
        super().__init__({"optimizer": "sgd", "lr": 0.3}, total_steps=0)
        self.centre = RunningCentre()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.centre(x))


@pytest.mark.parametrize("embeddings", ["recursion", "replay"])
def test_a_replay_leaves_the_modules_buffers_as_training_left_them(tmp_path: Path, embeddings: str) -> None:
    """The replay runs ``training_step`` in train mode, where a module may update a buffer that only its eval mode
    uses: ``exact_influence`` changed it by 0.3 (the model's predictions after the query moved by 0.08, and the
    same query asked twice gave scores 9 % apart), as did ``embeddings="replay"`` at train end. Oracle: the
    buffer after a fit without the callback, and the first query's scores."""
    data = DigitsDataset(range(48))
    reference = CentredNet()
    make_trainer(2).fit(reference, make_loader(data, 16, seed=1))
    module = CentredNet()
    dve = DataValueEmbedding(tmp_path / "dve", report=None, projection_dim=64, embeddings=embeddings)
    make_trainer(2, callbacks=[dve]).fit(module, make_loader(data, 16, seed=1))
    torch.testing.assert_close(module.centre.mean, reference.centre.mean, rtol=0, atol=0)
    test = DigitsDataset(range(1500, 1504)).batch()
    first = dve.embeddings.exact_influence(module, test, per_step=True).scores
    torch.testing.assert_close(module.centre.mean, reference.centre.mean, rtol=0, atol=0)
    assert torch.equal(dve.embeddings.exact_influence(module, test, per_step=True).scores, first)


def test_buffers_that_cannot_be_written_in_place_are_restored() -> None:
    """``modes`` (every query, replay and train-end check) restores buffers by writing into them: an inference
    tensor (a cache first built under ``trainer.validate``) or an expanded view raised at every query and at train
    end. Oracle: the very tensors and values before the context."""
    with torch.inference_mode():
        cache = torch.arange(3.0)
    holder, scale, count = nn.Module(), torch.ones(1).expand(4), torch.zeros(())
    for name, buffer in (("cache", cache), ("scale", scale), ("count", count)):
        holder.register_buffer(name, buffer)
    with batches.modes(holder, []):
        holder.count += 1  # in place
        holder.cache = torch.ones(3)  # assigned anew, as a lazily rebuilt cache is
    assert holder.cache is cache and holder.scale is scale and holder.count is count
    assert torch.equal(cache, torch.arange(3.0)) and float(count) == 0.0 and torch.equal(scale, torch.ones(4))


class LocallyNumbered(torch.utils.data.Dataset):
    """Digits ``indices`` whose items carry their position in this part as ``"index"`` (0, 1, ...)."""

    def __init__(self, indices: range) -> None:
        self.digits = DigitsDataset(indices)

    def __len__(self) -> int:
        return len(self.digits)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {**self.digits[i], "index": torch.tensor(i)}


def test_ids_shared_by_two_items_of_the_dataset_are_named_in_the_refusal(tmp_path: Path) -> None:
    """A ``ConcatDataset`` of parts numbered from 0 each: the replay takes the ids as positions (the first part's
    items carry them) and misses the checkpoints; the refusal blamed nondeterminism only, now it names shared ids."""
    data = torch.utils.data.ConcatDataset([LocallyNumbered(range(0, 16)), LocallyNumbered(range(16, 32))])
    module = ReplayNet({"optimizer": "sgd", "lr": 0.3}, total_steps=0)
    dve = DataValueEmbedding(tmp_path / "dve", report=None, projection_dim=64)
    order = list(range(32))  # each part's ids in steps of their own: no id twice in one step
    make_trainer(1, callbacks=[dve]).fit(module, torch.utils.data.DataLoader(data, batch_size=8, sampler=order))
    with pytest.raises(UnsupportedError, match=r"does not reproduce the parameters.*that two items of the dataset "
                                               r"share \(a ConcatDataset of parts numbered from 0 each\)"):
        dve.embeddings.exact_influence(module, DigitsDataset(range(1500, 1502)).batch())


class DropoutFromEpochOne(ReplayNet):
    """Dropout kept in eval mode in the first epoch and switched on from the second."""

    def __init__(self) -> None:
        super().__init__({"optimizer": "sgd", "lr": 0.3}, total_steps=0, dropout=0.2)

    def on_train_epoch_start(self) -> None:
        self.net[2].train(self.current_epoch > 0)


def test_a_module_mode_changed_during_fit_is_named_in_the_refusal(tmp_path: Path) -> None:
    """The replay runs every step in the first step's modes; dropout switched on in the second epoch was refused
    with the generic "does not reproduce the parameters" message, which named neither dropout nor the step."""
    module, dve = DropoutFromEpochOne(), DataValueEmbedding(tmp_path / "dve", report=None, projection_dim=64)
    make_trainer(2, callbacks=[dve]).fit(module, make_loader(DigitsDataset(range(32)), 16, seed=1))
    with pytest.raises(UnsupportedError, match=r"refused for this run: at step 2 modules \['net\.2'\] were switched "
                                               r"to train mode since the first step \(e\.g\. dropout"):
        dve.embeddings.exact_influence(module, DigitsDataset(range(1500, 1502)).batch())


class DropoutKeptOff(ReplayNet):
    """:class:`DropoutFromEpochOne` with the dropout left in eval mode throughout (the fix of that run)."""

    def __init__(self) -> None:
        super().__init__({"optimizer": "sgd", "lr": 0.3}, total_steps=0, dropout=0.2)

    def on_train_epoch_start(self) -> None:
        self.net[2].eval()


def test_a_refusal_of_an_abandoned_branch_is_dropped_when_the_fit_resumes_before_it(tmp_path: Path) -> None:
    """Dropout switched on at step 2 refused exact replay; the run resumed from its epoch-0 checkpoint (after step 1)
    with the dropout kept off trains no such step, but the branch it replaced left the refusal in the replay
    manifest: exact replay stayed refused. Oracle: an uninterrupted fit with the dropout kept off, whose scores the
    resumed run's equal. A refusal at or before the resume point still holds (resumed from the epoch-1 checkpoint)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    loader, test = make_loader(DigitsDataset(range(32)), 16, seed=1), DigitsDataset(range(1500, 1502)).batch()

    def fit(module: ReplayNet, root: str, epochs: int = 2, **kwargs: Any) -> DataValueEmbedding:
        dve = DataValueEmbedding(tmp_path / root, report=None, projection_dim=64)
        saving = ModelCheckpoint(dirpath=tmp_path / f"ckpt_{root}", save_top_k=-1)
        make_trainer(epochs, callbacks=[dve, saving], enable_checkpointing=True).fit(module, loader, **kwargs)
        return dve

    fit(DropoutFromEpochOne(), "dve")
    first, last = sorted((tmp_path / "ckpt_dve").glob("epoch=*.ckpt"))
    continued = DropoutFromEpochOne()
    with pytest.raises(UnsupportedError, match=r"refused for this run: at step 2 modules \['net\.2'\] were switched"):
        fit(continued, "dve", 3, ckpt_path=last).embeddings.exact_influence(continued, test)
    resumed = DropoutKeptOff()
    scores = fit(resumed, "dve", ckpt_path=first).embeddings.exact_influence(resumed, test).scores
    straight = DropoutKeptOff()
    oracle = fit(straight, "straight").embeddings.exact_influence(straight, test).scores
    torch.testing.assert_close(scores, oracle, rtol=1e-9, atol=1e-12)
