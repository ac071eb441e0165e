"""Drop-in replacements for other libraries' Tversky losses.

``fasttversky.compat.monai.TverskyLoss``, ``DiceLoss``, ``GeneralizedDiceLoss`` and
``DiceCELoss`` take the constructors and return the values of MONAI 1.6's classes of
the same names, so migrating is one import line::

    # from monai.losses import TverskyLoss
    from fasttversky.compat.monai import TverskyLoss

Nothing here imports MONAI: it is a test dependency only. ``fasttversky.compat.nnunet``
(imported on its own) holds nnU-Net v2's ``DC_and_CE_loss`` and trainers. Both shims
share ``_common`` (the call into the fused loss, :class:`SlowPathWarning`, label
conversion, argument checks) and import only the core's public API.
"""

from .monai import DiceCELoss, DiceLoss, GeneralizedDiceLoss, SlowPathWarning, TverskyLoss

__all__ = ["DiceCELoss", "DiceLoss", "GeneralizedDiceLoss", "SlowPathWarning", "TverskyLoss"]
