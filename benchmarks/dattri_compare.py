"""lightning_dve against dattri 0.3.0's ``DVEmbAttributor``: end-to-end time and fidelity to exact TSLOO.

dattri is a benchmark-only dependency (not a runtime one). Install it into the project venv with exactly::

    .venv/bin/pip install dattri==0.3.0

(it pulls numpy, scipy, pyyaml, tqdm and pretty_midi). API used (read from ``dattri/algorithm/dvemb.py`` of
0.3.0): ``DVEmbAttributor(AttributionTask(loss, model, checkpoints), proj_dim, factorization_type=...)``,
``cache_gradients(epoch, (x, y), indices, lr)`` once per optimizer step *before* the step (it runs its own
extra forward/backward, or a ``vmap(grad)`` pass for ``"none"``), ``cache()`` (the recursion, one dense ``M``
over all layers, per-epoch per-sample embeddings in RAM), ``attribute(test_loader, epoch=None)``.

Both run inside the same Lightning ``Trainer`` on the same model, data, batch order (a seeded permutation per
epoch) and learning rate: lightning_dve as the ``DataValueEmbedding`` callback (``report=None``), dattri from a
small callback that calls ``cache_gradients`` in ``on_train_batch_start`` with the optimizer's current lr.
End-to-end time = ``fit`` (training + capture; for lightning_dve also the train-end recursion and embedding
writes) + the recursion (dattri ``cache()``) + scoring the test set (lightning_dve
``embeddings.influence(module, test_batch)``; dattri ``attribute(test_loader)``). Plain ``fit`` time without
either is reported for context.

Fidelity: exact trajectory-specific leave-one-out (TSLOO) from ``tests/oracles.py`` (float64 replay of the
same batches and learning rates with one occurrence removed), for 40 occurrences spread over the steps and 16
held-out test points; each method's per-occurrence scores (dattri: its per-epoch embedding of the sample, each
sample occurs once per epoch) are compared by the mean over test points of the Spearman correlation.

Settings:

- ``small`` (float64): 384 digits, ``64-32-10`` tanh MLP, SGD lr 0.1, batch 32, 3 epochs (36 steps); the
  ``tests/test_fidelity.py`` case. Methods: exact (lightning_dve ``projection_dim=None`` with per-layer and full
  ``M``, and full ``M`` with ``storage_dtype="float32"``: the float64 model's rows stored, and the recursion run,
  in float32; dattri ``factorization_type="none"``, dense ``M`` over all 2410 parameters), and projected
  (lightning_dve default 1024 per layer, per-layer and full ``M``; dattri ``"kronecker"`` with ``proj_dim=2048``,
  i.e. 32 x 32 per layer).
- ``large`` (float32): 1437 train / 360 test digits, ``64-256-256-10`` tanh MLP, SGD lr 0.1, batch 32, 3 epochs
  (135 steps). Methods: lightning_dve default projection (1024 per layer) against dattri ``"kronecker"`` with
  ``proj_dim=3072`` (32 x 32 per layer, same total), with lightning_dve's default per-layer ``M`` and with
  ``layout="full"`` (one ``M`` over all layers, as dattri). TSLOO by float64 replay from the same initial
  weights. Projected lightning_dve runs store gradients in its default storage dtype.
- ``cnn`` (float32): 1437 train / 360 test digits as ``[1, 8, 8]`` images, ``_common.cnn_net`` (conv 1->16,
  conv 16->32, 2x2 max-pool, linear 512->64, linear 64->10, ReLU; 38,282 parameters), SGD lr 0.05, batch 32,
  3 epochs (135 steps). dattri's ``"kronecker"`` only handles ``nn.Linear``, so a conv net must use
  ``factorization_type="none"``: ``vmap(grad)`` per-sample gradients over all parameters, then dattri's CPU
  ``BasicProjector`` (dense Gaussian, generated in blocks of 100 columns and regenerated on every call), then one
  dense ``M``. Methods: lightning_dve default projection (conv layers projected in the capture hooks: 16 x 10,
  32 x 32, 32 x 32 and 10 x 65 per layer, 2858 dims in all), per-layer ``M`` and ``layout="full"``, against
  dattri ``"none"`` with ``proj_dim`` = that same total (read from our manifest); also lightning_dve at 4096
  per layer with ``layout="full"`` (9002 dims: 16 x 10, 32 x 128, 64 x 64, 10 x 65), because a Kronecker
  projection keeps less of the gradient than dattri's dense Gaussian at equal size. dattri ``"none"`` without
  projection is not run: its ``M`` over 38,282 parameters would be 5.9 GB in float32 and every step would cost
  ~2 x 32 x 38282^2 = 9e10 flops twice over; lightning_dve exact (``projection_dim=None``) is not run either
  (a 32,832^2 per-layer ``M`` for the 512->64 layer).

**Issue #5 target: lightning_dve <= 0.2x dattri's end-to-end time at equal or better Spearman.**

    .venv/bin/python benchmarks/dattri_compare.py                   # small and large, ~2 min on 2 cores
    .venv/bin/python benchmarks/dattri_compare.py --settings cnn    # the CNN setting only
    .venv/bin/python benchmarks/dattri_compare.py --quick           # CI smoke (small setting, 1 epoch, no repeats)
    .venv/bin/python benchmarks/dattri_compare.py --full            # 5 repeats
    .venv/bin/python benchmarks/dattri_compare.py --pareto --settings large   # dimension sweep of both

``--pareto`` runs both methods at 64, 256 and 1024 projected dimensions per layer (full ``M``; dattri Kronecker
at the same total) and pairs each dattri point with lightning_dve's fastest point of equal or better Spearman:
the target read as "the time to reach dattri's fidelity", whatever dimension either needs.

``--quick`` runs the ``small`` setting unless ``--settings`` is given (``--quick --settings cnn``: the CNN
setting for one epoch, one repeat).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import _common as C
import numpy as np

import torch
import torch.nn.functional as F
from torch import nn


class EpochPermutation(torch.utils.data.Sampler[int]):
    """A reproducible permutation per epoch: ``randperm(n, seed + epoch)`` (Lightning calls ``set_epoch``)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist())

    def __len__(self) -> int:
        return self.n


SETTINGS = {
    "small": dict(model="mlp", n_train=384, n_test=16, hidden=32, depth=1, lr=0.1, batch=32, epochs=3,
                  dtype=torch.float64, n_tsloo_test=16, occurrences=40),
    "large": dict(model="mlp", n_train=1437, n_test=360, hidden=256, depth=2, lr=0.1, batch=32, epochs=3,
                  dtype=torch.float32, n_tsloo_test=16, occurrences=40),
    "cnn": dict(model="cnn", n_train=1437, n_test=360, lr=0.05, batch=32, epochs=3, dtype=torch.float32,
                n_tsloo_test=16, occurrences=40),
}


#: Per-layer projected dimensions of the ``--pareto`` sweep (layer sides split as each method does).
PARETO_DIMS = (64, 256, 1024)


class Problem:
    """Data, loaders and the shared initial weights of one setting."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        x, y = C.digits_arrays(cfg["dtype"])
        x = x.unsqueeze(1) if cfg["model"] == "cnn" else x.reshape(len(x), 64)  # as C.digits_dataset
        perm = np.random.default_rng(0).permutation(len(x))
        train = torch.as_tensor(perm[: cfg["n_train"]])
        test = torch.as_tensor(perm[cfg["n_train"]: cfg["n_train"] + cfg["n_test"]])
        self.train = C.DictDataset(x[train], y[train], train)
        self.test = {"x": x[test], "y": y[test], "index": test}
        self.precision = "64-true" if cfg["dtype"] == torch.float64 else "32-true"

    def loader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(self.train, batch_size=self.cfg["batch"],
                                           sampler=EpochPermutation(len(self.train), seed=1), num_workers=0)

    def batches(self) -> list[dict[str, torch.Tensor]]:
        """The batches of every optimizer step in training order (what the Trainer sees)."""
        loader, out = self.loader(), []
        for epoch in range(self.cfg["epochs"]):
            loader.sampler.set_epoch(epoch)
            out.extend(loader)
        return out

    def module(self):
        if self.cfg["model"] == "cnn":
            return C.make_module("cnn", seed=0, dtype=self.cfg["dtype"])
        return C.make_module("mlp", seed=0, dtype=self.cfg["dtype"], hidden=self.cfg["hidden"], depth=self.cfg["depth"])

    def lr_module(self):
        m = self.module()
        m.configure_optimizers = lambda: torch.optim.SGD(m.parameters(), lr=self.cfg["lr"])  # type: ignore
        return m


class Recorder:
    """Records the sample ids of every step a Trainer runs (to prove every method saw the same order)."""

    def __init__(self) -> None:
        import lightning as L

        outer = self
        self.ids: list[list[int]] = []

        class Cb(L.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                outer.ids.append(batch["index"].tolist())

        self.callback = Cb()


def fit(p: Problem, callbacks: list) -> tuple[Any, float, list[list[int]]]:
    module = p.lr_module()
    rec = Recorder()
    trainer = C.make_trainer([rec.callback, *callbacks], max_epochs=p.cfg["epochs"], precision=p.precision)
    with C.Stopwatch() as sw:
        trainer.fit(module, p.loader())
    return module, sw.seconds, rec.ids


# ---------------------------------------------------------------------------------------------------------
# the two methods, end to end


def run_ours(p: Problem, **dve_kwargs: Any) -> dict[str, Any]:
    save = Path(tempfile.mkdtemp(prefix="dve_cmp_"))
    dve = C.dve_callback(save_dir=save / "dve", sample_ids="index", loss_reduction="mean", **dve_kwargs)
    module, fit_s, ids = fit(p, [dve])
    with C.Stopwatch() as sw:
        result = dve.embeddings.influence(module, p.test, per_step=True)
    dim = projected_total(save / "dve" / "manifest.json")
    shutil.rmtree(save, ignore_errors=True)
    lookup = {(int(s), int(i)): j for j, (s, i) in enumerate(zip(result.steps, result.sample_ids))}
    return {"fit_s": fit_s, "embed_s": 0.0, "score_s": sw.seconds, "total_s": fit_s + sw.seconds, "ids": ids,
            "scores": result.scores, "column": lambda step, sid, epoch: lookup[(step, sid)], "module": module,
            "embedding_dim": dim}


def projected_total(manifest: Path) -> int | None:
    """Total embedding dimension of a lightning_dve run: sum over layers of ``out x in`` projected dims."""
    import json

    try:
        layers = json.loads(manifest.read_text())["layers"]
        return sum(int(layer["projection"]["out"]["projected_dim"]) * int(layer["projection"]["in"]["projected_dim"])
                   for layer in layers)
    except (OSError, KeyError, TypeError, ValueError):
        return None


def run_dattri(p: Problem, factorization: str, proj_dim: int | None) -> dict[str, Any]:
    import lightning as L
    from dattri.algorithm.dvemb import DVEmbAttributor
    from dattri.task import AttributionTask

    module = p.lr_module()
    net = module.net

    def loss_none(params, data):
        x, y = data
        return F.cross_entropy(torch.func.functional_call(net, params, (x.unsqueeze(0),)), y.unsqueeze(0))

    def loss_factored(model, data, device):
        x, y = data
        return F.cross_entropy(model(x.to(device)), y.to(device))

    loss = loss_none if factorization == "none" else loss_factored
    attributor = DVEmbAttributor(AttributionTask(loss_func=loss, model=net, checkpoints=net.state_dict()),
                                 proj_dim=proj_dim, factorization_type=factorization)

    class DattriCapture(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            lr = trainer.optimizers[0].param_groups[0]["lr"]
            attributor.cache_gradients(trainer.current_epoch, (batch["x"], batch["y"]), batch["index"], lr)

    rec = Recorder()
    trainer = C.make_trainer([rec.callback, DattriCapture()], max_epochs=p.cfg["epochs"], precision=p.precision)
    test_loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(p.test["x"], p.test["y"]),
                                              batch_size=len(p.test["y"]))
    quiet = contextlib.redirect_stderr(io.StringIO())  # tqdm bars
    with quiet, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with C.Stopwatch() as sw_fit:
            trainer.fit(module, p.loader())
        with C.Stopwatch() as sw_embed:
            attributor.cache(memory_saving=True)
        with C.Stopwatch() as sw_score:
            total = attributor.attribute(test_loader)  # [n_train_ids, n_test], summed over epochs
        per_epoch = {e: attributor.attribute(test_loader, epoch=e).T for e in attributor.embeddings}  # untimed
    dim = next(iter(attributor.embeddings.values())).shape[1]
    del total
    return {"fit_s": sw_fit.seconds, "embed_s": sw_embed.seconds, "score_s": sw_score.seconds,
            "total_s": sw_fit.seconds + sw_embed.seconds + sw_score.seconds, "ids": rec.ids,
            "per_epoch": per_epoch, "column": None, "module": module, "embedding_dim": dim}


def occurrence_scores(run: dict[str, Any], p: Problem, batches, occurrences, steps_per_epoch: int) -> torch.Tensor:
    """``[n_test, m]`` scores of the chosen occurrences from either method."""
    cols = []
    for step, pos in occurrences:
        sid = int(batches[step]["index"][pos])
        epoch = step // steps_per_epoch
        if "per_epoch" in run:
            cols.append(run["per_epoch"][epoch][:, sid].to(torch.float64))
        else:
            cols.append(run["scores"][:, run["column"](step, sid, epoch)].to(torch.float64))
    return torch.stack(cols, dim=1)


def tsloo(p: Problem, batches, occurrences, init_net: nn.Module) -> tuple[torch.Tensor, dict[str, Any]]:
    """Exact TSLOO in float64 by replay (``tests/oracles.py``), for the first ``n_tsloo_test`` test points."""
    from tests import oracles

    net64 = init_net.to(torch.float64)
    params = oracles.params_of(net64)
    b64 = [{"x": b["x"].to(torch.float64), "y": b["y"], "index": b["index"]} for b in batches]
    lrs = [p.cfg["lr"]] * len(b64)
    with C.Stopwatch() as sw:
        trajectory = oracles.replay(net64, params, b64, lrs, return_trajectory=True)
        n = p.cfg["n_tsloo_test"]
        truth = oracles.exact_tsloo(net64, trajectory, b64, lrs, occurrences, p.test["x"][:n].to(torch.float64),
                                    p.test["y"][:n])
    return truth, {"trajectory_final": trajectory[-1], "oracle_s": round(sw.seconds, 2)}


def compare(name: str, args: argparse.Namespace, repeats: int, epochs: int | None = None) -> None:
    from tests import oracles

    cfg = dict(SETTINGS[name])
    if epochs:
        cfg["epochs"] = epochs
    p = Problem(cfg)
    batches = p.batches()
    steps_per_epoch = len(batches) // cfg["epochs"]
    occurrences = oracles.spread_occurrences([len(b["y"]) for b in batches], cfg["occurrences"], seed=0)
    truth, info = tsloo(p, batches, occurrences, p.lr_module().net)

    pareto = getattr(args, "pareto", False) and name in ("small", "large")
    if pareto:  # a dimension sweep of both methods, paired afterwards by Spearman
        n_layers = cfg["depth"] + 1
        methods = {f"lightning_dve projected {k}/layer full": (lambda k=k: run_ours(p, projection_dim=k, layout="full"))
                   for k in PARETO_DIMS}
        methods.update({f"dattri kronecker {k * n_layers}": (lambda d=k * n_layers: run_dattri(p, "kronecker", d))
                        for k in PARETO_DIMS})
        pairs = []
    elif name == "small":
        methods = {
            "lightning_dve exact per_layer": lambda: run_ours(p, projection_dim=None, layout="per_layer"),
            "lightning_dve exact full": lambda: run_ours(p, projection_dim=None, layout="full"),
            "lightning_dve exact full float32": lambda: run_ours(p, projection_dim=None, layout="full",
                                                                  storage_dtype="float32"),
            "dattri exact (none)": lambda: run_dattri(p, "none", None),
            "lightning_dve projected 1024/layer": lambda: run_ours(p, layout="per_layer"),
            "lightning_dve projected 1024/layer full": lambda: run_ours(p, layout="full"),
            "dattri kronecker 2048": lambda: run_dattri(p, "kronecker", 2048),
        }
        pairs = [("lightning_dve exact per_layer", "dattri exact (none)"),
                 ("lightning_dve exact full", "dattri exact (none)"),
                 ("lightning_dve exact full float32", "dattri exact (none)"),
                 ("lightning_dve projected 1024/layer", "dattri kronecker 2048"),
                 ("lightning_dve projected 1024/layer full", "dattri kronecker 2048")]
    elif name == "large":
        methods = {
            "lightning_dve projected 1024/layer": lambda: run_ours(p, layout="per_layer"),
            "lightning_dve projected 1024/layer full": lambda: run_ours(p, layout="full"),
            "dattri kronecker 3072": lambda: run_dattri(p, "kronecker", 3072),
        }
        pairs = [("lightning_dve projected 1024/layer", "dattri kronecker 3072"),
                 ("lightning_dve projected 1024/layer full", "dattri kronecker 3072")]
    else:  # cnn: dattri's "kronecker" has no conv layers; "none" + its projector at our total dimension
        dim = run_ours(p, layout="per_layer")["embedding_dim"]  # also the warm-up of our code path
        theirs = f"dattri none proj {dim}"
        methods = {
            "lightning_dve projected 1024/layer": lambda: run_ours(p, layout="per_layer"),
            "lightning_dve projected 1024/layer full": lambda: run_ours(p, layout="full"),
            "lightning_dve projected 4096/layer full": lambda: run_ours(p, projection_dim=4096, layout="full"),
            theirs: lambda: run_dattri(p, "none", dim),
        }
        pairs = [("lightning_dve projected 1024/layer", theirs), ("lightning_dve projected 1024/layer full", theirs),
                 ("lightning_dve projected 4096/layer full", theirs)]
        n_params = sum(q.numel() for q in p.module().parameters())
        C.emit({"benchmark": "dattri_compare", "setting": name, "kind": "not_run",
                "method": "dattri none (no projection)", "parameters": n_params,
                "why": f"dense M of {n_params}^2 float32 = {n_params ** 2 * 4 / 1e9:.1f} GB and "
                       f"~{4 * cfg['batch'] * n_params ** 2:.1e} flops per step"})

    plain = []
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in methods}
    names = list(methods)
    fit(p, [])  # warm-up
    for r in range(repeats):
        plain.append(C.measured(lambda: {"s": fit(p, [])[1]}, args.quiet, args.retries, args.max_wait)["s"])
        order = names[r % len(names):] + names[: r % len(names)]
        for k in order:
            runs[k].append(C.measured(methods[k], args.quiet, args.retries, args.max_wait))
    expected = [b["index"].tolist() for b in batches]
    for k, rs in runs.items():
        assert all(x["ids"] == expected for x in rs), f"{k}: batch order differs from the oracle's"
    final_diff = max(float((a.detach().to(torch.float64) - info["trajectory_final"][n]).abs().max())
                     for n, a in runs[names[0]][0]["module"].net.named_parameters())
    summary = {}
    for k, rs in runs.items():
        est = occurrence_scores(rs[0], p, batches, occurrences, steps_per_epoch)[: cfg["n_tsloo_test"]]
        rho, per_row = oracles.mean_spearman(est, truth)
        rec = {
            "benchmark": "dattri_compare", "setting": name, "method": k, "repeats": repeats,
            "model": cfg["model"], "embedding_dim": rs[0].get("embedding_dim"),
            "steps": len(batches), "n_train": cfg["n_train"], "n_test_scored": cfg["n_test"],
            "dtype": str(cfg["dtype"]).removeprefix("torch."),
            "total_s": C.stats([x["total_s"] for x in rs]), "fit_s": C.stats([x["fit_s"] for x in rs]),
            "embed_s": C.stats([x["embed_s"] for x in rs]), "score_s": C.stats([x["score_s"] for x in rs]),
            "spearman_vs_tsloo": round(rho, 4), "spearman_min_row": round(min(per_row), 4),
            "occurrences": len(occurrences), "tsloo_test_points": cfg["n_tsloo_test"],
            "foreign_load": [x["foreign_load"] for x in rs],
        }
        summary[k] = rec
        C.emit(rec)
    if pareto:
        pairs = pareto_pairs(summary)
    for ours, theirs in pairs:
        a, b = runs[ours], runs[theirs]
        ratio = C.ratio_stats([x["total_s"] for x in a], [x["total_s"] for x in b])
        C.emit({"benchmark": "dattri_compare", "setting": name, "kind": "ratio", "pareto": pareto, "ours": ours,
                "dattri": theirs,
                "time_ratio_ours_over_dattri": ratio,
                "spearman": {"ours": summary[ours]["spearman_vs_tsloo"], "dattri": summary[theirs]["spearman_vs_tsloo"]},
                "plain_fit_s": C.stats(plain),
                "target": "time ratio <= 0.2 at equal or better Spearman",
                "meets_target": ratio["median_of_paired"] <= 0.2
                and summary[ours]["spearman_vs_tsloo"] >= summary[theirs]["spearman_vs_tsloo"] - 1e-3,
                "oracle_s": info["oracle_s"], "replay_vs_trained_max_param_diff": final_diff})


def pareto_pairs(summary: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
    """Each dattri point with lightning_dve's fastest point (median time) of equal or better Spearman, if any."""
    ours = sorted((k for k in summary if k.startswith("lightning_dve")), key=lambda k: summary[k]["total_s"]["median"])
    pairs = []
    for theirs in (k for k in summary if k.startswith("dattri")):
        rho = summary[theirs]["spearman_vs_tsloo"]
        match = next((k for k in ours if summary[k]["spearman_vs_tsloo"] >= rho - 1e-3), None)
        if match is not None:
            pairs.append((match, theirs))
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true")
    mode.add_argument("--full", action="store_true")
    parser.add_argument("--settings", default=None, help=f"comma-separated, of {','.join(SETTINGS)} "
                        "(default small,large; --quick: small)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--pareto", action="store_true",
                        help=f"small/large: both methods at {PARETO_DIMS} per layer (dattri: Kronecker, the same "
                        "total), each dattri point paired with our fastest of equal or better Spearman")
    parser.add_argument("--threads", type=int, default=2)
    C.add_contention_args(parser)
    args = parser.parse_args()
    if args.quick and "--quiet" not in " ".join(__import__("sys").argv):
        args.quiet = 0.0
    C.setup(args.threads)
    warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")
    try:
        import dattri
    except ImportError:
        C.emit({"benchmark": "dattri_compare", "skipped": "dattri is not installed: .venv/bin/pip install dattri==0.3.0"})
        return
    mode_name = "quick" if args.quick else "full" if args.full else "default"
    repeats = args.repeats or {"quick": 1, "default": 3, "full": 5}[mode_name]
    C.emit({"benchmark": "dattri_compare", "kind": "machine", "mode": mode_name, "pareto": args.pareto, **C.machine(),
            "dattri": getattr(dattri, "__version__", "0.3.0"), "quiet_threshold": args.quiet,
            "loadavg_start": C.loadavg()})
    started = time.perf_counter()
    settings = (args.settings or ("small" if args.quick else "small,large")).split(",")
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        parser.error(f"unknown setting(s) {unknown}; choose from {list(SETTINGS)}")
    for name in settings:
        compare(name, args, repeats, epochs=1 if args.quick else None)
    C.emit({"benchmark": "dattri_compare", "kind": "done", "wall_s": round(time.perf_counter() - started, 1),
            "loadavg_end": C.loadavg()})


if __name__ == "__main__":
    main()
