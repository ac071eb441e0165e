"""Extreme but finite logits: the loss is finite wherever the float64 truth is.

With logits near +-1.5e38..3e38 a voxel's cross-entropy can exceed float32's range (the
gap between its two classes' logits, up to 6e38) while the mean over the voxels, the
loss, fits (~1e38). The kernels compute CE in float32, so a per-voxel value, a per-lane
or per-thread running sum, or a 0 * inf (a class the voxel is not labelled with, times
an overflowed gap) used to turn the loss into inf or NaN (issue 25, item 5). Every
backend must match the float64 reference within the usual tolerance, loss and gradient,
on every path: the two-class fused paths (full tiles and the tail), the general softmax
path (C >= 3), and sigmoid (C = 1, C = 2).
"""

from __future__ import annotations

import pytest
import torch
from _helpers import ALL_BACKENDS, check_against_reference, use_backend

# (id, C, activation, magnitude): logits are +-magnitude with random signs.
CASES = [
    ("2cls-3e38", 2, "softmax", 3e38),
    ("2cls-1.5e38", 2, "softmax", 1.5e38),
    ("3cls-3e38", 3, "softmax", 3e38),
    ("4cls-1.5e38", 4, "softmax", 1.5e38),
    ("1cls-sigmoid-3e38", 1, "sigmoid", 3e38),
    ("1cls-sigmoid-1.5e38", 1, "sigmoid", 1.5e38),
    ("2cls-sigmoid-3e38", 2, "sigmoid", 3e38),
]


def _extreme_inputs(C: int, magnitude: float, dtype, device: str, seed: int = 3):
    """Logits (2, C, 5, 7, 3) of +-magnitude (105 voxels: one full 64-voxel tile and a
    tail per sample) and labels in [0, max(C, 2))."""
    g = torch.Generator().manual_seed(seed)
    shape = (2, C, 5, 7, 3)
    sign = torch.randint(0, 2, shape, generator=g).double() * 2 - 1
    # a spread of magnitudes, so that not every voxel's gap is the same
    scale = 1 - 0.5 * torch.rand(shape, generator=g, dtype=torch.float64)
    x = (sign * scale * magnitude).to(dtype)
    t = torch.randint(0, max(C, 2), (2, 5, 7, 3), generator=g)
    return x.to(device), t.to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_cross_entropy_at_extreme_logits_is_finite(case, backend, dtype, monkeypatch):
    _, C, activation, magnitude = case
    device = use_backend(backend, monkeypatch)
    x, t = _extreme_inputs(C, magnitude, dtype, device)
    check_against_reference(x, t, backend, activation=activation, ce_weight=1.0)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_channels_last_two_class_at_extreme_logits(backend, monkeypatch):
    """The CPU kernel's interleaved (channels_last_3d) two-class path."""
    device = use_backend(backend, monkeypatch)
    x, t = _extreme_inputs(2, 3e38, torch.float32, device, seed=5)
    x = x.contiguous(memory_format=torch.channels_last_3d)
    check_against_reference(x, t, backend, ce_weight=1.0, ignore_index=1)
