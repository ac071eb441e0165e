"""Segmentation models.

``UNet3D(in_channels=3, num_classes=2, base_features=32, levels=4, checkpoint="all",
norm="none")``: the paper's 3D U-Net, returning logits (B, C, D, H, W) for the fused
loss; activation checkpointing, in-place ReLU and autocast-friendly by default.
"""

from .unet import CHECKPOINT_MODES, NORMS, UNet3D

__all__ = ["CHECKPOINT_MODES", "NORMS", "UNet3D"]
