"""The FLOP floor of the callback: what capture and recursion add to a training step in arithmetic alone.

For each case (model : projection dim) this counts, with ``torch.utils.flop_counter.FlopCounterMode``, the
floating-point operations of

- one plain training step (forward, backward; the SGD update is elementwise and not counted);
- the same step with ``capture.GradientCapture`` attached: the difference is the capture's projections and
  per-sample outer products (method.md §3), split by operator;
- the train-end recursion per step: ``BackwardRecursion.block`` over one block of ``recursion_ranks.BLOCK_ROWS``
  occurrences with the layout the callback resolves (``layout="auto"``), divided by the block's steps.

``floor_fit_ratio = 1 + (capture + recursion) / training`` is the fit ratio the callback cannot go below on any
hardware where its products run at the training products' rate: everything else it does (hook dispatch, the
store, checks) comes on top. Wall times of the plain and the capture step (medians, interleaved) give the rate
the machine reaches (``training_gflops``, ``capture_extra_gflops``). The floor is meaningful where training is
arithmetic-bound (the transformer LM); the digits MLP and CNN steps are bound by per-step overheads instead.

    .venv/bin/python benchmarks/flop_floor.py                        # the LM at 1024, 256 and 64 (~1 min)
    .venv/bin/python benchmarks/flop_floor.py --cases lm:1024 --quick
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from typing import Any

import _common as C
from step_breakdown import build

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode



def _attention(query: torch.Size, key: torch.Size, value: torch.Size, *args: Any, **kwargs: Any) -> int:
    return flop_counter.sdpa_flop_count(query, key, value)


def _attention_backward(grad: torch.Size, query: torch.Size, key: torch.Size, value: torch.Size, *args: Any,
                        **kwargs: Any) -> int:
    return flop_counter.sdpa_backward_flop_count(grad, query, key, value)


#: torch counts its flash attention kernels but not their CPU variants, which the LM runs on this machine
CPU_ATTENTION = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _attention,
                 torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _attention_backward}


def counted(run: Any) -> dict[str, float]:
    """FLOPs of ``run()`` by operator (attention counted without its causal mask, as torch counts it)."""
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as counter:
        run()
    out: dict[str, float] = defaultdict(float)
    for op, flops in counter.get_flop_counts()["Global"].items():
        out[str(op).removeprefix("aten.")] += flops
    return dict(out)


def floor(kind: str, dim: int, repeats: int, quick: bool) -> dict[str, Any]:
    """Count and time one case; return its JSON record."""
    from lightning_dve import capture, recursion_ranks
    from lightning_dve.config import DVEConfig
    from lightning_dve.recursion import BackwardRecursion
    from lightning_dve.store import StepRecord

    net, loss_fn, batch, exclude = build(kind, quick)
    config = DVEConfig(projection_dim=dim, exclude=exclude)
    tracked = capture.resolve_layers(net, config)
    hooks = capture.GradientCapture(tracked)
    size = batch["y"].shape[0]
    weights = torch.full((size,), 1.0 / size, dtype=torch.float64)

    def plain() -> None:
        net.zero_grad()
        loss_fn(net(batch["x"]), batch["y"]).backward()

    def captured() -> dict[str, torch.Tensor]:
        hooks.attach()
        hooks.begin()
        plain()
        rows = hooks.finish(weights)
        hooks.detach()
        return rows

    training = counted(plain)
    with_capture = counted(captured)
    extra = {op: with_capture.get(op, 0.0) - training.get(op, 0.0) for op in with_capture}
    rows = {name: r.to(torch.float32) for name, r in captured().items()}
    steps = max(1, recursion_ranks.BLOCK_ROWS // size)
    lrs = torch.full((len(rows),), 0.01, dtype=torch.float64)
    records = [StepRecord(s, torch.arange(size) + s * size, weights, lrs, rows) for s in reversed(range(steps))]
    layout = config.resolved(sum(t.projection.dim for t in tracked.values())).layout
    recursion = BackwardRecursion(list(rows), layout)
    recursion_flops = sum(counted(lambda: recursion.block(records)).values()) / steps
    times: dict[str, list[float]] = {"plain": [], "capture": []}
    for _ in range(repeats):
        for name, run in (("plain", plain), ("capture", captured)):
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    plain_s, capture_s = (statistics.median(times[k][1:] or times[k]) for k in ("plain", "capture"))
    gflop = lambda flops: round(flops / 1e9, 4)  # noqa: E731
    train, added = sum(training.values()), sum(extra.values())
    return {
        "benchmark": "flop_floor", "model": kind, "projection_dim": dim, "batch": size, "layout": layout.value,
        "sum_k": sum(t.projection.dim for t in tracked.values()), "tracked_layers": len(tracked),
        "training_gflop_per_step": gflop(train), "training_by_op": {k: gflop(v) for k, v in training.items()},
        "capture_gflop_per_step": gflop(added), "capture_by_op": {k: gflop(v) for k, v in extra.items() if v},
        "recursion_gflop_per_step": gflop(recursion_flops),
        "floor_fit_ratio": round(1 + (added + recursion_flops) / train, 4),
        "plain_step_ms": round(1000 * plain_s, 2), "capture_step_ms": round(1000 * capture_s, 2),
        "training_gflops": round(train / plain_s / 1e9, 1),
        "capture_extra_gflops": round(added / max(capture_s - plain_s, 1e-9) / 1e9, 1),
        "note": "forward + backward only; capture_extra_gflops is the added FLOPs over the added wall time",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="lm:1024,lm:256,lm:64")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="small LM, 3 repeats")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    C.setup(args.threads)
    C.emit({"benchmark": "flop_floor", "kind": "machine", **C.machine(), "loadavg_start": C.loadavg()})
    for case in args.cases.split(","):
        kind, dim = case.split(":")
        with C.Contention() as contention:
            record = floor(kind, int(dim), 3 if args.quick else args.repeats, args.quick)
        C.emit({**record, "foreign_load": round(contention.foreign, 3)})


if __name__ == "__main__":
    main()
