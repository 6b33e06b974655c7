"""The train-end recursion over steps where norm clipping bound, over the same steps unclipped, as JSON lines.

Where clipping binds, the recursion projects each step's rows off its gradient direction (``clipping.py``) and
runs the plain-SGD blocks with that projected left factor, a Gram matrix and a triangular solve more per block
than the empirical Fisher's shortcut. Records are synthetic with the LM's shapes (19 layers x k = 1024, one ``M``
per layer, 16 rows a step, 256 rows a block as the callback runs them), float32 rows, ``T`` steps; both variants
are timed in one process, interleaved, and the ratio is the median of the paired ratios.

    python benchmarks/clip_recursion.py            # 64 steps x 5 repeats, ~10 s on 2 cores
    python benchmarks/clip_recursion.py --quick    # CI smoke: 2 layers, 8 steps, 1 repeat
"""

from __future__ import annotations

import argparse
import time

import _common as C  # also puts the repository on sys.path

import torch  # noqa: E402

from lightning_dve.clipping import clip_dots  # noqa: E402
from lightning_dve.recursion import BackwardRecursion  # noqa: E402
from lightning_dve.recursion_ranks import BLOCK_ROWS  # noqa: E402
from lightning_dve.store import StepRecord  # noqa: E402


def records(layers: int, width: int, batch: int, steps: int, clipped: bool) -> list[StepRecord]:
    """``steps`` random records, latest first; ``clipped``: each with a norm 1.1 x its tracked gradient's."""
    gen, names, out = torch.Generator().manual_seed(0), [f"layer{i}" for i in range(layers)], []
    for step in range(steps):
        grads = {name: torch.randn(batch, width, generator=gen) for name in names}
        weights = torch.full((batch,), 1.0 / batch, dtype=torch.float64)
        rows = torch.cat(list(grads.values()), dim=1)
        norm = 1.1 * float((weights.float().unsqueeze(1) * rows).sum(0).norm()) if clipped else 0.0
        out.append(StepRecord(step, torch.arange(batch) + batch * step, weights,
                              torch.full((layers,), 0.01, dtype=torch.float64), grads, clip_norm=norm,
                              clip_dots=clip_dots({"grads": rows}, weights, norm)))
    return out[::-1]


def recursion_seconds(steps: list[StepRecord], names: list[str], per_block: int) -> float:
    recursion = BackwardRecursion(names, "per_layer", curvature="empirical_fisher")
    start = time.perf_counter()
    for lo in range(0, len(steps), per_block):
        recursion.block(steps[lo:lo + per_block])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="CI smoke: 2 layers of 64, 8 steps, 1 repeat")
    C.add_contention_args(parser)
    args = parser.parse_args()
    C.setup(args.threads)
    layers, width, batch = (2, 64, 16) if args.quick else (19, 1024, 16)
    steps, repeats = (8, 1) if args.quick else (args.steps, args.repeats)
    C.emit({"benchmark": "clip_recursion", "machine": C.machine(), "layers": layers, "k": width, "batch": batch,
            "steps": steps})
    names = [f"layer{i}" for i in range(layers)]
    data = {clipped: records(layers, width, batch, steps, clipped) for clipped in (False, True)}
    times: dict[bool, list[float]] = {False: [], True: []}
    for repeat in range(repeats):
        for clipped in ((False, True) if repeat % 2 == 0 else (True, False)):
            run = C.measured(lambda: {"s": recursion_seconds(data[clipped], names, BLOCK_ROWS // batch)},
                             args.quiet, args.retries, args.max_wait)
            times[clipped].append(run["s"])
    C.emit({"benchmark": "clip_recursion", "plain_s": C.stats(times[False]), "clipped_s": C.stats(times[True]),
            "clipped_over_plain": C.ratio_stats(times[True], times[False]),
            "ms_per_step_plain": round(1000 * sorted(times[False])[len(times[False]) // 2] / steps, 2)})
    C.emit({"benchmark": "clip_recursion", "done": True})


if __name__ == "__main__":
    main()
