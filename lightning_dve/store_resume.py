"""What a resumed fit checks of the store it continues (:meth:`~lightning_dve.store.TrajectoryStore.reopen`): the
same layers and projections, the same recording (its run id), and every step up to the checkpoint's."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

from .errors import StoreError

if TYPE_CHECKING:
    from .store import TrajectoryStore

#: Manifest key: the store's run id is its recording's, the same on every DDP rank (since session 40; before,
#: each rank's shard drew its own, and only rank 0's was checked on resume).
SHARED_RUN_ID = "shared_run_id"


def branch_run_id(run_id: str, after: int) -> str:
    """The run id of the branch that continues the recording ``run_id`` after step ``after`` (a resume): derived,
    not drawn, so that every DDP rank's store, each resumed by its own rank, names the branch alike."""
    return hashlib.sha256(f"{run_id}/{after}".encode()).hexdigest()[:32]


def _layer_summary(layers: list[dict[str, Any]]) -> str:
    """``name [d_out x d_in] -> k_out x k_in (out checksum, in checksum)`` per layer, for error messages."""
    return "; ".join(f"{e['name']} [{e['out_dim']}x{e['in_dim']}] -> {e['projection']['out']['projected_dim']}x"
                     f"{e['projection']['in']['projected_dim']} ({e['projection']['out']['checksum']}, "
                     f"{e['projection']['in']['checksum']})" for e in layers)


def check_resumable(store: TrajectoryStore, last_step: int, layers: list[dict[str, Any]] | None, run_id: str | None,
                    recorded_steps: int | None) -> None:
    """Refuse to continue ``store`` after ``last_step`` where that would mix two recordings or leave a gap.

    Args:
        layers: the resuming run's manifest layer entries (``None``: not checked).
        run_id: the ``run_id`` of the store the checkpoint was saved with (``None``: not checked).
        recorded_steps: how many steps the checkpoint's fit recorded up to ``last_step`` (``None``: not checked).

    Raises:
        StoreError: if the store recorded other ``layers``, is another fit's (``run_id``), or lacks ``last_step`` or
            a step before it (fewer steps than ``recorded_steps``, or their files).
    """
    recorded, folder = f"the store at {store.root}", store.step_files.folder.name
    fix = "Resume into the save_dir the checkpoint was recorded in, or start a fresh fit without ckpt_path."
    if layers is not None and store.manifest["layers"] != layers:
        raise StoreError(f"{recorded} recorded layers {_layer_summary(store.manifest['layers'])}, the resumed run "
                         f"tracks {_layer_summary(layers)}: resuming would mix two projections or models in one "
                         "trajectory. Resume with the model, callback settings and lightning_dve version that "
                         "started the run, or start a fresh fit without ckpt_path.")
    shared = dict(store.manifest.get("run_lineage", []))  # earlier run ids: the last step each still holds
    if store.manifest.get("rank", 0) > 0 and not store.manifest.get(SHARED_RUN_ID):
        run_id = None  # a shard of an earlier version: its own run id, not the checkpoint's (rank 0's)
    if run_id is not None and run_id != store.manifest.get("run_id") and last_step > shared.get(run_id, -2):
        raise StoreError(f"{recorded} holds another recording than the checkpoint's (store run "
                         f"{store.manifest.get('run_id')}, checkpoint run {run_id} after step {last_step}): it "
                         f"was overwritten, or resumed from an earlier checkpoint and continued, since. {fix}")
    if last_step >= 0 and last_step not in store.steps:
        raise StoreError(f"the checkpoint continues after step {last_step}, which {recorded} does not hold (its "
                         f"steps: {store.steps[:3]}...{store.steps[-3:]}, after a resume from an earlier "
                         "checkpoint?): resuming would leave a gap. Resume from a checkpoint at or before its last "
                         f"step. {fix}")
    held = [s for s in store.steps if s <= last_step]
    if len(held) < (recorded_steps or 0):  # fewer than its fit recorded (a skipped fp16 step has no file)
        raise StoreError(f"{recorded} holds {len(held)} steps up to the checkpoint's step {last_step}, of the "
                         f"{recorded_steps} its fit recorded: {recorded_steps - len(held)} {folder} file(s) were "
                         "deleted or lost, and resuming would leave a gap. Restore them, resume from a checkpoint "
                         "before the gap, or record the run again.")
    missing = store.step_files.missing(held)  # one listing
    if missing:  # e.g. an earlier resume from before them, killed while it deleted its later steps
        raise StoreError(f"{recorded} is missing the {folder} file(s) of {len(missing)} step(s) up to the "
                         f"checkpoint's step {last_step}, first of steps {missing[:5]} (a resume from an earlier "
                         "checkpoint killed while it deleted its later steps?): resuming would leave a gap. Resume "
                         "from a checkpoint before them, restore them, or record the run again.")
