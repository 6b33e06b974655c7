"""Unit tests of lightning_dve.samples (finding and rendering top-k samples) and figures.image_array."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_dve import samples
from lightning_dve.figures import image_array


def test_row_indexes_tensors_arrays_and_string_lists_of_the_batch_size():
    batch = {"x": torch.arange(6).reshape(3, 2), "text": ["a", "b", "c"], "scale": 2.0, "n": np.arange(3),
             "pair": (torch.tensor([7, 8, 9]), "tag")}
    one = samples.row(batch, 1, 3)
    assert one["x"].tolist() == [2, 3] and one["text"] == "b" and one["scale"] == 2.0 and one["n"] == 1
    assert one["pair"][0].item() == 8 and one["pair"][1] == "tag"


def test_view_reads_label_image_and_summary_from_a_dict_sample():
    sample = {"x": torch.rand(1, 8, 8), "y": torch.tensor(4), "index": torch.tensor(12)}
    view = samples.view(sample, None)
    assert view.label == "4"
    assert view.image is not None and view.image.shape == (8, 8) and view.image.dtype == np.uint8
    assert view.text.startswith("float32[1x8x8] mean")
    assert samples.view(sample, lambda s: f"digit {int(s['y'])}").text == "digit 4"


def test_view_of_tuple_samples_tokens_and_text():
    tokens = samples.view((torch.tensor([5, 6, 7]), torch.tensor(1)), None)
    assert tokens.label == "1" and tokens.image is None and tokens.text == "int64[3]: 5 6 7"
    text = samples.view({"text": "x" * 200, "label": "spam"}, None)
    assert text.label == "spam" and len(text.text) == 120 and text.text.endswith("...")
    flat = samples.view({"x": torch.zeros(64)}, None)
    assert flat.label is None and flat.image is None and flat.text.startswith("float32[64]")


def test_image_array_accepts_only_image_shapes():
    assert image_array(torch.rand(8, 8)).shape == (8, 8)
    assert image_array(torch.rand(3, 8, 8)).shape == (8, 8, 3)
    assert image_array(torch.rand(8, 8, 4)).shape == (8, 8, 4)
    assert image_array(torch.rand(64)) is None
    assert image_array(torch.rand(2, 2)) is None
    assert image_array(torch.ones(8, 8, dtype=torch.long)) is None
    constant = image_array(torch.full((4, 4), 0.5))
    assert constant is not None and (constant == 0).all()


def test_find_samples_with_a_callable_id_and_tuple_batches():
    data = TensorDataset(torch.rand(10, 4), torch.arange(10) % 3, torch.arange(100, 110))
    loader = DataLoader(data, batch_size=4)
    found = samples.find_samples(loader, {101, 108, 999}, lambda batch: batch[2], None, max_batches=10,
                                 show_progress=False)
    assert set(found) == {101, 108}  # 999 is not in the data
    assert found[108].label == "2"
    assert samples.find_samples(loader, {101}, "index", None, 10, False) == {}  # ids unreadable: nothing found
    assert samples.find_samples(loader, {108}, lambda batch: batch[2], None, max_batches=2, show_progress=False) == {}


def test_unsharded_replaces_a_distributed_sampler_by_the_whole_dataset():
    data = TensorDataset(torch.arange(10))
    sharded = DataLoader(data, batch_size=4, sampler=DistributedSampler(data, num_replicas=2, rank=0, shuffle=False))
    assert sum(len(b[0]) for b in sharded) == 5
    whole = samples.unsharded(sharded)
    assert [b[0].tolist() for b in whole] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    plain = DataLoader(data, batch_size=4)
    assert samples.unsharded(plain) is plain
