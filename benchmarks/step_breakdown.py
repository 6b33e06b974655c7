"""Where the callback's time goes, per optimizer step, measured on the package's own classes.

A plain training step (forward, backward, SGD step; no Lightning) is timed against the same step with the
package's ``capture.GradientCapture`` attached (``begin`` -> forward/backward -> ``finish``), iteration by
iteration and interleaved (A/B/A/B...), so slow drifts of the machine's load hit both equally; medians are
reported; iterations during which other processes used more than ``--quiet`` of the machine are dropped
and redone. Wrappers around the capture hooks split the capture time into the forward hooks (input projection),
the output-gradient hooks (output projection and the per-sample outer product), ``finish`` (undo the loss
scale, copy to CPU) and a residual (hook dispatch, autograd and allocator effects). The per-step bookkeeping of
the callback (``sync.StepAssembler`` close, ``TrajectoryStore.append``, ``batches.check_finite``, and the
``state_key`` that Lightning evaluates as a profiler label on every hook call, ~6 per step) and the
backward recursion's per-step cost (``recursion.BackwardRecursion.block`` over blocks of ``recursion_ranks.BLOCK_ROWS``
occurrences, as the train end runs it, plus ``write_embeddings``) are timed
on records of the same shapes. Their sum over the plain step estimates the long-run ``fit`` ratio.

Experiments (``--experiments``, default on): the capture is re-timed with two candidate changes patched in
from this script (never into the package files): ``no_grad`` (projections in the forward hook run under
``torch.no_grad()``, so autograd records nothing for them) and ``no_cat`` (the bias column of a Linear input
is folded into the product as ``x @ P[:, :-1].T + P[:, -1]`` instead of concatenating a column of ones).
Their stored gradients are checked against the unpatched ones.

Finally (``step_breakdown_in_fit``) the callback's own hooks are timed inside real ``Trainer.fit`` runs of
``capture_overhead.py``'s models, next to the extra training-loop time per step they cause.

    .venv/bin/python benchmarks/step_breakdown.py                 # LM at 1024 and 64, MLP, CNN (~2-3 min)
    .venv/bin/python benchmarks/step_breakdown.py --quick
    .venv/bin/python benchmarks/step_breakdown.py --threads 1     # less sensitive to a busy machine
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import _common as C

import torch


HookTimers = C.FunctionTimers


@contextlib.contextmanager
def patched(variant: str):
    """Temporarily patch a candidate change into the package (this process only)."""
    from lightning_dve import capture, layers

    undo = []
    if variant in ("no_grad", "both"):
        original = capture.GradientCapture._on_forward

        def on_forward(self, *a, **k):
            with torch.no_grad():
                return original(self, *a, **k)

        capture.GradientCapture._on_forward = on_forward
        undo.append(lambda: setattr(capture.GradientCapture, "_on_forward", original))
    if variant in ("no_cat", "both"):
        spec = layers._REGISTRY[torch.nn.Linear]

        def linear_input(module, args, proj):
            if proj is None or not layers.has_trainable_bias(module):
                return spec.project_input(module, args, proj)
            x = layers._as_positions(args[0])
            p = proj.to(x.dtype)
            return torch.matmul(x, p[:, :-1].T) + p[:, -1]

        import dataclasses

        layers._REGISTRY[torch.nn.Linear] = dataclasses.replace(spec, project_input=linear_input)
        undo.append(lambda: layers._REGISTRY.__setitem__(torch.nn.Linear, spec))
    try:
        yield
    finally:
        for u in reversed(undo):
            u()


def build(kind: str, quick: bool):
    """``(net, loss_fn, batch, exclude)`` for one model."""
    if kind == "lm":
        module_kw = dict(width=64, layers=2, heads=2, seq_len=32) if quick else {}
        seq = module_kw.get("seq_len", 128)
        batch = 4 if quick else 16
        ds = C.lm_dataset(batch, seq)
        torch.manual_seed(0)
        return C.TinyLM(**module_kw), C.lm_loss, {"x": ds.x, "y": ds.y}, C.LM_EXCLUDE
    ds = C.digits_dataset(kind)
    torch.manual_seed(0)
    net = C.mlp_net() if kind == "mlp" else C.cnn_net()
    return net, C.classification_loss, {"x": ds.x[:32], "y": ds.y[:32]}, ()


def breakdown(kind: str, dim: int | None, iters: int, quick: bool, experiments: bool, quiet: float = 0.0,
              max_wait_s: float = 20.0) -> None:
    from lightning_dve import batches, capture, distributed, recursion_ranks, sync
    from lightning_dve.config import AccumulatorLayout, DVEConfig
    from lightning_dve.recursion import BackwardRecursion
    from lightning_dve.store import TrajectoryStore

    net, loss_fn, batch, exclude = build(kind, quick)
    opt = torch.optim.SGD(net.parameters(), lr=1e-4)  # small: the weights barely move over many iterations
    b = batch["y"].shape[0]
    weights = torch.full((b,), 1.0 / b, dtype=torch.float64)

    def new_capture():
        tracked = capture.resolve_layers(net, DVEConfig(projection_dim=dim, exclude=exclude))
        return tracked, capture.GradientCapture(tracked)

    def plain_step() -> float:
        t = time.perf_counter()
        opt.zero_grad()
        loss_fn(net(batch["x"]), batch["y"]).backward()
        opt.step()
        return time.perf_counter() - t

    def capture_step(cap) -> tuple[float, dict[str, torch.Tensor]]:
        t = time.perf_counter()
        opt.zero_grad()
        cap.begin()
        loss_fn(net(batch["x"]), batch["y"]).backward()
        grads = cap.finish(weights)
        opt.step()
        return time.perf_counter() - t, grads

    timers = HookTimers()
    timers.wrap(capture.GradientCapture, "_on_forward", "forward_hooks")
    timers.wrap(capture.GradientCapture, "_on_output_grad", "output_grad_hooks")
    timers.wrap(capture.GradientCapture, "finish", "finish")
    variants = ["plain", "capture"] + (["no_grad", "no_cat", "both"] if experiments else [])
    caps = {}
    for v in variants[1:]:
        with patched(v if v != "capture" else "none"):
            caps[v] = new_capture()
    times: dict[str, list[float]] = {v: [] for v in variants}
    reference_grads = None
    plain_step()  # warm-up, then size the run: ~3 s of plain steps, 15..300 iterations
    probe = statistics.median(plain_step() for _ in range(3))
    iters = max(iters, min(300, int(3.0 / max(probe, 1e-4)))) if not quick else iters
    variant_hooks: dict[str, dict[str, float]] = {v: defaultdict(float) for v in variants[1:]}
    clean, dropped, i = 0, 0, 0
    while clean < iters + 2 and i < 4 * (iters + 2):
        if quiet > 0 and (clean % 10 == 0 or dropped):
            C.wait_for_quiet(quiet, max_wait_s)
        row: dict[str, float] = {}
        row_hooks: dict[str, dict[str, float]] = {}
        shift = i % len(variants)
        with C.Contention() as c:
            for v in variants[shift:] + variants[:shift]:
                if v == "plain":
                    row[v] = plain_step()
                else:
                    tracked, cap = caps[v]
                    cap.attach()
                    timers.reset()
                    with patched(v if v != "capture" else "none"):
                        row[v], grads = capture_step(cap)
                    cap.detach()
                    row_hooks[v] = dict(timers.total)
                    if v == "capture" and reference_grads is None:
                        reference_grads = grads
        i += 1
        # another process was busy during this iteration: drop it (only judged on iterations of >= 50 ms: the
        # kernel counts CPU time in 10 ms ticks, so a shorter window cannot tell)
        if quiet > 0 and c.foreign >= quiet and sum(row.values()) >= 0.05:
            dropped += 1
            continue
        clean += 1
        if clean > 2:  # the first two clean iterations warm up
            for v, dt in row.items():
                times[v].append(dt)
            for v, hooks_of_v in row_hooks.items():
                for key, val in hooks_of_v.items():
                    variant_hooks[v][key] += val
    hook_totals = variant_hooks["capture"]
    timers.restore()
    # equality of the experiments' gradients: one more step from identical weights
    checks = {}
    if experiments:
        state = {k: v.clone() for k, v in net.state_dict().items()}
        outs = {}
        for v in variants[1:]:
            net.load_state_dict(state)
            tracked, cap = caps[v]
            cap.attach()
            with patched(v if v != "capture" else "none"):
                opt.zero_grad()
                cap.begin()
                loss_fn(net(batch["x"]), batch["y"]).backward()
                outs[v] = cap.finish(weights)
            cap.detach()
        net.load_state_dict(state)
        for v in variants[2:]:
            checks[v] = max(float(((outs[v][n] - outs["capture"][n]).abs().max() / outs["capture"][n].abs().max()))
                            for n in outs["capture"])
    tracked, cap = caps["capture"]
    dims = {n: t.projection.dim for n, t in tracked.items()}
    med = {v: statistics.median(ts) for v, ts in times.items()}
    base = med["plain"]
    n_iter = len(times["capture"])
    hooks = {k: v / n_iter for k, v in hook_totals.items()}
    residual = med["capture"] - base - sum(hooks.values())

    # per-step bookkeeping and recursion on records of the same shapes
    tmp = Path(tempfile.mkdtemp(prefix="dve_bd_"))
    storage = C.default_storage_dtype(exact=dim is None)
    store = TrajectoryStore.create(tmp / "s", C.synthetic_manifest(dims, storage), overwrite=True)
    from lightning_dve.updates import StepTerms

    assembler = sync.StepAssembler(distributed.SingleProcess(), dims, list(dims), torch.float32, False)
    grads = {n: g.to(torch.float32) for n, g in reference_grads.items()}
    book, check = [], []
    recursion = BackwardRecursion(list(dims), AccumulatorLayout.PER_LAYER)
    lrs = torch.full((len(dims),), 0.01, dtype=torch.float64)
    for step in range(min(iters, 60) + 2):
        ids = torch.arange(b) + step * b
        t0 = time.perf_counter()
        batches.check_finite(grads, ids, step)
        t1 = time.perf_counter()
        assembler.add(sync.MicroBatch(ids, weights, grads))
        sync.agree_on_errors(distributed.SingleProcess(), None)
        record = assembler.close(step, StepTerms(lrs, {}, {}), 0, False)
        store.append(record)  # synchronous here; the callback's StepWriter does this in a background thread
        t2 = time.perf_counter()
        if step >= 2:
            check.append(t1 - t0)
            book.append(t2 - t1)
    records = list(store.iter_backward(2))
    blocks = list(recursion_ranks._blocks(iter(records), recursion_ranks.BLOCK_ROWS, 0))  # streamed, as a long run
    t2 = time.perf_counter()
    embedded = [e for block in blocks for e in recursion.block(block)]  # every block folded into M: long run
    t3 = time.perf_counter()
    first = embedded[0]
    store.begin_embeddings({name: e.shape[1] for name, e in first.items()}, next(iter(first.values())).dtype)
    for record, emb in zip(records, embedded):
        store.write_embeddings(record.step, emb, record.sample_ids)
    t4 = time.perf_counter()
    for step in (0, 1):  # the two warm-up steps (b rows each), untimed: the store needs every step's rows
        store.write_embeddings(step, {n: torch.zeros_like(e) for n, e in first.items()}, torch.arange(b))
    t5 = time.perf_counter()
    store.finish_embeddings()
    t4 += time.perf_counter() - t5
    rec_t, write_t = [(t3 - t2) / len(records)], [(t4 - t3) / len(records)]
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    # Lightning evaluates ``callback.state_key`` for every hook call (its profiler label): ~6 per step
    dve = C.dve_callback(projection_dim=dim, exclude=exclude)
    t0 = time.perf_counter()
    for _ in range(600):
        dve.state_key  # noqa: B018
    state_key_s = (time.perf_counter() - t0) / 100
    ms = lambda s: round(1000 * s, 3)  # noqa: E731
    per_step = {
        "capture_total": ms(med["capture"] - base),
        "forward_hooks": ms(hooks.get("forward_hooks", 0.0)),
        "output_grad_hooks": ms(hooks.get("output_grad_hooks", 0.0)),
        "finish": ms(hooks.get("finish", 0.0)),
        "residual_autograd_dispatch": ms(residual),
        "check_finite": ms(statistics.median(check)),
        "assemble_and_store_append": ms(statistics.median(book)),
        "recursion_block_per_step": ms(statistics.median(rec_t)),
        "recursion_block_rows": recursion_ranks.BLOCK_ROWS,
        "write_embeddings": ms(statistics.median(write_t)),
        "lightning_state_key_6_calls": ms(state_key_s),
    }
    overhead = (med["capture"] - base + statistics.median(check) + statistics.median(book) + state_key_s
                + statistics.median(rec_t) + statistics.median(write_t))
    rec: dict[str, Any] = {
        "benchmark": "step_breakdown", "model": kind, "projection_dim": dim, "batch": b,
        "tracked_layers": len(dims), "sum_k": sum(dims.values()), "iterations": n_iter,
        "threads": torch.get_num_threads(), "plain_step_ms": ms(base),
        "capture_step_ms": ms(med["capture"]), "per_step_ms": per_step,
        "estimated_long_run_fit_ratio": round(1 + overhead / base, 4),
        "estimated_train_loop_ratio": round(1 + (overhead - statistics.median(rec_t) - statistics.median(write_t)) / base, 4),
        "plain_step_ms_spread": [ms(min(times["plain"])), ms(max(times["plain"]))],
        "iterations_dropped_busy_machine": dropped,
    }
    if experiments:
        rec["experiments_capture_ms"] = {v: ms(med[v] - base) for v in variants[1:]}
        rec["experiments_hook_ms"] = {v: {k: ms(t / n_iter) for k, t in variant_hooks[v].items()}
                                      for v in variants[1:]}
        rec["experiments_max_rel_diff_vs_unpatched"] = checks
    C.emit(rec)


def lightning_breakdown(kind: str, dim: int | None, repeats: int, quick: bool, quiet: float, max_wait_s: float) -> None:
    """Time the callback's own hooks inside real ``Trainer.fit`` runs (``capture_overhead.py``'s setup)."""
    import capture_overhead as co

    from lightning_dve import batches, callback, callback_step, capture, guards, recursion_ranks, sync
    from lightning_dve.store import TrajectoryStore

    cfg = co.model_configs("quick" if quick else "default")[kind]
    ds = co.dataset(kind, cfg)
    timers = HookTimers()
    for name in ("on_fit_start", "on_train_batch_start", "on_after_backward", "on_before_optimizer_step",
                 "on_train_batch_end", "on_train_end"):
        timers.wrap(callback.DataValueEmbedding, name, f"callback.{name}")
    for owner, name, label in ((capture.GradientCapture, "_on_forward", "capture.forward_hooks"),
                               (capture.GradientCapture, "_on_output_grad", "capture.output_grad_hooks"),
                               (capture.GradientCapture, "finish", "capture.finish"),
                               (callback_step, "check_all_reached", "model_checks.check_all_reached"),
                               (capture.GradientCapture, "check_blocks_sum_to_grad", "capture.check_blocks_sum_to_grad"),
                               (callback_step, "check_no_batchnorm_training", "model_checks.check_no_batchnorm_training"),
                               (guards.StepGuard, "check_applied", "guards.check_applied"),
                               (guards.StepGuard, "check_trainable", "guards.check_trainable"),
                               (batches, "check_finite", "batches.check_finite"),
                               (sync, "agree_on_errors", "sync.agree_on_errors"),
                               (sync.StepAssembler, "close", "sync.StepAssembler.close"),
                               (TrajectoryStore, "append", "store.append"),
                               (recursion_ranks, "embed_trajectory", "recursion_ranks.embed_trajectory")):
        if hasattr(owner, name):
            timers.wrap(owner, name, label)
    co.one_fit(kind, cfg, ds, "off")
    co.one_fit(kind, cfg, ds, dim)
    off, on, totals = [], [], defaultdict(float)
    for _ in range(repeats):
        off.append(C.measured(lambda: co.one_fit(kind, cfg, ds, "off"), quiet, 2, max_wait_s))
        timers.reset()
        on.append(C.measured(lambda: co.one_fit(kind, cfg, ds, dim), quiet, 2, max_wait_s))
        for k, v in timers.total.items():
            totals[k] += v
    timers.restore()
    steps = on[0]["steps"]
    per_step = {k: round(1000 * v / repeats / steps, 3) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}
    loop_delta = statistics.median(x["train_loop_s"] for x in on) - statistics.median(x["train_loop_s"] for x in off)
    C.emit({"benchmark": "step_breakdown_in_fit", "model": kind, "projection_dim": dim, "steps": steps,
            "repeats": repeats, "threads": torch.get_num_threads(),
            "train_step_ms_without_callback": round(1000 * statistics.median(x["train_loop_s"] for x in off) / steps, 3),
            "train_loop_extra_ms_per_step": round(1000 * loop_delta / steps, 3),
            "hook_ms_per_step": per_step,
            "note": "inclusive wall time per optimizer step (all fits' totals / steps); nested entries are inside "
                    "their callers (capture.* run inside Lightning's forward/backward; check_finite, close and "
                    "append inside on_train_batch_end; embed_trajectory inside on_train_end, amortised per step)",
            "foreign_load": [x["foreign_load"] for x in off + on]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--no-experiments", dest="experiments", action="store_false")
    parser.add_argument("--cases", default=None, help="e.g. lm:1024,lm:64,mlp:1024,cnn:1024")
    parser.add_argument("--fit-cases", default=None, help="cases also timed inside Trainer.fit (default lm:1024)")
    C.add_contention_args(parser)
    args = parser.parse_args()
    if args.quick and "--quiet" not in " ".join(__import__("sys").argv):
        args.quiet = 0.0
    C.setup(args.threads)
    C.emit({"benchmark": "step_breakdown", "kind": "machine", **C.machine(), "loadavg_start": C.loadavg()})
    cases = args.cases or ("lm:64,mlp:64" if args.quick else "lm:1024,lm:64,mlp:1024,cnn:1024")
    iters = args.iters or (3 if args.quick else 15)
    for case in cases.split(","):
        kind, dim = case.split(":")
        with C.Contention() as c:
            breakdown(kind, None if dim == "exact" else int(dim), iters, args.quick, args.experiments,
                      args.quiet, args.max_wait)
        C.emit({"benchmark": "step_breakdown", "kind": "contention", "case": case, "foreign_load": round(c.foreign, 3)})
    fit_cases = args.fit_cases or ("lm:64" if args.quick else "lm:1024,mlp:1024")
    for case in fit_cases.split(","):
        kind, dim = case.split(":")
        lightning_breakdown(kind, None if dim == "exact" else int(dim), 1 if args.quick else 3, args.quick,
                            args.quiet, args.max_wait)
    C.emit({"benchmark": "step_breakdown", "kind": "done", "loadavg_end": C.loadavg()})


if __name__ == "__main__":
    main()
