"""Which training digits, used at which step, shaped the model? DVEmb on sklearn's 8x8 digits (CPU, offline).

An MLP is trained with SGD on ``sklearn.datasets.load_digits`` (bundled, no download) with the
``DataValueEmbedding`` callback. When training ends the callback scores every recorded (step, sample) against
the mean validation-loss gradient and writes the report: the per-step influence curve (raw and divided by the
learning rate), the early / middle / late stage summary with the detected phases, a histogram of per-sample
influence and the most helpful and harmful training digits.

    python examples/digits.py                       # offline W&B run (sync later with `wandb sync`)
    python examples/digits.py --logger tensorboard  # or: csv, none
    python examples/digits.py --max-epochs 1 --train-size 200 --val-size 100   # a quick smoke run
    python examples/digits.py --devices 2           # DDP on 2 CPU processes (gloo); --accelerator gpu for GPUs

Everything lands under ``--out`` (default ``./digits_run``): the store and ``dve/report/`` (CSV, JSON, PNG)
plus the logger's folder. Under DDP (``--devices`` > 1) every rank records its own samples, rank 0's ``dve``
folder ends up holding the whole run, and only rank 0 reports and prints.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_dve import DataValueEmbedding
from lightning_dve.config import ReportConfig
from lightning_dve.reporting import format_summary


class Digits(Dataset):
    """Digits as ``{"x": float32 [1, 8, 8] in [0, 1], "y": long, "index": long}``; ``index`` is the sample id."""

    def __init__(self, indices: torch.Tensor) -> None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        self.indices = indices
        self.x = torch.as_tensor(digits.images, dtype=torch.float32)[indices].unsqueeze(1) / 16.0
        self.y = torch.as_tensor(digits.target, dtype=torch.long)[indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "y": self.y[i], "index": self.indices[i]}


class DigitsMLP(L.LightningModule):
    """``Flatten -> Linear(64, h) -> Tanh -> Linear(h, h) -> Tanh -> Linear(h, 10)``, SGD with a cosine schedule."""

    def __init__(self, hidden: int = 64, lr: float = 0.2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                 nn.Linear(hidden, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = F.cross_entropy(self(batch["x"]), batch["y"])
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self(batch["x"])
        self.log("val/loss", F.cross_entropy(logits, batch["y"]))
        self.log("val/acc", (logits.argmax(dim=1) == batch["y"]).float().mean())

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr)
        steps = self.trainer.estimated_stepping_batches
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps, eta_min=0.1 * self.hparams.lr)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def make_logger(kind: str, out: Path) -> Logger | bool:
    """The logger chosen on the command line (an offline W&B run by default)."""
    if kind == "wandb":
        return WandbLogger(project="lightning_dve-digits", save_dir=str(out), offline=True)
    if kind == "tensorboard":
        return TensorBoardLogger(save_dir=str(out), name="tensorboard")
    if kind == "csv":
        return CSVLogger(save_dir=str(out), name="csv")
    return False


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--logger", choices=("wandb", "tensorboard", "csv", "none"), default="wandb")
    parser.add_argument("--max-epochs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("digits_run"))
    parser.add_argument("--train-size", type=int, default=1437, help="training digits (of 1797; the rest validate)")
    parser.add_argument("--val-size", type=int, default=360, help="validation digits (the reference set)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--projection-dim", type=int, default=256, help="projected size per tracked layer")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--accelerator", default="cpu", help="cpu or gpu")
    parser.add_argument("--devices", type=int, default=1, help="more than 1: DDP, one process per device")
    parser.add_argument("--no-progress-bar", action="store_true", help="quiet run (also hides the report's bar)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    """Train, report, print the summary; return the report folder."""
    args = parse_args(argv)
    os.environ.setdefault("WANDB_SILENT", "true")
    L.seed_everything(args.seed, verbose=False)
    order = torch.randperm(1797, generator=torch.Generator().manual_seed(args.seed))
    if args.train_size + args.val_size > 1797:
        raise SystemExit(f"--train-size + --val-size must be <= 1797; got {args.train_size + args.val_size}.")
    train = Digits(order[: args.train_size])
    val = Digits(order[args.train_size : args.train_size + args.val_size])
    logger = make_logger(args.logger, args.out)
    callback = DataValueEmbedding(save_dir=args.out / "dve", projection_dim=args.projection_dim, overwrite=True,
                                  report=ReportConfig(top_k=10))
    trainer = L.Trainer(max_epochs=args.max_epochs, accelerator=args.accelerator, devices=args.devices,
                        strategy="ddp" if args.devices > 1 else "auto", logger=logger,
                        callbacks=[callback], enable_checkpointing=False, enable_model_summary=False,
                        default_root_dir=str(args.out), log_every_n_steps=10,
                        enable_progress_bar=not args.no_progress_bar)
    trainer.fit(DigitsMLP(), DataLoader(train, batch_size=args.batch_size, shuffle=True),
                DataLoader(val, batch_size=256))
    if torch.distributed.is_initialized():  # before a rank exits: gloo's threads can abort a process left with it
        torch.distributed.destroy_process_group()
    report = args.out / "dve" / "report"
    if not trainer.is_global_zero:  # DDP: rank 0 reports and prints
        return report
    if isinstance(logger, WandbLogger):
        import wandb

        print(f"W&B run (offline): {Path(logger.experiment.dir).parent}  (upload with `wandb sync <that folder>`)")
        wandb.finish()
    elif isinstance(logger, Logger):
        print(f"{type(logger).__name__} logs: {logger.log_dir}")
    print(f"Report folder: {report}  (curve.png, curve.csv, summary.json, ...)")
    print(format_summary(json.loads((report / "summary.json").read_text()), k=5))
    return report


if __name__ == "__main__":
    main()
