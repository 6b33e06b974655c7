"""Exact replay mode (``DataValueEmbeddings.exact_influence``): Spearman against exact TSLOO and cost, as JSON lines.

Problem (the core fidelity problem of ``tests/test_fidelity.py``): 384 sklearn digits, batch 32, 3 epochs (36
steps), loader seed 1, 16 held-out test points, float64 through the real Trainer; 40 occurrences spread over the
run. Nets: the tanh MLP 64-32-10 (same initial weights as the fidelity benchmark's) and a small CNN (conv 1->8,
tanh, 2x2 max-pool, linear 128->10). Ground truth retrains with torch.optim, its scheduler and clipping, with one
occurrence dropped (``tests/test_replay.py::tsloo_by_training``). Each line: mean Spearman over the 16 test points
(each its own target), and the replay's wall time over the fit's (one target = the mean test loss, and 16
targets), with ``training_step`` per sample (default) or a per-sample ``train_loss_fn``; then the replayed
embeddings of the same store (``replay_embeddings``, k = 64 per layer: one vector-Jacobian product per projection
row and step), their cost over the fit's and their Spearman.

    python benchmarks/replay_cost.py            # about 2 minutes on 2 cores
    python benchmarks/replay_cost.py --quick    # CI smoke: the MLP at lr 0.05, 4 occurrences

``replay_scores(setting)`` gives the exact-replay scores ``[16, 1152]`` of every occurrence on this problem, for
``benchmarks/fidelity.py``'s matrix (columns by step then batch position, as ``influence(per_step=True)``).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from _common import emit, machine, setup  # noqa: E402  (puts the repository on sys.path)
from tests import oracles  # noqa: E402
from tests.helpers import DigitsDataset, epoch_batches, make_loader, split_indices  # noqa: E402
from tests.test_replay import fit_setting, tsloo_by_training  # noqa: E402

N_TRAIN, N_TEST, BATCH, EPOCHS, LOADER_SEED, N_OCCURRENCES = 384, 16, 32, 3, 1, 40

SETTINGS: dict[str, dict[str, Any]] = {
    "sgd lr 0.3": {"optimizer": "sgd", "lr": 0.3},
    "sgd lr 0.05": {"optimizer": "sgd", "lr": 0.05},
    "sgd momentum 0.9": {"optimizer": "sgd", "lr": 0.02, "momentum": 0.9},
    "adamw 3e-3 wd 0.01": {"optimizer": "adamw", "lr": 3e-3, "weight_decay": 0.01},
    "sgd cosine warm-up": {"optimizer": "sgd", "lr": 0.3, "schedule": "cosine"},
    "sgd clip norm 0.5": {"optimizer": "sgd", "lr": 0.3, "clip": 0.5},
}


def problem() -> tuple[DigitsDataset, dict[str, torch.Tensor], list]:
    train_ids, test_ids = split_indices(N_TRAIN, N_TEST)
    dataset = DigitsDataset(train_ids)
    return dataset, DigitsDataset(test_ids).batch(), epoch_batches(make_loader(dataset, BATCH, seed=LOADER_SEED), EPOCHS)


def per_sample_loss(module: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(module(batch["x"]), batch["y"], reduction="none")


def replay_scores(setting: dict[str, Any], net: str = "mlp") -> torch.Tensor:
    """Exact-replay scores ``[16, 1152]`` of every occurrence on this problem (all 16 test points)."""
    dataset, test, _ = problem()
    with tempfile.TemporaryDirectory() as tmp:
        module, dve, _ = fit_setting(Path(tmp) / "dve", {**setting, "net": net}, dataset, EPOCHS, BATCH, LOADER_SEED)
        return dve.embeddings.exact_influence(module, test, per_step=True, train_loss_fn=per_sample_loss).scores


def measure(name: str, setting: dict[str, Any], net: str, n_occurrences: int = N_OCCURRENCES) -> dict[str, Any]:
    dataset, test, batches = problem()
    setting = {**setting, "net": net}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        module, dve, initial = fit_setting(Path(tmp) / "dve", setting, dataset, EPOCHS, BATCH, LOADER_SEED)
        fit_s = time.perf_counter() - start
        emb = dve.embeddings
        start = time.perf_counter()
        scores = emb.exact_influence(module, test, per_step=True).scores
        all_targets_s = time.perf_counter() - start
        train_loop_s = emb.replay_cost.training_seconds
        start = time.perf_counter()
        emb.exact_influence(module, test, loss_fn=lambda m, b: per_sample_loss(m, b).mean().reshape(1))
        one_target_s = time.perf_counter() - start
        start = time.perf_counter()
        fast = emb.exact_influence(module, test, per_step=True, train_loss_fn=per_sample_loss).scores
        fast_s = time.perf_counter() - start
        start = time.perf_counter()
        emb.replay_embeddings(module, train_loss_fn=per_sample_loss)  # test-agnostic: then any test point is a dot
        replayed_s = time.perf_counter() - start
        replayed = emb.influence(module, test, per_step=True).scores
        rows = emb.store.projected_dim
        checkpoint_bytes = emb.store.root.joinpath("checkpoints")
        ckpt = sum(p.stat().st_size for p in checkpoint_bytes.glob("state_*.safetensors"))
        steps_bytes = emb.store.manifest["bytes_steps"]
    occurrences = oracles.spread_occurrences([len(b["y"]) for b in batches], n_occurrences, 0)
    offsets = torch.tensor([0] + [len(b["y"]) for b in batches]).cumsum(0)
    columns = [int(offsets[t]) + i for t, i in occurrences]
    truth = tsloo_by_training(initial, batches, setting, occurrences, test)
    rho, per_point = oracles.mean_spearman(scores[:, columns], truth)
    return {"benchmark": "replay", "net": net, "setting": name, "spearman_vs_tsloo": round(rho, 4),
            "spearman_min_test_point": round(min(per_point), 4),
            "max_rel_diff_train_loss_fn": float((fast - scores).abs().max() / scores.abs().max()),
            "fit_s": round(fit_s, 2), "train_loop_s": round(train_loop_s, 2),
            "replay_one_target_s": round(one_target_s, 2), "replay_16_targets_s": round(all_targets_s, 2),
            "replay_16_targets_train_loss_fn_s": round(fast_s, 2),
            "one_target_over_fit": round(one_target_s / fit_s, 2), "16_targets_over_fit": round(all_targets_s / fit_s, 2),
            "16_targets_train_loss_fn_over_fit": round(fast_s / fit_s, 2),
            "replayed_embeddings_rows": rows, "replayed_embeddings_train_loss_fn_s": round(replayed_s, 2),
            "replayed_embeddings_over_fit": round(replayed_s / fit_s, 2),
            "replayed_embeddings_spearman_vs_tsloo": round(oracles.mean_spearman(replayed[:, columns], truth)[0], 4),
            "checkpoint_bytes_over_step_bytes": round(ckpt / steps_bytes, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--nets", nargs="+", default=["mlp", "cnn"])
    parser.add_argument("--quick", action="store_true", help="CI smoke: the MLP at lr 0.05, 4 occurrences")
    args = parser.parse_args()
    setup(args.threads)
    emit({"benchmark": "replay", "machine": machine()})
    start = time.perf_counter()
    nets, settings = (["mlp"], ["sgd lr 0.05"]) if args.quick else (args.nets, list(SETTINGS))
    for net in nets:
        for name in settings:
            emit(measure(name, SETTINGS[name], net, 4 if args.quick else N_OCCURRENCES))
    emit({"benchmark": "replay", "seconds": round(time.perf_counter() - start, 1)})


if __name__ == "__main__":
    main()
