"""fasttversky.app.plots: readable figures (issue 9): the PR legend lies outside the
curves' axes, APR is in percent like every table, the overlay names the channel shown."""

from __future__ import annotations

import numpy as np
import pytest

from fasttversky.app.metrics import segmentation_metrics
from fasttversky.app.plots import overlay_figure, plot_overlays, plot_pr_curves, pr_figure

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _curves(n=5):
    out = {}
    for k in range(n):
        rng = np.random.default_rng(k)
        target = rng.random((12, 12, 8)) < 0.1
        prob = np.clip(rng.random(target.shape) * 0.7 + 0.3 * target, 0, 1).astype(np.float32)
        m, c = segmentation_metrics(prob, target.astype(np.uint8), return_curve=True)
        out[f"α=0.{k + 1}, β=0.{9 - k} (a long label)"] = c
    return out


def test_pr_legend_outside_the_axes_and_apr_in_percent():
    curves = _curves()
    fig = pr_figure(curves, title="t")
    fig.canvas.draw()
    ax = fig.axes[0]
    legend = ax.get_legend()
    r = fig.canvas.get_renderer()
    box, axes_box = legend.get_window_extent(r), ax.get_window_extent(r)
    assert box.x0 >= axes_box.x1  # entirely right of the plotting area: hides no curve
    texts = [t.get_text() for t in legend.get_texts()]
    for (label, c), text in zip(curves.items(), texts, strict=True):
        assert text == f"{label} (APR {100 * c.average_precision:.2f} %)"


def test_saved_pr_figure_keeps_the_legend(tmp_path):
    path = plot_pr_curves(_curves(), tmp_path / "pr.png")
    assert path.read_bytes()[:8] == PNG_MAGIC
    import matplotlib.image as mpimg

    img = mpimg.imread(str(path))
    # bbox_inches="tight" widens the canvas to the legend: wider than the 7.4 in figure
    # would be without it is not guaranteed, but the right third must not be blank.
    right = img[:, int(img.shape[1] * 0.75) :, :3]
    assert right.std() > 0


@pytest.mark.parametrize("channel", ["FLAIR", "T2"])
def test_overlay_names_the_channel(channel, tmp_path):
    rng = np.random.default_rng(0)
    image = rng.random((16, 16, 8)).astype(np.float32)
    target = np.zeros((16, 16, 8), np.uint8)
    target[4:8, 4:8, 3] = 1
    fig = overlay_figure(image, target, {"a": target, "b": 1 - target}, channel, title="s1")
    title = fig._suptitle.get_text()
    assert title.startswith(f"s1: {channel}, slice 3;")  # slice with the most lesion
    path = plot_overlays(image, target, {"a": target}, tmp_path / "o.png", channel=channel)
    assert path.read_bytes()[:8] == PNG_MAGIC
