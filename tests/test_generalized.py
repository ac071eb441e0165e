"""Generalized Tversky/Dice weights and per-class focal exponents, computed at finalize
from the sums the fused pass already produces: every backend against the float64
reference, and the generalized Dice against MONAI's GeneralizedDiceLoss itself."""

from __future__ import annotations

import pytest
import torch

import fasttversky
from tests._helpers import ALL_BACKENDS, check_against_reference, make_inputs, use_backend

KINDS = ("square", "simple", "uniform")


def _with_absent_class(t: torch.Tensor, absent: int) -> torch.Tensor:
    """Sample 0 without any voxel of class ``absent`` (MONAI's infinite-weight case)."""
    t = t.clone()
    t[0][t[0] == absent] = (absent + 1) % 3
    return t


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("include_background", [True, False])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_generalized_matches_reference(backend, kind, batch, include_background, monkeypatch):
    device = use_backend(backend, monkeypatch)
    x, t = make_inputs(2, 3, (5, 4, 3), seed=21, device=device)
    t = _with_absent_class(t, 2)
    for reduction in ("mean", "sum", "none"):
        check_against_reference(
            x,
            t,
            backend,
            generalized=kind,
            batch=batch,
            reduction=reduction,
            include_background=include_background,
            alpha=0.3,
            beta=0.7,
            gamma=0.8,
        )


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_per_class_gamma_matches_reference(backend, monkeypatch):
    device = use_backend(backend, monkeypatch)
    x, t = make_inputs(2, 3, (6, 5, 4), seed=4, device=device)
    for kw in (
        dict(gamma=[0.75, 1.0, 1.5]),
        dict(gamma=[0.5, 2.0, 1.0], batch=True, ce_weight=0.3),
    ):
        check_against_reference(x, t, backend, **kw)
    check_against_reference(x, t, backend, gamma=[0.5, 2.0, 1.0], reduction="none")


def test_generalized_rejects_what_it_cannot_mean():
    with pytest.raises(ValueError, match="one gamma and no class_weights"):
        fasttversky.TverskyOptions(generalized="square", gamma=[1.0, 2.0])
    with pytest.raises(ValueError, match="one gamma and no class_weights"):
        fasttversky.TverskyOptions(generalized="square", class_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="generalized must be one of"):
        fasttversky.TverskyOptions(generalized="squared")


@pytest.mark.parametrize("w_type", KINDS)
@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("include_background", [True, False])
def test_generalized_dice_equals_monai(w_type, batch, include_background):
    monai = pytest.importorskip("monai.losses", reason="MONAI is in the [test] extra")
    x, t = make_inputs(2, 3, (6, 5, 4), dtype=torch.float64, seed=8)
    t = _with_absent_class(t, 1)
    smooth_nr, smooth_dr = 1e-5, 1e-5
    theirs = monai.GeneralizedDiceLoss(
        softmax=True,
        to_onehot_y=True,
        w_type=w_type,
        batch=batch,
        include_background=include_background,
        smooth_nr=smooth_nr,
        smooth_dr=smooth_dr,
    )
    x1 = x.clone().requires_grad_(True)
    ref = theirs(x1, t[:, None])
    ref.backward()
    # MONAI's ratio is (2 Σ w TP + s_nr) / (Σ w (2 TP + FP + FN) + s_dr): alpha = beta =
    # 1/2 with both smooth terms halved is the same number.
    x2 = x.clone().requires_grad_(True)
    ours = fasttversky.tversky_loss(
        x2,
        t,
        0.5,
        0.5,
        generalized=w_type,
        batch=batch,
        include_background=include_background,
        smooth_nr=smooth_nr / 2,
        smooth_dr=smooth_dr / 2,
        clamp_terms=False,
    )
    ours.backward()
    torch.testing.assert_close(ours, ref, rtol=1e-7, atol=1e-12)
    # 1e-7 of the largest gradient (the float64 bar), elementwise.
    tol = 1e-7 * x1.grad.abs().max().item()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=0, atol=tol)
