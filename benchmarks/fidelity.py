"""Fidelity of lightning_dve against exact trajectory-specific leave-one-out (TSLOO), as JSON lines.

Setting (the core issue's oracle, ``tests/test_fidelity.py``): a tanh MLP (64-32-10) on 384 sklearn digits,
plain SGD lr 0.1, batch 32, 3 epochs (36 steps) in float64 through the real Trainer. Ground truth replays
the same trajectory in float64 with one occurrence removed, for 40 occurrences spread over the run, and 16
held-out test points. Each line is the mean over test points of the Spearman correlation between an
estimator's scores and the true TSLOO.

    python benchmarks/fidelity.py            # one seed, about 1 minute on 2 cores
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_dve import DataValueEmbedding  # noqa: E402
from tests import oracles  # noqa: E402
from tests.helpers import DigitsMLP, make_trainer  # noqa: E402
from tests.test_fidelity import EPOCHS, HIDDEN, LR, MODEL_SEED, build_problem, columns_of  # noqa: E402

VARIANTS = {
    "exact per_layer": dict(projection_dim=None),
    "exact full": dict(projection_dim=None, layout="full"),
    "projected 64": dict(projection_dim=64),
    "projected 256": dict(projection_dim=256),
    "projected 1024 (default, float16 storage)": dict(),
    "projected 1024, float32 storage": dict(storage_dtype="float32"),
    "projected 1024, bfloat16 storage": dict(storage_dtype="bfloat16"),
    "projected 4096": dict(projection_dim=4096),
}


def main() -> None:
    torch.set_num_threads(2)
    start = time.perf_counter()
    problem = build_problem()
    truth = oracles.exact_tsloo(problem.net, problem.trajectory, problem.batches, problem.lrs, problem.occurrences,
                                problem.test["x"], problem.test["y"])
    columns = columns_of(problem, problem.occurrences)
    exact_scores, all_scores = None, {}
    for name, kwargs in VARIANTS.items():
        with tempfile.TemporaryDirectory() as tmp:
            module = DigitsMLP(hidden=HIDDEN, lr=LR, seed=MODEL_SEED)
            dve = DataValueEmbedding(save_dir=tmp, report=None, **kwargs)
            make_trainer(EPOCHS, callbacks=[dve]).fit(module, problem.loader())
            scores = dve.embeddings.influence(module, problem.test, per_step=True).scores.double()
        exact_scores = scores if exact_scores is None else exact_scores
        all_scores[name] = scores
        vs_exact = oracles.mean_spearman(scores, exact_scores)[0]
        emit(name, oracles.mean_spearman(scores[:, columns], truth)[0], vs_exact, dve.embeddings.store.manifest)
    reference = all_scores["projected 1024, float32 storage"]
    for name in ("projected 1024 (default, float16 storage)", "projected 1024, bfloat16 storage"):
        print(json.dumps({"benchmark": "storage_dtype", "estimator": name, "spearman_vs_float32_storage":
                          round(oracles.mean_spearman(all_scores[name], reference)[0], 5),
                          "max_relative_score_error": float((all_scores[name] - reference).abs().max()
                                                            / reference.abs().max())}))
    baseline = oracles.no_curvature_scores(problem.net, problem.trajectory, problem.batches, problem.lrs,
                                           problem.occurrences, problem.test["x"], problem.test["y"])
    emit("no-curvature baseline (lr w <g_test, g>)", oracles.mean_spearman(baseline, truth)[0], None, None)
    print(json.dumps({"benchmark": "fidelity", "seconds": round(time.perf_counter() - start, 1)}))


def emit(name: str, spearman: float, vs_exact: float | None, manifest: dict | None) -> None:
    line = {"benchmark": "fidelity", "estimator": name, "spearman_vs_tsloo": round(spearman, 3)}
    if vs_exact is not None:
        line["spearman_vs_exact_mode_all_occurrences"] = round(vs_exact, 3)
    if manifest is not None:
        line["bytes_per_step"] = manifest["bytes_per_step"]
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
