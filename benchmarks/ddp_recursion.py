"""Data-parallel recursion: wall time on 2 ranks over 1 rank, and the bytes the callback exchanges.

1. ``ddp_recursion``: one synthetic trajectory shaped like the transformer LM of ``capture_overhead.py``
   (19 tracked layers x 1024 projected dims, global batch 16, random gradients in the callback's default
   storage dtype) is written into per-rank stores exactly as the callback shards it: the layers are split
   with ``sync.assign_groups`` and each rank's ``StepRecord`` holds only the gradients of the layers it owns.
   Each configuration runs ``recursion_ranks.embed_trajectory`` in processes started with
   ``torch.multiprocessing.spawn``
   (gloo on localhost; ``lightning_dve.distributed.ProcessGroup()`` on 2 ranks, ``SingleProcess()`` on 1) with
   ``torch.set_num_threads(1)`` in every process, so both configurations use at most 2 cores. Time is
   barrier-to-barrier on rank 0, including every embedding write; before each repeat the
   embeddings of the previous one are deleted (untimed), so every run writes into an empty ``embeddings/`` as
   the callback's train end does. Rank 1's store is ``shards/rank_1`` under rank 0's, as the callback lays them
   out, so rank 1 writes its layers' embeddings into rank 0's arrays (both see them); a third configuration keeps
   the ranks apart as on machines with their own disks (``two_ranks_separate_disks_s``: rank 1 does not join,
   its embeddings are gathered to rank 0), all three alternating. The 2-rank embeddings are checked against the
   1-rank ones after every 2-rank run. The time inside
   each phase of ``embed_trajectory`` (the recursion steps, step reads, embedding writes, the merge onto rank 0
   and the gather of segment factors) is reported per rank (``phases_s``; the phases nest: ``merge`` includes
   its reads and writes). **Issue #4 target: 2 ranks <= 0.6x of 1 rank.**
2. ``ddp_comm_volume``: the per-step exchange of training (``sync.StepAssembler.close`` after the per-micro-batch
   ``agree_on_errors``) run for real on 2 gloo ranks with LM-shaped micro-batches, counting the bytes of every
   ``all_gather`` / ``all_reduce`` call, next to the formula and next to DDP's own gradient all-reduce of the
   LM's parameters. The train-end volume (embedding merge, segment factors) is counted during (1).

    .venv/bin/python benchmarks/ddp_recursion.py            # default, ~1-2 min on 2 cores
    .venv/bin/python benchmarks/ddp_recursion.py --quick    # CI smoke
    .venv/bin/python benchmarks/ddp_recursion.py --full     # 96 steps, 5 repeats
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import _common as C

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ByteCounter:
    """Wrap ``dist.all_gather`` / ``dist.gather`` / ``dist.all_reduce`` and the point-to-point ``dist.send`` /
    ``dist.irecv``; count their payloads by phase label."""

    def __init__(self) -> None:
        self.phase = "other"
        self.sent: dict[str, int] = defaultdict(int)  # this rank's payload bytes per collective
        self.received: dict[str, int] = defaultdict(int)  # bytes of the other ranks' payloads this rank receives
        self.calls: dict[str, int] = defaultdict(int)
        self._gather, self._reduce, self._gather_to = dist.all_gather, dist.all_reduce, dist.gather
        self._send, self._irecv = dist.send, dist.irecv

        def all_gather(tensor_list, tensor, *a, **k):
            n = tensor.numel() * tensor.element_size()
            self.sent[self.phase] += n
            self.received[self.phase] += n * (len(tensor_list) - 1)
            self.calls[self.phase] += 1
            return self._gather(tensor_list, tensor, *a, **k)

        def all_reduce(tensor, *a, **k):
            n = tensor.numel() * tensor.element_size()
            self.sent[self.phase] += n
            self.received[self.phase] += n * (dist.get_world_size() - 1)  # reduce payloads of the peers
            self.calls[self.phase] += 1
            return self._reduce(tensor, *a, **k)

        def gather(tensor, gather_list=None, *a, **k):  # to rank 0: peers send, rank 0 receives
            n = tensor.numel() * tensor.element_size()
            if gather_list is None:
                self.sent[self.phase] += n
            else:
                self.received[self.phase] += n * (len(gather_list) - 1)
            self.calls[self.phase] += 1
            return self._gather_to(tensor, gather_list, *a, **k)

        def send(tensor, *a, **k):  # a peer's payload to rank 0 (``send_to_zero``)
            self.sent[self.phase] += tensor.numel() * tensor.element_size()
            self.calls[self.phase] += 1
            return self._send(tensor, *a, **k)

        def irecv(tensor, *a, **k):
            self.received[self.phase] += tensor.numel() * tensor.element_size()
            self.calls[self.phase] += 1
            return self._irecv(tensor, *a, **k)

        dist.all_gather, dist.all_reduce, dist.gather = all_gather, all_reduce, gather
        dist.send, dist.irecv = send, irecv

    def restore(self) -> None:
        dist.all_gather, dist.all_reduce, dist.gather = self._gather, self._reduce, self._gather_to
        dist.send, dist.irecv = self._send, self._irecv


class PhaseTimers(C.FunctionTimers):
    """Wall time inside the phases of ``embed_trajectory`` (patched in this process only; skipped if absent).

    ``recursion_step`` / ``recursion_block``, ``read_step`` and ``write_embeddings`` cover the recursion pass;
    ``write_pending`` (the sends to rank 0 plus the writes, in a background thread that overlaps the next
    block) and ``gather_embeddings`` (the sends, which wait for the peer's block) nest the writes and the
    sends; the module-level
    ``_merge_embeddings_on_rank_zero`` (re-read, gather and rewrite of every step's embeddings) and
    ``_gather_factors`` (the segment factors ``I - M``) run after it on more than one rank.
    """

    def __init__(self) -> None:
        from lightning_dve import recursion_ranks
        from lightning_dve.recursion import BackwardRecursion
        from lightning_dve.store import TrajectoryStore

        super().__init__()
        for owner, name, label in ((recursion_ranks, "_merge_embeddings_on_rank_zero", "merge_embeddings_on_rank_zero"),
                                   (recursion_ranks, "_gather_factors", "gather_factors"),
                                   (BackwardRecursion, "step", "recursion_step"),
                                   (BackwardRecursion, "block", "recursion_block"),
                                   (recursion_ranks, "_write_pending", "write_pending_background"),
                                   (recursion_ranks, "gather_embeddings", "gather_embeddings"),
                                   (TrajectoryStore, "read_step", "read_step"),
                                   (TrajectoryStore, "write_embeddings", "write_embeddings"),
                                   (TrajectoryStore, "embedding_arrays", "embedding_arrays"),
                                   (TrajectoryStore, "write_segments", "write_segments")):
            if hasattr(owner, name):
                self.wrap(owner, name, label)



def _init(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)


def embed_worker(rank: int, world: int, port: int, roots: list[str], segments: int, out: str,
                 separate: bool = False) -> None:
    """One rank: open its store, barrier, ``embed_trajectory``, barrier; write timings and byte counts. With
    ``separate`` the ranks act as if on machines with their own disks: rank 1 does not join rank 0's embeddings
    (``recursion_ranks.join_rank_zero``), so they are gathered to rank 0."""
    _init(rank, world, port)
    C.setup(1)
    from lightning_dve import distributed, recursion_ranks, sync
    from lightning_dve.config import AccumulatorLayout
    from lightning_dve.errors import StoreError
    from lightning_dve.recursion import layer_groups
    from lightning_dve.store import TrajectoryStore

    if separate:
        begin = TrajectoryStore.begin_embeddings

        def unseen(store: Any, widths: Any, dtype: Any, token: Any = None) -> None:
            if token is not None and store.manifest.get("rank", 0) > 0:
                raise StoreError("another machine's disk (benchmark)")
            begin(store, widths, dtype, token)

        TrajectoryStore.begin_embeddings = unseen

    store = TrajectoryStore.open(roots[rank])
    dims = {e["name"]: e["out_dim"] * e["in_dim"] for e in store.manifest["layers"]}
    owned = sync.assign_groups(layer_groups(store.layer_names, AccumulatorLayout.PER_LAYER), dims, world)
    comm = distributed.ProcessGroup() if world > 1 else distributed.SingleProcess()
    counter = ByteCounter()
    counter.phase = "embed"
    dist.barrier()
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    phases = PhaseTimers()
    recursion_ranks.embed_trajectory(comm, store, AccumulatorLayout.PER_LAYER, owned, dims, torch.float32,
                                     **C.embed_kwargs(segments, len(store.steps)))
    cpu = time.process_time() - cpu0
    phases.restore()
    counter.phase = "barrier"
    dist.barrier()
    wall = time.perf_counter() - t0
    counter.restore()
    Path(out, f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "wall_s": wall, "cpu_s": cpu, "owned": owned[rank], "steps": len(store.steps),
        "phases_s": phases.total,
        "sent": dict(counter.sent), "received": dict(counter.received), "calls": dict(counter.calls)}))
    dist.destroy_process_group()


START_METHOD = "spawn"  # ``--quick`` sets "fork" (below)


def spawn_ranks(worker: Any, args: tuple[Any, ...], world: int, out: str) -> None:
    """Start the ranks with ``START_METHOD`` and join them; a rank that wrote its result (``out/rank{r}.json``)
    and then aborted at exit in gloo's teardown (once in ~20 runs; test_distributed.py) is not a failure.

    The timed modes spawn (each rank a fresh interpreter, as ``mp.spawn``); ``--quick`` forks, so the ranks do
    not each import torch, Lightning and ``lightning_dve`` again (~8 s a rank on 2 cores), while they still run
    the same workers on their own gloo process group.
    """
    try:
        mp.start_processes(worker, args=args, nprocs=world, join=True, start_method=START_METHOD)
    except mp.ProcessExitedException as err:
        done = all(Path(out, f"rank{r}.json").is_file() for r in range(world))
        if not done or err.signal_name != "SIGABRT":
            raise


def run_embed(world: int, roots: list[str], segments: int, args: argparse.Namespace,
              separate: bool = False) -> dict[str, Any]:
    def once() -> dict[str, Any]:
        for root in roots:  # as at a real train end, no embeddings of an earlier repeat are there to delete
            shutil.rmtree(Path(root, "embeddings"), ignore_errors=True)
        out = tempfile.mkdtemp(prefix="dve_ddp_out_")
        spawn_ranks(embed_worker, (world, free_port(), roots, segments, out, separate), world, out)
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]
        shutil.rmtree(out, ignore_errors=True)
        return {"wall_s": max(r["wall_s"] for r in ranks), "ranks": ranks}

    return C.measured(once, args.quiet, args.retries, args.max_wait)


def embeddings_of(root: str) -> dict[int, dict[str, torch.Tensor]]:
    from lightning_dve.store import TrajectoryStore

    store = TrajectoryStore.open(root)
    return {s: store.embedding_arrays().step(s)[1] for s in store.steps}


def ddp_recursion(args: argparse.Namespace, layers: dict[str, int], batch: int, steps: int, repeats: int,
                  tmp: Path) -> None:
    from lightning_dve import sync
    from lightning_dve.config import AccumulatorLayout
    from lightning_dve.recursion import layer_groups

    storage = C.default_storage_dtype()
    single = str(tmp / "w1" / "rank0")
    C.write_synthetic_store(Path(single), layers, steps, batch, storage)
    owned = sync.assign_groups(layer_groups(list(layers), AccumulatorLayout.PER_LAYER), layers, 2)
    pair = [str(tmp / "w2"), str(tmp / "w2" / "shards" / "rank_1")]  # as the callback lays out the ranks' stores
    for rank, root in enumerate(pair):
        C.write_synthetic_store(Path(root), layers, steps, batch, storage, keep=owned[rank], world_size=2, rank=rank)
    one, two, apart, max_diff = [], [], [], 0.0
    for r in range(repeats):
        order = [(1, [single], one, False), (2, pair, two, False), (2, pair, apart, True)]
        for world, roots, sink, separate in (order if r % 2 == 0 else order[::-1]):
            sink.append(run_embed(world, roots, 1, args, separate))
            if world == 2:
                ref, got = embeddings_of(single), embeddings_of(pair[0])
                max_diff = max(max_diff, *(float((ref[s][n] - got[s][n]).abs().max()) for s in ref for n in ref[s]))
    max_ref = max(float(ref[s][n].abs().max()) for s in ref for n in ref[s])
    embed_bytes = apart[0]["ranks"][0]
    C.emit({
        "benchmark": "ddp_recursion", "steps": steps, "global_batch": batch, "layers": len(layers),
        "dims_per_layer": sorted(set(layers.values())), "storage_dtype": storage, "torch_threads_per_rank": 1,
        "backend": "gloo", "repeats": repeats,
        "owned_dims_per_rank": [sum(layers[n] for n in o) for o in owned],
        "one_rank_s": C.stats([x["wall_s"] for x in one]), "two_ranks_s": C.stats([x["wall_s"] for x in two]),
        "ratio": C.ratio_stats([x["wall_s"] for x in two], [x["wall_s"] for x in one]),
        "two_ranks_separate_disks_s": C.stats([x["wall_s"] for x in apart]),
        "ratio_separate_disks": C.ratio_stats([x["wall_s"] for x in apart], [x["wall_s"] for x in one]),
        "target": 0.6,
        "meets_target": C.ratio_stats([x["wall_s"] for x in two],
                                      [x["wall_s"] for x in one])["median_of_paired"] <= 0.6,
        "rank_wall_s_two_ranks": [[round(rk["wall_s"], 3) for rk in x["ranks"]] for x in two],
        "rank_cpu_s_two_ranks": [[round(rk["cpu_s"], 3) for rk in x["ranks"]] for x in two],
        "phases_s_one_rank": {k: round(v, 3) for k, v in one[0]["ranks"][0]["phases_s"].items()},
        "phases_s_two_ranks": [{k: round(v, 3) for k, v in rk["phases_s"].items()} for rk in two[0]["ranks"]],
        "phases_s_two_ranks_separate_disks": [{k: round(v, 3) for k, v in rk["phases_s"].items()}
                                              for rk in apart[0]["ranks"]],
        "embeddings_match_one_rank": {"max_abs_diff": max_diff, "max_abs": max_ref},
        "train_end_bytes_rank0_separate_disks": {"received": embed_bytes["received"], "sent": embed_bytes["sent"],
                                                 "calls": embed_bytes["calls"]},
        "train_end_bytes_rank0": {key: two[0]["ranks"][0][key] for key in ("received", "sent", "calls")},
        "foreign_load": [x["foreign_load"] for x in one + two + apart],
    })


def comm_worker(rank: int, world: int, port: int, layers: dict[str, int], per_rank: int, steps: int, out: str) -> None:
    """One rank of the training-time exchange: ``agree_on_errors`` + ``StepAssembler.close`` per step."""
    _init(rank, world, port)
    C.setup(1)
    from lightning_dve import distributed, sync
    from lightning_dve.config import AccumulatorLayout
    from lightning_dve.recursion import layer_groups
    from lightning_dve.updates import StepTerms

    comm = distributed.ProcessGroup()
    owned = sync.assign_groups(layer_groups(list(layers), AccumulatorLayout.PER_LAYER), layers, world)
    assembler = sync.StepAssembler(comm, dict(layers), owned[rank], torch.float32, False)
    counter = ByteCounter()
    times = []
    for step in range(steps):
        ids = torch.arange(per_rank) * world + rank + step * per_rank * world
        grads = {n: torch.randn(per_rank, k) for n, k in layers.items()}
        weights = torch.full((per_rank,), 1.0 / (per_rank * world), dtype=torch.float64)
        counter.phase = "agree_on_errors" if step else "warmup"
        t0 = time.perf_counter()
        assembler.add(sync.MicroBatch(ids, weights, grads))
        sync.agree_on_errors(comm, None)
        counter.phase = "step_gather" if step else "warmup"
        assembler.close(step, StepTerms(torch.full((len(layers),), 0.1, dtype=torch.float64), {}, {}), 0, False)
        times.append(time.perf_counter() - t0)
    counter.restore()
    Path(out, f"rank{rank}.json").write_text(json.dumps({
        "sent": dict(counter.sent), "received": dict(counter.received), "calls": dict(counter.calls),
        "ms_per_step": 1000 * sorted(times[1:])[len(times[1:]) // 2]}))
    dist.barrier()  # let the peer finish its last collective before the group goes away
    dist.destroy_process_group()


def comm_volume(layers: dict[str, int], per_rank: int, steps: int) -> None:
    out = tempfile.mkdtemp(prefix="dve_comm_")
    spawn_ranks(comm_worker, (2, free_port(), layers, per_rank, steps, out), 2, out)
    r0 = json.loads(Path(out, "rank0.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    n = steps - 1
    k_total = sum(layers.values())
    world = 2
    formula = {
        "shape_exchange": 2 * 16,  # two all_gathers of int64[2] (rows, cols) per step
        "ids_weights_float64": 2 * 8 * per_rank,  # [b, 2] float64
        "grads_float32": 4 * per_rank * k_total,  # [b, sum k] in the training dtype
        "error_flag_int64": 8,  # all_reduce of one int64 per micro-batch
    }
    payload = sum(formula.values())
    lm = C.TinyLM()
    n_params = sum(p.numel() for p in lm.parameters())
    C.emit({
        "benchmark": "ddp_comm_volume", "world_size": world, "per_rank_batch": per_rank, "sum_k": k_total,
        "layers": len(layers), "measured_steps": n,
        "measured_per_step_rank0": {phase: {"sent": r0["sent"].get(phase, 0) // n,
                                            "received": r0["received"].get(phase, 0) // n,
                                            "calls": r0["calls"].get(phase, 0) / n}
                                    for phase in ("agree_on_errors", "step_gather")},
        "formula_per_step_payload_bytes": {**formula, "total": payload},
        "formula_received_per_rank_per_step": (world - 1) * payload,
        "exchange_ms_per_step": round(r0["ms_per_step"], 3),
        "ddp_gradient_allreduce_bytes_per_step": {"params": n_params, "float32_bytes": 4 * n_params,
                                                  "ring_sent_per_rank": int(2 * (world - 1) / world * 4 * n_params)},
        "note": "received = bytes of the other ranks' payloads (all_gather delivers every rank's rows to every "
                "rank); padding to the largest rank's rows is included when per-rank batches differ",
    })


def main() -> None:
    global START_METHOD
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true")
    mode.add_argument("--full", action="store_true")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    C.add_contention_args(parser)
    args = parser.parse_args()
    if args.quick and "--quiet" not in " ".join(__import__("sys").argv):
        args.quiet = 0.0
    C.setup(1)
    START_METHOD = "fork" if args.quick else "spawn"
    mode_name = "quick" if args.quick else "full" if args.full else "default"
    repeats = args.repeats or {"quick": 1, "default": 3, "full": 5}[mode_name]
    steps = args.steps or {"quick": 4, "default": 48, "full": 96}[mode_name]
    layers = {f"l{i}": 256 for i in range(4)} if args.quick else {n: 1024 for n in C.LM_LAYERS}
    C.emit({"benchmark": "ddp_recursion", "kind": "machine", "mode": mode_name, **C.machine(),
            "quiet_threshold": args.quiet, "loadavg_start": C.loadavg()})
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="dve_ddp_"))
    try:
        ddp_recursion(args, layers, 16, steps, repeats, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    comm_volume(layers, 8, 4 if args.quick else 11)
    C.emit({"benchmark": "ddp_recursion", "kind": "done", "wall_s": round(time.perf_counter() - started, 1),
            "loadavg_end": C.loadavg()})


if __name__ == "__main__":
    main()
