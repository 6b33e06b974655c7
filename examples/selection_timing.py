"""Is data selection worth its cost at every step, or only early and late? A timing experiment on sklearn digits.

The paper behind DVEmb (Wang et al., ICLR 2025, method.md §4) finds that the influence of a step's samples on the
final validation loss, per unit of learning rate, is high in a short early phase and again near the end, and low
in a long middle basin. Its practical claim: data selection spent only in the early and late windows comes close
to selecting at every step, at a fraction of the cost. This script tests that claim on a small problem.

Setup: an MLP on ``sklearn.datasets.load_digits`` (bundled, no download) trained with plain SGD, where a share
of the training labels is flipped at random (``--label-noise``) so that there is something to select against.
At every step a candidate batch of ``--candidates`` x the batch size is drawn. A step *without* selection trains
on a random batch of the candidates; a step *with* selection keeps the candidates whose per-sample loss gradient
(computed with ``torch.func`` vmap/grad: that is the selector's cost, not DVEmb's) has the largest inner product
with the mean gradient of a validation batch (a first-order estimate of how much each one lowers the validation
loss). Policies, run with the same seeds (initialisation, candidate stream, validation batches):

- ``never`` / ``always``: no selection / selection at every step;
- ``early``, ``late``, ``early+late``: selection only in the first and/or last ``--window`` of the steps;
- ``middle`` (control): the same number of selection steps as ``early+late``, placed in the middle; it tells
  whether the *timing* matters or only the number of selection steps.

The final loss is measured on held-out digits that neither training nor the selector sees.

    python examples/selection_timing.py                    # 5 seeds, about half a minute on 2 CPU cores
    python examples/selection_timing.py --quick            # smoke run
    python examples/selection_timing.py --no-dvemb         # skip the DVEmb stage summary of a `never` run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

POLICIES = ("never", "always", "early", "late", "early+late", "middle")


@dataclasses.dataclass(frozen=True)
class Split:
    """One part of the data: inputs ``[n, 64]`` in [0, 1], labels ``[n]`` and sklearn indices ``[n]``."""

    x: torch.Tensor
    y: torch.Tensor
    index: torch.Tensor


@dataclasses.dataclass(frozen=True)
class Data:
    """Training digits (some labels flipped), the selector's validation pool, the held-out test digits."""

    train: Split
    val: Split
    test: Split
    flipped: torch.Tensor  # [n_train] bool: the training label was replaced


def load_data(train_size: int, val_size: int, label_noise: float, seed: int) -> Data:
    """Split the 1797 digits at random (seeded); flip ``label_noise`` of the training labels to another class."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.as_tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.as_tensor(digits.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=g)
    parts = order[:train_size], order[train_size : train_size + val_size], order[train_size + val_size :]
    train, val, test = (Split(x[i], y[i], i) for i in parts)
    flipped = torch.rand(train_size, generator=g) < label_noise
    shift = torch.randint(1, 10, (train_size,), generator=g)  # a different class, uniformly
    noisy = torch.where(flipped, (train.y + shift) % 10, train.y)
    return Data(Split(train.x, noisy, train.index), val, test, flipped)


def make_model(hidden: int, seed: int) -> nn.Module:
    """``Linear(64, hidden) -> Tanh -> Linear(hidden, 10)``, initialised from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10))


def selection_steps(policy: str, steps: int, window: float) -> torch.Tensor:
    """``[steps]`` bool: at which steps ``policy`` selects (windows of ``round(window * steps)`` steps)."""
    w = max(1, round(window * steps))
    on = torch.zeros(steps, dtype=torch.bool)
    if policy == "always":
        on[:] = True
    if policy in ("early", "early+late"):
        on[:w] = True
    if policy in ("late", "early+late"):
        on[steps - w :] = True
    if policy == "middle":  # control: as many selection steps as early+late, centred
        start = (steps - 2 * w) // 2
        on[start : start + 2 * w] = True
    return on


def gradient_selector(model: nn.Module) -> Callable[[Split, torch.Tensor, torch.Tensor, int], torch.Tensor]:
    """``select(train, candidates, val_batch, k)``: the ``k`` candidates best aligned with the validation gradient.

    Score of candidate ``z``: ``<grad l(theta, z), grad L_val(theta)>`` with ``L_val`` the mean loss of the
    validation batch; per-sample gradients come from ``torch.func`` (vmap over ``grad``).
    """

    def sample_loss(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, params, (x.unsqueeze(0),)), y.unsqueeze(0))

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))

    def select(data: Split, candidates: torch.Tensor, val: Split, k: int) -> torch.Tensor:
        params = {name: p.detach() for name, p in model.named_parameters()}
        val_grads = torch.autograd.grad(F.cross_entropy(model(val.x), val.y), list(model.parameters()))
        grads = per_sample(params, data.x[candidates], data.y[candidates])
        scores = sum((grads[name].flatten(1) @ g.flatten()) for name, g in zip(params, val_grads))
        return candidates[torch.topk(scores, k).indices]

    return select


def make_schedule(optimizer: torch.optim.Optimizer, args: argparse.Namespace) -> torch.optim.lr_scheduler.LRScheduler:
    """Constant learning rate, or cosine decay to 10% of it over ``args.steps`` (stepped once per step)."""
    if args.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps, eta_min=0.1 * args.lr)
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


@dataclasses.dataclass(frozen=True)
class RunResult:
    """One training run."""

    policy: str
    seed: int
    test_loss: float
    test_acc: float
    selection_steps: int
    gradient_evals: int
    selection_seconds: float
    train_seconds: float
    flipped_share: float  # share of the trained-on samples whose label was flipped


def train_run(data: Data, policy: str, seed: int, args: argparse.Namespace) -> RunResult:
    """Train one model with ``policy``; the initialisation and every random draw depend on ``seed`` only."""
    model = make_model(args.hidden, seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    schedule = make_schedule(optimizer, args)
    select = gradient_selector(model)
    on = selection_steps(policy, args.steps, args.window)
    stream = torch.Generator().manual_seed(10_000 + seed)  # the same candidates and val batches for every policy
    n_train, n_val, b = len(data.train.y), len(data.val.y), args.batch_size
    selecting, flipped, start = 0.0, 0, time.perf_counter()
    for step in range(args.steps):
        candidates = torch.randperm(n_train, generator=stream)[: args.candidates * b]
        val_rows = torch.randperm(n_val, generator=stream)[: args.val_batch]
        if on[step]:
            tick = time.perf_counter()
            batch = select(data.train, candidates, Split(data.val.x[val_rows], data.val.y[val_rows], val_rows), b)
            selecting += time.perf_counter() - tick
        else:
            batch = candidates[:b]  # a uniformly random batch (the candidates are in random order)
        flipped += int(data.flipped[batch].sum())
        loss = F.cross_entropy(model(data.train.x[batch]), data.train.y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    elapsed = time.perf_counter() - start
    with torch.no_grad():
        logits = model(data.test.x)
        test_loss = F.cross_entropy(logits, data.test.y).item()
        test_acc = (logits.argmax(dim=1) == data.test.y).float().mean().item()
    n_selections = int(on.sum())
    return RunResult(policy, seed, test_loss, test_acc, n_selections, n_selections * args.candidates * b, selecting,
                     elapsed, flipped / (args.steps * b))


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def table(results: list[RunResult], seeds: list[int]) -> str:
    """The results table: one row per policy, mean ± std over seeds (times: mean per run)."""
    head = (f"{'policy':<11} {'held-out loss':>17} {'accuracy':>15} {'sel. steps':>10} {'grad evals':>10} "
            f"{'sel. time (s)':>13} {'run time (s)':>12} {'flipped used':>12}")
    lines = [head, "-" * len(head)]
    for policy in POLICIES:
        rows = [r for r in results if r.policy == policy]
        if not rows:
            continue
        loss, loss_sd = mean_std([r.test_loss for r in rows])
        acc, acc_sd = mean_std([100 * r.test_acc for r in rows])
        lines.append(f"{policy + (' *' if policy == 'middle' else ''):<11} {loss:>8.4f} ± {loss_sd:<6.4f} "
                     f"{acc:>6.2f} ± {acc_sd:<5.2f}% {rows[0].selection_steps:>10d} {rows[0].gradient_evals:>10d} "
                     f"{statistics.fmean(r.selection_seconds for r in rows):>13.3f} "
                     f"{statistics.fmean(r.train_seconds for r in rows):>12.3f} "
                     f"{100 * statistics.fmean(r.flipped_share for r in rows):>11.1f}%")
    lines.append(f"(mean ± std over seeds {seeds}; grad evals: per-sample gradients the selector computed per run; "
                 "* control: as many selection steps as early+late, in the middle; flipped used: share of the "
                 "trained-on samples whose label was flipped)")
    return "\n".join(lines)


def paired(results: list[RunResult], a: str, b: str) -> tuple[float, float]:
    """Mean and std over seeds of ``loss(a) - loss(b)`` (same seed, so shared noise cancels)."""
    by = {(r.policy, r.seed): r.test_loss for r in results}
    seeds = sorted({r.seed for r in results})
    return mean_std([by[(a, s)] - by[(b, s)] for s in seeds])


def cost_share(results: list[RunResult], policy: str) -> tuple[float, float]:
    """``policy``'s selection cost relative to ``always``: (share of selection steps, share of selection time)."""
    def mean(name: str, attr: str) -> float:
        return statistics.fmean(getattr(r, attr) for r in results if r.policy == name)

    return (mean(policy, "selection_steps") / mean("always", "selection_steps"),
            mean(policy, "selection_seconds") / max(1e-12, mean("always", "selection_seconds")))


def verdict(results: list[RunResult], n_seeds: int, close: float) -> tuple[list[str], dict[str, float]]:
    """Plain-language conclusion on the claim, from paired (same-seed) differences in held-out loss.

    The gain of a policy is ``loss(never) - loss(policy)``; it *recovers* ``gain(policy) / gain(always)`` of
    always-on selection. A difference is *real* when its mean exceeds two standard errors of the per-seed
    differences. The claim holds when always-on selection has a real gain and early+late either is not really
    worse than always or recovers at least ``close`` of its gain.

    Returns:
        The lines to print and the numbers behind them.
    """

    def real(mean: float, sd: float) -> bool:
        return n_seeds > 1 and mean > 2 * sd / math.sqrt(n_seeds)

    gain, gain_sd = paired(results, "never", "always")
    recovered = {p: (gain - paired(results, p, "always")[0]) / gain if gain != 0 else math.nan
                 for p in ("early", "late", "early+late", "middle")}
    left, left_sd = paired(results, "early+late", "always")  # > 0: early+late is worse than always
    over_mid, over_mid_sd = paired(results, "middle", "early+late")  # > 0: early+late beats the control
    steps_share, time_share = cost_share(results, "early+late")
    numbers = {"gain_always": gain, "gain_always_sd": gain_sd, "early_late_minus_always": left,
               "early_late_minus_always_sd": left_sd, "middle_minus_early_late": over_mid,
               "middle_minus_early_late_sd": over_mid_sd, "selection_steps_share": steps_share,
               "selection_time_share": time_share, **{f"recovered_{p}": v for p, v in recovered.items()}}
    lines = [f"Paired over {n_seeds} seeds (held-out loss; mean ± std of the same-seed differences; 'real' = "
             "beyond 2 standard errors):",
             f"  never - always       = {gain:+.4f} ± {gain_sd:.4f}  what selecting at every step buys "
             f"({'real' if real(gain, gain_sd) else 'not real'})",
             f"  early+late - always  = {left:+.4f} ± {left_sd:.4f}  what the windows leave on the table "
             f"({'real' if real(left, left_sd) else 'not real'})",
             f"  middle - early+late  = {over_mid:+.4f} ± {over_mid_sd:.4f}  timing, at equal selection steps "
             f"({'real' if real(over_mid, over_mid_sd) else 'not real'})",
             "  share of the always-on gain recovered: " + ", ".join(f"{p} {100 * v:.0f}%" for p, v in
                                                                   recovered.items()),
             f"  early+late selection cost: {100 * steps_share:.0f}% of the selection steps, {100 * time_share:.0f}% "
             "of the selection wall time of always-on"]
    if n_seeds < 2:
        return lines + ["Verdict: one seed gives no noise estimate; run with 3 or more --seeds to judge the claim."], \
            numbers
    if not real(gain, gain_sd):
        return lines + ["Verdict: NOT TESTABLE on this data: selecting at every step did not beat never selecting "
                        "beyond the seed noise, so there is no gain for the windows to recover."], numbers
    share = recovered["early+late"]
    if not real(left, left_sd) or share >= close:
        head = (f"Verdict: the claim HELD on this data: early+late recovered {100 * share:.0f}% of the gain of "
                f"always-on selection (threshold {100 * close:.0f}%, or within the noise) for "
                f"{100 * steps_share:.0f}% of its selection steps.")
    else:
        head = (f"Verdict: the claim did NOT hold on this data: early+late recovered {100 * share:.0f}% of the gain "
                f"of always-on selection (threshold {100 * close:.0f}%), and the gap to always-on is larger than "
                "the seed noise.")
    timing = ("Timing mattered: the same number of selection steps in the middle did really worse."
              if real(over_mid, over_mid_sd) else "The same number of selection steps in the middle did as well "
              "(within the noise), so this run does not show that the windows' timing is what mattered.")
    windows = (f"Of the two windows, early alone recovered {100 * recovered['early']:.0f}% and late alone "
               f"{100 * recovered['late']:.0f}%.")
    return lines + [head, timing + " " + windows], numbers


def dvemb_stage_summary(data: Data, args: argparse.Namespace) -> tuple[str, dict[str, object]]:
    """Train the ``never`` policy once under Lightning with the DVEmb callback; return its stage summary.

    Same model, data, learning rate and number of steps as the experiment (random batches, no selection), on
    seed ``args.seeds[0]``; the reference set is the selector's validation pool.
    """
    import lightning as L
    from torch.utils.data import DataLoader, Dataset

    from lightning_dve import DataValueEmbedding
    from lightning_dve.config import ReportConfig
    from lightning_dve.reporting import format_summary

    class Items(Dataset):
        def __init__(self, split: Split) -> None:
            self.split = split

        def __len__(self) -> int:
            return len(self.split.y)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"x": self.split.x[i], "y": self.split.y[i], "index": self.split.index[i]}

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_model(args.hidden, args.seeds[0])

        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            return F.cross_entropy(self.net(batch["x"]), batch["y"])

        def configure_optimizers(self) -> dict[str, object]:
            optimizer = torch.optim.SGD(self.parameters(), lr=args.lr)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": make_schedule(optimizer, args),
                                                             "interval": "step"}}

    window = min(0.45, args.window)
    callback = DataValueEmbedding(save_dir=args.out / "dve", projection_dim=256, overwrite=True,
                                  report=ReportConfig(top_k=0, early_fraction=window, late_fraction=window),
                                  reference={"x": data.val.x, "y": data.val.y, "index": data.val.index})
    trainer = L.Trainer(max_steps=args.steps, accelerator="cpu", devices=1, logger=False, callbacks=[callback],
                        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
                        default_root_dir=str(args.out))
    loader = DataLoader(Items(data.train), batch_size=args.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(args.seeds[0]))
    trainer.fit(Module(), loader)
    summary = json.loads((args.out / "dve" / "report" / "summary.json").read_text())
    lines = format_summary(summary, k=0).splitlines()
    keep = [line for line in lines if not line.startswith("Top-")]
    return "\n".join(keep + [f"(curve: {args.out / 'dve' / 'report' / 'curve.png'})"]), summary


QUICK = {"steps": 60, "seeds": [0, 1], "dvemb": False}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400, help="SGD steps per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--window", type=float, default=0.15, help="early and late windows, share of the steps")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--candidates", type=int, default=2, help="candidate batch = this x the batch size")
    parser.add_argument("--val-batch", type=int, default=64, help="validation samples per selection step")
    parser.add_argument("--train-size", type=int, default=1000)
    parser.add_argument("--val-size", type=int, default=300, help="the selector's validation pool; the other "
                        "digits are the held-out test set")
    parser.add_argument("--label-noise", type=float, default=0.3, help="share of training labels flipped")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.3, help="plain-SGD learning rate")
    parser.add_argument("--schedule", choices=("constant", "cosine"), default="constant",
                        help="learning-rate schedule (cosine: decay to 10%% of --lr)")
    parser.add_argument("--close", type=float, default=0.8, help="share of the always-on gain early+late must "
                        "recover to count as 'close' (when it is not within the noise of always-on)")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the split and of the flipped labels")
    parser.add_argument("--out", type=Path, default=Path("selection_timing_run"),
                        help="where the results JSON (and the DVEmb store of --dvemb) go")
    parser.add_argument("--dvemb", action=argparse.BooleanOptionalAction, default=True,
                        help="also train `never` once with the DVEmb callback and print its stage summary")
    parser.add_argument("--quick", action="store_true", help="smoke run: --steps 60 --seeds 0 1 --no-dvemb "
                        "(options given explicitly still win)")
    if parser.parse_args(argv).quick:
        parser.set_defaults(**QUICK)
    args = parser.parse_args(argv)
    if not 0 < args.window < 0.5:
        parser.error(f"--window must be in (0, 0.5); got {args.window}")
    if args.train_size + args.val_size >= 1797:
        parser.error("--train-size + --val-size must leave held-out digits (< 1797)")
    return args


def main(argv: list[str] | None = None) -> dict[str, object]:
    """Run every policy on every seed, print the table and the verdict; return them (also in results.json)."""
    args = parse_args(argv)
    torch.set_num_threads(1)  # tiny matrices: one thread is as fast and its timings are steadier
    data = load_data(args.train_size, args.val_size, args.label_noise, args.data_seed)
    print(f"Digits: {len(data.train.y)} training ({100 * data.flipped.float().mean():.0f}% labels flipped), "
          f"{len(data.val.y)} validation (selector), {len(data.test.y)} held-out. {args.steps} SGD steps of "
          f"{args.batch_size} (lr {args.lr}) from {args.candidates * args.batch_size} candidates; windows "
          f"{100 * args.window:.0f}% of the steps at each end.")
    results = []
    for seed in args.seeds:
        for policy in POLICIES:
            results.append(train_run(data, policy, seed, args))
    text = table(results, args.seeds)
    print(text)
    conclusion, numbers = verdict(results, len(args.seeds), args.close)
    print("\n".join(conclusion))
    args.out.mkdir(parents=True, exist_ok=True)
    out = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
           "runs": [dataclasses.asdict(r) for r in results], "verdict": conclusion,
           "numbers": numbers}
    (args.out / "results.json").write_text(json.dumps(out, indent=2))
    print(f"Results: {args.out / 'results.json'}")
    if args.dvemb:
        print("\nWhy these windows: DVEmb stage summary of one `never` run (influence of each step's samples on "
              "the validation loss, per unit of learning rate):")
        text, summary = dvemb_stage_summary(data, args)
        print(text)
        shares = {s["stage"]: s["abs_share"] for s in summary["stages"]}
        print(f"DVEmb put {100 * shares['early']:.0f}% of |influence / lr| in the early window and "
              f"{100 * shares['late']:.0f}% in the late one ({100 * args.window:.0f}% of the steps each); selecting "
              f"there recovered {100 * numbers['recovered_early']:.0f}% and {100 * numbers['recovered_late']:.0f}% "
              "of the always-on gain.")
        out["dvemb_summary"] = summary
        (args.out / "results.json").write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
