"""The gradient part of the loss-reduction check (``loss_checks._gradient_deviation``), which runs at train end and
in every query: its value against an explicit float64 product, the caller's gradients left as they were, and its
memory, which must not grow with the number of losses compared (it took 15 times the tracked weights' bytes).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_dve.loss_checks import _gradient_deviation

ROOT = Path(__file__).resolve().parents[1]


class Three(nn.Module):
    """Three weights: ``a`` in every loss, ``b`` in some, ``c`` in none (its gradient stays ``None``)."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.a, self.b, self.c = (nn.Parameter(torch.randn(5, 4, generator=generator, dtype=dtype)) for _ in range(3))

    def losses(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``[L({a,b}), L({a}), L({b})]``-like losses of ``x``'s rows; the first single loss leaves ``b`` out."""
        pair = (self.a @ x[0]).tanh().sum() + (self.b @ x[1]).square().sum() + (self.a @ x[1]).sin().sum()
        return [pair, (self.a @ x[0]).tanh().sum(), (self.b @ x[1]).square().sum() + (self.a @ x[1]).sum()]


def explicit_deviation(module: Three, x: torch.Tensor, scales: list[float]) -> float:
    """The same quantity from flattened float64 gradients of each loss (``None`` as zero)."""
    params = [module.a, module.b, module.c]
    flat = []
    for loss in module.losses(x):
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        flat.append(torch.cat([(torch.zeros_like(p) if g is None else g).double().flatten()
                               for p, g in zip(params, grads)]))
    parts = [s * g for s, g in zip(scales, flat[1:])]
    return float((flat[0] - sum(parts)).norm()) / float(sum(p.norm() for p in parts))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_the_gradient_deviation_equals_the_explicit_product_and_leaves_the_callers_gradients(
        dtype: torch.dtype) -> None:
    module = Three(dtype)
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(1), dtype=dtype)
    scales = [0.7, 1.3]
    held = [torch.full_like(p, 3.0) for p in (module.a, module.b)]
    module.a.grad, module.b.grad = (h.clone() for h in held)
    got = _gradient_deviation(module, module.losses(x), scales, [module.a, module.b, module.c])
    want = explicit_deviation(module, x, scales)
    assert want > 0.1  # the losses are far from the declared weights: a real difference is measured
    assert got == pytest.approx(want, rel={torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype])
    assert torch.equal(module.a.grad, held[0]) and torch.equal(module.b.grad, held[1]) and module.c.grad is None


def test_equal_weights_deviate_by_nothing() -> None:
    """``L({a,b}) = L({a}) + L({b})`` exactly, scales 1: the deviation is 0 to round-off."""
    module = Three(torch.float64)
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    _, first, second = module.losses(x)
    _, first_again, second_again = module.losses(x)
    deviation = _gradient_deviation(module, [first + second, first_again, second_again], [1.0, 1.0],
                                    [module.a, module.b, module.c])
    assert deviation < 1e-14


def test_the_checks_peak_memory_is_about_two_copies_of_the_tracked_weights() -> None:
    """``check_reduction`` on 8 float32 ``[2048, 2048]`` weights (128 MiB), in a fresh process (its peak RSS): the
    backward's own ``.grad`` and one residual, about 2.2 times their bytes, where a float64 copy of the gradients
    per loss took 15.3 times (1.9 GiB)."""
    code = textwrap.dedent("""
        import resource, torch
        from torch import nn
        from lightning_dve.config import LossReduction
        from lightning_dve.loss_checks import check_reduction

        class Deep(nn.Module):
            def __init__(self):
                super().__init__()
                self.net = nn.Sequential(*[nn.Linear(2048, 2048, bias=False) for _ in range(8)])

            def training_step(self, batch, batch_idx):
                return nn.functional.mse_loss(self.net(batch["x"]), batch["y"])

        torch.manual_seed(0)
        module = Deep()
        batch = {"x": torch.randn(4, 2048), "y": torch.randn(4, 2048)}
        params = [layer.weight for layer in module.net]
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        check_reduction(module, batch, LossReduction.MEAN, None, params)
        grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
        print(grown / sum(p.numel() * p.element_size() for p in params))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert float(done.stdout.split()[-1]) < 3.5, done.stdout
