"""The report's reference set with a real Trainer: it reads no more validation batches than validation does."""

from __future__ import annotations

import json
from collections.abc import Iterator
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

from lightning_dve import DataValueEmbedding
from lightning_dve.config import ReportConfig
from lightning_dve.reporting_reference import FirstBatches, validation_batch_limit
from tests.test_reporting import ImageDigits, ImageMLP, loaders, report_dir

UNCAPPED = ReportConfig(top_k=3, max_reference_samples=10_000, figures=False)  # the validation set has 64 samples


class OwnValidation(ImageMLP):
    """Its own ``val_dataloader`` (4 batches of 16): the trainer's fallback when validation never set it up."""

    def val_dataloader(self) -> DataLoader:
        return loaders()[1]


class FewValidationSamples(ImageMLP):
    """Its own ``val_dataloader`` of 5 samples, which loaders given to ``fit`` replace."""

    def val_dataloader(self) -> DataLoader:
        return DataLoader(ImageDigits(range(1500, 1505)), batch_size=5)


def reference_of(callback: DataValueEmbedding) -> dict[str, object]:
    return json.loads((report_dir(callback) / "summary.json").read_text())["reference"]


@pytest.mark.parametrize(("limit", "batches"), [(2, 2), (0.75, 3), (1.0, 4), (10, 4)])
def test_limit_val_batches_bounds_the_reference(fit, tmp_path, limit, batches):
    train, val = loaders()
    callback = DataValueEmbedding(tmp_path / "dve", projection_dim=16, report=UNCAPPED)
    trainer = fit(ImageMLP(), callback, train, val, limit_val_batches=limit)
    assert trainer.num_val_batches == [batches]
    reference = reference_of(callback)
    assert reference["n_samples"] == 16 * batches
    capped = f"the validation dataloader (its first {batches} batches, `limit_val_batches`)"
    assert reference["source"] == (capped if batches < 4 else "the validation dataloader")


def test_max_reference_samples_still_caps_within_the_limit(fit, tmp_path):
    train, val = loaders()
    callback = DataValueEmbedding(tmp_path / "dve", projection_dim=16, report=ReportConfig(max_reference_samples=20))
    fit(ImageMLP(), callback, train, val, limit_val_batches=3)
    assert reference_of(callback)["n_samples"] == 20


def test_limit_val_batches_zero_leaves_the_report_without_a_reference(fit, tmp_path):
    train, val = loaders()
    callback = DataValueEmbedding(tmp_path / "dve", projection_dim=16, report=UNCAPPED)
    with pytest.warns(UserWarning, match=r"no reference set \(`Trainer\(limit_val_batches=0\)` turns validation off"):
        fit(OwnValidation(), callback, train, val, limit_val_batches=0)
    assert not report_dir(callback).exists()


def test_limit_val_batches_zero_with_a_reference_uses_it(fit, tmp_path):
    train, _ = loaders()
    reference = next(iter(DataLoader(ImageDigits(range(1500, 1510)), batch_size=10)))
    callback = DataValueEmbedding(tmp_path / "dve", projection_dim=16, report=UNCAPPED, reference=reference)
    fit(ImageMLP(), callback, train, limit_val_batches=0)
    assert reference_of(callback) == {"n_samples": 10, "source": "the `reference` batch"}


@pytest.mark.parametrize(("limit", "n_samples"), [(3, 48), (0.5, 32), (1.0, 64)])
def test_validation_that_never_ran_applies_the_limit_as_lightning_would(fit, tmp_path, limit, n_samples):
    """``check_val_every_n_epoch`` beyond the last epoch and no sanity check: Lightning never set validation up
    (``num_val_batches == []``); the module's own ``val_dataloader`` is read with ``limit_val_batches`` applied."""
    train, _ = loaders()
    callback = DataValueEmbedding(tmp_path / "dve", projection_dim=16, report=UNCAPPED)
    trainer = fit(OwnValidation(), callback, train, check_val_every_n_epoch=5, limit_val_batches=limit)
    assert trainer.num_val_batches == [] and trainer.val_dataloaders is None
    assert reference_of(callback)["n_samples"] == n_samples


class Data(L.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        return loaders()[0]

    def val_dataloader(self) -> DataLoader:
        return loaders()[1]


@pytest.mark.parametrize(("limit", "n_samples"), [(3, 48), (1.0, 64)])
@pytest.mark.parametrize("given", ["fit", "datamodule"])
def test_validation_loaders_given_to_fit_are_the_reference_when_validation_never_ran(tmp_path, limit, n_samples,
                                                                                       given):
    """``trainer.fit(model, train, val)`` or ``fit(model, datamodule=...)`` with validation never set up
    (``check_val_every_n_epoch`` beyond the last epoch, no sanity check): the validation loader given to ``fit`` is
    the reference (as Lightning would take it, though the module defines its own), bounded as validation would be."""
    callback = DataValueEmbedding(tmp_path / "dve", projection_dim=16, report=UNCAPPED)
    trainer = L.Trainer(callbacks=[callback], max_epochs=1, check_val_every_n_epoch=5, limit_val_batches=limit,
                        num_sanity_val_steps=0, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False)
    model = FewValidationSamples()
    if given == "fit":
        trainer.fit(model, *loaders())
    else:
        trainer.fit(model, datamodule=Data())
    assert trainer.num_val_batches == [] and trainer.val_dataloaders is None
    capped = "the validation dataloader (its first 3 batches, `limit_val_batches`)"
    assert reference_of(callback) == {"n_samples": n_samples,
                                      "source": capped if limit == 3 else "the validation dataloader"}


class DigitStream(IterableDataset):
    """The 64 held-out digits as a stream: no length, so only an int ``limit_val_batches`` bounds it."""

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return iter(ImageDigits(range(1500, 1564)))


@pytest.mark.parametrize(("limit", "n_samples"), [(2, 32), (1.0, 64)])
def test_a_validation_stream_is_bounded_by_an_int_limit(fit, tmp_path, limit, n_samples):
    train, _ = loaders()
    callback = DataValueEmbedding(tmp_path / "dve", projection_dim=16, report=UNCAPPED)
    fit(ImageMLP(), callback, train, DataLoader(DigitStream(), batch_size=16), limit_val_batches=limit)
    assert reference_of(callback)["n_samples"] == n_samples


def test_a_sanity_check_sets_validation_up_with_its_limit(fit, tmp_path):
    train, val = loaders()
    callback = DataValueEmbedding(tmp_path / "dve", projection_dim=16, report=UNCAPPED)
    fit(ImageMLP(), callback, train, val, check_val_every_n_epoch=5, num_sanity_val_steps=1, limit_val_batches=3)
    assert reference_of(callback)["n_samples"] == 48


def test_a_sharded_count_is_every_ranks_batches():
    """Under DDP validation reads ``num_val_batches[0]`` batches on each rank; rank 0's unsharded loader reads them
    all (the 2-rank run is in tests/test_distributed.py)."""
    trainer = SimpleNamespace(limit_val_batches=2, num_val_batches=[2], world_size=3)
    assert validation_batch_limit(trainer, [], sharded=True) == (6, 3)
    assert validation_batch_limit(trainer, [], sharded=False) == (2, 1)
    trainer = SimpleNamespace(limit_val_batches=1.0, num_val_batches=[float("inf")], world_size=2)
    assert validation_batch_limit(trainer, [], sharded=True) == (None, 2)


def test_first_batches_has_a_length_only_where_its_loader_has_one():
    assert list(FirstBatches(range(5), 3)) == [0, 1, 2] and len(FirstBatches(range(5), 3)) == 3
    assert len(FirstBatches(range(2), 3)) == 2
    stream = FirstBatches(iter(range(5)), 2)
    with pytest.raises(TypeError):
        len(stream)
    assert list(stream) == [0, 1]
    assert torch.equal(next(iter(FirstBatches([torch.ones(2)], 1))), torch.ones(2))
