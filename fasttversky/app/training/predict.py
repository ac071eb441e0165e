"""Inference: foreground probabilities for a whole volume or by sliding windows.

Sliding windows are combined with Gaussian importance weights by default (nnU-Net's
choice): a patch-trained network is least reliable at a window's border, where its
receptive field reaches into zero padding, so each window's prediction counts most at
its centre (weight exp(-r²/2σ²), σ = ``sigma_scale`` × window size per axis, 1/8 as
in nnU-Net). ``mirror_axes`` adds test-time augmentation: the prediction is the mean
of the foreground probabilities of the image and its mirror images over every
non-empty subset of those axes (flipped back), e.g. 2 passes for (0,), 8 for (0, 1, 2).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import WEIGHTINGS

__all__ = ["WEIGHTINGS", "gaussian_weights", "predict"]


def gaussian_weights(window: Sequence[int], sigma_scale: float = 0.125) -> torch.Tensor:
    """(d, h, w) float32 importance map: a separable Gaussian centred on the window,
    σ = sigma_scale × size per axis, scaled to a maximum of 1 and floored at 1e-3 (a
    voxel covered only by window borders still gets a finite, defined average)."""
    axes = []
    for n in window:
        x = torch.arange(n, dtype=torch.float64) - (n - 1) / 2
        sigma = max(sigma_scale * n, 1e-6)
        axes.append(torch.exp(-0.5 * (x / sigma) ** 2))
    w = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    w = w / w.max()
    return w.clamp_min(1e-3).to(torch.float32)


def _multiple(model: nn.Module) -> int:
    inner = getattr(model, "module", model)
    levels = getattr(inner, "levels", 1)
    return 2 ** (levels - 1)


def _pad_to(x: torch.Tensor, m: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Zero-pad the 3 spatial dims at the end up to multiples of m."""
    size = x.shape[2:]
    pad = [(-s) % m for s in size]
    if any(pad):
        x = F.pad(x, (0, pad[2], 0, pad[1], 0, pad[0]))
    return x, tuple(size)


def _starts(size: int, window: int, step: int) -> list[int]:
    if size <= window:
        return [0]
    starts = list(range(0, size - window + 1, step))
    if starts[-1] != size - window:
        starts.append(size - window)  # last window flush with the end
    return starts


def _foreground(logits: torch.Tensor) -> torch.Tensor:
    """logits (B, C, *S) -> P(not background) (B, *S) float32."""
    logits = logits.float()
    if logits.shape[1] == 1:
        return torch.sigmoid(logits[:, 0])
    # 1 - p0 rather than p1: the same for C = 2, "any lesion class" for C > 2.
    return 1.0 - torch.softmax(logits, dim=1)[:, 0]


@torch.no_grad()
def predict(
    model: nn.Module,
    image: torch.Tensor,
    *,
    window: Sequence[int] | int | None = None,
    overlap: float = 0.5,
    precision: str = "fp32",
    device: str | torch.device | None = None,
    weighting: str = "gaussian",
    sigma_scale: float = 0.125,
    mirror_axes: Sequence[int] = (),
) -> torch.Tensor:
    """Foreground probability of every voxel.

    Args:
        model: image (B, Cin, D, H, W) -> logits (B, C, D, H, W), e.g. ``UNet3D``.
        image: (B, Cin, D, H, W) or (Cin, D, H, W) float (float32 typically); cast to
            the model's parameter dtype.
        window: None = the whole volume in one pass; else the (d, h, w) (or one int)
            size of sliding windows, combined by ``weighting`` where they overlap.
            Sizes are zero-padded up to the model's required multiple (2**(levels-1)).
        overlap: fraction in [0, 1) by which neighbouring windows overlap.
        weighting: "gaussian" (default; see :func:`gaussian_weights`) or "uniform"
            (plain mean of the overlapping windows).
        sigma_scale: σ of the Gaussian weights as a fraction of the window size.
        mirror_axes: spatial axes (0, 1, 2 of D, H, W) for mirroring test-time
            augmentation; () = none.
        precision: "fp32", "bf16" or "fp16" autocast for the forward.
        device: where to run (default: where the model's parameters are). The result
            is returned on the image's device.

    Returns:
        (B, D, H, W) float32 probabilities in [0, 1]: sigmoid of the single logit for
        C = 1, else 1 - softmax background probability (= P(class 1) when C = 2).
        The model's train/eval mode is restored afterwards.
    """
    mirror_axes = _check_options(overlap, weighting, mirror_axes)
    squeeze = image.dim() == 4
    if squeeze:
        image = image.unsqueeze(0)
    if image.dim() != 5:
        raise ValueError(
            f"image must be (B, Cin, D, H, W) or (Cin, D, H, W), got {tuple(image.shape)}"
        )
    params = list(model.parameters())
    dev = (
        torch.device(device)
        if device is not None
        else (params[0].device if params else image.device)
    )
    dtype = params[0].dtype if params else torch.float32
    forward = _MirroredForward(model, _autocast(dev, precision), mirror_axes)
    was_training = model.training
    # The model runs where it was asked to and is put back afterwards (a CPU-loaded
    # checkpoint with device="cuda" must not meet a CUDA input with CPU weights).
    home = params[0].device if params else dev
    model.to(dev)
    model.eval()
    try:
        if window is None:
            prob = _whole_volume(forward, image.to(dev, dtype), _multiple(model))
        else:
            weights = (weighting, sigma_scale)
            prob = _sliding_windows(
                forward, image, window, overlap, weights, _multiple(model), dev, dtype
            )
    finally:
        model.train(was_training)
        model.to(home)
    prob = prob.to(image.device)
    return prob[0] if squeeze else prob


def _check_options(overlap: float, weighting: str, mirror_axes: Sequence[int]) -> tuple:
    """ValueError for an option out of range; -> the mirror axes as a tuple of ints."""
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    mirror_axes = tuple(int(a) for a in mirror_axes)
    if any(a not in (0, 1, 2) for a in mirror_axes) or len(set(mirror_axes)) != len(mirror_axes):
        raise ValueError(f"mirror_axes must be distinct spatial axes 0, 1, 2, got {mirror_axes}")
    return mirror_axes


def _autocast(dev: torch.device, precision: str):
    if precision in ("bf16", "fp16"):
        return torch.autocast(
            dev.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16
        )
    return torch.autocast(dev.type, enabled=False)


class _MirroredForward:
    """x (B, Cin, d, h, w) -> foreground probability (B, d, h, w), averaged over every
    subset of the mirror axes (the empty one = the image itself), each flipped on the
    way in and back on the way out; the mean is symmetric in the subsets."""

    def __init__(self, model: nn.Module, autocast, mirror_axes: tuple[int, ...]):
        self.model, self.autocast = model, autocast
        self.flips = [
            [a + 2 for a in combo]
            for k in range(len(mirror_axes) + 1)
            for combo in itertools.combinations(mirror_axes, k)
        ]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        total = None
        for f in self.flips:
            xf = torch.flip(x, f) if f else x
            with self.autocast:
                p = _foreground(self.model(xf))
            p = torch.flip(p, [a - 1 for a in f]) if f else p
            total = p if total is None else total + p
        return total / len(self.flips)


def _whole_volume(forward: _MirroredForward, image: torch.Tensor, m: int) -> torch.Tensor:
    """One pass over the whole volume, zero-padded to multiples of m and cropped back."""
    size = tuple(image.shape[2:])
    x, _ = _pad_to(image, m)
    return forward(x)[:, : size[0], : size[1], : size[2]]


def _sliding_windows(forward, image, window, overlap, weights, m, dev, dtype) -> torch.Tensor:
    """Windows of ``window`` size stepping by (1 - overlap) of it, each weighted by
    ``weights`` = (weighting, sigma_scale) and the sum divided by the summed weights."""
    weighting, sigma_scale = weights
    size = tuple(image.shape[2:])
    win = (window,) * 3 if isinstance(window, int) else tuple(window)
    win = tuple(min(w, s) for w, s in zip(win, size, strict=True))
    steps = [max(1, int(w * (1 - overlap))) for w in win]
    weight = (
        gaussian_weights(win, sigma_scale)
        if weighting == "gaussian"
        else torch.ones(win, dtype=torch.float32)
    ).to(dev)
    prob = torch.zeros((image.shape[0], *size), dtype=torch.float32, device=dev)
    count = torch.zeros(size, dtype=torch.float32, device=dev)
    for z, y, x0 in itertools.product(
        *(_starts(s, w, st) for s, w, st in zip(size, win, steps, strict=True))
    ):
        sl = (slice(z, z + win[0]), slice(y, y + win[1]), slice(x0, x0 + win[2]))
        patch, _ = _pad_to(image[(slice(None), slice(None), *sl)].to(dev, dtype), m)
        p = forward(patch)
        prob[(slice(None), *sl)] += p[:, : win[0], : win[1], : win[2]] * weight
        count[sl] += weight
    prob /= count
    return prob
