"""Drop-in replacements for other libraries' Tversky losses.

``fasttversky.compat.monai.TverskyLoss`` takes the constructor and returns the values of
``monai.losses.TverskyLoss`` (MONAI 1.6), so migrating is one import line::

    # from monai.losses import TverskyLoss
    from fasttversky.compat.monai import TverskyLoss

Nothing here imports MONAI: it is a test dependency only.
"""

from .monai import SlowPathWarning, TverskyLoss

__all__ = ["SlowPathWarning", "TverskyLoss"]
