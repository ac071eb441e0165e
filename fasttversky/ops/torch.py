"""Vectorised PyTorch backend: runs anywhere torch runs, for what no kernel covers.

It materialises p and the one-hot target, one block of voxels at a time (a few MiB),
so its extra memory is the gradient and a few blocks, whatever the number of classes;
it reads the volume more often than the fused backends do. Same contract as every backend
(``fasttversky/_spec.py``).
"""

from __future__ import annotations

import torch

from .._spec import KernelSpec
from ._base import Backend, compute_dtype, in_functorch_transform, new_grad

# Voxels per first-level partial sum; below ATen's GRAIN_SIZE (32768), see _sum_n.
_CHUNK = 8192


def _sum_n(v: torch.Tensor) -> torch.Tensor:
    """Σ over the last dim in float64, in an order that does not depend on the thread count.

    ATen reduces every output element on one thread, in the same order whatever the
    number of threads, except a reduction to a single element (B = C = 1) of 32768
    elements or more, which it splits across the threads (its "two-pass" reduction):
    that made this backend differ between 1 and 2 threads. Summing fixed chunks of
    ``_CHUNK`` voxels first, then the chunk sums the same way, never leaves ATen a
    large single-output reduction, so results are bitwise equal for any thread count.
    """
    n = v.shape[-1]
    if n <= _CHUNK:
        return v.sum(-1, dtype=torch.float64)
    m = n // _CHUNK
    parts = [v[..., : m * _CHUNK].unflatten(-1, (m, _CHUNK)).sum(-1, dtype=torch.float64)]
    if n > m * _CHUNK:
        parts.append(v[..., m * _CHUNK :].sum(-1, dtype=torch.float64, keepdim=True))
    return _sum_n(torch.cat(parts, dim=-1))


def _probs(x: torch.Tensor, activation: int) -> torch.Tensor:
    if activation == 0:
        return torch.softmax(x, dim=1)
    if activation == 1:
        return torch.sigmoid(x)
    return x


def _onehot_and_mask(target, spec: KernelSpec, C: int, dtype):
    """(g (B, C, N), w (B, 1, N), n_bad) from the target."""
    if spec.soft_target:
        g = target.to(dtype)
        bad = ((g < 0) | (g > 1) | ~torch.isfinite(g)).sum()
        return g, None, bad
    labels = target.long()
    keep = torch.ones_like(labels, dtype=torch.bool)
    if spec.ignore_index is not None:
        keep = labels != spec.ignore_index
    bad = (keep & ((labels < 0) | (labels >= spec.num_labels))).sum()
    if spec.binary_labels:
        g = (labels == 1).unsqueeze(1)
    else:
        classes = torch.arange(C, device=labels.device).view(1, C, 1)
        g = labels.unsqueeze(1) == classes
    w = keep.unsqueeze(1).to(dtype)
    return g.to(dtype) * w, w, bad


def _ce_sums(x, g, w, spec: KernelSpec) -> torch.Tensor:
    """sum_ce (B, C) float64 (see _spec.py); g is the masked one-hot, w the voxel mask."""
    return _sum_n(_ce_terms(x, g, w, spec))


def _ce_overflowed(logits: torch.Tensor, stats: torch.Tensor, flags: torch.Tensor) -> bool:
    """A voxel's CE in float32 overflows where logits near +-3e38 put two classes up to
    2 x FLT_MAX apart, although the loss (a mean) fits: the CE sums are then taken again
    from float64 logits. One check per call (one host sync on CUDA), after every block;
    skipped under a torch.func transform, since vmap cannot branch on a tensor's values."""
    if logits.dtype == torch.float64 or in_functorch_transform():
        return False
    return bool((~torch.isfinite(stats[..., 3]).all()) & (flags[0] == 0))


def _ce_terms(x, g, w, spec: KernelSpec) -> torch.Tensor:
    if spec.activation == 0:
        # -log p_c on the voxels labelled c (g = 0 elsewhere, ignored voxels included); a
        # select, not -log p * g: log p is -inf for a class far below the others
        return torch.where(g != 0, -torch.log_softmax(x, dim=1), 0.0)
    # max(x, 0) - x g + log1p(exp(-|x|)): finite for any finite x
    ce = torch.nn.functional.binary_cross_entropy_with_logits(x, g, reduction="none")
    return ce * w if w is not None else ce


# Elements (B·C·voxels) of one block's temporaries: the backend materialises p, the
# one-hot and a few products per block, never for the whole volume, so its extra memory
# stays a few such blocks (16 MiB each in float32) beside the gradient, for any C.
_BLOCK_ELEMENTS = 1 << 22


def _voxel_blocks(B: int, C: int, N: int) -> list[slice]:
    """Consecutive voxel ranges, each a multiple of _CHUNK voxels (but the last)."""
    step = max(_CHUNK, _BLOCK_ELEMENTS // (B * C) // _CHUNK * _CHUNK)
    return [slice(start, min(start + step, N)) for start in range(0, N, step)]


class _TorchBackend(Backend):
    name = "torch"
    features = frozenset({"ce"})

    def forward_stats(self, logits, target, spec: KernelSpec):
        B, C, N = logits.shape
        stats = flags = None
        for block in _voxel_blocks(B, C, N):  # summed in a fixed order: deterministic
            t = target[..., block]
            s, f = self._block_stats(logits[..., block], t, spec)
            stats, flags = (s, f) if stats is None else (stats + s, flags + f)
        if spec.with_ce and _ce_overflowed(logits, stats, flags):
            stats = torch.cat([stats[..., :3], self._ce64(logits, target, spec)[..., None]], -1)
        return stats, flags

    def _ce64(self, logits, target, spec: KernelSpec) -> torch.Tensor:
        """sum_ce (B, C) from float64 logits, block by block, in the same order."""
        B, C, N = logits.shape
        total = None
        for block in _voxel_blocks(B, C, N):
            g, w, _ = _onehot_and_mask(target[..., block], spec, C, torch.float64)
            s = _ce_sums(logits[..., block].double(), g, w, spec)
            total = s if total is None else total + s
        return total

    def _block_stats(self, logits, target, spec: KernelSpec):
        B, C, N = logits.shape
        cdtype = compute_dtype(logits.dtype)
        x = logits.to(cdtype)
        n_nonfinite = (~torch.isfinite(x)).sum()
        p = _probs(x, spec.activation)
        g, w, n_bad = _onehot_and_mask(target, spec, C, cdtype)
        if w is not None:
            p = p * w
        sums = [
            _sum_n(p * g),
            _sum_n(p),
            _sum_n(g),
        ]
        if spec.with_ce:
            sums.append(_ce_sums(x, g, w, spec))
        stats = torch.stack(sums, dim=-1)
        flags = torch.stack([n_nonfinite, n_bad]).to(torch.int64)
        return stats, flags

    def backward(self, logits, target, coef_a, coef_b, spec: KernelSpec, coef_ce=None):
        B, C, N = logits.shape
        grad = new_grad(logits)
        for block in _voxel_blocks(B, C, N):
            dx = self._block_grad(
                logits[..., block], target[..., block], coef_a, coef_b, spec, coef_ce
            )
            grad[..., block] = dx
        return grad

    def _block_grad(self, logits, target, coef_a, coef_b, spec: KernelSpec, coef_ce):
        B, C, N = logits.shape
        cdtype = coef_a.dtype
        p = _probs(logits.to(cdtype), spec.activation)
        g, w, _ = _onehot_and_mask(target, spec, C, cdtype)
        dldp = coef_a.unsqueeze(-1) + coef_b.unsqueeze(-1) * g
        if w is not None:
            dldp = dldp * w
        if spec.activation == 0:
            dx = p * (dldp - (p * dldp).sum(1, keepdim=True))
        elif spec.activation == 1:
            dx = dldp * p * (1 - p)
        else:
            dx = dldp
        if coef_ce is not None:
            e = coef_ce.unsqueeze(-1)
            if spec.activation == 0:
                # g is the masked one-hot, so (e g).sum(1) is e of the voxel's label (0 if ignored)
                dx = dx + p * (e * g).sum(1, keepdim=True) - e * g
            else:
                dx = dx + e * (p - g) * (w if w is not None else 1.0)
        return dx


BACKEND = _TorchBackend()
