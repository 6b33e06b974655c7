"""Train the digits MLP with DataValueEmbedding in one of several setups and save rank 0's scores.

Run as a script (Lightning's ``ddp`` strategy relaunches ``sys.argv`` for the other ranks)::

    python tests/scripts/ddp_run.py --mode ddp --out DIR

Modes: ``single`` (one process over the global batches a 2-rank run sees), ``ddp``, ``ddp_spawn``.
``--fail-rank R`` drops the id key from rank R's third batch (as it is transferred), to test that both ranks stop
with an error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import datetime
import errno
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from lightning_dve import (DataValueEmbedding, DataValueEmbeddings, callback_setup, recursion_ranks, replay_ranks,
                           step_files)
from lightning_dve.errors import StoreError, UnsupportedError
from lightning_dve.files import write_error
from lightning_dve.store import TrajectoryStore

DEFAULT_PACK_STEPS = step_files.PACK_STEPS
N_TRAIN, PER_RANK_BATCH, WORLD = 37, 8, 2  # 37 samples: DistributedSampler pads one, last batches are uneven


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return torch.tensor(x / 16.0), torch.tensor(y)


class Digits(Dataset):
    def __init__(self, fail_rank: int) -> None:
        self.x, self.y = digits()
        self.fail_rank = fail_rank

    def __len__(self) -> int:
        return N_TRAIN

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "y": self.y[i], "index": i}


class MLP(L.LightningModule):
    """``--head functional``: the last layer's weight is used without calling it; ``tied``: it is called and also
    used functionally (a second, tied head); ``rank0``: an extra ``aux`` head that only rank 0's batches use;
    ``late_tied``: an ``aux`` head, called and used functionally, from the second batch on; ``rank1_tied``: the
    last layer's weight also used functionally on rank 1 only; ``rank1_subset``: the last layer called again on
    the first sample alone in rank 1's third batch; ``rank0_unbatched``: an ``aux`` head that rank 0 alone calls,
    on one unbatched row (refused there; no rank captures it); ``norms``: a LayerNorm ``aux`` on the logits
    (tracked)."""

    def __init__(self, fail_rank: int = -1, optimizer: str = "sgd", head: str = "module",
                 closure_only_odd: bool = False) -> None:
        super().__init__()
        self.optimizer, self.head, self.closure_only_odd = optimizer, head, closure_only_odd
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10), nn.Tanh(), nn.Linear(10, 10))
        self.aux = nn.Linear(64, 10) if head in ("rank0", "late_tied", "rank0_unbatched") else None
        self.aux = nn.LayerNorm(10) if head == "norms" else self.aux
        self.batches = self.batch_idx = 0
        self.fail_rank = fail_rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.head == "norms":
            return self.aux(self.net(x))
        if self.head == "functional":
            return nn.functional.linear(self.net[:4](x), self.net[4].weight, self.net[4].bias)
        if self.head == "rank0_unbatched":
            return self.net(x) + (self.aux(x[0]) if self.global_rank == 0 else 0.0)
        if self.head == "rank1_subset" and self.global_rank == 1 and self.batch_idx == 2:
            hidden = self.net[:4](x)
            return self.net[4](hidden) + nn.functional.pad(self.net[4](hidden[:1]), (0, 0, 0, len(x) - 1))
        if self.head == "tied" or (self.head == "rank1_tied" and self.global_rank == 1):
            hidden = self.net[:4](x)
            return self.net[4](hidden) + nn.functional.linear(hidden.flip(1), self.net[4].weight)
        out = self.net(x)
        if self.head == "late_tied":
            self.batches += 1
            return out + self.aux(x) + nn.functional.linear(x.flip(1), self.aux.weight) if self.batches > 1 else out
        return out + self.aux(x) if self.aux is not None and self.global_rank == 0 else out

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Drops the id key from the failing rank's third training batch, before the callback reads the ids (a
        ``training_step`` may pop it: the callback reads them as the batch starts)."""
        if self.trainer.training and self.global_rank == self.fail_rank:
            self.transfers = getattr(self, "transfers", 0) + 1
            if self.transfers == 3:
                batch.pop("index")
        return batch

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.batch_idx = batch_idx
        loss = nn.functional.cross_entropy(self(batch["x"]), batch["y"])
        self.log("train_loss", loss)
        return loss

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        if self.closure_only_odd and batch_idx % 2 == 1:  # no step: the next batch's zero_grad resets its gradient
            optimizer_closure()
        else:
            optimizer.step(closure=optimizer_closure)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=0.01, weight_decay=0.01)
        return torch.optim.SGD(self.parameters(), lr=0.2)


class GlobalBatches:
    """The global batches a 2-rank run sees, epoch by epoch, for a single process.

    Lightning gives each rank a ``DistributedSampler`` (shuffled with seed 0, even for ``shuffle=False``
    loaders); it pads the dataset to a multiple of the world size. Global step ``t`` is rank 0's ``t``-th
    batch followed by rank 1's.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.epoch = 0

    def __iter__(self):
        shards = []
        for rank in range(WORLD):
            sampler = DistributedSampler(self.dataset, num_replicas=WORLD, rank=rank, shuffle=True, seed=0)
            sampler.set_epoch(self.epoch)
            shards.append(list(sampler))
        self.epoch += 1
        for t in range(len(self)):
            yield sum((s[t * PER_RANK_BATCH:(t + 1) * PER_RANK_BATCH] for s in shards), [])

    def __len__(self) -> int:
        return -(-(-(-N_TRAIN // WORLD)) // PER_RANK_BATCH)


def fail_embedding_write(step: int, rank: int, call: int = 1) -> None:
    """Make ``rank``'s ``call``-th ``write_embeddings`` of ``step`` fail as on a full disk (2: the replayed
    embeddings' write, after the recursion's)."""
    original, calls = TrajectoryStore.write_embeddings, [0]

    def failing(store: TrajectoryStore, at: int, *args: object) -> None:
        calls[0] += at == step
        if at == step and calls[0] == call and int(os.environ.get("LOCAL_RANK", "0")) == rank:
            raise write_error(store.root / "embeddings" / f"step_{at}", OSError(errno.ENOSPC, "No space left on device"))
        original(store, at, *args)

    TrajectoryStore.write_embeddings = failing


@contextlib.contextmanager
def replay_refused_on(rank: int) -> Iterator[None]:
    """Within the block, ``rank``'s replay of its layers' rows (``embeddings="replay"``) is refused, as for a
    model with dropout."""
    original = callback_setup.make_replayer

    def refused(*args: object) -> object:
        if int(os.environ.get("LOCAL_RANK", "0")) == rank:
            raise UnsupportedError("replay refused on this rank (injected)")
        return original(*args)

    callback_setup.make_replayer = refused
    try:
        yield
    finally:
        callback_setup.make_replayer = original


@contextlib.contextmanager
def separate_disks(separate: bool) -> Iterator[None]:
    """Within the block (if ``separate``), no rank but 0 sees rank 0's embeddings as it writes them, as when each
    machine has its own disk: every rank's embeddings are gathered to rank 0. Counts the gathers of the recursion's
    and of the replayed embeddings in ``GATHERS``."""
    original = TrajectoryStore.begin_embeddings
    modules = {"recursion": recursion_ranks, "replay": replay_ranks}
    gathers = {kind: module.gather_embeddings for kind, module in modules.items()}

    def unseen(store: TrajectoryStore, widths: object, dtype: object, token: object = None) -> None:
        if token is not None and separate and store.manifest.get("rank", 0) > 0:
            raise StoreError("rank 0's embeddings are on another machine's disk (injected)")
        original(store, widths, dtype, token)

    def counted(kind: str) -> object:
        def gather(*args: object) -> object:
            GATHERS[kind] += 1
            return gathers[kind](*args)
        return gather

    GATHERS.update(recursion=0, replay=0)
    TrajectoryStore.begin_embeddings = unseen
    for kind, module in modules.items():
        module.gather_embeddings = counted(kind)
    try:
        yield
    finally:
        TrajectoryStore.begin_embeddings = original
        for kind, module in modules.items():
            module.gather_embeddings = gathers[kind]


GATHERS = {"recursion": 0, "replay": 0}  # the train end's gathers of embeddings to rank 0 in the last fit


def fail_embedding_read(rank: int) -> None:
    """Make ``rank``'s reads of its own embeddings (to send them to rank 0) fail as on a damaged disk."""
    original = TrajectoryStore.embedding_arrays

    def failing(store: TrajectoryStore, *args: object) -> object:
        if int(os.environ.get("LOCAL_RANK", "0")) == rank:
            raise StoreError(f"embeddings in {store.root} cannot be read (injected)")
        return original(store, *args)

    TrajectoryStore.embedding_arrays = failing


def fail_step_read(rank: int) -> None:
    """Make ``rank``'s train-end recursion fail to read its second step file, as on a damaged disk."""
    original = TrajectoryStore.iter_backward

    def failing(store: TrajectoryStore, *args: object) -> object:
        for count, record in enumerate(original(store, *args)):
            if count == 1 and int(os.environ.get("LOCAL_RANK", "0")) == rank:
                raise StoreError(f"a step file in {store.root} cannot be read (injected)")
            yield record

    TrajectoryStore.iter_backward = failing


#: The runs of ``--suite``, each in ``OUT/<name>``: one launch of Python, Lightning and the process group for all
#: of them (tests/test_distributed.py). ``single`` runs only those that have their own single-process reference.
SUITE: dict[str, dict[str, object]] = {
    "base": {},
    "resume": {"resume": True, "pack_steps": 2},  # each rank packs its steps (step_files), the resumed one too
    "segments": {"segments": 3},
    "full_segments": {"layout": "full", "segments": 3},
    "projected_segments": {"segments": 3, "projection_dim": 64},
    "ggn_adamw": {"curvature": "ggn", "optimizer": "adamw"},
    "ggn_static_graph": {"curvature": "ggn", "static_graph": True},  # DDP's output queues its all-reduce in backward
    "norms_adamw": {"head": "norms", "optimizer": "adamw"},  # a LayerNorm's rows and AdamW state per rank
    "rank0_head": {"head": "rank0", "epochs": 1},
    "accumulate": {"accumulate": 2, "clip": 0.1},  # two micro-batches a step per rank (an epoch's last: one)
    "closure_only_odd": {"closure_only_odd": True},  # odd batches run the closure without optimizer.step()
    "replay": {"embeddings": "replay"},  # each rank replays its own layers' rows
    "replay_full": {"embeddings": "replay", "layout": "full"},  # rank 1 replays them all, rank 0 none
    "replay_refused": {"embeddings": "replay", "refuse_replay_rank": 1},  # both keep the recursion's embeddings
    "replay_gathered": {"embeddings": "replay", "separate_disks": True},  # rank 1's replayed rows sent to rank 0
    "gathered": {"separate_disks": True},  # rank 1's embeddings sent to rank 0, as between machines
    "segments_gathered": {"segments": 3, "separate_disks": True},  # rank 1 writes its own, then sends them
}
DDP_ONLY = ("resume", "segments", "rank0_head", "replay_refused", "gathered", "segments_gathered",
            "replay_gathered")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["single", "ddp", "ddp_spawn"], required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--suite", action="store_true", help="every run of SUITE (and, under ddp, the report run)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--fail-rank", type=int, default=-1)
    parser.add_argument("--projection-dim", type=int, default=0)
    parser.add_argument("--segments", type=int, default=1)
    parser.add_argument("--curvature", default="empirical_fisher")
    parser.add_argument("--layout", default="per_layer", help="per_layer: the layers are sharded over the ranks")
    parser.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    parser.add_argument("--embeddings", choices=["recursion", "replay"], default="recursion")
    parser.add_argument("--refuse-replay-rank", type=int, default=-1, help="this rank's replay is refused")
    parser.add_argument("--resume", action="store_true", help="stop after 1 epoch, resume from its checkpoint")
    parser.add_argument("--pack-steps", type=int, default=DEFAULT_PACK_STEPS, help="step_files.PACK_STEPS")
    parser.add_argument("--head", choices=["module", "functional", "tied", "rank0", "late_tied", "rank1_tied",
                                           "rank1_subset", "rank0_unbatched", "norms"], default="module")
    parser.add_argument("--accumulate", type=int, default=1, help="accumulate_grad_batches (single: global batches)")
    parser.add_argument("--clip", type=float, default=None, help="gradient_clip_val (norm clipping)")
    parser.add_argument("--static-graph", action="store_true", help="DDPStrategy(static_graph=True)")
    parser.add_argument("--unequal-batches", action="store_true", help="rank 0's loader has 3 batches, rank 1's 2")
    parser.add_argument("--closure-only-odd", action="store_true", help="optimizer_step runs odd batches' closure "
                        "without optimizer.step()")
    parser.add_argument("--fail-embedding-write", type=int, default=-1,
                        help="the embedding write of this step fails with a full disk at train end")
    parser.add_argument("--fail-embedding-rank", type=int, default=0, help="on this rank")
    parser.add_argument("--fail-embedding-call", type=int, default=1, help="at the step's n-th write (2: the replay's)")
    parser.add_argument("--fail-embedding-read", type=int, default=-1,
                        help="this rank's read of its own embeddings fails (segments under DDP send them to rank 0)")
    parser.add_argument("--separate-disks", action="store_true", help="rank 1 cannot see rank 0's embeddings")
    parser.add_argument("--fail-step-read", type=int, default=-1,
                        help="this rank's train-end recursion fails to read a step file")
    return parser.parse_args()


def fit(args: argparse.Namespace) -> None:
    """One run of ``args``: train, then rank 0 (or the ``ddp_spawn`` parent) saves the embeddings and scores."""
    step_files.PACK_STEPS = args.pack_steps
    data = Digits(args.fail_rank)
    dve = DataValueEmbedding(save_dir=args.out / f"dve_{args.mode}", allow_duplicate_ids=args.mode == "single",
                             projection_dim=args.projection_dim or None, overwrite=True, segments=args.segments,
                             curvature=args.curvature, layout=args.layout, embeddings=args.embeddings)
    common = dict(max_epochs=args.epochs, callbacks=[dve], precision="64-true", logger=False,
                  enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                  accelerator="cpu", accumulate_grad_batches=args.accumulate, gradient_clip_val=args.clip)
    timeout = datetime.timedelta(seconds=60)
    if args.mode == "single":
        trainer = L.Trainer(devices=1, **common)
        loader = DataLoader(data, batch_sampler=GlobalBatches(data))
    else:
        start = "popen" if args.mode == "ddp" else "spawn"
        strategy = DDPStrategy(timeout=timeout, start_method=start, static_graph=args.static_graph,
                               find_unused_parameters=args.head in ("rank0", "late_tied", "rank0_unbatched"))
        trainer = L.Trainer(devices=WORLD, strategy=strategy, use_distributed_sampler=not args.unequal_batches,
                            **common)
        loader = DataLoader(data, batch_size=PER_RANK_BATCH, shuffle=False)
        if args.unequal_batches:  # samples 0..23 on rank 0, 24..36 on rank 1
            part = range(24) if int(os.environ.get("LOCAL_RANK", "0")) == 0 else range(24, N_TRAIN)
            loader = DataLoader(Subset(data, part), batch_size=PER_RANK_BATCH)
    model = MLP(args.fail_rank, args.optimizer, args.head, args.closure_only_odd).double()  # float64 before a restore: see test_resume_accumulation.py
    if args.resume:
        ckpt_dir = args.out / "ckpt"
        first = L.Trainer(**{**common, "max_epochs": 1, "enable_checkpointing": True,
                             "callbacks": [dve, ModelCheckpoint(dirpath=ckpt_dir)]}, devices=WORLD,
                          strategy=DDPStrategy(timeout=timeout))
        first.fit(MLP().double(), loader)
        dve = DataValueEmbedding(save_dir=args.out / f"dve_{args.mode}", projection_dim=args.projection_dim or None,
                                 layout=args.layout)
        trainer = L.Trainer(**{**common, "callbacks": [dve]}, devices=WORLD, strategy=DDPStrategy(timeout=timeout))
        trainer.fit(model, loader, ckpt_path=next(ckpt_dir.glob("*.ckpt")))
    else:
        with replay_refused_on(args.refuse_replay_rank), separate_disks(args.separate_disks):
            trainer.fit(model, loader)
        if args.mode == "ddp":
            (args.out / f"gathers_rank{trainer.global_rank}.json").write_text(json.dumps(GATHERS))
    if args.mode == "ddp" and not trainer.is_global_zero:  # rank 1 reads rank 0's save_dir (shared here); its exit
        with warnings.catch_warnings(record=True) as caught:  # status is not the script's
            warnings.simplefilter("always")
            steps = dve.embeddings.steps
        read = {"steps": steps, "warnings": [str(w.message) for w in caught]}
        (args.out / "rank1_steps.json").write_text(json.dumps(read))
        return
    save_scores(args, dve.embeddings, model, data)


def save_scores(args: argparse.Namespace, emb: DataValueEmbeddings, model: MLP, data: Digits) -> None:
    """Every layer's embeddings, and under ``single``/``ddp`` the per-step scores of 8 test samples."""
    layers = [entry["name"] for entry in emb.store.manifest["layers"]]  # under ddp_spawn, the main process
    per_step = [emb.store.embedding_arrays().step(step)[1] for step in emb.steps]  # reads rank 0's save_dir
    out = {f"emb/{n}": torch.cat([e[n] for e in per_step]) for n in layers}
    if args.mode != "ddp_spawn":  # the spawn parent's model holds float32 copies of the float64 weights
        test = {"x": data.x[100:108], "y": data.y[100:108], "index": torch.arange(100, 108)}
        result = emb.influence(model, test, per_step=True)
        out.update(scores=result.scores, steps=result.steps, ids=result.sample_ids)
    save_file(out, str(args.out / f"scores_{args.mode}.safetensors"))


def main() -> None:
    args = parse_args()
    if args.fail_embedding_write >= 0:
        fail_embedding_write(args.fail_embedding_write, args.fail_embedding_rank, args.fail_embedding_call)
    if args.fail_embedding_read >= 0:
        fail_embedding_read(args.fail_embedding_read)
    if args.fail_step_read >= 0:
        fail_step_read(args.fail_step_read)
    torch.set_num_threads(1)
    if not args.suite:
        fit(args)
        return
    for name, overrides in SUITE.items():
        if args.mode != "single" or name not in DDP_ONLY:
            fit(argparse.Namespace(**{**vars(args), "out": args.out / name, **overrides}))
    if args.mode == "ddp":  # last: it wraps the report function of this process
        from ddp_report import run_report

        run_report(args.out / "report")


if __name__ == "__main__":
    sys.exit(main())
