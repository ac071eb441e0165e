"""fasttversky: the Tversky loss as fused, memory-light kernels.

Public API: :func:`tversky_loss`, :class:`TverskyLoss`, :class:`TverskyOptions`,
:func:`deep_supervision_loss`, :func:`available_backends`, ``BACKENDS``, and the errors
:class:`InvalidInputError` (a ValueError), :class:`NonFiniteInputError` and
:class:`BackendUnavailableError`.

The names are loaded on first access (PEP 562), so importing a subpackage that needs
no torch (``fasttversky.app.cli`` answering ``--help``) does not pay for ``import
torch``; ``from fasttversky import tversky_loss`` works as usual.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_LAZY = {
    "BACKENDS": "._dispatch",
    "BackendUnavailableError": ".errors",
    "InvalidInputError": ".errors",
    "NonFiniteInputError": ".errors",
    "TverskyOptions": ".options",
    "available_backends": "._dispatch",
    "deep_supervision_loss": ".deep_supervision",
    "tversky_loss": ".functional",
    "TverskyLoss": ".loss",
}

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "InvalidInputError",
    "NonFiniteInputError",
    "TverskyOptions",
    "TverskyLoss",
    "__version__",
    "available_backends",
    "deep_supervision_loss",
    "tversky_loss",
]

if TYPE_CHECKING:
    from ._dispatch import BACKENDS, available_backends
    from .deep_supervision import deep_supervision_loss
    from .errors import BackendUnavailableError, InvalidInputError, NonFiniteInputError
    from .functional import tversky_loss
    from .loss import TverskyLoss
    from .options import TverskyOptions


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fasttversky' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
