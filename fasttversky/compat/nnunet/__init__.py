"""nnU-Net v2 drop-ins: the fused ``DC_and_CE_loss`` and trainers selected with ``-tr``.

* :class:`DC_and_CE_loss` -- nnU-Net's default loss (soft Dice + cross-entropy) with its
  constructor and values, computed by the fused kernels (no nnunetv2 needed);
  :class:`Tversky_and_CE_loss` the same with a Tversky term.
* :class:`DC_and_BCE_loss` -- nnU-Net's region-based loss (sigmoid soft Dice + BCE),
  fused, from its region target or from the label map and the region table
  (``regions=``); :class:`Tversky_and_BCE_loss` the same with a Tversky term.
* Trainers ``nnUNetTrainerFastDiceCE`` (nnU-Net's default loss, fused) and
  ``nnUNetTrainerFastTverskyCE`` (Tversky alpha=0.3, beta=0.7 + CE, fused) live in the
  folder :data:`TRAINER_DIR`, which nnunetv2 >= 2.8 searches when it is listed in the
  ``nnUNet_extTrainer`` environment variable::

      pip install "fasttversky[nnunet]"
      export nnUNet_extTrainer=$(python -m fasttversky.compat.nnunet)
      nnUNetv2_train DATASET 3d_fullres 0 -tr nnUNetTrainerFastDiceCE

Importing this package does not import nnunetv2; the trainers module does.
"""

from pathlib import Path

from .._common import SlowPathWarning
from .loss import DC_and_CE_loss, Tversky_and_CE_loss
from .region_loss import DC_and_BCE_loss, Tversky_and_BCE_loss

#: The folder to put in ``nnUNet_extTrainer`` (nnU-Net imports the modules in it by name).
TRAINER_DIR = str(Path(__file__).resolve().parent / "trainers")

__all__ = [
    "DC_and_BCE_loss",
    "DC_and_CE_loss",
    "SlowPathWarning",
    "TRAINER_DIR",
    "Tversky_and_BCE_loss",
    "Tversky_and_CE_loss",
]
