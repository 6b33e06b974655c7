"""The patches of ``benchmarks/adam_lag.py`` do what its table says (README, "Projection keeps ..."): in projected
mode with no side projected, the per-coordinate preconditioner of the recorded ``v_t`` gives the rows exact mode
preconditions with (its ``precond`` vector, ``P_t``), the lagged exact mode uses ``P_{t-1}``, and the patches leave
the training itself unchanged."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


pytestmark = pytest.mark.slow  # four fits of the fidelity problem's MLP (~7 s)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """``(adam_lag, exact run, its second moments, percoord-of-v_t run, percoord-of-v_{t-1} run, lagged exact run)``
    on the fidelity problem's ``mlp`` with AdamW, one epoch (12 steps), stores in float64."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import adam_lag
    finally:
        sys.path.remove(str(BENCHMARKS))
    epochs = adam_lag.F.EPOCHS
    adam_lag.F.EPOCHS = 1
    try:
        problem = adam_lag.F.Problem("mlp", "adamw", adam_lag.F.SETTINGS["adamw"], 4, 2,
                                     str(tmp_path_factory.mktemp("adam_lag")))
        moments = adam_lag.SecondMoments()
        exact = adam_lag.fit(problem, [moments], projection_dim=None)
        out = [adam_lag, exact, moments]
        for source in ("next", "prev"):
            with adam_lag.preconditioner("percoord", source, moments.v_hat):
                out.append(adam_lag.fit(problem, [], projection_dim=4096, storage_dtype="float64"))
        with adam_lag.lagged_exact_mode():
            out.append(adam_lag.fit(problem, [], projection_dim=None))
    finally:
        adam_lag.F.EPOCHS = epochs
    return out


def test_percoord_of_the_recorded_v_t_preconditions_as_exact_mode(runs) -> None:
    adam_lag, (_, exact, _), moments, (_, next_run, _), (_, prev_run, _), _ = runs
    store, next_store, prev_store = (run.embeddings.store for run in (exact, next_run, prev_run))
    assert store.steps == next_store.steps == list(range(12))
    for step in store.steps[1:]:  # the first step has no v before it: left as shipped (ones, mean P in the rate)
        record, patched, lagged = store.read_step(step), next_store.read_step(step), prev_store.read_step(step)
        for name, grads in record.grads.items():
            p_t = record.vectors["precond"][name]
            torch.testing.assert_close(adam_lag.adam._preconditioner(moments.v_hat[(name, step + 1)], 1e-8).flatten(),
                                       p_t)
            torch.testing.assert_close(patched.preconditioned[name], grads * p_t)
            p_before = adam_lag.adam._preconditioner(moments.v_hat[(name, step)], 1e-8).flatten()
            torch.testing.assert_close(lagged.preconditioned[name], grads * p_before)
            assert not torch.allclose(p_before, p_t)


def test_the_lagged_exact_mode_uses_the_second_moment_before_the_step_and_training_is_unchanged(runs) -> None:
    adam_lag, (module, exact, _), moments, (next_module, _, _), (prev_module, _, _), (lag_module, lagged, _) = runs
    store, lagged_store = exact.embeddings.store, lagged.embeddings.store
    for step in store.steps[1:]:
        for name, vector in lagged_store.read_step(step).vectors["precond"].items():
            expected = adam_lag.adam._preconditioner(moments.v_hat[(name, step)], 1e-8).flatten()
            torch.testing.assert_close(vector, expected)
    for other in (next_module, prev_module, lag_module):
        trained = dict(other.named_parameters())
        assert all(torch.equal(p, trained[n]) for n, p in module.named_parameters())
