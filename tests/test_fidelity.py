"""End-to-end fidelity of DataValueEmbedding against float64 ground truth (``tests/oracles.py``).

Setting: 384 real digits (sklearn), a 64-32-10 tanh MLP, plain SGD lr 0.1, batch 32, 3 epochs (36 steps, 1152
occurrences), a new seeded permutation each epoch; 16 held-out test points. Run with ``pytest -n0 -s`` to see
the measured figures (workers do not pass printed output on).

The oracle is checked on its own first (replay vs a torch training loop, vmap gradients vs a per-example loop,
three forms of the product agree, and the product with the true Hessian equals the finite-difference derivative
of TSLOO), then the package is checked against it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from tests import oracles
from tests.helpers import DigitsDataset, DigitsMLP, epoch_batches, make_loader, make_trainer, split_indices

N_TRAIN, N_TEST, BATCH, EPOCHS, HIDDEN, LR = 384, 16, 32, 3, 32, 0.1
MODEL_SEED, LOADER_SEED, OCCURRENCE_SEED, N_OCCURRENCES = 0, 1, 0, 40
LR_DECAY = 0.05  # schedule variant: lr_t = LR / (1 + LR_DECAY * t)


@dataclasses.dataclass
class Problem:
    """One training run replayed by the oracle, with every ground-truth quantity the tests need."""

    lr_decay: float
    net: torch.nn.Module
    batches: list
    lrs: list[float]
    trajectory: list
    test: dict
    occurrences: list
    reference: dict  # layout -> [n_test, m] exact DVEmb scores over all occurrences (explicit product)

    def loader(self):
        return make_loader(DigitsDataset(split_indices(N_TRAIN, N_TEST)[0]), BATCH, seed=LOADER_SEED)

    def expected_ids_and_steps(self) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.cat([b["index"] for b in self.batches])
        steps = torch.cat([torch.full_like(b["index"], t) for t, b in enumerate(self.batches)])
        return ids, steps


def build_problem(lr_decay: float = 0.0) -> Problem:
    train_ids, test_ids = split_indices(N_TRAIN, N_TEST)
    batches = epoch_batches(make_loader(DigitsDataset(train_ids), BATCH, seed=LOADER_SEED), EPOCHS)
    model = DigitsMLP(hidden=HIDDEN, lr=LR, seed=MODEL_SEED, lr_decay=lr_decay)
    lrs = model.step_lrs(len(batches))
    trajectory = oracles.replay(model.net, oracles.params_of(model.net), batches, lrs, return_trajectory=True)
    test = DigitsDataset(test_ids).batch()
    reference = {}
    for layout in ("per_layer", "full"):
        emb = oracles.reference_dvemb(model.net, trajectory, batches, lrs, layout=layout)
        assert emb.occurrences == [(t, i) for t, b in enumerate(batches) for i in range(len(b["y"]))]
        test_grads = oracles.grads_at_test_points(model.net, trajectory[-1], test["x"], test["y"], layout)
        reference[layout] = emb.scores(test_grads)
    occurrences = oracles.spread_occurrences([len(b["y"]) for b in batches], N_OCCURRENCES, OCCURRENCE_SEED)
    return Problem(lr_decay, model.net, batches, lrs, trajectory, test, occurrences, reference)


@pytest.fixture(scope="module")
def problem() -> Problem:
    return build_problem()


@pytest.fixture(scope="module")
def scheduled_problem() -> Problem:
    return build_problem(lr_decay=LR_DECAY)


@pytest.fixture(scope="module")
def exact_tsloo(problem: Problem) -> torch.Tensor:
    """Ground truth ``[n_test, 40]`` by replay."""
    p = problem
    return oracles.exact_tsloo(p.net, p.trajectory, p.batches, p.lrs, p.occurrences, p.test["x"], p.test["y"])


@pytest.fixture(scope="module")
def fit_dve(tmp_path_factory) -> Callable:
    """``fit_dve(problem, **dve_kwargs) -> (module, dve)``: a Trainer run with the callback, cached per settings."""
    from lightning_dve import DataValueEmbedding

    cache: dict = {}

    def run(p: Problem, **kwargs):
        kwargs.setdefault("layout", "per_layer")  # the oracles' default; "auto" would be "full" on this MLP
        key = (p.lr_decay, tuple(sorted(kwargs.items())))
        if key not in cache:
            module = DigitsMLP(hidden=HIDDEN, lr=LR, seed=MODEL_SEED, lr_decay=p.lr_decay)
            dve = DataValueEmbedding(
                save_dir=tmp_path_factory.mktemp("dve"), sample_ids="index", loss_reduction="mean", **kwargs
            )
            make_trainer(EPOCHS, callbacks=[dve]).fit(module, p.loader())
            cache[key] = (module, dve)
        return cache[key]

    return run


def relative_max_error(estimate: torch.Tensor, reference: torch.Tensor) -> float:
    return float((estimate - reference).abs().max() / reference.abs().max())


def columns_of(p: Problem, occurrences) -> list[int]:
    offsets = [0]
    for b in p.batches:
        offsets.append(offsets[-1] + len(b["y"]))
    return [offsets[t] + i for t, i in occurrences]


# ------------------------------------------------------------------------------------------------------------
# the oracle on its own


def test_oracle_replay_equals_torch_training_loop(problem: Problem) -> None:
    model = DigitsMLP(hidden=HIDDEN, lr=LR, seed=MODEL_SEED)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    for batch in problem.batches:
        optimizer.zero_grad()
        F.cross_entropy(model(batch["x"]), batch["y"]).backward()
        optimizer.step()
    for name, value in oracles.params_of(model.net).items():
        torch.testing.assert_close(problem.trajectory[-1][name], value, rtol=0, atol=1e-12)


def test_oracle_vmap_gradients_equal_per_example_loop(problem: Problem) -> None:
    batch, params = problem.batches[7], problem.trajectory[7]
    vmapped = oracles.block_grads(problem.net, params, batch["x"], batch["y"], layout="full")[0]
    looped = oracles.per_sample_grads_loop(problem.net, params, batch["x"], batch["y"])
    torch.testing.assert_close(vmapped, looped, rtol=1e-12, atol=1e-14)


def _tiny_problem():
    train_ids, test_ids = split_indices(64, 4, seed=3)
    batches = epoch_batches(make_loader(DigitsDataset(train_ids), 8, seed=2), 2)
    model = DigitsMLP(hidden=6, lr=0.3, seed=1)
    lrs = model.step_lrs(len(batches))
    trajectory = oracles.replay(model.net, oracles.params_of(model.net), batches, lrs, return_trajectory=True)
    return model.net, batches, lrs, trajectory, DigitsDataset(test_ids).batch()


@pytest.mark.parametrize("layout", ["per_layer", "full"])
def test_oracle_product_forms_agree(layout: str) -> None:
    """Vector-wise explicit product == dense matrix product == backward recursion (method.md §2)."""
    net, batches, lrs, trajectory, _ = _tiny_problem()
    vector_wise = oracles.reference_dvemb(net, trajectory, batches, lrs, layout=layout).blocks
    dense = oracles.dense_product_dvemb(net, trajectory, batches, lrs, layout=layout)
    recursion = oracles.recursion_dvemb(net, trajectory, batches, lrs, layout=layout)
    for v, d, r in zip(vector_wise, dense, recursion, strict=True):
        assert relative_max_error(d, v) < 1e-12
        assert relative_max_error(r, v) < 1e-12


def test_oracle_hessian_product_is_tsloo_derivative() -> None:
    """With the true step Hessian the product is the exact derivative of the removal: checks sign, scale
    (lr * w, per-sample gradient not divided by B) and the order of the factors against finite differences."""
    net, batches, lrs, trajectory, test = _tiny_problem()
    emb = oracles.reference_dvemb(net, trajectory, batches, lrs, layout="full", curvature="hessian")
    occurrences = [(0, 3), (4, 0), (9, 7), (15, 2)]
    estimate = emb.scores(oracles.grads_at_test_points(net, trajectory[-1], test["x"], test["y"], "full"))
    estimate = estimate[:, emb.columns(occurrences)]
    eps = 1e-4
    columns = []
    for step, position in occurrences:
        losses = []
        for fraction in (eps, -eps):
            final = oracles.replay(net, trajectory[step], batches, lrs, remove=(step, position), start_step=step,
                                   remove_fraction=fraction)
            losses.append(oracles.per_sample_losses(net, final, test["x"], test["y"]))
        columns.append((losses[0] - losses[1]) / (2 * eps))
    derivative = torch.stack(columns, dim=1)
    # measured: 7.7e-11 relative (central difference error ~eps^2)
    assert float((estimate - derivative).norm() / derivative.norm()) < 1e-7


def test_oracle_tsloo_from_trajectory_equals_full_replay(problem: Problem) -> None:
    p = problem
    occurrence = p.occurrences[len(p.occurrences) // 2]
    fast = oracles.exact_tsloo(p.net, p.trajectory, p.batches, p.lrs, [occurrence], p.test["x"], p.test["y"])
    final = oracles.replay(p.net, p.trajectory[0], p.batches, p.lrs, remove=occurrence)
    full = oracles.per_sample_losses(p.net, final, p.test["x"], p.test["y"]) - oracles.per_sample_losses(
        p.net, p.trajectory[-1], p.test["x"], p.test["y"]
    )
    torch.testing.assert_close(fast[:, 0], full, rtol=0, atol=1e-14)


# ------------------------------------------------------------------------------------------------------------
# the package against the oracle


@pytest.mark.slow
@pytest.mark.parametrize("lr_decay", [0.0, LR_DECAY])
def test_trainer_weights_equal_replay(problem: Problem, scheduled_problem: Problem, fit_dve, lr_decay: float) -> None:
    """The recorded run is the run the oracle replays (and the callback does not perturb training)."""
    p = problem if lr_decay == 0.0 else scheduled_problem
    module, _ = fit_dve(p, projection_dim=None)
    final = oracles.params_of(module.net)
    for name, value in p.trajectory[-1].items():
        assert float((final[name] - value).abs().max()) < 1e-10, name


@pytest.mark.slow
@pytest.mark.parametrize(("layout", "lr_decay"), [("per_layer", 0.0), ("full", 0.0), ("per_layer", LR_DECAY)])
def test_exact_mode_equals_reference_dvemb(
    problem: Problem, scheduled_problem: Problem, fit_dve, layout: str, lr_decay: float
) -> None:
    p = problem if lr_decay == 0.0 else scheduled_problem
    module, dve = fit_dve(p, projection_dim=None, layout=layout)
    result = dve.embeddings.influence(module, p.test, per_step=True)
    ids, steps = p.expected_ids_and_steps()
    assert torch.equal(result.sample_ids.cpu().long(), ids)
    assert torch.equal(result.steps.cpu().long(), steps)
    assert result.scores.shape == p.reference[layout].shape
    error = relative_max_error(result.scores.cpu().double(), p.reference[layout])
    print(f"\nexact mode, layout={layout}, lr_decay={lr_decay}: max |package - reference| / max |reference| = "
          f"{error:.2e}")
    assert error < 1e-8


@pytest.mark.slow
def test_auto_layout_runs_one_full_matrix_on_a_small_model(problem: Problem, fit_dve) -> None:
    """2410 exact dimensions in all (<= ``AUTO_FULL_MAX_DIM``): the default layout resolves to the full matrix."""
    module, dve = fit_dve(problem, projection_dim=None, layout="auto")
    assert dve.embeddings.store.manifest["settings"]["layout"] == "full"
    assert dve.config.layout.value == "full" and dve._requested.layout.value == "auto"
    result = dve.embeddings.influence(module, problem.test, per_step=True)
    assert relative_max_error(result.scores.cpu().double(), problem.reference["full"]) < 1e-8


@pytest.mark.slow
def test_exact_mode_per_sample_totals(problem: Problem, fit_dve) -> None:
    """``per_step=False``: one column per unique sample id (sorted), the sum of its occurrences (3 epochs)."""
    module, dve = fit_dve(problem, projection_dim=None)
    result = dve.embeddings.influence(module, problem.test)
    ids, _ = problem.expected_ids_and_steps()
    unique, inverse = torch.unique(ids, return_inverse=True)
    totals = torch.zeros(N_TEST, len(unique), dtype=torch.float64)
    totals.index_add_(1, inverse, problem.reference["per_layer"])
    assert torch.equal(result.sample_ids.cpu().long(), unique)
    assert torch.equal(result.steps.cpu().long(), torch.full_like(unique, -1))
    assert relative_max_error(result.scores.cpu().double(), totals) < 1e-8


@pytest.mark.slow
def test_spearman_against_exact_tsloo(problem: Problem, exact_tsloo: torch.Tensor, fit_dve) -> None:
    """Rank agreement with exact TSLOO over 40 occurrences spread over the run, per test point, averaged.

    Measured (this setting, seed 0): package exact per_layer 0.836, full 0.870; no-curvature baseline 0.470.
    Over 6 seeds of split/init/order the oracle gave per_layer 0.797-0.836, full 0.859-0.894, no-curvature
    0.262-0.470 (so DVEmb - baseline >= 0.37 on every seed). Thresholds keep a margin of ~0.1 under the lowest
    seed: per_layer 0.70, full 0.75, gap to the baseline 0.2.
    Context (oracle only, seed 0): the same first-order product with the true step Hessian reaches 1.00 (0.995
    at lr 0.3), with the Gauss-Newton matrix 0.87 per_layer / 0.96 full; the empirical Fisher is what limits
    fidelity. At lr 0.3 the empirical-Fisher estimate falls to ~0.45-0.49 (GGN ~0.72-0.79), so this test
    stays in the small-lr regime where the paper's estimator is expected to work.
    """
    p = problem
    columns = columns_of(p, p.occurrences)
    figures = {}
    for layout in ("per_layer", "full"):
        module, dve = fit_dve(p, projection_dim=None, layout=layout)
        scores = dve.embeddings.influence(module, p.test, per_step=True).scores.cpu().double()[:, columns]
        figures[f"package exact {layout}"] = oracles.mean_spearman(scores, exact_tsloo)[0]
        figures[f"reference {layout}"] = oracles.mean_spearman(p.reference[layout][:, columns], exact_tsloo)[0]
    baseline = oracles.no_curvature_scores(
        p.net, p.trajectory, p.batches, p.lrs, p.occurrences, p.test["x"], p.test["y"]
    )
    figures["no-curvature baseline"] = oracles.mean_spearman(baseline, exact_tsloo)[0]
    print("\nmean Spearman vs exact TSLOO (16 test points x 40 occurrences):")
    for name, value in figures.items():
        print(f"  {name:28s} {value:.3f}")
    assert figures["package exact per_layer"] > 0.70
    assert figures["package exact full"] > 0.75
    assert figures["package exact per_layer"] - figures["no-curvature baseline"] > 0.2
    assert figures["package exact full"] - figures["no-curvature baseline"] > 0.2


@pytest.mark.slow
@pytest.mark.parametrize("dim", [64, 256, 4096])
def test_projected_mode_equals_reference_in_projected_space(problem: Problem, fit_dve, dim: int) -> None:
    """Projected mode == the oracle's explicit product on gradients projected with the recorded matrices
    (``P_out [dW | db] P_in^T`` per layer), i.e. the projection is the only approximation. Gradients are stored
    in float64 here so that storage rounding (row-scaled float16 by default) does not blur the comparison."""
    p = problem
    module, dve = fit_dve(p, projection_dim=dim, storage_dtype="float64")
    projections = dve.embeddings.projections
    maps = [
        oracles.kronecker_block_map(layer, projections[name].output.matrix(), projections[name].input.matrix())
        for name, layer in module.named_modules()
        if isinstance(layer, torch.nn.Linear)
    ]
    reference = oracles.reference_dvemb(p.net, p.trajectory, p.batches, p.lrs, block_maps=maps)
    test_grads = oracles.grads_at_test_points(p.net, p.trajectory[-1], p.test["x"], p.test["y"], block_maps=maps)
    result = dve.embeddings.influence(module, p.test, per_step=True)
    assert relative_max_error(result.scores.cpu().double(), reference.scores(test_grads)) < 1e-8


@pytest.mark.slow
def test_projection_approaches_exact_mode(problem: Problem, exact_tsloo: torch.Tensor, fit_dve) -> None:
    """Kronecker-projected scores approach the exact-mode scores as the per-layer dimension grows.

    Measured (projection seed 0): relative error vs exact 0.746 / 0.606 / 0.463 and Pearson 0.801 / 0.884 /
    0.922 for k = 64 / 256 / 4096 while sides that fit were still projected by square Gaussian matrices. Over
    projection seeds 0-5 both stayed monotone. Sides that fit are now left unprojected, so at 4096, where both
    layers fit whole (32x65 and 10x33), projected mode is exact mode.
    """
    p = problem
    exact = p.reference["per_layer"]
    columns = columns_of(p, p.occurrences)
    errors, correlations = {}, {}
    print("\nprojected mode (layers [32, 64+1] and [10, 32+1]):")
    for dim in (64, 256, 4096):
        module, dve = fit_dve(p, projection_dim=dim)
        scores = dve.embeddings.influence(module, p.test, per_step=True).scores.cpu().double()
        errors[dim] = float((scores - exact).norm() / exact.norm())
        correlations[dim] = float(torch.corrcoef(torch.stack([scores.flatten(), exact.flatten()]))[0, 1])
        spearman = oracles.mean_spearman(scores[:, columns], exact_tsloo)[0]
        print(f"  k={dim:5d}: rel. error vs exact {errors[dim]:.3f}, Pearson vs exact {correlations[dim]:.4f}, "
              f"mean Spearman vs TSLOO {spearman:.3f}")
    assert errors[64] > errors[256] > errors[4096]
    assert correlations[64] < correlations[256] < correlations[4096]
    assert errors[4096] < 1e-3  # only float16 storage rounding is left
