"""Matplotlib figures of a :class:`~lightning_dve.curves.CurveReport` (Agg canvas, no pyplot state).

Figures are built on ``matplotlib.figure.Figure`` with an explicit Agg canvas, so nothing is registered with
pyplot and no backend is switched for the user's process. Each is drawn once (:func:`render`): the PNG file and
the loggers' images are written from the same pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.image import imsave
from matplotlib.ticker import MaxNLocator

from .curves import CurveReport, RankedSample, Stage, stage_bounds

_STAGE_COLOURS = {Stage.EARLY: "tab:orange", Stage.MIDDLE: "tab:gray", Stage.LATE: "tab:green"}


def _new_figure(width: float, height: float) -> Figure:
    """A figure (inches) with its own Agg canvas, unknown to pyplot."""
    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def curve_figure(report: CurveReport) -> Figure:
    """Per-step influence (top) and influence per learning rate (bottom) with smoothing, stages and phases."""
    curve = report.curve
    steps = curve.steps.numpy()
    figure = _new_figure(9.0, 6.0)
    raw_axes, lr_axes = figure.subplots(2, 1, sharex=True)
    for axes, values, smoothed, label in (
        (raw_axes, curve.influence, report.smoothed, "mean influence of the step's samples"),
        (lr_axes, curve.influence_per_lr, report.smoothed_per_lr, "influence / learning rate"),
    ):
        axes.plot(steps, values.numpy(), color="tab:blue", alpha=0.35, linewidth=0.8, label="per step")
        axes.plot(steps, smoothed.numpy(), color="tab:blue", linewidth=1.8, label="smoothed")
        axes.axhline(0.0, color="black", linewidth=0.5)
        axes.set_ylabel(label)
        _shade_stages(axes, report)
    _mark_phases(lr_axes, report)
    lr_axes.set_xlabel("training step")
    lr_axes.legend(loc="lower right", fontsize="small", ncol=3)
    figure.suptitle("Influence of each training step on the final reference loss (positive = helped)")
    return figure


def _shade_stages(axes: Axes, report: CurveReport) -> None:
    """Shade the early, middle and late stages behind the curve."""
    steps = report.curve.steps
    a, b = stage_bounds(steps.numel(), report.config.early_fraction, report.config.late_fraction)
    for stage, (low, high) in zip(Stage, ((0, a), (a, b), (b, steps.numel()))):
        if high > low:
            left, right = steps[low].item() - 0.5, steps[high - 1].item() + 0.5
            axes.axvspan(left, right, color=_STAGE_COLOURS[stage], alpha=0.08, linewidth=0)
            axes.text((left + right) / 2, 0.97, stage.value, transform=axes.get_xaxis_transform(), ha="center",
                      va="top", fontsize="x-small", color=_STAGE_COLOURS[stage])


def _mark_phases(axes: Axes, report: CurveReport) -> None:
    """Draw a vertical line at each detected phase boundary."""
    phases = report.phases
    for step, name, style in ((phases.warmup_end, "warm-up end", "--"), (phases.basin, "basin", ":"),
                              (phases.ascent_start, "ascent start", "-.")):
        if step is not None:
            axes.axvline(step, color="tab:red", linestyle=style, linewidth=1.0, label=f"{name} ({step})")


def epoch_figure(report: CurveReport) -> Figure:
    """Per-epoch mean of the influence per learning rate."""
    figure = _new_figure(6.0, 3.5)
    axes = figure.subplots()
    axes.plot(report.epochs.epochs.numpy(), report.epochs.influence_per_lr.numpy(), marker="o")
    axes.axhline(0.0, color="black", linewidth=0.5)
    axes.set_xlabel("epoch")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # no ticks between epochs (0.2, 0.4, ...)
    axes.set_ylabel("mean influence / learning rate")
    axes.set_title("Influence per epoch")
    return figure


def histogram_figure(report: CurveReport) -> Figure:
    """Histogram of the per-sample total influence."""
    counts, edges = report.histogram
    figure = _new_figure(6.0, 3.5)
    axes = figure.subplots()
    axes.stairs(counts.numpy(), edges.numpy(), fill=True, alpha=0.7)
    axes.axvline(0.0, color="black", linewidth=0.5)
    axes.set_xlabel("total influence of a training sample (positive = helped)")
    axes.set_ylabel("samples")
    axes.set_title(f"Per-sample total influence ({report.sample_ids.numel()} samples)")
    return figure


def top_k_figure(helpful: Sequence[RankedSample], harmful: Sequence[RankedSample], images: dict[int, np.ndarray],
                 labels: dict[int, str | None]) -> Figure | None:
    """Grid of the top-k samples' images (row 1 helpful, row 2 harmful); ``None`` if no image is known.

    Args:
        helpful: most helpful samples, best first.
        harmful: most harmful samples, worst first.
        images: ``[H, W]`` or ``[H, W, C]`` uint8 image of each sample id that has one.
        labels: label text of each sample id (``None``: unknown).
    """
    rows = [(name, [s for s in ranked if s.sample_id in images]) for name, ranked in
            (("helpful", helpful), ("harmful", harmful))]
    columns = max(len(samples) for _, samples in rows)
    if columns == 0:
        return None
    figure = _new_figure(1.3 * columns + 0.5, 3.2)
    grid = figure.subplots(2, columns, squeeze=False)
    for row, (name, samples) in enumerate(rows):
        for column in range(columns):
            axes = grid[row][column]
            axes.set_axis_off()
            if column < len(samples):
                sample = samples[column]
                axes.imshow(images[sample.sample_id], cmap="gray_r" if images[sample.sample_id].ndim == 2 else None)
                label = labels.get(sample.sample_id)
                axes.set_title(f"{name} #{sample.rank}\nid {sample.sample_id}"
                               f"{'' if label is None else f', label {label}'}\n{sample.score:+.2e}", fontsize=7)
    return figure


def render(figure: Figure) -> np.ndarray:
    """Draw ``figure`` once, to a ``[H, W, 3]`` uint8 array (the PNG file's and TensorBoard's pixels)."""
    canvas = figure.canvas if isinstance(figure.canvas, FigureCanvasAgg) else FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def save_png(image: np.ndarray, path: Path) -> Path:
    """Write a rendered ``[H, W, 3]`` figure as a PNG and return ``path``."""
    imsave(path, image, format="png")
    return path


def image_array(tensor: torch.Tensor) -> np.ndarray | None:
    """A displayable ``[H, W]`` or ``[H, W, 3|4]`` uint8 array if ``tensor`` looks like an image, else ``None``.

    Image-like: floating point or ``uint8`` (pixels as ``read_image`` or ``PILToTensor`` give them; wider integer
    tensors are token ids), shape ``[H, W]``, ``[C, H, W]`` or ``[H, W, C]`` with ``C`` in 1, 3, 4 and
    ``H, W >= 4``. Floating-point values are min-max scaled to 0..255; ``uint8`` pixels are kept as they are.
    """
    pixels = isinstance(tensor, torch.Tensor) and tensor.dtype == torch.uint8
    if not isinstance(tensor, torch.Tensor) or not (tensor.dtype.is_floating_point or pixels):
        return None
    array = tensor.detach().to("cpu", torch.uint8 if pixels else torch.float64).numpy()
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and min(array.shape[1:]) >= 4:
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))) or min(array.shape[:2]) < 4:
        return None
    if pixels:
        return np.ascontiguousarray(array)
    low, high = float(array.min()), float(array.max())
    scaled = (array - low) / (high - low) if high > low else np.zeros_like(array)
    return (scaled * 255).round().astype(np.uint8)
