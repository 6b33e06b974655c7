"""``BackwardRecursion.block`` (several steps per product by ``M``) against the step-by-step recursion and the
explicit matrix product (method.md §2), for every curvature, layout and block split. Everything is float64."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lightning_dve.config import AccumulatorLayout, Curvature
from lightning_dve.recursion import BackwardRecursion
from lightning_dve.store import StepRecord
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


def test_ggn_rows_change_the_embeddings():
    """The curvature rows really enter: the same gradients with other rows give other embeddings."""
    records = with_curvature_rows(random_records(seed=4), seed=4)
    ggn, _ = blocked(records, AccumulatorLayout.PER_LAYER, [6], Curvature.GGN)
    fisher, _ = blocked(records, AccumulatorLayout.PER_LAYER, [6], Curvature.EMPIRICAL_FISHER)
    assert not torch.allclose(ggn[0]["a"], fisher[0]["a"])
    torch.testing.assert_close(ggn[-1]["a"], fisher[-1]["a"])  # the last step is unpropagated


def test_last_block_without_update_gives_the_same_embeddings_and_leaves_m():
    records = random_records(seed=5)
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


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("split", [[6], [2, 4], [1, 2, 3]])
def test_momentum_blocks_match_the_step_by_step_recursion(nesterov, split):
    records = momentum_records(seed=7, nesterov=nesterov)
    got, _ = blocked(records, AccumulatorLayout.PER_LAYER, split)
    expected, _ = stepwise(records, AccumulatorLayout.PER_LAYER)
    assert_embeddings_close(got, expected, ORDER)


def test_float32_blocks_stay_within_round_off_of_float64():
    records = random_records(seed=8, batches=[16] * 12, layers={"a": 64})
    as32 = [dataclasses.replace(r, grads={n: g.float() for n, g in r.grads.items()}) for r in records]
    recursion = BackwardRecursion(["a"], AccumulatorLayout.PER_LAYER)
    got = torch.cat([e["a"] for e in recursion.block(as32[::-1])])
    exact = BackwardRecursion(["a"], AccumulatorLayout.PER_LAYER)
    expected = torch.cat([exact.step(r)["a"] for r in records[::-1]])
    assert got.dtype == torch.float32
    assert float((got.double() - expected).norm() / expected.norm()) < 1e-5
