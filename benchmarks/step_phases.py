"""Host time per optimizer step in each of the callback's hooks, inside real ``Trainer.fit`` runs.

Wraps the callback's Lightning hooks, the capture hooks (forward and output-gradient), ``take`` (the rows' copy
to the host), the step assembly, the guards' post-step sampling and the step writer with ``perf_counter``
timers (no device wait: on a GPU these are the host's times, which bound a launch-bound step), and runs
``capture_overhead.py``'s LM (width 256, seq 128, batch 16, 96 steps) and a tiny LM (width 32, seq 16), each 3
times without and with the callback at k = 1024. ``write(thread)`` runs in the writer thread on a GPU (inline on
the CPU), where it competes with the training thread for the GIL. One JSON line per model.

    python benchmarks/step_phases.py --accelerator gpu --threads 16    # on a GPU
    .venv/bin/python benchmarks/step_phases.py --models tiny           # on the CPU
    .venv/bin/python benchmarks/step_phases.py --quick                 # CI smoke
"""

from __future__ import annotations

import argparse

import _common as C
import capture_overhead as CO
from lightning_dve import DataValueEmbedding, capture, guards, sync, writer

MODELS = {
    "lm": dict(width=256, layers=4, heads=4, seq_len=128),
    "tiny": dict(width=32, layers=4, heads=4, seq_len=16),
}
TIMED: list[tuple[type, str, str]] = [
    *[(DataValueEmbedding, hook, hook) for hook in ("on_train_batch_start", "on_before_backward", "on_after_backward",
                                                    "on_before_optimizer_step", "on_train_batch_end", "_micro_batch")],
    (capture.GradientCapture, "_on_forward", "forward_hook"),
    (capture.GradientCapture, "_on_output_grad", "backward_hook"),
    (capture.GradientCapture, "take", "take"), (sync.StepAssembler, "close", "assembler_close"),
    (guards.StepGuard, "_after_step", "guard_after_step"), (guards.StepGuard, "check_applied", "check_applied"),
    (writer.StepWriter, "_write", "write(thread)"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", default="lm,tiny")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="CI smoke: the tiny LM, 8 steps, one repeat")
    args = parser.parse_args()
    steps = 8 if args.quick else 96
    if args.quick:
        args.models, args.repeats = "tiny", 1
    C.setup(args.threads)
    C.emit({"benchmark": "step_phases", "kind": "machine", **C.machine()})
    timers = C.FunctionTimers()
    for owner, name, label in TIMED:
        timers.wrap(owner, name, label)
    try:
        run_models(args, steps, timers)
    finally:  # the timers leave the package as it was (the smoke test runs every script in one process)
        timers.restore()


def run_models(args: argparse.Namespace, steps: int, timers: C.FunctionTimers) -> None:
    """Time each model's fits without and with the callback; one JSON line per model."""
    for model in args.models.split(","):
        module = MODELS[model]
        cfg = dict(n=16 * steps, batch=16, max_steps=-1, seq=module["seq_len"], module=module,
                   accelerator=args.accelerator)
        ds = CO.dataset("lm", cfg)
        CO.one_fit("lm", cfg, ds, "off")  # warm-up
        CO.one_fit("lm", cfg, ds, 1024)
        timers.reset()
        pairs = [(CO.one_fit("lm", cfg, ds, "off"), CO.one_fit("lm", cfg, ds, 1024)) for _ in range(args.repeats)]
        recorded = sum(on["steps"] for _, on in pairs)
        C.emit({"benchmark": "step_phases", "model": model, "accelerator": args.accelerator, "k": 1024,
                "off_ms_per_step": [round(1000 * off["train_loop_s"] / off["steps"], 2) for off, _ in pairs],
                "on_ms_per_step": [round(1000 * on["train_loop_s"] / on["steps"], 2) for _, on in pairs],
                "train_end_s": [round(on["train_end_s"], 3) for _, on in pairs],
                "phase_ms_per_step": {k: round(1000 * v / recorded, 3)
                                      for k, v in sorted(timers.total.items(), key=lambda kv: -kv[1])}})


if __name__ == "__main__":
    main()
