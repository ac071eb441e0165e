"""The exceptions the loss raises, one type per thing a caller may want to catch.

``InvalidInputError`` is a ``ValueError``, so code written against the plain
``ValueError`` the loss raised before keeps working; its type-checking twin is also a
``TypeError``. Callers (the compat shims, the training loop) catch these types instead of
matching message text.
"""

from __future__ import annotations


class InvalidInputError(ValueError):
    """An option, or the logits/target given to the loss, is invalid; the message says which."""


class InvalidInputTypeError(InvalidInputError, TypeError):
    """An option or input has the wrong type (a str where a number belongs, say)."""


class NonFiniteInputError(InvalidInputError):
    """The logits hold NaN or inf: no number the loss could return would be meaningful."""


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run these inputs; the message lists why."""
