"""DDP (2 CPU ranks, gloo), gradient accumulation and resume: each equal to its single-process reference."""

from __future__ import annotations

import concurrent.futures
import csv
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from lightning.pytorch.core.saving import load_hparams_from_yaml
import torch
from safetensors.torch import load_file

from lightning_dve import DataValueEmbeddings
from lightning_dve.checkpoints import CheckpointStore
from lightning_dve.distributed import SingleProcess
from lightning_dve.errors import RemoteRankError, SampleIdError, StoreError
from lightning_dve.files import disk_bytes
from lightning_dve.records import StepRecord
from lightning_dve.recursion_ranks import gather_embeddings
from lightning_dve.sync import MicroBatch, StepAssembler, assign_groups
from lightning_dve.updates import StepTerms
from tests.helpers import PeerFailed

SCRIPT = Path(__file__).parent / "scripts" / "ddp_run.py"
FORKS = Path(__file__).parent / "rank_forks.py"
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


#: A spawned child that finished its fit can still abort at exit while a gloo worker thread is alive (torch's
#: process-group teardown; multiprocessing children skip Lightning's atexit clean-up): seen once in about a dozen
#: ``ddp_spawn`` runs on the 2-core CI machine. Such a run is repeated once; any other failure is not.
TEARDOWN_ABORT = ("`Trainer.fit` stopped", "terminate called without an active exception", "signal SIGABRT")


def run_script(mode: str, out: Path, *extra: str, timeout: int = 240, external: bool = False
               ) -> subprocess.CompletedProcess:
    """Run ``ddp_run.py`` on its own free port (so parallel runs on one machine cannot collide).

    ``external`` (``ddp`` only): start both ranks at once, as torchrun or a cluster scheduler does, instead of
    Lightning starting rank 1 once rank 0 has imported everything (:func:`run_ranks`)."""
    for _ in range(2):
        # the script imports lightning_dve from this checkout, not from wherever the package is installed
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        env = {**os.environ, "MASTER_PORT": str(free_port()), "PYTHONPATH": path}
        command = [sys.executable, str(SCRIPT), "--mode", mode, "--out", str(out), *extra]
        if external:
            return run_ranks(command, env, timeout)
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
        if mode != "ddp_spawn" or not all(mark in proc.stderr for mark in TEARDOWN_ABORT):
            return proc
    return proc


class _RankForks:
    """The warm parent that forks both ranks of each run (``tests/rank_forks.py``), started at its first use and
    ended with this process (its stdin closes)."""

    proc: subprocess.Popen | None = None

    @classmethod
    def run(cls, request: dict) -> dict:
        if cls.proc is None or cls.proc.poll() is not None:
            cls.proc = subprocess.Popen([sys.executable, str(FORKS)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True, env=request["env"])
        cls.proc.stdin.write(json.dumps(request) + "\n")
        cls.proc.stdin.flush()
        return json.loads(cls.proc.stdout.readline())


def run_ranks(command: list[str], env: dict[str, str], timeout: int) -> subprocess.CompletedProcess:
    """Both ranks of ``command`` started at once with ``LOCAL_RANK`` set (Lightning then starts no process of its
    own), forked from a parent that imported everything once (:class:`_RankForks`: 7 s less per rank on a slow
    2-core machine). Rank 0's output comes first; the return code is the first nonzero one. Neither rank is killed
    by the other: one that waits for a failed peer shows as a timeout.

    Raises:
        subprocess.TimeoutExpired: if a rank runs longer than ``timeout`` seconds (both are killed).
    """
    with tempfile.TemporaryDirectory() as logs:
        files = [(Path(logs) / f"rank{r}.out", Path(logs) / f"rank{r}.err") for r in (0, 1)]
        answer = _RankForks.run({"argv": command[2:], "env": env, "timeout": timeout,
                                 "logs": [[str(out), str(err)] for out, err in files]})
        if answer.get("timeout"):
            raise subprocess.TimeoutExpired(command, timeout)
        stdout, stderr = ("".join(path.read_text() for path in paths) for paths in zip(*files))
    codes = answer["codes"]
    return subprocess.CompletedProcess(command, next((c for c in codes if c), 0), stdout, stderr)


def rank_tails(stderr: str, chars: int = 2500) -> str:
    """The end of each rank's output (rank 1's lines carry ``[rank1]:``): a failure shows the first error, not only
    the other rank's "Connection closed by peer" that follows it."""
    lines = stderr.splitlines()
    rank1 = "\n".join(line for line in lines if line.startswith("[rank1]"))
    rank0 = "\n".join(line for line in lines if not line.startswith("[rank1]"))
    return f"rank 0 (and the launcher):\n{rank0[-chars:]}\n\nrank 1:\n{rank1[-chars:]}"


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``ddp_run.py --suite`` once on 1 process and once on 2 ranks: every successful run below shares one start-up
    of Python, Lightning and the process group per mode (each run in ``OUT/<mode>/<run>``). The two modes run at
    once: the single process uses the core that the 2 ranks leave idle while Lightning starts them one by one."""
    out = tmp_path_factory.mktemp("suite")
    modes = ("single", "ddp")
    with concurrent.futures.ThreadPoolExecutor(len(modes)) as pool:
        procs = list(pool.map(lambda mode: run_script(mode, out / mode, "--suite", timeout=400), modes))
    for mode, proc in zip(modes, procs):
        assert proc.returncode == 0, f"{mode}:\n{rank_tails(proc.stderr)}"
        (out / mode / "stderr.txt").write_text(proc.stderr)
    return out


def scores(suite: Path, mode: str, run: str) -> dict[str, torch.Tensor]:
    return load_file(str(suite / mode / run / f"scores_{mode}.safetensors"))


@pytest.fixture(scope="module")
def single_reference(suite: Path) -> dict[str, torch.Tensor]:
    return scores(suite, "single", "base")


def assert_same_embeddings(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    names = [k for k in ref if k.startswith("emb/")]
    assert names and sorted(names) == sorted(k for k in got if k.startswith("emb/"))
    for name in names:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-10, atol=1e-14)


def assert_same_scores(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    torch.testing.assert_close(got["scores"], ref["scores"], rtol=1e-10, atol=1e-14)


@pytest.mark.slow
def test_two_ranks_equal_single_process(suite: Path, single_reference: dict[str, torch.Tensor]) -> None:
    """37 samples on 2 ranks: the sampler shuffles, pads one sample, and the last batches are uneven (3+3)."""
    got = scores(suite, "ddp", "base")
    assert_same_embeddings(got, single_reference)
    assert "DistributedSampler repeats 1 sample(s) per epoch" in (suite / "ddp" / "stderr.txt").read_text()
    assert torch.equal(got["ids"], single_reference["ids"]) and torch.equal(got["steps"], single_reference["steps"])
    assert_same_scores(got, single_reference)
    assert (got["ids"] == got["ids"][0]).sum() >= 1
    # rank 0's save_dir holds everything; rank 1 only wrote its shard below shards/, and read the store after fit
    root = suite / "ddp" / "base"
    store = DataValueEmbeddings.load(root / "dve_ddp").store
    # after rank 0 finished the train end: the marker of a cut-off train end was still set there and warned of
    assert json.loads((root / "rank1_steps.json").read_text()) == {"steps": list(range(6)), "warnings": []}
    assert store.steps == list(range(6))
    assert store.manifest["world_size"] == 2 and store.manifest["rank"] == 0
    assert (root / "dve_ddp" / "shards" / "rank_1" / "manifest.json").is_file()
    # the step files' figures count every rank's (they counted rank 0's only: a tenth of the single-process store's)
    on_disk = disk_bytes([root / "dve_ddp" / "steps", root / "dve_ddp" / "shards" / "rank_1" / "steps"])
    assert (store.manifest["bytes_steps"], store.manifest["bytes_per_step"]) == (on_disk, on_disk // 6)
    # both ranks see this folder, so each wrote its own layers' embeddings into rank 0's arrays: nothing gathered
    assert [gathers(root, rank) for rank in (0, 1)] == [0, 0]
    assert sorted(p.name for p in (root / "dve_ddp" / "embeddings").iterdir()) == [
        "index.safetensors", "layer_000.npy", "layer_001.npy", "layer_002.npy", "sample_ids.npy"]


def gathers(run: Path, rank: int, kind: str = "recursion") -> int:
    """The train end's gathers of the recursion's or the replayed (``kind``) embeddings to rank 0 on ``rank``
    (``ddp_run.separate_disks``)."""
    return int(json.loads((run / f"gathers_rank{rank}.json").read_text())[kind])


@pytest.mark.slow
@pytest.mark.parametrize("run", ["gathered", "segments_gathered"])
def test_two_ranks_that_do_not_share_a_disk_gather_the_embeddings_to_rank_zero(
    suite: Path, single_reference: dict[str, torch.Tensor], run: str
) -> None:
    """Where rank 1 cannot see rank 0's embeddings folder (each machine its own disk), rank 1's embeddings go to
    rank 0 in collectives (with segments: written on rank 1 first, then read back and sent, then deleted there):
    the same embeddings and scores as one process."""
    got = scores(suite, "ddp", run)
    if run == "gathered":
        assert_same_embeddings(got, single_reference)
    assert_same_scores(got, single_reference)
    assert min(gathers(suite / "ddp" / run, rank) for rank in (0, 1)) > 0
    shard = suite / "ddp" / run / "dve_ddp" / "shards" / "rank_1"
    assert (shard / "manifest.json").is_file() and not [p for p in shard.glob("embeddings*")]


@pytest.mark.slow
def test_ddp_spawn_equals_single_process(tmp_path: Path, single_reference: dict[str, torch.Tensor]) -> None:
    """The same run under ``ddp_spawn``: the parent process, which ran no fit, reads rank 0's store."""
    proc = run_script("ddp_spawn", tmp_path)
    assert proc.returncode == 0, rank_tails(proc.stderr)
    assert_same_embeddings(load_file(str(tmp_path / "scores_ddp_spawn.safetensors")), single_reference)
    assert "DistributedSampler repeats 1 sample(s) per epoch" in proc.stderr
    store = DataValueEmbeddings.load(tmp_path / "dve_ddp_spawn").store
    assert store.manifest["world_size"] == 2 and store.manifest["rank"] == 0
    assert (tmp_path / "dve_ddp_spawn" / "shards" / "rank_1" / "manifest.json").is_file()


@pytest.mark.slow
def test_two_ranks_resumed_from_checkpoint_equal_single_process(
    suite: Path, single_reference: dict[str, torch.Tensor]
) -> None:
    got = scores(suite, "ddp", "resume")
    assert_same_embeddings(got, single_reference)
    assert_same_scores(got, single_reference)
    root = suite / "ddp" / "resume" / "dve_ddp"  # two steps per pack: steps 0-1 before the resume, 2-3 and 4-5 after it
    for folder in (root / "steps", root / "shards" / "rank_1" / "steps"):
        assert sorted(p.name for p in folder.iterdir()) == [f"pack_0000000{a}_0000000{a + 1}.safetensors"
                                                            for a in (0, 2, 4)]
    # one run id on both ranks, the resumed branch's too (each rank derives it), so a resume checks every shard
    manifests = [json.loads((folder / "manifest.json").read_text()) for folder in (root, root / "shards" / "rank_1")]
    assert [(m["run_id"], m["run_lineage"], m["shared_run_id"]) for m in manifests] == [
        (manifests[0]["run_id"], manifests[0]["run_lineage"], True)] * 2 and len(manifests[0]["run_lineage"]) == 1


@pytest.mark.slow
def test_two_ranks_with_segments_equal_single_process(
    suite: Path, single_reference: dict[str, torch.Tensor]
) -> None:
    """Layer-sharded and segment-parallel recursion at once: the chained scores equal the sequential ones. Rank 1
    writes its own layers' embeddings into rank 0's arrays (both see them) and keeps no copy."""
    assert_same_scores(scores(suite, "ddp", "segments"), single_reference)
    shard = suite / "ddp" / "segments" / "dve_ddp" / "shards" / "rank_1"
    assert (shard / "manifest.json").is_file() and not [p for p in shard.glob("embeddings*")]
    assert [gathers(suite / "ddp" / "segments", rank) for rank in (0, 1)] == [0, 0]


def assert_ddp_equals_single(suite: Path, run: str, single: str | None = None) -> None:
    """The run on 2 ranks and on 1 process (``single``'s run there, default the same): same embeddings and scores,
    and the same ``checkpoint_interval="auto"`` (sized on every rank's rows, also when rank 0 keeps no layer)."""
    runs, intervals = {}, {}
    for mode, name in (("single", single or run), ("ddp", run)):
        runs[mode] = scores(suite, mode, name)
        intervals[mode] = json.loads((suite / mode / name / f"dve_{mode}" / "checkpoints" / "replay.json").read_text())
    assert intervals["ddp"]["interval"] == intervals["single"]["interval"]
    assert_same_embeddings(runs["ddp"], runs["single"])
    assert_same_scores(runs["ddp"], runs["single"])


@pytest.mark.slow
def test_two_ranks_with_one_full_matrix_and_segments_equal_single_process(suite: Path) -> None:
    """``layout="full"`` is one group (owned by rank 1: ties go to the highest rank), so rank 0 owns no layer: it
    still takes part in every collective (the segment factors, the merge) and writes the finished store, which
    rank 1 reads after the train end."""
    assert_ddp_equals_single(suite, "full_segments")


@pytest.mark.slow
def test_two_ranks_with_projected_float64_segments_equal_single_process(suite: Path) -> None:
    """Projected rows decode to float32 while training is float64: the segment factors are gathered in the
    accumulators' dtype on every rank (a training-dtype placeholder on the rank without the group broke gloo)."""
    assert_ddp_equals_single(suite, "projected_segments")


@pytest.mark.slow
def test_two_ranks_with_ggn_curvature_under_a_static_graph_equal_single_process(suite: Path) -> None:
    """``DDPStrategy(static_graph=True)``: DDP's output queues the gradients' all-reduce when a backward passes
    through it. The GGN loss-curvature probe, a double backward from the loss, did so before the training backward,
    which then went un-averaged: the ranks' replicas drifted apart, silently. The probe is skipped there."""
    assert_ddp_equals_single(suite, "ggn_static_graph")


@pytest.mark.slow
def test_two_ranks_with_ggn_curvature_and_adamw_equal_single_process(suite: Path) -> None:
    """Gauss-Newton rows are drawn per sample id, so their split over ranks does not change them; with AdamW every
    kind of row (gradients, curvature, both preconditioned) is gathered and kept per rank's layers."""
    assert_ddp_equals_single(suite, "ggn_adamw")


@pytest.mark.slow
def test_two_ranks_with_a_layer_norm_and_adamw_equal_single_process(suite: Path) -> None:
    """A tracked LayerNorm (session 31): its rows and its AdamW state in the block layout, on the rank of its group."""
    assert_ddp_equals_single(suite, "norms_adamw")
    store = DataValueEmbeddings.load(suite / "ddp" / "norms_adamw" / "dve_ddp").store
    assert [layer["kind"] for layer in store.manifest["layers"]] == ["linear"] * 3 + ["layer_norm"]


@pytest.mark.slow
def test_two_ranks_with_gradient_accumulation_and_clipping_equal_single_process(suite: Path) -> None:
    """``accumulate_grad_batches=2``: a step holds two micro-batches of 8 per rank, and each epoch's last holds one
    of 3, which Lightning still divides by 2; one process accumulating the global micro-batches (both ranks' j-th)
    applies the same per-sample weights, 1/32 and 1/12, and the same norm clipping (``gradient_clip_val=0.1``, on
    the ranks' mean gradient; it binds at every step). Rows are ordered by rank, then micro-batch, on 2 ranks and
    by micro-batch, then rank, in one process: compared by (step, id)."""
    hyper = suite / "ddp" / "accumulate" / "dve_ddp" / "checkpoints" / "hyper.jsonl"
    factors = [json.loads(line)["clip_factor"] for line in hyper.read_text().splitlines()]
    assert len(factors) == 4 and max(factors) < 0.5
    runs = {mode: scores(suite, mode, "accumulate") for mode in ("single", "ddp")}
    for run in runs.values():
        order = torch.argsort(run["steps"] * 1000 + run["ids"], stable=True)
        run.update({key: value[order] for key, value in run.items() if key.startswith("emb/")},
                   scores=run["scores"][:, order], steps=run["steps"][order], ids=run["ids"][order])
    assert torch.equal(runs["ddp"]["ids"], runs["single"]["ids"])
    assert runs["ddp"]["steps"].unique().tolist() == [0, 1, 2, 3]
    assert_same_embeddings(runs["ddp"], runs["single"])
    assert_same_scores(runs["ddp"], runs["single"])


@pytest.mark.slow
def test_two_ranks_leave_out_batches_run_without_an_optimizer_step_as_one_process_does(suite: Path) -> None:
    """An ``optimizer_step`` that runs the closure alone on odd batches: the next ``zero_grad`` resets their
    gradients, so each rank drops them (they were merged into the next step as applied); the 2-rank recording
    equals one process's over the same global batches, and holds only the stepped batches' occurrences."""
    assert_ddp_equals_single(suite, "closure_only_odd")
    store = DataValueEmbeddings.load(suite / "ddp" / "closure_only_odd" / "dve_ddp").store
    assert store.manifest["rows"] == [16, 6, 16, 6]  # batches 0 and 2 of each epoch (8 + 8, then 3 + 3 samples)
    assert "were reset (zero_grad) before any optimizer step" in (suite / "ddp" / "stderr.txt").read_text()


def in_one_process(store: Path, optimizer: str) -> tuple[DataValueEmbeddings, torch.nn.Module, object, dict]:
    """``store`` loaded in this process, the script's model with the final weights from the store's last replay
    checkpoint, its training dataset and test batch."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from ddp_run import MLP, Digits
    finally:
        sys.path.remove(str(SCRIPT.parent))
    checkpoints = CheckpointStore.open(store / "checkpoints")
    model = MLP(optimizer=optimizer).double()
    model.load_state_dict(checkpoints.read_snapshot(checkpoints.snapshot_steps[-1])[0])
    data = Digits(-1)
    test = {"x": data.x[100:108], "y": data.y[100:108], "index": torch.arange(100, 108)}
    return DataValueEmbeddings.load(store), model, data, test


@pytest.mark.slow
@pytest.mark.parametrize(("run", "optimizer"), [("base", "sgd"), ("ggn_adamw", "adamw")])
def test_a_ddp_store_replays_in_one_process_as_the_single_process_store(
    suite: Path, tmp_path: Path, run: str, optimizer: str
) -> None:
    """After a 2-rank fit one process can replay rank 0's store: its steps hold the global batches' ids and
    weights and its checkpoints the (identical) weights, so ``exact_influence`` and the replayed embeddings equal
    the single-process run's; the replayed scores equal the exact ones (unprojected), not the recursion's."""
    got = {}
    for mode in ("single", "ddp"):
        copy = Path(shutil.copytree(suite / mode / run / f"dve_{mode}", tmp_path / mode))
        emb, model, data, test = in_one_process(copy, optimizer)
        exact = emb.exact_influence(model, test, per_step=True, dataset=data).scores
        emb.replay_embeddings(model, dataset=data)
        got[mode] = {"exact": exact,
                     "replayed": DataValueEmbeddings.load(copy).influence(model, test, per_step=True).scores}
    for key in ("exact", "replayed"):
        torch.testing.assert_close(got["ddp"][key], got["single"][key], rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(got["ddp"]["replayed"], got["ddp"]["exact"], rtol=1e-9, atol=1e-12)
    assert not torch.allclose(got["ddp"]["exact"], scores(suite, "ddp", run)["scores"], rtol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("run", ["replay", "replay_full", "replay_gathered"])
def test_replayed_embeddings_at_train_end_on_two_ranks(suite: Path, single_reference: dict[str, torch.Tensor],
                                                       run: str) -> None:
    """``embeddings="replay"`` under DDP: each rank replays the run from its own checkpoints and carries back the
    rows of the layers it owns (per layer: rank 0 two layers, rank 1 one; ``layout="full"``: rank 1 every layer,
    rank 0 none) and writes them into rank 0's arrays, or, where it cannot see them (``replay_gathered``, as on
    separate disks), sends them to rank 0, which writes them. The same embeddings and scores as one process;
    unprojected they equal ``exact_influence`` (the oracle), not the recursion's scores."""
    assert_ddp_equals_single(suite, run, "replay" if run == "replay_gathered" else None)
    sent = [gathers(suite / "ddp" / run, rank, "replay") for rank in (0, 1)]
    assert min(sent) > 0 if run == "replay_gathered" else sent == [0, 0]
    root = suite / "ddp" / run / "dve_ddp"
    emb, model, data, test = in_one_process(root, "sgd")
    assert emb.store.manifest["embeddings_source"] == "replay"
    exact = emb.exact_influence(model, test, per_step=True, dataset=data).scores
    torch.testing.assert_close(scores(suite, "ddp", run)["scores"], exact, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(exact, single_reference["scores"], rtol=1e-3)
    assert (root / "shards" / "rank_1" / "checkpoints" / "replay.json").is_file()  # rank 1 replayed its own


@pytest.mark.slow
def test_a_replay_refused_on_one_rank_keeps_the_recursions_embeddings_on_both(
    suite: Path, single_reference: dict[str, torch.Tensor]
) -> None:
    """Rank 1's replay is refused (as for dropout): no rank replaces anything, rank 0 warns with rank 1's reason,
    and the store holds the recursion's embeddings, equal to the single-process recursion's."""
    got = scores(suite, "ddp", "replay_refused")
    assert_same_embeddings(got, single_reference)
    assert_same_scores(got, single_reference)
    manifest = json.loads((suite / "ddp" / "replay_refused" / "dve_ddp" / "manifest.json").read_text())
    assert manifest["embeddings_source"] == "recursion"
    stderr = " ".join((suite / "ddp" / "stderr.txt").read_text().split())
    assert ("embeddings='replay' could not replay this run (rank 1: replay refused on this rank (injected)); the "
            "report and the store keep the recursion's embeddings.") in stderr


@pytest.mark.slow
@pytest.mark.parametrize("rank", [0, 1])
def test_a_failed_replay_write_on_one_rank_keeps_the_recursions_embeddings_on_both(tmp_path: Path, rank: int) -> None:
    """A full disk while the ranks write the replayed embeddings into rank 0's arrays (rank 1 its own layers): the
    fit finishes, rank 0 warns with the failed rank's error, and the store keeps the recursion's embeddings, whole
    and labelled as such (the replayed ones, unprojected, would equal ``exact_influence``)."""
    proc = run_script("ddp", tmp_path, "--embeddings", "replay", "--fail-embedding-write", "1",
                      "--fail-embedding-rank", str(rank), "--fail-embedding-call", "2", timeout=200, external=True)
    assert proc.returncode == 0, rank_tails(proc.stderr)
    stderr = " ".join(proc.stderr.split())
    assert f"embeddings='replay' could not replay this run (rank {rank}: " in stderr
    assert "embeddings/step_1: the disk is full" in stderr and "the store keep the recursion's embeddings" in stderr
    root = tmp_path / "dve_ddp"
    manifest = json.loads((root / "manifest.json").read_text())
    assert (manifest["embeddings"], manifest["embeddings_source"]) == ("complete", "recursion")
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("embeddings")) == ["embeddings"]
    emb, model, data, test = in_one_process(root, "sgd")
    exact = emb.exact_influence(model, test, per_step=True, dataset=data).scores
    recorded = load_file(str(tmp_path / "scores_ddp.safetensors"))["scores"]
    assert recorded.isfinite().all() and not torch.allclose(recorded, exact, rtol=1e-3)


@pytest.mark.slow
def test_padded_sample_is_an_occurrence_per_copy(single_reference: dict[str, torch.Tensor]) -> None:
    """The sampler pads 37 samples to 38: one sample is trained twice per epoch, so it has 2 occurrences."""
    ids, steps = single_reference["ids"], single_reference["steps"]
    first_epoch = steps < steps.max() // 2 + 1
    counts = torch.bincount(ids[first_epoch])
    assert int((counts == 2).sum()) == 1 and int((counts == 1).sum()) == 36


@pytest.mark.slow
def test_a_head_only_rank_zero_uses_is_recorded(suite: Path) -> None:
    """Under DDP ``.grad`` holds every rank's gradient: a head that only rank 0's batches use is kept (rank 0
    reached it), with its embeddings from rank 0's samples."""
    got = scores(suite, "ddp", "rank0_head")
    assert "emb/aux" in got and got["emb/aux"].abs().sum() > 0


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_two_rank_ddp_run_reports_once_on_rank_zero_with_every_ranks_data(suite: Path) -> None:
    out = suite / "ddp" / "report"
    assert (out / "reports.txt").read_text() == "0\n0\n"  # rank 0 only, in each of the two runs
    summary = json.loads((out / "dve" / "report" / "summary.json").read_text())
    # limit_val_batches=1: each rank validated one batch of 8 of its 15 samples; the reference is those 16 samples
    # (samples 0..15 of the 30), not rank 0's 8 nor the whole set
    assert summary["reference"] == {"n_samples": 16, "source": "the validation dataloader (its first 2 batches: 1 "
                                                               "on each of 2 ranks, `limit_val_batches`)"}
    # the same where validation never ran (check_val_every_n_epoch beyond the last epoch): it was rank 0's 8
    unvalidated = json.loads((out / "unvalidated" / "dve" / "report" / "summary.json").read_text())
    assert unvalidated["reference"] == summary["reference"]
    assert summary["n_samples"] == 40 and summary["n_steps"] == 8  # both ranks' samples, global steps
    for row in summary["top_k"]["helpful"] + summary["top_k"]["harmful"]:
        assert row["label"] is not None  # found in the (unsharded) training data
    metrics = read_csv(out / "csv" / "version_0" / "metrics.csv")
    assert [int(r["step"]) for r in metrics if r.get("dve/curve/influence_per_lr")] == list(range(8))
    assert len([r for r in metrics if r.get("dve/stages/early/share")]) == 1
    manifest = json.loads((out / "dve" / "manifest.json").read_text())  # the settings, logged once at fit start
    settings = load_hparams_from_yaml(out / "csv" / "version_0" / "hparams.yaml")["dve"]
    assert (settings["settings_hash"], settings["tracked_layers"]) == (manifest["settings_hash"], 2)


@pytest.mark.slow
def test_one_failing_rank_stops_both_without_deadlock(tmp_path: Path) -> None:
    start = time.monotonic()
    proc = run_script("ddp", tmp_path, "--fail-rank", "1", "--epochs", "1", timeout=200, external=True)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert "batch has no key 'index'" in proc.stderr  # rank 1's own error
    # rank 0 stops with the exported error the README names, naming rank 1 and its error (since session 40)
    assert re.search(r"lightning_dve\.errors\.RemoteRankError: another rank failed in DataValueEmbedding \(rank 1: "
                     r"SampleIdError: .*batch has no key 'index'", proc.stderr), rank_tails(proc.stderr)
    assert elapsed < 55, f"took {elapsed:.0f}s: a rank waited for the 60s gloo timeout"


@pytest.mark.slow
def test_training_loaders_of_different_lengths_on_the_ranks_are_refused_at_train_start(tmp_path: Path) -> None:
    """Rank 0 with 3 batches, rank 1 with 2 (``use_distributed_sampler=False``): the ranks hung, each in another
    collective (rank 0 in DDP's backward, rank 1 in the callback's train end), until gloo's timeout."""
    start = time.monotonic()
    proc = run_script("ddp", tmp_path, "--unequal-batches", "--epochs", "1", timeout=200, external=True)
    assert proc.returncode != 0
    refusal = r"ConfigError: the ranks' training loaders have different numbers of batches per epoch \(\[3.0, 2.0\]"
    for rank in (0, 1):
        lines = [line for line in proc.stderr.splitlines() if line.startswith("[rank1]") == (rank == 1)]
        assert re.search(refusal, "\n".join(lines)), rank_tails(proc.stderr)
    assert time.monotonic() - start < 55, "a rank waited for the 60s gloo timeout"


@pytest.mark.slow
@pytest.mark.parametrize(("head", "refusal"), [
    ("rank1_subset", r"\[rank1\]: .*UnsupportedError: layer 'net\.4' \(Linear\) was called on 1 samples after a call on "
                     r"\d+ in the same step"),
    ("rank0_unbatched", r"\[rank0\]: .*UnsupportedError: layer 'aux' \(Linear\) was called on an unbatched input"),
])
def test_a_call_refused_on_one_rank_stops_both_ranks_with_its_refusal(tmp_path: Path, head: str, refusal: str) -> None:
    """A tracked layer called again on one sample of rank 1's batch, or called by rank 0 alone on an unbatched row:
    the refusal is kept from the forward hook for the step's end, where the ranks agree (raised in the hook, the
    other rank failed with gloo's "connection closed"; with the call refused, rank 1 found the layer with a
    gradient that no rank captured and raised that alone, before the ranks agreed)."""
    start = time.monotonic()
    proc = run_script("ddp", tmp_path, "--head", head, "--epochs", "1", timeout=200, external=True)
    assert proc.returncode != 0 and time.monotonic() - start < 55
    assert re.search(refusal, proc.stderr), proc.stderr[-3000:]
    assert "another rank failed in DataValueEmbedding" in proc.stderr, proc.stderr[-3000:]


@pytest.mark.slow
def test_a_weight_used_functionally_is_refused_on_both_ranks(tmp_path: Path) -> None:
    """Under DDP ``.grad`` holds every rank's gradient: a layer whose weight is used without calling it is refused
    on both ranks (no rank reached it)."""
    start = time.monotonic()
    proc = run_script("ddp", tmp_path, "--head", "functional", "--epochs", "1", timeout=200, external=True)
    assert proc.returncode != 0 and time.monotonic() - start < 55
    assert proc.stderr.count("layer 'net.4' received a gradient but its forward was never called") >= 2, \
        proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize(("head", "layer"), [("tied", "net.4"), ("late_tied", "aux")])
def test_a_tied_weight_is_refused_on_both_ranks(tmp_path: Path, head: str, layer: str) -> None:
    """A head called as a module and also used functionally: under DDP its ``.grad`` (the ranks' mean) is compared
    with the ranks' mean of the captured blocks on the first step that reaches it (``late_tied``: the second), and
    both ranks refuse it (before session 20 the check ran in one process only, and these fits recorded without a
    word)."""
    start = time.monotonic()
    proc = run_script("ddp", tmp_path, "--head", head, "--epochs", "1", timeout=200, external=True)
    assert proc.returncode != 0 and time.monotonic() - start < 55
    assert proc.stderr.count(f"layer '{layer}': its weight's gradient differs from the sum of the captured") >= 2, \
        proc.stderr[-3000:]


@pytest.mark.slow
def test_a_tied_weight_refused_by_one_rank_stops_both(tmp_path: Path) -> None:
    """Under gradient accumulation the first micro-batch is not synchronised: with the head's weight also used
    functionally on rank 1 only, rank 1 alone refuses it, at the step's end where the ranks agree, so rank 0 stops
    with "another rank failed" instead of losing its peer in DDP's next all-reduce."""
    proc = run_script("ddp", tmp_path, "--head", "rank1_tied", "--accumulate", "2", "--epochs", "1", timeout=200,
                      external=True)
    assert proc.returncode != 0
    assert "layer 'net.4': its weight's gradient differs from the sum of the captured" in proc.stderr
    assert "another rank failed in DataValueEmbedding" in proc.stderr, rank_tails(proc.stderr)
    assert "Connection closed by peer" not in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("rank", [0, 1])
def test_a_failed_embedding_write_on_one_rank_stops_both_ranks_with_its_error(tmp_path: Path, rank: int) -> None:
    """A full disk at train end, on rank 0 (which writes every embedding where the disks are apart) or on rank 1
    (writing its layers into rank 0's arrays): rank 0's used to leave rank 1 in the next collective (gloo:
    "connection closed"; NCCL: a hang until the timeout). The ranks keep their collectives going and agree, and
    rank 0 finishes no embeddings."""
    start = time.monotonic()
    proc = run_script("ddp", tmp_path, "--fail-embedding-write", "1", "--fail-embedding-rank", str(rank), "--epochs",
                      "1", timeout=200, external=True)
    assert proc.returncode != 0
    assert "embeddings/step_1: the disk is full" in proc.stderr  # the failing rank's own error
    assert "another rank failed in DataValueEmbedding" in proc.stderr  # the other rank stops with it
    assert "Connection closed by peer" not in proc.stderr
    assert time.monotonic() - start < 55, "a rank waited for the 60s gloo timeout"
    assert not [p for p in (tmp_path / "dve_ddp").rglob("embeddings*") if p.is_dir()]


@pytest.mark.slow
@pytest.mark.parametrize("failure", ["write", "read"])
def test_a_failed_embedding_write_or_read_on_rank_one_with_segments_leaves_rank_zero_no_embeddings(
    tmp_path: Path, failure: str
) -> None:
    """With segments every rank writes its own layers (into rank 0's arrays where it sees them; on separate disks
    into its own, then reads them back to send them to rank 0); a full disk, or a failed read on rank 1's disk,
    must not let rank 0 finish a store whose rank-1 layers are zeros (it did: that store loaded and scored without
    an error)."""
    args = (["--fail-embedding-write", "1", "--fail-embedding-rank", "1"] if failure == "write"
            else ["--fail-embedding-read", "1", "--separate-disks"])
    proc = run_script("ddp", tmp_path, *args, "--segments", "3", "--epochs", "1", timeout=200, external=True)
    assert proc.returncode != 0 and "Connection closed by peer" not in proc.stderr
    assert ("embeddings/step_1: the disk is full" if failure == "write" else "cannot be read (injected)") in proc.stderr
    root = tmp_path / "dve_ddp"
    assert json.loads((root / "manifest.json").read_text()).get("embeddings") != "complete"
    assert not [p for p in root.rglob("embeddings*") if p.is_dir()]  # rank 0's and rank 1's deleted, not finished
    with pytest.raises(StoreError, match="The backward recursion did not finish"):
        DataValueEmbeddings.load(root)


@pytest.mark.slow
@pytest.mark.parametrize("rank", [0, 1])
def test_a_step_file_one_rank_cannot_read_at_train_end_stops_every_rank_at_once(tmp_path: Path, rank: int) -> None:
    """A damaged step file (its checksum refused) found by one rank's train-end recursion: that rank raised its
    StoreError and the other waited in the next block's gather until the failing process exited ("Connection
    closed by peer"), or for the process group's timeout while it lived on (found by a DDP user). The ranks now
    agree once per block, before its gather: the other rank raises RemoteRankError at once."""
    start = time.monotonic()
    proc = run_script("ddp", tmp_path, "--fail-step-read", str(rank), "--epochs", "1", timeout=200, external=True)
    assert proc.returncode != 0 and "Connection closed by peer" not in proc.stderr
    assert "cannot be read (injected)" in proc.stderr and "another rank failed in DataValueEmbedding" in proc.stderr
    assert time.monotonic() - start < 55, "a rank waited for the 60s gloo timeout"


class TwoRanks:
    """A stand-in for rank 0 of 2 whose peer sent fixed rows (for the pure assembly logic)."""

    rank, world_size = 0, 2

    def __init__(self, peer_rows: list[torch.Tensor]) -> None:
        self.peer_rows = list(peer_rows)

    def any(self, flag: bool) -> bool:
        return flag

    def all_gather_rows(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        return [tensor, self.peer_rows.pop(0).to(tensor.dtype)]


def micro(ids: list[int], k: int = 2) -> MicroBatch:
    n = len(ids)
    return MicroBatch(torch.tensor(ids), torch.full((n,), 0.125, dtype=torch.float64),
                      {"a": torch.arange(n * k, dtype=torch.float64).reshape(n, k)})


def test_padding_duplicates_across_ranks_in_last_batch_are_kept() -> None:
    peer = [torch.tensor([[0.0, 7.0, 0.125, 0.0]]), torch.ones(1, 2, dtype=torch.float64)]
    assembler = StepAssembler(TwoRanks(peer), {"a": 2}, ["a"], torch.float64, allow_duplicate_ids=False)
    assembler.add(micro([7]))
    record = assembler.close(step=3, terms=StepTerms(torch.ones(1), {}, {}), epoch=0, last_batch=True)
    assert record is not None and record.sample_ids.tolist() == [7, 7]


def test_each_row_is_filed_under_its_micro_batch_in_row_order_over_the_ranks() -> None:
    """``StepRecord.batches``: the forwards training ran, which the exact replay of bf16 runs reruns (replay_data)."""
    peer = [torch.tensor([[0.0, 8.0, 0.125, 0.0], [0.0, 9.0, 0.125, 1.0]]), torch.ones(2, 2, dtype=torch.float64)]
    assembler = StepAssembler(TwoRanks(peer), {"a": 2}, ["a"], torch.float64, allow_duplicate_ids=False)
    assembler.add(micro([1, 2]))
    assembler.add(micro([3]))
    record = assembler.close(step=0, terms=StepTerms(torch.ones(1), {}, {}), epoch=0, last_batch=False)
    assert record is not None and record.sample_ids.tolist() == [1, 2, 3, 8, 9]
    assert record.batches.tolist() == [0, 0, 1, 2, 3]
    assert StepRecord.from_tensors(0, 0, record.to_tensors()).batches.tolist() == [0, 0, 1, 2, 3]


def test_duplicates_elsewhere_are_refused() -> None:
    peer = [torch.tensor([[0.0, 7.0, 0.125, 0.0]]), torch.ones(1, 2, dtype=torch.float64)]
    assembler = StepAssembler(TwoRanks(peer), {"a": 2}, ["a"], torch.float64, allow_duplicate_ids=False)
    assembler.add(micro([7]))
    with pytest.raises(SampleIdError, match=r"allow_duplicate_ids=True .*under DDP without a DistributedSampler "
                                             r"\(use_distributed_sampler=False\) every rank reads the same samples"):
        assembler.close(step=3, terms=StepTerms(torch.ones(1), {}, {}), epoch=0, last_batch=False)


def test_more_cross_rank_duplicates_than_padding_are_refused_in_the_last_batch() -> None:
    """A ``DistributedSampler`` pads fewer than ``world_size`` samples: two ranks reading the same two samples in an
    epoch of one step (full-batch training without a DistributedSampler) were taken for padding and kept."""
    peer = [torch.tensor([[0.0, 7.0, 0.125, 0.0], [0.0, 8.0, 0.125, 0.0]]), torch.ones(2, 2, dtype=torch.float64)]
    assembler = StepAssembler(TwoRanks(peer), {"a": 2}, ["a"], torch.float64, allow_duplicate_ids=False)
    assembler.add(micro([7, 8]))
    with pytest.raises(SampleIdError, match=r"sample ids \[7, 8\] occur more than once in step 0"):
        assembler.close(step=0, terms=StepTerms(torch.ones(1), {}, {}), epoch=0, last_batch=True)


def test_a_duplicate_within_one_rank_is_refused_in_the_last_batch_too() -> None:
    """Padding repeats a sample on another rank only: id 7 twice in rank 0's own last batch (and once on rank 1)
    is not padding, so it is refused."""
    peer = [torch.tensor([[0.0, 7.0, 0.125, 0.0]]), torch.ones(1, 2, dtype=torch.float64)]
    assembler = StepAssembler(TwoRanks(peer), {"a": 2}, ["a"], torch.float64, allow_duplicate_ids=False)
    assembler.add(micro([7, 7]))
    with pytest.raises(SampleIdError, match=r"sample ids \[7\] occur more than once in step 3"):
        assembler.close(step=3, terms=StepTerms(torch.ones(1), {}, {}), epoch=0, last_batch=True)


def test_sample_ids_beyond_float64_precision_are_gathered_exactly() -> None:
    """Ids travel as two exact 32-bit halves (hashed ids above 2**53 were rounded through float64 before, so two
    distinct ids could be refused as duplicates)."""
    ids = [2**53, 2**53 + 1, 2**62 + 7, 3]
    assembler = StepAssembler(SingleProcess(), {"a": 2}, ["a"], torch.float64, allow_duplicate_ids=False)
    assembler.add(micro(ids))
    record = assembler.close(step=0, terms=StepTerms(torch.ones(1), {}, {}), epoch=0, last_batch=False)
    assert record is not None and record.sample_ids.tolist() == ids and record.sample_ids.dtype == torch.int64


def test_weights_and_rows_of_several_micro_batches_are_gathered_exactly_in_float64() -> None:
    """Weights that float32 cannot hold (``w / (n W)`` with an odd micro-batch count, here 1/3 and 1/6) and rows
    arrive in the record bit for bit, in rank, micro-batch and position order. Oracle: the inputs themselves."""
    first = MicroBatch(torch.tensor([4, 9]), torch.tensor([1 / 3, 0.1], dtype=torch.float64),
                       {"a": torch.randn(2, 2, dtype=torch.float64), "b": torch.randn(2, 3, dtype=torch.float64)})
    second = MicroBatch(torch.tensor([5]), torch.tensor([1 / 6], dtype=torch.float64),
                        {"a": torch.randn(1, 2, dtype=torch.float64), "b": torch.randn(1, 3, dtype=torch.float64)})
    assembler = StepAssembler(SingleProcess(), {"a": 2, "b": 3}, ["a", "b"], torch.float64, allow_duplicate_ids=False)
    assembler.add(first)
    assembler.add(second)
    record = assembler.close(step=0, terms=StepTerms(torch.ones(2), {}, {}), epoch=0, last_batch=False)
    assert record is not None and record.sample_ids.tolist() == [4, 9, 5]
    assert record.weights.dtype == torch.float64
    assert torch.equal(record.weights, torch.cat([first.weights, second.weights]))
    for name in ("a", "b"):
        assert torch.equal(record.grads[name], torch.cat([first.grads[name], second.grads[name]]))


def test_skipped_step_on_every_rank_records_nothing() -> None:
    assembler = StepAssembler(SingleProcess(), {"a": 2}, ["a"], torch.float64, allow_duplicate_ids=False)
    assert assembler.close(step=0, terms=StepTerms(torch.ones(1), {}, {}), epoch=0, last_batch=False) is None


def test_layer_groups_are_balanced_by_recursion_cost() -> None:
    dims = {"big": 100, "mid": 60, "small1": 50, "small2": 40}
    owned = assign_groups([[n] for n in dims], dims, 2)
    assert sorted(sum(owned, [])) == sorted(dims)
    assert owned[1] == ["big"] and set(owned[0]) == {"mid", "small1", "small2"}
    equal = {f"l{i}": 8 for i in range(19)}
    assert [len(o) for o in assign_groups([[n] for n in equal], equal, 2)] == [9, 10]  # rank 0 also writes


class MailboxRank:
    """One rank of a simulated group: ``send_to_zero`` leaves the tensor in a shared mailbox, rank 0 collects."""

    def __init__(self, rank: int, world_size: int, mailbox: dict[int, torch.Tensor]) -> None:
        self.rank, self.world_size, self.mailbox = rank, world_size, mailbox

    def send_to_zero(self, tensor: torch.Tensor, numels: list[int]) -> list[torch.Tensor]:
        if self.rank:
            assert tensor.numel() == numels[self.rank]
            self.mailbox[self.rank] = tensor.clone()
            return []
        return [tensor] + [self.mailbox.get(r, tensor.new_zeros(0)) for r in range(1, self.world_size)]


def test_embeddings_of_other_ranks_arrive_on_rank_zero_layer_by_layer() -> None:
    """Three ranks, one owning no layer, two pieces of rows (steps): rank 0 gets every other rank's layers whole."""
    owned, dims, sizes = [["a"], [], ["b", "c"]], {"a": 2, "b": 3, "c": 1}, [2, 3]
    gen = torch.Generator().manual_seed(0)
    pieces = {n: [torch.randn(rows, dims[n], generator=gen) for rows in sizes] for n in dims}
    mailbox: dict[int, torch.Tensor] = {}
    for rank in (2, 1):
        mine = [{n: pieces[n][i] for n in owned[rank]} for i in range(len(sizes))]
        assert gather_embeddings(MailboxRank(rank, 3, mailbox), owned, dims, mine, sum(sizes), torch.float64) == {}
    merged = gather_embeddings(MailboxRank(0, 3, mailbox), owned, dims, [], sum(sizes), torch.float64)
    assert set(merged) == {"b", "c"}
    for name in merged:
        torch.testing.assert_close(merged[name], torch.cat(pieces[name]).double(), rtol=0, atol=0)


@pytest.mark.parametrize(("n", "batch", "drop_last", "padded"),
                         [(63, 16, False, 1), (64, 16, False, 0), (63, 16, True, 1), (63, 10, True, 0)])
def test_distributed_sampler_padding_warns_only_when_it_repeats_samples(fit, mlp_cls, tmp_path: Path, n: int,
                                                                       batch: int, drop_last: bool,
                                                                       padded: int) -> None:
    """A ``DistributedSampler`` (rank 0 of 2, given by hand in one process) pads ``n`` samples to an even split: 63
    repeats one sample, which the fit warns about (naming the count) once; 64 split evenly and nothing is said;
    with ``drop_last`` the copy, each rank's last sample, is dropped with the partial batch of 2 of 32 samples in
    batches of 10 (it was warned about as trained), and kept in batches of 16."""
    import warnings

    from torch.utils.data import DataLoader, DistributedSampler

    from lightning_dve import DataValueEmbedding
    from tests.conftest import DigitsDict

    dataset = DigitsDict(range(n))
    loader = DataLoader(dataset, batch_size=batch, drop_last=drop_last,
                        sampler=DistributedSampler(dataset, num_replicas=2, rank=0, shuffle=False))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(mlp_cls(), DataValueEmbedding(tmp_path / "dve", projection_dim=16, report=None), loader, max_epochs=2)
    said = [str(w.message) for w in caught if "DistributedSampler repeats" in str(w.message)]
    assert said == ([f"DataValueEmbedding: the DistributedSampler repeats {padded} sample(s) per epoch to give every "
                     "rank the same count; those copies are trained on, so each is kept as its own occurrence."]
                    if padded else [])


def test_a_drop_last_loader_without_a_distributed_sampler_is_not_taken_for_one(fit, mlp_cls, tmp_path: Path) -> None:
    """The padding check reads a DistributedSampler's ``num_samples`` for ``drop_last`` loaders only where it pads:
    a plain ``drop_last=True`` loader (SequentialSampler) must train as before."""
    from torch.utils.data import DataLoader

    from lightning_dve import DataValueEmbedding
    from tests.conftest import DigitsDict

    callback = DataValueEmbedding(tmp_path / "dve", projection_dim=16, report=None)
    fit(mlp_cls(), callback, DataLoader(DigitsDict(range(40)), batch_size=16, drop_last=True))
    assert callback.embeddings.steps == [0, 1]


def _communicator_worker(rank: int, port: int) -> None:
    """One of 2 gloo ranks: each collective of :class:`ProcessGroup`, with shapes that differ across the ranks."""
    import datetime

    import torch.distributed as dist

    from lightning_dve.distributed import ProcessGroup, communicator

    # a short timeout: a collective that goes wrong fails the test instead of hanging it
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=20))
    try:
        comm = communicator()
        assert isinstance(comm, ProcessGroup) and (comm.rank, comm.world_size) == (rank, 2)
        assert comm.any(rank == 1) and comm.any(rank == 0) and not comm.any(False)
        # rank r holds an [r + 1, r + 2] block: every rank gets each block back in its own shape, unpadded
        blocks = [torch.arange(2.0).reshape(1, 2), -torch.arange(6.0).reshape(2, 3)]
        parts = comm.all_gather_rows(blocks[rank])
        assert len(parts) == 2 and all(torch.equal(p, b) for p, b in zip(parts, blocks)), parts
        numels = [4, 3]
        got = comm.send_to_zero(torch.arange(numels[rank], dtype=torch.float64) + 10 * rank, numels)
        assert [g.tolist() for g in got] == ([[0.0, 1.0, 2.0, 3.0], [10.0, 11.0, 12.0]] if rank == 0 else [])
        if rank == 1:  # refused before anything is sent (rank 0 is not called: it would wait for the bytes)
            with pytest.raises(ValueError, match="rank 1 would send 2 values to rank 0, which expects 3"):
                comm.send_to_zero(torch.zeros(2, dtype=torch.float64), numels)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_process_group_collectives_on_two_gloo_ranks() -> None:
    """The communicator of a 2-process group, without Lightning: ``any`` is true if one rank's flag is,
    ``all_gather_rows`` returns blocks of other shapes exactly (padding trimmed), ``send_to_zero`` gives rank 0
    every rank's tensor (its own first), and a rank whose tensor has another size than every rank expects is
    refused (oracle: the inputs)."""
    import torch.multiprocessing as mp

    # forked, not spawned: the ranks need no fresh interpreter importing torch again (~9 s on 2 cores)
    mp.start_processes(_communicator_worker, args=(free_port(),), nprocs=2, join=True, start_method="fork")


def test_a_replay_recorder_that_rank_zero_cannot_open_stops_the_other_ranks(tmp_path: Path) -> None:
    """Only rank 0 opens the replay checkpoints' recorder; a damaged ``hyper.jsonl`` of a resumed run raised there
    alone and rank 1 waited at Lightning's next barrier (found by a DDP user). The opening is agreed: rank 0
    raises its StoreError, the others RemoteRankError."""
    from lightning_dve.callback_store import open_recorder
    from lightning_dve.checkpoints import CheckpointRecorder
    from lightning_dve.distributed import SingleProcess

    def damaged() -> None:
        raise StoreError("hyper.jsonl is corrupt (injected)")

    with pytest.raises(StoreError, match="injected"):
        open_recorder(SingleProcess(), damaged)
    with pytest.raises(RemoteRankError, match=r"another rank failed in DataValueEmbedding \(rank 0: StoreError: "
                                              r"hyper\.jsonl is corrupt \(injected\)\); this rank stops too"):
        open_recorder(PeerFailed(), None)
    recorder = CheckpointRecorder(tmp_path / "checkpoints", "auto", "h", None)
    assert open_recorder(SingleProcess(), lambda: recorder) is recorder
