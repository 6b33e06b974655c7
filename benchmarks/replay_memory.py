"""Peak memory and time of the exact replay mode (``DataValueEmbeddings.exact_influence``) as the model grows.

A stack of ``depth`` bias-free ``Linear(width, width)`` layers (MSE on random data; 64 samples, batch 16 or
``--batch``, SGD or ``--optimizer momentum|adamw``, 2 epochs: 8 steps at batch 16) is fitted once per width with the
callback's defaults; then ``exact_influence`` runs for 1 and 8 test points, through ``training_step`` on
one-sample batches (the default) and through a batched per-sample ``train_loss_fn``. Each line gives the call's
peak RSS growth (freed memory trimmed and ``VmHWM`` reset through ``/proc/self/clear_refs`` before it, so every
call is measured alone in one process) over the tracked weights' bytes, its wall time over the fit's, and the
largest relative difference of its scores from the ``training_step`` ones of the same targets.

    python benchmarks/replay_memory.py            # widths 256, 512, 1024; about 2 minutes on 2 cores
    python benchmarks/replay_memory.py --quick    # CI smoke: width 128
    python benchmarks/replay_memory.py --widths 512 --batch 64    # memory against the batch size
    python benchmarks/replay_memory.py --widths 512,1024 --optimizer adamw    # with optimizer state (or momentum)
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import tempfile
from pathlib import Path
from typing import Any

from _common import Stopwatch, emit, machine, setup  # noqa: E402  (puts the repository on sys.path)

import lightning as L
import torch
from torch import nn

from lightning_dve import DataValueEmbedding


class Stack(L.LightningModule):
    """``depth`` bias-free ``Linear(width, width)`` layers, MSE loss; plain SGD, SGD with momentum or AdamW."""

    def __init__(self, width: int, depth: int, optimizer: str = "sgd") -> None:
        super().__init__()
        self.optimizer = optimizer
        self.net = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(depth)])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return nn.functional.mse_loss(self.net(batch["x"]), batch["y"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=1e-4)
        return torch.optim.SGD(self.parameters(), lr=1e-3, momentum=0.9 if self.optimizer == "momentum" else 0.0)


def per_sample_loss(module: Stack, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The same loss per sample from one batched forward (``train_loss_fn``)."""
    return nn.functional.mse_loss(module.net(batch["x"]), batch["y"], reduction="none").mean(dim=1)


def data(width: int, n: int) -> list[dict[str, Any]]:
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, width, generator=generator), torch.randn(n, width, generator=generator)
    return [{"x": x[i], "y": y[i], "index": i} for i in range(n)]


def resident() -> tuple[int, int]:
    """``(VmRSS, VmHWM)`` of this process in bytes."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def measured(call: Any) -> tuple[Any, float, int]:
    """``(call(), seconds, peak RSS growth in bytes)``: the memory earlier calls freed is given back to the system
    (glibc's ``malloc_trim``) and the peak reset just before the call."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    before = resident()[0]
    with Stopwatch() as sw:
        out = call()
    return out, sw.seconds, resident()[1] - before


def run_width(width: int, depth: int, batch: int, optimizer: str, save: Path) -> None:
    train = data(width, 64)
    torch.manual_seed(0)
    module = Stack(width, depth, optimizer)
    dve = DataValueEmbedding(save_dir=save / f"w{width}", sample_ids="index", report=None)
    trainer = L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[dve])
    with Stopwatch() as fit:
        trainer.fit(module, torch.utils.data.DataLoader(train, batch_size=batch))
    weights = sum(p.numel() * p.element_size() for p in module.parameters())
    for n_test in (1, 8):
        test = torch.utils.data.default_collate(data(width, 64 + n_test)[64:])
        reference = None
        for loss in ("training_step", "train_loss_fn"):
            extra = {"train_loss_fn": per_sample_loss} if loss == "train_loss_fn" else {}
            result, seconds, grown = measured(lambda: dve.embeddings.exact_influence(module, test, **extra))
            reference = result.scores if reference is None else reference
            diff = float((result.scores - reference).abs().max() / reference.abs().max().clamp_min(1e-300))
            emit({"benchmark": "replay_memory", "width": width, "depth": depth, "optimizer": optimizer,
                  "params": weights // 4,
                  "weights_mib": round(weights / 2**20, 1), "batch": batch, "steps": 2 * -(-64 // batch),
                  "test_points": n_test, "loss": loss, "peak_growth_mib": round(grown / 2**20),
                  "peak_over_weights": round(grown / weights, 1), "seconds": round(seconds, 2),
                  "over_fit": round(seconds / fit.seconds, 1),
                  "max_rel_diff_vs_training_step": diff})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--widths", default="256,512,1024", help="comma-separated layer widths")
    parser.add_argument("--batch", type=int, default=16, help="training batch size (64 samples, 2 epochs)")
    parser.add_argument("--optimizer", choices=("sgd", "momentum", "adamw"), default="sgd")
    args = parser.parse_args()
    setup(args.threads)
    emit({"benchmark": "replay_memory", "kind": "machine", **machine()})
    with tempfile.TemporaryDirectory() as folder:
        for width in ((128,) if args.quick else [int(w) for w in args.widths.split(",")]):
            run_width(width, 4, args.batch, args.optimizer, Path(folder))


if __name__ == "__main__":
    main()
