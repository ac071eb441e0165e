"""The application's two kinds of expected failure. Torch-free, so the CLI can tell
them apart without importing the training stack.

* :class:`ConfigError` — a setting out of range (the CLI names the option; exit 2).
* :class:`DataError` — a dataset, file or run folder that cannot be used (exit 1).
"""

from __future__ import annotations

__all__ = ["ConfigError", "DataError"]


class ConfigError(ValueError):
    """A setting out of range. ``field`` is its name (``alpha``; the CLI shows
    ``--alpha``), ``reason`` the problem (``must be >= 0, got -1.0``)."""

    def __init__(self, field: str, reason: str):
        self.field, self.reason = field, reason
        super().__init__(f"{field} {reason}")


class DataError(ValueError):
    """A dataset, subject, file or run folder that cannot be used, with the reason."""
