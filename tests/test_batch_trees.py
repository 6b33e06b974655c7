"""Batches of other shapes than a dict of batched tensors: per-sample lists inside a batch, mappings that are not
dicts (``UserDict``, a tokenizer's ``BatchEncoding``), and a ``training_step`` that pops the id key.

The end-to-end runs are a real float64 ``fit`` of 48 digits (batch 16, 3 steps) with the batch in another form;
the oracle is the same run with plain dict batches, whose trajectory is bitwise the same.
"""

from __future__ import annotations

from collections import UserDict, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, default_collate

from lightning_dve import DataValueEmbedding
from lightning_dve.batch_trees import count_samples, split_batch, to_device
from tests.conftest import TinyMLP
from tests.helpers import DigitsDataset, DigitsMLP, EpochPermutationSampler, make_trainer, split_indices


def test_a_list_of_one_item_per_sample_is_split_by_sample_not_by_its_items_rows() -> None:
    """``{"seq": [tensor[L_i, 2], ...], "y": [n]}`` (a collate_fn keeping ragged sequences): the batch has n
    samples, not ``L_0``, and each one-sample batch holds one sequence; a list-valued field that
    ``default_collate`` batched (each item ``[n, ...]``) is still sliced item by item."""
    seqs = [torch.randn(length, 2) for length in (4, 2, 5)]
    for batch in ({"seq": seqs, "y": torch.arange(3)}, {"y": torch.arange(3), "seq": seqs}, {"seq": seqs}):
        assert count_samples(batch) == 3
        singles = split_batch(batch)
        assert [len(s["seq"]) for s in singles] == [1, 1, 1]
        assert all(s["seq"][0] is seq for s, seq in zip(singles, seqs))
    same_length = {"x": [torch.randn(5) for _ in range(3)], "y": torch.arange(3)}  # items' rows (5) are not n
    assert [s["x"][0] is x for s, x in zip(split_batch(same_length), same_length["x"])] == [True] * 3
    images, targets = [torch.randn(3, 5, 5) for _ in range(4)], [{"boxes": torch.rand(2, 4)} for _ in range(4)]
    assert count_samples((images, targets)) == 4  # a detection batch: the target dicts, not the channels
    assert [s[0][0] is image for s, image in zip(split_batch((images, targets)), images)] == [True] * 4
    views = default_collate([{"views": [torch.randn(2), torch.randn(2)]} for _ in range(3)])
    assert count_samples(views) == 3 and [v.shape for v in split_batch(views)[1]["views"]] == [(1, 2), (1, 2)]


class Encoding(UserDict):
    """A ``BatchEncoding``-like batch: a ``UserDict`` with attribute access to its keys."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self.data[name]
        except KeyError as err:
            raise AttributeError(name) from err


def test_mappings_that_are_not_dicts_are_moved_and_split_as_their_own_type() -> None:
    batch = Encoding({"x": torch.ones(3, 2, dtype=torch.float32), "y": torch.arange(3)})
    moved = to_device(batch, torch.device("cpu"), torch.float64)
    assert type(moved) is Encoding and moved.x.dtype == torch.float64 and batch.x.dtype == torch.float32
    assert [type(s) for s in split_batch(batch)] == [Encoding] * 3 and torch.equal(split_batch(batch)[2].y,
                                                                                 torch.tensor([2]))
    counts = defaultdict(list, {"x": torch.ones(2, 1)})  # its constructor takes a factory first: a plain dict
    assert type(to_device(counts, None)) is dict and count_samples(counts) == 2


class ListDigits(DigitsMLP):
    """Reads ``batch["x"]`` as a list of per-sample ``[64]`` tensors."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self(torch.stack(list(batch["x"]))), batch["y"])


class PoppingDigits(DigitsMLP):
    """Removes the id key before the model, as ``self.model(**batch)`` code does."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        batch.pop("index")
        return super().training_step(batch, batch_idx)


class EncodingDigits(Dataset):
    """The digits with each item an :class:`Encoding` (``default_collate`` keeps the type)."""

    def __init__(self, digits: DigitsDataset) -> None:
        self.digits = digits

    def __len__(self) -> int:
        return len(self.digits)

    def __getitem__(self, i: int) -> Encoding:
        return Encoding(self.digits[i])


def _list_collate(items: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    return {"x": [item["x"] for item in items], "y": torch.stack([item["y"] for item in items]),
            "index": torch.stack([item["index"] for item in items])}


class WeightingDigits(DigitsMLP):
    """Writes each sample's loss weight into the batch (the README's recipe for weights known in the step)."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        losses = F.cross_entropy(self(batch["x"]), batch["y"], reduction="none")
        batch["loss_weights"] = torch.full_like(losses, 1.0 / len(losses))
        return (batch["loss_weights"] * losses).sum()


class FilteringDigits(DigitsMLP):
    """Drops the zeros from the batch in place, ids included, before the model."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        keep = batch["y"] != 0
        batch.update({key: batch[key][keep] for key in ("x", "y", "index")})
        return super().training_step(batch, batch_idx)


def _without_zeros(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The zeros dropped, unless there is nothing else (replay collates single items to read their ids)."""
    return default_collate([item for item in items if item["y"] != 0] or items)


def _run(root: Path, module: DigitsMLP, dataset: Dataset, collate: Callable | None, test: Any, **kwargs: Any) -> tuple:
    """Fit one epoch of 3 steps; the recorded ids and the test batch's ``influence`` and ``exact_influence``."""
    dve = DataValueEmbedding(root, projection_dim=None, checkpoint_interval=2, report=None, **kwargs)
    loader = DataLoader(dataset, batch_size=16, sampler=EpochPermutationSampler(len(dataset), 1), collate_fn=collate)
    make_trainer(1, callbacks=[dve]).fit(module, loader)
    result = dve.embeddings.influence(module, test)
    recorded = list(zip(result.steps.tolist(), result.sample_ids.tolist()))
    return recorded, result.scores, dve.embeddings.exact_influence(module, test).scores


FORMS = ["list of samples", "UserDict", "popped ids", "weights written by the step", "ids filtered by the step"]


@pytest.mark.parametrize("form", FORMS)
def test_batches_in_other_forms_record_and_score_as_dict_batches(tmp_path: Path, form: str) -> None:
    """Before: ``exact_influence`` on a per-sample list batch returned one row per item of the first sequence (64
    here), the fit of ``UserDict`` batches was refused ("not a dict"), and a ``training_step`` that pops the id key
    was refused with "batch has no key 'index'". The oracle is the run with dict batches (for the filtering step,
    with the zeros dropped by the loader's ``collate_fn``)."""
    train, test = split_indices(48, 5, seed=2)
    digits, held_out = DigitsDataset(train), DigitsDataset(test).batch()
    weights = {"loss_reduction": lambda batch: batch["loss_weights"]}
    module, dataset, collate, batch, kwargs = {
        "list of samples": (ListDigits(), digits, _list_collate, {**held_out, "x": list(held_out["x"])}, {}),
        "UserDict": (DigitsMLP(), EncodingDigits(digits), None, Encoding(held_out), {}),
        "popped ids": (PoppingDigits(), digits, None, held_out,  # a loss_reduction callable reading the popped key
                       {"loss_reduction": lambda batch: torch.full(batch["index"].shape, 1 / len(batch["index"]),
                                                                  dtype=torch.float64)}),
        "weights written by the step": (WeightingDigits(), digits, None, held_out, weights),
        "ids filtered by the step": (FilteringDigits(), digits, None, held_out, {}),
    }[form]
    oracle_collate = _without_zeros if form == "ids filtered by the step" else None
    if oracle_collate is not None:  # test points the step keeps (it would drop a zero from the query's pair check)
        batch = {key: value[held_out["y"] != 0] for key, value in held_out.items()}
    expected = _run(tmp_path / "dict", DigitsMLP(), digits, oracle_collate, batch if oracle_collate else held_out)
    recorded, scores, exact = _run(tmp_path / "other", module, dataset, collate, batch, **kwargs)
    assert recorded == expected[0] and scores.shape == exact.shape == expected[1].shape
    assert scores.shape == ((5, 48) if oracle_collate is None else (3, 45))  # three zeros among the 48
    torch.testing.assert_close(scores, expected[1], rtol=1e-12, atol=0)
    torch.testing.assert_close(exact, expected[2], rtol=1e-12, atol=0)


def test_a_float32_test_batch_is_converted_as_a_64_true_trainer_converted_training_batches(
    fit: Callable, tmp_path: Path, test_batch: dict
) -> None:
    """``precision="64-true"`` with float32 data: the Trainer converts each training batch to float64, and the
    report does too, but ``influence`` on the same float32 test batch failed in the model ("mat1 and mat2 must
    have the same dtype"). The store records the precision and queries convert as it did."""
    model, dve = TinyMLP(), DataValueEmbedding(tmp_path / "dve", projection_dim=16, report=None)
    fit(model, dve, precision="64-true")
    assert test_batch["x"].dtype == torch.float32 and dve.embeddings.store.manifest["precision"] == "64-true"
    converted = {key: value.double() if value.is_floating_point() else value for key, value in test_batch.items()}
    torch.testing.assert_close(dve.embeddings.influence(model, test_batch).scores,
                               dve.embeddings.influence(model, converted).scores, rtol=0, atol=0)
