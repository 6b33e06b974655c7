"""What the scores find on a known problem: flipped labels in sklearn's digits, and removals retrained.

The quick-start MLP (``examples/digits.py``: SGD 0.2 with a cosine schedule, batch 32) trains on 1437 digits of
which 10 % carry a flipped label, with three callbacks in one Trainer (the default; ``curvature="ggn"``;
``curvature="none"``, i.e. TracIn's ``lr·<g_test, g>``). A sample's score is its total influence on the mean loss
of the 360 clean validation digits (``res.scores`` summed over them; + = helped).

1. Detection: AUROC and precision at k (k = the number flipped) of "lowest score = flipped", against what needs no
   callback: each sample's training loss and gradient norm at the final model, and a random order.
2. Removal: retrain without the 20 most harmful, the 20 most helpful, the 20 of highest final training loss and
   20 random samples (three draws), from the same initialisation and batch order, and compare the
   validation-loss change with the scores' prediction (the removed scores' sum over the validation set, divided
   by its size). ``mask``: the same batches with the removed samples' loss terms zeroed (the leave-out the method
   defines); ``drop``: left out of the dataset.

    python benchmarks/mislabel.py                 # 5 seeds, 3 epochs (about 1 min on 2 cores)
    python benchmarks/mislabel.py --epochs 15 --seeds 0,1,2    # longer training (about 3 min)
    python benchmarks/mislabel.py --quick         # one seed, one epoch, no removals (seconds)
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import _common as C  # noqa: F401  (puts the repository on sys.path)
import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader

sys.path.insert(0, str(C.REPO / "examples"))
from digits import DigitsMLP  # noqa: E402

from lightning_dve import DataValueEmbedding  # noqa: E402

N_TRAIN, N_VAL, BATCH, FLIP = 1437, 360, 32, 0.10
CALLBACKS = {"default": {}, "ggn": {"curvature": "ggn"}, "none (TracIn)": {"curvature": "none"}}


class NoisyDigits(C.DictDataset):
    """``{"x", "y", "index", "keep"}`` items; ``keep`` 0 zeroes a sample's loss term (the ``mask`` removal)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        super().__init__(x, y)
        self.keep = torch.ones(len(y)) if keep is None else keep

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {**super().__getitem__(i), "keep": self.keep[i]}


class FixedOrder:
    """Batches of seeded per-epoch permutations, the same in every retrain; ``drop`` leaves ids out of them."""

    def __init__(self, seed: int, drop: tuple[int, ...] = ()) -> None:
        self.seed, self.drop, self.epoch = seed, set(drop), 0

    def _batches(self, epoch: int) -> list[list[int]]:
        order = torch.randperm(N_TRAIN, generator=torch.Generator().manual_seed(777 * self.seed + epoch)).tolist()
        order = [i for i in order if i not in self.drop]
        return [order[i:i + BATCH] for i in range(0, len(order), BATCH)]

    def __iter__(self):
        batches, self.epoch = self._batches(self.epoch), self.epoch + 1
        return iter(batches)

    def __len__(self) -> int:
        return len(self._batches(0))


class MaskedMLP(DigitsMLP):
    """The example's MLP whose loss is the batch mean with the ``keep`` weights (the plain mean when all are 1)."""

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        losses = F.cross_entropy(self(batch["x"]), batch["y"], reduction="none")
        keep = batch["keep"]
        return losses.mean() if bool((keep == 1).all()) else (losses * keep).sum() / len(losses)


def noisy_digits(seed: int) -> dict[str, torch.Tensor]:
    """A seeded split with 10 % of the training labels flipped to another class."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = torch.randperm(len(digits.target), generator=torch.Generator().manual_seed(seed))
    x = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.as_tensor(digits.target, dtype=torch.long)
    train, val = order[:N_TRAIN], order[N_TRAIN:N_TRAIN + N_VAL]
    draw = torch.Generator().manual_seed(10_000 + seed)
    flipped = torch.randperm(N_TRAIN, generator=draw)[:round(FLIP * N_TRAIN)]
    noisy = y[train].clone()
    noisy[flipped] = (noisy[flipped] + torch.randint(1, 10, (len(flipped),), generator=draw)) % 10
    is_flipped = torch.zeros(N_TRAIN, dtype=torch.bool)
    is_flipped[flipped] = True
    return {"x": x[train], "y": noisy, "flipped": is_flipped, "val_x": x[val], "val_y": y[val]}


def fit(seed: int, data: dict[str, torch.Tensor], epochs: int, callbacks: list | None = None,
        keep: torch.Tensor | None = None, drop: tuple[int, ...] = ()) -> MaskedMLP:
    """Train from the seed's initialisation on the seed's batch order."""
    L.seed_everything(seed, verbose=False)
    model = MaskedMLP()
    train = DataLoader(NoisyDigits(data["x"], data["y"], keep), batch_sampler=FixedOrder(seed, drop))
    val = DataLoader(NoisyDigits(data["val_x"], data["val_y"]), batch_size=N_VAL)
    C.make_trainer(list(callbacks or []), max_epochs=epochs).fit(model, train, val)
    return model


@torch.no_grad()
def val_loss(model: MaskedMLP, data: dict[str, torch.Tensor]) -> float:
    model.eval()
    return float(F.cross_entropy(model(data["val_x"]), data["val_y"]))


def final_model_baselines(model: MaskedMLP, data: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each training sample's loss and gradient norm at the final model (higher: more likely flipped)."""
    params = {name: p.detach() for name, p in model.net.named_parameters()}

    def loss(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(model.net, p, (x[None],)), y[None])

    with torch.no_grad():
        losses = F.cross_entropy(model(data["x"]), data["y"], reduction="none")
    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, data["x"], data["y"])
    norms = sum((g.reshape(N_TRAIN, -1) ** 2).sum(1) for g in grads.values()).sqrt()
    return {"train loss (final model)": losses, "gradient norm (final model)": norms}


def detection(seed: int, data: dict[str, torch.Tensor], scores: dict[str, torch.Tensor],
              baselines: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """AUROC and precision at k of each ordering for the flipped samples."""
    flipped = data["flipped"].numpy()
    k = int(flipped.sum())
    orders = {f"DVEmb {name}": -score for name, score in scores.items()} | baselines
    orders["random"] = torch.rand(N_TRAIN, generator=torch.Generator().manual_seed(seed))
    rows = []
    for name, suspicion in orders.items():
        top = np.argsort(-suspicion.double().numpy(), kind="stable")[:k]
        rows.append({"benchmark": "mislabel", "part": "detection", "seed": seed, "method": name,
                     "auroc": round(float(roc_auc_score(flipped, suspicion.double().numpy())), 4),
                     "precision_at_k": round(float(flipped[top].mean()), 4), "k": k})
    return rows


def removals(seed: int, data: dict[str, torch.Tensor], score: torch.Tensor, train_loss: torch.Tensor, epochs: int,
             n: int, base: float) -> list[dict[str, Any]]:
    """Retrain without each removal set, in both modes, against the prediction of the default's scores; the
    samples of highest final training loss are the set a user could pick without the callback."""
    sets = {"most harmful": torch.argsort(score)[:n], "most helpful": torch.argsort(score, descending=True)[:n],
            "highest training loss": torch.argsort(train_loss, descending=True)[:n]}
    for draw in range(3):
        generator = torch.Generator().manual_seed(99 + draw + 1000 * seed)
        sets[f"random {draw}"] = torch.randperm(N_TRAIN, generator=generator)[:n]
    rows = []
    for name, removed in sets.items():
        keep = torch.ones(N_TRAIN)
        keep[removed] = 0
        actual = {"mask": val_loss(fit(seed, data, epochs, keep=keep), data) - base,
                  "drop": val_loss(fit(seed, data, epochs, drop=tuple(removed.tolist())), data) - base}
        rows.append({"benchmark": "mislabel", "part": "removal", "seed": seed, "set": name, "n": n,
                     "n_flipped": int(data["flipped"][removed].sum()),
                     "predicted_dloss": round(float(score[removed].sum()) / N_VAL, 6),
                     **{f"dloss_{mode}": round(value, 6) for mode, value in actual.items()}})
    return rows


def run_seed(seed: int, epochs: int, n_removed: int) -> list[dict[str, Any]]:
    data = noisy_digits(seed)
    root = Path("mislabel_run") / f"seed{seed}"
    callbacks = {name: DataValueEmbedding(root / name.split()[0], overwrite=True, report=None, **settings)
                 for name, settings in CALLBACKS.items()}
    model = fit(seed, data, epochs, list(callbacks.values()))
    base = val_loss(model, data)
    val_batch = {"x": data["val_x"], "y": data["val_y"], "index": torch.arange(N_VAL), "keep": torch.ones(N_VAL)}
    scores = {}
    for name, callback in callbacks.items():
        result = callback.embeddings.influence(model, val_batch)
        scores[name] = torch.zeros(N_TRAIN, dtype=torch.float64).index_put_(
            (result.sample_ids.long(),), result.scores.double().sum(0))
    baselines = final_model_baselines(model, data)
    rows = detection(seed, data, scores, baselines)
    rows[0]["val_loss"] = round(base, 4)
    if n_removed:
        rows += removals(seed, data, scores["default"], baselines["train loss (final model)"], epochs, n_removed, base)
    return rows


def summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and standard deviation over the seeds of each method and removal set."""
    def mean_sd(values: list[float]) -> list[float]:
        return [round(statistics.mean(values), 4), round(statistics.stdev(values), 4) if len(values) > 1 else 0.0]

    out = []
    for method in dict.fromkeys(r["method"] for r in rows if r["part"] == "detection"):
        mine = [r for r in rows if r.get("method") == method]
        out.append({"benchmark": "mislabel", "part": "detection_summary", "method": method, "seeds": len(mine),
                    "auroc": mean_sd([r["auroc"] for r in mine]),
                    "precision_at_k": mean_sd([r["precision_at_k"] for r in mine])})
    for group in ("most harmful", "most helpful", "highest training loss", "random"):
        mine = [r for r in rows if r["part"] == "removal" and r["set"].startswith(group)]
        if mine:
            out.append({"benchmark": "mislabel", "part": "removal_summary", "set": group, "runs": len(mine),
                        "n_flipped": round(statistics.mean(r["n_flipped"] for r in mine), 1),
                        **{key: mean_sd([r[key] for r in mine]) for key in ("predicted_dloss", "dloss_mask",
                                                                            "dloss_drop")}})
    removal = [r for r in rows if r["part"] == "removal"]
    if len(removal) > 2:
        out.append({"benchmark": "mislabel", "part": "removal_agreement", "pearson_predicted_vs_mask": round(float(
            np.corrcoef([r["predicted_dloss"] for r in removal], [r["dloss_mask"] for r in removal])[0, 1]), 4)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--removed", type=int, default=20, help="samples per removal set (0: no retraining)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="one seed, one epoch, no removals")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.epochs, args.removed = "0", 1, 0
    C.setup(args.threads)
    C.emit({"benchmark": "mislabel", "machine": C.machine(), "epochs": args.epochs, "flipped_share": FLIP})
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for row in run_seed(seed, args.epochs, args.removed):
            C.emit(row)
            rows.append(row)
    for row in summary(rows):
        C.emit(row)


if __name__ == "__main__":
    main()
