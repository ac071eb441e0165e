"""Plain PyTorch oracles for fasttversky. Never imported by the package itself."""

from .tversky import (
    reference_cross_entropy,
    reference_focal,
    reference_target,
    reference_tversky_loss,
)

__all__ = [
    "reference_cross_entropy",
    "reference_focal",
    "reference_target",
    "reference_tversky_loss",
]
