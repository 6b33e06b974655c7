"""Calls of a tracked layer whose first dimension is not the step's samples (``call_checks``): refused with the
layer and the fix named, where they used to be filed under the wrong samples or fail inside the capture."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from lightning_dve import DataValueEmbedding, UnsupportedError
from lightning_dve.store import TrajectoryStore
from tests.conftest import DigitsDict, TinyMLP, run_fit


class Refined(TinyMLP):
    """``net.0`` applied to the batch, then again to the samples of id ``routed`` only when the batch holds it (a
    second pass over some samples): at the step holding that id, a one-sample call after a four-sample one."""

    def __init__(self, routed: int = 5) -> None:
        super().__init__()
        self.routed = routed

    def loss(self, batch: dict) -> torch.Tensor:
        h = self.net[0](batch["x"])
        mask = batch["index"] == self.routed
        if mask.any():
            h = h.index_add(0, mask.nonzero().flatten(), self.net[0](batch["x"][mask]))
        return F.cross_entropy(self.net[2](torch.tanh(h)), batch["y"])


class Experts(TinyMLP):
    """Two experts in place of ``net.0``, each called on the samples routed to it; every sample goes to the first."""

    def __init__(self) -> None:
        super().__init__()
        self.experts = nn.ModuleList([nn.Linear(64, 16), nn.Linear(64, 16)])
        self.net[0] = nn.Identity()

    def loss(self, batch: dict) -> torch.Tensor:
        x, routed = batch["x"], batch["y"] < 10
        h = torch.zeros(len(x), 16).index_put((routed,), self.experts[0](x[routed]))
        h = h.index_put((~routed,), self.experts[1](x[~routed]))
        return F.cross_entropy(self.net[2](torch.tanh(h)), batch["y"])


def _dve(root: Path, **kwargs) -> DataValueEmbedding:
    return DataValueEmbedding(root, projection_dim=None, report=None, checkpoint_interval=None, **kwargs)


def test_a_layer_called_again_on_part_of_the_batch_is_refused_at_that_step(tmp_path: Path) -> None:
    """The one-sample block was broadcast onto every sample's row (0.73 off, silently) when the routing first
    happened after the first step, which the tied-weight check had already passed; the steps before stay readable."""
    with pytest.raises(UnsupportedError, match=r"'net\.0' \(Linear\) was called on 1 samples after a call on 4 in "
                                               r"the same step.*routing.*exclude=\('net\.0',\)"):
        run_fit(Refined(), _dve(tmp_path / "dve"), train=DataLoader(DigitsDict(range(8)), batch_size=4))
    assert TrajectoryStore.open(tmp_path / "dve").steps == [0]


def test_an_expert_that_gets_no_sample_is_refused_naming_routing(tmp_path: Path) -> None:
    """A mixture-of-experts layer that gets no sample of a batch failed in a reshape."""
    with pytest.raises(UnsupportedError, match=r"'experts\.1' \(Linear\) was called on 0 samples: a layer applied "
                                               r"to part of the batch \(routing, a mixture of experts"):
        run_fit(Experts(), _dve(tmp_path / "dve"))


def test_a_batch_the_step_filters_to_nothing_is_named_as_such(tmp_path: Path) -> None:
    """The first tracked layer called on 0 samples: the batch, not a routing (the message named mixtures of
    experts and exclude=, a fix that leaves nothing to measure, before session 30)."""
    class DropsEverything(TinyMLP):
        def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
            keep = batch["index"] < 0
            return F.cross_entropy(self(batch["x"][keep]), batch["y"][keep])

    with pytest.raises(UnsupportedError, match=r"'net\.0' was called on a batch of 0 samples: training_step left "
                                               r"none of this batch .*return 0 \* sum of the parameters"):
        run_fit(DropsEverything(), _dve(tmp_path / "dve"))


class TableNet(TinyMLP):
    """A coordinate table run through ``net.0`` and broadcast across the batch (``expand=False``), or expanded over
    the batch before it (``expand=True``: per-sample rows, each sample's own); ``from_step``: from that step on."""

    def __init__(self, expand: bool, from_step: int = 0) -> None:
        super().__init__()
        self.expand, self.from_step = expand, from_step
        self.register_buffer("coords", torch.linspace(-1, 1, 4 * 64).reshape(4, 64))

    def loss(self, batch: dict) -> torch.Tensor:
        if self.global_step < self.from_step:
            return super().loss(batch)
        table = self.coords.expand(len(batch["x"]), 4, 64) if self.expand else self.coords
        h = self.net[0](batch["x"]) + self.net[0](table).mean(-2)
        return F.cross_entropy(self.net[2](torch.tanh(h)), batch["y"])


@pytest.mark.parametrize("from_step", [0, 1])
def test_a_layer_called_on_a_table_of_the_model_is_refused_and_its_expanded_form_recorded(
    tmp_path: Path, from_step: int
) -> None:
    """With as many table rows as samples, the table's rows were filed under the samples (up to 112 % off, silently);
    with another count the batch-size check refused it. Checked at every step (a path first taken at step 1 was
    not seen while the check ran in the first micro-batch only). Expanded over the batch, each sample's row is its
    own."""
    with pytest.raises(UnsupportedError, match=r"'net\.0' \(Linear\) was called on a parameter or buffer of the "
                                               r"model \(shape \(4, 64\)\).*table\.expand\(b, \*table\.shape\)"):
        run_fit(TableNet(expand=False, from_step=from_step), _dve(tmp_path / "broadcast"),
                train=DataLoader(DigitsDict(range(8)), batch_size=4))
    assert len(TrajectoryStore.open(tmp_path / "broadcast").steps) == from_step
    model = TableNet(expand=True)
    initial = TableNet(expand=True)
    initial.load_state_dict(model.state_dict())
    run_fit(model, _dve(tmp_path / "expanded"), train=DataLoader(DigitsDict(range(4)), batch_size=4))
    rows = TrajectoryStore.open(tmp_path / "expanded").read_step(0).grads["net.0"]
    batch = next(iter(DataLoader(DigitsDict(range(4)), batch_size=4)))
    for i in range(4):  # oracle: a per-example backward
        initial.zero_grad()
        initial.loss({key: value[i:i + 1] for key, value in batch.items()}).backward()
        layer = initial.net[0]
        expected = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], dim=1).flatten()
        torch.testing.assert_close(rows[i].float(), expected, rtol=1e-4, atol=1e-6)


class ComputedTable(TableNet):
    """The table made in the forward from the buffer (a grid normalised there, or ``one_row``: one table row
    repeated for every sample, each sample's own copy): a new tensor at every call, which no address matches."""

    def __init__(self, one_row: bool = False) -> None:
        super().__init__(expand=False)
        self.one_row = one_row

    def loss(self, batch: dict) -> torch.Tensor:
        table = self.coords[:1].repeat(len(batch["x"]), 1) if self.one_row else self.coords * 2 - 1
        h = self.net[0](batch["x"]) + self.net[0](table).mean(-2)
        return F.cross_entropy(self.net[2](torch.tanh(h)), batch["y"])


def test_a_table_computed_in_the_forward_is_named_in_a_warning(tmp_path: Path) -> None:
    """A grid computed from a buffer in the forward, as many rows as samples: its rows were filed under the
    samples (up to 114 % off, an audit) without a word. Its input is the same in micro-batches of different samples,
    which the first micro-batches are checked for; not for the same batch again (full-batch training) or a row
    repeated per sample (each sample's own copy)."""
    with pytest.warns(UserWarning, match=r"layer 'net\.0' got the same input in two micro-batches of different "
                                         r"samples: a table shared by every sample .*exclude=\('net\.0',\)"):
        run_fit(ComputedTable(), _dve(tmp_path / "grid"), train=DataLoader(DigitsDict(range(12)), batch_size=4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_fit(TinyMLP(), _dve(tmp_path / "full"), train=DataLoader(DigitsDict(range(4)), batch_size=4),
                max_epochs=4)
        run_fit(ComputedTable(one_row=True), _dve(tmp_path / "row"), train=DataLoader(DigitsDict(range(12)),
                                                                                     batch_size=4))
        run_fit(LabelInput(), _dve(tmp_path / "labels"), train=DataLoader(DigitsDict(range(12)), batch_size=4))
    assert not [w for w in caught if "got the same input" in str(w.message)]


class LabelInput(TinyMLP):
    """A tracked layer on the batch's one-hot labels: digits 0-3, 4-7 and 8, 9, 0, 1 in batches of 4 have the same
    sum and sum of squares (4), different samples all the same."""

    def __init__(self) -> None:
        super().__init__()
        self.label = nn.Linear(10, 10)

    def loss(self, batch: dict) -> torch.Tensor:
        hint = self.label(F.one_hot(batch["y"], 10).to(batch["x"].dtype))
        return F.cross_entropy(self(batch["x"]) + hint, batch["y"])


class PositionIds(TinyMLP):
    """HF BERT's form: a ``position_ids`` buffer ``[1, max_len]`` sliced to ``[1, t]`` and, with ``expand``, expanded
    over the batch (``.expand(b, t)``) before its Embedding."""

    def __init__(self, expand: bool) -> None:
        super().__init__()
        self.expand, self.pos = expand, nn.Embedding(8, 10)
        self.register_buffer("position_ids", torch.arange(8).unsqueeze(0))

    def loss(self, batch: dict) -> torch.Tensor:
        ids = self.position_ids[:, :4]
        ids = ids.expand(len(batch["x"]), -1) if self.expand else ids
        return F.cross_entropy(self(batch["x"]) + self.pos(ids).mean(1), batch["y"])


def test_a_sliced_position_buffer_is_refused_unexpanded_with_the_right_expand_and_fine_for_one_sample(
    tmp_path: Path
) -> None:
    """Unexpanded, the ``[1, t]`` slice is one row broadcast over the batch: refused naming ``expand(b, -1)`` (the
    fix ``expand(b, *shape)`` would broadcast wrongly). Expanded, or in batches of one sample (micro-batches of one
    under accumulation), where the table is that sample's own, it is recorded."""
    with pytest.raises(UnsupportedError, match=r"'pos' \(Embedding\) was called on a parameter or buffer of the "
                                               r"model \(shape \(1, 4\)\).*layer\(table\.expand\(b, -1\)\)"):
        run_fit(PositionIds(expand=False), _dve(tmp_path / "unexpanded"))
    run_fit(PositionIds(expand=True), _dve(tmp_path / "expanded"))
    one = DataLoader(DigitsDict(range(4)), batch_size=1)
    run_fit(PositionIds(expand=True), _dve(tmp_path / "one_expanded"), train=one, accumulate_grad_batches=2)
    run_fit(TableNet(expand=True), _dve(tmp_path / "one_table"), train=one)
    assert [TrajectoryStore.open(tmp_path / name).steps for name in ("expanded", "one_expanded", "one_table")] == \
        [[0, 1, 2, 3], [0, 1], [0, 1, 2, 3]]


class KeywordNet(TinyMLP):
    """Calls its layers by keyword, ``layer(input=x)``, which hands the forward hook no positional argument."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](input=torch.tanh(self.net[0](input=x)))


def test_a_layer_called_by_keyword_is_recorded_as_a_positional_call(tmp_path: Path) -> None:
    """It failed with an IndexError inside the capture."""
    run_fit(TinyMLP(), _dve(tmp_path / "positional"))
    run_fit(KeywordNet(), _dve(tmp_path / "keyword"))
    positional, keyword = (TrajectoryStore.open(tmp_path / name) for name in ("positional", "keyword"))
    assert keyword.steps == positional.steps == [0, 1, 2, 3]
    for step in positional.steps:
        for name, rows in positional.read_step(step).grads.items():
            torch.testing.assert_close(keyword.read_step(step).grads[name], rows, rtol=0, atol=0)


class UnbatchedNet(TinyMLP):
    """Runs ``net.0`` on one unbatched vector, a bias shared by every sample."""

    def loss(self, batch: dict) -> torch.Tensor:
        shift = self.net[0](batch["x"].new_ones(64))
        return F.cross_entropy(self.net[2](torch.tanh(self.net[0](batch["x"]) + shift)), batch["y"])


class RowByRow(TinyMLP):
    """Runs the tracked ``net.2`` on one sample's unbatched row at a time (``net.0`` excluded): every tracked call of
    the micro-batch is refused, so none is captured."""

    def loss(self, batch: dict) -> torch.Tensor:
        logits = torch.stack([self.net[2](torch.tanh(self.net[0](row))) for row in batch["x"]])
        return F.cross_entropy(logits, batch["y"])


class UnbatchedConv(TinyMLP):
    """Adds a Conv2d run on the first sample's ``[1, 8, 8]`` image alone."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 10, 8)

    def loss(self, batch: dict) -> torch.Tensor:
        shift = self.conv(batch["x"][0].reshape(1, 8, 8)).flatten()
        return F.cross_entropy(self(batch["x"]) + shift, batch["y"])


@pytest.mark.parametrize(("model", "exclude", "match"), [
    (UnbatchedNet, (), r"'net\.0' \(Linear\) was called on an unbatched input of shape \(64,\).*\[B, \.\.\.\]; a "
                       r"DataLoader with batch_size=None over single samples"),
    (RowByRow, ("net.0",), r"'net\.2' \(Linear\) was called on an unbatched input of shape \(16,\)"),
    (UnbatchedConv, (), r"'conv' \(Conv2d\) was called on an unbatched input of shape \(1, 8, 8\)"),
])
def test_a_layer_called_on_an_unbatched_input_is_refused(tmp_path: Path, model: type, exclude: tuple,
                                                        match: str) -> None:
    """It failed in a reshape inside the capture (Linear), or was refused in the forward hook without the layer's
    name (Conv2d). Where every tracked call of a micro-batch is refused, nothing is captured, and the refusal is
    still raised (not taken for a skipped micro-batch)."""
    with pytest.raises(UnsupportedError, match=match):
        run_fit(model(), _dve(tmp_path / "dve", exclude=exclude))


class SampleTable(TinyMLP):
    """A learned row per sample, looked up by the batch's ids (the first batch of an unshuffled loader: arange(4))."""

    def __init__(self) -> None:
        super().__init__()
        self.per_sample = nn.Embedding(64, 10)

    def loss(self, batch: dict) -> torch.Tensor:
        return F.cross_entropy(self(batch["x"]) + self.per_sample(batch["index"]), batch["y"])


@pytest.mark.parametrize("batch_size", [16, 64])
def test_per_sample_ids_equal_to_arange_are_not_taken_for_a_position_table(tmp_path: Path, batch_size: int) -> None:
    """The position-table warning (``tests/test_token_losses.py``) is for ids ``arange(n)`` made in the forward, in
    consecutive steps; ids of the batch itself are per sample even when they are ``arange(n)`` in the first batch
    (16) or in every step (64: full-batch training, an auto-decoder's codes), where it used to warn with a wrong
    fix."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*position table")
        run_fit(SampleTable(), _dve(tmp_path / "dve"), train=DataLoader(DigitsDict(range(64)), batch_size=batch_size),
                max_epochs=2)
    assert len(TrajectoryStore.open(tmp_path / "dve").steps) == 2 * 64 // batch_size


def test_after_fit_the_model_carries_nothing_of_the_callback_and_its_tables_keep_nothing_alive(
    tmp_path: Path
) -> None:
    """The table check holds weak references only (a strong one kept a replaced 400 MB buffer alive after fit), and
    the object the callbacks of a Trainer share lives on the Trainer: a module pickled after fit does not need this
    package to load."""
    import gc
    import pickle
    import weakref

    model = TableNet(expand=True)
    run_fit(model, _dve(tmp_path / "dve"), train=DataLoader(DigitsDict(range(8)), batch_size=4))
    old = weakref.ref(model.coords)
    model.coords = torch.zeros(4, 64)
    gc.collect()
    assert old() is None
    assert b"lightning_dve" not in pickle.dumps(model)


def test_a_fingerprint_tells_equal_inputs_from_reordered_or_relabelled_ones() -> None:
    """The probe of the first micro-batches (:func:`call_checks.fingerprint`): a copy of an input matches, its rows
    reordered or one-hot rows of other labels (the same sums) do not; rows all alike give none. Oracle: equality of
    the tensors themselves."""
    from lightning_dve.call_checks import fingerprint

    x = torch.randn(6, 4, 33)
    labels = F.one_hot(torch.tensor([0, 1, 2, 3]), 10).float()
    assert fingerprint([x]) == fingerprint([x.clone()]) and fingerprint([x]) != fingerprint([x[[1, 0, 2, 3, 4, 5]]])
    assert fingerprint([labels]) != fingerprint([F.one_hot(torch.tensor([4, 5, 6, 7]), 10).float()])
    assert fingerprint([x[:1].repeat(6, 1, 1)], rows_alike=True) is None
    assert fingerprint([x.to(torch.bfloat16)]) == fingerprint([x.to(torch.bfloat16)])
    assert fingerprint([torch.arange(6), x]) != fingerprint([torch.arange(1, 7), x])
