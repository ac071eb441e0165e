"""fasttversky: the Tversky loss as fused, memory-light kernels.

Public API: :func:`tversky_loss`, :class:`TverskyLoss`, :func:`deep_supervision_loss`,
:func:`available_backends`.
"""

from ._dispatch import BackendUnavailableError, available_backends
from .deep_supervision import deep_supervision_loss
from .functional import tversky_loss
from .loss import TverskyLoss

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "TverskyLoss",
    "__version__",
    "available_backends",
    "deep_supervision_loss",
    "tversky_loss",
]
