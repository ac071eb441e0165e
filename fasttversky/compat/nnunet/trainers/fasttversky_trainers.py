"""nnU-Net v2 trainers whose loss runs in fasttversky's fused kernels (select with ``-tr``).

* ``nnUNetTrainerFastDiceCE``: nnU-Net's default loss (soft Dice without background +
  cross-entropy, deep supervision), same values as ``nnUNetTrainer``, fused.
* ``nnUNetTrainerFastTverskyCE``: Tversky loss with alpha=0.3 (false positives),
  beta=0.7 (false negatives) + cross-entropy, otherwise configured like the default.

nnunetv2 >= 2.8 finds them when this folder is listed in ``nnUNet_extTrainer``
(``python -m fasttversky.compat.nnunet`` prints it). It imports this file as the top-level
module ``fasttversky_trainers``, so everything here is imported absolutely. Region-based
(sigmoid) label configurations keep nnU-Net's own ``DC_and_BCE_loss``.
"""

from __future__ import annotations

import numpy as np
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from fasttversky.compat.nnunet.loss import DC_and_CE_loss, Tversky_and_CE_loss


class nnUNetTrainerFastDiceCE(nnUNetTrainer):  # noqa: N801 -- nnU-Net's naming
    """``nnUNetTrainer`` with its ``DC_and_CE_loss`` computed by the fused kernels."""

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

    def _build_loss(self):
        if self.label_manager.has_regions:
            return super()._build_loss()
        # No torch.compile of the Dice part (nnU-Net compiles loss.dc on GPU): the fused
        # kernels already are one pass each way.
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


class nnUNetTrainerFastTverskyCE(nnUNetTrainerFastDiceCE):  # noqa: N801
    """Fused Tversky (alpha=0.3, beta=0.7) + cross-entropy, deep supervision as nnU-Net."""

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
