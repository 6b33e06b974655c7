"""The train-end recursion: its cost next to training, its scaling in T, its memory, and segment parallelism.

1. ``recursion_vs_training``: the byte-level transformer LM of ``capture_overhead.py`` (4 blocks, width 256,
   sequence 128, batch 16, 19 tracked layers at the default projection 1024) is fitted with and without the
   callback, interleaved, with plain SGD and with AdamW (lr 1e-3, weight decay 0.01: the momentum form of the
   recursion on preconditioned rows; ``--optimizers``). ``on_train_end`` (store finalisation, backward
   recursion, embedding writes; report off) is timed between two timestamp callbacks and divided by the
   training loop of the fit without the callback. **Issue #5 target: <= 0.25.**
2. ``recursion_scaling``: a synthetic trajectory with the same layer shapes (19 layers x 1024 dims, batch 16,
   random gradients stored in the callback's default storage dtype) is written with
   ``TrajectoryStore.create`` / ``append(StepRecord(...))`` at T0 x {1, 2, 4, 8} steps, and
   ``recursion_ranks.embed_trajectory(SingleProcess(), store, PER_LAYER, [layers], dims, float32)`` is timed in a fresh
   subprocess per size and repeat, from T0 = 80 steps (1280 occurrences: more than a segment of
   ``recursion_ranks.whole_segment_rows`` = 1024 occurrences, which runs as one cheaper block). Memory: ``VmHWM`` (peak RSS) and the peak of ``RssAnon`` sampled every
   2 ms, both as absolute values and as the increase over the process's state just before the recursion
   (torch imported, store opened). **Targets: time linear in T; peak memory at 8x <= 1.2x of 1x.**
3. ``segments``: the same recursion at 4x with ``segments=2`` (two threads) against ``segments=1``, at 2 torch
   threads and at 1, if this version has segment-parallel recursion.

    .venv/bin/python benchmarks/recursion_scaling.py           # default, ~3 min on 2 cores
    .venv/bin/python benchmarks/recursion_scaling.py --quick   # CI smoke: 4 small layers, a few seconds
    .venv/bin/python benchmarks/recursion_scaling.py --full    # T0 = 128, 5 repeats

Timed runs wait for a quiet machine and are redone if other processes were busy (see ``capture_overhead.py``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common as C

import torch


def child(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``embed_trajectory`` on an existing store in this (fresh) process; return and print one JSON line."""
    C.setup(args.threads)
    from lightning_dve import distributed, recursion_ranks, sync
    from lightning_dve.config import AccumulatorLayout
    from lightning_dve.recursion import layer_groups
    from lightning_dve.store import TrajectoryStore

    store = TrajectoryStore.open(args.child)
    names = store.layer_names
    dims = {e["name"]: e["out_dim"] * e["in_dim"] for e in store.manifest["layers"]}
    owned = sync.assign_groups(layer_groups(names, AccumulatorLayout.PER_LAYER), dims, 1)
    timers = C.FunctionTimers()
    if args.segments == 1:  # break the time down (not thread-safe, so only for the sequential run)
        timers.wrap(store, "read_step", "read_s")
        for name in ("begin_embeddings", "write_embeddings", "finish_embeddings"):  # the arrays' creation too
            if hasattr(store, name):
                timers.wrap(store, name, "write_s")
    before = C.proc_status()
    with C.MemorySampler() as mem, C.Stopwatch() as sw:
        recursion_ranks.embed_trajectory(distributed.SingleProcess(), store, AccumulatorLayout.PER_LAYER, owned,
                                         dims, torch.float32, **C.embed_kwargs(args.segments, len(store.steps)))
    after = C.proc_status()
    out = {"wall_s": sw.seconds, "steps": len(store.steps), "vm_hwm": after["VmHWM"], "peak_rss": mem.peak_rss,
           "peak_anon": mem.peak_anon, "rss_before": before["VmRSS"], "anon_before": before["RssAnon"],
           "hwm_before": before["VmHWM"]}
    if args.segments == 1:
        read_s, write_s = timers.total["read_s"], timers.total["write_s"]
        out.update(read_s=read_s, write_s=write_s, compute_s=sw.seconds - read_s - write_s, **query(store))
    print(json.dumps(out), flush=True)
    return out


def query(store: Any) -> dict[str, Any]:
    """Time one query of 16 test points over every occurrence (per sample, ``per_step=False``) and its memory:
    the peak ``RssAnon`` over the process's state just before (the embeddings are memory-mapped; they stream in
    chunks of ``influence.CHUNK_BYTES``)."""
    from lightning_dve.influence import DataValueEmbeddings

    gen = torch.Generator().manual_seed(0)
    test = {e["name"]: torch.randn(16, e["out_dim"] * e["in_dim"], generator=gen) for e in store.manifest["layers"]}
    embeddings = DataValueEmbeddings(store)
    before = C.proc_status()
    with C.MemorySampler() as mem, C.Stopwatch() as sw:
        embeddings.score(test, per_step=False)
    return {"query_s": sw.seconds, "query_peak_anon_increase": mem.peak_anon - before["RssAnon"]}


def run_child(store: Path, threads: int, segments: int, args: argparse.Namespace) -> dict[str, Any]:
    def once() -> dict[str, Any]:
        if args.inprocess:  # --quick: no fresh process (memory figures then include the parent's history)
            import contextlib
            import io

            with contextlib.redirect_stdout(io.StringIO()):
                out = child(argparse.Namespace(child=str(store), threads=threads, segments=segments))
            C.setup(args.threads)
            return out
        cmd = [sys.executable, __file__, "--child", str(store), "--threads", str(threads), "--segments", str(segments)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    return C.measured(once, args.quiet, args.retries, args.max_wait)


def scaling(args: argparse.Namespace, layers: dict[str, int], batch: int, t0: int, repeats: int,
            tmp: Path) -> dict[str, Any]:
    storage = C.default_storage_dtype()
    mults = [1, 2, 4, 8]
    stores = {}
    for m in mults:
        with C.Stopwatch() as sw:
            store = C.write_synthetic_store(tmp / f"x{m}", layers, t0 * m, batch, storage)
        stores[m] = store.root
        C.emit({"benchmark": "recursion_scaling", "kind": "store", "multiple": m, "steps": t0 * m,
                "write_s": round(sw.seconds, 3), "bytes_per_step": store.manifest["bytes_per_step"],
                "storage_dtype": storage})
    runs: dict[int, list[dict[str, Any]]] = {m: [] for m in mults}
    for r in range(repeats):
        order = mults if r % 2 == 0 else list(reversed(mults))
        for m in order:
            runs[m].append(run_child(stores[m], args.threads, 1, args))
    base_t = C.stats([x["wall_s"] for x in runs[1]])["median"]
    base = {key: C.stats([x[key] for x in runs[1]])["median"] for key in ("vm_hwm", "peak_anon", "rss_before",
                                                                          "anon_before")}
    for m in mults:
        xs = runs[m]
        wall = C.stats([x["wall_s"] for x in xs])
        hwm = C.stats([x["vm_hwm"] for x in xs])["median"]
        anon = C.stats([x["peak_anon"] for x in xs])["median"]
        rss0 = C.stats([x["rss_before"] for x in xs])["median"]
        anon0 = C.stats([x["anon_before"] for x in xs])["median"]
        rec = {
            "benchmark": "recursion_scaling", "multiple": m, "steps": t0 * m, "batch": batch,
            "layers": len(layers), "dims_per_layer": sorted(set(layers.values())), "storage_dtype": storage,
            "threads": args.threads, "repeats": repeats, "wall_s": wall,
            "ms_per_step": round(1000 * wall["median"] / (t0 * m), 3),
            "time_over_1x": round(wall["median"] / base_t, 3), "linear_expectation": m,
            "read_s": C.stats([x["read_s"] for x in xs])["median"],
            "write_s": C.stats([x["write_s"] for x in xs])["median"],
            "compute_s": C.stats([x["compute_s"] for x in xs])["median"],
            "query_s": C.stats([x["query_s"] for x in xs])["median"] if "query_s" in xs[0] else None,
            "query_peak_anon_increase_mb": round(C.stats([x["query_peak_anon_increase"] for x in xs])["median"]
                                                 / 2**20, 1) if "query_s" in xs[0] else None,
            "peak_rss_mb": round(hwm / 2**20, 1), "peak_anon_mb": round(anon / 2**20, 1),
            "rss_before_mb": round(rss0 / 2**20, 1), "anon_before_mb": round(anon0 / 2**20, 1),
            "peak_rss_increase_mb": round((hwm - rss0) / 2**20, 1),
            "peak_anon_increase_mb": round((anon - anon0) / 2**20, 1),
            "peak_rss_over_1x": round(hwm / base["vm_hwm"], 3), "peak_anon_over_1x": round(anon / base["peak_anon"], 3),
            "peak_anon_increase_over_1x": round((anon - anon0) / max(1, base["peak_anon"] - base["anon_before"]), 3),
            "foreign_load": [x["foreign_load"] for x in xs], "fresh_process": not args.inprocess,
        }
        if m == 8:
            rec["target_memory_ratio"] = 1.2
            rec["meets_memory_target"] = rec["peak_rss_over_1x"] <= 1.2 and rec["peak_anon_over_1x"] <= 1.2
            rec["time_linearity"] = round(rec["time_over_1x"] / 8, 3)
        C.emit(rec)
    if args.segments:
        segment_runs(args, stores[4], t0 * 4, repeats)
    return rec


def segment_runs(args: argparse.Namespace, store: Path, steps: int, repeats: int) -> None:
    try:
        C.embed_kwargs(2, steps)
    except TypeError as err:
        C.emit({"benchmark": "recursion_segments", "skipped": str(err)})
        return
    for threads in sorted({args.threads, 1}, reverse=True):
        seq, par = [], []
        for _ in range(repeats):
            seq.append(run_child(store, threads, 1, args)["wall_s"])
            par.append(run_child(store, threads, 2, args)["wall_s"])
        C.emit({"benchmark": "recursion_segments", "steps": steps, "torch_threads": threads, "segments": 2,
                "workers": 2, "sequential_s": C.stats(seq), "segmented_s": C.stats(par),
                "ratio": C.ratio_stats(par, seq)})


def vs_training(args: argparse.Namespace, repeats: int, quick: bool, optimizer: str = "sgd") -> dict[str, Any]:
    import capture_overhead as co

    cfg = co.model_configs("quick" if quick else "default")["lm"]
    dim = 1024 if not quick else 64
    ds = co.dataset("lm", cfg)
    co.one_fit("lm", cfg, ds, "off", optimizer)  # warm-up
    off, on = [], []
    for r in range(repeats):
        pair = [("off", off), (dim, on)]
        for v, sink in (pair if r % 2 == 0 else pair[::-1]):
            sink.append(C.measured(lambda v=v: co.one_fit("lm", cfg, ds, v, optimizer), args.quiet, args.retries,
                                   args.max_wait))
    train = [x["train_loop_s"] for x in off]
    end = [x["train_end_s"] for x in on]
    rec = {"benchmark": "recursion_vs_training", "model": "lm", "optimizer": optimizer, "module": cfg["module"],
           "projection_dim": dim,
           "steps": on[0]["steps"], "batch": cfg["batch"], "repeats": repeats,
           "train_loop_s_without_callback": C.stats(train), "train_end_s": C.stats(end),
           "train_end_over_train_loop": C.ratio_stats(end, train),
           "recursion_ms_per_step": round(1000 * C.stats(end)["median"] / on[0]["steps"], 2),
           "train_ms_per_step": round(1000 * C.stats(train)["median"] / on[0]["steps"], 2),
           "foreign_load": [x["foreign_load"] for x in off + on]}
    if not quick:
        rec["target"] = 0.25
        rec["meets_target"] = rec["train_end_over_train_loop"]["median_of_paired"] <= 0.25
    rec["train_steady_step_s_without_callback"] = C.stats([x["steady_step_s"] for x in off])
    C.emit(rec)
    return rec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true")
    mode.add_argument("--full", action="store_true")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--t0", type=int, default=None, help="steps of the 1x trajectory")
    parser.add_argument("--no-segments", dest="segments", action="store_false")
    parser.add_argument("--no-training", dest="training", action="store_false", help="skip recursion_vs_training")
    parser.add_argument("--optimizers", default="sgd,adamw", help="recursion_vs_training's LM optimizers: sgd "
                        "(plain-SGD recursion), adamw (momentum form with preconditioned rows)")
    parser.add_argument("--inprocess", action="store_true", help="run the recursions in this process (default "
                        "with --quick; memory figures are then not per-run)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    C.add_contention_args(parser)
    args, _ = parser.parse_known_args()
    if args.child:
        sub = argparse.ArgumentParser()
        sub.add_argument("--child")
        sub.add_argument("--threads", type=int)
        sub.add_argument("--segments", type=int, default=1)
        child(sub.parse_known_args()[0])
        return
    if args.quick and "--quiet" not in " ".join(sys.argv):
        args.quiet = 0.0
    if args.quick:
        args.inprocess = True
    C.setup(args.threads)
    mode_name = "quick" if args.quick else "full" if args.full else "default"
    repeats = args.repeats or {"quick": 1, "default": 3, "full": 5}[mode_name]
    # T0 x batch exceeds the rows a segment may have to run as one block (recursion_ranks.whole_segment_rows: 1024 for
    # these layers, 256 for --quick's), so every size runs the streamed blocks whose scaling this measures
    t0 = args.t0 or {"quick": 20, "default": 80, "full": 128}[mode_name]
    layers = {f"l{i}": 256 for i in range(4)} if args.quick else {n: 1024 for n in C.LM_LAYERS}
    C.emit({"benchmark": "recursion_scaling", "kind": "machine", "mode": mode_name, **C.machine(),
            "quiet_threshold": args.quiet, "loadavg_start": C.loadavg()})
    started = time.perf_counter()
    training = None
    for optimizer in args.optimizers.split(",") if args.training else []:
        result = vs_training(args, repeats, args.quick, optimizer)
        training = training or result  # the long-run estimate below uses the first (plain SGD by default)
    tmp = Path(tempfile.mkdtemp(prefix="dve_rec_"))
    try:
        longest = scaling(args, layers, 16, t0, repeats, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if training is not None and not args.quick:
        step = training["train_steady_step_s_without_callback"]["median"]
        C.emit({"benchmark": "recursion_vs_training", "kind": "long_run_estimate",
                "recursion_ms_per_step_at_8x": longest["ms_per_step"], "train_steady_step_ms": round(1000 * step, 2),
                "ratio": round(longest["ms_per_step"] / (1000 * step), 4),
                "note": "per-step recursion + embedding write of the LM-shaped synthetic trajectory (8x, fresh "
                        "process) over the LM's steady training step without the callback: the ratio a long run "
                        "tends to, without the fixed train-end costs of a 6-step fit"})
    C.emit({"benchmark": "recursion_scaling", "kind": "done", "wall_s": round(time.perf_counter() - started, 1),
            "loadavg_end": C.loadavg()})


if __name__ == "__main__":
    main()
