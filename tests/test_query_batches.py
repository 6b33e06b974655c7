"""Queries on test batches that ``training_step`` reorders or filters in place, as it may do to training batches
(training reads the ids at the step's end). Oracle: each test point queried alone, where order cannot matter."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F

from lightning_dve import DataValueEmbedding, DataValueEmbeddings
from lightning_dve.errors import ConfigError, LossReductionError


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


def test_rows_that_ids_cannot_match_back_are_refused() -> None:
    """A step that repeats rows, or a test batch with one id twice that the step reorders: index_copy_ would
    drop or misfile rows silently."""
    from lightning_dve.batches import align_test_rows

    rows = {"a": torch.arange(6.0).reshape(3, 2)}
    given = {"x": torch.zeros(2, 4), "index": torch.tensor([5, 7])}
    with pytest.raises(ConfigError, match="do not match the rows back"):
        align_test_rows(rows, given, {"x": torch.zeros(3, 4), "index": torch.tensor([5, 5, 7])}, "index")
    twice = {"x": torch.zeros(3, 4), "index": torch.tensor([5, 5, 7])}
    with pytest.raises(ConfigError, match="do not match the rows back"):
        align_test_rows(rows, twice, {"x": torch.zeros(3, 4), "index": torch.tensor([7, 5, 5])}, "index")
    with pytest.raises(ConfigError, match="do not match the rows back"):  # which 5 was dropped?
        align_test_rows({"a": rows["a"][:2]}, twice, {"x": torch.zeros(2, 4), "index": torch.tensor([7, 5])}, "index")
    moved = align_test_rows(rows, {**twice, "index": torch.tensor([5, 6, 7])},
                            {"x": torch.zeros(3, 4), "index": torch.tensor([7, 5, 6])}, "index")
    torch.testing.assert_close(moved["a"], rows["a"][[1, 2, 0]])


def test_a_store_recorded_with_a_sample_ids_callable_takes_it_again_at_load(
        mlp_cls: type, fit: Callable, tmp_path: Path, test_batch: dict[str, torch.Tensor]) -> None:
    """A callable is not saved: after ``load`` a sorting step's rows are matched through ``load(sample_ids=)``,
    and a filtering step without it is refused naming that fix (before: 'include the id key', already there)."""
    ids = lambda batch: batch["index"]  # noqa: E731
    for name, module_cls in (("sorting", _sorting(mlp_cls)), ("filtering", _filtering(mlp_cls))):
        model, dve = module_cls(), DataValueEmbedding(tmp_path / name, projection_dim=None, report=None, sample_ids=ids)
        fit(model, dve)
        if name == "sorting":
            for emb in (dve.embeddings, DataValueEmbeddings.load(tmp_path / name, sample_ids=ids)):  # after fit too
                torch.testing.assert_close(emb.influence(model, test_batch, per_step=True).scores,
                                           _alone(emb, model, test_batch), rtol=1e-5, atol=1e-7)
            continue
        with pytest.raises(ConfigError, match=r"load\(\.\.\., sample_ids=\) the callback's sample_ids"):
            DataValueEmbeddings.load(tmp_path / name).influence(model, test_batch)


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


def _mining_sum(mlp_cls: type, share: int = 2) -> type:
    """Online hard-example mining: keeps the hardest 1/``share`` of its batch in place and returns their SUM."""
    class MiningSum(mlp_cls):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            with torch.no_grad():
                per = F.cross_entropy(self(batch["x"]), batch["y"], reduction="none")
            keep = per.topk((len(per) + share - 1) // share).indices
            for key in list(batch):
                batch[key] = batch[key][keep]
            return F.cross_entropy(self(batch["x"]), batch["y"], reduction="sum")
    return MiningSum


@pytest.mark.parametrize("declared, refused, share", [("mean", True, 2), ("sum", False, 2), ("mean", True, 4)])
def test_a_step_that_filters_is_checked_on_a_group_it_keeps_two_of(
        mlp_cls: type, fit: Callable, tmp_path: Path, test_batch: dict[str, torch.Tensor], declared: str,
        refused: bool, share: int) -> None:
    """Each pair keeps one sample, which tests no reduction: the check takes the first four (two kept, found by
    their ids). A sum declared as the default mean, 8x too large in the recording, was not refused anywhere by
    a version of session 30 that skipped such pairs; a correct declaration passes (before that version it was
    refused: the pair was compared with a dropped sample's loss)."""
    model = _mining_sum(mlp_cls, share)(lr=0.01)
    dve = DataValueEmbedding(tmp_path / "dve", projection_dim=None, report=None, loss_reduction=declared)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(model, dve)
    said = [str(w.message) for w in caught if "loss reduction" in str(w.message) or "loss_reduction" in str(w.message)]
    if not refused:
        assert not said, said
        dve.embeddings.influence(model, test_batch)
        return
    group = 2 * share  # the first group of which it keeps two
    assert any(f"on the batch's first {group} samples (the 2 it keeps)" in m for m in said), said
    with pytest.raises(LossReductionError, match=rf"first {group} samples \(the 2 it keeps\) it gives"):
        dve.embeddings.influence(model, test_batch)


def test_a_step_sorting_by_its_weights_is_not_refused_without_ids(
        mlp_cls: type, fit: Callable, tmp_path: Path, test_batch: dict[str, torch.Tensor]) -> None:
    """Samples weighted in the loss (a token mean: weight = token count) and sorted by that weight in the step (as
    ``pack_padded_sequence(enforce_sorted=True)`` needs), declared correctly: without ids the check compared the
    sorted batch's weights with the samples' in the caller's order and refused the recording (before session 30)."""
    class SortedByWeight(mlp_cls):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            order = torch.argsort(batch["w"], descending=True, stable=True)
            for key in list(batch):
                batch[key] = batch[key][order]
            per = F.cross_entropy(self(batch["x"]), batch["y"], reduction="none")
            return (batch["w"] * per).sum() / batch["w"].sum()

    def weighted(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {**batch, "w": 1.0 + batch["x"].sum(dim=-1) % 5}

    from torch.utils.data import DataLoader

    from tests.conftest import DigitsDict
    model = SortedByWeight()
    dve = DataValueEmbedding(tmp_path / "dve", projection_dim=None, report=None,
                             loss_reduction=lambda batch: batch["w"] / batch["w"].sum())
    fit(model, dve, DataLoader([weighted(item) for item in DigitsDict(range(64))], batch_size=16))
    rising = weighted(test_batch)
    rising = {k: v[torch.argsort(rising["w"])] for k, v in rising.items() if k != "index"}  # the step reverses it
    assert rising["w"][0] < rising["w"][1]
    assert dve.embeddings.influence(model, rising).scores.shape[0] == 12


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
    mixed = DataValueEmbedding(tmp_path / "mixed", projection_dim=100, report=None)  # only the first is projected
    fit(mlp_cls(hidden=8).double(), mixed, precision="64-true")
    assert mixed.embeddings.store.manifest["storage_dtype"] == "float16"
    double = {k: v.double() if v.is_floating_point() else v for k, v in test_batch.items()}
    scores = [emb.influence(model, double).scores for emb, model in runs.values()]
    torch.testing.assert_close(scores[0], scores[1], rtol=1e-12, atol=0)


def test_exact_influence_names_the_test_batch_where_training_step_fails_on_one_test_point(
        mlp_cls: type, fit: Callable, tmp_path: Path, test_batch: dict) -> None:
    """exact_influence takes each test point's loss from ``training_step`` on it alone; a step that fails on one
    sample there was reported as failing on 'a training batch the replay rebuilt', advising collate_fn= (a
    reviewer's finding): the message names the test batch and loss_fn=."""
    class SqueezesTheBatch(mlp_cls):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            if not self.training and len(batch["y"]) == 1:
                raise RuntimeError("shape mismatch after squeeze()")  # as x.squeeze() of a one-sample batch
            return super().training_step(batch, batch_idx)

    model = SqueezesTheBatch()
    dve = DataValueEmbedding(tmp_path / "dve", report=None)
    fit(model, dve)
    with pytest.raises(ConfigError, match=r"training_step failed on one sample of the test batch \(RuntimeError: "
                                          r"shape mismatch.*pass loss_fn"):
        dve.embeddings.exact_influence(model, test_batch)
    losses = dve.embeddings.exact_influence(model, test_batch,
                                            loss_fn=lambda m, b: F.cross_entropy(m(b["x"]), b["y"], reduction="none"))
    assert losses.scores.shape[0] == 12
