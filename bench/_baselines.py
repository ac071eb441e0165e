"""The compound losses users run today, built the way nnU-Net and MONAI build them, and
ours; shared by ``bench_compound.py`` and ``gpu_report.py`` so both time the same calls.

Every builder returns ``fn(logits, target) -> loss`` for logits (B, C, *spatial) and an
integer label map (B, 1, *spatial), or raises ``ImportError`` when the library is not
importable (callers skip or record the reason). The Dice is nnU-Net's default: soft
Dice without background (Tversky with alpha = beta = 1/2 here) + CE, weights 1 and 1.

``compiled=True`` is ``torch.compile`` (Inductor) applied the way a user would: nnU-Net
compiles its Dice module (``loss.dc``) itself on the GPU, so that is what is compiled
for nnU-Net; MONAI's DiceCELoss is compiled as a whole module.
"""

from __future__ import annotations

import torch

import fasttversky


def nnunet_version() -> str:
    """nnunetv2's version (its Dice one-hot became float32 in 2.6.4), or why it is absent."""
    try:
        from importlib.metadata import version

        return version("nnunetv2")
    except Exception as exc:  # not installed
        return f"not installed ({type(exc).__name__})"


def fused_dice_ce(backend: str = "auto"):
    def fn(x, t):
        return fasttversky.tversky_loss(
            x, t, 0.5, 0.5, include_background=False, ce_weight=1.0, backend=backend
        )

    return fn


def fused_tversky(backend: str = "auto"):
    return lambda x, t: fasttversky.tversky_loss(
        x, t, 0.5, 0.5, include_background=False, backend=backend
    )


def nnunet_dice_ce(compiled: bool = False):
    """nnunetv2's DC_and_CE_loss as ``nnUNetTrainer._build_loss`` builds it (no regions)."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    loss = DC_and_CE_loss(
        {"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False},
        {},
        weight_ce=1,
        weight_dice=1,
        ignore_label=None,
        dice_class=MemoryEfficientSoftDiceLoss,
    )
    if compiled:
        loss.dc = torch.compile(loss.dc)
    return loss


def monai_dice_ce(compiled: bool = False):
    from monai.losses import DiceCELoss

    loss = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False)
    if compiled:
        loss = torch.compile(loss)
    # MONAI's CE wants int64 class indices; its one-hot accepts any integer dtype.
    return lambda x, t: loss(x, t.long())


def nnunet_deep_supervision(weights, compiled: bool = False):
    """nnU-Net's DeepSupervisionWrapper over its DC_and_CE_loss: fn(logits_list, targets)
    with one (already downsampled) target per scale, as nnU-Net's dataloader gives them."""
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper

    return DeepSupervisionWrapper(nnunet_dice_ce(compiled), list(weights))


def fused_deep_supervision(weights, backend: str = "auto"):
    """fasttversky.deep_supervision_loss from the full-resolution label map alone."""

    def fn(logits_list, targets):
        return fasttversky.deep_supervision_loss(
            logits_list,
            targets[0],
            list(weights),
            alpha=0.5,
            beta=0.5,
            include_background=False,
            ce_weight=1.0,
            backend=backend,
        )

    return fn
