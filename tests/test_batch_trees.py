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


def _run(root: Path, module: DigitsMLP, dataset: Dataset, collate: Callable | None, test: Any) -> tuple:
    """Fit one epoch of 3 steps; the test batch's ``influence`` and ``exact_influence`` scores."""
    dve = DataValueEmbedding(root, projection_dim=None, checkpoint_interval=2, report=None)
    loader = DataLoader(dataset, batch_size=16, sampler=EpochPermutationSampler(len(dataset), 1), collate_fn=collate)
    make_trainer(1, callbacks=[dve]).fit(module, loader)
    emb = dve.embeddings
    return emb.steps, emb.influence(module, test).scores, emb.exact_influence(module, test).scores


@pytest.mark.parametrize("form", ["list of samples", "UserDict", "popped ids"])
def test_batches_in_other_forms_record_and_score_as_dict_batches(tmp_path: Path, form: str) -> None:
    """Before: ``exact_influence`` on a per-sample list batch returned one row per item of the first sequence (64
    here), the fit of ``UserDict`` batches was refused ("not a dict"), and a ``training_step`` that pops the id key
    was refused with "batch has no key 'index'"."""
    train, test = split_indices(48, 5, seed=2)
    digits, held_out = DigitsDataset(train), DigitsDataset(test).batch()
    expected = _run(tmp_path / "dict", DigitsMLP(), digits, None, held_out)
    module, dataset, collate, batch = {
        "list of samples": (ListDigits(), digits, _list_collate, {**held_out, "x": list(held_out["x"])}),
        "UserDict": (DigitsMLP(), EncodingDigits(digits), None, Encoding(held_out)),
        "popped ids": (PoppingDigits(), digits, None, held_out),
    }[form]
    steps, scores, exact = _run(tmp_path / "other", module, dataset, collate, batch)
    assert steps == expected[0] and scores.shape == exact.shape == (5, 48)
    torch.testing.assert_close(scores, expected[1], rtol=1e-12, atol=0)
    torch.testing.assert_close(exact, expected[2], rtol=1e-12, atol=0)
