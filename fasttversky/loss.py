"""``TverskyLoss``: the nn.Module face of ``tversky_loss``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ._dispatch import check_backend_name
from .functional import _check_ignore_index, _is_scalar, _per_class, tversky_loss


class TverskyLoss(nn.Module):
    """Fused Tversky loss as a module; every argument as in :func:`fasttversky.tversky_loss`.

    ``forward(logits, target)``: logits (B, C, *spatial) float, target an integer label
    map (B, *spatial) / (B, 1, *spatial) or a float (B, C, *spatial) soft target.
    alpha weighs false positives, beta false negatives (paper's best: 0.3, 0.7).
    ``ce_weight > 0`` adds that multiple of the cross-entropy in the same fused pass.
    """

    def __init__(
        self,
        alpha: float | Sequence[float] = 0.3,
        beta: float | Sequence[float] = 0.7,
        *,
        activation: str = "softmax",
        include_background: bool = True,
        batch: bool = False,
        reduction: str = "mean",
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        gamma: float = 1.0,
        ignore_index: int | None = None,
        class_weights: Sequence[float] | None = None,
        backend: str = "auto",
        sync_across_ranks: bool = False,
        ce_weight: float = 0.0,
        ce_class_weights: Sequence[float] | None = None,
    ):
        super().__init__()
        self.kwargs = dict(
            alpha=alpha,
            beta=beta,
            activation=activation,
            include_background=include_background,
            batch=batch,
            reduction=reduction,
            smooth_nr=smooth_nr,
            smooth_dr=smooth_dr,
            gamma=gamma,
            ignore_index=ignore_index,
            class_weights=class_weights,
            backend=backend,
            sync_across_ranks=sync_across_ranks,
            ce_weight=ce_weight,
            ce_class_weights=ce_class_weights,
        )
        # Fail at construction, not at the first step: scalar arguments through a tiny
        # probe call, per-class sequences on their own (C is only known at forward).
        seqs = {
            name: value
            for name, value in (
                ("alpha", alpha),
                ("beta", beta),
                ("class_weights", class_weights),
                ("ce_class_weights", ce_class_weights),
            )
            if value is not None and not _is_scalar(value)
        }
        for name, value in seqs.items():
            _per_class(name, value, len(value) if hasattr(value, "__len__") else 1)
        lengths = {len(v) for v in seqs.values() if hasattr(v, "__len__")}
        if len(lengths) > 1:
            raise ValueError(f"per-class arguments have different lengths: {seqs}")
        check_backend_name(backend)
        _check_ignore_index(ignore_index)
        if not isinstance(activation, str) or activation not in ("softmax", "sigmoid", "none"):
            raise ValueError(
                f"activation must be 'softmax', 'sigmoid' or 'none', got {activation!r}"
            )
        tversky_loss(
            torch.zeros(1, 2, 1),
            torch.zeros(1, 1, dtype=torch.long),
            **{
                **self.kwargs,
                "backend": "torch",
                "activation": "softmax",
                "alpha": 0.5 if "alpha" in seqs else alpha,
                "beta": 0.5 if "beta" in seqs else beta,
                "class_weights": None,
                "ce_class_weights": None,
                "ignore_index": None,
                "sync_across_ranks": False,
            },
        )

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return tversky_loss(logits, target, **self.kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items() if k != "backend")
