"""The train-end report: reference gradient -> curves -> ``save_dir/report/`` -> the trainer's loggers.

The reference set's mean test-loss gradient at the final weights is one query vector ``g_ref``; scoring every
recorded occurrence against it (one dot product each) gives the per-step influence curve of
:mod:`lightning_dve.curves`. Everything here runs on global rank 0 only and holds no collective, so it is
safe under DDP; the embeddings it reads already cover every rank's samples.

Whatever the loggers, the same content is written as CSV, JSON and PNG files under ``<save_dir>/report/``;
:mod:`lightning_dve.reporting_loggers` then logs it to ``trainer.loggers`` under ``dve/...`` keys.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from . import curves, figures, reporting_loggers
from .config import CurveSource, ReportConfig
from .curves import CurveReport
from .reporting_loggers import (
    CURVE_COLUMNS,
    EPOCH_COLUMNS,
    STAGE_COLUMNS,
    TOP_K_COLUMNS,
    clean,
    curve_rows,
    epoch_rows,
    stage_rows,
    top_k_rows,
)
from .dynamics import DYNAMICS_COLUMNS, boundary_rows
from .errors import DVEError
from .influence import DataValueEmbeddings, InfluenceResult
from .reporting_reference import (Reference, convert_batch, reference_gradient, resolve_reference,
                                  trainer_stage)
from .store import TrajectoryStore
from .samples import SampleView, training_samples

#: Folder of the report inside the callback's ``save_dir``.
REPORT_DIR = "report"
#: The manifest's disk use, in the summary and as ``dve/disk/...`` scalars.
DISK_KEYS = ("bytes_total", "bytes_steps", "bytes_per_step")
format_summary = reporting_loggers.format_summary  # public here: the examples import it from this module
top_k_heading = reporting_loggers.top_k_heading


@dataclasses.dataclass(frozen=True)
class TrainEndReport:
    """What :func:`report_train_end` computed and wrote.

    Attributes:
        directory: the report folder.
        reference: the reference query.
        lr_layer: the tracked layer whose learning rate normalises the curve.
        curves: curves, stage summary, phases, histogram and rankings.
        samples: label and rendering of the top-k samples that were found, by sample id.
        files: written files by name (``summary``, ``curve_csv``, ``curve_png``, ...).
        dynamics: the data value dynamics rows (``segments > 1``).
        disk: the store's disk use from its manifest (``bytes_total``, ``bytes_steps``, ``bytes_per_step``).
    """

    directory: Path
    reference: Reference
    lr_layer: str
    curves: CurveReport
    samples: dict[int, SampleView]
    files: dict[str, Path]
    dynamics: list[list[Any]] = dataclasses.field(default_factory=list)
    disk: dict[str, int] = dataclasses.field(default_factory=dict)


def report_train_end(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    embeddings: DataValueEmbeddings | None,
    config: ReportConfig | None,
    reference: Any = None,
    describe: Callable[[Any], str] | None = None,
    sample_ids: str | Callable[[Any], Any] = "index",
) -> TrainEndReport | None:
    """Compute the report, write it under ``<save_dir>/report/`` and log it (global rank 0 only).

    Args:
        trainer: the trainer that just finished ``fit``.
        pl_module: the trained module (queried at its final weights).
        embeddings: the finished embeddings (``None`` on ranks other than 0).
        config: report settings; ``None`` disables the report.
        reference: a batch or a ``DataLoader`` of reference samples; default the trainer's validation loader.
        describe: ``sample -> str`` text of a training sample for the top-k tables.
        sample_ids: the callback's ``sample_ids`` (dict key or ``batch -> ids``), to find top-k samples.

    Returns:
        The report, or ``None`` if disabled, not rank 0, or there is nothing to report.
    """
    if config is None or embeddings is None or not trainer.is_global_zero:
        return None
    show = trainer.progress_bar_callback is not None
    try:
        query = _reference_query(trainer, pl_module, embeddings, config, reference, show)
    except Exception as err:  # noqa: BLE001 -- the user's reference batches through training_step, after the fit
        rank_zero_warn(f"DataValueEmbedding: the influence report is skipped: training_step failed on the reference "
                       f"batches ({type(err).__name__}: {err}). The report takes the reference loss from "
                       "training_step, so the reference batches (the validation dataloader's, or `reference=`) must "
                       "be in the training batches' format: pass `reference=` (a batch or a DataLoader of them), or "
                       "report=None. The embeddings are complete.")
        return None
    if query is None:
        return None
    result, config = _scores(trainer, pl_module, embeddings, config, reference, query)
    lr_layer, lrs = _curve_learning_rates(embeddings)
    summary = curves.summarise(result, embeddings.steps, embeddings.epochs, lrs, config)
    wanted = {s.sample_id for s in (*summary.helpful, *summary.harmful)}
    samples = {}
    if config.render_samples and wanted:
        batches = len(embeddings.steps) * trainer.accumulate_grad_batches * trainer.world_size  # every micro-batch
        samples = training_samples(trainer.train_dataloader, wanted, sample_ids, describe, batches, show)
        if len(samples) < len(wanted):
            rank_zero_warn(f"DataValueEmbedding: {len(wanted) - len(samples)} of the {len(wanted)} top-k training "
                           "samples were not found in the training dataset (or, for a dataset without positions, "
                           "in one pass of the training dataloader; where several loaders were combined, sample_ids "
                           "must read one loader's batch too); their label and rendering are left empty.")
    manifest = embeddings.store.manifest
    report = TrainEndReport(embeddings.store.root / REPORT_DIR, query, lr_layer, summary, samples, {},
                            boundary_rows(embeddings, query.gradients),
                            {key: manifest[key] for key in DISK_KEYS if key in manifest})
    plots = _figures(report) if config.figures else {}
    report.files.update(write_files(report, plots))
    if config.log_to_loggers:
        reporting_loggers.log_to_loggers(trainer, report, plots, config.namespace)
    rank_zero_info(f"DataValueEmbedding: influence report in {report.directory} ({_stage_line(summary)}).")
    return report


def _scores(
    trainer: pl.Trainer, pl_module: pl.LightningModule, embeddings: DataValueEmbeddings, config: ReportConfig,
    reference: Any, query: Reference,
) -> tuple[InfluenceResult, ReportConfig]:
    """Per-step scores of the mean reference loss: one dot product per occurrence, or the exact replay.

    A replay that cannot run (checkpoints off, dropout, ...) warns and falls back to the embeddings.

    Returns:
        The scores, and ``config`` with the curve source they came from (the summary's settings say so).
    """
    if config.curve_source is CurveSource.EXACT_REPLAY:

        def mean_reference_loss(module: torch.nn.Module, _: Any) -> torch.Tensor:
            losses, count = [], 0
            for batch in resolve_reference(trainer, reference)[0] or []:
                with trainer_stage(trainer, None):
                    losses.append(embeddings.test_losses(module, convert_batch(trainer, batch)))
                count += len(losses[-1])
                if count >= query.n_samples:
                    break
            return torch.cat(losses)[: query.n_samples].mean().unsqueeze(0)

        try:
            return embeddings.exact_influence(pl_module, None, loss_fn=mean_reference_loss, per_step=True), config
        except DVEError as err:
            rank_zero_warn(f"DataValueEmbedding: the exact-replay curve is not available ({err}) The report uses the "
                           "embeddings instead.")
    used = dataclasses.replace(config, curve_source=CurveSource.EMBEDDINGS)
    return embeddings.score(query.gradients, per_step=True), used


def save_boundary_reference(
    trainer: pl.Trainer, pl_module: pl.LightningModule, store: TrajectoryStore, config: ReportConfig | None,
    reference: Any, step: int,
) -> None:
    """At a segment boundary during training, keep the reference gradient for the dynamics report (rank 0).

    The training RNG state is preserved (iterating a loader draws a seed from the global generator).

    Args:
        step: the boundary step just closed (it may still be queued for writing, so not yet in ``store.steps``).
    """
    if config is None or not trainer.is_global_zero:
        return
    try:  # any failure of the user's reference data or hooks must not stop training mid-run
        with torch.random.fork_rng(devices=[]):
            query = _reference_query(trainer, pl_module, DataValueEmbeddings(store), config, reference, False)
    except Exception as err:  # noqa: BLE001 -- reported, and training goes on
        rank_zero_warn(f"DataValueEmbedding: the reference gradient at the segment boundary (step {step}) failed "
                       f"({type(err).__name__}: {err}); the dynamics report leaves this boundary out. Training "
                       "continues; check the reference data (`reference=` or the validation dataloader).")
        return
    if query is not None:
        store.write_reference(step, query.gradients)


def _reference_query(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    embeddings: DataValueEmbeddings,
    config: ReportConfig,
    reference: Any,
    show_progress: bool,
) -> Reference | None:
    """The reference query, or ``None`` (with a warning saying why and what to do) if there is none."""
    skipped = "DataValueEmbedding: the influence report is skipped:"
    if not embeddings.steps:
        rank_zero_warn(f"{skipped} no optimizer step was recorded.")
        return None
    batches, source = resolve_reference(trainer, reference)
    if batches is None:
        why = source or "the trainer ran no validation dataloader"
        rank_zero_warn(f"{skipped} no reference set ({why}, and no `reference=` was given). Pass `reference=` (a "
                       "batch or a DataLoader) to the callback, or run validation (`validation_step` and a "
                       "validation dataloader).")
        return None
    prepare = partial(convert_batch, trainer)
    try:
        with trainer_stage(trainer, None):
            return reference_gradient(embeddings, pl_module, batches, prepare, config.max_reference_samples, source,
                                      show_progress)
    except DVEError as err:
        rank_zero_warn(f"{skipped} {err} (reference: {source})")
        return None


def _curve_learning_rates(embeddings: DataValueEmbeddings) -> tuple[str, torch.Tensor]:
    """The first tracked layer's learning rate per step ``[T]``; at a step where it is 0 (its param group's rate
    was 0, or the step did not reach it), the first layer's that moved (0 where none did: the curve is undefined
    there). Warns where layers used different rates, naming the steps divided by another layer's."""
    lrs = embeddings.learning_rates
    name = embeddings.store.layer_names[0]
    moved = lrs != 0
    rate = lrs.gather(1, moved.to(torch.int8).argmax(dim=1, keepdim=True))
    if lrs.shape[1] > 1 and not bool((torch.isclose(lrs, rate.expand_as(lrs)) | ~moved).all()):
        other = [s for s, row in zip(embeddings.steps, (~moved[:, 0] & moved.any(dim=1)).tolist()) if row]
        at = (f" ({len(other)} step(s), first {other[:3]}, where its rate was 0 while other layers moved: by the "
              "rate of the first layer that did)") if other else ""
        rank_zero_warn(f"DataValueEmbedding: tracked layers used different learning rates; the influence curve is "
                       f"divided by the learning rate of the first tracked layer, {name!r}{at}.")
    return name, rate[:, 0]


# --- files ------------------------------------------------------------------------------------------------


def _figures(report: TrainEndReport) -> dict[str, np.ndarray]:
    """The report's figures by name, rendered (``top_k`` only when the top-k samples have images)."""
    plots = {"curve": figures.curve_figure(report.curves), "epochs": figures.epoch_figure(report.curves),
             "histogram": figures.histogram_figure(report.curves)}
    images = {i: view.image for i, view in report.samples.items() if view.image is not None}
    labels = {i: view.label for i, view in report.samples.items()}
    grid = figures.top_k_figure(report.curves.helpful, report.curves.harmful, images, labels)
    if grid is not None:
        plots["top_k"] = grid
    return {name: figures.render(figure) for name, figure in plots.items()}


def summary_dict(report: TrainEndReport) -> dict[str, Any]:
    """The JSON summary: reference, settings, stage summary, phases, totals, top-k lists and disk use."""
    c = report.curves
    return {
        "reference": {"n_samples": report.reference.n_samples, "source": report.reference.source},
        "settings": c.config.to_dict(),
        "learning_rate_of_layer": report.lr_layer,
        "n_steps": c.curve.steps.numel(),
        "n_samples": c.sample_ids.numel(),
        "total_influence": clean(c.totals.sum()),
        "stages": [dict(zip(STAGE_COLUMNS, row)) for row in stage_rows(c)],
        "phases": {"warmup_end": c.phases.warmup_end, "basin": c.phases.basin,
                   "ascent_start": c.phases.ascent_start},
        "top_k": {name: [dict(zip(TOP_K_COLUMNS, row)) for row in top_k_rows(ranked, report.samples)]
                  for name, ranked in (("helpful", c.helpful), ("harmful", c.harmful))},
        "disk": report.disk,
    }


def _write_csv(path: Path, columns: list[str], rows: list[list[Any]]) -> Path:
    """Write a header and rows to ``path``; return ``path``."""
    with path.open("w", newline="", encoding="utf-8", errors="backslashreplace") as handle:  # any locale
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows(rows)
    return path


def write_files(report: TrainEndReport, plots: dict[str, np.ndarray]) -> dict[str, Path]:
    """Write the CSV, JSON and PNG files of the report into ``report.directory``; return them by name."""
    directory, c = report.directory, report.curves
    directory.mkdir(parents=True, exist_ok=True)
    counts, edges = c.histogram
    files = {
        "curve_csv": _write_csv(directory / "curve.csv", CURVE_COLUMNS, curve_rows(c)),
        "epochs_csv": _write_csv(directory / "epochs.csv", EPOCH_COLUMNS, epoch_rows(c)),
        "stages_csv": _write_csv(directory / "stages.csv", STAGE_COLUMNS, stage_rows(c)),
        "samples_csv": _write_csv(directory / "sample_totals.csv", ["sample_id", "total_influence"],
                                  [[i, clean(t)] for i, t in zip(c.sample_ids.tolist(), c.totals.tolist())]),
        "histogram_csv": _write_csv(directory / "histogram.csv", ["bin_low", "bin_high", "count"],
                                    [[lo, hi, n] for lo, hi, n in zip(edges[:-1].tolist(), edges[1:].tolist(),
                                                                      counts.tolist())]),
        "dynamics_csv": _write_csv(directory / "dynamics.csv", DYNAMICS_COLUMNS, report.dynamics),
        "top_k_csv": _write_csv(directory / "top_k.csv", ["kind", *TOP_K_COLUMNS],
                                [[kind, *row] for kind, ranked in (("helpful", c.helpful), ("harmful", c.harmful))
                                 for row in top_k_rows(ranked, report.samples)]),
    }
    files.update({f"{name}_png": figures.save_png(image, directory / f"{name}.png") for name, image in plots.items()})
    summary = summary_dict(report)
    summary["files"] = {name: path.name for name, path in files.items()}
    files["summary"] = directory / "summary.json"
    text = json.dumps(summary, indent=2, allow_nan=False)  # every value is clean()
    files["summary"].write_text(text, encoding="utf-8")
    return files


def _stage_line(report: CurveReport) -> str:
    """One-line stage summary, e.g. ``early 41% / middle 37% / late 22% of |influence / lr|``."""
    parts = [f"{s.stage.value} {100 * s.abs_share:.0f}%" for s in report.stages
             if s.abs_share is not None and math.isfinite(s.abs_share)]
    scale = "influence / lr" if report.config.stage_scale.value == "per_lr" else "influence"
    return " / ".join(parts) + f" of |{scale}|"
