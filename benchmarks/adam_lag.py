"""What projected AdamW loses against exact mode (issue #6): the preconditioner's one-step lag, not its rank-1 factor.

Exact mode (``projection_dim=None``) applies Adam's ``P_t = 1 / (sqrt(v_hat_t) + eps)`` per coordinate in the
recursion. Projected mode cannot: the hooks form the preconditioned rows ``(P_out (r * delta))(P_in (c * a))^T``
during the backward, so the rank-1 factor ``r c^T`` (``adam._rank_one``) comes from the second moment *before*
the step, ``v_{t-1}``, which lacks the step's own squared gradient (``lightning_dve/adam.py``). This script
separates the two approximations on ``fidelity.py``'s AdamW problems (lr 3e-3, weight decay 0.01; empirical
Fisher, ``layout="auto"``, one full ``M``) at ``projection_dim=4096``, where no layer of these models is
projected, so the projection itself plays no part. Estimators, each against the same exact TSLOO as
``fidelity.py``:

- ``exact``: ``projection_dim=None``, ``P_t`` per coordinate (the reference);
- ``exact_lagged``: the same with ``P_{t-1}`` (patched into ``adam._moments``);
- ``rank1_prev``: the shipped projected mode, the rank-1 factor of ``v_{t-1}``;
- ``percoord_prev``: ``P_{t-1}`` per coordinate in projected mode (the factors are ones and the captured rows are
  multiplied by ``P_{t-1}``, possible here only because no side is projected);
- ``rank1_next``, ``percoord_next``: the same with ``v_t``, which the hooks cannot know during the backward,
  taken from an identical earlier run of the same problem (training is deterministic; checked: the two runs end
  at the same weights);
- ``rank1_prev_rescaled``: the shipped factor of ``v_{t-1}`` rescaled by the ratio of the layer's ``v``-weighted mean
  ``P`` under ``v_t`` and ``v_{t-1}``: the one correction that could be applied after the backward (a scalar per
  layer, foldable into the step's rate);
- ``default``: the shipped default (``projection_dim=1024``: the MLP's first layer and the CNN heads projected), with
  ``default_over_exact`` (issue #6's projection ratio as ``fidelity.py`` takes it) and ``default_over_rank1_prev``
  (the same Adam model with no layer projected: what the projection itself keeps).

The patches live in this process only (never in the package files). Output: one line per problem, then the mean
over problems per model and overall.

    .venv/bin/python benchmarks/adam_lag.py                     # 3 models x 5 seeds, ~4 min on 2 cores
    .venv/bin/python benchmarks/adam_lag.py --models mlp --seeds 0
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
import warnings
from collections.abc import Iterator
from typing import Any

import _common as C  # also puts the repository on sys.path
import fidelity as F

import lightning as L  # noqa: E402
import torch  # noqa: E402

from lightning_dve import DataValueEmbedding, adam, callback_step, capture, layers  # noqa: E402
from lightning_dve.optim import groups_of  # noqa: E402
from tests import oracles  # noqa: E402

ESTIMATORS = ("exact", "exact_lagged", "rank1_prev", "percoord_prev", "rank1_next", "percoord_next",
              "rank1_prev_rescaled", "default", "default_over_exact", "default_over_rank1_prev")


class SecondMoments(L.Callback):
    """Records each tracked layer's ``v_hat_t`` in block layout after every optimizer step, keyed ``(layer, t)``."""

    def __init__(self) -> None:
        self.v_hat: dict[tuple[str, int], torch.Tensor] = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        optimizer = trainer.optimizers[0]
        for name, module in pl_module.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                state, bias = optimizer.state[module.weight], optimizer.state[module.bias]
                t = int(state["step"])
                v = layers.parameter_block(module, state["exp_avg_sq"], bias["exp_avg_sq"])
                self.v_hat[(name, t)] = v / (1 - optimizer.param_groups[0]["betas"][1] ** t)


@contextlib.contextmanager
def preconditioner(kind: str, source: str, recorded: dict[tuple[str, int], torch.Tensor]) -> Iterator[None]:
    """Patch the projected mode's preconditioner: ``kind`` ``"rank1"`` / ``"percoord"`` / ``"rescaled"`` of
    ``v_{t-1}`` (``source`` ``"prev"``) or of the recorded ``v_t`` (``"next"``)."""
    per_coordinate: dict[str, torch.Tensor] = {}
    original_factors, original_add = callback_step.adam_factors, capture.GradientCapture._add

    def factors(optimizer: torch.optim.Optimizer, modules: dict[str, torch.nn.Module]) -> dict[str, Any]:
        out = original_factors(optimizer, modules)  # ones before the first step: that step is left as shipped
        per_coordinate.clear()
        groups = groups_of(optimizer, {n: m.weight for n, m in modules.items()})
        for (name, module), group in zip(modules.items(), groups):
            state = optimizer.state.get(module.weight, {})
            if "exp_avg_sq" not in state:
                continue
            t, eps = int(state["step"]), float(group["eps"])
            v = layers.parameter_block(module, state["exp_avg_sq"], optimizer.state[module.bias]["exp_avg_sq"])
            v_hat = recorded[(name, t + 1)] if source == "next" else v / (1 - group["betas"][1] ** t)
            if kind == "rank1":
                out[name] = adam._rank_one(v_hat, eps)
            elif kind == "rescaled":
                r, c = adam._rank_one(v_hat, eps)
                mean = adam._weighted_preconditioner
                out[name] = (r * mean(recorded[(name, t + 1)], eps) / mean(v_hat, eps), c)
            else:
                per_coordinate[name] = adam._preconditioner(v_hat, eps).flatten()
                out[name] = (torch.ones_like(out[name][0]), torch.ones_like(out[name][1]))
        return out

    def add(self: capture.GradientCapture, kind_: str, layer: Any, grad: torch.Tensor, sides: Any,
            in_side: Any) -> None:  # sides: (P_out, P_in), the latter already in in_side for these layers
        if kind_ != capture.GRADS_Q or layer.name not in per_coordinate:
            return original_add(self, kind_, layer, grad, sides, in_side)
        out_side = layer.spec.project_output_grad(layer.module, grad.detach(), sides[0])
        block = layers.outer_block(out_side, in_side.detach()) * per_coordinate[layer.name].to(grad.dtype)
        previous = self._rows[kind_].get(layer.name)
        self._rows[kind_][layer.name] = block if previous is None else previous + block

    callback_step.adam_factors, capture.GradientCapture._add = factors, add
    try:
        yield
    finally:
        callback_step.adam_factors, capture.GradientCapture._add = original_factors, original_add


@contextlib.contextmanager
def lagged_exact_mode() -> Iterator[None]:
    """Patch exact mode to precondition with ``P_{t-1}`` (the first step keeps ``P_1``)."""
    original = adam._moments

    def moments(*args: Any) -> Any:
        m = original(*args)
        return m if m.previous_v_hat is None else adam._Moments(m.step_grad, m.momentum, m.previous_v_hat,
                                                                m.previous_v_hat, m.count)

    adam._moments = moments
    try:
        yield
    finally:
        adam._moments = original


def fit(problem: F.Problem, extra: list[L.Callback], **dve_kwargs: Any) -> tuple[Any, DataValueEmbedding, Any]:
    """``problem``'s fit with the callback (``report=None``, no replay checkpoints) and ``extra`` callbacks."""
    module, recorder = problem.module(), F.Recorder()
    dve = DataValueEmbedding(save_dir=tempfile.mkdtemp(dir=problem.workdir), report=None, checkpoint_interval=None,
                             **dve_kwargs)
    trainer = F.make_trainer(F.EPOCHS, callbacks=[dve, recorder, *extra], precision="64-true")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, problem.loader())
    return module, dve, recorder


def run(model: str, seed: int, workdir: str) -> dict[str, Any]:
    """One problem's line: every estimator's Spearman with exact TSLOO, and the checks of the runs."""
    F.SEED_OFFSET = seed
    problem = F.Problem(model, "adamw", F.SETTINGS["adamw"], 40, 16, workdir)
    moments = SecondMoments()
    module, dve, recorder = fit(problem, [moments], projection_dim=None)
    truth, final = oracles.trainer_tsloo(problem.module().net.double(), problem.batches,
                                         F.make_optimizer(problem.setting), problem.occurrences, problem.test64["x"],
                                         problem.test64["y"], lrs=recorder.lrs)

    def rho(run_module: Any, run_dve: DataValueEmbedding) -> float:
        result = run_dve.embeddings.influence(run_module, problem.test, loss_fn=F.test_loss, per_step=True)
        columns = problem.columns(result.steps, result.sample_ids)
        return round(oracles.mean_spearman(result.scores.detach().double()[:, columns], truth)[0], 4)

    line: dict[str, Any] = {"benchmark": "adam_lag", "model": model, "seed": seed, "exact": rho(module, dve)}
    with lagged_exact_mode():
        line["exact_lagged"] = rho(*fit(problem, [], projection_dim=None)[:2])
    for source in ("prev", "next"):
        for kind in ("rank1", "percoord"):
            with preconditioner(kind, source, moments.v_hat):
                projected, projected_dve, _ = fit(problem, [], projection_dim=4096)
            line[f"{kind}_{source}"] = rho(projected, projected_dve)
    with preconditioner("rescaled", "prev", moments.v_hat):
        line["rank1_prev_rescaled"] = rho(*fit(problem, [], projection_dim=4096)[:2])
    line["default"] = rho(*fit(problem, [])[:2])
    for reference in ("exact", "rank1_prev"):
        line[f"default_over_{reference}"] = round(line["default"] / line[reference], 4)
    trained = dict(projected.net.named_parameters())
    line["same_training"] = all(torch.equal(p, trained[n]) for n, p in module.net.named_parameters())
    line["oracle_vs_trainer_max_diff"] = max(float((final[n] - p.detach().double()).abs().max())
                                             for n, p in trained.items())
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="mlp,cnn,cnn_strided")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    args = parser.parse_args()
    C.setup(threads=2)
    C.emit({"benchmark": "adam_lag", "kind": "machine", **C.machine()})
    started, lines = time.perf_counter(), []
    with tempfile.TemporaryDirectory(prefix="adam_lag_") as workdir:
        for seed in (int(s) for s in args.seeds.split(",")):
            for model in args.models.split(","):
                lines.append(run(model, seed, workdir))
                C.emit(lines[-1])
    for model in [*args.models.split(","), "all"]:
        chosen = [line for line in lines if model in ("all", line["model"])]
        C.emit({"benchmark": "adam_lag", "kind": "mean", "model": model, "problems": len(chosen),
                **{name: round(statistics.mean(line[name] for line in chosen), 4) for name in ESTIMATORS}})
    C.emit({"benchmark": "adam_lag", "kind": "done", "wall_s": round(time.perf_counter() - started, 1)})


if __name__ == "__main__":
    main()
