"""Small generic fixtures for the integration tests: digits as dict batches, a tiny MLP, a quiet ``fit``.

Items are ``{"x": float32 [64], "y": long, "index": long}`` where ``index`` is the digit's index in sklearn's
``load_digits`` (a stable sample id). The MLP is ``net = Linear(64, hidden) -> Tanh -> Linear(hidden, 10)``
trained with plain SGD on mean cross-entropy; subclass it (``mlp_cls`` fixture) to vary one hook.

The suite runs on pytest-xdist workers (``pyproject.toml`` addopts); the hooks below set how many, their threads,
the order of the tests and which tests share a worker.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from tests.helpers import DigitsDataset

CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))  # pytest-xdist's workers (addopts: ``-n auto``)
if WORKERS > 1:  # the cores shared out: two workers of 2 threads each on 2 cores spin against each other (2x slower)
    THREADS = max(1, CORES // WORKERS)
    torch.set_num_threads(THREADS)
    os.environ["OMP_NUM_THREADS"] = str(THREADS)  # and the scripts the tests start


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto``: one worker more than the cores, at most 4 (many tests wait on the processes they start: on 2
    cores 3 workers kept 176 % of the CPU busy and 2 workers 145 %)."""
    return min(4, CORES + 1)


def _shares_a_module_fixture(item: pytest.Item) -> bool:
    """Whether ``item`` uses a module-scoped fixture (built once per worker that runs a test of the module)."""
    return any(definition.scope == "module" for definitions in item._fixtureinfo.name2fixturedefs.values()
               for definition in definitions)


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook turns the groups into node ids
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Keep the tests that share a module-scoped fixture on one worker and run them first, then the other slow
    tests, then the rest.

    With ``--dist loadgroup --no-loadscope-reorder`` (addopts) the workers take the work in this order, so the long
    units (a DDP launch, the example and benchmark scripts) start at once and the short tests fill the end evenly.
    """
    for item in items:
        if _shares_a_module_fixture(item):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
    # stable: a module's shared tests stay together and in order
    items.sort(key=lambda item: 0 if item.get_closest_marker("xdist_group") else 1 if item.get_closest_marker("slow")
               else 2)


class DigitsDict(DigitsDataset):
    """Digits ``indices`` of sklearn's ``load_digits`` as float32 dict items (the Trainer's default precision)."""

    def __init__(self, indices: Sequence[int]) -> None:
        super().__init__(indices, dtype=torch.float32)


class TinyMLP(L.LightningModule):
    """``Linear(64, hidden) -> Tanh -> Linear(hidden, 10)``, mean cross-entropy, plain SGD(lr)."""

    def __init__(self, hidden: int = 16, lr: float = 0.1, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10))
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def loss(self, batch: Any) -> torch.Tensor:
        return F.cross_entropy(self(batch["x"]), batch["y"])

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        loss = self.loss(batch)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class TwoHeadMLP(TinyMLP):
    """TinyMLP plus an ``aux`` head (``Linear(64, 10)``) that only even batches use: odd ones leave it no ``.grad``."""

    def __init__(self) -> None:
        super().__init__()
        self.aux = nn.Linear(64, 10)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        loss = self.loss(batch)
        return loss + self.aux(batch["x"]).square().mean() if batch_idx % 2 == 0 else loss


class TiedHeadMLP(TinyMLP):
    """TinyMLP whose head weight is also used functionally (``F.linear``): gradient the hooks cannot attribute."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(self.net[0](x))
        return self.net[2](hidden) + 0.5 * F.linear(hidden, self.net[2].weight)


@pytest.fixture
def mlp_cls() -> type[TinyMLP]:
    """The tiny MLP class, to subclass in a test."""
    return TinyMLP


@pytest.fixture
def make_loader() -> Callable[..., DataLoader]:
    """``make_loader(n=64, batch_size=16, offset=0, **dataloader_kwargs)``: digits ``offset..offset+n-1``."""

    def make(n: int = 64, batch_size: int = 16, offset: int = 0, **kwargs: Any) -> DataLoader:
        return DataLoader(DigitsDict(range(offset, offset + n)), batch_size=batch_size, **kwargs)

    return make


@pytest.fixture
def test_batch() -> dict[str, torch.Tensor]:
    """Twelve held-out digits (indices 1500..1511) as one batch."""
    return DigitsDict(range(1500, 1512)).batch()


def run_fit(model: L.LightningModule, callback: L.Callback | None, train: DataLoader | None = None,
            val: DataLoader | None = None, **trainer_kwargs: Any) -> L.Trainer:
    """Fit ``model`` for one quiet CPU epoch (by default on digits 0..63 in batches of 16, i.e. 4 steps)."""
    options: dict[str, Any] = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                                   enable_checkpointing=False, enable_model_summary=False, max_epochs=1,
                                   num_sanity_val_steps=0)
    options.update(trainer_kwargs)
    others = list(options.pop("callbacks", []))  # further callbacks, after ``callback``
    trainer = L.Trainer(callbacks=([] if callback is None else [callback]) + others, **options)
    if train is None:
        train = DataLoader(DigitsDict(range(64)), batch_size=16)
    trainer.fit(model, train_dataloaders=train, val_dataloaders=val)
    return trainer


@pytest.fixture
def fit() -> Callable[..., L.Trainer]:
    """``fit(model, callback, train=None, val=None, **trainer_kwargs) -> Trainer`` (see :func:`run_fit`)."""
    return run_fit


@pytest.fixture
def save_dir(tmp_path: Path) -> Path:
    """A fresh, not yet existing store directory."""
    return tmp_path / "dve"


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A finished recording to read (copy ``root`` before damaging it; deep-copy ``model`` before changing it).

    ``TinyMLP()`` trained 2 epochs on digits 0..63 in batches of 16 (8 steps), ``projection_dim=64``.
    Attributes: ``root`` (the store), ``model`` (trained), ``dve`` (the callback).
    """
    from lightning_dve import DataValueEmbedding

    root = tmp_path_factory.mktemp("trained") / "dve"
    model, dve = TinyMLP(), DataValueEmbedding(root, projection_dim=64)
    run_fit(model, dve, max_epochs=2)
    return SimpleNamespace(root=root, model=model, dve=dve)


@pytest.fixture
def wandb_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep W&B's data, cache and config dirs (artifact staging) under ``tmp_path``; restore the env after."""
    for name in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")  # WandbLogger(offline=True) sets it; this restores it afterwards
    monkeypatch.setenv("WANDB_SILENT", "true")
    return tmp_path


HOLD = """
import sys
from pathlib import Path
from lightning_dve.folder_lock import FolderLock
lock = FolderLock(Path(sys.argv[1]))
print("locked", flush=True)
sys.stdin.read()  # until the test closes stdin
"""


@pytest.fixture
def holder() -> Iterator[Callable[[Path], subprocess.Popen]]:
    """``holder(folder)``: another process that holds the folder's lock until the test ends."""
    processes = []

    def hold(folder: Path) -> subprocess.Popen:
        process = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, text=True)
        processes.append(process)
        assert process.stdout is not None and process.stdout.readline().strip() == "locked"
        return process

    yield hold
    for process in processes:
        process.communicate(timeout=60)
