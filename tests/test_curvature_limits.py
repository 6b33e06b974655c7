"""The stand-ins of ``benchmarks/curvature_limits.py`` that are not formed by ``torch.func`` directly, against it
(README, "Which curvature would reach 0.85?"): the probes' expectation is the Hessian minus the Gauss-Newton matrix
between the two layers of ``Linear -> tanh -> Linear``, the one-label GGN averages to the per-class one, every
one-row draw of ``--one-row`` has the cross-entropy Hessian as its expectation, and ``--ef-variants``' pieces hold."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from tests import oracles as O

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def problem():  # noqa: ANN201
    """The benchmark module, a ``4-5-3`` tanh net in float64 with its parameters, and a batch of 6."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import curvature_limits
    finally:
        sys.path.remove(str(BENCHMARKS))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    batch = {"x": torch.randn(6, 4, dtype=torch.float64), "y": torch.randint(0, 3, (6,))}
    return curvature_limits, net, O.params_of(net), batch


def test_the_probes_expectation_is_the_hessians_residual_between_the_layers() -> None:
    CL, net, params, batch = problem()
    names = [n for block in O.linear_blocks(net) for n in block]
    hessian = O._batch_loss_hessian(net, params, batch, names)
    exact_ggn = CL.ggn_matrices(net, [params], [batch])[0][0]
    across = 1.0 - CL.block_mask([4 * 5 + 5, 5 * 3 + 3])
    residual = (hessian - exact_ggn) * across

    count = iter(range(5))

    def basis(shape: torch.Size, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
        """``sqrt(5) e_j`` for every sample, ``j = 0..4`` in turn: five such probes average to ``E[r r^T] = I``."""
        out = torch.zeros(shape, dtype=dtype)
        out[:, next(count)] = 5**0.5
        return out

    expectation = CL.probed_residuals(net, [params], [batch], probes=5, draw=basis)[0]
    torch.testing.assert_close(expectation, residual, atol=1e-12, rtol=0)
    assert float(residual.norm()) > 0.05  # a residual to estimate
    one = CL.probed_residuals(net, [params], [batch], probes=1)[0]  # one sign probe: unbiased, not exact
    assert float((one - residual).norm()) > 1e-3 and float((one * (1 - across)).abs().max()) == 0.0


def test_the_one_label_gauss_newton_matrix_averages_to_the_per_class_one() -> None:
    """2000 draws (one per copy of the step): the mean is within 5 standard errors of the per-class GGN everywhere."""
    CL, net, params, batch = problem()
    draws = 2000
    exact, sampled = CL.ggn_matrices(net, [params] * draws, [batch] * draws)
    stacked = torch.stack(sampled)
    error = (stacked.mean(0) - exact[0]).abs()
    standard_error = stacked.std(0) / draws**0.5
    assert bool((error <= 5 * standard_error + 1e-12).all())
    assert float(stacked.std(0).max()) > 0 and len({float(m.norm()) for m in sampled[:10]}) == 10  # random draws


def test_every_one_row_draw_has_the_cross_entropy_hessian_as_expectation() -> None:
    """``--one-row``'s draws (the sampled label, the sign and the Gaussian mixture of all classes): over 20000 draws
    the mean of ``v v^T`` is within 5 standard errors of ``diag p - p p^T`` everywhere, and the draws differ."""
    CL = problem()[0]
    prob = torch.softmax(torch.tensor([[2.0, 0.5, -1.0, 0.0]], dtype=torch.float64), dim=1).expand(20000, 4)
    target = torch.diag(prob[0]) - torch.outer(prob[0], prob[0])
    draws = {"label": CL.label_vectors, "signs": CL.mixture_vectors,
             "gaussian": lambda p, g: CL.mixture_vectors(p, g, gaussian=True)}
    for name, draw in draws.items():
        v = draw(prob, torch.Generator().manual_seed(3))
        outer = v[:, :, None] * v[:, None, :]
        error = (outer.mean(0) - target).abs()
        assert bool((error <= 5 * outer.std(0) / len(v) ** 0.5 + 1e-12).all()), name
        assert len({tuple(row.tolist()) for row in v[:50]}) > 1, name


def test_the_ef_variants_rescale_to_the_gauss_newton_trace_and_centre_the_gradients() -> None:
    """``--ef-variants``: the GGN's trace in the logits is the mean squared norm of the row ``curvature="ggn"``
    records (20000 draws, within 5 standard errors) and the Fisher's is ``|p - onehot(y)|^2``; the centred Fisher is
    the Fisher less ``(sum w) m m^T`` and ignores a shift of every gradient; the last-layer mask is that block."""
    CL = problem()[0]
    prob = torch.softmax(torch.tensor([[2.0, 0.5, -1.0, 0.0], [0.0, 0.0, 3.0, -2.0]], dtype=torch.float64), dim=1)
    labels = torch.tensor([1, 2])
    ggn_trace, fisher_trace = CL.logit_traces(prob, labels)
    target = torch.tensor([[0.0, 1, 0, 0], [0, 0, 1, 0]], dtype=torch.float64)
    torch.testing.assert_close(fisher_trace, (prob - target).square().sum(1), atol=1e-15, rtol=0)
    for i in range(2):
        norms = CL.label_vectors(prob[i].expand(20000, 4), torch.Generator().manual_seed(i)).square().sum(1)
        assert abs(float(norms.mean() - ggn_trace[i])) <= 5 * float(norms.std()) / 20000**0.5
    assert float(ggn_trace[1] / fisher_trace[1]) > 1.5  # a well-fit sample: the Fisher is the smaller

    grads, weights = torch.randn(6, 5, dtype=torch.float64), torch.rand(6, dtype=torch.float64)
    mean = (weights[:, None] * grads).sum(0) / weights.sum()
    expected = grads.T @ (weights[:, None] * grads) - weights.sum() * torch.outer(mean, mean)
    torch.testing.assert_close(CL.centred_fisher(grads, weights), expected)
    torch.testing.assert_close(CL.centred_fisher(grads + torch.randn(5, dtype=torch.float64), weights), expected)

    mask = CL.last_block_mask([3, 2])
    assert float(mask.sum()) == 4.0 and bool(mask[3:, 3:].all())
