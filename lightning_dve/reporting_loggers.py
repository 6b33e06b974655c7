"""Show a train-end report on the trainer's loggers: tables, charts, scalars and figures under ``dve/``
(``ReportConfig.namespace``: the keys are built under ``dve/`` and renamed by :func:`under`).

- ``WandbLogger``: the curve, epoch and stage tables, ``wandb.plot.line`` charts of the curves, a histogram of
  per-sample influence, top-k tables (with ``wandb.Image`` inputs), the figures and the summary scalars, in
  one ``log_metrics`` call: one new row at the run's current W&B step (never a past ``step=``: W&B would drop
  those rows) whose ``trainer/global_step`` is ``trainer.global_step``, where the other loggers put the summary
  scalars (without it, W&B's step sync would place the row at the last step the user's metrics logged, or 0).
- ``TensorBoardLogger``: per-step curve scalars at their training steps, summary scalars, figures, the
  histogram and markdown tables.
- ``CSVLogger``: per-step curve scalars and summary scalars.
- Any other logger: the summary scalars.

At fit start, :func:`log_settings` puts the recording's settings in every logger's hyperparameters.

Undefined values (NaN, infinities, a stage with no defined value) become ``None`` in rows and are left out of
scalars and histograms. :func:`format_summary` turns a ``summary.json`` dict into the text the examples print.

Only global rank 0 calls this module (through :mod:`lightning_dve.reporting`); it holds no collective.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_warn

from .curves import CurveReport, RankedSample
from .dynamics import DYNAMICS_COLUMNS
from .samples import SampleView

if TYPE_CHECKING:
    from .reporting import TrainEndReport

CURVE_COLUMNS = ["step", "epoch", "lr", "n_samples", "influence", "influence_per_lr", "influence_smoothed",
                 "influence_per_lr_smoothed"]
EPOCH_COLUMNS = ["epoch", "first_step", "last_step", "influence", "influence_per_lr", "total"]
STAGE_COLUMNS = ["stage", "first_step", "last_step", "n_steps", "share", "abs_share", "mean"]
TOP_K_COLUMNS = ["rank", "sample_id", "score", "steps", "label", "description"]


def clean(value: Any) -> Any:
    """JSON/CSV-safe scalar: NaN and infinities become ``None``; tensors become Python numbers."""
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def curve_rows(report: CurveReport) -> list[list[Any]]:
    """One row per recorded step, in :data:`CURVE_COLUMNS` order."""
    c = report.curve
    columns = (c.steps, c.epochs, c.learning_rates, c.counts, c.influence, c.influence_per_lr, report.smoothed,
               report.smoothed_per_lr)
    return [[clean(v) for v in row] for row in zip(*(col.tolist() for col in columns))]


def binned_curve_rows(report: CurveReport, max_rows: int) -> tuple[list[list[Any]], int]:
    """:func:`curve_rows` in at most ``max_rows`` rows, and the steps per row.

    A longer curve is cut into bins of ``w = ceil(n / max_rows)`` consecutive steps; a bin's row has its first step
    and epoch, its steps' summed ``n_samples`` and the mean of their other values (undefined ones left out), so a
    chart drawn from it keeps the whole run (W&B keeps only the first ``wandb.Table.MAX_ROWS`` rows of a table).
    """
    rows = curve_rows(report)
    width = -(-len(rows) // max_rows)
    if width <= 1:
        return rows, 1
    binned = []
    for lo in range(0, len(rows), width):
        columns = list(zip(*rows[lo:lo + width]))
        means = [_mean_of_defined(column) for column in columns[4:]]
        binned.append([columns[0][0], columns[1][0], _mean_of_defined(columns[2]), sum(columns[3]), *means])
    return binned, width


def _mean_of_defined(values: Iterable[Any]) -> float | None:
    """The mean of the values that are not ``None`` (undefined), or ``None``."""
    defined = [v for v in values if v is not None]
    return sum(defined) / len(defined) if defined else None


def epoch_rows(report: CurveReport) -> list[list[Any]]:
    """One row per epoch, in :data:`EPOCH_COLUMNS` order."""
    e = report.epochs
    columns = (e.epochs, e.first_steps, e.last_steps, e.influence, e.influence_per_lr, e.total)
    return [[clean(v) for v in row] for row in zip(*(col.tolist() for col in columns))]


def stage_rows(report: CurveReport) -> list[list[Any]]:
    """One row per stage, in :data:`STAGE_COLUMNS` order."""
    return [[s.stage.value, s.first_step, s.last_step, s.n_steps, clean(s.share), clean(s.abs_share),
             clean(s.mean)] for s in report.stages]


def top_k_rows(ranked: list[RankedSample], samples: dict[int, SampleView]) -> list[list[Any]]:
    """One row per ranked sample, in :data:`TOP_K_COLUMNS` order."""
    rows = []
    for sample in ranked:
        view = samples.get(sample.sample_id, SampleView(None, "", None))  # not looked up, or not found
        rows.append([sample.rank, sample.sample_id, clean(sample.score), " ".join(map(str, sample.steps)), view.label,
                     view.text])
    return rows


def summary_scalars(report: TrainEndReport) -> dict[str, float]:
    """Scalars under ``dve/``: reference size, total influence, stage shares and means, phase steps, disk use."""
    c = report.curves
    out: dict[str, float | None] = {"dve/reference/n_samples": float(report.reference.n_samples),
           "dve/total_influence": float(c.totals.sum())}
    for s in c.stages:
        prefix = f"dve/stages/{s.stage.value}"
        out.update({f"{prefix}/share": s.share, f"{prefix}/abs_share": s.abs_share, f"{prefix}/mean": s.mean})
    for name in ("warmup_end", "basin", "ascent_start"):
        step = getattr(c.phases, name)
        if step is not None:
            out[f"dve/phases/{name}_step"] = float(step)
    out.update({f"dve/disk/{key}": float(value) for key, value in report.disk.items()})
    return {key: value for key, value in out.items() if value is not None and math.isfinite(value)}


def step_scalars(report: CurveReport) -> Iterable[tuple[int, dict[str, float]]]:
    """``(step, {key: value})`` per recorded step, for loggers that accept any step (TensorBoard, CSV)."""
    c = report.curve
    for step, raw, per_lr, smoothed in zip(c.steps.tolist(), c.influence.tolist(), c.influence_per_lr.tolist(),
                                           report.smoothed_per_lr.tolist()):
        values = {"dve/curve/influence": raw, "dve/curve/influence_per_lr": per_lr,
                  "dve/curve/influence_per_lr_smoothed": smoothed}
        yield step, {key: value for key, value in values.items() if math.isfinite(value)}


def under(values: Mapping[str, Any], namespace: str) -> dict[str, Any]:
    """``values`` with each key's leading ``dve`` replaced by ``namespace``."""
    return {namespace + key[3:] if key.startswith("dve/") else key: value for key, value in values.items()}


def log_settings(trainer: pl.Trainer, settings: Mapping[str, Any], namespace: str = "dve") -> None:
    """Put the recording's ``settings`` under ``namespace`` in every logger's hyperparameters.

    W&B: the run config (``dve.projection_dim``, ...), so runs can be filtered and grouped by them; TensorBoard
    and the CSVLogger: ``hparams.yaml`` (TensorBoard's event file gets no hyperparameter summary and no
    ``hp_metric`` from these: those stay the module's). Called at fit start, before Lightning logs the module's
    own hyperparameters, which every logger merges with these.
    """
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams({namespace: dict(settings)}, metrics={})
        else:
            logger.log_hyperparams({namespace: dict(settings)})


def log_to_loggers(trainer: pl.Trainer, report: TrainEndReport, plots: dict[str, np.ndarray],
                   namespace: str = "dve") -> None:
    """Log the report to every logger of the trainer under ``namespace`` (the module docstring says what goes where).
    """
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            log_wandb(logger, report, trainer.global_step, namespace)
        elif isinstance(logger, TensorBoardLogger):
            log_tensorboard(logger, report, plots, trainer.global_step, namespace)
        elif isinstance(logger, CSVLogger):
            for step, values in step_scalars(report.curves):
                logger.log_metrics(under(values, namespace), step=step)
            logger.log_metrics(under(summary_scalars(report), namespace), step=trainer.global_step)
            logger.save()
        else:
            logger.log_metrics(under(summary_scalars(report), namespace), step=trainer.global_step)


def log_wandb(logger: WandbLogger, report: TrainEndReport, step: int, namespace: str = "dve") -> None:
    """Log tables, line charts, histogram, top-k tables, figures and scalars in one ``log_metrics`` call.

    ``step`` (the trainer's global step) is the row's ``trainer/global_step``: ``WandbLogger`` logs it as a value,
    not as W&B's own ``step=``, so the row is never dropped.
    """
    import wandb

    c = report.curves
    rows, steps_per_row = binned_curve_rows(c, wandb.Table.MAX_ROWS)
    if steps_per_row > 1:
        rank_zero_warn(f"DataValueEmbedding: the curve has {len(c.curve.steps)} steps, more than W&B keeps in a "
                       f"table ({wandb.Table.MAX_ROWS} rows): the W&B curve shows means over {steps_per_row} steps "
                       f"per point (`{namespace}/curve/steps_per_row`); every step is in save_dir/report/curve.csv.")
    curve = wandb.Table(columns=CURVE_COLUMNS, data=rows)
    epochs = wandb.Table(columns=EPOCH_COLUMNS, data=epoch_rows(c))
    counts, edges = c.histogram
    metrics: dict[str, Any] = {
        "dve/curve/table": curve,
        "dve/curve/influence": wandb.plot.line(curve, "step", "influence",
                                               title="Mean influence of each step's samples"),
        "dve/curve/influence_per_lr": wandb.plot.line(curve, "step", "influence_per_lr",
                                                      title="Influence / learning rate per step"),
        "dve/curve/influence_per_lr_smoothed": wandb.plot.line(curve, "step", "influence_per_lr_smoothed",
                                                               title="Influence / learning rate (smoothed)"),
        "dve/epochs/table": epochs,
        "dve/epochs/influence_per_lr": wandb.plot.line(epochs, "epoch", "influence_per_lr",
                                                       title="Influence / learning rate per epoch"),
        "dve/stages/table": wandb.Table(columns=STAGE_COLUMNS, data=stage_rows(c)),
        "dve/samples/total_influence": wandb.Histogram(np_histogram=(counts.numpy(), edges.numpy())),
        "dve/curve/steps_per_row": steps_per_row,
        **summary_scalars(report),
    }
    for name, ranked in (("helpful", c.helpful), ("harmful", c.harmful)):
        metrics[f"dve/top_k/{name}"] = _wandb_top_k(ranked, report.samples)
    if report.dynamics:
        metrics["dve/dynamics/table"] = wandb.Table(columns=DYNAMICS_COLUMNS, data=report.dynamics)
    for name in ("curve", "epochs", "histogram", "top_k"):
        if f"{name}_png" in report.files:
            metrics[f"dve/figures/{name}"] = wandb.Image(str(report.files[f"{name}_png"]))
    logger.log_metrics(under(metrics, namespace), step=step)


def _wandb_top_k(ranked: list[RankedSample], samples: dict[int, SampleView]) -> Any:
    """A ``wandb.Table`` of ranked samples, with an ``image`` column when any sample is an image."""
    import wandb

    rows = top_k_rows(ranked, samples)
    images = [samples[s.sample_id].image if s.sample_id in samples else None for s in ranked]
    if not any(image is not None for image in images):
        return wandb.Table(columns=TOP_K_COLUMNS, data=rows)
    data = [row + [None if image is None else wandb.Image(image)] for row, image in zip(rows, images)]
    return wandb.Table(columns=[*TOP_K_COLUMNS, "image"], data=data)


def log_tensorboard(logger: TensorBoardLogger, report: TrainEndReport, plots: dict[str, np.ndarray],
                    step: int, namespace: str = "dve") -> None:
    """Per-step and summary scalars, figures, the per-sample histogram and markdown tables, under ``namespace``.

    The writer's tags carry the logger's ``prefix`` as its ``log_metrics`` gives it to the scalars.
    """
    for curve_step, values in step_scalars(report.curves):
        logger.log_metrics(under(values, namespace), step=curve_step)
    logger.log_metrics(under(summary_scalars(report), namespace), step=step)
    writer, tag = logger.experiment, _tagger(logger, namespace)
    for name, image in plots.items():
        writer.add_image(tag(f"dve/figures/{name}"), image, step, dataformats="HWC")
    totals = report.curves.totals
    finite = totals[torch.isfinite(totals)]
    if finite.numel():  # add_histogram refuses an empty array (every total NaN)
        writer.add_histogram(tag("dve/samples/total_influence"), finite.numpy(), step)
    writer.add_text(tag("dve/stages"), _markdown(STAGE_COLUMNS, stage_rows(report.curves)), step)
    for name, ranked in (("helpful", report.curves.helpful), ("harmful", report.curves.harmful)):
        writer.add_text(tag(f"dve/top_k/{name}"), _markdown(TOP_K_COLUMNS, top_k_rows(ranked, report.samples)), step)
    if report.dynamics:
        writer.add_text(tag("dve/dynamics"), _markdown(DYNAMICS_COLUMNS, report.dynamics), step)
    writer.flush()


def _tagger(logger: Logger, namespace: str) -> Callable[[str], str]:
    """``dve/... -> namespace/...`` with the logger's ``prefix`` joined as its ``log_metrics`` joins it
    (``pre-dve/...``)."""
    prefix = getattr(logger, "_prefix", "") or ""
    join = getattr(logger, "LOGGER_JOIN_CHAR", "-")
    return lambda tag: f"{prefix}{join}{namespace}{tag[3:]}" if prefix else f"{namespace}{tag[3:]}"


def _markdown(columns: list[str], rows: list[list[Any]]) -> str:
    """A markdown table (TensorBoard renders text summaries as markdown); a cell's ``|`` and line breaks (a
    ``describe`` text or a text input of several lines) would end its cell or row: ``/`` and ``⏎`` instead."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    """One markdown table cell's text (:func:`_markdown`)."""
    return "" if value is None else "⏎".join(str(value).replace("|", "/").splitlines())


def format_summary(summary: Mapping[str, Any], k: int = 5) -> str:
    """Human-readable stage summary, phases and top-``k`` samples of a ``summary.json`` dict (``n/a`` for ``None``)."""
    ref, phases = summary["reference"], summary["phases"]
    lines = [f"Reference: {ref['n_samples']} samples from {ref['source']}; {summary['n_steps']} steps, "
             f"{summary['n_samples']} training samples, total influence {_number(summary['total_influence'])}.",
             f"Stage summary ({summary['settings']['stage_scale']} curve; share of the total and of |total|):"]
    lines += [f"  {s['stage']:<6} steps {s['first_step']:>5}-{s['last_step']:<5}  share {_percent(s['share'])}  "
              f"|share| {_percent(s['abs_share'], signed=False)}  mean {_number(s['mean'])}" for s in summary["stages"]
              if s["n_steps"]]
    lines.append(f"Phases (step): warm-up end {phases['warmup_end']}, basin {phases['basin']}, ascent start "
                 f"{phases['ascent_start']}")
    for name, rows in summary["top_k"].items():
        lines.append(top_k_heading(name, min(k, len(rows)), "training samples"))
        lines += [f"  #{r['rank']} id {r['sample_id']:>5}  score {_number(r['score'])}  label {r['label']}  steps "
                  f"[{r['steps']}]" + (f"  {r['description'][:60]!r}" if r.get("description") else "")
                  for r in rows[:k]]
    return "\n".join(lines)


def top_k_heading(name: str, count: int, what: str) -> str:
    """The heading of a printed top-k list of ``count`` rows of ``what``, saying why it is empty."""
    none = "" if count else f" none (no total influence is {'above' if name == 'helpful' else 'below'} 0)"
    return f"Top-{count} {name} {what}:{none}"


def _percent(value: float | None, signed: bool = True) -> str:
    """A share as a percentage (``n/a`` for ``None``)."""
    return "   n/a" if value is None else f"{100 * value:{'+' if signed else ''}6.1f}%"


def _number(value: float | None) -> str:
    """A number in scientific notation (``n/a`` for ``None``)."""
    return "n/a" if value is None else f"{value:+.3e}"
