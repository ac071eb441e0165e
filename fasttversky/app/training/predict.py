"""Inference: foreground probabilities for a whole volume, optionally by sliding window."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["predict"]


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
) -> torch.Tensor:
    """Foreground probability of every voxel.

    Args:
        model: image (B, Cin, D, H, W) -> logits (B, C, D, H, W), e.g. ``UNet3D``.
        image: (B, Cin, D, H, W) or (Cin, D, H, W) float (float32 typically); cast to
            the model's parameter dtype.
        window: None = the whole volume in one pass; else the (d, h, w) (or one int)
            size of sliding windows, averaged uniformly where they overlap. Sizes are
            zero-padded up to the model's required multiple (2**(levels-1)).
        overlap: fraction in [0, 1) by which neighbouring windows overlap.
        precision: "fp32", "bf16" or "fp16" autocast for the forward.
        device: where to run (default: where the model's parameters are). The result
            is returned on the image's device.

    Returns:
        (B, D, H, W) float32 probabilities in [0, 1]: sigmoid of the single logit for
        C = 1, else 1 - softmax background probability (= P(class 1) when C = 2).
        The model's train/eval mode is restored afterwards.
    """
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
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
    autocast = (
        torch.autocast(dev.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
        if precision in ("bf16", "fp16")
        else torch.autocast(dev.type, enabled=False)
    )
    m = _multiple(model)
    was_training = model.training
    # The model runs where it was asked to and is put back afterwards (a CPU-loaded
    # checkpoint with device="cuda" must not meet a CUDA input with CPU weights).
    home = params[0].device if params else dev
    model.to(dev)
    model.eval()
    try:
        size = tuple(image.shape[2:])
        if window is None:
            x, _ = _pad_to(image.to(dev, dtype), m)
            with autocast:
                prob = _foreground(model(x))
            prob = prob[:, : size[0], : size[1], : size[2]]
        else:
            win = (window,) * 3 if isinstance(window, int) else tuple(window)
            win = tuple(min(w, s) for w, s in zip(win, size, strict=True))
            steps = [max(1, int(w * (1 - overlap))) for w in win]
            prob = torch.zeros((image.shape[0], *size), dtype=torch.float32, device=dev)
            count = torch.zeros(size, dtype=torch.float32, device=dev)
            for z, y, x0 in itertools.product(
                *(_starts(s, w, st) for s, w, st in zip(size, win, steps, strict=True))
            ):
                sl = (slice(z, z + win[0]), slice(y, y + win[1]), slice(x0, x0 + win[2]))
                patch, _ = _pad_to(image[(slice(None), slice(None), *sl)].to(dev, dtype), m)
                with autocast:
                    p = _foreground(model(patch))
                prob[(slice(None), *sl)] += p[:, : win[0], : win[1], : win[2]]
                count[sl] += 1
            prob /= count
    finally:
        model.train(was_training)
        model.to(home)
    prob = prob.to(image.device)
    return prob[0] if squeeze else prob
