"""Queries call the LightningModule as the training loop does: its batch transfer hooks, and a ``training_step``
without ``batch_idx``. Oracle: the same weights in a module without the convention, given what the loop would have
handed it (the batch transformed by hand, ``batch_idx`` passed)."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_dve import ConfigError, DataValueEmbedding, DataValueEmbeddings, DVEConfig, LossReduction
from lightning_dve.errors import SampleIdError
from tests.conftest import DigitsDict, TinyMLP


def rescaled(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What :class:`Normalising`'s hooks do to a loader's batch: inputs to ``4x - 1`` under the key ``"x"``."""
    return {"x": batch["x"] * 4 - 1, "y": batch["y"], "index": batch["index"]}


class Normalising(TinyMLP):
    """Renames the input key before the transfer and rescales the inputs after it (a GPU-side normalisation)."""

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return {"pixels": batch["x"], "y": batch["y"], "index": batch["index"]}

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return {"x": batch["pixels"] * 4 - 1, "y": batch["y"], "index": batch["index"]}


class TrainerBound(Normalising):
    """Augments in ``on_after_batch_transfer`` while training, as Lightning's docs do: reads ``self.trainer``."""

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        batch = super().on_after_batch_transfer(batch, dataloader_idx)
        return {**batch, "x": batch["x"] + 0.1} if self.trainer.training else batch


class AugmentingInPlace(TinyMLP):
    """Rescales in place of the batch dict (``batch["x"] = ...; return batch``) and adds noise while training,
    under ``self.training`` before the transfer and ``self.trainer.training`` after it (Lightning's docs)."""

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        batch["x"] = batch["x"] * 4 - 1
        if self.training:
            batch["x"] = batch["x"] + 0.3 * torch.randn_like(batch["x"])
        return batch

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.trainer.training:
            batch["x"] = batch["x"] + 0.3 * torch.randn_like(batch["x"])
        return batch

    def validation_step(self, batch: Any, batch_idx: int) -> Any:
        return self.loss(batch)


class ScalingTensorsInPlace(TinyMLP):
    """Divides the inputs in place of their tensor (``batch["x"] /= 16``), harmless in training, where every batch
    is new; a hook that fails with a ``RuntimeError`` of its own on a batch without ``"y"``."""

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if "y" not in batch:
            raise RuntimeError("no labels")
        batch["x"] /= 16.0
        return batch


class WithoutBatchIndex(TinyMLP):
    """``training_step(self, batch)``: Lightning passes ``batch_idx`` only where the signature takes it."""

    def training_step(self, batch: Any) -> Any:  # type: ignore[override]
        return self.loss(batch)


class KeywordOnlyIndex(TinyMLP):
    """``training_step(self, batch, *, batch_idx=0)``: Lightning passes the batch alone (positional arguments)."""

    def training_step(self, batch: Any, *, batch_idx: int = 0) -> Any:  # type: ignore[override]
        return self.loss(batch)


class VariadicStep(TinyMLP):
    """``training_step(self, *args)``: Lightning passes the batch and ``batch_idx`` positionally."""

    def training_step(self, *args: Any) -> Any:  # type: ignore[override]
        assert len(args) == 2, args
        return self.loss(args[0])


def twin(module: TinyMLP) -> TinyMLP:
    """A plain :class:`TinyMLP` with ``module``'s weights."""
    plain = TinyMLP()
    plain.load_state_dict(module.state_dict())
    return plain


@pytest.mark.parametrize("projection_dim", [None, 16])
def test_queries_run_the_transfer_hooks_as_training_did(fit, save_dir, test_batch, projection_dim):
    """``influence``, ``test_gradients`` and ``exact_influence`` on a loader's batch equal the plain module's on the
    batch the hooks make of it (before: the hooks were skipped, and the raw inputs scored otherwise, silently)."""
    model = Normalising()
    dve = DataValueEmbedding(save_dir, projection_dim=projection_dim, report=None)
    fit(model, dve, max_epochs=2)
    plain, emb = twin(model), dve.embeddings
    hooked, by_hand = emb.influence(model, test_batch).scores, emb.influence(plain, rescaled(test_batch)).scores
    torch.testing.assert_close(hooked, by_hand, rtol=1e-12, atol=0)
    assert not torch.allclose(hooked, emb.influence(plain, test_batch).scores, rtol=1e-3, atol=0)  # not a no-op
    exact = emb.exact_influence(model, test_batch).scores
    torch.testing.assert_close(exact, emb.exact_influence(plain, rescaled(test_batch)).scores, rtol=1e-12, atol=0)
    assert set(test_batch) == {"x", "y", "index"}  # the caller's batch is as it was


class RescalingData(L.LightningDataModule):
    """Training digits 0..63 rescaled by ``scale`` in ``on_after_batch_transfer`` (a normalisation kept in the
    DataModule); test digits 1500..1511."""

    scale = 3.0

    def train_dataloader(self) -> DataLoader:
        return DataLoader(DigitsDict(range(64)), batch_size=16)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(DigitsDict(range(1500, 1512)), batch_size=6)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return {**batch, "x": batch["x"] * self.scale}


class Tested(TinyMLP):
    def test_step(self, batch: Any, batch_idx: int) -> Any:
        self.log("test_loss", self.loss(batch))


def test_a_loaded_handle_warns_where_a_later_test_call_took_the_datamodule_out_of_the_dispatch(save_dir, test_batch):
    """A ``trainer.test(dataloaders=...)`` after fit leaves ``trainer.datamodule`` set but hands the transfer hooks
    back to the module: the loaded handle, queried with the trained module still attached, scored the raw batch and
    did not warn (the check read ``trainer.datamodule``). It now warns, except where a ``loss_fn`` takes the batch,
    as the warning advises: rescaling there gives the fit handle's scores (the oracle)."""
    model, dve = Tested(), DataValueEmbedding(save_dir, projection_dim=None, report=None)
    trainer = L.Trainer(callbacks=[dve], accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, max_epochs=1)
    trainer.fit(model, datamodule=RescalingData())
    fitted = dve.embeddings.influence(model, test_batch).scores
    trainer.test(model, dataloaders=DataLoader(DigitsDict(range(1500, 1512)), batch_size=6), verbose=False)
    assert trainer.datamodule is not None
    loaded, detached = DataValueEmbeddings.load(save_dir), Tested()
    detached.load_state_dict(model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rescaled_by_loss_fn = loaded.influence(model, test_batch, loss_fn=lambda m, b: torch.nn.functional.cross_entropy(
            m(b["x"] * 3.0), b["y"], reduction="none")).scores
        DataValueEmbeddings.load(save_dir).influence(detached, test_batch, loss_fn=lambda m, b: m(b["x"]).sum(1))
    scale = float(fitted.abs().max())  # float32: the loss_fn's per-sample losses round otherwise than the split mean
    torch.testing.assert_close(rescaled_by_loss_fn, fitted, rtol=1e-4, atol=1e-5 * scale)
    with pytest.warns(UserWarning, match=r"fit ran its LightningDataModule's \['on_after_batch_transfer'\]"):
        raw = loaded.influence(model, test_batch).scores
    assert not torch.allclose(raw, fitted, rtol=1e-3, atol=0)


class WholeBatchData(RescalingData):
    """:class:`RescalingData` whose loader yields whole batches (``batch_size=None``): no dataset of samples."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(list(DataLoader(DigitsDict(range(64)), batch_size=16)), batch_size=None)


def test_a_fit_handle_without_training_samples_warns_once_for_a_module_outside_the_trainer(save_dir, test_batch):
    """A fit whose DataModule's loader yields whole batches leaves the handle no training data, and with it no way to
    run the DataModule's hooks for a module attached to no Trainer: it warns once as a loaded handle does, and the
    batch rescaled by hand scores as the trained module, still attached to the Trainer, does (the oracle)."""
    model, dve = Tested(), DataValueEmbedding(save_dir, projection_dim=None, report=None)
    trainer = L.Trainer(callbacks=[dve], accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, max_epochs=1)
    trainer.fit(model, datamodule=WholeBatchData())
    assert dve.embeddings.training_data is None
    fitted = dve.embeddings.influence(model, test_batch).scores
    detached = Tested()
    detached.load_state_dict(model.state_dict())
    with pytest.warns(UserWarning, match=r"or of a fit whose loader held no dataset of samples\) cannot run"):
        dve.embeddings.influence(detached, test_batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per handle
        by_hand = dve.embeddings.influence(detached, {**test_batch, "x": test_batch["x"] * 3.0}).scores
    torch.testing.assert_close(by_hand, fitted, rtol=1e-12, atol=0)


def test_queries_keep_the_fit_s_datamodule_hooks_after_trainer_test(save_dir, test_batch):
    """Lightning dispatches the transfer hooks to the DataModule of the Trainer's latest fit, validate, test or
    predict call: a ``trainer.test(dataloaders=...)`` after fit left the fit DataModule's rescaling out of the
    queries (scores 0.4 off, silently) and of the replay (refused), and ``test(datamodule=other)`` ran the other's.
    Oracle: the scores of the same queries before the test call, which equal the rescaled batch's on a plain twin."""
    model, dve = Tested(), DataValueEmbedding(save_dir, projection_dim=None, report=None)
    trainer = L.Trainer(callbacks=[dve], accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, max_epochs=2)
    trainer.fit(model, datamodule=RescalingData())
    emb = dve.embeddings
    before, exact = emb.influence(model, test_batch).scores, emb.exact_influence(model, test_batch).scores
    by_hand = {**test_batch, "x": test_batch["x"] * 3.0}
    torch.testing.assert_close(before, emb.influence(twin(model), by_hand).scores, rtol=1e-12, atol=0)
    other = type("Unscaled", (RescalingData,), {"scale": 1.0})
    for call in (lambda: trainer.test(model, dataloaders=RescalingData().test_dataloader(), verbose=False),
                 lambda: trainer.test(model, datamodule=other(), verbose=False)):
        call()
        torch.testing.assert_close(emb.influence(model, test_batch).scores, before, rtol=0, atol=0)
        torch.testing.assert_close(emb.exact_influence(model, test_batch).scores, exact, rtol=0, atol=0)
    assert isinstance(trainer.datamodule, other)  # as Lightning left it


def test_a_handle_from_load_warns_once_that_it_cannot_run_the_fit_s_datamodule_hooks(save_dir, test_batch):
    """The fit's DataModule rescaled every training batch in ``on_after_batch_transfer``; a handle from ``load``
    queried with a module attached to no Trainer (as in a new process) scored the raw batch: silently other scores
    (the fit's handle, which runs the hooks, is the oracle). The manifest names the hooks; the loaded handle warns
    once, and the batch rescaled by hand scores as the fit's handle does. The module the fit trained, still attached
    to its Trainer, gets the DataModule's hooks through Lightning's dispatch: no warning. Nor is a DataModule
    without such hooks warned about."""
    model, dve = Tested(), DataValueEmbedding(save_dir, projection_dim=None, report=None)
    trainer = L.Trainer(callbacks=[dve], accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, max_epochs=1)
    trainer.fit(model, datamodule=RescalingData())
    assert dve.embeddings.store.manifest["datamodule_hooks"] == ["on_after_batch_transfer"]
    fitted = dve.embeddings.influence(model, test_batch).scores
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attached = DataValueEmbeddings.load(save_dir).influence(model, test_batch).scores
    torch.testing.assert_close(attached, fitted, rtol=1e-12, atol=0)
    detached, loaded = Tested(), DataValueEmbeddings.load(save_dir)
    detached.load_state_dict(model.state_dict())
    with pytest.warns(UserWarning, match=r"fit ran its LightningDataModule's \['on_after_batch_transfer'\] on every "
                                         r"training batch, which this handle \(from DataValueEmbeddings.load\(\), or "
                                         r"of a fit whose loader held no dataset of samples\) cannot run"
                                         r".*given once per handle") as caught:
        raw = loaded.influence(detached, test_batch).scores
    assert [w.filename for w in caught if "LightningDataModule" in str(w.message)] == [__file__]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per handle
        by_hand = loaded.influence(detached, {**test_batch, "x": test_batch["x"] * 3.0}).scores
    torch.testing.assert_close(by_hand, fitted, rtol=1e-12, atol=0)
    assert not torch.allclose(raw, fitted, rtol=1e-3, atol=0)
    plain = type("Plain", (L.LightningDataModule,), {"train_dataloader": RescalingData.train_dataloader})
    trainer = L.Trainer(callbacks=[DataValueEmbedding(save_dir, projection_dim=None, report=None, overwrite=True)],
                        accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False,
                        enable_model_summary=False, max_epochs=1)
    second = Tested()
    trainer.fit(second, datamodule=plain())
    detached.load_state_dict(second.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DataValueEmbeddings.load(save_dir).influence(detached, test_batch)


def test_a_module_of_another_class_tested_on_the_fit_s_trainer_is_queried_with_the_trainer_s_hooks(
        fit, save_dir, test_batch):
    """The fit's dispatch is put back for the module the fit trained only: for another one that a later
    ``trainer.test`` attached (an evaluation subclass), Lightning checks the dispatch against the module's class,
    and the fit's sent its hooks to a DataModule that does not exist (``TypeError``)."""
    model, dve = Tested(), DataValueEmbedding(save_dir, projection_dim=None, report=None)
    trainer = fit(model, dve)
    evaluated = type("Evaluated", (Tested,), {})()
    evaluated.load_state_dict(model.state_dict())
    before = dve.embeddings.influence(evaluated, test_batch).scores
    trainer.test(evaluated, dataloaders=DataLoader(DigitsDict(range(1500, 1512)), batch_size=6), verbose=False)
    torch.testing.assert_close(dve.embeddings.influence(evaluated, test_batch).scores, before, rtol=0, atol=0)


def test_the_report_and_a_query_score_the_reference_alike(fit, save_dir, make_loader):
    """The report's per-sample totals are the scores of the queries' mean test gradient over the same loader's
    batches: the hooks run once (the report converts the precision only, the query runs the hooks)."""
    model = Normalising()
    dve = DataValueEmbedding(save_dir, projection_dim=None)
    val = make_loader(n=24, batch_size=12, offset=1500)
    fit(model, dve, val=val)
    grads = [dve.embeddings.test_gradients(model, batch) for batch in val]
    mean = {name: torch.cat([g[name] for g in grads]).mean(0, keepdim=True) for name in grads[0]}
    expected = dve.embeddings.score(mean)
    rows = (save_dir / "report" / "sample_totals.csv").read_text().splitlines()[1:]
    reported = {int(i): float(v) for i, v in (row.split(",") for row in rows)}
    assert len(reported) == len(expected.sample_ids) == 64
    for sample, score in zip(expected.sample_ids.tolist(), expected.scores[0].tolist()):
        assert reported[sample] == pytest.approx(score, rel=1e-5, abs=1e-12)


def test_the_exact_replay_report_scores_the_reference_as_a_query_after_fit(fit, save_dir, make_loader):
    """``curve_source="exact_replay"``: the report's reference loss runs the hooks as after ``fit`` (no training
    stage: its augmentation under ``self.trainer.training`` off) while the replayed steps run in it; the totals are
    ``exact_influence``'s on the reference after ``fit``, averaged over its points."""
    from lightning_dve import ReportConfig

    model = TrainerBound()
    dve = DataValueEmbedding(save_dir, projection_dim=None, report=ReportConfig(curve_source="exact_replay"))
    val = make_loader(n=24, batch_size=12, offset=1500)
    fit(model, dve, val=val)
    batches = list(val)
    whole = {key: torch.cat([b[key] for b in batches]) for key in batches[0]}
    expected = dve.embeddings.exact_influence(model, whole)
    rows = (save_dir / "report" / "sample_totals.csv").read_text().splitlines()[1:]
    reported = {int(i): float(v) for i, v in (row.split(",") for row in rows)}
    scale = float(expected.scores.mean(0).abs().max())
    for sample, score in zip(expected.sample_ids.tolist(), expected.scores.mean(0).tolist()):
        assert reported[sample] == pytest.approx(score, rel=1e-4, abs=1e-5 * scale)


def test_hooks_run_once_in_eval_mode_on_a_copy_and_the_report_sees_them_as_after_fit(fit, save_dir, test_batch,
                                                                                      make_loader):
    """Hooks that edit the batch dict in place and augment while training: a query runs them in eval mode (the
    module is left in train mode by ``fit``) on a copy of the containers, so two queries agree, the caller's batch
    stays as it was, and the scores are the plain module's on the batch transformed once; the report, which runs
    at train end while the Trainer still trains, scores its reference batches as a query after ``fit`` does
    (before: random scores, the caller's batch rescaled at each query, and an augmented report reference)."""
    model = AugmentingInPlace()
    dve = DataValueEmbedding(save_dir, projection_dim=None)
    val = make_loader(n=24, batch_size=12, offset=1500)
    fit(model, dve, val=val)
    assert model.training
    caller = {name: value.clone() for name, value in test_batch.items()}
    first, second = (dve.embeddings.influence(model, test_batch).scores for _ in range(2))
    assert all(torch.equal(test_batch[name], caller[name]) for name in caller)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(first, dve.embeddings.influence(twin(model), rescaled(test_batch)).scores, rtol=1e-12,
                               atol=0)
    grads = [dve.embeddings.test_gradients(twin(model), rescaled(batch)) for batch in val]
    mean = {name: torch.cat([g[name] for g in grads]).mean(0, keepdim=True) for name in grads[0]}
    expected = dve.embeddings.score(mean)
    rows = (save_dir / "report" / "sample_totals.csv").read_text().splitlines()[1:]
    reported = {int(i): float(v) for i, v in (row.split(",") for row in rows)}
    scale = float(expected.scores.abs().max())  # float32 sums in another order: 1e-5 of the largest score
    for sample, score in zip(expected.sample_ids.tolist(), expected.scores[0].tolist()):
        assert reported[sample] == pytest.approx(score, rel=1e-5, abs=1e-5 * scale)


def test_hooks_that_read_the_trainer_run_after_fit_and_are_left_out_without_one(fit, save_dir, test_batch):
    """After ``fit`` the module's Trainer is not training (no augmentation), and the hooks run; a copy attached to
    no Trainer cannot run a hook reading ``self.trainer``: the query leaves the hooks out with a warning saying
    so (scored as the batch given). A hook failing otherwise (a batch the hooks already ran on) is refused."""
    model = TrainerBound()
    dve = DataValueEmbedding(save_dir, projection_dim=None, report=None)
    fit(model, dve)
    torch.testing.assert_close(dve.embeddings.influence(model, test_batch).scores,
                               dve.embeddings.influence(twin(model), rescaled(test_batch)).scores, rtol=1e-12, atol=0)
    unattached = TrainerBound()
    unattached.load_state_dict(model.state_dict())
    loaded = DataValueEmbeddings.load(save_dir)
    with pytest.warns(UserWarning, match="TrainerBound's batch transfer hooks read self.trainer, and the module is "
                                         "attached to no Trainer: the query leaves"):
        scores = loaded.influence(unattached, test_batch).scores
    torch.testing.assert_close(scores, loaded.influence(twin(model), test_batch).scores, rtol=1e-12, atol=0)
    with pytest.raises(ConfigError, match=r"transfer hooks .*failed on the test batch \(KeyError: 'x'\).*not one the "
                                          "hooks already ran on"):
        loaded.influence(model, {"pixels": test_batch["x"], "y": test_batch["y"], "index": test_batch["index"]})


def test_a_hook_that_edits_tensors_in_place_leaves_the_caller_s_batch_and_the_reference_as_they_were(
        fit, save_dir, test_batch):
    """The CPU transfer returns the batch's own tensors: before session 30 each query divided the caller's inputs
    by 16 again (two queries disagreed), and the report's ``reference=`` batch was divided at every segment
    boundary and at train end. A hook's own ``RuntimeError`` is refused naming the hooks, not taken for Lightning's
    missing-Trainer error."""
    model = ScalingTensorsInPlace()
    reference = {name: value[:6].clone() for name, value in test_batch.items()}
    kept = {name: value.clone() for name, value in reference.items()}
    dve = DataValueEmbedding(save_dir, projection_dim=None, segments=2, reference=reference)
    fit(model, dve)
    assert all(torch.equal(reference[name], kept[name]) for name in kept)
    caller = {name: value.clone() for name, value in test_batch.items()}
    first, second = (dve.embeddings.influence(model, test_batch).scores for _ in range(2))
    assert all(torch.equal(test_batch[name], caller[name]) for name in caller)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(first, dve.embeddings.influence(twin(model), {**test_batch, "x": test_batch["x"] / 16})
                               .scores, rtol=1e-12, atol=0)
    with pytest.raises(ConfigError, match=r"transfer hooks .*failed on the test batch \(RuntimeError: no labels\)"):
        dve.embeddings.influence(model, {"x": test_batch["x"], "index": test_batch["index"]}, loss_fn=lambda m, b:
                                 m(b["x"]).sum(1))


@pytest.mark.parametrize("module_cls", [WithoutBatchIndex, KeywordOnlyIndex, VariadicStep])
def test_a_training_step_without_batch_idx_is_called_as_lightning_calls_it(fit, save_dir, test_batch, make_loader,
                                                                           module_cls):
    """The report is written and the queries score as the same weights with ``batch_idx`` (before: TypeError in
    every default query, and the report skipped)."""
    model = module_cls()
    dve = DataValueEmbedding(save_dir, projection_dim=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(model, dve, val=make_loader(n=24, batch_size=12, offset=1500))
    assert not [w for w in caught if "report is skipped" in str(w.message)]
    assert (save_dir / "report" / "summary.json").is_file()
    plain, emb = twin(model), dve.embeddings
    torch.testing.assert_close(emb.influence(model, test_batch).scores, emb.influence(plain, test_batch).scores,
                               rtol=1e-12, atol=0)
    torch.testing.assert_close(emb.exact_influence(model, test_batch).scores,
                               emb.exact_influence(plain, test_batch).scores, rtol=1e-12, atol=0)


def test_a_loss_reduction_callable_is_recorded_as_weights_in_dve_config(fit, save_dir, test_batch):
    """``DVEConfig(loss_reduction=callable)``, as the callback takes it, is ``WEIGHTS`` (before: refused with a
    message listing a callable as allowed), so ``load(settings=...)`` accepts the store it wrote."""
    def weights(batch: Any) -> torch.Tensor:
        return torch.full((len(batch["y"]),), 1.0 / len(batch["y"]))

    assert DVEConfig(loss_reduction=weights).loss_reduction is LossReduction.WEIGHTS
    fit(TinyMLP(), DataValueEmbedding(save_dir, projection_dim=None, loss_reduction=weights, report=None))
    loaded = DataValueEmbeddings.load(save_dir, loss_weights=weights,
                                      settings=DVEConfig(projection_dim=None, loss_reduction=weights))
    assert loaded.influence(TinyMLP(), test_batch).scores.shape[0] == len(test_batch["y"])
    with pytest.raises(ConfigError, match="allowed values are 'mean', 'sum', or a callable"):
        DVEConfig(loss_reduction="median")


@dataclasses.dataclass
class Inputs:
    """The batch type :class:`AsDataclass`'s hook makes of a loader's dict."""

    x: torch.Tensor
    y: torch.Tensor
    idx: torch.Tensor


class AsDataclass(TinyMLP):
    """Turns the loader's dict into :class:`Inputs` before the transfer; its ids are ``batch.idx``."""

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return Inputs(batch["x"], batch["y"], batch["index"])

    def training_step(self, batch: Inputs, batch_idx: int) -> Any:
        return self.loss({"x": batch.x, "y": batch.y})


def test_exact_replay_reads_ids_of_the_batch_type_the_hooks_make(fit, tmp_path, test_batch):
    """``sample_ids=lambda b: b.idx`` reads the hooked batch, as in training: the replay finds each item's id
    there when the collated dict has none (before: AttributeError, also failing the fit of embeddings='replay').
    Oracle: the same run on dict batches with ``sample_ids="index"``."""
    hooked = DataValueEmbedding(tmp_path / "hooked", projection_dim=None, report=None, sample_ids=lambda b: b.idx)
    plain = DataValueEmbedding(tmp_path / "plain", projection_dim=None, report=None)
    models = AsDataclass(), TinyMLP()
    fit(models[0], hooked)
    fit(models[1], plain)
    torch.testing.assert_close(hooked.embeddings.exact_influence(models[0], test_batch, per_step=True).scores,
                               plain.embeddings.exact_influence(models[1], test_batch, per_step=True).scores,
                               rtol=1e-6, atol=1e-9)


class RenumberingIds(TinyMLP):
    """Maps the loader's positions to the run's ids (``index + 1000``) in ``on_after_batch_transfer``."""

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return {**batch, "index": batch["index"] + 1000}


def test_exact_replay_reads_ids_a_hook_renumbers_as_training_did(fit, tmp_path, test_batch):
    """Training records the hooked ids (1000 + position); the replay reads each item's id from the hooked batch
    too (before: from the collated one, refusing 'ids not in the dataset', and where the hook permutes ids within
    a batch, scoring every occurrence as another sample's, silently). Oracle: the plain run, ids shifted."""
    renumbered = DataValueEmbedding(tmp_path / "renumbered", projection_dim=None, report=None)
    plain = DataValueEmbedding(tmp_path / "plain", projection_dim=None, report=None)
    models = RenumberingIds(), TinyMLP()
    fit(models[0], renumbered)
    fit(models[1], plain)
    got = renumbered.embeddings.exact_influence(models[0], test_batch, per_step=True)
    expected = plain.embeddings.exact_influence(models[1], test_batch, per_step=True)
    assert got.sample_ids.tolist() == [i + 1000 for i in expected.sample_ids.tolist()]
    torch.testing.assert_close(got.scores, expected.scores, rtol=1e-6, atol=1e-9)
    after_load = DataValueEmbeddings.load(tmp_path / "plain")
    with pytest.raises(ConfigError, match="sample_ids cannot read the batches the replay rebuilds with collate_fn"):
        after_load.exact_influence(models[1], test_batch, dataset=DigitsDict(range(64)), sample_ids=lambda b: b.idx)
    # a key the batches lack is named (before session 30, after fit: every item taken as dropped by the hooks and
    # the ids refused as 'not in the dataset', whose fix is another dataset)
    with pytest.raises(SampleIdError, match="batch has no key 'uuid'"):
        renumbered.embeddings.exact_influence(models[0], test_batch, sample_ids="uuid")


class DroppingZeros(TinyMLP):
    """Drops the rows of label 0 in ``on_after_batch_transfer`` (a one-sample batch of one becomes empty)."""

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        kept = batch["y"] != 0
        return {key: value[kept] for key, value in batch.items()}


def test_exact_replay_reads_the_id_of_an_item_the_hook_drops_from_the_collated_batch(fit, tmp_path, test_batch):
    """A hook that drops rows leaves a one-sample batch without the id the replay's id scan reads (ids are not
    positions here: a Subset): it is read from the collated batch (the first version raised SampleIdError)."""
    from torch.utils.data import DataLoader, Subset

    model, dve = DroppingZeros(), DataValueEmbedding(tmp_path / "dve", projection_dim=None, report=None)
    fit(model, dve, DataLoader(Subset(DigitsDict(range(200)), range(100, 164)), batch_size=16))
    result = dve.embeddings.exact_influence(model, test_batch)
    assert set(result.sample_ids.tolist()) <= set(range(100, 164)) and result.scores.shape[1] == len(result.sample_ids)


class DroppingZerosAsDataclass(AsDataclass):
    """:class:`AsDataclass` that also drops the rows of label 0 (after the transfer)."""

    def on_after_batch_transfer(self, batch: Inputs, dataloader_idx: int) -> Any:
        kept = batch.y != 0
        return Inputs(batch.x[kept], batch.y[kept], batch.idx[kept])


def test_items_the_hooks_drop_are_left_out_of_the_replay_s_id_scan(fit, tmp_path, test_batch):
    """An item the hooks drop was never trained on: the id scan leaves it out rather than reading the collated
    batch with a sample_ids written for the hooked type (the first fallback: a ConfigError blaming load)."""
    from torch.utils.data import DataLoader, Subset

    model = DroppingZerosAsDataclass()
    dve = DataValueEmbedding(tmp_path / "dve", projection_dim=None, report=None, sample_ids=lambda b: b.idx)
    fit(model, dve, DataLoader(Subset(DigitsDict(range(200)), range(100, 164)), batch_size=16))
    result = dve.embeddings.exact_influence(model, test_batch)
    assert set(result.sample_ids.tolist()) <= set(range(100, 164)) and result.scores.shape[1] == len(result.sample_ids)
