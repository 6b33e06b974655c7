"""Which curvature would a test-agnostic estimator need? Oracle products against exact TSLOO (issue #6).

Every test-agnostic estimator of the package computes, per occurrence ``(t, z)``, the first-order product
``lr_t w_z (I - lr H_{T-1}) ... (I - lr H_{t+1}) g_z`` (method.md §2) with some stand-in for the step Hessians
``H_k``: the empirical Fisher (the paper), the Gauss-Newton matrix, or nothing; and with ``M`` per layer
(block-diagonal ``H_k``) by default. This script forms that product **exactly, in float64, over all
parameters** (no projection, no sampling) for stand-ins the package cannot afford at scale, to find out which
part of the curvature the default's gap to exact TSLOO comes from:

- ``hessian``: the true Hessian of the step's loss (the exact derivative of TSLOO: the limit);
- ``ggn``: the exact per-class Gauss-Newton matrix ``sum_z w J^T (diag p - p p^T) J``;
- ``ef``: the empirical Fisher ``sum_z w g g^T``;
- ``none``: no curvature (``lr w <g_test, g>``);
- each ``full`` (all layers) and ``per_layer`` (block-diagonal); and two hybrids that split the Hessian:
  ``hessian_in_ggn_across`` (true Hessian inside each layer's block, GGN between layers) and
  ``ggn_in_hessian_across`` (the reverse), and ``ggn_per_layer_x1.5`` (the GGN scaled up, since ``tr H`` is
  about twice ``tr GGN`` after the first steps: ``trace_ratio`` lines).

Problem: ``benchmarks/fidelity.py``'s (384 sklearn digits, tanh MLP 64-32-10, batch 32, 3 epochs, the same
batches, 40 occurrences x 16 test points, truth = float64 replay with one occurrence removed,
``tests/oracles.py``), plain SGD at constant learning rates (``--settings``, default ``sgd_lr0.3,sgd_lr0.05``).
Figures: mean over test points of the Spearman correlation with the truth. ~4 min per setting on 2 cores (36
exact 2410 x 2410 Hessians).

    python benchmarks/curvature_limits.py
    python benchmarks/curvature_limits.py --settings sgd_lr0.3
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable, Sequence

import fidelity as F  # also puts the repository on sys.path
from _common import emit, machine, setup

import torch  # noqa: E402
from torch.func import functional_call  # noqa: E402

from tests import oracles as O  # noqa: E402

Matrices = list[torch.Tensor]


def block_mask(sizes: Sequence[int]) -> torch.Tensor:
    """``[D, D]`` mask of the per-layer diagonal blocks (1 inside a layer's block, 0 between layers)."""
    mask = torch.zeros(sum(sizes), sum(sizes), dtype=torch.float64)
    start = 0
    for size in sizes:
        mask[start:start + size, start:start + size] = 1.0
        start += size
    return mask


def ggn_matrices(net: torch.nn.Module, trajectory: list[O.Params], batches: list[O.Batch]) -> Matrices:
    """Exact per-class Gauss-Newton matrix of each step's mean loss, over all parameters."""
    out = []
    for params, batch in zip(trajectory, batches):
        jac = O.per_sample_logit_jacobians(net, params, batch["x"], "full")[0]  # [B, C, D]
        with torch.no_grad():
            prob = torch.softmax(functional_call(net, params, (batch["x"],)), dim=1)
        hess = torch.diag_embed(prob) - prob[:, :, None] * prob[:, None, :]
        out.append(torch.einsum("zcd,zce,zef,z->df", jac, hess, jac, O.sample_weights(batch)))
    return out


def product_scores(curvature: Matrices, grads: Matrices, weights: Matrices, lr: float, test: torch.Tensor,
                   occurrences: list[O.Occurrence]) -> torch.Tensor:
    """Scores ``<g_test, lr w (prod_{k>t} (I - lr C_k)) g_{t,z}>`` per test point and occurrence, ``[n, m]``."""
    dim = test.shape[1]
    at_step: dict[int, list[int]] = {}
    for step, position in occurrences:
        at_step.setdefault(step, []).append(position)
    product, embeddings = torch.eye(dim, dtype=torch.float64), {}
    for t in range(len(grads) - 1, -1, -1):
        for position in at_step.get(t, []):
            embeddings[(t, position)] = lr * weights[t][position] * (product @ grads[t][position])
        product = product @ (torch.eye(dim, dtype=torch.float64) - lr * curvature[t])
    return torch.stack([test @ embeddings[o] for o in occurrences], dim=1)


def stand_ins(hessian: Matrices, ggn: Matrices, fisher: Matrices, mask: torch.Tensor) -> dict[str, Matrices]:
    """Every curvature stand-in compared, by name."""
    across = 1.0 - mask

    def each(fn: Callable[[int], torch.Tensor]) -> Matrices:
        return [fn(k) for k in range(len(hessian))]

    return {
        "hessian_full": hessian, "hessian_per_layer": each(lambda k: hessian[k] * mask),
        "ggn_full": ggn, "ggn_per_layer": each(lambda k: ggn[k] * mask),
        "ef_full": fisher, "ef_per_layer": each(lambda k: fisher[k] * mask),
        "none": each(lambda k: torch.zeros_like(hessian[k])),
        "hessian_in_ggn_across": each(lambda k: hessian[k] * mask + ggn[k] * across),
        "ggn_in_hessian_across": each(lambda k: ggn[k] * mask + hessian[k] * across),
        "ggn_per_layer_x1.5": each(lambda k: 1.5 * ggn[k] * mask),
    }


def run_setting(name: str) -> None:
    """Emit one ``curvature_limits`` line per stand-in, and the trace ratios, for one fidelity setting."""
    started = time.perf_counter()
    setting = F.SETTINGS[name]
    problem = F.Problem("mlp", name, setting, F.N_OCCURRENCES, F.N_TEST, "/tmp")
    net, lr = problem.module().net.double(), float(setting["lr"])
    lrs = [lr] * len(problem.batches)
    trajectory = O.replay(net, O.params_of(net), problem.batches, lrs, return_trajectory=True)
    x_test, y_test = problem.test64["x"], problem.test64["y"]
    truth = O.exact_tsloo(net, trajectory, problem.batches, lrs, problem.occurrences, x_test, y_test)
    test = O.grads_at_test_points(net, trajectory[-1], x_test, y_test, "full")[0]
    blocks = O.linear_blocks(net)
    names = [n for block in blocks for n in block]
    steps = range(len(problem.batches))
    grads = [O.block_grads(net, trajectory[t], problem.batches[t]["x"], problem.batches[t]["y"], "full")[0]
             for t in steps]
    weights = [O.sample_weights(b) for b in problem.batches]
    hessian = [O._batch_loss_hessian(net, trajectory[t], problem.batches[t], names) for t in steps]
    ggn = ggn_matrices(net, trajectory, problem.batches)
    fisher = [g.T @ (w[:, None] * g) for g, w in zip(grads, weights)]
    mask = block_mask([sum(trajectory[0][n].numel() for n in block) for block in blocks])
    base = {"benchmark": "curvature_limits", "model": "mlp", "setting": name}
    for label, curvature in stand_ins(hessian, ggn, fisher, mask).items():
        scores = product_scores(curvature, grads, weights, lr, test, problem.occurrences)
        emit({**base, "stand_in": label, "spearman_vs_tsloo": round(O.mean_spearman(scores, truth)[0], 4)})
    ratios = [float(torch.trace(h) / torch.trace(g)) for h, g in zip(hessian, ggn)]
    emit({**base, "trace_ratio_hessian_over_ggn": {"first": round(ratios[0], 3),
                                                    "median": round(sorted(ratios)[len(ratios) // 2], 3),
                                                    "last": round(ratios[-1], 3)},
          "seconds": round(time.perf_counter() - started, 1)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", default="sgd_lr0.3,sgd_lr0.05", help="plain-SGD settings of fidelity.py")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    setup(args.threads)
    warnings.filterwarnings("ignore", message=".*functorch.*")
    emit({"benchmark": "curvature_limits", "machine": machine()})
    for name in args.settings.split(","):
        if F.SETTINGS[name].get("optimizer") != "sgd" or set(F.SETTINGS[name]) - {"optimizer", "lr"}:
            raise SystemExit(f"{name}: only plain SGD at a constant learning rate is supported.")
        run_setting(name)


if __name__ == "__main__":
    main()
