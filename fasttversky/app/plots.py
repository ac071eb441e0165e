"""Figures of the paper: precision-recall curves (Fig. 2) and slice overlays (Figs. 3–4).

Figures are built with ``matplotlib.figure.Figure`` and the Agg canvas directly, not
pyplot: no global backend switch, no GUI, nothing left open between calls (so the CLI
and tests work on headless machines and never change a user's pyplot state).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def pr_figure(curves: Mapping[str, object], title: str = ""):
    """The figure of :func:`plot_pr_curves` (a ``matplotlib.figure.Figure``)."""
    fig = _figure(7.4, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    for label, c in curves.items():
        r = np.concatenate([[0.0], np.asarray(c.recall)])
        p = np.asarray(c.precision)
        p = np.concatenate([[p[0] if p.size else 1.0], p])
        ap = getattr(c, "average_precision", None)
        # Percent, like every table the CLI writes: one unit for APR everywhere.
        name = f"{label} (APR {100 * ap:.2f} %)" if ap is not None and np.isfinite(ap) else label
        ax.step(r, p, where="pre", label=str(name), linewidth=1.4)
    ax.set_xlabel("recall (sensitivity)")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    # Outside the axes, right of them: inside, a legend hides part of the curves for
    # some (alpha, beta) sets whichever corner it takes.
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    return fig


def plot_pr_curves(curves: Mapping[str, object], path: str | Path, title: str = "") -> Path:
    """One figure with a precision-recall curve per entry, legend outside the axes.

    curves: label -> an object with ``precision``, ``recall`` (1-D arrays, recall
    ascending) and optionally ``average_precision`` (shown in the legend, in %), e.g.
    :class:`fasttversky.app.metrics.PRCurve`. Drawn as steps, which is what AP integrates.
    """
    return _save(pr_figure(curves, title), path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")  # keeps a legend placed outside the axes
    return path


def best_slice(target: np.ndarray, axis: int = 2) -> int:
    """Index along ``axis`` of the slice with the most lesion voxels (middle if none)."""
    other = tuple(a for a in range(target.ndim) if a != axis)
    counts = np.asarray(target).sum(axis=other)
    return int(np.argmax(counts)) if counts.any() else target.shape[axis] // 2


def _overlay_rgb(image2d: np.ndarray, target2d: np.ndarray, pred2d: np.ndarray) -> np.ndarray:
    """Gray image with TP green, FN blue, FP red, as in the paper's overlay figures."""
    inside = image2d != 0  # z-scored data: background is exactly 0 -> drawn black
    lo, hi = np.percentile(image2d[inside], [1, 99.5]) if inside.any() else (0.0, 1.0)
    g = np.clip((image2d - lo) / (hi - lo + 1e-8), 0, 1) * inside
    rgb = np.stack([g, g, g], axis=-1)
    t, p = target2d.astype(bool), pred2d.astype(bool)
    for sel, colour in (
        (t & p, (0.1, 0.9, 0.1)),
        (t & ~p, (0.2, 0.4, 1.0)),
        (~t & p, (1.0, 0.15, 0.1)),
    ):
        rgb[sel] = 0.35 * rgb[sel] + 0.65 * np.asarray(colour)
    return rgb


def overlay_figure(
    image: np.ndarray,
    target: np.ndarray,
    preds: Mapping[str, np.ndarray],
    channel: str,
    slice_index: int | None = None,
    axis: int = 2,
    title: str = "",
):
    """The figure of :func:`plot_overlays` (a ``matplotlib.figure.Figure``)."""
    if slice_index is None:
        slice_index = best_slice(target, axis)
    take = lambda a: np.take(a, slice_index, axis=axis).T  # noqa: E731 - rows = 2nd axis
    n = len(preds)
    fig = _figure(2.6 * n + 0.4, 3.1)
    for k, (label, pred) in enumerate(preds.items()):
        ax = fig.add_subplot(1, n, k + 1)
        ax.imshow(
            _overlay_rgb(take(image), take(target), take(pred)),
            origin="lower",
            interpolation="nearest",
        )
        ax.set_title(str(label), fontsize=9)
        ax.set_axis_off()
    fig.suptitle(
        (title + ": " if title else "")
        + f"{channel}, slice {slice_index}; TP green, FN blue, FP red",
        fontsize=9,
    )
    fig.tight_layout()
    return fig


def plot_overlays(
    image: np.ndarray,
    target: np.ndarray,
    preds: Mapping[str, np.ndarray],
    path: str | Path,
    *,
    channel: str,
    slice_index: int | None = None,
    axis: int = 2,
    title: str = "",
) -> Path:
    """One panel per prediction: the same slice of ``image`` with TP/FN/FP colours.

    image, target and each pred: (X, Y, Z) arrays on one grid (pred binary); channel:
    the name of the image shown (e.g. "FLAIR"), printed in the title. The slice (along
    ``axis``, default the third = axial in MNI) defaults to the one with most lesion
    voxels.
    """
    return _save(overlay_figure(image, target, preds, channel, slice_index, axis, title), path)


def plot_loss_curves(losses: Mapping[str, Sequence[float]], path: str | Path) -> Path:
    """Training loss per step for each run (label -> losses)."""
    fig = _figure(5.2, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    for label, ls in losses.items():
        ax.plot(np.arange(1, len(ls) + 1), ls, label=str(label), linewidth=1.0)
    ax.set_xlabel("step")
    ax.set_ylabel("Tversky loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    return _save(fig, path)
