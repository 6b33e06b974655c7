"""The momentum form of the backward recursion run step by step, in milliseconds per step, as JSON lines.

SGD with momentum and Adam carry ``[K, K]`` maps from step to step (``recursion.BackwardRecursion``, class
docstring); they go step by step where a term is not one scalar per group (exact-mode Adam's per-coordinate rate,
the second-moment channel, layers of one group with different terms) and in blocks otherwise. Records are
synthetic (SGD momentum 0.9, weight decay 0.01, 32 rows a step, one group of width ``K``); each configuration is
timed over ``--steps`` steps, ``--repeats`` times, median. Since session 35 the step's ``[K, K]`` work matrices
are ones earlier steps left (``BackwardRecursion._work``): a fresh one of 46 MB (``K = 2410`` in float64, the
fidelity MLP in exact mode) is faulted into memory page by page, which cost more than the arithmetic on it.

    python benchmarks/momentum_recursion.py            # K = 1024 / 2410 / 4096, ~30 s on 2 cores
    python benchmarks/momentum_recursion.py --quick    # CI smoke: K = 64, 3 steps, 1 repeat
"""

from __future__ import annotations

import argparse
import time

import _common as C  # also puts the repository on sys.path

import torch  # noqa: E402

from lightning_dve.recursion import BackwardRecursion  # noqa: E402
from lightning_dve.store import StepRecord  # noqa: E402


def records(width: int, dtype: torch.dtype, steps: int, batch: int = 32) -> list[StepRecord]:
    """``steps`` random momentum records of one layer ``"a"`` of ``width`` columns, latest first."""
    gen, out = torch.Generator().manual_seed(0), []
    scalar = lambda value: torch.tensor([value], dtype=torch.float64)  # noqa: E731
    for step in range(steps):
        optim = {"momentum": scalar(0.9), "gain": scalar(1.0), "weight_decay": scalar(0.01)}
        out.append(StepRecord(step, torch.arange(batch), torch.full((batch,), 1.0 / batch, dtype=torch.float64),
                              scalar(0.01), {"a": torch.randn(batch, width, generator=gen).to(dtype)}, 0, optim))
    return out[::-1]


def ms_per_step(steps: list[StepRecord]) -> float:
    recursion = BackwardRecursion(["a"], "per_layer")
    start = time.perf_counter()
    for record in steps:
        recursion.step(record)
    return 1e3 * (time.perf_counter() - start) / len(steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="CI smoke: K = 64, 3 steps, 1 repeat")
    args = parser.parse_args()
    C.setup(args.threads)
    C.emit({"benchmark": "momentum_recursion", "kind": "machine", **C.machine()})
    shapes = [(64, torch.float32)] if args.quick else [(1024, torch.float32), (2410, torch.float64),
                                                       (4096, torch.float32)]
    steps, repeats = (3, 1) if args.quick else (args.steps, args.repeats)
    for width, dtype in shapes:
        rows = records(width, dtype, steps)
        times = [ms_per_step(rows) for _ in range(repeats)]
        C.emit({"benchmark": "momentum_recursion", "K": width, "dtype": str(dtype).removeprefix("torch."),
                "steps": steps, "repeats": repeats, "ms_per_step": C.stats(times)})


if __name__ == "__main__":
    main()
