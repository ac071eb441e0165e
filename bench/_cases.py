"""The loss benchmark's cases and providers, shared by bench_loss.py and report.py.

A case is one input shape and logits dtype; every provider gets the same tensors:

* ``logits``: (B, C, D, H, W) in the case's dtype, ``requires_grad=True`` (a network's
  output in a training step), standard normal.
* ``labels``: (B, D, H, W) uint8 with class 0 on ~90 % of voxels and the rest spread over
  the other classes (small-lesion data is mostly background).

Bytes that must move (the floor any implementation pays, whatever its passes):
forward reads logits + labels; backward reads them again and writes the logits'
gradient. So ``fwd = L + Y``, ``bwd = 2 L + Y`` and ``fwdbwd = 3 L + 2 Y`` (L = logits
bytes, Y = labels bytes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ALPHA, BETA = 0.3, 0.7  # the paper's best; every provider gets the same values

_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class LossCase:
    name: str
    batch: int
    classes: int
    spatial: tuple[int, ...]
    dtype: torch.dtype

    @property
    def id(self) -> str:
        return f"{self.name}-{_DTYPE_NAMES[self.dtype]}"

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.batch, self.classes, *self.spatial)

    @property
    def voxels(self) -> int:
        return self.batch * math.prod(self.spatial)

    @property
    def logits_bytes(self) -> int:
        return self.voxels * self.classes * self.dtype.itemsize

    @property
    def labels_bytes(self) -> int:
        return self.voxels  # uint8

    @property
    def grad_bytes(self) -> int:
        return self.logits_bytes

    def bytes_moved(self, mode: str) -> int:
        if mode == "fwd":
            return self.logits_bytes + self.labels_bytes
        if mode == "bwd":
            return self.logits_bytes + self.labels_bytes + self.grad_bytes
        if mode == "fwdbwd":
            return 2 * (self.logits_bytes + self.labels_bytes) + self.grad_bytes
        raise ValueError(mode)

    def make(self, device: str = "cpu", seed: int = 0):
        """(logits (B, C, *spatial) dtype requires_grad, labels (B, *spatial) uint8)."""
        gen = torch.Generator().manual_seed(seed)
        logits = torch.randn(self.shape, generator=gen, dtype=torch.float32)
        u = torch.rand((self.batch, *self.spatial), generator=gen)
        # 90 % background, the rest split evenly over classes 1..C-1
        fg = ((u - 0.9).clamp_min(0) / 0.1 * (self.classes - 1)).floor() + 1
        labels = torch.where(u < 0.9, 0.0, fg.clamp_max(self.classes - 1)).to(torch.uint8)
        del u, fg
        logits = logits.to(device=device, dtype=self.dtype).requires_grad_(True)
        return logits, labels.to(device)


PAPER = (128, 224, 256)  # the paper's MRI volume, D x H x W


def cases(quick: bool = False) -> list[LossCase]:
    """The benchmark matrix.

    Full: the paper's volume at batch 1 and 2 and a 4-class 128^3 cube, each in float32
    and bfloat16. ``quick``: a smoke run of three cases with every spatial dim 4x
    smaller (64x fewer voxels), so torch.compile builds only three graphs.
    """
    if quick:
        paper = tuple(s // 4 for s in PAPER)
        return [
            LossCase("paper-b1", 1, 2, paper, torch.float32),
            LossCase("paper-b1", 1, 2, paper, torch.bfloat16),
            LossCase("4class-cube", 1, 4, (32, 32, 32), torch.float32),
        ]
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        out += [
            LossCase("paper-b1", 1, 2, PAPER, dtype),
            LossCase("paper-b2", 2, 2, PAPER, dtype),
            LossCase("4class-cube", 1, 4, (128, 128, 128), dtype),
        ]
    return out


# --------------------------------------------------------------------------------------
# providers: name -> factory(case) -> fn(logits, labels) -> scalar loss
# --------------------------------------------------------------------------------------
def fused_backends(device: str) -> list[str]:
    """fasttversky backends that can run on ``device`` here, fastest first."""
    import fasttversky

    order = ("cpu", "torch") if device == "cpu" else ("cuda", "triton", "torch")
    avail = fasttversky.available_backends()
    return [b for b in order if avail.get(b) is None]


def _fused(backend: str):
    def factory(case):
        import fasttversky

        def fn(logits, labels):
            return fasttversky.tversky_loss(logits, labels, ALPHA, BETA, backend=backend)

        return fn

    return factory


def _reference(case):
    from reference import reference_tversky_loss

    def fn(logits, labels):
        return reference_tversky_loss(logits, labels, ALPHA, BETA)

    return fn


_COMPILED: dict = {}


def _compiled_reference(case):
    # One compiled function for the whole session: dynamo's cache then holds one graph
    # per (shape, dtype), shared by the fwd and fwd+bwd benchmarks of a case.
    if "fn" not in _COMPILED:
        from reference import reference_tversky_loss

        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        compiled = torch.compile(reference_tversky_loss, dynamic=False)

        def fn(logits, labels):
            return compiled(logits, labels, ALPHA, BETA)

        _COMPILED["fn"] = fn
    return _COMPILED["fn"]


def _monai(case):
    # How a MONAI user feeds a label map: softmax on the logits, one-hot of (B, 1, ...).
    from monai.losses import TverskyLoss

    loss = TverskyLoss(softmax=True, to_onehot_y=True, alpha=ALPHA, beta=BETA)

    def fn(logits, labels):
        return loss(logits, labels.unsqueeze(1))

    return fn


def _compat(case):
    # The one-line migration: same call as _monai, fasttversky's compat class.
    from fasttversky.compat.monai import TverskyLoss

    loss = TverskyLoss(softmax=True, to_onehot_y=True, alpha=ALPHA, beta=BETA)

    def fn(logits, labels):
        return loss(logits, labels.unsqueeze(1))

    return fn


def providers(device: str) -> dict:
    """Ordered name -> factory for every provider that can run on ``device`` here."""
    out = {f"fasttversky[{b}]": _fused(b) for b in fused_backends(device)}
    out["compat.monai"] = _compat
    out["reference"] = _reference
    out["compile(reference)"] = _compiled_reference
    try:
        import monai  # noqa: F401

        out["monai"] = _monai
    except ImportError:  # a test extra; the report says it is missing
        pass
    return out


# Fast providers get more rounds; slow ones fewer, so the matrix fits in minutes.
SLOW_PROVIDERS = ("reference", "compile(reference)", "monai", "fasttversky[torch]")
