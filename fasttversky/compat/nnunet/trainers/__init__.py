"""The folder listed in ``nnUNet_extTrainer``; nnU-Net imports ``fasttversky_trainers`` from it."""
