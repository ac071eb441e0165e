"""A memory-efficient 3D U-Net (the architecture of Salehi et al. 2017, Çiçek et al. 2016).

Architecture, per level ``l = 0 .. levels-1`` with ``f_l = base_features * 2**l``::

    encoder l:  [max-pool 2x2x2 if l > 0] -> conv3x3x3 -> (norm) -> ReLU
                                          -> conv3x3x3 -> (norm) -> ReLU      (f_l features)
    decoder l:  transposed conv 2x2x2 stride 2 (f_{l+1} -> f_l), concat with encoder l's
                output (skip), then the same two conv/ReLU pairs (2 f_l -> f_l -> f_l)
    head:       conv1x1x1 (f_0 -> num_classes): logits, no softmax (the fused loss takes
                logits and computes the softmax in registers)

The state_dict layout (``encoders.{l}.conv1.weight`` …, ``decoders.{l}.up.weight`` …,
``head.weight``) is the same as ``reference.unet.ReferenceUNet3D``, so weights load
into each other.

Where the memory goes and what is done about it
-----------------------------------------------
At the paper's size (1x3x128x224x256, base 32) one full-resolution feature map is
0.94 GB in float32 (0.47 GB in bf16), and a plain U-Net keeps about six of them for
backward (two ReLU outputs per encoder and decoder block, the 2f-channel
concatenation, the pooling indices) plus the loss's softmax/one-hot copies.

* **Activation checkpointing by segment.** Segment boundaries are chosen so that only
  tensors that must exist anyway are stored: an encoder segment is ``pool + two
  convs`` (so neither the int64 pooling indices nor the first conv's output are
  kept), a lower decoder segment is ``up-conv + concat + two convs``. The top
  decoder is two segments, ``up-conv + concat + conv1`` and ``conv2 + head``: their
  boundary lives only from the end of the forward to the start of the backward, and
  in backward each half is recomputed alone. So between forward and backward only
  the input, the level-0 skip and the logits stay alive at full resolution.
  ``checkpoint="top"`` does this for level 0 only (where most of the memory is: each
  level down holds 1/8 of the voxels and 2x the features, i.e. 1/4 of the bytes),
  ``"all"`` for every level, ``"none"`` not at all. Checkpointing changes no number:
  the recomputation replays the same ops (tests/test_models.py checks bitwise).
* **No concatenation**: conv1(cat([skip, up])) is computed as
  conv(skip, W[:, :f]) + conv(up, W[:, f:]), so the 2f-channel tensor never exists and
  a conv backward's scratch is sized for f channels, not 2f.
* **Head as a matmul**: the 1x1x1 conv is a (C x f) @ (f x N) product; on the CPU a
  conv's backward reorders its operands into a blocked layout (two extra full-size
  copies), a matmul's does not.
* **In-place ReLU and add**: a convolution's backward needs its input, not its
  output, and batch/instance norm save their own input, so the ReLU (and the add of
  the two concat halves) may overwrite a conv/norm output.
* **Autocast-friendly**: no dtype is forced anywhere, so under
  ``torch.autocast(dtype=torch.bfloat16)`` every conv runs and stores in bf16 and the
  logits reach the fused loss in bf16 (it accumulates in float32).
* Batch norm is made checkpoint-safe: the recomputation in backward normalises with
  the batch statistics again but does not update the running statistics a second
  time (which would make checkpointed and plain training diverge).

The split concat-conv and the matmul head change only the summation order with respect
to ``reference.unet`` (float64 agreement ~1e-15).

Defaults chosen by measurement (the figures: bench/results/training_cpu.md):

* channels_last_3d is the default for float32 CPU input: it removes the oneDNN
  reorder copies of the forward convs (a lower step peak, and faster than the
  contiguous layout). It is off by default on GPUs, where it is unmeasured here and
  reported to slow some 3D nets (``channels_last=True`` to try it).
* Depth folding of small batch-1 CPU convs (:func:`_conv3x3`): a fraction of the
  scratch memory at level 1 and a faster backward.
* bf16 autocast on the CPU is not worth it here (no fast bf16 conv3d CPU kernel: more
  memory and many times the time); on the GPU it is the intended setting.
"""

from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as _checkpoint

__all__ = ["UNet3D", "CHECKPOINT_MODES", "NORMS"]

from ..config import CHECKPOINT_MODES, NORMS  # declared with the rest of the run settings

# Set while torch.utils.checkpoint recomputes a segment in backward; read by
# _CheckpointSafeBatchNorm3d. Thread-local because autograd may run backward on a
# worker thread per device, and the flag must only affect that recomputation.
_state = threading.local()


def _recomputing() -> bool:
    return getattr(_state, "recomputing", False)


@contextlib.contextmanager
def _recompute_context():
    prev = _recomputing()
    _state.recomputing = True
    try:
        yield
    finally:
        _state.recomputing = prev


def _context_fn():
    # (forward context, recomputation context) for non-reentrant checkpointing.
    return contextlib.nullcontext(), _recompute_context()


class _CheckpointSafeBatchNorm3d(nn.BatchNorm3d):
    """BatchNorm3d whose recomputation under checkpointing leaves the running stats alone.

    In training mode the output only depends on the batch statistics, so the
    recomputation updates throw-away copies of the running statistics (C floats each)
    instead of the real ones. Copies rather than ``running_mean=None``: the op must save
    the same tensors as in the original forward, which checkpointing verifies.
    Same parameters and buffers (and state_dict keys) as ``nn.BatchNorm3d``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.track_running_stats and _recomputing():
            return F.batch_norm(
                x,
                self.running_mean.clone(),
                self.running_var.clone(),
                self.weight,
                self.bias,
                True,
                self.momentum if self.momentum is not None else 0.0,
                self.eps,
            )
        return super().forward(x)


def _make_norm(norm: str, features: int) -> nn.Module:
    if norm == "none":
        return nn.Identity()
    if norm == "batch":
        return _CheckpointSafeBatchNorm3d(features)
    if norm == "instance":
        return nn.InstanceNorm3d(features, affine=True)
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def _fold_depth(x: torch.Tensor) -> bool:
    """Whether :func:`_conv3x3` should fold depth halves into the batch (see there)."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.shape[0] != 1:
        return False
    if torch.is_autocast_enabled("cpu") or not torch.backends.mkldnn.is_available():
        return False
    _, C, D, H, _ = x.shape
    # PyTorch's own rule (ConvParams::use_mkldnn) for batch 1 and 3x3x3 kernels: oneDNN
    # only when N*C*D*H > 20480, else the im2col path.
    return D >= 4 and D % 2 == 0 and C * D * H <= 20480 and torch.backends.mkldnn.enabled


def _conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Padded 3x3x3 conv, (1 or B, c_in, D, H, W) -> (B, c_out, D, H, W).

    On the CPU, PyTorch sends batch-1 convs with few channels to its im2col path, whose
    column buffer is 27 x c_in x voxels (many times the output) in forward and again in
    backward. Folding the two depth halves (each with a one-voxel halo) into a batch of
    2 takes the oneDNN path instead: same sums, a fraction of the memory and a faster
    backward (bench/results/training_cpu.md). The halo copy is input-sized.
    """
    if not _fold_depth(x):
        return F.conv3d(x, weight, bias, padding=1)
    D = x.shape[2]
    h = D // 2
    xp = F.pad(x, (0, 0, 0, 0, 1, 1))
    halves = torch.cat((xp[:, :, : h + 2], xp[:, :, h:]), 0)  # (2, c_in, h + 2, H, W)
    y = F.conv3d(halves, weight, bias, padding=(0, 1, 1))  # (2, c_out, h, H, W)
    return torch.cat((y[:1], y[1:]), 2)


class _DoubleConv(nn.Module):
    """Two (3x3x3 padded conv -> norm -> ReLU) pairs: (B, c_in, *S) -> (B, c_out, *S)."""

    def __init__(self, c_in: int, c_out: int, norm: str):
        super().__init__()
        bias = norm == "none"  # a norm's shift makes a conv bias redundant
        self.conv1 = nn.Conv3d(c_in, c_out, 3, padding=1, bias=bias)
        self.norm1 = _make_norm(norm, c_out)
        self.conv2 = nn.Conv3d(c_out, c_out, 3, padding=1, bias=bias)
        self.norm2 = _make_norm(norm, c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In-place ReLU is safe: neither conv nor norm needs its output for backward.
        x = F.relu(self.norm1(_conv3x3(x, self.conv1.weight, self.conv1.bias)), inplace=True)
        return F.relu(self.norm2(_conv3x3(x, self.conv2.weight, self.conv2.bias)), inplace=True)


class _Up(nn.Module):
    """2x2x2 transposed conv (c_in -> c_out), concat with the skip, two convs.

    Split in two halves so that the top level can checkpoint them separately:
    ``first(x, skip)`` = up-conv, concat, conv1, ReLU and ``second(y)`` = conv2, ReLU.
    """

    def __init__(self, c_in: int, c_out: int, norm: str):
        super().__init__()
        self.up = nn.ConvTranspose3d(c_in, c_out, 2, stride=2)
        self.conv = _DoubleConv(2 * c_out, c_out, norm)

    def first(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        # conv1(cat([skip, up])) computed as conv(skip, W[:, :f]) + conv(up, W[:, f:]):
        # the 2f-channel concatenation is never built (nor saved for backward), and the
        # backward of two f-channel convs needs half the scratch of one 2f-channel conv.
        # Same function as the reference's concatenation ([skip, up] order); only the
        # summation order of the two halves differs (rounding level).
        c = self.conv
        f = skip.shape[1]
        w = c.conv1.weight
        y = _conv3x3(skip, w[:, :f], c.conv1.bias)
        # In place: a conv's backward does not need its output.
        y += _conv3x3(self.up(x), w[:, f:], None)
        return F.relu(c.norm1(y), inplace=True)

    def second(self, y: torch.Tensor) -> torch.Tensor:
        c = self.conv
        return F.relu(c.norm2(_conv3x3(y, c.conv2.weight, c.conv2.bias)), inplace=True)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x, skip))


class UNet3D(nn.Module):
    """3D U-Net producing per-voxel class logits, memory-efficient by default.

    Args:
        in_channels: input modalities (T1, T2, FLAIR = 3).
        num_classes: C, output logit channels (2 for lesion vs background).
        base_features: features at full resolution; doubled at each level down.
        levels: resolution levels including the bottom one (>= 1; 4 in the paper).
            Spatial sizes must be divisible by ``2 ** (levels - 1)``.
        checkpoint: activation checkpointing, "all" (default; every level), "top"
            (full resolution only) or "none". Only active while autograd records.
        norm: "none" (the paper), "batch" or "instance" (affine) after each conv.
        channels_last: run the convs in channels_last_3d. None (default) = on for
            float32 CPU input, where it was measured leaner and faster (no oneDNN
            reorder copies), off elsewhere (unmeasured on GPUs). The input is converted
            by :meth:`prepare_input` (``train`` calls it) or else in ``forward``.

    ``forward(x)``: x (B, in_channels, D, H, W), any float dtype matching the weights
    (or under autocast) -> logits (B, num_classes, D, H, W) in the compute dtype
    (float32 weights under bf16 autocast give bf16 logits).
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 2,
        base_features: int = 32,
        levels: int = 4,
        checkpoint: str = "all",
        norm: str = "none",
        channels_last: bool | None = None,
    ):
        super().__init__()
        if levels < 1:
            raise ValueError(f"levels must be >= 1, got {levels}")
        if min(in_channels, num_classes, base_features) < 1:
            raise ValueError("in_channels, num_classes and base_features must be >= 1")
        if checkpoint not in CHECKPOINT_MODES:
            raise ValueError(f"checkpoint must be one of {CHECKPOINT_MODES}, got {checkpoint!r}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.base_features = base_features
        self.levels = levels
        self.checkpoint = checkpoint
        self.norm = norm
        self.channels_last = channels_last
        feats = [base_features * 2**level for level in range(levels)]
        self.encoders = nn.ModuleList(
            _DoubleConv(in_channels if level == 0 else feats[level - 1], feats[level], norm)
            for level in range(levels)
        )
        self.decoders = nn.ModuleList(
            _Up(feats[level + 1], feats[level], norm) for level in range(levels - 1)
        )
        self.head = nn.Conv3d(feats[0], num_classes, 1)

    # -- segments: each is one checkpointable unit (see the module docstring) ---------
    def _encode(self, level: int, x: torch.Tensor) -> torch.Tensor:
        if level > 0:
            x = F.max_pool3d(x, 2)
        return self.encoders[level](x)

    def _decode(self, level: int, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.decoders[level](x, skip)

    def _decode_first(self, level: int, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.decoders[level].first(x, skip)

    def _decode_second(self, level: int, y: torch.Tensor) -> torch.Tensor:
        return self._head(self.decoders[level].second(y))

    def _head(self, y: torch.Tensor) -> torch.Tensor:
        """The 1x1x1 conv as a matmul over (B, f, N): on the CPU, a conv's backward
        reorders grad and input into a blocked layout (two extra full-size copies at
        the top level); a matmul's backward needs none. Same parameters as self.head."""
        B, f = y.shape[:2]
        w = self.head.weight.view(self.num_classes, f)
        if not y.is_contiguous() and y.is_contiguous(memory_format=torch.channels_last_3d):
            # (B, D, H, W, f) @ (f, C): no copy of a channels-last input.
            out = torch.matmul(y.permute(0, 2, 3, 4, 1), w.t())
            out = out + self.head.bias.to(out.dtype)
            return out.permute(0, 4, 1, 2, 3)
        out = torch.matmul(w, y.reshape(B, f, -1))  # autocast casts both operands
        out = out + self.head.bias.view(1, -1, 1).to(out.dtype)
        return out.view(B, self.num_classes, *y.shape[2:])

    def _checkpointed(self, level: int) -> bool:
        if not torch.is_grad_enabled():
            return False
        return self.checkpoint == "all" or (self.checkpoint == "top" and level == 0)

    def _run(self, level: int, fn, *args):
        if self._checkpointed(level):
            # preserve_rng_state=False: the net draws no random numbers, so stashing and
            # restoring the RNG for the recomputation would be wasted work.
            return _checkpoint(
                fn,
                level,
                *args,
                use_reentrant=False,
                preserve_rng_state=False,
                context_fn=_context_fn,
            )
        return fn(level, *args)

    def _use_channels_last(self, x: torch.Tensor) -> bool:
        if self.channels_last is not None:
            return self.channels_last
        return x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 5

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        """x in the memory layout this model computes in (a copy only if it differs).

        Call it where the caller can drop its own copy (the training loop does), so the
        layout change does not keep two inputs alive.
        """
        if self._use_channels_last(x):
            return x.contiguous(memory_format=torch.channels_last_3d)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, in_channels, D, H, W) float -> logits (B, num_classes, D, H, W).

        The logits are channels_last_3d when the model computes in that layout (the
        fused loss reads them without a copy)."""
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected input (B, {self.in_channels}, D, H, W), got {tuple(x.shape)}"
            )
        m = 2 ** (self.levels - 1)
        if any(s % m for s in x.shape[2:]):
            raise ValueError(
                f"spatial size {tuple(x.shape[2:])} must be divisible by 2**(levels-1) = {m}"
            )
        x = self.prepare_input(x)
        skips = []
        for level in range(self.levels):
            x = self._run(level, self._encode, x)
            skips.append(x)
        if self.levels == 1:
            return self._head(x)
        x = skips.pop()
        for level in reversed(range(1, self.levels - 1)):
            x = self._run(level, self._decode, x, skips.pop())
        # The top decoder is two segments: its mid tensor is a boundary only from here to
        # the start of backward, and in backward each half's recomputation is alive
        # alone (up-conv output and conv1 output are never alive together with the
        # conv2 backward's scratch). Lower levels stay one segment: a boundary there
        # would be kept through the whole top level.
        y = self._run(0, self._decode_first, x, skips.pop())
        return self._run(0, self._decode_second, y)

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, num_classes={self.num_classes}, "
            f"base_features={self.base_features}, levels={self.levels}, "
            f"checkpoint={self.checkpoint!r}, norm={self.norm!r}, "
            f"channels_last={self.channels_last!r}"
        )
