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
  about twice ``tr GGN`` after the first steps: ``trace_ratio`` lines);
- the cross-layer *residual* ``(H - GGN)`` between layers (``..._residual_across``; for this two-layer net it is
  exactly ``delta_2 (x) diag(tanh'(h_1)) (x) x_1``) added to the empirical Fisher, to no curvature, and to
  ``ggn_sampled_full``: the one-label Monte-Carlo GGN that ``curvature="ggn"`` records; and the same with the
  residual estimated from ``1 / 16 / 64`` random sign probes per sample (``..._residual_<m>_probes``), the form
  hooks could record for any architecture with one extra backward pass per probe (:func:`probed_residuals`);
- ``--one-row DRAWS`` instead: only which single pseudo-gradient row per sample estimates the GGN best, the
  sampled label ``curvature="ggn"`` records or a sign / Gaussian mixture of every class with the same
  expectation (:func:`run_one_row`; ~7 min per setting on 2 cores);
- ``--ef-variants`` instead: only changes to the empirical Fisher that need no extra backward pass, per-sample or
  per-step rescaling to the GGN's trace, the centred Fisher, the exact GGN in the last layer's block
  (:func:`run_ef_variants`; ~4 min per setting).

Problem: ``benchmarks/fidelity.py``'s (384 sklearn digits, tanh MLP 64-32-10, batch 32, 3 epochs, the same
batches, 40 occurrences x 16 test points, truth = float64 replay with one occurrence removed,
``tests/oracles.py``), plain SGD at constant learning rates (``--settings``, default ``sgd_lr0.3,sgd_lr0.05``).
Figures: mean over test points of the Spearman correlation with the truth. ~15 min per setting on 2 cores (36
exact 2410 x 2410 Hessians; the 64 probes of 36 steps; one ``I - lr H`` product over the run per stand-in).

    python benchmarks/curvature_limits.py
    python benchmarks/curvature_limits.py --settings sgd_lr0.3
    python benchmarks/curvature_limits.py --one-row 5
    python benchmarks/curvature_limits.py --ef-variants
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


def last_block_mask(sizes: Sequence[int]) -> torch.Tensor:
    """``[D, D]`` mask of the last layer's diagonal block only."""
    mask = torch.zeros(sum(sizes), sum(sizes), dtype=torch.float64)
    mask[-sizes[-1]:, -sizes[-1]:] = 1.0
    return mask


def logit_jacobians(net: torch.nn.Module, trajectory: list[O.Params], batches: list[O.Batch]
                    ) -> tuple[Matrices, Matrices]:
    """Per step: the per-sample Jacobians of the logits over all parameters ``[B, C, D]`` and the predictions
    ``p`` ``[B, C]``."""
    jacobians, probs = [], []
    for params, batch in zip(trajectory, batches):
        jacobians.append(O.per_sample_logit_jacobians(net, params, batch["x"], "full")[0])
        with torch.no_grad():
            probs.append(torch.softmax(functional_call(net, params, (batch["x"],)), dim=1))
    return jacobians, probs


def pseudo_gradient_curvatures(jacobians: Matrices, vectors: Matrices, batches: list[O.Batch]) -> Matrices:
    """Per step ``sum_z w J_z^T v_z v_z^T J_z``: the curvature of one pseudo-gradient row ``J_z^T v_z`` per sample."""
    out = []
    for jac, v, batch in zip(jacobians, vectors, batches):
        rows = torch.einsum("zcd,zc->zd", jac, v)
        out.append(rows.T @ (O.sample_weights(batch)[:, None] * rows))
    return out


def label_vectors(prob: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``p - onehot(y~)``, ``y~`` drawn from ``p``: the vector ``curvature="ggn"`` records (``E[v v^T] = diag p - p
    p^T``)."""
    labels = torch.multinomial(prob, 1, generator=generator).squeeze(1)
    return prob - torch.nn.functional.one_hot(labels, prob.shape[1]).to(prob)


def mixture_vectors(prob: torch.Tensor, generator: torch.Generator, gaussian: bool = False) -> torch.Tensor:
    """``sum_c s_c sqrt(p_c) (e_c - p)`` with independent signs (or standard normals) ``s_c``: every class in one
    row, the same expectation ``E[v v^T] = sum_c p_c (e_c - p)(e_c - p)^T = diag p - p p^T``."""
    signs = (torch.randn(prob.shape, generator=generator, dtype=prob.dtype) if gaussian
             else rademacher(prob.shape, generator, prob.dtype))
    root = prob.sqrt()
    return root * signs - prob * (signs * root).sum(1, keepdim=True)


def logit_traces(prob: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample, in the logits: the Gauss-Newton matrix's trace ``tr(diag p - p p^T) = 1 - |p|^2`` and the
    empirical Fisher's ``|p - onehot(y)|^2``. Their ratio rescales a Fisher row to the GGN's size with no extra
    backward pass (``--ef-variants``)."""
    residual = prob - torch.nn.functional.one_hot(labels, prob.shape[1]).to(prob)
    return 1 - (prob * prob).sum(1), (residual * residual).sum(1)


def fisher_matrix(grads: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The empirical Fisher of a step, ``sum_z w_z g_z g_z^T`` (``weights`` may carry per-sample factors)."""
    return grads.T @ (weights[:, None] * grads)


def centred_fisher(grads: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_z w_z (g_z - m)(g_z - m)^T`` with ``m`` the weighted mean gradient: the per-sample gradients'
    covariance instead of their second moment."""
    return fisher_matrix(grads - (weights[:, None] * grads).sum(0) / weights.sum(), weights)


def ggn_matrices(net: torch.nn.Module, trajectory: list[O.Params], batches: list[O.Batch]
                 ) -> tuple[Matrices, Matrices]:
    """Per step, over all parameters: the exact per-class Gauss-Newton matrix of the step's mean loss, and its
    one-label Monte-Carlo estimate as ``curvature="ggn"`` forms it (``J^T v v^T J``, :func:`label_vectors`;
    seeded)."""
    jacobians, probs = logit_jacobians(net, trajectory, batches)
    generator = torch.Generator().manual_seed(0)
    return (exact_ggn(jacobians, probs, batches),
            pseudo_gradient_curvatures(jacobians, [label_vectors(p, generator) for p in probs], batches))


def exact_ggn(jacobians: Matrices, probs: Matrices, batches: list[O.Batch]) -> Matrices:
    """Per step the per-class Gauss-Newton matrix ``sum_z w J_z^T (diag p_z - p_z p_z^T) J_z``."""
    return [torch.einsum("zcd,zce,zef,z->df", jac, torch.diag_embed(p) - p[:, :, None] * p[:, None, :], jac,
                         O.sample_weights(batch)) for jac, p, batch in zip(jacobians, probs, batches)]


def rademacher(shape: torch.Size, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Independent random signs: a probe with ``E[r r^T] = I``."""
    return torch.randint(0, 2, shape, generator=generator).to(dtype) * 2 - 1


def probed_residuals(net: torch.nn.Module, trajectory: list[O.Params], batches: list[O.Batch], probes: int,
                     seed: int = 1, draw: Callable[..., torch.Tensor] = rademacher) -> Matrices:
    """A random-probe estimate of the cross-layer residual of a ``Linear -> act -> Linear`` net, per step: what
    capture hooks could form with one extra backward pass of activations per probe, for any architecture.

    The residual block between the layers is ``sum_z w delta_2 (x) diag(act'(h_1)) (x) x_1`` (``delta_2`` the
    sample's loss gradient at the second layer's output). With a probe ``r`` per sample at the second layer's
    input (``draw``; ``E[r r^T] = I``), ``a = delta_2 (x) r`` (layer 2's gradient block with its input replaced by
    ``r``) and ``b = (act'(h_1) * r) (x) x_1`` (layer 1's block for a backward seeded with ``r`` there) have ``E[a
    b^T]`` = that block. Returns ``sum_z w (a b^T + b a^T)`` averaged over ``probes`` independent probes, over the
    parameters in ``oracles.linear_blocks`` order (``[W_1, b_1, W_2, b_2]``).
    """
    act, generator, out = net[1], torch.Generator().manual_seed(seed), []
    for params, batch in zip(trajectory, batches):
        x, weights = batch["x"], O.sample_weights(batch)[:, None]
        h1 = (x @ params["0.weight"].T + params["0.bias"]).detach().requires_grad_()
        x2 = act(h1)
        logits = x2 @ params["2.weight"].T + params["2.bias"]
        losses = torch.nn.functional.cross_entropy(logits, batch["y"], reduction="none")
        delta2 = torch.autograd.grad(losses.sum(), logits, retain_graph=True)[0]  # per-sample dl/dh2
        n, first = x.shape[0], params["0.weight"].numel() + params["0.bias"].numel()
        size = first + params["2.weight"].numel() + params["2.bias"].numel()
        total = x.new_zeros(size, size)
        for _ in range(probes):
            r = draw(x2.shape, generator, x2.dtype)
            back = torch.autograd.grad(x2, h1, r, retain_graph=True)[0]  # act'(h1) * r, per sample
            a = torch.cat([x.new_zeros(n, first), (delta2[:, :, None] * r[:, None, :]).reshape(n, -1),
                           x.new_zeros(n, delta2.shape[1])], 1)  # b_2's input is the constant 1: no probe
            b = torch.cat([(back[:, :, None] * x[:, None, :]).reshape(n, -1), back, x.new_zeros(n, size - first)], 1)
            total += ((weights * a).T @ b + (weights * b).T @ a) / probes
        out.append(total)
    return out


def product_scores(curvature: Callable[[int], torch.Tensor], grads: Matrices, weights: Matrices, lr: float,
                   test: torch.Tensor, occurrences: list[O.Occurrence]) -> torch.Tensor:
    """Scores ``<g_test, lr w (prod_{k>t} (I - lr C_k)) g_{t,z}>`` per test point and occurrence, ``[n, m]``."""
    dim = test.shape[1]
    at_step: dict[int, list[int]] = {}
    for step, position in occurrences:
        at_step.setdefault(step, []).append(position)
    product, embeddings = torch.eye(dim, dtype=torch.float64), {}
    for t in range(len(grads) - 1, -1, -1):
        for position in at_step.get(t, []):
            embeddings[(t, position)] = lr * weights[t][position] * (product @ grads[t][position])
        product = product @ (torch.eye(dim, dtype=torch.float64) - lr * curvature(t))
    return torch.stack([test @ embeddings[o] for o in occurrences], dim=1)


def stand_ins(hessian: Matrices, ggn: Matrices, sampled: Matrices, fisher: Matrices, probed: dict[int, Matrices],
              mask: torch.Tensor) -> dict[str, Callable[[int], torch.Tensor]]:
    """Every curvature stand-in compared, by name: a function of the step (formed one at a time, since all of
    them together would hold 18 x 36 matrices of 2410^2 float64 numbers; the probed residuals, 3 x 36, are formed
    beforehand)."""
    across = 1.0 - mask
    probe_lines = {f"ggn_sampled_full_plus_residual_{m}_probes": (lambda k, m=m: sampled[k] + probed[m][k])
                   for m in probed}
    return {
        "hessian_full": lambda k: hessian[k], "hessian_per_layer": lambda k: hessian[k] * mask,
        "ggn_full": lambda k: ggn[k], "ggn_per_layer": lambda k: ggn[k] * mask,
        "ef_full": lambda k: fisher[k], "ef_per_layer": lambda k: fisher[k] * mask,
        "none": lambda k: torch.zeros_like(hessian[k]),
        "hessian_in_ggn_across": lambda k: hessian[k] * mask + ggn[k] * across,
        "ggn_in_hessian_across": lambda k: ggn[k] * mask + hessian[k] * across,
        "ggn_per_layer_x1.5": lambda k: 1.5 * ggn[k] * mask,
        "ef_full_plus_residual_across": lambda k: fisher[k] + (hessian[k] - ggn[k]) * across,
        "ef_in_hessian_across": lambda k: fisher[k] * mask + hessian[k] * across,
        "none_plus_residual_across": lambda k: (hessian[k] - ggn[k]) * across,
        "ggn_sampled_full": lambda k: sampled[k],
        "ggn_sampled_full_plus_residual_across": lambda k: sampled[k] + (hessian[k] - ggn[k]) * across,
        **probe_lines,
    }


#: Probes per sample of the probed-residual stand-ins.
PROBES = (1, 16, 64)


def problem_of(name: str) -> dict:
    """A fidelity setting's mlp problem replayed in float64: its net, lr, trajectory, batches, occurrences, exact
    TSLOO, the test gradients, and every step's per-sample gradients and weights."""
    setting = F.SETTINGS[name]
    problem = F.Problem("mlp", name, setting, F.N_OCCURRENCES, F.N_TEST, "/tmp")
    net, lr = problem.module().net.double(), float(setting["lr"])
    lrs = [lr] * len(problem.batches)
    trajectory = O.replay(net, O.params_of(net), problem.batches, lrs, return_trajectory=True)
    x_test, y_test = problem.test64["x"], problem.test64["y"]
    grads = [O.block_grads(net, params, batch["x"], batch["y"], "full")[0]
             for params, batch in zip(trajectory, problem.batches)]
    return {"net": net, "lr": lr, "trajectory": trajectory, "batches": problem.batches, "grads": grads,
            "occurrences": problem.occurrences, "weights": [O.sample_weights(b) for b in problem.batches],
            "truth": O.exact_tsloo(net, trajectory, problem.batches, lrs, problem.occurrences, x_test, y_test),
            "test": O.grads_at_test_points(net, trajectory[-1], x_test, y_test, "full")[0]}


def spearman_of(run: dict, curvature: Callable[[int], torch.Tensor]) -> float:
    """Mean Spearman with exact TSLOO of the product with ``curvature`` in place of the step Hessians."""
    scores = product_scores(curvature, run["grads"], run["weights"], run["lr"], run["test"], run["occurrences"])
    return round(O.mean_spearman(scores, run["truth"])[0], 4)


def run_setting(name: str) -> None:
    """Emit one ``curvature_limits`` line per stand-in, and the trace ratios, for one fidelity setting."""
    started = time.perf_counter()
    run = problem_of(name)
    net, trajectory, batches = run["net"], run["trajectory"], run["batches"]
    blocks = O.linear_blocks(net)
    names = [n for block in blocks for n in block]
    hessian = [O._batch_loss_hessian(net, params, batch, names) for params, batch in zip(trajectory, batches)]
    ggn, sampled = ggn_matrices(net, trajectory, batches)
    probed = {m: probed_residuals(net, trajectory, batches, m) for m in PROBES}
    fisher = [fisher_matrix(g, w) for g, w in zip(run["grads"], run["weights"])]
    mask = block_mask([sum(trajectory[0][n].numel() for n in block) for block in blocks])
    base = {"benchmark": "curvature_limits", "model": "mlp", "setting": name}
    for label, curvature in stand_ins(hessian, ggn, sampled, fisher, probed, mask).items():
        emit({**base, "stand_in": label, "spearman_vs_tsloo": spearman_of(run, curvature)})
    ratios = [float(torch.trace(h) / torch.trace(g)) for h, g in zip(hessian, ggn)]
    emit({**base, "trace_ratio_hessian_over_ggn": {"first": round(ratios[0], 3),
                                                    "median": round(sorted(ratios)[len(ratios) // 2], 3),
                                                    "last": round(ratios[-1], 3)},
          "seconds": round(time.perf_counter() - started, 1)})


def run_one_row(name: str, draws: int) -> None:
    """``--one-row``: which single pseudo-gradient row per sample estimates the GGN best (full ``M``): the sampled
    label that ``curvature="ggn"`` records against a sign or Gaussian mixture of every class (the same
    expectation), each over ``draws`` seeds, and the exact per-class GGN (C rows per sample) as the limit."""
    run = problem_of(name)
    jacobians, probs = logit_jacobians(run["net"], run["trajectory"], run["batches"])
    base = {"benchmark": "curvature_limits", "model": "mlp", "setting": name, "study": "one_row"}
    exact = exact_ggn(jacobians, probs, run["batches"])
    emit({**base, "stand_in": "ggn_full", "spearman_vs_tsloo": spearman_of(run, lambda k: exact[k])})
    draws_of = {"label": label_vectors, "signs": mixture_vectors,
                "gaussian": lambda p, g: mixture_vectors(p, g, gaussian=True)}
    for label, draw in draws_of.items():
        for seed in range(draws):
            generator = torch.Generator().manual_seed(100 + seed)
            curvatures = pseudo_gradient_curvatures(jacobians, [draw(p, generator) for p in probs], run["batches"])
            emit({**base, "stand_in": f"ggn_one_row_{label}", "seed": seed,
                  "spearman_vs_tsloo": spearman_of(run, lambda k: curvatures[k])})


def run_ef_variants(name: str) -> None:
    """``--ef-variants``: changes to the empirical Fisher that need no extra backward pass (full ``M``): each row
    rescaled to the GGN's trace in the logits (:func:`logit_traces`; per sample, per sample capped at 1 so it only
    shrinks, or one factor per step), the centred Fisher (:func:`centred_fisher`), and the exact per-class GGN in
    the last layer's block, which a linear output layer gives for free (its Jacobian is ``I (x) a``)."""
    run = problem_of(name)
    jacobians, probs = logit_jacobians(run["net"], run["trajectory"], run["batches"])
    exact = exact_ggn(jacobians, probs, run["batches"])
    traces = [logit_traces(p, b["y"]) for p, b in zip(probs, run["batches"])]
    grads, weights = run["grads"], run["weights"]
    sizes = [sum(run["trajectory"][0][n].numel() for n in block) for block in O.linear_blocks(run["net"])]
    last = last_block_mask(sizes)

    def fisher(k: int, scale: torch.Tensor | float = 1.0) -> torch.Tensor:
        return fisher_matrix(grads[k], weights[k] * scale)

    def per_step(k: int) -> float:
        ggn_trace, fisher_trace = traces[k]
        return float((weights[k] * ggn_trace).sum() / (weights[k] * fisher_trace).sum())

    variants = {
        "ggn_full": lambda k: exact[k], "ef_full": fisher,
        "ef_trace_scaled": lambda k: fisher(k, traces[k][0] / traces[k][1]),
        "ef_trace_scaled_capped": lambda k: fisher(k, (traces[k][0] / traces[k][1]).clamp(max=1.0)),
        "ef_trace_scaled_per_step": lambda k: fisher(k, per_step(k)),
        "ef_centred": lambda k: centred_fisher(grads[k], weights[k]),
        "ef_with_ggn_last_layer": lambda k: fisher(k) * (1 - last) + exact[k] * last,
    }
    base = {"benchmark": "curvature_limits", "model": "mlp", "setting": name, "study": "ef_variants"}
    for label, curvature in variants.items():
        emit({**base, "stand_in": label, "spearman_vs_tsloo": spearman_of(run, curvature)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", default="sgd_lr0.3,sgd_lr0.05", help="plain-SGD settings of fidelity.py")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one-row", type=int, default=0, metavar="DRAWS",
                        help="only the one-row GGN study (run_one_row), over DRAWS seeds of each draw")
    parser.add_argument("--ef-variants", action="store_true",
                        help="only the empirical-Fisher variants with no extra backward pass (run_ef_variants)")
    args = parser.parse_args()
    setup(args.threads)
    warnings.filterwarnings("ignore", message=".*functorch.*")
    emit({"benchmark": "curvature_limits", "machine": machine()})
    for name in args.settings.split(","):
        if F.SETTINGS[name].get("optimizer") != "sgd" or set(F.SETTINGS[name]) - {"optimizer", "lr"}:
            raise SystemExit(f"{name}: only plain SGD at a constant learning rate is supported.")
        if args.one_row:
            run_one_row(name, args.one_row)
        elif args.ef_variants:
            run_ef_variants(name)
        else:
            run_setting(name)


if __name__ == "__main__":
    main()
