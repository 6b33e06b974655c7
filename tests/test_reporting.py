"""The train-end report end to end: files under ``save_dir/report/``, and what real loggers wrote, read back.

W&B runs are real offline runs; their ``.wandb`` transaction log is parsed here (wandb 0.31 ships no Python
reader): it is LevelDB's log format (a 7-byte ``:W&B`` header, 32 KiB blocks of records with a 7-byte
``crc32, length, type`` header, split records joined), each record a ``wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import dataclasses

import csv
import glob
import importlib.util
import json
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from lightning_dve import ConfigError, DataValueEmbedding
from lightning_dve.config import ReportConfig
from lightning_dve.reporting_loggers import CURVE_COLUMNS
from tests.conftest import DigitsDict, TinyMLP

ROOT = Path(__file__).resolve().parents[1]
SMALL = ReportConfig(top_k=3, max_reference_samples=40, histogram_bins=8)


class ImageDigits(Dataset):
    """Digits ``indices`` as ``{"x": float32 [1, 8, 8], "y": long, "index": long}``."""

    def __init__(self, indices: range) -> None:
        self.items = DigitsDict(indices)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = self.items[i]
        return {**item, "x": item["x"].reshape(1, 8, 8)}


class ImageMLP(TinyMLP):
    """TinyMLP on ``[B, 1, 8, 8]`` inputs, with a validation loss and a per-step learning-rate schedule."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log("val_loss", F.cross_entropy(self(batch["x"]), batch["y"]))

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1.0 / (1.0 + 0.1 * t))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def loaders(n_train: int = 64) -> tuple[DataLoader, DataLoader]:
    """Digits 0..n_train-1 in batches of 16, and 64 held-out digits (1500..1563) in batches of 16."""
    return (DataLoader(ImageDigits(range(n_train)), batch_size=16),
            DataLoader(ImageDigits(range(1500, 1564)), batch_size=16))


def report_dir(callback: DataValueEmbedding) -> Path:
    return callback.embeddings.store.root / "report"


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def direct_curve(callback: DataValueEmbedding, model: TinyMLP, reference: dict[str, torch.Tensor]) -> torch.Tensor:
    """``mean over reference samples and over each step's samples of <g_test, e>`` / lr, from per-sample scores."""
    embeddings = callback.embeddings
    result = embeddings.influence(model, reference, per_step=True)  # [n, m]: no mean-gradient shortcut
    per_occurrence = result.scores.double().mean(dim=0)
    steps = torch.tensor(embeddings.steps)
    means = torch.stack([per_occurrence[result.steps == step].mean() for step in steps])
    return means / embeddings.learning_rates[:, 0]


def wandb_records(run_dir: Path) -> Iterator[Any]:
    """Every protobuf record of an offline run's ``run-*.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = next(run_dir.glob("run-*.wandb")).read_bytes()
    assert data[:4] == b":W&B"
    position, pending, block = 7, b"", 32768
    while position + 7 <= len(data):
        if block - position % block < 7:  # block trailer too small for a header: skip to the next block
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if position + 7 + length > len(data):  # a record wandb-core is still writing: read it next time
            return
        chunk, position = data[position + 7 : position + 7 + length], position + 7 + length
        if kind in (1, 4):  # FULL, LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending + chunk)
            pending = b""
            yield record
        elif kind in (2, 3):  # FIRST, MIDDLE
            pending += chunk


def finished_run_records(run_dir: Path, timeout: float = 20.0) -> list[Any]:
    """The run's records once its ``exit`` record is on disk (wandb-core may still be writing after finish)."""
    deadline = time.monotonic() + timeout
    while True:
        records = list(wandb_records(run_dir))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def item_key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


# --- files and correctness ----------------------------------------------------------------------------------


def test_curve_files_equal_direct_scores_with_the_reference_cap(fit, tmp_path, capsys):
    train, val = loaders()
    model, callback = ImageMLP(), DataValueEmbedding(tmp_path / "dve", projection_dim=None, report=SMALL)
    fit(model, callback, train, val, max_epochs=2, precision="64-true")
    model.double()
    directory = report_dir(callback)
    assert {p.name for p in directory.iterdir()} >= {"curve.csv", "epochs.csv", "stages.csv", "sample_totals.csv",
                                                     "histogram.csv", "top_k.csv", "summary.json", "curve.png",
                                                     "epochs.png", "histogram.png", "top_k.png"}
    rows = read_csv(directory / "curve.csv")
    assert list(rows[0]) == CURVE_COLUMNS
    assert [int(r["step"]) for r in rows] == callback.embeddings.steps == list(range(8))
    # one segment: no intermediate boundary, so no dynamics rows (just the header)
    assert (directory / "dynamics.csv").read_text().splitlines() == [
        "boundary,boundary_step,segment,first_step,last_step,influence"]
    assert [float(r["lr"]) for r in rows] == pytest.approx([0.1 / (1 + 0.1 * t) for t in range(8)])
    reference = {key: value[:40] for key, value in DigitsDict(range(1500, 1540)).batch().items()}
    reference["x"] = reference["x"].reshape(-1, 1, 8, 8).double()
    expected = direct_curve(callback, model, reference)
    assert torch.tensor([float(r["influence_per_lr"]) for r in rows], dtype=torch.float64) == pytest.approx(
        expected, rel=1e-9, abs=1e-15)
    summary = json.loads((directory / "summary.json").read_text())
    assert summary["reference"] == {"n_samples": 40, "source": "the validation dataloader"}
    totals = callback.embeddings.influence(model, reference).scores.double().mean(dim=0)
    assert [r["sample_id"] for r in summary["top_k"]["helpful"]] == torch.topk(totals, 3).indices.tolist()
    assert summary["top_k"]["helpful"][0]["label"] is not None
    assert "DVE reference gradient" not in capsys.readouterr().err  # the trainer's progress bar is off
    if "matplotlib.pyplot" in sys.modules:
        assert sys.modules["matplotlib.pyplot"].get_fignums() == []


def test_exact_replay_curve_equals_the_exact_influence_of_the_reference(fit, tmp_path):
    """``curve_source="exact_replay"``: the curve is the exact first-order influence on the mean reference loss,
    equal to the mean over reference samples of :meth:`exact_influence` (linear in the target), and not the
    embeddings' curve."""
    train, val = loaders()
    config = dataclasses.replace(SMALL, curve_source="exact_replay")
    model, callback = ImageMLP(), DataValueEmbedding(tmp_path / "dve", projection_dim=None, report=config)
    fit(model, callback, train, val, max_epochs=2, precision="64-true")
    model.double()
    rows = read_csv(report_dir(callback) / "curve.csv")
    assert json.loads((report_dir(callback) / "summary.json").read_text())["settings"]["curve_source"] == "exact_replay"
    reference = {key: value[:40] for key, value in DigitsDict(range(1500, 1540)).batch().items()}
    reference["x"] = reference["x"].reshape(-1, 1, 8, 8).double()
    exact = callback.embeddings.exact_influence(model, reference, per_step=True)
    per_occurrence = exact.scores.double().mean(dim=0)
    expected = torch.stack([per_occurrence[exact.steps == step].mean() for step in callback.embeddings.steps])
    got = torch.tensor([float(r["influence"]) for r in rows], dtype=torch.float64)
    assert got == pytest.approx(expected, rel=1e-8, abs=1e-15)
    embedded = direct_curve(callback, model, reference) * callback.embeddings.learning_rates[:, 0]
    assert not torch.allclose(got, embedded, rtol=1e-3)


def test_replayed_embeddings_feed_the_report(fit, tmp_path):
    """``embeddings="replay"``: the report is written from the replayed embeddings (its curve is theirs), not from
    the recursion's (the same run with ``embeddings="recursion"`` reports another curve). That the replayed
    embeddings are exact replay's: ``tests/test_replay_embeddings.py``."""
    train, val = loaders()
    reference = {key: value[:40] for key, value in DigitsDict(range(1500, 1540)).batch().items()}
    reference["x"] = reference["x"].reshape(-1, 1, 8, 8).double()
    curves = {}
    for method in ("recursion", "replay"):
        model = ImageMLP()
        callback = DataValueEmbedding(tmp_path / method, projection_dim=16, report=SMALL, embeddings=method)
        fit(model, callback, train, val, max_epochs=2, precision="64-true")
        model.double()
        rows = read_csv(report_dir(callback) / "curve.csv")
        curves[method] = torch.tensor([float(r["influence_per_lr"]) for r in rows], dtype=torch.float64)
        assert curves[method] == pytest.approx(direct_curve(callback, model, reference), rel=1e-6, abs=1e-12)
    assert callback.embeddings.store.manifest["embeddings_source"] == "replay"
    assert not torch.allclose(curves["replay"], curves["recursion"], rtol=1e-2)


def test_exact_replay_curve_without_checkpoints_warns_and_uses_the_embeddings(fit, tmp_path):
    train, val = loaders()
    config = dataclasses.replace(SMALL, curve_source="exact_replay")
    callback = DataValueEmbedding(tmp_path / "dve", projection_dim=16, report=config, checkpoint_interval=None)
    with pytest.warns(UserWarning, match="the exact-replay curve is not available .*checkpoint"):
        fit(ImageMLP(), callback, train, val)
    assert (report_dir(callback) / "curve.csv").is_file()
    summary = json.loads((report_dir(callback) / "summary.json").read_text())
    assert summary["settings"]["curve_source"] == "embeddings"  # the source used, not the one asked for


def test_user_reference_batch_and_describe(fit, tmp_path):
    train, _ = loaders()
    reference = next(iter(DataLoader(ImageDigits(range(1500, 1510)), batch_size=10)))
    callback = DataValueEmbedding(tmp_path / "dve", projection_dim=16, report=SMALL, reference=reference,
                                  describe=lambda sample: f"digit {int(sample['y'])} #{int(sample['index'])}",
                                  segments=2)
    model = ImageMLP()
    fit(model, callback, train, max_epochs=2)
    rows = read_csv(report_dir(callback) / "curve.csv")  # segment-local embeddings, carried-back query
    expected = direct_curve(callback, model, reference)
    assert [float(r["influence_per_lr"]) for r in rows] == pytest.approx(expected.tolist(), rel=1e-4)
    summary = json.loads((report_dir(callback) / "summary.json").read_text())
    assert summary["reference"] == {"n_samples": 10, "source": "the `reference` batch"}
    for row in summary["top_k"]["helpful"] + summary["top_k"]["harmful"]:
        assert row["description"] == f"digit {row['label']} #{row['sample_id']}"


def test_a_describe_that_fails_gives_its_error_as_the_text_and_keeps_the_report(fit, tmp_path):
    """``describe=lambda s: s["text"]`` on samples without that key raised KeyError out of the finished fit, after
    scanning the whole loader, and no report was written."""
    train, val = loaders()
    callback = DataValueEmbedding(tmp_path / "dve", projection_dim=16, report=SMALL, describe=lambda s: s["text"])
    fit(ImageMLP(), callback, train, val)
    summary = json.loads((report_dir(callback) / "summary.json").read_text())
    rows = summary["top_k"]["helpful"] + summary["top_k"]["harmful"]
    assert rows and all(r["description"] == "describe failed: KeyError: 'text'" and r["label"] for r in rows)


NON_ASCII_FIT = r"""
import sys
import lightning as L
from torch.utils.data import DataLoader
from lightning_dve import DataValueEmbedding
from tests.conftest import DigitsDict, TinyMLP
dve = DataValueEmbedding(sys.argv[1], projection_dim=16, reference=DigitsDict(range(1500, 1508)).batch(),
                         describe=lambda sample: f"Ziffer {int(sample['y'])} \u2013 \u6570\u5b57")
L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False, enable_checkpointing=False,
          enable_model_summary=False, callbacks=[dve]).fit(TinyMLP(), DataLoader(DigitsDict(range(32)), batch_size=8))
"""


@pytest.mark.slow
def test_a_non_ascii_description_is_written_under_an_ascii_locale(tmp_path):
    """The report's CSV files were written in the locale's encoding: under ``LC_ALL=C`` a ``describe`` returning
    "Ziffer 3 – 数字" raised UnicodeEncodeError out of the finished fit (before session 30). They are UTF-8."""
    env = {**__import__("os").environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    done = subprocess.run([sys.executable, "-c", NON_ASCII_FIT, str(tmp_path / "dve")], env=env, capture_output=True,
                          text=True, encoding="utf-8", errors="replace", cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    text = (tmp_path / "dve" / "report" / "top_k.csv").read_text(encoding="utf-8")
    assert "\u2013 \u6570\u5b57" in text


def test_top_k_samples_are_found_under_gradient_accumulation(fit, tmp_path):
    """Four micro-batches per optimizer step: the top-k scan reads every micro-batch of the run, not one per step
    (which found only the first quarter of the data)."""
    _, val = loaders()
    callback = DataValueEmbedding(tmp_path / "dve", projection_dim=16, describe=lambda sample: f"#{int(sample['index'])}",
                                  report=dataclasses.replace(SMALL, top_k=12))
    fit(ImageMLP(), callback, DataLoader(ImageDigits(range(64)), batch_size=4), val, accumulate_grad_batches=4)
    summary = json.loads((report_dir(callback) / "summary.json").read_text())
    rows = summary["top_k"]["helpful"] + summary["top_k"]["harmful"]
    assert max(r["sample_id"] for r in rows) >= 16  # beyond the first quarter
    assert all(r["description"] == f"#{r['sample_id']}" and r["label"] is not None for r in rows)


def test_top_k_samples_are_found_when_a_shuffled_epoch_stops_early(fit, tmp_path):
    """Training stops after 3 of 6 batches of a shuffled loader whose ids are not positions: every top-k sample is
    read from the dataset (re-iterating the loader draws another order, which missed about half of them)."""
    _, val = loaders()
    train = DataLoader(ImageDigits(range(100, 196)), batch_size=16, shuffle=True,
                       generator=torch.Generator().manual_seed(0))
    callback = DataValueEmbedding(tmp_path / "dve", projection_dim=16, describe=lambda s: f"#{int(s['index'])}",
                                  report=dataclasses.replace(SMALL, top_k=8))
    fit(ImageMLP(), callback, train, val, max_steps=3)
    summary = json.loads((report_dir(callback) / "summary.json").read_text())
    labels = ImageDigits(range(100, 196)).items.y
    for row in summary["top_k"]["helpful"] + summary["top_k"]["harmful"]:
        assert row["description"] == f"#{row['sample_id']}"
        assert row["label"] == str(int(labels[row["sample_id"] - 100]))


def test_no_reference_warns_and_writes_nothing(fit, mlp_cls, tmp_path):
    callback = DataValueEmbedding(tmp_path / "dve", projection_dim=16, report=SMALL)
    with pytest.warns(UserWarning, match="no reference set"):
        fit(mlp_cls(), callback)
    assert not (tmp_path / "dve" / "report").exists()


def test_empty_reference_warns_and_writes_nothing(fit, tmp_path):
    train, _ = loaders()
    empty = DataLoader(ImageDigits(range(0)), batch_size=4)
    callback = DataValueEmbedding(tmp_path / "dve", projection_dim=16, report=SMALL, reference=empty)
    with pytest.warns(UserWarning, match="the `reference` DataLoader\\) holds no sample"):
        fit(ImageMLP(), callback, train)
    assert not (tmp_path / "dve" / "report").exists()


def test_a_reference_that_training_step_does_not_score_says_what_to_change(fit, tmp_path):
    """A reference batch on which training_step returns None: the report has no loss_fn to pass, so the warning
    must not just say 'pass loss_fn' (it did); it names the reference and the change that applies."""

    class NoneOnReference(ImageMLP):
        def training_step(self, batch, batch_idx):
            return None if "reference" in batch else super().training_step(batch, batch_idx)

    train, _ = loaders()
    reference = {**next(iter(DataLoader(ImageDigits(range(1500, 1510)), batch_size=10))), "reference": torch.ones(10)}
    callback = DataValueEmbedding(tmp_path / "dve", projection_dim=16, report=SMALL, reference=reference)
    with pytest.warns(UserWarning, match=r"report is skipped: .*make training_step return the loss on such batches.*"
                                         r"\(reference: the `reference` batch\)"):
        fit(NoneOnReference(), callback, train)
    assert not (tmp_path / "dve" / "report").exists()


class SummedLoss(ImageMLP):
    """A summed cross-entropy, which the callback's default ``loss_reduction="mean"`` mis-declares."""

    def loss(self, batch):
        return F.cross_entropy(self(batch["x"]), batch["y"], reduction="sum")


def test_a_wrong_reduction_skips_the_report_when_the_reference_batches_hold_one_sample(fit, tmp_path):
    """The reduction is tested on two samples: with validation batches of one sample the report tested nothing and
    logged curves 1e8 times too large, silently. It is now tested on the last training batch of two samples or more
    (here the last training batch holds one)."""
    train = DataLoader(ImageDigits(range(65)), batch_size=16)
    val = DataLoader(ImageDigits(range(1500, 1510)), batch_size=1)
    callback = DataValueEmbedding(tmp_path / "dve", projection_dim=16, report=SMALL)
    with pytest.warns(UserWarning, match=r"the influence report is skipped: training_step's loss is not the sum of "
                                         r"per-sample losses weighted as loss_reduction='mean' .*\(tested at train "
                                         r"end on a training batch\)"):
        fit(SummedLoss(), callback, train, val)
    assert not report_dir(callback).exists() and callback.embeddings.store.manifest["embeddings"] == "complete"


class TupleValidation(ImageMLP):
    """Validation batches are ``(x, y)`` tuples, with their own ``validation_step``; training batches are dicts."""

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]))


def test_reference_batches_that_training_step_cannot_take_skip_the_report_saying_why(fit, tmp_path):
    """The report runs the validation batches through ``training_step``: batches of another format raised torch's
    TypeError out of the finished fit. Now a warning names the failure and the fix, and the fit returns."""
    train, _ = loaders()
    val = DataLoader([(item["x"], item["y"]) for item in ImageDigits(range(1500, 1516))], batch_size=8)
    callback = DataValueEmbedding(tmp_path / "dve", projection_dim=16, report=SMALL)
    with pytest.warns(UserWarning, match=r"report is skipped: training_step failed on the reference batches "
                                         r"\(TypeError: .*the validation dataloader's, .*pass `reference=`"):
        fit(TupleValidation(), callback, train, val)
    assert not report_dir(callback).exists() and callback.embeddings.store.manifest["embeddings"] == "complete"


class FixedBatchContrastive(ImageMLP):
    """An in-batch contrastive loss written for batches of 16 (its labels are ``arange(16)``)."""

    def loss(self, batch):
        logits = self(batch["x"])
        return F.cross_entropy(logits @ logits.T, torch.arange(16))


def test_a_training_step_that_fails_on_two_samples_leaves_a_fit_without_report_finished(fit, tmp_path):
    """With ``report=None`` the train-end check of the loss runs ``training_step`` on two training samples: a loss
    that only takes full batches raised out of the finished fit. It is an optional check: the fit returns."""
    train, _ = loaders()
    callback = DataValueEmbedding(tmp_path / "dve", projection_dim=16, report=None)
    fit(FixedBatchContrastive(), callback, train)
    assert callback.embeddings.store.manifest["embeddings"] == "complete"


def test_a_training_step_that_fails_on_one_sample_skips_the_report_saying_why(fit, tmp_path):
    """A binary head squeezed with ``.squeeze()`` fails on a one-sample batch, which only the reduction check runs:
    the finished fit warns, naming the check and the fix, instead of raising torch's error after training (it
    did); the embeddings are complete, a query raises the same clear error, and ``loss_fn=`` answers it."""

    class SqueezedBinaryHead(ImageMLP):
        def loss(self, batch):
            logits = self(batch["x"])[:, 0].squeeze()
            return F.binary_cross_entropy_with_logits(logits, (batch["y"] < 5).to(logits.dtype))

    train, val = loaders()
    model, callback = SqueezedBinaryHead(), DataValueEmbedding(tmp_path / "dve", projection_dim=16, report=SMALL)
    with pytest.warns(UserWarning, match=r"report is skipped: training_step failed on a batch of one sample "
                                         r"\(ValueError: .*\.squeeze\(-1\) instead of \.squeeze\(\)"):
        fit(model, callback, train, val)
    assert not (tmp_path / "dve" / "report").exists() and callback.embeddings.store.manifest["embeddings"] == "complete"
    test = next(iter(val))
    with pytest.raises(ConfigError, match="training_step failed on a batch of one sample"):
        callback.embeddings.influence(model, test)

    def per_sample(module, batch):
        logits = module(batch["x"])[:, 0]
        return F.binary_cross_entropy_with_logits(logits, (batch["y"] < 5).to(logits.dtype), reduction="none")

    assert callback.embeddings.influence(model, test, loss_fn=per_sample).scores.shape == (16, 64)


def test_report_none_disables_the_report(fit, tmp_path):
    train, val = loaders()
    callback = DataValueEmbedding(tmp_path / "dve", projection_dim=16, report=None)
    fit(ImageMLP(), callback, train, val)
    assert not (tmp_path / "dve" / "report").exists()


class ImageStream(torch.utils.data.IterableDataset):
    """The items of :class:`ImageDigits` as a stream: no ``__len__`` (its DataLoader's ``len`` raises)."""

    def __init__(self, indices: range) -> None:
        self.items = ImageDigits(indices)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return (self.items[i] for i in range(len(self.items)))


def test_a_reference_loader_without_len_feeds_the_boundaries_and_the_report(fit, tmp_path):
    """A validation loader over an IterableDataset: its unknown length is no error at the segment boundary (where
    it stopped training) nor at train end."""
    train, _ = loaders()
    callback = DataValueEmbedding(tmp_path / "dve", projection_dim=16, report=SMALL, segments=2)
    fit(ImageMLP(), callback, train, DataLoader(ImageStream(range(1500, 1564)), batch_size=16), max_epochs=2)
    assert callback.embeddings.steps == list(range(8))
    summary = json.loads((report_dir(callback) / "summary.json").read_text())
    assert summary["reference"] == {"n_samples": 40, "source": "the validation dataloader"}
    dynamics = read_csv(report_dir(callback) / "dynamics.csv")
    assert {r["boundary"] for r in dynamics} == {"0", "1"}  # the boundary's reference (step 3) and the final one


class FailsOnce(ImageDigits):
    """ImageDigits whose first read raises (a corrupt record the first time the data is read)."""

    failed = False

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not self.failed:
            self.failed = True
            raise RuntimeError("corrupt record")
        return super().__getitem__(i)


def test_a_failing_boundary_reference_warns_and_training_goes_on(fit, tmp_path):
    """Any error of the reference data at a segment boundary (here not a DVEError) is a warning that leaves the
    boundary out of the dynamics; training and the final report go on."""
    train, _ = loaders()
    reference = DataLoader(FailsOnce(range(1500, 1510)), batch_size=10)
    callback = DataValueEmbedding(tmp_path / "dve", projection_dim=16, report=SMALL, reference=reference, segments=2)
    with pytest.warns(UserWarning, match=r"segment boundary \(step 3\) failed \(RuntimeError: corrupt record\)"):
        fit(ImageMLP(), callback, train, max_epochs=2)
    assert callback.embeddings.steps == list(range(8))
    summary = json.loads((report_dir(callback) / "summary.json").read_text())
    assert summary["reference"]["n_samples"] == 10
    assert {r["boundary"] for r in read_csv(report_dir(callback) / "dynamics.csv")} == {"1"}  # the final one only


def test_a_nan_reference_skips_the_report_with_a_warning(fit, tmp_path):
    """A NaN in the reference data makes every curve value NaN: the report is skipped and says why."""
    from lightning.pytorch.loggers import TensorBoardLogger

    train, _ = loaders()
    reference = next(iter(DataLoader(ImageDigits(range(1500, 1520)), batch_size=20)))
    reference["x"][3, 0, 2, 2] = float("nan")
    callback = DataValueEmbedding(tmp_path / "dve", projection_dim=16, report=SMALL, reference=reference)
    logger = TensorBoardLogger(save_dir=str(tmp_path), name="tb")
    with pytest.warns(UserWarning, match=r"report is skipped: the reference gradient is not finite .*20 samples of "
                                         r"the `reference` batch.*NaN in the reference or validation data"):
        fit(ImageMLP(), callback, train, logger=logger)
    assert not report_dir(callback).exists()


def test_curve_csv_columns_hold_the_curves_they_are_named_after(tmp_path: Path) -> None:
    """Oracle: the per-step curve and :func:`curves.smooth` of it. Each column of ``curve.csv`` (and of the W&B
    table, built from the same rows) holds the quantity its header names; at learning rate 0.1 the raw and per-lr
    curves, smoothed or not, all differ, so no two columns can be swapped unnoticed."""
    from lightning_dve import curves
    from lightning_dve.influence import InfluenceResult
    from lightning_dve.reporting import TrainEndReport, write_files
    from lightning_dve.reporting_reference import Reference

    steps = torch.arange(10).repeat_interleave(2)
    scores = torch.randn(2, 20, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    result = InfluenceResult(torch.arange(20), steps, scores)
    config = dataclasses.replace(SMALL, smoothing_fraction=0.3)
    lrs = torch.linspace(0.1, 0.2, 10, dtype=torch.float64)
    summary = curves.summarise(result, list(range(10)), [0] * 5 + [1] * 5, lrs, config)
    report = TrainEndReport(tmp_path / "report", Reference({}, 4, "a test"), "net.0", summary, {}, {})
    rows = read_csv(write_files(report, {})["curve_csv"])
    influence = scores.mean(dim=0).reshape(10, 2).mean(dim=1)
    window = curves.smoothing_window(10, 0.3)
    expected = {"step": torch.arange(10), "epoch": torch.tensor([0] * 5 + [1] * 5), "lr": lrs,
                "n_samples": torch.full((10,), 2), "influence": influence, "influence_per_lr": influence / lrs,
                "influence_smoothed": curves.smooth(influence, window),
                "influence_per_lr_smoothed": curves.smooth(influence / lrs, window)}
    assert window > 1 and list(rows[0]) == CURVE_COLUMNS == list(expected)
    for name, values in expected.items():
        got = torch.tensor([float(row[name]) for row in rows], dtype=torch.float64)
        torch.testing.assert_close(got, values.to(torch.float64), rtol=1e-6, atol=0, msg=name)


def test_non_finite_values_are_null_in_the_files_and_left_out_of_tensorboard(tmp_path):
    """A NaN score (here sample 0's) makes the total ``null`` in summary.json (strict JSON) and ``n/a`` in the
    printed summary; the sample is in neither top-k list (it neither helped nor harmed), and is left out of the
    TensorBoard histogram, which gets the finite totals, and of the per-step scalars: a step
    whose mean influence is undefined logs no point (oracle: the curve's own finite values)."""
    import math

    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing import event_accumulator

    from lightning_dve import curves
    from lightning_dve.influence import InfluenceResult
    from lightning_dve.reporting import TrainEndReport, format_summary, write_files
    from lightning_dve.reporting_reference import Reference
    from lightning_dve.reporting_loggers import log_tensorboard

    scores = torch.tensor([[math.nan, 1.0, 2.0, -1.0, 3.0, -2.0]], dtype=torch.float64)
    result = InfluenceResult(torch.arange(6), torch.tensor([0, 0, 1, 1, 2, 2]), scores)
    config = dataclasses.replace(SMALL, top_k=6)
    summary = curves.summarise(result, [0, 1, 2], [0, 0, 0], torch.full((3,), 0.1), config)
    report = TrainEndReport(tmp_path / "report", Reference({}, 4, "a test"), "net.0", summary, {}, {})
    files = write_files(report, {})

    def refuse(constant: str) -> None:
        raise AssertionError(f"bare {constant} in summary.json")

    written = json.loads(files["summary"].read_text(), parse_constant=refuse)
    assert written["total_influence"] is None
    ranked = written["top_k"]["helpful"] + written["top_k"]["harmful"]
    assert sorted(r["sample_id"] for r in ranked) == [1, 2, 3, 4, 5]  # neither helped nor harmed: NaN left out
    text = format_summary(written, k=6)
    assert "total influence n/a" in text and "id     0" not in text
    logger = TensorBoardLogger(save_dir=str(tmp_path), name="tb")
    log_tensorboard(logger, report, {}, 3)
    events = event_accumulator.EventAccumulator(logger.log_dir, size_guidance={"histograms": 0, "scalars": 0})
    events.Reload()
    assert events.Histograms("dve/samples/total_influence")[0].histogram_value.num == 5
    curve = summary.curve
    finite = [(s, v) for s, v in zip(curve.steps.tolist(), curve.influence.tolist()) if math.isfinite(v)]
    assert 0 < len(finite) < len(curve.steps)
    logged = events.Scalars("dve/curve/influence")
    assert [(e.step, e.value) for e in logged] == [(s, pytest.approx(v, rel=1e-6)) for s, v in finite]


class WarmUpFromZero(ImageMLP):
    """A linear warm-up from learning rate 0: step 0 has lr 0, so its influence / lr is undefined."""

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: min(1.0, t / 4))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def test_steps_with_undefined_influence_per_lr_do_not_count_in_the_stages(fit, tmp_path):
    """The early stage holds only step 0 (lr 0): it has no defined value (``None``, not 0, in the files, the printed
    summary and the loggers); the other stages' means and shares are over their defined steps."""
    from lightning.pytorch.loggers import CSVLogger

    from lightning_dve.reporting import format_summary

    train, val = loaders()
    callback = DataValueEmbedding(tmp_path / "dve", projection_dim=16, report=SMALL)
    logger = CSVLogger(save_dir=str(tmp_path), name="csv")
    fit(WarmUpFromZero(), callback, train, val, max_epochs=2, logger=logger)
    rows = read_csv(report_dir(callback) / "curve.csv")
    assert float(rows[0]["lr"]) == 0.0 and rows[0]["influence_per_lr"] == ""
    per_lr = torch.tensor([float(r["influence_per_lr"]) for r in rows[1:]], dtype=torch.float64)
    summary = json.loads((report_dir(callback) / "summary.json").read_text())
    early, middle, late = summary["stages"]
    assert (early["n_steps"], early["share"], early["abs_share"], early["mean"]) == (1, None, None, None)
    assert middle["mean"] == pytest.approx(per_lr[:6].mean().item())
    assert middle["share"] + late["share"] == pytest.approx(1.0)
    assert "early  steps     0-0      share    n/a" in format_summary(summary)
    metrics = read_csv(Path(logger.log_dir) / "metrics.csv")
    stage_row = next(r for r in metrics if r.get("dve/stages/middle/mean"))
    assert stage_row.get("dve/stages/early/mean", "") == ""


# --- loggers, read back -------------------------------------------------------------------------------------


def test_wandb_offline_run_is_read_back(fit, wandb_env, capsys):
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    train, val = loaders()
    callback = DataValueEmbedding(wandb_env / "dve", projection_dim=16, report=SMALL)
    logger = WandbLogger(offline=True, save_dir=str(wandb_env), project="dve-test")
    try:
        trainer = fit(ImageMLP(), callback, train, val, max_epochs=2, logger=logger, log_every_n_steps=1,
                      enable_progress_bar=True)
        run_dir = Path(logger.experiment.dir).parent
    finally:
        wandb.finish()
    assert "DVE reference gradient" in capsys.readouterr().err
    records = finished_run_records(run_dir)
    history = [{item_key(i): json.loads(i.value_json) for i in r.history.item} for r in records
               if r.WhichOneof("record_type") == "history"]
    dve_rows = [row for row in history if any(key.startswith("dve/") for key in row)]
    assert len(dve_rows) == 1  # everything in one log_metrics call
    row = dve_rows[0]
    assert row["_step"] == max(h["_step"] for h in history)
    # logged at the run's current trainer step (step_sync), never at a past one
    assert row["trainer/global_step"] == max(h.get("trainer/global_step", 0) for h in history)
    assert 0 < row["trainer/global_step"] <= trainer.global_step
    for key in ("dve/curve/table/_type", "dve/curve/influence_per_lr_table/_type", "dve/top_k/helpful/_type",
                "dve/top_k/harmful/_type", "dve/stages/table/_type", "dve/epochs/table/_type",
                "dve/samples/total_influence/_type", "dve/figures/curve/_type", "dve/stages/early/share",
                "dve/stages/late/abs_share", "dve/reference/n_samples", "dve/total_influence"):
        assert key in row, key
    assert row["dve/reference/n_samples"] == 40
    summary = json.loads((report_dir(callback) / "summary.json").read_text())
    assert row["dve/stages/early/share"] == pytest.approx(summary["stages"][0]["share"])
    manifest = json.loads((wandb_env / "dve" / "manifest.json").read_text())  # the store's disk use, as measured
    assert summary["disk"] == {key: manifest[key] for key in ("bytes_total", "bytes_steps", "bytes_per_step")}
    assert {key: row[f"dve/disk/{key}"] for key in summary["disk"]} == summary["disk"]
    assert 0 < manifest["bytes_steps"] < manifest["bytes_total"]
    charts = {item_key(i) for r in records if r.WhichOneof("record_type") == "config" for i in r.config.update}
    assert {"_wandb/visualize/dve/curve/influence", "_wandb/visualize/dve/curve/influence_per_lr",
            "_wandb/visualize/dve/curve/influence_per_lr_smoothed"} <= charts
    media = run_dir / "files" / row["dve/curve/table/path"]
    table = json.loads(media.read_text())
    assert table["columns"] == CURVE_COLUMNS
    assert table["data"] == [[_number(v) for v in r.values()] for r in read_csv(report_dir(callback) / "curve.csv")]
    top = json.loads((run_dir / "files" / row["dve/top_k/helpful/path"]).read_text())
    assert top["columns"][-1] == "image"
    assert [r[1] for r in top["data"]] == [r["sample_id"] for r in summary["top_k"]["helpful"]]
    staged = [entry.local_path for r in records if r.WhichOneof("record_type") == "artifact"
              for entry in r.artifact.manifest.contents if entry.path == "dve/top_k/helpful.table.json"]
    cells = json.loads(Path(staged[0]).read_text())["data"]
    assert all(cell[-1]["_type"] == "image-file" for cell in cells)  # inputs rendered as wandb.Image


def _number(text: str) -> int | float:
    value = float(text)
    return int(value) if value.is_integer() and "." not in text and "e" not in text else value


def test_tensorboard_event_files_are_read_back(fit, tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing import event_accumulator

    train, val = loaders()
    callback = DataValueEmbedding(tmp_path / "dve", projection_dim=16, report=SMALL)
    logger = TensorBoardLogger(save_dir=str(tmp_path), name="tb")
    fit(ImageMLP(), callback, train, val, max_epochs=2, logger=logger)
    events = event_accumulator.EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "images": 0,
                                                                              "histograms": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    per_lr = events.Scalars("dve/curve/influence_per_lr")
    rows = read_csv(report_dir(callback) / "curve.csv")
    assert [e.step for e in per_lr] == [int(r["step"]) for r in rows]
    assert [e.value for e in per_lr] == pytest.approx([float(r["influence_per_lr"]) for r in rows], rel=1e-5)
    assert {"dve/curve/influence", "dve/curve/influence_per_lr_smoothed", "dve/stages/early/share",
            "dve/total_influence"} <= set(tags["scalars"])
    assert {"dve/figures/curve", "dve/figures/histogram", "dve/figures/top_k"} <= set(tags["images"])
    assert "dve/samples/total_influence" in tags["histograms"]
    assert {"dve/top_k/helpful/text_summary", "dve/stages/text_summary"} <= set(tags["tensors"])


def test_csv_logger_gets_per_step_and_summary_scalars(fit, tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    train, val = loaders()
    callback = DataValueEmbedding(tmp_path / "dve", projection_dim=16, report=SMALL)
    logger = CSVLogger(save_dir=str(tmp_path), name="csv")
    trainer = fit(ImageMLP(), callback, train, val, max_epochs=2, logger=logger)
    metrics = read_csv(Path(logger.log_dir) / "metrics.csv")
    curve = [r for r in metrics if r.get("dve/curve/influence_per_lr")]
    assert [int(r["step"]) for r in curve] == callback.embeddings.steps
    summary = [r for r in metrics if r.get("dve/stages/early/share")]
    assert len(summary) == 1 and int(summary[0]["step"]) == trainer.global_step
    expected = json.loads((report_dir(callback) / "summary.json").read_text())["stages"][0]["share"]
    assert float(summary[0]["dve/stages/early/share"]) == pytest.approx(expected)


# --- the example --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("logger", ["wandb", "tensorboard", "csv", "none"])
def test_digits_example_smoke(logger, wandb_env, capsys):
    spec = importlib.util.spec_from_file_location("digits_example", ROOT / "examples" / "digits.py")
    digits = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(digits)
    out = wandb_env / "run"
    report = digits.main(["--max-epochs", "1", "--train-size", "96", "--val-size", "48", "--logger", logger,
                          "--out", str(out), "--projection-dim", "32", "--no-progress-bar"])
    printed = capsys.readouterr().out
    assert (report / "summary.json").is_file() and (report / "curve.png").is_file()
    assert "Stage summary" in printed and "Top-5 helpful" in printed and "Top-5 harmful" in printed
    assert f"Report folder: {report}" in printed
    if logger == "wandb":
        assert "W&B run (offline)" in printed and glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))


@pytest.mark.slow
def test_digits_example_under_ddp_reports_once(wandb_env):
    """``--devices 2``: two gloo ranks on the CPU (Lightning starts rank 1 as a second run of the script); rank 0's
    store holds the whole run, and one report, one offline W&B run and one printed summary come out."""
    out = wandb_env / "run"
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "digits.py"), "--devices", "2", "--max-epochs", "1",
                           "--train-size", "96", "--val-size", "48", "--out", str(out), "--projection-dim", "32",
                           "--no-progress-bar"], capture_output=True, text=True, timeout=300, cwd=wandb_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("Top-5 helpful") == 1 and proc.stdout.count("W&B run (offline)") == 1
    manifest = json.loads((out / "dve" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["embeddings"] == "complete"
    assert (out / "dve" / "report" / "summary.json").is_file()
    assert len(glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))) == 1


def test_a_failed_boundary_reference_write_stops_the_fit_at_the_next_check(fit, tmp_path, monkeypatch):
    """The boundary reference is written on rank 0 only, after the step's agreement point: its error is kept and
    raised at the next check where the ranks agree (so under DDP every rank stops), and the steps are kept."""
    import errno

    from lightning_dve import StoreError
    from lightning_dve.files import write_error
    from lightning_dve.store import TrajectoryStore

    def full_disk(store, step, gradients):
        raise write_error(store.root / "references" / f"step_{step}", OSError(errno.ENOSPC, "No space left on device"))

    monkeypatch.setattr(TrajectoryStore, "write_reference", full_disk)
    train, _ = loaders()
    reference = next(iter(DataLoader(ImageDigits(range(1500, 1510)), batch_size=10)))
    callback = DataValueEmbedding(tmp_path / "dve", projection_dim=16, report=SMALL, reference=reference, segments=2)
    with pytest.raises(StoreError, match=r"could not write .*references/step_\d+: the disk is full"):
        fit(ImageMLP(), callback, train, max_epochs=2)
    steps = TrajectoryStore.open(tmp_path / "dve").steps
    assert steps and steps == list(range(len(steps)))


def test_a_datamodule_batch_hook_is_applied_as_in_training(tmp_path):
    """A DataModule's ``on_before_batch_transfer`` (here a rescaling) reaches the batches the report and the exact
    replay prepare, as it reaches training's: the replay reproduces the recorded checkpoints only with it."""
    import lightning as L

    from lightning_dve.reporting_reference import prepare_batch

    class Rescaled(L.LightningDataModule):
        def train_dataloader(self) -> DataLoader:
            return DataLoader(DigitsDict(range(64)), batch_size=16)

        def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
            return {**batch, "x": batch["x"] * 3.0}

    model, dve = TinyMLP(), DataValueEmbedding(tmp_path / "dve", projection_dim=None, report=None)
    trainer = L.Trainer(callbacks=[dve], accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, max_epochs=1)
    trainer.fit(model, datamodule=Rescaled())
    raw = DigitsDict(range(1500, 1504)).batch()
    torch.testing.assert_close(prepare_batch(trainer, model, raw)["x"], raw["x"] * 3.0)
    test = Rescaled().on_before_batch_transfer(raw, 0)
    result = dve.embeddings.exact_influence(model, test)  # refused if the replayed batches missed the rescaling
    assert result.scores.shape == (4, 64) and bool(result.scores.abs().sum() > 0)


def test_curve_rates_skip_layers_a_step_did_not_reach():
    """A layer a step did not reach records rate 0 there: the curve uses the first layer that moved, and equal
    rates elsewhere do not warn; rates that really differ do."""
    import warnings
    from types import SimpleNamespace

    from lightning_dve.reporting import _curve_learning_rates

    def embeddings(lrs: list[list[float]], steps: list[int] | None = None) -> SimpleNamespace:
        return SimpleNamespace(learning_rates=torch.tensor(lrs, dtype=torch.float64),
                               steps=steps or list(range(len(lrs))), store=SimpleNamespace(layer_names=["aux", "net"]))

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        name, rates = _curve_learning_rates(embeddings([[0.1, 0.1], [0.0, 0.1], [0.05, 0.05]]))
    assert name == "aux" and rates.tolist() == [0.1, 0.1, 0.05]
    with pytest.warns(UserWarning, match=r"tracked layers used different learning rates; the influence curve is "
                                         r"divided by the learning rate of the first tracked layer, 'aux'\.$"):
        _curve_learning_rates(embeddings([[0.1, 0.2], [0.1, 0.2]]))
    # a warm-up from 0 of the first layer's group only (an audit of session 40): the steps divided by another's rate
    # are named; a step where no layer moved stays undefined
    with pytest.warns(UserWarning, match=r"'aux' \(2 step\(s\), first \[3, 4\], where its rate was 0 while other "
                                         r"layers moved: by the rate of the first layer that did\)"):
        _, rates = _curve_learning_rates(embeddings([[0.0, 0.0], [0.0, 0.2], [0.0, 0.2], [0.1, 0.2]], [2, 3, 4, 5]))
    assert rates.tolist() == [0.0, 0.2, 0.2, 0.1]


@pytest.mark.parametrize("optimizer, clip", [("adamw", None), ("adamw_projected", None), ("sgd", 0.05)])
def test_the_curve_is_divided_by_the_param_groups_learning_rate(fit, tmp_path, optimizer, clip):
    """The recursion's rate folds in clipping and Adam's bias correction (and, projected, its preconditioner): the
    curve's ``lr``, ``DataValueEmbeddings.learning_rates`` and the stage summary use the optimizer's own rate."""
    import warnings

    class Model(ImageMLP):
        def configure_optimizers(self):
            if optimizer.startswith("adamw"):
                return torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=0.01)
            return torch.optim.SGD(self.parameters(), lr=0.5)

    lr = 1e-3 if optimizer.startswith("adamw") else 0.5
    callback = DataValueEmbedding(tmp_path / "dve", projection_dim=1024 if optimizer == "adamw_projected" else None,
                                  report=SMALL)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*tracked layers used different learning rates")
        fit(Model(), callback, *loaders(), max_epochs=2, gradient_clip_val=clip)
    rows = read_csv(report_dir(callback) / "curve.csv")
    assert [float(r["lr"]) for r in rows] == pytest.approx([lr] * 8, rel=1e-12)
    assert torch.equal(callback.embeddings.learning_rates, torch.full((8, 2), lr, dtype=torch.float64))
    assert not torch.allclose(callback.embeddings.store.learning_rates, torch.full((8, 2), lr, dtype=torch.float64))
