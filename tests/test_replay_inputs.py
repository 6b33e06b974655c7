"""Exact replay on the inputs users give it: namedtuple batches, activation checkpointing, and sample ids recorded
by a callable (not saved with the store) after ``DataValueEmbeddings.load``.

Every run is a real Lightning ``fit`` on 48 digits (batch 16, 3 steps, a checkpoint every 2 steps) in float64;
each replay is compared with the same run in a form replay already handled (dict or plain-tuple batches, no
checkpointing, the replay right after ``fit``).
"""

from __future__ import annotations

from collections import namedtuple
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from torch.utils.data import Dataset, default_collate

from lightning_dve import ConfigError, DataValueEmbedding, DataValueEmbeddings, UnsupportedError
from lightning_dve.batch_trees import split_batch, to_device
from lightning_dve import replay_data
from lightning_dve.replay_data import BatchSource, TrainingData
from tests.helpers import DigitsDataset, DigitsMLP, make_loader, make_trainer, split_indices

Sample = namedtuple("Sample", ["x", "y", "idx"])


class TupleDigits(Dataset):
    """Digits as ``Sample(x, y, idx)`` namedtuples, or as plain ``(x, y, idx)`` tuples."""

    def __init__(self, digits: DigitsDataset, named: bool) -> None:
        self.digits, self.named = digits, named

    def __len__(self) -> int:
        return len(self.digits)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        item = self.digits[i]
        values = (item["x"], item["y"], item["index"])
        return Sample(*values) if self.named else values


class TupleMLP(DigitsMLP):
    """:class:`DigitsMLP` reading ``(x, y, ...)`` sequence batches."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])


class CheckpointedMLP(DigitsMLP):
    """:class:`DigitsMLP` with its first layer and tanh under non-reentrant activation checkpointing."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = checkpoint(lambda t: self.net[1](self.net[0](t)), x, use_reentrant=False)
        return self.net[2](hidden)


@pytest.fixture(scope="module")
def digits() -> tuple[DigitsDataset, DigitsDataset]:
    """48 training digits, 5 test digits (ids are sklearn indices, not positions)."""
    train, test = split_indices(48, 5, seed=2)
    return DigitsDataset(train), DigitsDataset(test)


def _fit(root: Path, module: DigitsMLP, dataset: Dataset, **dve_kwargs: Any) -> DataValueEmbedding:
    """One epoch of 3 steps with the callback (a checkpoint every 2 steps); returns the callback."""
    dve = DataValueEmbedding(root, report=None, projection_dim=None, checkpoint_interval=2, **dve_kwargs)
    make_trainer(1, callbacks=[dve]).fit(module, make_loader(dataset, 16, seed=1))
    return dve


# --- namedtuple batches ------------------------------------------------------------------------------------


def test_to_device_and_split_batch_keep_namedtuples() -> None:
    batch = Sample(torch.ones(3, 2, dtype=torch.float32), torch.arange(3), torch.arange(3) + 10)
    moved = to_device(batch, torch.device("cpu"), torch.float64)
    assert type(moved) is Sample and moved.x.dtype == torch.float64 and moved.y.dtype == torch.int64
    singles = split_batch(batch)
    assert all(type(s) is Sample for s in singles) and torch.equal(singles[2].idx, torch.tensor([12]))


def test_split_batch_slices_only_what_has_one_row_per_sample() -> None:
    """The batch size is the first batched tensor's rows (a scalar or a string before it does not count); tensors
    and lists of another length (class weights, a vocabulary) and non-batched values are kept whole."""
    batch = {"scale": torch.tensor(2.0), "name": "digits", "x": torch.ones(3, 2), "y": torch.arange(3),
             "class_weights": torch.ones(10), "ids": ["a", "b", "c"], "vocab": ["u", "v"]}
    singles = split_batch(batch)
    assert len(singles) == 3
    for i, single in enumerate(singles):
        assert single["x"].shape == (1, 2) and torch.equal(single["y"], torch.tensor([i]))
        assert single["ids"] == [["a", "b", "c"][i]] and single["vocab"] == ["u", "v"]
        assert single["class_weights"] is batch["class_weights"] and single["scale"] is batch["scale"]
        assert single["name"] == "digits"
    assert [s[0].tolist() for s in split_batch((torch.arange(4), torch.zeros(4)))] == [[0], [1], [2], [3]]  # 1-D


def test_namedtuple_batches_replay_like_plain_tuples(tmp_path: Path, digits) -> None:
    """A namedtuple batch is rebuilt, moved and split field by field: the same scores as the same run with tuples."""
    train, test = digits
    scores = {}
    for named in (False, True):
        module, data = TupleMLP(hidden=8), TupleDigits(train, named)
        dve = _fit(tmp_path / str(named), module, data, sample_ids=lambda b: b[2])
        test_batch = default_collate([TupleDigits(test, named)[i] for i in range(len(test))])
        assert type(test_batch) is (Sample if named else list)
        scores[named] = dve.embeddings.exact_influence(module, test_batch, per_step=True).scores
    torch.testing.assert_close(scores[True], scores[False], rtol=0, atol=0)


# --- activation checkpointing ------------------------------------------------------------------------------


def test_activation_checkpointing_replays_like_the_plain_model(tmp_path: Path, digits) -> None:
    """The checkpoint's recomputation in backward sees the replayed parameters: the scores of the plain model."""
    train, test = digits
    plain, checkpointed = DigitsMLP(hidden=8), CheckpointedMLP(hidden=8)
    expected = _fit(tmp_path / "plain", plain, train).embeddings.exact_influence(plain, test.batch(), per_step=True)
    embeddings = _fit(tmp_path / "ckpt", checkpointed, train).embeddings
    trained = {n: p.detach().clone() for n, p in checkpointed.named_parameters()}
    got = embeddings.exact_influence(checkpointed, test.batch(), per_step=True)
    torch.testing.assert_close(got.scores, expected.scores, rtol=1e-12, atol=1e-14)

    def per_sample(m: DigitsMLP, batch: dict) -> torch.Tensor:
        return F.cross_entropy(m(batch["x"]), batch["y"], reduction="none")

    fast = embeddings.exact_influence(checkpointed, test.batch(), per_step=True, train_loss_fn=per_sample)
    torch.testing.assert_close(fast.scores, expected.scores, rtol=1e-10, atol=1e-14)
    for name, parameter in checkpointed.named_parameters():  # swapped back, unchanged
        assert isinstance(parameter, torch.nn.Parameter) and torch.equal(parameter, trained[name])


def test_target_gradients_at_other_parameters_see_them_through_checkpointing(digits) -> None:
    """``grad L(theta)`` at parameters that are not the module's: the recomputation must use ``theta`` too."""
    test = digits[1].batch()
    plain, checkpointed = DigitsMLP(hidden=8), CheckpointedMLP(hidden=8)
    theta = {n: p.detach() + 0.1 for n, p in plain.named_parameters()}

    def target(m: DigitsMLP) -> torch.Tensor:
        return F.cross_entropy(m(test["x"]), test["y"], reduction="none")

    expected = replay_data.target_gradients(plain, theta, target)
    got = replay_data.target_gradients(checkpointed, theta, target)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-12, atol=1e-14)


# --- a training loader of whole batches --------------------------------------------------------------------


def test_a_loader_of_whole_batches_needs_the_dataset_of_samples(tmp_path: Path, digits) -> None:
    """``DataLoader(batches, batch_size=None)``: its dataset's items are batches, so replay cannot default to it
    (it would collate a list of batches); with ``dataset=`` the samples it gives the scores of the usual loader."""
    train, test = digits
    usual = DigitsMLP(hidden=8)
    expected = _fit(tmp_path / "usual", usual, train).embeddings.exact_influence(usual, test.batch(), per_step=True)
    batches = list(make_loader(train, 16, seed=1))
    module = DigitsMLP(hidden=8)
    dve = DataValueEmbedding(tmp_path / "batched", report=None, projection_dim=None, checkpoint_interval=2)
    make_trainer(1, callbacks=[dve]).fit(module, torch.utils.data.DataLoader(batches, batch_size=None))
    with pytest.raises(ConfigError, match=r"pass dataset=.*yields whole batches, batch_size=None"):
        dve.embeddings.exact_influence(module, test.batch())
    got = dve.embeddings.exact_influence(module, test.batch(), per_step=True, dataset=train).scores
    torch.testing.assert_close(got, expected.scores, rtol=1e-12, atol=1e-14)


def test_a_loader_with_a_batch_sampler_is_a_dataset_of_samples(tmp_path: Path, digits) -> None:
    """``DataLoader(dataset, batch_sampler=...)`` has ``batch_size=None`` yet batches automatically: replay defaults
    to its dataset, with the scores of passing it."""
    train, test = digits
    sampler = torch.utils.data.BatchSampler(torch.utils.data.SequentialSampler(train), 16, drop_last=False)
    module = DigitsMLP(hidden=8)
    dve = DataValueEmbedding(tmp_path / "dve", report=None, projection_dim=None, checkpoint_interval=2)
    make_trainer(1, callbacks=[dve]).fit(module, torch.utils.data.DataLoader(train, batch_sampler=sampler))
    expected = dve.embeddings.exact_influence(module, test.batch(), per_step=True, dataset=train).scores
    got = dve.embeddings.exact_influence(module, test.batch(), per_step=True).scores
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


# --- sample ids recorded by a callable, after load ---------------------------------------------------------


def test_after_load_callable_ids_need_sample_ids(tmp_path: Path, digits) -> None:
    """The callable is not saved: ids outside the dataset are refused with the fix, and ``sample_ids=`` maps them."""
    train, test = digits
    module = DigitsMLP(hidden=8)
    dve = _fit(tmp_path / "dve", module, train, sample_ids=lambda b: b["index"])
    expected = dve.embeddings.exact_influence(module, test.batch(), per_step=True)
    loaded = DataValueEmbeddings.load(tmp_path / "dve")
    with pytest.raises(ConfigError, match=r"recorded sample ids \[\d+.*\] are not positions in the dataset passed "
                                          r"to exact_influence \(48 items\).* Pass sample_ids="):
        loaded.exact_influence(module, test.batch(), dataset=train)
    with pytest.raises(ConfigError, match=r"sample_ids must be a dict key \(str\) or a callable .* got 3"):
        loaded.exact_influence(module, test.batch(), dataset=train, sample_ids=3)
    for sample_ids in ("index", lambda b: b["index"]):
        got = loaded.exact_influence(module, test.batch(), per_step=True, dataset=train, sample_ids=sample_ids)
        assert torch.equal(got.sample_ids, expected.sample_ids)
        torch.testing.assert_close(got.scores, expected.scores, rtol=0, atol=0)
    # the callable given to load serves the replay too (it served the queries only: the ids were taken as positions)
    reloaded = DataValueEmbeddings.load(tmp_path / "dve", sample_ids=lambda b: b["index"])
    got = reloaded.exact_influence(module, test.batch(), per_step=True, dataset=train)
    torch.testing.assert_close(got.scores, expected.scores, rtol=0, atol=0)


def test_positions_refuse_ids_outside_the_dataset(digits) -> None:
    source = BatchSource(TrainingData(digits[0], None, None))
    assert source.positions(torch.tensor([0, 47])) == [0, 47]
    with pytest.raises(ConfigError, match=r"sample ids \[-1, 48\] are not positions .* \(48 items\)"):
        source.positions(torch.tensor([-1, 48, 3]))


class Renumbered(Dataset):
    """``n`` items whose sample id is not their position (``id = 3 position + 1000``, read from the item)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, position: int) -> dict[str, Any]:
        if not 0 <= position < self.n:
            raise IndexError(position)
        return {"x": torch.full((2,), float(position)), "index": 3 * position + 1000}


def test_ids_that_are_not_positions_are_found_anywhere_in_a_large_dataset() -> None:
    """Oracle: each item's own id. Ids that are not positions are mapped by one scan of the dataset, in chunks of
    items: every item of a dataset larger than a chunk is found, the last of each chunk and the first of the next
    included, and the batch rebuilt from the ids is the items themselves."""
    dataset = Renumbered(600)
    source = BatchSource(TrainingData(dataset, None, "index"))
    positions = [0, 254, 255, 256, 257, 511, 512, 599]
    ids = torch.tensor([dataset[p]["index"] for p in positions])
    assert source.positions(ids) == positions
    assert torch.equal(source.batch(ids)["index"], ids)
    every = torch.tensor([dataset[p]["index"] for p in range(600)])
    assert source.positions(every) == list(range(600))


class Relabelled(Dataset):
    """``digits`` with the sample id of position ``p`` set to ``ids[p]``."""

    def __init__(self, digits: DigitsDataset, ids: list[int]) -> None:
        self.digits, self.ids = digits, ids

    def __len__(self) -> int:
        return len(self.digits)

    def __getitem__(self, position: int) -> dict[str, torch.Tensor]:
        return {**self.digits[position], "index": torch.tensor(self.ids[position])}


def test_ids_are_checked_as_positions_beyond_the_first_batch(digits) -> None:
    """Oracle: each item's own id. The first ids asked for are positions; later ids are not, whether they lie
    outside the dataset or inside it at another item: each is found by the scan."""
    ids = list(range(24)) + [p + 4 for p in range(24, 48)]  # ids 0-23, then 28-51: 28-47 are other positions
    source = BatchSource(TrainingData(Relabelled(digits[0], ids), None, "index"))
    assert source.positions(torch.tensor([0, 5, 23])) == [0, 5, 23]
    assert source.positions(torch.tensor([28, 51, 3])) == [24, 47, 3]
    assert source.batch(torch.tensor([30, 1]))["index"].tolist() == [30, 1]


def test_a_dataset_whose_later_ids_are_not_positions_replays_like_one_whose_ids_are(tmp_path: Path, digits) -> None:
    """A dataset of two parts (ids 0-23 and 100-123, as a ``ConcatDataset`` of two numbered sets), read in order so
    the first step's ids are all positions: the scores of the same run whose ids are positions, id for id."""
    results = {}
    for name, ids in (("positions", list(range(48))), ("gap", list(range(24)) + list(range(100, 124)))):
        module = DigitsMLP(hidden=8)
        dve = DataValueEmbedding(tmp_path / name, report=None, projection_dim=None, checkpoint_interval=2,
                                 sample_ids="index")
        loader = torch.utils.data.DataLoader(Relabelled(digits[0], ids), batch_size=16, shuffle=False)
        make_trainer(1, callbacks=[dve]).fit(module, loader)
        results[name] = dve.embeddings.exact_influence(module, digits[1].batch(), per_step=True)
    gap, plain = results["gap"], results["positions"]
    assert [i if i < 100 else i - 76 for i in gap.sample_ids.tolist()] == plain.sample_ids.tolist()
    torch.testing.assert_close(gap.scores, plain.scores, rtol=0, atol=0)


class CountsReads(Relabelled):
    """``Relabelled`` counting the items read (``reads``), each read counted before the position is looked up."""

    def __init__(self, digits: DigitsDataset, ids: list[int]) -> None:
        super().__init__(digits, ids)
        self.reads = 0

    def __getitem__(self, position: int) -> dict[str, torch.Tensor]:
        self.reads += 1
        return super().__getitem__(position)


def test_each_id_is_checked_as_a_position_once_and_the_dataset_scanned_once(digits) -> None:
    """Oracle: a count of the items read. Ids that are positions are read once each, whatever the calls that ask for
    them again; once an id is not a position the dataset is scanned once (48 reads) and the scan answers every
    later call, ids that are positions included, without reading again."""
    dataset = CountsReads(digits[0], list(range(24)) + list(range(100, 124)))
    source = BatchSource(TrainingData(dataset, None, "index"))
    assert source.positions(torch.tensor([0, 5, 23])) == [0, 5, 23]
    assert source.positions(torch.tensor([5, 23, 7])) == [5, 23, 7]
    assert source.positions(torch.tensor([0, 5, 23])) == [0, 5, 23]
    assert dataset.reads == 4
    assert source.positions(torch.tensor([100, 123, 1])) == [24, 47, 1]
    assert dataset.reads == 4 + 48
    assert source.positions(torch.tensor([2, 101])) == [2, 25]
    assert source.positions(torch.tensor([3, 4])) == [3, 4]
    assert dataset.reads == 4 + 48


def test_an_undeclared_ignore_index_reduction_is_named_where_the_replay_refuses(tmp_path: Path) -> None:
    """``cross_entropy(ignore_index=...)`` left at ``"mean"`` divides by the labelled samples only, which the
    default reduction weight ``1/B`` does not: the replay cannot reproduce the checkpoints and refuses. Its message
    listed the cause as one that influence() "refuses too", which it did not here; it now names this case and the
    fix (found by a helper with non-standard losses)."""
    from tests.conftest import DigitsDict, TinyMLP, run_fit

    class Ignoring(TinyMLP):
        def loss(self, batch: Any) -> torch.Tensor:
            labels = torch.where(batch["index"] % 3 == 0, torch.full_like(batch["y"], -100), batch["y"])
            return F.cross_entropy(self(batch["x"]), labels, ignore_index=-100)

    model, dve = Ignoring().double(), DataValueEmbedding(tmp_path / "dve", projection_dim=None, report=None)
    run_fit(model, dve, precision="64-true")
    test = {k: v.double() if v.is_floating_point() else v for k, v in DigitsDict(range(1500, 1504)).batch().items()}
    with pytest.raises(UnsupportedError, match=r"cross_entropy with ignore_index or class weights left at "
                                               r"'mean': declare loss_reduction=callable"):
        dve.embeddings.exact_influence(model, test)


class AliasedMLP(DigitsMLP):
    """:class:`DigitsMLP` with its first layer also held as ``self.encoder`` (a common shortcut)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = self.net[0]


def test_a_layer_held_under_two_names_keeps_its_trained_weights_through_the_replay(tmp_path: Path, digits) -> None:
    """The replay swaps each parameter name in and out: torch put a layer held under two names back in swap order,
    leaving it at the replayed (initial) weights; with ``embeddings="replay"`` the fit itself ended with them, its
    report at the wrong weights, and ``exact_influence`` then blamed weight averaging. Now the trained weights stay,
    bitwise those of the same fit without the callback."""
    plain = AliasedMLP()
    make_trainer(1).fit(plain, make_loader(digits[0], 16, seed=1))
    module = AliasedMLP()
    dve = _fit(tmp_path / "dve", module, digits[0], embeddings="replay")
    trained = {name: p.detach().clone() for name, p in module.named_parameters()}
    assert all(torch.equal(trained[name], p) for name, p in plain.named_parameters())
    scores = dve.embeddings.exact_influence(module, digits[1].batch()).scores
    assert scores.shape == (5, 48) and bool(scores.abs().sum() > 0)
    assert all(torch.equal(trained[name], p) for name, p in module.named_parameters())


# --- sparse gradients --------------------------------------------------------------------------------------


class SparseOffsetMLP(DigitsMLP):
    """:class:`DigitsMLP` plus an untracked ``nn.Embedding(sparse=True)`` logit offset (row 0 for every sample)."""

    def __init__(self) -> None:
        super().__init__(hidden=8)
        self.offset = torch.nn.Embedding(1, 10, sparse=True, dtype=torch.float64)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        offset = self.offset(torch.zeros_like(batch["y"]))
        return F.cross_entropy(self(batch["x"]) + offset, batch["y"])


def test_an_untracked_module_with_sparse_gradients_is_refused_by_exact_replay(tmp_path: Path, digits) -> None:
    """Its sparse gradient failed inside the replay's vector-Jacobian product with torch's NotImplementedError
    (an audit): refused, naming the module and the fix."""
    train, test = digits
    module = SparseOffsetMLP()
    dve = _fit(tmp_path / "dve", module, train, exclude=("offset",))
    with pytest.raises(UnsupportedError, match=r"modules \['offset'\] train with sparse gradients \(sparse=True\).*"
                                               r"sparse=False"):
        dve.embeddings.exact_influence(module, test.batch())


class Sequences(Dataset):
    """Token sequences of 2 to 8 ids, labelled by their sum mod 3."""

    def __init__(self, n: int, offset: int = 0) -> None:
        generator = torch.Generator().manual_seed(offset)
        self.items = []
        for i in range(n):
            ids = torch.randint(1, 30, (int(torch.randint(2, 9, (1,), generator=generator)),), generator=generator)
            self.items.append({"ids": ids, "y": int(ids.sum()) % 3, "index": i + offset})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]


def pad_to_longest(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    ids = torch.nn.utils.rnn.pad_sequence([item["ids"] for item in items], batch_first=True)
    return {"ids": ids, "y": torch.tensor([item["y"] for item in items]),
            "index": torch.tensor([item["index"] for item in items])}


class PoolsOverPadding(DigitsMLP):
    """Mean-pools embeddings over every position, padding included: a sample's loss depends on its batch."""

    def __init__(self) -> None:
        super().__init__(hidden=8, lr=0.5)
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Embedding(30, 8, padding_idx=0), torch.nn.Linear(8, 3)).double()

    def per_sample(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        pooled = torch.tanh(self.net[0](batch["ids"]).mean(1))
        return F.cross_entropy(self.net[1](pooled), batch["y"], reduction="none")

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.per_sample(batch).mean()


def test_a_loss_coupled_by_padding_to_the_batch_is_refused_naming_train_loss_fn_that_takes_the_batch(
        tmp_path: Path) -> None:
    """The replay forms each sample's loss alone, padded to its own length: the landing check refused with a
    dozen causes, none of them this one, and not the fix that works (a batched ``train_loss_fn``)."""
    model = PoolsOverPadding()
    dve = DataValueEmbedding(tmp_path / "dve", projection_dim=None, report=None)
    make_trainer(2, [dve]).fit(model, torch.utils.data.DataLoader(Sequences(24), batch_size=8,
                                                                 collate_fn=pad_to_longest))
    test = pad_to_longest([Sequences(4, offset=100)[i] for i in range(4)])
    loss_fn = lambda module, batch: module.per_sample(batch)  # noqa: E731
    with pytest.raises(UnsupportedError, match=r"a sample's loss that depends on the other samples of its batch.*"
                                               r"pass train_loss_fn\(module, batch\) -> Tensor\[B\]"):
        dve.embeddings.exact_influence(model, test, loss_fn=loss_fn)
    result = dve.embeddings.exact_influence(model, test, loss_fn=loss_fn, train_loss_fn=loss_fn)
    assert result.scores.shape == (4, 24) and bool(result.scores.abs().sum() > 0)
