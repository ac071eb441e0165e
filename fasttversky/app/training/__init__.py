"""Training and inference for 3D segmentation with the fused Tversky loss.

Public API (stable; the CLI builds on it)::

    from fasttversky.app.training import (TrainConfig, TrainOutputs, TrainResult, train,
                                          predict, segment_volume)

    config = TrainConfig(steps=2000, lr=1e-4, lr_decay=0.9, lr_decay_every=1000,
                         alpha=0.3, beta=0.7, gamma=1.0, backend="auto",
                         precision="fp32",          # or "bf16", "fp16" (+ GradScaler)
                         grad_accum=1, seed=0, checkpoint_every=500, log_every=1,
                         device="cpu", sync_across_ranks=False)
    outputs = TrainOutputs(checkpoint_dir="runs/a", log_path="runs/a/metrics.jsonl",
                           progress=True)
    result = train(model, batches, config, resume=None, outputs=outputs)  # -> TrainResult
    prob = predict(model, image, window=None, overlap=0.5, precision="fp32", device=None)
    prob, mask = segment_volume(model, image, PredictConfig(...))   # one volume

* ``train(model, batches, config, resume=None, outputs=None) -> TrainResult``: Adam +
  StepLR (the paper's lr 1e-4 x 0.9 every 1000 steps by default; ``lr_schedule="poly"``:
  nnU-Net's), loss = ``fasttversky.tversky_loss(logits, label, alpha, beta, gamma=...,
  ce_weight=..., backend=...)`` with softmax. ``batches`` is a callable
  ``batches(i) -> (image, label)`` for micro-batch i, or an iterable of such pairs;
  image (B, Cin, D, H, W) float32, label (B, D, H, W) uint8. ``resume``: a checkpoint
  file/directory, or True for ``outputs.checkpoint_dir``; the run then continues
  bitwise as if uninterrupted.
  ``outputs`` (:class:`TrainOutputs`): where the call writes, and the progress bar.
  Checkpoints (``<checkpoint_dir>/last.pt``) are written atomically (temp file +
  ``os.replace``) and hold model, optimiser, scheduler, GradScaler, RNG states, step
  and micro-batches consumed. The metrics log is JSONL, one line per step:
  ``{"step", "loss", "lr", "seconds", "voxels_per_s", "time"}``; a fresh run starts it
  afresh, a resumed run keeps the lines up to the checkpoint's step and appends.
* ``train(..., validate=fn)``: ``fn(model) -> {"score": float, ...}`` every
  ``config.val_every`` steps and after the last; the best-scoring checkpoint is copied
  to ``<checkpoint_dir>/best.pt``, each result appended to ``outputs.val_log_path``;
  RNG states are restored around it, so the training is bitwise unchanged.
* ``TrainResult``: ``losses`` (per-step floats of this call), ``step``,
  ``start_step``, ``checkpoint`` (Path or None), ``seconds``, ``voxels_per_s``,
  ``validations``, ``best_step``, ``best_score``.
* ``NonFiniteLossError`` (RuntimeError): raised when the loss or logits become
  NaN/inf; the failing step is not applied and the last checkpoint stays intact
  (attributes ``step``, ``loss``, ``checkpoint``).
* ``load_checkpoint(path) -> dict``: read a checkpoint (``weights_only=True``); its
  ``"model"`` entry is a state_dict for ``UNet3D`` (or ``reference.unet``'s twin). A
  truncated or corrupt file raises ``CheckpointError`` (a ``DataError``) naming it.
* ``predict(model, image, *, window=None, overlap=0.5, precision="fp32",
  device=None) -> Tensor``: foreground probabilities (B, D, H, W) float32, whole
  volume or by sliding windows.
* ``segment_volume(model, image, config: PredictConfig, brain=None, ...) -> (prob,
  mask)``: the one inference path (``fasttversky.app.training.inference``): the
  probability by :func:`predict` with the config's windows and mirroring, zero outside
  the brain, then the mask (threshold, small lesions removed).
"""

from ..config import TrainConfig
from .checkpoint import BEST_NAME, CHECKPOINT_NAME, CheckpointError, load_checkpoint
from .inference import segment_volume
from .loop import NonFiniteLossError, TrainResult, train
from .outputs import TrainOutputs
from .predict import predict

__all__ = [
    "BEST_NAME",
    "CHECKPOINT_NAME",
    "CheckpointError",
    "NonFiniteLossError",
    "TrainConfig",
    "TrainOutputs",
    "TrainResult",
    "load_checkpoint",
    "predict",
    "segment_volume",
    "train",
]
