"""``BackwardRecursion.block`` (several steps per product by ``M``) against the step-by-step recursion and the
explicit matrix product (method.md §2), for every curvature, layout and block split. Everything is float64."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lightning_dve import recursion_blocks
from lightning_dve.config import AccumulatorLayout, Curvature
from lightning_dve.recursion import BackwardRecursion
from lightning_dve.store import StepRecord
from tests.test_adam import exact_records as adam_exact_records
from tests.test_adam import random_records as adam_records
from tests.test_momentum import random_records as momentum_records
from tests.test_recursion import LAYERS, assert_embeddings_close, random_records, reference

ORDER = list(LAYERS)
SPLITS = [[1] * 6, [2, 2, 2], [6], [4, 1, 1], [1, 5]]  # steps per block, from the last step backwards


def with_curvature_rows(records: list[StepRecord], seed: int) -> list[StepRecord]:
    """Attach random curvature rows (stand-ins for Gauss-Newton pseudo-gradients) of the gradients' shapes."""
    gen = torch.Generator().manual_seed(seed + 100)
    return [dataclasses.replace(r, curvature={n: torch.randn(g.shape, generator=gen, dtype=g.dtype)
                                              for n, g in r.grads.items()}) for r in records]


def stepwise(records: list[StepRecord], layout, curvature=Curvature.EMPIRICAL_FISHER):
    recursion = BackwardRecursion(ORDER, layout, curvature=curvature)
    out = [recursion.step(r) for r in reversed(records)][::-1]
    return out, recursion.factors()


def blocked(records: list[StepRecord], layout, split: list[int], curvature=Curvature.EMPIRICAL_FISHER,
            update_last: bool = True):
    recursion = BackwardRecursion(ORDER, layout, curvature=curvature)
    backward, out, start = records[::-1], [], 0
    for i, size in enumerate(split):
        last = i == len(split) - 1
        out.extend(recursion.block(backward[start:start + size], update=update_last or not last))
        start += size
    assert start == len(records)
    return out[::-1], recursion.factors()


@pytest.mark.parametrize("layout", [AccumulatorLayout.PER_LAYER, AccumulatorLayout.FULL])
@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("seed", [0, 1])
def test_blocks_match_the_explicit_product_and_the_step_by_step_recursion(layout, split, seed):
    records = random_records(seed=seed)
    got, got_factors = blocked(records, layout, split)
    assert_embeddings_close(got, reference(records, layout), ORDER)
    expected, factors = stepwise(records, layout)
    assert_embeddings_close(got, expected, ORDER)
    assert set(got_factors) == set(factors)
    for key, factor in factors.items():
        torch.testing.assert_close(got_factors[key], factor, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("split", SPLITS)
def test_blocks_mixing_steps_with_one_rate_and_per_layer_rates_in_a_group(split):
    """One ``M`` over all layers, where some steps give every layer the same rate (a per-row scale) and others
    a rate per layer (a per-column one): a block mixing both equals the explicit product and the step-by-step
    recursion."""
    shared, per_layer = random_records(seed=3, equal_lrs=True), random_records(seed=3)
    records = [shared[i] if i % 2 else per_layer[i] for i in range(len(shared))]
    got, _ = blocked(records, AccumulatorLayout.FULL, split)
    assert_embeddings_close(got, reference(records, AccumulatorLayout.FULL), ORDER)
    assert_embeddings_close(got, stepwise(records, AccumulatorLayout.FULL)[0], ORDER)


@pytest.mark.parametrize("curvature", [Curvature.GGN, Curvature.NONE])
@pytest.mark.parametrize("layout", [AccumulatorLayout.PER_LAYER, AccumulatorLayout.FULL])
@pytest.mark.parametrize("split", SPLITS)
def test_blocks_with_separate_curvature_rows_or_none_match_the_step_by_step_recursion(curvature, layout, split):
    records = with_curvature_rows(random_records(seed=3), seed=3)
    got, got_factors = blocked(records, layout, split, curvature)
    expected, factors = stepwise(records, layout, curvature)
    assert_embeddings_close(got, expected, ORDER)
    assert set(got_factors) == set(factors)
    for key, factor in factors.items():
        torch.testing.assert_close(got_factors[key], factor, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("curvature", [Curvature.EMPIRICAL_FISHER, Curvature.GGN])
def test_gram_products_in_row_chunks_match_the_step_by_step_recursion(curvature, monkeypatch):
    """One block over all steps with its Gram products formed in chunks of 3 rows (fewer than a step's), so
    chunks end inside steps and each multiplies only the rows above its end."""
    original = recursion_blocks._earlier_products
    monkeypatch.setattr(recursion_blocks, "_earlier_products", lambda left, right, earlier: original(
        left, right, earlier, chunk=3))
    records = with_curvature_rows(random_records(seed=5), seed=5)
    for layout in (AccumulatorLayout.PER_LAYER, AccumulatorLayout.FULL):
        got, _ = blocked(records, layout, [6], curvature)
        expected, _ = stepwise(records, layout, curvature)
        assert_embeddings_close(got, expected, ORDER)


def test_ggn_rows_change_the_embeddings():
    """The curvature rows really enter: the same gradients with other rows give other embeddings."""
    records = with_curvature_rows(random_records(seed=4), seed=4)
    ggn, _ = blocked(records, AccumulatorLayout.PER_LAYER, [6], Curvature.GGN)
    fisher, _ = blocked(records, AccumulatorLayout.PER_LAYER, [6], Curvature.EMPIRICAL_FISHER)
    assert not torch.allclose(ggn[0]["a"], fisher[0]["a"])
    torch.testing.assert_close(ggn[-1]["a"], fisher[-1]["a"])  # the last step is unpropagated


@pytest.mark.parametrize("make", [random_records, momentum_records], ids=["sgd", "momentum"])
def test_last_block_without_update_gives_the_same_embeddings_and_leaves_m(make):
    records = make(seed=5)
    full, _ = blocked(records, AccumulatorLayout.PER_LAYER, [2, 4])
    partial, factors = blocked(records, AccumulatorLayout.PER_LAYER, [2, 4], update_last=False)
    assert_embeddings_close(partial, full, ORDER)
    _, after_first = blocked(records[4:], AccumulatorLayout.PER_LAYER, [2])
    assert set(factors) == set(after_first)
    for key in factors:
        torch.testing.assert_close(factors[key], after_first[key], atol=1e-12, rtol=1e-12)


def test_first_block_without_update_leaves_no_accumulator():
    recursion = BackwardRecursion(ORDER, AccumulatorLayout.PER_LAYER)
    recursion.block(random_records(seed=6)[::-1], update=False)
    assert recursion.factors() == {}


@pytest.fixture
def momentum_calls(monkeypatch) -> list[int]:
    """Count the calls of the blocked momentum form (to tell it from the step-by-step fallback)."""
    calls: list[int] = []
    original = recursion_blocks.block_momentum

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr("lightning_dve.recursion.block_momentum", counted)
    return calls


def assert_same_state(got: BackwardRecursion, expected: BackwardRecursion) -> None:
    """``M``, the velocity maps and the following step's momentum equal (the state the next block starts from)."""
    for field in ("accumulators", "velocity_maps", "next_momentum"):
        for mine, theirs in zip(getattr(got, field), getattr(expected, field)):
            assert (mine is None) == (theirs is None), field
            if mine is not None:
                torch.testing.assert_close(mine, theirs, atol=1e-10, rtol=1e-10, msg=field)


def run_both(records: list[StepRecord], layout, split: list[int], curvature=Curvature.EMPIRICAL_FISHER):
    """Embeddings and final state of the blocked and the step-by-step recursion over the same records."""
    blocks, steps = (BackwardRecursion(ORDER, layout, curvature=curvature) for _ in range(2))
    backward, got, start = records[::-1], [], 0
    for size in split:
        got.extend(blocks.block(backward[start:start + size]))
        start += size
    expected = [steps.step(r) for r in backward]
    assert_embeddings_close(got, expected, ORDER)
    assert_same_state(blocks, steps)


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("split", [[6], [2, 4], [1, 2, 3], [1] * 6])
def test_momentum_blocks_match_the_step_by_step_recursion(nesterov, split, momentum_calls):
    """Heavy ball and Nesterov with weight decay, dampening and clip factors (terms differ per layer and step)."""
    run_both(momentum_records(seed=7, nesterov=nesterov), AccumulatorLayout.PER_LAYER, split)
    assert len(momentum_calls) == 2 * len(split)  # one call per block and layer: no fallback


@pytest.mark.parametrize("curvature", [Curvature.EMPIRICAL_FISHER, Curvature.GGN, Curvature.NONE])
@pytest.mark.parametrize("split", [[6], [3, 3], [1, 4, 1]])
def test_adam_blocks_match_the_step_by_step_recursion(curvature, split, momentum_calls):
    """Projected Adam/AdamW records: preconditioned rows (and curvature rows), decoupled decay and L2 decay."""
    run_both(adam_records(seed=8, curvature=curvature), AccumulatorLayout.PER_LAYER, split, curvature)
    assert len(momentum_calls) == 2 * len(split)


def uniform_terms(records: list[StepRecord]) -> list[StepRecord]:
    """The same records with every term and rate equal across layers (one scalar per step for the full layout)."""
    return [dataclasses.replace(r, lrs=r.lrs[:1].expand_as(r.lrs).clone(),
                                optim={k: v[:1].expand_as(v).clone() for k, v in r.optim.items()}) for r in records]


def test_full_layout_blocks_with_one_scalar_per_step(momentum_calls):
    run_both(uniform_terms(momentum_records(seed=9, nesterov=True)), AccumulatorLayout.FULL, [2, 4])
    assert len(momentum_calls) == 2


def test_terms_that_differ_between_the_layers_of_a_group_run_step_by_step(momentum_calls):
    run_both(momentum_records(seed=10), AccumulatorLayout.FULL, [3, 3])
    assert momentum_calls == []


def test_exact_adam_with_the_second_moment_runs_step_by_step(momentum_calls):
    """Per-coordinate rates and the second-moment channel are not scalars: the step-by-step form takes them."""
    run_both(adam_exact_records(seed=11, curvature=Curvature.GGN), AccumulatorLayout.PER_LAYER, [3, 3], Curvature.GGN)
    assert momentum_calls == []


def test_float32_blocks_stay_within_round_off_of_float64():
    records = random_records(seed=8, batches=[16] * 12, layers={"a": 64})
    as32 = [dataclasses.replace(r, grads={n: g.float() for n, g in r.grads.items()}) for r in records]
    recursion = BackwardRecursion(["a"], AccumulatorLayout.PER_LAYER)
    got = torch.cat([e["a"] for e in recursion.block(as32[::-1])])
    exact = BackwardRecursion(["a"], AccumulatorLayout.PER_LAYER)
    expected = torch.cat([exact.step(r)["a"] for r in records[::-1]])
    assert got.dtype == torch.float32
    assert float((got.double() - expected).norm() / expected.norm()) < 1e-5


def without_preconditioned_rows(records: list[StepRecord], first: int) -> list[StepRecord]:
    """The first ``first`` steps without preconditioned rows, as projected Adam records its first step."""
    return [dataclasses.replace(r, preconditioned={}, curvature_preconditioned={}) if i < first else r
            for i, r in enumerate(records)]


@pytest.mark.parametrize("curvature", [Curvature.EMPIRICAL_FISHER, Curvature.GGN])
def test_adam_blocks_mixing_steps_with_and_without_preconditioned_rows(curvature, momentum_calls):
    records = without_preconditioned_rows(adam_records(seed=13, curvature=curvature), first=2)
    run_both(records, AccumulatorLayout.PER_LAYER, [4, 2], curvature)
    assert len(momentum_calls) == 4


@pytest.mark.parametrize("curvature", [Curvature.GGN, Curvature.NONE])
def test_momentum_blocks_with_separate_curvature_rows_or_none(curvature, momentum_calls):
    records = with_curvature_rows(momentum_records(seed=14, nesterov=True), seed=14)
    run_both(records, AccumulatorLayout.PER_LAYER, [2, 4], curvature)
    assert len(momentum_calls) == 4


def test_a_blocked_momentum_block_hands_its_state_to_the_step_by_step_form_and_back(momentum_calls):
    """Full layout: terms equal across layers in some steps only. Latest steps uniform (blocked), then steps
    with per-layer terms (step by step), then uniform again: refused, since the following momentum differs
    between the layers of the group."""
    mixed = momentum_records(seed=15)
    records = uniform_terms(mixed[:2]) + mixed[2:4] + uniform_terms(mixed[4:])
    run_both(records, AccumulatorLayout.FULL, [2, 2, 2])
    assert len(momentum_calls) == 1


def test_float32_momentum_blocks_stay_within_round_off_of_float64():
    records = [dataclasses.replace(r, optim={**r.optim, "momentum": torch.full((1,), 0.9, dtype=torch.float64),
                                             "gain": torch.ones(1, dtype=torch.float64),
                                             "weight_decay": torch.full((1,), 0.01, dtype=torch.float64)},
                                   lrs=r.lrs[:1])
               for r in random_records(seed=16, batches=[16] * 32, layers={"a": 64})]
    as32 = [dataclasses.replace(r, grads={n: g.float() for n, g in r.grads.items()}) for r in records]
    got = torch.cat([e["a"] for e in BackwardRecursion(["a"], AccumulatorLayout.PER_LAYER).block(as32[::-1])])
    exact = BackwardRecursion(["a"], AccumulatorLayout.PER_LAYER)
    expected = torch.cat([exact.step(r)["a"] for r in records[::-1]])
    assert got.dtype == torch.float32
    assert float((got.double() - expected).norm() / expected.norm()) < 1e-5


def scheduled_momentum(records: list[StepRecord], seed: int) -> list[StepRecord]:
    """The same records with a momentum that changes from step to step (a cycled momentum, as OneCycleLR sets it)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for r in records:
        momentum = 0.3 + 0.65 * torch.rand(2, generator=gen, dtype=torch.float64)
        lead = {"lead": momentum} if "lead" in r.optim else {}  # Nesterov's lead is the step's own momentum
        out.append(dataclasses.replace(r, optim={**r.optim, "momentum": momentum, **lead}))
    return out


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("split", [[6], [2, 4], [1, 2, 3], [3, 1, 2]])
def test_momentum_blocks_with_a_momentum_schedule_match_the_linearised_dynamics(nesterov, split, momentum_calls):
    """A velocity change at step ``t`` decays by ``mu_{t+1}``, the next step's momentum, inside a block and across
    blocks. Oracle: the (theta, velocity) linear system run forward from each occurrence
    (``tests.test_momentum.linearised_removal``), and the step-by-step recursion."""
    from tests.test_momentum import linearised_removal

    records = scheduled_momentum(momentum_records(seed=17, nesterov=nesterov), seed=17)
    run_both(records, AccumulatorLayout.PER_LAYER, split)
    assert len(momentum_calls) == 2 * len(split)
    recursion, backward, got, start = BackwardRecursion(ORDER, AccumulatorLayout.PER_LAYER), records[::-1], [], 0
    for size in split:
        got.extend(recursion.block(backward[start:start + size]))
        start += size
    for record, embedding in zip(backward, got):
        for z in range(len(record.sample_ids)):
            expected = linearised_removal(records, record.step, z, [slice(0, 3), slice(3, 5)])
            torch.testing.assert_close(torch.cat([embedding[k][z] for k in ORDER]), expected, rtol=1e-10, atol=1e-13)
