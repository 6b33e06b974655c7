"""Replay checkpoints: parameters and optimizer state at periodic steps, and what every step's update applied.

Layout under ``save_dir/checkpoints/``::

    replay.json                        optimizer kind (or why replay is refused), param groups by parameter name,
                                       interval, clipping, module modes, frozen parameters, training time
    state_00000000.safetensors         parameters and optimizer state right before step 0 (then every interval,
                                       and after the last step)
    hyper.jsonl                        one JSON line per step, ``{"step": 42, "groups": [...], "clip_factor": c}``:
                                       hyperparameters of every param group (learning rate after the scheduler,
                                       momentum, betas, ...) and the clip factor, appended as the steps run

Written on global rank 0 only (parameters are identical on every DDP rank): safetensors and JSON, each file written
atomically (:func:`~lightning_dve.files.write_atomic`) but ``hyper.jsonl``, one ``os.write`` per step (cheaper).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.modules.dropout import _DropoutNd

from .errors import ConfigError, DVEError, StoreError
from .replay_optim import OptimizerKind, group_hyperparameters, layout_change, mode_change, optimizer_kind
from .files import read_checked, read_json, remove_files, write_atomic, write_text_atomic
from .line_log import LineLog, json_line, read_json_lines
from .store import StepRecord

REPLAY_MANIFEST = "replay.json"
HYPER_FILE = "hyper.jsonl"
#: The per-step JSON files of older versions (``steps/step_00000042.json``), refused by :meth:`CheckpointStore.open`.
OLD_HYPER_STEPS = "steps"
AUTO = "auto"
REPLAYABLE_PRECISION = ("32-true", "32", "64-true", "64", "bf16-mixed")
#: Precision whose training loop converts floating inputs to float64 (a replay after ``load`` does the same).
DOUBLE_PRECISION = ("64-true", "64")
#: Precision whose forward runs under bf16 autocast (replayed under the same autocast).
AUTOCAST_PRECISION = "bf16-mixed"
#: ``checkpoint_interval="auto"`` keeps the checkpoints' disk use under this share of the gradient store's.
AUTO_BUDGET = 0.1
#: Fewest steps between ``"auto"`` checkpoints (each is a file write: 0.8 ms against a 1 ms MLP step).
AUTO_MIN_INTERVAL = 8
#: Most states (parameters, optimizer state) a replayed segment holds at once: a longer one keeps every few and
#: replays each stretch between them again, twice the forward steps or more (:mod:`lightning_dve.replay`).
SEGMENT_STATES = 64
#: ``"auto"`` lengthens a short interval up to :data:`SEGMENT_STATES` steps while that many states fit in this.
AUTO_SEGMENT_BYTES = 256 * 2**20


def auto_interval(snapshot_bytes: int, step_bytes: int, budget: float = AUTO_BUDGET,
                  segment_bytes: int = AUTO_SEGMENT_BYTES) -> int:
    """Steps between ``"auto"`` checkpoints: the longer of the byte budget, ``ceil(snapshot_bytes / (budget *
    step_bytes))`` (``step_bytes``: one step in the gradient store, all ranks), and the free length,
    ``min(SEGMENT_STATES, segment_bytes // snapshot_bytes)`` (at least :data:`AUTO_MIN_INTERVAL`): the longest
    segment the replay runs without replaying steps twice, so that up to it a longer interval costs no compute and
    fewer files, only replay memory (a segment of ``S`` steps holds ``S`` snapshots' states)."""
    free = max(AUTO_MIN_INTERVAL, min(SEGMENT_STATES, segment_bytes // max(1, snapshot_bytes)))
    return max(free, math.ceil(snapshot_bytes / (budget * max(1, step_bytes))))


def step_store_bytes(record: StepRecord, storage_dtype: str, other_dims: list[int], kinds: int) -> int:
    """Bytes of one step in the gradient store of all ranks together: this rank's step file (``record`` in
    ``storage_dtype``) and the ``kinds`` rows of the layers (projected sizes ``other_dims``) that other ranks keep
    (under DDP each rank stores its own layers; rank 0 may keep none). float16 rows carry a float32 scale each."""
    own = sum(v.numel() * v.element_size() for v in record.to_tensors(storage_dtype).values())
    itemsize = torch.empty(0, dtype=getattr(torch, storage_dtype)).element_size()
    per_row = sum(dim * itemsize + 4 * (storage_dtype == "float16") for dim in other_dims)
    return own + record.sample_ids.numel() * kinds * per_row


def _snapshot_name(step: int) -> str:
    return f"state_{step:08d}.safetensors"


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON under a temporary name, then rename it into place."""
    write_text_atomic(path, json.dumps(data, indent=1, sort_keys=True))


def parameter_groups(module: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """Names (in ``module``) of the parameters of every optimizer param group.

    Raises:
        ConfigError: if the optimizer holds a parameter that is not one of ``module``'s.
    """
    names = {id(p): name for name, p in module.named_parameters()}
    missing = [tuple(p.shape) for g in optimizer.param_groups for p in g["params"] if id(p) not in names]
    if missing:
        raise ConfigError(f"the optimizer holds {len(missing)} parameter(s) that are not the module's (shapes "
                          f"{missing[:3]}); exact replay needs every updated parameter to belong to the module.")
    return [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]


class CheckpointStore:
    """The ``checkpoints/`` folder of a store: snapshots, per-step hyperparameters and ``replay.json``."""

    def __init__(self, root: Path, manifest: dict[str, Any]) -> None:
        self.root = Path(root)
        self.manifest = manifest
        self._hyper: dict[int, dict[str, Any]] | None = None  # hyper.jsonl parsed, by step (None: not read yet)
        self._log = LineLog(self.root / HYPER_FILE)  # appends to hyper.jsonl
        # reopened: the step to continue after and the hyperparameter lines to keep, applied at the first write
        self._resume_after: tuple[int, list[dict[str, Any]] | None] | None = None
        self._replaces = False  # created over earlier checkpoints: remove them at the first write (create)

    @classmethod
    def create(cls, root: Path, manifest: dict[str, Any]) -> CheckpointStore:
        """Start a fresh folder (an empty one gets its ``replay.json`` now). Earlier checkpoints in it are removed
        only at the first write, as :meth:`reopen` defers its truncation: a fit that trains nothing keeps them."""
        store = cls(Path(root), manifest)
        store._replaces = store.root.is_dir() and any(store.root.iterdir())
        if not store._replaces:
            store.write_manifest()
        return store

    def _clear_replaced(self) -> None:
        """The deferred part of :meth:`create`: remove the earlier checkpoints (``replay.json`` first, so a run
        killed meanwhile leaves none rather than damaged ones), then write this folder's ``replay.json``."""
        if not self._replaces:
            return
        old = self.root / OLD_HYPER_STEPS
        remove_files([self.root / REPLAY_MANIFEST, *self.root.glob("state_*.safetensors"), *old.glob("step_*.json"),
                      self.root / HYPER_FILE])
        if old.is_dir() and not any(old.iterdir()):
            old.rmdir()
        _write_json(self.root / REPLAY_MANIFEST, self.manifest)
        self._replaces = False

    @classmethod
    def open(cls, root: Path) -> CheckpointStore:
        """Open a folder written by :class:`CheckpointRecorder`.

        Raises:
            StoreError: if ``replay.json`` is missing (recorded without checkpoints or by an older version), or
                the hyperparameters are in the per-step files of an older version.
        """
        path = Path(root) / REPLAY_MANIFEST
        if not path.is_file():
            raise StoreError(f"no replay checkpoints in {root} ({REPLAY_MANIFEST} is missing): the run was recorded "
                             "without them. Record it again with checkpoint_interval='auto' (the default).")
        old = Path(root) / OLD_HYPER_STEPS
        if not (Path(root) / HYPER_FILE).is_file() and any(old.glob("step_*.json")):
            raise StoreError(f"the replay checkpoints in {root} were written by an older version (per-step files in "
                             f"{old}, no {HYPER_FILE}), which this lightning_dve does not read: record the run again.")
        return cls(Path(root), read_json(path))

    @classmethod
    def reopen(cls, root: Path, last_step: int) -> CheckpointStore:
        """Continue after ``last_step`` (resume): later snapshots and hyperparameters are dropped, as in the store,
        at the first write, so a resumed fit that trains no further changes nothing. ``hyper.jsonl`` is read now (a
        torn last line is dropped with a warning) and rewritten at that write (temporary file, then rename) with the
        lines of steps ``<= last_step`` only; a later step's refusal is dropped now.

        Raises:
            StoreError: as :meth:`open`, or if ``hyper.jsonl`` is corrupt before its last line.
        """
        store = cls.open(root)
        if (refused_at := store.manifest.get("refusal_step")) is not None and refused_at > last_step:
            store.manifest.update(refusal=None, refusal_step=None)  # a step of the branch this resume replaces
        path = store.root / HYPER_FILE
        kept = [r for r in read_json_lines(path).values() if r["step"] <= last_step] if path.is_file() else None
        store._resume_after = (last_step, kept)
        return store

    def _truncate_for_resume(self) -> None:
        """The deferred part of :meth:`reopen` or :meth:`create`, at the first write."""
        self._clear_replaced()
        if self._resume_after is None:
            return
        (after, kept), self._resume_after = self._resume_after, None
        for file in self.root.glob("state_*.safetensors"):
            if int(file.stem.split("_")[1]) > after:
                file.unlink()
        if kept is not None:
            write_text_atomic(self.root / HYPER_FILE, "".join(json_line(r) for r in kept))
        self.manifest["final_step"] = None
        self.write_manifest()

    def write_manifest(self) -> None:
        self._truncate_for_resume()
        self.root.mkdir(parents=True, exist_ok=True)
        _write_json(self.root / REPLAY_MANIFEST, self.manifest)

    @property
    def snapshot_steps(self) -> list[int]:
        """Steps before which a snapshot was taken, increasing."""
        return sorted(int(p.stem.split("_")[1]) for p in self.root.glob("state_*.safetensors"))

    def write_snapshot(
        self, step: int, params: dict[str, torch.Tensor], state: dict[str, dict[str, torch.Tensor]]
    ) -> None:
        """Persist ``theta_step`` (``{name: tensor}``) and the optimizer state ``{name: {key: tensor}}``."""
        self._truncate_for_resume()
        tensors = {f"param/{name}": p.detach() for name, p in params.items()}  # written at once: no copies needed
        for name, entries in state.items():
            tensors.update({f"state/{name}/{key}": v.detach() for key, v in entries.items()})
        metadata = {"step": str(step), "settings_hash": self.settings_hash}
        write_atomic(self.root / _snapshot_name(step), tensors, metadata)

    def read_snapshot(self, step: int) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
        """``(params, state)`` as written by :meth:`write_snapshot` (fresh tensors: safe to update)."""
        tensors = read_checked(self.root / _snapshot_name(step), self.settings_hash)
        params = {k[len("param/"):]: v for k, v in tensors.items() if k.startswith("param/")}
        state: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("state/"):
                name, entry = key[len("state/"):].rsplit("/", 1)
                state.setdefault(name, {})[entry] = value
        return params, state

    @property
    def settings_hash(self) -> str:
        return self.manifest["settings_hash"]

    def write_hyper(self, step: int, record: dict[str, Any]) -> None:
        """Append ``step``'s hyperparameters (``{"groups": [...], "clip_factor": c}``) as one line of ``hyper.jsonl``.

        Raises:
            StoreError: if the disk is full or the write fails; the lines of earlier steps are kept.
        """
        self._truncate_for_resume()
        self._hyper = None
        self._log.append(json_line({"step": step, **record}))

    def close(self) -> None:
        """Close ``hyper.jsonl`` (safe to call twice; a later :meth:`write_hyper` opens it again)."""
        self._log.close()

    def read_hyper(self, step: int) -> dict[str, Any]:
        """Hyperparameters of ``step``: ``{"groups": [{...}], "clip_factor": c}`` (shared: do not modify).

        ``hyper.jsonl`` is parsed once and kept in memory (until the next append).

        Raises:
            StoreError: if the step has no line, or the file is corrupt before its last line.
        """
        if self._hyper is None:
            self._hyper = {s: {k: v for k, v in r.items() if k != "step"}
                           for s, r in read_json_lines(self.root / HYPER_FILE).items()}
        if step not in self._hyper:
            raise StoreError(f"{self.root / HYPER_FILE} has no line for step {step}: the optimizer hyperparameters "
                             f"of step {step} were not recorded. Record the run again.")
        return self._hyper[step]

    def bytes_on_disk(self) -> int:
        return sum(p.stat().st_size for p in [*self.root.glob("state_*.safetensors"), *self.root.glob(HYPER_FILE)])


def _optimizer_state(optimizer: torch.optim.Optimizer, names: list[list[str]]) -> dict[str, dict[str, torch.Tensor]]:
    """The tensors of the optimizer state of every parameter, by parameter name (absent entries left out)."""
    out = {}
    for group, group_names in zip(optimizer.param_groups, names):
        for p, name in zip(group["params"], group_names):
            entries = {k: v for k, v in optimizer.state.get(p, {}).items() if isinstance(v, torch.Tensor)}
            if entries:
                out[name] = entries
    return out


class CheckpointRecorder:
    """Writes the replay checkpoints during ``fit`` (global rank 0). The callback calls one method per hook.

    Args:
        root: ``save_dir/checkpoints``.
        interval: steps between snapshots, ``"auto"`` (disk use ``<= AUTO_BUDGET`` of the gradient store), or
            ``None`` (off: only ``replay.json`` is written, so that queries can say how to turn them on).
        settings_hash: the store's settings hash (stamped into every snapshot).
        resume_after: continue an earlier recording after this step (``None``: a fresh one).
        sample_ids: the callback's ``sample_ids`` key (``load``'s queries map ids to positions; ``None``: a callable).
        precision: the trainer's precision (bf16 autocast is replayed under autocast; fp16 is refused).
    """

    def __init__(self, root: Path, interval: int | str | None, settings_hash: str, resume_after: int | None,
                 sample_ids: str | None = None, precision: str = "32-true") -> None:
        self.interval = interval
        self.precision = precision
        self._started = False
        self._snapshots = False  # whether one snapshot exists (the first step always takes one)
        self.error: DVEError | None = None  # the first failed write, raised on every rank by :meth:`check`
        if resume_after is not None and (Path(root) / REPLAY_MANIFEST).is_file():
            self.store = CheckpointStore.reopen(Path(root), resume_after)
            recorded = self.store.manifest.get("interval")  # None: "auto" unresolved yet (after_step resolves it)
            self.interval = self.store.manifest.get("requested_interval", interval) if recorded is None else recorded
            self._started = True
            self._snapshots = bool(self.store.snapshot_steps)
        else:  # resumed after a step with no replay.json (its folder deleted): recorded, but cannot be replayed
            lost = (f"the replay checkpoints up to step {resume_after} were lost before the fit resumed after it (no "
                    f"{REPLAY_MANIFEST} in {root}). Restore that folder and resume again, or record the run again, to "
                    "replay it") if resume_after is not None and resume_after >= 0 and interval is not None else None
            self.store = CheckpointStore.create(Path(root), {"settings_hash": settings_hash, "sample_ids": sample_ids,
                                                             "requested_interval": interval, "lost": lost,
                                                             "interval": None if interval == AUTO else interval})

    @property
    def enabled(self) -> bool:
        return self.interval is not None and self.store.manifest.get("refusal") is None

    def _start(self, module: nn.Module, optimizer: torch.optim.Optimizer, clip: dict[str, Any]) -> None:
        """Describe the run once, at its first step: optimizer, groups, clipping, module modes."""
        manifest = self.store.manifest
        try:
            kind = optimizer_kind(optimizer)
            moments = 2 if kind is not OptimizerKind.SGD else int(any(g["momentum"] for g in optimizer.param_groups))
            manifest.update(kind=kind.value, groups=parameter_groups(module, optimizer), state_tensors=moments)
        except DVEError as err:
            manifest.update(kind=type(optimizer).__name__, groups=None, refusal=str(err))
        if self.precision not in REPLAYABLE_PRECISION:
            manifest.update(refusal=f"precision={self.precision!r}: fp16 loss scaling (skipped steps) is not replayed. "
                                    "Train with '32-true', '64-true' or 'bf16-mixed' to replay it.")
        manifest.update(
            precision=self.precision, clip=clip,
            frozen=[name for name, p in module.named_parameters() if not p.requires_grad],
            eval_modules=[name for name, m in module.named_modules() if not m.training],
            dropout_modules=[name for name, m in module.named_modules()
                             if isinstance(m, _DropoutNd) and m.training and m.p > 0],
            training_seconds=manifest.get("training_seconds", 0.0))
        self.store.write_manifest()
        self._started = True

    def check(self) -> None:
        """Raise the first failed checkpoint write; the callback calls this where the ranks agree on errors."""
        if self.error is not None:
            raise self.error

    @contextlib.contextmanager
    def _keeping_errors(self) -> Iterator[None]:
        """Keep a failed write for :meth:`check` instead of raising it here (on rank 0 only)."""
        try:
            yield
        except DVEError as err:
            self.error = self.error or err

    def before_step(self, step: int, module: nn.Module, optimizer: torch.optim.Optimizer, clip: dict[str, Any],
                    clip_factor: float) -> None:
        """Record ``step``'s hyperparameters and, when due, ``theta_step`` and the optimizer state before it (a
        failed write is kept for :meth:`check`)."""
        if self.error is None:
            with self._keeping_errors():
                self._record(step, module, optimizer, clip, clip_factor)

    def _record(self, step: int, module: nn.Module, optimizer: torch.optim.Optimizer, clip: dict[str, Any],
                clip_factor: float) -> None:
        if not self._started:
            self._start(module, optimizer, clip)
        if not self.enabled:
            return
        refusal = (layout_change(step, self.store.manifest, list(module.named_parameters()), optimizer)
                   or mode_change(step, self.store.manifest, module))
        if refusal is not None:  # no further checkpoints: exact_influence raises this
            self.store.manifest.update(refusal=refusal, refusal_step=step)
            self.store.write_manifest()
            return
        kind = OptimizerKind(self.store.manifest["kind"])
        self.store.write_hyper(step, {"groups": group_hyperparameters(optimizer, kind), "clip_factor": clip_factor})
        interval = self.interval if isinstance(self.interval, int) else None
        if step == 0 or (interval is not None and step % interval == 0) or not self._snapshots:
            self._snapshot(step, module, optimizer)

    def _snapshot(self, step: int, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self._snapshots = True
        names = self.store.manifest["groups"]
        params = dict(module.named_parameters())
        self.store.write_snapshot(step, {n: params[n] for group in names for n in group},
                                  _optimizer_state(optimizer, names))

    def after_step(self, step_bytes: Callable[[], int], module: nn.Module) -> None:
        """Resolve ``interval="auto"`` from the gradient store's bytes per step, all ranks' layers together
        (``step_bytes()``, e.g. :func:`step_store_bytes`, called only then: it encodes the step again; a failed
        manifest write is kept for :meth:`check`)."""
        if self.interval != AUTO or not self.enabled or self.error is not None:
            return
        names = {n for group in self.store.manifest["groups"] for n in group}
        param_bytes = sum(p.numel() * p.element_size() for n, p in module.named_parameters() if n in names)
        self.interval = auto_interval(param_bytes * (1 + self.store.manifest["state_tensors"]), step_bytes())
        self.store.manifest["interval"] = self.interval
        with self._keeping_errors():
            self.store.write_manifest()

    def finish(self, step: int, module: nn.Module, optimizer: torch.optim.Optimizer, seconds: float) -> None:
        """Snapshot the final state (``theta_T``, before step ``T = step``) and record the training time.

        Raises:
            StoreError: a write failed now or at an earlier step.
        """
        self.check()
        manifest = self.store.manifest
        manifest["training_seconds"] = manifest.get("training_seconds", 0.0) + seconds
        if not self._started:  # no step was trained: describe the run all the same, for an empty replay
            self._start(module, optimizer, {})
        if self.enabled:
            self._snapshot(step, module, optimizer)
            manifest.update(final_step=step, interval=self.interval, bytes_total=self.store.bytes_on_disk())
        self.store.write_manifest()
