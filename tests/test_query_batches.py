"""Queries on test batches that ``training_step`` reorders or filters in place, as it may do to training batches
(training reads the ids at the step's end). Oracle: each test point queried alone, where order cannot matter."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from lightning_dve import DataValueEmbedding, DataValueEmbeddings
from lightning_dve.errors import ConfigError


def _sorting(mlp_cls: type) -> type:
    class Sorting(mlp_cls):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            order = torch.argsort(batch["y"], stable=True)
            for key in ("x", "y", "index"):
                batch[key] = batch[key][order]
            return self.loss(batch)
    return Sorting


def _filtering(mlp_cls: type, by_index: bool = False) -> type:
    """Drops the samples of label 1 (or, ``by_index``, of an index divisible by 3) from its batch."""
    class Filtering(mlp_cls):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            keep = batch["index"] % 3 != 0 if by_index else batch["y"] != 1
            for key in [key for key in ("x", "y", "index") if key in batch]:
                batch[key] = batch[key][keep]
            return self.loss(batch)
    return Filtering


def _alone(emb: DataValueEmbeddings, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([emb.influence(model, {k: v[i:i + 1] for k, v in batch.items()}, per_step=True).scores
                      for i in range(len(batch["y"]))])


@pytest.mark.parametrize("load", [False, True], ids=["after_fit", "after_load"])
def test_a_step_that_sorts_its_batch_gives_rows_in_the_test_batchs_order(
        mlp_cls: type, fit: Callable, tmp_path: Path, test_batch: dict[str, torch.Tensor], load: bool) -> None:
    model, dve = _sorting(mlp_cls)(), DataValueEmbedding(tmp_path / "dve", projection_dim=None, report=None)
    fit(model, dve)
    emb = DataValueEmbeddings.load(tmp_path / "dve") if load else dve.embeddings
    assert not torch.equal(torch.argsort(test_batch["y"], stable=True), torch.arange(12))  # the step reorders it
    torch.testing.assert_close(emb.influence(model, test_batch, per_step=True).scores, _alone(emb, model, test_batch),
                               rtol=1e-5, atol=1e-7)


def test_test_points_a_step_drops_score_zero_in_their_places_with_a_warning(
        mlp_cls: type, fit: Callable, tmp_path: Path, test_batch: dict[str, torch.Tensor]) -> None:
    model, dve = _filtering(mlp_cls)(), DataValueEmbedding(tmp_path / "dve", projection_dim=None, report=None)
    fit(model, dve)
    kept = test_batch["y"] != 1
    with pytest.warns(UserWarning, match="dropped 3 of the test batch's 12 samples"):
        scores = dve.embeddings.influence(model, test_batch, per_step=True).scores
    assert bool((scores[~kept] == 0).all())
    torch.testing.assert_close(scores[kept], _alone(dve.embeddings, model, {k: v[kept] for k, v in test_batch.items()}),
                               rtol=1e-5, atol=1e-7)
    exact = dve.embeddings.exact_influence(model, test_batch, per_step=True).scores  # its 0s are in the same places
    assert bool((exact[~kept] == 0).all()) and bool((exact[kept] != 0).any())
    with pytest.raises(ConfigError, match="kept 9 of the test batch's 12 samples"):
        dve.embeddings.influence(model, {k: v for k, v in test_batch.items() if k != "index"})
    with pytest.raises(ConfigError, match="do not match the rows back"):
        dve.embeddings.influence(model, dict(test_batch, index=test_batch["index"] % 2))


def test_a_step_that_drops_one_of_the_last_batchs_first_two_samples_keeps_the_report(
        mlp_cls: type, fit: Callable, tmp_path: Path, test_batch: dict[str, torch.Tensor]) -> None:
    """The train-end reduction check on a pair the step filters compared the pair's loss with a dropped
    sample's: it refused a correct recording and skipped the report (the last batch starts 48, 49: 48 is dropped)."""
    model = _filtering(mlp_cls, by_index=True)()
    dve = DataValueEmbedding(tmp_path / "dve", projection_dim=None, reference=test_batch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(model, dve)
    assert not [w for w in caught if "report" in str(w.message)], [str(w.message) for w in caught]
    assert (tmp_path / "dve" / "report").is_dir()


def test_rows_no_layer_projects_are_stored_in_the_training_dtype(mlp_cls: type, fit: Callable,
                                                                  tmp_path: Path, test_batch: Any) -> None:
    """``storage_dtype="auto"`` stored float16 for a model whose layers all fit in ``projection_dim`` (exact rows)."""
    runs = {}
    for name, dim in (("default", 1024), ("exact", None)):
        model = mlp_cls(hidden=8).double()
        dve = DataValueEmbedding(tmp_path / name, projection_dim=dim, report=None)
        fit(model, dve, precision="64-true")
        runs[name] = dve.embeddings, model
    assert runs["default"][0].store.manifest["storage_dtype"] == "float64"
    double = {k: v.double() if v.is_floating_point() else v for k, v in test_batch.items()}
    scores = [emb.influence(model, double).scores for emb, model in runs.values()]
    torch.testing.assert_close(scores[0], scores[1], rtol=1e-12, atol=0)
