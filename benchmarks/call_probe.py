"""The probe of a fit's first micro-batches for a table shared by every sample, against its former form, as JSON lines.

For the first ``call_checks.PROBED`` micro-batches the forward hooks fingerprint each tracked layer's input
(``call_checks.fingerprint``) and compare it with the previous micro-batch's. Until session 42 the fingerprint was
three float64 sums of a copy of the whole input (:func:`former_fingerprint`, kept here as the baseline); it is
now each input's rows times a fixed random vector. Both are timed on the inputs of the benchmark LM's 17 tracked
``Linear`` layers (``capture_overhead.py``: batch 16, sequence 128, width 256; the MLP's second layers take 1024),
interleaved, as ms per micro-batch; the ratio is the median of the paired ratios.

    python benchmarks/call_probe.py            # 9 repeats, a few seconds on 2 cores
    python benchmarks/call_probe.py --quick    # CI smoke: one small layer, 1 repeat
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import _common as C  # also puts the repository on sys.path

import torch  # noqa: E402

from lightning_dve.call_checks import fingerprint  # noqa: E402


def former_fingerprint(tensors: list[Any], rows_alike: bool = False) -> tuple[float, ...] | None:
    """``call_checks.fingerprint`` before session 42: float64 sum, sum of squares and position-weighted sum."""
    tensors = [t.detach() for t in tensors if isinstance(t, torch.Tensor) and t.numel()]
    if rows_alike and all(t.shape[0] < 2 or bool((t == t[:1]).all()) for t in tensors):
        return None
    flat = [t.reshape(-1).to(torch.float64) for t in tensors]
    return tuple(float(v) for t in flat for v in (t.sum(), t.square().sum(), t @ torch.arange(len(t)).to(t)))


def micro_batch_ms(probe: Any, inputs: list[torch.Tensor]) -> float:
    """Milliseconds to fingerprint every layer input of one micro-batch."""
    start = time.perf_counter()
    for x in inputs:
        probe([x], rows_alike=True)
    return 1000 * (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="CI smoke: one [4, 8, 32] input, 1 repeat")
    C.add_contention_args(parser)
    args = parser.parse_args()
    C.setup(args.threads)
    shapes = [(4, 8, 32)] if args.quick else [(16, 128, 256)] * 13 + [(16, 128, 1024)] * 4
    repeats = 1 if args.quick else args.repeats
    C.emit({"benchmark": "call_probe", "machine": C.machine(), "inputs": len(shapes), "shapes": sorted(set(shapes))})
    inputs = [torch.randn(*shape, generator=torch.Generator().manual_seed(i)) for i, shape in enumerate(shapes)]
    probes = {"former": former_fingerprint, "current": fingerprint}
    for probe in probes.values():  # warm-up (the random vectors of the current form are made once per length)
        micro_batch_ms(probe, inputs)
    times: dict[str, list[float]] = {name: [] for name in probes}
    for repeat in range(repeats):
        for name in (("former", "current") if repeat % 2 == 0 else ("current", "former")):
            run = C.measured(lambda: {"ms": micro_batch_ms(probes[name], inputs)}, args.quiet, args.retries,
                             args.max_wait)
            times[name].append(run["ms"])
    C.emit({"benchmark": "call_probe", "former_ms_per_micro_batch": C.stats(times["former"]),
            "current_ms_per_micro_batch": C.stats(times["current"]),
            "current_over_former": C.ratio_stats(times["current"], times["former"])})
    C.emit({"benchmark": "call_probe", "done": True})


if __name__ == "__main__":
    main()
