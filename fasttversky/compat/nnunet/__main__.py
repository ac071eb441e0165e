"""``python -m fasttversky.compat.nnunet`` prints the folder for ``nnUNet_extTrainer``."""

from . import TRAINER_DIR

if __name__ == "__main__":
    print(TRAINER_DIR)
