"""Long runs and many test points: the report's per-epoch table and the queries' memory stay linear and bounded.

Memory checks run in a subprocess and compare its peak RSS (``ru_maxrss``) before and after the measured call,
with bounds several times what the code needs and far below what a quadratic or unstreamed form takes.
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from tests.conftest import DigitsDict, TinyMLP
from lightning_dve import DataValueEmbedding, DataValueEmbeddings, curves, influence
from lightning_dve.curves import InfluenceCurve


def _peak_growth_kib(script: str, *args: str) -> int:
    """Run ``script`` (which prints the growth of its peak RSS in KiB last) in a fresh interpreter."""
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def _reference_epoch_curve(curve: InfluenceCurve) -> dict[str, torch.Tensor]:
    """Per-epoch aggregates by one mask per epoch (the definition)."""
    epochs = torch.unique(curve.epochs)
    rows = [curve.epochs == epoch for epoch in epochs]
    return {"epochs": epochs,
            "first_steps": torch.stack([curve.steps[row].min() for row in rows]),
            "last_steps": torch.stack([curve.steps[row].max() for row in rows]),
            "influence": torch.stack([curve.influence[row].nanmean() for row in rows]),
            "influence_per_lr": torch.stack([curve.influence_per_lr[row].nanmean() for row in rows]),
            "total": torch.stack([torch.nansum(curve.influence[row] * curve.counts[row]) for row in rows])}


def test_epoch_curve_equals_per_epoch_masks_with_undefined_steps() -> None:
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        n = int(torch.randint(1, 50, (), generator=g))
        steps = torch.sort(torch.randperm(200, generator=g)[:n]).values
        epochs = torch.sort(torch.randint(0, 6, (n,), generator=g)).values + 3
        influence = torch.randn(n, dtype=torch.float64, generator=g)
        influence[torch.rand(n, generator=g) < 0.3] = math.nan  # steps without occurrences
        per_lr = influence / 0.1
        per_lr[torch.rand(n, generator=g) < 0.3] = math.nan  # lr == 0
        if trial == 0:
            influence[0], per_lr[:] = math.inf, math.nan  # an infinite step; an epoch with no defined value
        curve = InfluenceCurve(steps, epochs, torch.full((n,), 0.1, dtype=torch.float64),
                               torch.randint(0, 4, (n,), generator=g), influence, per_lr)
        got, expected = curves.epoch_curve(curve), _reference_epoch_curve(curve)
        for name, want in expected.items():
            value = getattr(got, name)
            assert value.dtype == want.dtype and value.shape == want.shape, name
            assert torch.allclose(value, want, rtol=1e-12, atol=0.0, equal_nan=True), (name, value, want)


SUMMARISE = textwrap.dedent('''
    import resource, sys, torch
    from lightning_dve import curves
    from lightning_dve.config import ReportConfig
    from lightning_dve.influence import InfluenceResult
    torch.set_num_threads(1)
    steps = int(sys.argv[1])  # one step per epoch (full-batch training), 2 samples a step
    result = InfluenceResult(torch.arange(2 * steps) % 64, torch.arange(steps).repeat_interleave(2),
                             torch.randn(1, 2 * steps, dtype=torch.float64))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    report = curves.summarise(result, list(range(steps)), list(range(steps)),
                              torch.full((steps,), 0.1, dtype=torch.float64), ReportConfig())
    assert report.epochs.epochs.numel() == steps and int(report.epochs.last_steps[-1]) == steps - 1
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
''')


def test_report_curves_of_a_run_of_many_short_epochs_stay_linear_in_memory() -> None:
    """20,000 one-step epochs: the report's curves hold a few [T] vectors (< 2 MB); one [T] mask per epoch, as
    ``epoch_curve`` built, is 400 MB (and T * E operations: the train-end report of a long run stalled)."""
    assert _peak_growth_kib(SUMMARISE, "20000") < 100 * 1024


def _fit_store(root: Path, fit: Callable, samples: int, batch_size: int, epochs: int, segments: int = 1) -> None:
    """Record TinyMLP on digits ``0..samples-1`` (shuffled) for ``epochs`` epochs into ``root``."""
    dve = DataValueEmbedding(root, projection_dim=64, segments=segments, report=None)
    fit(TinyMLP(), dve, DataLoader(DigitsDict(range(samples)), batch_size=batch_size, shuffle=True), max_epochs=epochs)


def test_streamed_query_equals_whole_query_in_any_chunking(fit: Callable, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Per-sample totals summed chunk by chunk (one step per chunk) equal the per-occurrence columns summed by sample,
    at the final model and at a segment boundary; per-step columns are the same in any chunking."""
    _fit_store(tmp_path / "dve", fit, samples=200, batch_size=20, epochs=2, segments=2)  # 20 steps, 2 segments
    emb = DataValueEmbeddings.load(tmp_path / "dve")
    g = {name: torch.randn(7, p.dim, generator=torch.Generator().manual_seed(1)) for name, p in emb.projections.items()}
    for boundary in [None, *range(len(emb.segment_boundaries) - 1)]:
        whole = emb.score(g, per_step=True, boundary=boundary)
        monkeypatch.setattr(influence, "CHUNK_BYTES", 1)  # one step per chunk
        per_step, totals = (emb.score(g, per_step=flag, boundary=boundary) for flag in (True, False))
        monkeypatch.undo()
        assert torch.equal(per_step.sample_ids, whole.sample_ids) and torch.equal(per_step.steps, whole.steps)
        torch.testing.assert_close(per_step.scores, whole.scores)
        ids, inverse = torch.unique(whole.sample_ids, return_inverse=True)
        expected = torch.zeros(7, ids.numel(), dtype=torch.float64).index_add_(1, inverse, whole.scores.double())
        assert torch.equal(totals.sample_ids, ids) and bool((totals.steps == -1).all())
        torch.testing.assert_close(totals.scores.double(), expected, rtol=1e-5, atol=1e-6)
        if boundary is not None:  # only the occurrences up to the boundary
            assert int(whole.steps.max()) == emb.segment_boundaries[boundary]


QUERY = textwrap.dedent('''
    import resource, sys, torch
    from lightning_dve import DataValueEmbeddings, influence
    torch.set_num_threads(1)
    influence.CHUNK_BYTES = 4 * 2**20
    emb = DataValueEmbeddings.load(sys.argv[1])
    n = int(sys.argv[2])
    g = {name: torch.randn(n, p.dim) for name, p in emb.projections.items()}
    emb.score({name: rows[:1] for name, rows in g.items()})  # warm up
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = emb.score(g, per_step=False)
    assert result.scores.shape == (n, 1500), result.scores.shape
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
''')


def test_per_sample_query_of_many_test_points_is_streamed(fit: Callable, tmp_path: Path) -> None:
    """8,000 test points against 6,000 occurrences: the result is [8000, 1500] (48 MB of float32) and each 4 MiB
    chunk of scores is summed into it, where the whole [8000, 6000] occurrence matrix (192 MB, twice while
    concatenated) was built first. Chunks are whole steps: batches of 100 keep one step's scores (3.2 MB) small
    against the bound (with batches of 500, 16 MB a step and its temporaries put the peak at 97-198 MB)."""
    _fit_store(tmp_path / "dve", fit, samples=1500, batch_size=100, epochs=4)  # 60 steps, 6000 occurrences
    assert _peak_growth_kib(QUERY, str(tmp_path / "dve"), "8000") < 120 * 1024
