"""nnU-Net v2 trainers whose loss runs in fasttversky's fused kernels (select with ``-tr``).

* ``nnUNetTrainerFastDiceCE``: nnU-Net's default losses, same values as ``nnUNetTrainer``,
  fused: soft Dice without background + cross-entropy for label datasets; for region
  datasets (sigmoid outputs, one per region) soft Dice + BCE (``DC_and_BCE_loss``).
* ``nnUNetTrainerFastTverskyCE``: Tversky loss with alpha=0.3 (false positives),
  beta=0.7 (false negatives) + cross-entropy (BCE over the regions of a region dataset),
  otherwise configured like the default.

Region datasets: nnU-Net's data pipeline turns the label map into one channel per region
(``ConvertSegmentationToRegionsTransform``, on the CPU, in its workers). These trainers
drop that transform from their training and validation pipelines and give the loss the
label map and the region table instead: the kernels look each voxel's label up in the
table and never build the region channels. Deep supervision downsamples the label map.
Validation metrics and prediction are nnU-Net's own (the validation step builds the
region channels it reads, for the highest resolution only, on the device).

nnunetv2 >= 2.8 finds them when this folder is listed in ``nnUNet_extTrainer``
(``python -m fasttversky.compat.nnunet`` prints it). It imports this file as the top-level
module ``fasttversky_trainers``, so everything here is imported absolutely.
"""

from __future__ import annotations

import inspect

import numpy as np
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from fasttversky.compat.nnunet.loss import DC_and_CE_loss, Tversky_and_CE_loss
from fasttversky.compat.nnunet.region_loss import (
    DC_and_BCE_loss,
    Tversky_and_BCE_loss,
    region_masks,
)


def _without_regions(transforms, args, kwargs):
    """``transforms(*args, **kwargs)`` (nnU-Net's get_*_transforms) with ``regions=None``:
    the label map goes to the loss as it is."""
    bound = inspect.signature(transforms).bind(*args, **kwargs)
    bound.arguments["regions"] = None
    return transforms(*bound.args, **bound.kwargs)


class nnUNetTrainerFastDiceCE(nnUNetTrainer):  # noqa: N801 -- nnU-Net's naming
    """``nnUNetTrainer`` with its ``DC_and_CE_loss`` / ``DC_and_BCE_loss`` computed by
    the fused kernels (region datasets: from the label map)."""

    def _fused_loss(self):
        return DC_and_CE_loss(
            {
                "batch_dice": self.configuration_manager.batch_dice,
                "smooth": 1e-5,
                "do_bg": False,
                "ddp": self.is_ddp,
            },
            {},
            weight_ce=1,
            weight_dice=1,
            ignore_label=self.label_manager.ignore_label,
            dice_class=None,
        )

    def _fused_region_loss(self):
        # nnUNetTrainer._build_loss's DC_and_BCE_loss, told the region table and the
        # ignore label so that it reads the label map.
        return DC_and_BCE_loss(
            {},
            {
                "batch_dice": self.configuration_manager.batch_dice,
                "do_bg": True,
                "smooth": 1e-5,
                "ddp": self.is_ddp,
            },
            use_ignore_label=self.label_manager.ignore_label is not None,
            dice_class=None,
            regions=self.label_manager.foreground_regions,
            ignore_label=self.label_manager.ignore_label,
        )

    def _build_loss(self):
        # No torch.compile of the Dice part (nnU-Net compiles loss.dc on GPU): the fused
        # kernels already are one pass each way.
        if self.label_manager.has_regions:
            loss = self._fused_region_loss()
            self.print_to_log_file(
                f"fasttversky: fused region loss ({type(loss).__name__}) over "
                f"{len(self.label_manager.foreground_regions)} regions, read from the label "
                "map (no region channels built in the data pipeline or the loss)"
            )
        else:
            loss = self._fused_loss()
        if self.enable_deep_supervision:
            loss = DeepSupervisionWrapper(loss, self._deep_supervision_weights())
        return loss

    def _deep_supervision_weights(self) -> np.ndarray:
        # nnUNetTrainer's weights: 1/2^i per scale, the lowest resolution off (1e-6 under
        # DDP without compile, where an unused output makes DDP complain), normalised.
        n = len(self._get_deep_supervision_scales())
        weights = np.array([1 / (2**i) for i in range(n)])
        weights[-1] = 1e-6 if (self.is_ddp and not self._do_i_compile()) else 0
        return weights / weights.sum()

    # -- region datasets: the label map flows to the loss -----------------------------
    @classmethod
    def get_training_transforms(cls, *args, **kwargs):
        return _without_regions(super().get_training_transforms, args, kwargs)

    @classmethod
    def get_validation_transforms(cls, *args, **kwargs):
        return _without_regions(super().get_validation_transforms, args, kwargs)

    def validation_step(self, batch: dict) -> dict:
        """nnU-Net's validation step. On region datasets its online Dice reads the region
        channels (and the ignore channel last) that nnU-Net's pipeline would have built:
        they are built here, on the device, for the resolution the metric uses."""
        if not self.label_manager.has_regions:
            return super().validation_step(batch)
        target = batch["target"]
        top = target[0] if isinstance(target, list) else target
        top = region_masks(
            top.to(self.device, non_blocking=True),
            self.label_manager.foreground_regions,
            self.label_manager.ignore_label,
        )
        target = [top, *target[1:]] if isinstance(target, list) else top
        return super().validation_step({**batch, "target": target})


class nnUNetTrainerFastTverskyCE(nnUNetTrainerFastDiceCE):  # noqa: N801
    """Fused Tversky (alpha=0.3, beta=0.7) + cross-entropy (BCE over the regions of a
    region dataset), deep supervision as nnU-Net."""

    alpha = 0.3
    beta = 0.7

    def _fused_loss(self):
        return Tversky_and_CE_loss(
            alpha=self.alpha,
            beta=self.beta,
            batch_dice=self.configuration_manager.batch_dice,
            do_bg=False,
            smooth=1e-5,
            weight_ce=1,
            weight_tversky=1,
            ignore_label=self.label_manager.ignore_label,
            ddp=self.is_ddp,
        )

    def _fused_region_loss(self):
        return Tversky_and_BCE_loss(
            self.label_manager.foreground_regions,
            alpha=self.alpha,
            beta=self.beta,
            batch_dice=self.configuration_manager.batch_dice,
            smooth=1e-5,
            weight_ce=1,
            weight_tversky=1,
            ignore_label=self.label_manager.ignore_label,
            ddp=self.is_ddp,
        )
