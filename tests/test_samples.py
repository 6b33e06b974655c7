"""Unit tests of lightning_dve.samples (finding and rendering top-k samples) and figures.image_array."""

from __future__ import annotations

import warnings

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


def test_row_keeps_tensors_whose_first_dimension_is_not_the_batch_size():
    batch = {"x": torch.arange(6).reshape(3, 2), "class_weights": torch.tensor([0.5, 2.0]), "mask": torch.ones(4, 3)}
    one = samples.row(batch, 1, 3)
    assert one["x"].tolist() == [2, 3]
    assert one["class_weights"].tolist() == [0.5, 2.0] and one["mask"].shape == (4, 3)  # not rows of the batch


def test_row_of_a_namedtuple_batch_is_that_namedtuple():
    from collections import namedtuple

    Sample = namedtuple("Sample", ["x", "y"])
    one = samples.row(Sample(torch.arange(6).reshape(3, 2), torch.tensor([4, 5, 6])), 2, 3)
    assert isinstance(one, Sample) and one.x.tolist() == [4, 5] and one.y.item() == 6


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
    assert samples.summarise_tensor(torch.arange(16)).endswith(": " + " ".join(map(str, range(16))))  # all shown
    assert samples.summarise_tensor(torch.arange(17)).endswith(" 15 ...")  # the 17th is cut
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
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no 0/0 on the way (NaN cast to uint8 is platform-defined)
        constant = image_array(torch.full((4, 4), 0.5))
    assert constant is not None and (constant == 0).all()



def test_uint8_pixels_are_an_image_as_they_are():
    """A ``uint8`` ``[C, H, W]`` input (``read_image``, ``PILToTensor``) is rendered as the image it is, not listed as
    16 token ids in the top-k tables; its pixel values are kept (no min-max stretch)."""
    pixels = torch.randint(10, 200, (3, 8, 8), dtype=torch.uint8)
    shown = samples.view({"x": pixels, "y": torch.tensor(2)}, None)
    assert shown.image is not None and shown.image.dtype == np.uint8
    assert np.array_equal(shown.image, pixels.permute(1, 2, 0).numpy())
    assert np.array_equal(image_array(pixels[:1]), pixels[0].numpy())  # one channel: [H, W]
    assert image_array(torch.ones(8, 8, dtype=torch.int32)) is None  # wider integers stay token ids

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


class _Keyed(torch.utils.data.Dataset):
    """Ten dict items ``{"x": [4], "y": id % 3, "index": id}`` for ids 100..109, at positions 0..9."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, position: int) -> dict[str, torch.Tensor]:
        return {"x": torch.full((4,), float(position)), "y": torch.tensor(position % 3),
                "index": torch.tensor(100 + position)}


class _Stream(torch.utils.data.IterableDataset):
    """The items of :class:`_Keyed` as a stream (no ``__getitem__``, no ``__len__``)."""

    def __iter__(self):
        return (_Keyed()[i] for i in range(10))


def test_unsharded_keeps_the_loaders_own_sampler_that_lightning_wrapped():
    """Under DDP Lightning wraps a loader's own sampler (here a subset of 10 of 30 samples) in a
    DistributedSamplerWrapper: rank 0's report must read what that sampler picks, as a single process does, not
    the whole dataset (it did: the reference became all 30 samples, the curves silently another reference's)."""
    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
    from torch.utils.data import SubsetRandomSampler

    data = TensorDataset(torch.arange(30))
    subset = list(range(0, 30, 3))
    wrapped = DistributedSamplerWrapper(SubsetRandomSampler(subset), num_replicas=2, rank=0, shuffle=False)
    loader = DataLoader(data, batch_size=4, sampler=wrapped, drop_last=True)
    seen = [int(v) for (batch,) in samples.unsharded(loader) for v in batch]
    assert len(seen) == 8 and set(seen) <= set(subset)  # 10 samples in batches of 4, the last partial one dropped
    full = DataLoader(data, batch_size=4, sampler=DistributedSamplerWrapper(SubsetRandomSampler(subset),
                                                                            num_replicas=2, rank=0))
    assert sorted(int(v) for (batch,) in samples.unsharded(full) for v in batch) == subset


def test_training_samples_reads_a_shuffled_dataset_at_the_ids_positions():
    """A shuffled loader (a new order on every pass) and ids that are not positions: each wanted id is read from
    the dataset at its position, however few batches the run used."""
    loader = DataLoader(_Keyed(), batch_size=2, shuffle=True, generator=torch.Generator().manual_seed(0))
    found = samples.training_samples(loader, {100, 104, 109, 999}, "index", None, max_batches=1,
                                     show_progress=False)
    assert set(found) == {100, 104, 109}  # 999 is not in the data
    assert [found[i].label for i in (100, 104, 109)] == ["0", "1", "0"]
    assert found[104].text.startswith("float32[4] mean 4")


class _OtherKeyed(_Keyed):
    """Like :class:`_Keyed` with ids 200..209."""

    def __getitem__(self, position: int) -> dict[str, torch.Tensor]:
        return {**super().__getitem__(position), "index": torch.tensor(200 + position)}


def test_training_samples_reads_every_one_of_several_training_loaders():
    """Loaders combined (a list, tuple or dict: a ``CombinedLoader``'s): each sample is read from the loader whose
    dataset holds it; before session 31 only the first was read, and the top-k tables left the others' samples
    without label or input."""
    first, second = DataLoader(_Keyed(), batch_size=2), DataLoader(_OtherKeyed(), batch_size=2)
    for loaders in ([first, second], (first, second), {"a": first, "b": second}):
        assert set(samples.training_samples(loaders, {101, 201}, "index", None, 5, False)) == {101, 201}
    assert set(samples.find_samples(first, {101, 201}, "index", None, 5, False)) == {101}


def test_training_samples_scans_a_stream_in_at_most_max_batches():
    """A dataset without positions (an IterableDataset) is scanned in the loader, bounded by ``max_batches``."""
    loader = DataLoader(_Stream(), batch_size=2)
    assert set(samples.training_samples(loader, {100, 103, 108}, "index", None, 5, False)) == {100, 103, 108}
    assert set(samples.training_samples(loader, {100, 103, 108}, "index", None, 2, False)) == {100, 103}


def test_sequential_reads_a_shuffled_loader_in_order_and_keeps_other_loaders():
    shuffled = DataLoader(_Keyed(), batch_size=4, shuffle=True)
    whole, limit = samples.sequential(shuffled)
    assert limit == 3 and [b["index"].tolist() for b in whole][0] == [100, 101, 102, 103]
    plain = DataLoader(_Keyed(), batch_size=4)
    assert samples.sequential(plain) == (plain, None)


class _WholeBatches(torch.utils.data.Dataset):
    """Four batches of four samples each, ids ``100 + 4k .. 103 + 4k``, as items."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        return {"x": torch.zeros(4, 2), "index": torch.arange(100 + 4 * k, 104 + 4 * k)}


def test_a_shuffled_loader_of_whole_batches_is_read_in_order_as_whole_batches():
    """``DataLoader(batches, batch_size=None, shuffle=True)``: the sequential copy took batch size 1, so each read
    batch was a list around one batch dict, no id was read, and the report found none of its top-k samples."""
    shuffled = DataLoader(_WholeBatches(), batch_size=None, shuffle=True)
    whole, limit = samples.sequential(shuffled)
    assert limit == 4 and [b["index"].tolist()[0] for b in whole] == [100, 104, 108, 112]
    assert set(samples.training_samples(shuffled, {100, 109, 115}, "index", None, 10, False)) == {100, 109, 115}
