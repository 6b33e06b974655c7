"""2-rank CPU DDP runs (gloo) with the train-end report (one with a CSVLogger, one where validation never ran):
the last runs of ``ddp_run.py --suite --mode ddp`` (tests/test_distributed.py).

Rank 0 writes ``DIR/dve/report/`` and ``DIR/csv/version_0/metrics.csv``; every rank appends its rank to
``DIR/reports.txt`` if ``report_train_end`` returned a report there.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_dve import DataValueEmbedding, reporting
from lightning_dve.config import ReportConfig


class Digits(Dataset):
    def __init__(self, start: int, stop: int) -> None:
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        self.x, self.y, self.start = torch.tensor(x[start:stop] / 16.0), torch.tensor(y[start:stop]), start

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "y": self.y[i], "index": self.start + i}


class MLP(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self.net(batch["x"]), batch["y"])

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.log("val_loss", nn.functional.cross_entropy(self.net(batch["x"]), batch["y"]), sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.2)


class RecordingReport:
    """Wraps ``reporting.report_train_end`` to note which ranks produced a report."""

    def __init__(self, out: Path) -> None:
        self.out, self.original = out, reporting.report_train_end

    def __call__(self, trainer: L.Trainer, *args: object, **kwargs: object) -> object:
        report = self.original(trainer, *args, **kwargs)
        if report is not None:
            with (self.out / "reports.txt").open("a") as handle:
                handle.write(f"{trainer.global_rank}\n")
        return report


def run_report(out: Path) -> None:
    """The 2-rank fit whose train-end report lands in ``out`` (also run last by ``ddp_run.py --suite``)."""
    out.mkdir(parents=True, exist_ok=True)
    reporting.report_train_end = RecordingReport(out)
    dve = DataValueEmbedding(save_dir=out / "dve", projection_dim=None, overwrite=True,
                             report=ReportConfig(top_k=3, figures=False))
    trainer = L.Trainer(devices=2, accelerator="cpu", strategy=DDPStrategy(timeout=datetime.timedelta(seconds=60)),
                        max_epochs=2, callbacks=[dve], precision="64-true", enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=1, logger=CSVLogger(save_dir=str(out), name="csv", version=0))
    # validation: the first batch of 8 of each rank's 15 samples (1500, 1502, ... and 1501, 1503, ...)
    trainer.fit(MLP().double(), DataLoader(Digits(0, 40), batch_size=5), DataLoader(Digits(1500, 1530), batch_size=8))
    run_unvalidated_report(out / "unvalidated")


def run_unvalidated_report(out: Path) -> None:
    """The same reference where validation never ran (``check_val_every_n_epoch`` beyond the last epoch): the
    limit is applied to each rank's shard, as Lightning would (``DIR/unvalidated/dve/report/``)."""
    dve = DataValueEmbedding(save_dir=out / "dve", projection_dim=16, overwrite=True,
                             report=ReportConfig(top_k=3, figures=False, log_to_loggers=False))
    trainer = L.Trainer(devices=2, accelerator="cpu", strategy=DDPStrategy(timeout=datetime.timedelta(seconds=60)),
                        max_epochs=1, callbacks=[dve], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1,
                        check_val_every_n_epoch=3, logger=False, precision="64-true")
    trainer.fit(MLP().double(), DataLoader(Digits(0, 20), batch_size=5), DataLoader(Digits(1500, 1530), batch_size=8))
