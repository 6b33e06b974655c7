"""Shared tiny models and data for the tests: real digits, a tanh MLP LightningModule, reproducible loaders.

Everything is float64 and deterministic: the batch order of every epoch is a fixed function of a seed, so the
oracles in ``tests/oracles.py`` can replay the exact trajectory the Trainer ran.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator, Sequence
from functools import lru_cache
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

#: Seed of the fixed permutation that splits the 1797 digits into train / held-out parts.
SPLIT_SEED = 0


@lru_cache(maxsize=1)
def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's bundled 8x8 digits (no download): features scaled to [0, 1].

    Returns:
        ``x [1797, 64]`` float64 in [0, 1] and ``y [1797]`` int64 labels 0..9.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = np.asarray(digits.data, dtype=np.float64) / 16.0
    y = np.asarray(digits.target, dtype=np.int64)
    return x, y


def split_indices(n_train: int, n_test: int, seed: int = SPLIT_SEED) -> tuple[list[int], list[int]]:
    """Disjoint train / held-out digit indices from one fixed permutation of all digits."""
    x, _ = load_digits_arrays()
    perm = np.random.default_rng(seed).permutation(len(x))
    if n_train + n_test > len(x):
        raise ValueError(f"n_train + n_test = {n_train + n_test} exceeds the {len(x)} digits.")
    return perm[:n_train].tolist(), perm[n_train : n_train + n_test].tolist()


class DigitsDataset(Dataset):
    """A subset of the digits; item ``i`` is ``{"x": [64] in ``dtype``, "y": long, "index": long}``.

    ``index`` is the digit's index in the full sklearn dataset (a stable sample id).
    """

    def __init__(self, indices: Sequence[int], dtype: torch.dtype = torch.float64) -> None:
        x, y = load_digits_arrays()
        self.indices = torch.as_tensor(list(indices), dtype=torch.long)
        self.x = torch.from_numpy(x)[self.indices].to(dtype)
        self.y = torch.from_numpy(y)[self.indices].clone()

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "y": self.y[i], "index": self.indices[i]}

    def batch(self) -> dict[str, torch.Tensor]:
        """All items as one collated batch (e.g. the test batch)."""
        return {"x": self.x.clone(), "y": self.y.clone(), "index": self.indices.clone()}


class EpochPermutationSampler(Sampler[int]):
    """A fresh, reproducible permutation each epoch: ``randperm(n, seed + epoch)``.

    Lightning calls ``set_epoch`` at the start of every epoch; the oracle calls it itself to rebuild the same
    batch order.
    """

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n = n
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=generator).tolist())

    def __len__(self) -> int:
        return self.n


def make_loader(dataset: Dataset, batch_size: int, seed: int = 0) -> DataLoader:
    """Fixed-order loader: a new seeded permutation per epoch, no workers, no dropped last batch."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochPermutationSampler(len(dataset), seed),
        num_workers=0,
        drop_last=False,
    )


def epoch_batches(loader: DataLoader, epochs: int) -> list[dict[str, torch.Tensor]]:
    """The batches a Trainer sees over ``epochs`` epochs, in order (one per optimizer step)."""
    batches: list[dict[str, torch.Tensor]] = []
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        batches.extend(loader)
    loader.sampler.set_epoch(0)
    return batches


class DigitsMLP(L.LightningModule):
    """``64 -> hidden -> tanh -> ... -> 10`` float64 MLP trained with plain SGD on mean cross-entropy.

    ``training_step`` is typical user code (mean loss, ``self.log``). ``lr_decay`` > 0 adds a per-step
    learning-rate schedule ``lr_t = lr / (1 + lr_decay * t)`` (LambdaLR, ``interval="step"``).
    """

    def __init__(
        self,
        hidden: Sequence[int] | int = 32,
        lr: float = 0.1,
        seed: int = 0,
        lr_decay: float = 0.0,
        n_in: int = 64,
        n_out: int = 10,
    ) -> None:
        super().__init__()
        widths = [n_in, *([hidden] if isinstance(hidden, int) else list(hidden)), n_out]
        layers: list[nn.Module] = []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for i, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:])):
                if i > 0:
                    layers.append(nn.Tanh())
                layers.append(nn.Linear(d_in, d_out, dtype=torch.float64))
        self.net = nn.Sequential(*layers)
        self.lr = lr
        self.lr_decay = lr_decay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = F.cross_entropy(self(batch["x"]), batch["y"])
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):  # noqa: ANN201 - Lightning's union return type
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr)
        if self.lr_decay <= 0:
            return optimizer
        decay = self.lr_decay
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1.0 / (1.0 + decay * t))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def step_lrs(self, n_steps: int) -> list[float]:
        """The learning rate applied at each optimizer step 0..n_steps-1 (what the optimizer used)."""
        return [self.lr / (1.0 + self.lr_decay * t) if self.lr_decay > 0 else self.lr for t in range(n_steps)]


def make_trainer(max_epochs: int, callbacks: list | None = None, **kwargs) -> L.Trainer:
    """A quiet float64 CPU Trainer."""
    options = dict(
        max_epochs=max_epochs,
        callbacks=callbacks or [],
        accelerator="cpu",
        devices=1,
        precision="64-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    options.update(kwargs)
    return L.Trainer(**options)


def can_lock_elsewhere(folder: Path) -> bool:
    """Whether another process can take the folder's lock now (the lock FolderLock takes, without importing it)."""
    code = ("import fcntl, os, sys; fd = os.open(os.path.join(sys.argv[1], '.lock'), os.O_RDWR | os.O_CREAT); "
            "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)")
    return subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True).returncode == 0


def check_rows_against_per_example_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                                         projection_dim: int | None) -> list[str]:
    """Capture one step of ``model`` with a random rank-1 preconditioner ``r c^T`` per layer and check every tracked
    layer's rows against per-example autograd: ``P_out G_z P_in^T`` and ``P_out (diag(r) G_z diag(c)) P_in^T``
    (``G_z`` sample ``z``'s block, ``parameter_block``). Returns the tracked layers' kinds."""
    from lightning_dve.capture import GRADS, GRADS_Q, GradientCapture, resolve_layers
    from lightning_dve.config import DVEConfig
    from lightning_dve.layers import parameter_block

    dtype, n = x.dtype, x.shape[0]
    tracked = resolve_layers(model, DVEConfig(projection_dim=projection_dim))
    capture = GradientCapture(tracked)
    capture.attach()
    factors = {name: tuple(torch.rand(dim, dtype=dtype) + 0.5 for dim in layer.spec.dims(layer.module))
               for name, layer in tracked.items()}
    capture.begin()
    capture.set_preconditioner(factors)
    F.cross_entropy(model(x), y, reduction="sum").backward()
    ones = torch.ones(n, dtype=dtype)
    rows, preconditioned = capture.take(GRADS, ones), capture.take(GRADS_Q, ones)
    capture.detach()
    for name, layer in tracked.items():
        p_out, p_in = (layer.projection.side_matrix(side, dtype, x.device) for side in ("out", "in"))
        r, c = factors[name]
        for i in range(n):
            gradients = torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]),
                                            list(layer.module.parameters()))
            block = parameter_block(layer.module, *gradients, *([None] * (2 - len(gradients))))
            for got, expected in ((rows, block), (preconditioned, r[:, None] * block * c[None, :])):
                expected = expected if p_out is None else p_out @ expected
                expected = expected if p_in is None else expected @ p_in.T
                torch.testing.assert_close(got[name][i], expected.flatten(), atol=1e-12, rtol=0)
    return [layer.spec.kind for layer in tracked.values()]


class PeerFailed:
    """A communicator of rank 1 of 2 whose peer (rank 0) failed: ``any`` is true whatever this rank says, and rank
    0's error text comes first in a gather."""

    rank, world_size = 1, 2

    def __init__(self, error: str = "StoreError: hyper.jsonl is corrupt (injected)") -> None:
        self.error = error

    def any(self, flag: bool) -> bool:
        return True

    def all_gather_rows(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        return [torch.tensor(list(self.error.encode()), dtype=torch.uint8).reshape(1, -1), tensor]
