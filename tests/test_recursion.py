"""``BackwardRecursion`` against the explicit matrix product on random gradients (method.md §2).

Reference, with per-layer learning rates collected in a diagonal ``Lambda_k`` and the empirical Fisher
``H_k = sum_z w_{k,z} g_{k,z} g_{k,z}^T``: removing occurrence (t, z) moves ``theta_{t+1}`` by
``Lambda_t w_{t,z} g_{t,z}``, and each later step k maps a perturbation ``d`` to ``(I - Lambda_k H_k) d``, so

    e_{t,z} = [prod_{k=T-1 down to t+1} (I - Lambda_k H_k)] Lambda_t w_{t,z} g_{t,z}.

With one learning rate per accumulation group (``per_layer``, or ``full`` with equal rates) ``Lambda_t`` is a
scalar there and this is ``lr_t w [prod] g`` of method.md. ``per_layer`` applies the formula to each layer's
own coordinates (block-diagonal ``H``); ``full`` to all layers concatenated. Everything is float64.
"""

from __future__ import annotations

import pytest
import torch

from lightning_dve.config import AccumulatorLayout
from lightning_dve.recursion import BackwardRecursion
from lightning_dve.recursion_ranks import device_bytes
from lightning_dve.store import StepRecord

DTYPE = torch.float64
LAYERS = {"a": 5, "b": 3}
BATCHES = [3, 1, 4, 2, 5, 3]
PER_LAYER, FULL = AccumulatorLayout.PER_LAYER, AccumulatorLayout.FULL


def random_records(
    batches: list[int] = BATCHES, layers: dict[str, int] = LAYERS, seed: int = 0, equal_lrs: bool = False
) -> list[StepRecord]:
    """Steps 0..T-1 with varying batch sizes, weights (mean, sum, custom incl. 0) and per-layer rates."""
    gen = torch.Generator().manual_seed(seed)
    records = []
    next_id = 0
    for step, batch in enumerate(batches):
        kind = step % 3
        if kind == 0:
            weights = torch.full((batch,), 1.0 / batch, dtype=DTYPE)
        elif kind == 1:
            weights = torch.ones(batch, dtype=DTYPE)
        else:
            weights = 0.2 + torch.rand(batch, generator=gen, dtype=DTYPE)
            weights[0] = 0.0
        base = 0.02 + 0.08 * torch.rand((), generator=gen, dtype=DTYPE).item()
        lrs = torch.tensor(
            [base if equal_lrs else base * (1.0 + 0.7 * i) for i in range(len(layers))], dtype=DTYPE
        )
        grads = {name: torch.randn(batch, dim, generator=gen, dtype=DTYPE) for name, dim in layers.items()}
        ids = torch.arange(next_id, next_id + batch, dtype=torch.int64)
        next_id += batch
        records.append(StepRecord(step, ids, weights, lrs, grads))
    return records


def run_package(records: list[StepRecord], layout, names: list[str] | None = None) -> list[dict[str, torch.Tensor]]:
    """Feed the records from the last step to the first; return the embeddings indexed by step."""
    names = list(records[0].grads) if names is None else names
    recursion = BackwardRecursion(names, layout)
    out: list[dict[str, torch.Tensor]] = [{} for _ in records]
    for record in reversed(records):
        out[record.step] = recursion.step(record)
    return out


def _concat(record: StepRecord, group: list[str]) -> torch.Tensor:
    return torch.cat([record.grads[n] for n in group], dim=1)


def _lambda(record: StepRecord, group: list[str], order: list[str]) -> torch.Tensor:
    lr_of = dict(zip(order, record.lrs.tolist()))
    return torch.diag(torch.cat([torch.full((record.grads[n].shape[1],), lr_of[n], dtype=DTYPE) for n in group]))


def reference(records: list[StepRecord], layout, order: list[str] | None = None) -> list[dict[str, torch.Tensor]]:
    """Explicit products ``[prod_{k=T-1..t+1} (I - Lambda_k H_k)] Lambda_t w g`` per accumulation group."""
    order = list(records[0].grads) if order is None else order
    groups = [list(order)] if layout is FULL else [[n] for n in order]
    out: list[dict[str, torch.Tensor]] = [{} for _ in records]
    for group in groups:
        dims = [records[0].grads[n].shape[1] for n in group]
        eye = torch.eye(sum(dims), dtype=DTYPE)
        factors = []
        for record in records:
            g = _concat(record, group)
            hessian = g.T @ torch.diag(record.weights) @ g
            factors.append(eye - _lambda(record, group, order) @ hessian)
        for t, record in enumerate(records):
            product = eye.clone()
            for k in range(len(records) - 1, t, -1):
                product = product @ factors[k]
            g = _concat(record, group)
            e = (product @ _lambda(record, group, order) @ (record.weights.unsqueeze(1) * g).T).T
            out[t].update(zip(group, e.split(dims, dim=1)))
    return out


def transposed_recursion(records: list[StepRecord], order: list[str]) -> list[dict[str, torch.Tensor]]:
    """The known bug: ``e = s - g^T M`` (i.e. ``M^T s``) instead of ``s - M s``, full layout."""
    dims = [records[0].grads[n].shape[1] for n in order]
    m = torch.zeros(sum(dims), sum(dims), dtype=DTYPE)
    out: list[dict[str, torch.Tensor]] = [{} for _ in records]
    for record in reversed(records):
        g = _concat(record, order)
        lam = torch.diag(_lambda(record, order, order))
        s = g * lam * record.weights.unsqueeze(1)
        e = s - s @ m  # row form of M^T s: the wrong orientation
        m = m + e.T @ g
        out[record.step] = dict(zip(order, e.split(dims, dim=1)))
    return out


def flat(embeddings: list[dict[str, torch.Tensor]], order: list[str]) -> torch.Tensor:
    return torch.cat([torch.cat([step[n] for n in order], dim=1) for step in embeddings], dim=0)


def assert_embeddings_close(got, expected, order: list[str]) -> None:
    assert len(got) == len(expected)
    for t, (g_step, e_step) in enumerate(zip(got, expected)):
        assert set(g_step) == set(e_step), t
        for name in order:
            assert g_step[name].dtype == DTYPE
            torch.testing.assert_close(g_step[name], e_step[name], atol=1e-10, rtol=1e-10, msg=f"step {t} {name}")


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# --- agreement with the explicit product ---------------------------------------------------------------


@pytest.mark.parametrize("layout", [PER_LAYER, FULL])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_explicit_product(layout, seed):
    records = random_records(seed=seed)
    assert_embeddings_close(run_package(records, layout), reference(records, layout), list(LAYERS))


@pytest.mark.parametrize("layout", [PER_LAYER, FULL])
def test_single_step_is_lr_times_weight_times_gradient(layout):
    records = random_records(batches=[4], seed=3)
    (record,) = records
    got = run_package(records, layout)[0]
    for i, name in enumerate(LAYERS):
        expected = record.lrs[i] * record.weights.unsqueeze(1) * record.grads[name]
        torch.testing.assert_close(got[name], expected, atol=1e-15, rtol=0)


@pytest.mark.parametrize("layout", [PER_LAYER, FULL])
def test_last_step_is_unpropagated_and_earlier_steps_are_not(layout):
    records = random_records(seed=4)
    got = run_package(records, layout)
    last = records[-1]
    for i, name in enumerate(LAYERS):
        torch.testing.assert_close(got[-1][name], last.lrs[i] * last.weights.unsqueeze(1) * last.grads[name],
                                   atol=1e-15, rtol=0)
        first = records[0]
        plain = first.lrs[i] * first.weights.unsqueeze(1) * first.grads[name]
        assert relative_difference(got[0][name], plain) > 1e-2


def test_zero_weight_sample_gets_zero_embedding_and_does_not_enter_curvature():
    records = random_records(seed=5)
    step = next(r for r in records if (r.weights == 0).any())
    got = run_package(records, FULL)
    zero = (step.weights == 0).nonzero()[0, 0]
    for name in LAYERS:
        assert torch.equal(got[step.step][name][zero], torch.zeros(LAYERS[name], dtype=DTYPE))
    # changing that sample's gradient changes nothing anywhere
    altered = [
        StepRecord(r.step, r.sample_ids, r.weights, r.lrs,
                   {n: (g.clone().index_fill_(0, zero, 123.0) if r is step else g) for n, g in r.grads.items()})
        for r in records
    ]
    assert_embeddings_close(run_package(altered, FULL), got, list(LAYERS))


def test_full_layout_with_one_layer_equals_per_layer():
    records = random_records(layers={"only": 6}, seed=6)
    assert_embeddings_close(run_package(records, FULL), run_package(records, PER_LAYER), ["only"])


def test_layer_order_follows_the_names_not_the_dict():
    """``lrs`` are in manifest order; a grads dict in another order must not swap the rates."""
    records = random_records(seed=7)
    shuffled = [StepRecord(r.step, r.sample_ids, r.weights, r.lrs, {"b": r.grads["b"], "a": r.grads["a"]})
                for r in records]
    for layout in (PER_LAYER, FULL):
        assert_embeddings_close(run_package(shuffled, layout, names=["a", "b"]), reference(records, layout),
                                list(LAYERS))


def test_owned_groups_match_the_full_run():
    """A rank that owns only some layers' groups gets exactly those layers' embeddings."""
    records = random_records(seed=8)
    recursion = BackwardRecursion(list(LAYERS), PER_LAYER, owned=["b"])
    expected = reference(records, PER_LAYER)
    for record in reversed(records):
        got = recursion.step(record)
        assert list(got) == ["b"]
        torch.testing.assert_close(got["b"], expected[record.step]["b"], atol=1e-10, rtol=1e-10)


# --- the test has teeth: plausible bugs give clearly different answers ---------------------------------


def test_transposed_accumulator_is_detected():
    records = random_records(seed=9, equal_lrs=True)
    order = list(LAYERS)
    right = flat(reference(records, FULL), order)
    wrong = flat(transposed_recursion(records, order), order)
    package = flat(run_package(records, FULL), order)
    assert relative_difference(wrong, right) > 1e-3  # orders of magnitude above the 1e-10 tolerance
    assert relative_difference(package, wrong) > 1e-3
    torch.testing.assert_close(package, right, atol=1e-10, rtol=1e-10)


def test_product_order_matters():
    """Multiplying the step factors in the opposite order (t+1 leftmost) is a different, wrong, answer."""
    records = random_records(seed=10, equal_lrs=True)
    order = list(LAYERS)
    right = reference(records, FULL)
    eye = torch.eye(sum(LAYERS.values()), dtype=DTYPE)
    wrong = []
    for t, record in enumerate(records):
        product = eye.clone()
        for k in range(t + 1, len(records)):
            g = _concat(records[k], order)
            product = product @ (eye - records[k].lrs[0] * g.T @ torch.diag(records[k].weights) @ g)
        e = record.lrs[0] * (product @ (record.weights.unsqueeze(1) * _concat(record, order)).T).T
        wrong.append(dict(zip(order, e.split(list(LAYERS.values()), dim=1))))
    assert relative_difference(flat(wrong, order), flat(right, order)) > 1e-3
    torch.testing.assert_close(flat(run_package(records, FULL), order), flat(right, order), atol=1e-10, rtol=1e-10)


def test_per_layer_differs_from_full_when_layers_are_coupled():
    records = random_records(seed=11)
    order = list(LAYERS)
    per_layer = flat(run_package(records, PER_LAYER), order)
    full = flat(run_package(records, FULL), order)
    assert relative_difference(per_layer, full) > 1e-3


def test_per_layer_equals_full_when_curvature_is_block_diagonal():
    """If every sample's gradient lives in one layer only, H has no cross-layer block and the layouts agree."""
    records = random_records(seed=12)
    decoupled = []
    for r in records:
        mask = (torch.arange(r.weights.shape[0]) % 2 == 0).to(DTYPE).unsqueeze(1)
        decoupled.append(StepRecord(r.step, r.sample_ids, r.weights, r.lrs,
                                    {"a": r.grads["a"] * mask, "b": r.grads["b"] * (1 - mask)}))
    assert_embeddings_close(run_package(decoupled, PER_LAYER), run_package(decoupled, FULL), list(LAYERS))


def test_full_layout_applies_per_layer_rates_inside_the_product():
    """With different rates per layer, ``Lambda_t`` does not commute with the product: it must act first."""
    records = random_records(seed=13)
    order = list(LAYERS)
    package = flat(run_package(records, FULL), order)
    right = flat(reference(records, FULL), order)
    # the same formula with Lambda_t applied after the product (Lambda_t w [prod] g) is a different answer
    outside = torch.cat([_outside(records, t, order) for t in range(len(records))])
    assert relative_difference(outside, right) > 1e-3
    torch.testing.assert_close(package, right, atol=1e-10, rtol=1e-10)


def _outside(records: list[StepRecord], t: int, order: list[str]) -> torch.Tensor:
    eye = torch.eye(sum(LAYERS.values()), dtype=DTYPE)
    product = eye.clone()
    for k in range(len(records) - 1, t, -1):
        g = _concat(records[k], order)
        product = product @ (eye - _lambda(records[k], order, order) @ g.T @ torch.diag(records[k].weights) @ g)
    record = records[t]
    return (_lambda(record, order, order) @ product @ (record.weights.unsqueeze(1) * _concat(record, order)).T).T


def test_string_layout_is_honoured():
    """``AccumulatorLayout`` is a str enum; passing its value ``"full"`` must not silently run per-layer."""
    records = random_records(seed=14)
    assert_embeddings_close(run_package(records, "full"), run_package(records, FULL), list(LAYERS))


def test_device_memory_estimate_counts_eight_squared_widths_per_owned_group() -> None:
    """``device_bytes``: eight ``[m, m]`` matrices (``m``: the group's width, at least a block's rows) per group of
    the owned layers, in the accumulation dtype."""
    dims = {"a": 300, "b": 400}
    assert device_bytes(["a", "b"], AccumulatorLayout.FULL, ["a", "b"], dims, torch.float32, 1) == 8 * 700**2 * 4
    assert device_bytes(["a", "b"], AccumulatorLayout.PER_LAYER, ["a"], dims, torch.float64, 1) == 8 * 300**2 * 8
    assert device_bytes(["a"], AccumulatorLayout.PER_LAYER, ["a"], {"a": 3}, torch.float32, 1) == 8 * 256**2 * 4


def test_a_record_moves_what_the_recursion_computes_with_and_keeps_ids_rates_and_terms_on_the_cpu() -> None:
    """``StepRecord.to`` (the train-end recursion on a GPU): weights, every kind of rows and the per-coordinate
    vectors go to the device ("meta" stands in for a GPU here); sample ids, rates and optimizer terms stay."""
    rows = {"a": torch.ones(2, 3)}
    record = StepRecord(4, torch.tensor([7, 8]), torch.full((2,), 0.5, dtype=torch.float64),
                        torch.tensor([0.1], dtype=torch.float64), rows, 1, {"momentum": torch.tensor([0.9])},
                        curvature=rows, preconditioned=rows, curvature_preconditioned=rows,
                        vectors={"kappa": {"a": torch.ones(3)}}, applied_lrs=torch.tensor([0.1]))
    moved = record.to(torch.device("meta"))
    assert moved.weights.is_meta and moved.vectors["kappa"]["a"].is_meta
    assert all(getattr(moved, field)["a"].is_meta
               for field in ("grads", "curvature", "preconditioned", "curvature_preconditioned"))
    assert not any(t.is_meta for t in (moved.sample_ids, moved.lrs, moved.optim["momentum"], moved.applied_lrs))
    assert (moved.step, moved.epoch) == (4, 1) and not record.weights.is_meta  # the record itself is unchanged
