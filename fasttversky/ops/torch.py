"""Vectorised PyTorch backend: runs anywhere torch runs, for what no kernel covers.

It materialises p and the one-hot target, one block of voxels at a time (a few MiB),
so its extra memory is the gradient and a few blocks, whatever the number of classes;
it reads the volume more often than the fused backends do. Same contract as every backend
(``fasttversky/_spec.py``), every feature of it; the per-voxel CE-family terms are
written once (:func:`_ce_terms`) and their gradients by hand (:func:`_ce_grad`), since
the backward must not keep a graph.
"""

from __future__ import annotations

import functools

import torch

from .._spec import CE_FOCAL, KernelSpec
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


@functools.lru_cache(maxsize=16)
def _region_table(masks: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The region bitmasks as an int64 tensor on ``device``, built once per table."""
    return torch.tensor(masks, dtype=torch.int64, device=device)


def _labels(target, spec: KernelSpec):
    """(labels (B, N) int64, keep (B, N) bool, n_bad): a label map read as integers, -1
    where a float label is NaN, inf, fractional or out of range (bad, like an integer
    label out of range); keep is False on ignored voxels."""
    if spec.float_labels:
        t = target
        valid = (t == torch.trunc(t)) & (t >= 0) & (t < spec.num_labels)  # NaN: False
        labels = torch.where(valid, t, torch.full_like(t, -1)).long()
    else:
        t = labels = target.long()
        valid = (labels >= 0) & (labels < spec.num_labels)
    keep = torch.ones_like(labels, dtype=torch.bool)
    if spec.ignore_index is not None:  # compared before reading: NaN is never ignored
        keep = t != spec.ignore_index
    return labels, keep, (keep & ~valid).sum()


def _label_onehot(labels, spec: KernelSpec, C: int) -> torch.Tensor:
    """g (B, C, N) bool of a label map (regions, binary C = 1, or one class per label)."""
    if spec.region_masks is not None:
        table = _region_table(spec.region_masks, labels.device)
        inside = (labels >= 0) & (labels < len(spec.region_masks))
        bits = table[labels.clamp(0, len(spec.region_masks) - 1)] * inside
        shifts = torch.arange(C, device=labels.device).view(1, C, 1)
        return ((bits.unsqueeze(1) >> shifts) & 1).bool()
    if spec.binary_labels:
        return (labels == 1).unsqueeze(1)
    classes = torch.arange(C, device=labels.device).view(1, C, 1)
    return labels.unsqueeze(1) == classes


def _onehot_and_mask(target, spec: KernelSpec, C: int, dtype):
    """(g (B, C, N), w (B, 1, N) or None, n_bad) from the target; g is 0 where w is."""
    if spec.soft_target:
        g = target.to(dtype)
        bad = ((g < 0) | (g > 1) | ~torch.isfinite(g)).sum()
        return g, None, bad
    labels, keep, bad = _labels(target, spec)
    w = keep.unsqueeze(1).to(dtype)
    return _label_onehot(labels, spec, C).to(dtype) * w, w, bad


def _ce_target(g, w, spec: KernelSpec):
    """q = (1 − ε) g + ε / C (softmax label smoothing), 0 where w = 0; g itself otherwise."""
    eps = spec.label_smoothing
    if not eps:
        return g
    q = (1.0 - eps) * g + eps / spec.num_classes
    return q * w if w is not None else q


def _one_minus_pow(p, gamma: float):
    """(1 − p)^γ with 0^0 = 1, and a finite autograd gradient where p = 1 (the torch.func
    and create_graph paths differentiate it): d/dp is taken as 0 there."""
    d = 1.0 - p
    pos = d > 0
    at_one = 1.0 if gamma == 0 else 0.0
    return torch.where(pos, torch.where(pos, d, torch.ones_like(d)) ** gamma, at_one)


def _ce_terms(x, p, q, w, spec: KernelSpec) -> list[torch.Tensor]:
    """The per-voxel CE-family terms (B, C, N) of the stats columns 3 (and 4), see
    _spec.py; q is the masked CE target, w the voxel mask (None: every voxel counts)."""
    if spec.activation == 0:
        # a select, not q * -log p: log p is -inf for a class far below the others, and
        # a term with q = 0 adds exactly 0 (log p from log_softmax, never log(p))
        nll = -torch.log_softmax(x, dim=1)
        if spec.ce == CE_FOCAL:
            nll = _one_minus_pow(p, spec.focal_gamma) * nll
        elif not spec.soft_target and not spec.label_smoothing:
            return [torch.where(q != 0, nll, 0.0)]  # q is the 0/1 one-hot: no product
        return [torch.where(q != 0, q * nll, 0.0)]
    # max(x, 0) - x q + log1p(exp(-|x|)): finite for any finite x
    bce = torch.nn.functional.binary_cross_entropy_with_logits(x, q, reduction="none")
    if w is not None:
        bce = bce * w
    if spec.ce != CE_FOCAL:
        return [bce]
    # MONAI's sigmoid focal modulation exp(γ logsigmoid(−x s)), s = 2q − 1
    h = torch.exp(spec.focal_gamma * torch.nn.functional.logsigmoid(-x * (2 * q - 1))) * bce
    return [h, q * h]


def _ce_grad(x, p, q, w, e, e2, spec: KernelSpec) -> torch.Tensor:
    """dL/dx of the CE family, given e = dL/dcol3 (e2 = dL/dcol4) (B, C, 1); see _spec.py."""
    gamma = spec.focal_gamma
    if spec.activation == 0:
        if spec.ce != CE_FOCAL:
            a = -e * q
        else:
            d = 1.0 - p
            logp = torch.log_softmax(x, dim=1)
            # γ p (1 − p)^(γ−1) log p, taken as 0 where p = 1 (or p = 0, log p = −inf)
            inner = (d > 0) & (p > 0)
            focal = torch.where(inner, gamma * p * d ** (gamma - 1) * logp, 0.0) if gamma else 0
            a = e * q * (focal - _one_minus_pow(p, gamma))
            a = torch.where(q != 0, a, 0.0)
        return a - p * a.sum(1, keepdim=True)
    dx = p - q
    if spec.ce == CE_FOCAL:
        s = 2 * q - 1
        bce = torch.nn.functional.binary_cross_entropy_with_logits(x, q, reduction="none")
        m = torch.exp(gamma * torch.nn.functional.logsigmoid(-x * s))
        dx = (e + e2 * q) * m * (dx - gamma * s * torch.sigmoid(x * s) * bce)
    else:
        dx = e * dx
    return dx * w if w is not None else dx


def _ce_overflowed(logits: torch.Tensor, stats: torch.Tensor, flags: torch.Tensor) -> bool:
    """A voxel's CE in float32 overflows where logits near +-3e38 put two classes up to
    2 x FLT_MAX apart, although the loss (a mean) fits: the CE sums are then taken again
    from float64 logits. One check per call (one host sync on CUDA), after every block;
    skipped under a torch.func transform, since vmap cannot branch on a tensor's values."""
    if logits.dtype == torch.float64 or in_functorch_transform():
        return False
    return bool((~torch.isfinite(stats[..., 3:]).all()) & (flags[0] == 0))


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
    features = frozenset({"ce", "soft_ce", "label_smoothing", "focal", "float_labels", "regions"})

    def forward_stats(self, logits, target, spec: KernelSpec):
        B, C, N = logits.shape
        stats = flags = None
        for block in _voxel_blocks(B, C, N):  # summed in a fixed order: deterministic
            t = target[..., block]
            s, f = self._block_stats(logits[..., block], t, spec)
            stats, flags = (s, f) if stats is None else (stats + s, flags + f)
        if spec.with_ce and _ce_overflowed(logits, stats, flags):
            stats = torch.cat([stats[..., :3], self._ce64(logits, target, spec)], -1)
        return stats, flags

    def _ce64(self, logits, target, spec: KernelSpec) -> torch.Tensor:
        """The CE columns (B, C, ce_columns) from float64 logits, block by block, in the
        same order."""
        B, C, N = logits.shape
        total = None
        for block in _voxel_blocks(B, C, N):
            x = logits[..., block].double()
            g, w, _ = _onehot_and_mask(target[..., block], spec, C, torch.float64)
            q = _ce_target(g, w, spec)
            terms = _ce_terms(x, _probs(x, spec.activation), q, w, spec)
            s = torch.stack([_sum_n(t) for t in terms], dim=-1)
            total = s if total is None else total + s
        return total

    def _block_stats(self, logits, target, spec: KernelSpec):
        B, C, N = logits.shape
        cdtype = compute_dtype(logits.dtype)
        x = logits.to(cdtype)
        n_nonfinite = (~torch.isfinite(x)).sum()
        p = _probs(x, spec.activation)
        g, w, n_bad = _onehot_and_mask(target, spec, C, cdtype)
        pw = p * w if w is not None else p
        sums = [_sum_n(pw * g), _sum_n(pw), _sum_n(g)]
        if spec.with_ce:
            q = _ce_target(g, w, spec)
            sums += [_sum_n(t) for t in _ce_terms(x, p, q, w, spec)]
        stats = torch.stack(sums, dim=-1)
        flags = torch.stack([n_nonfinite, n_bad]).to(torch.int64)
        return stats, flags

    def backward(
        self, logits, target, coef_a, coef_b, spec: KernelSpec, coef_ce=None, coef_ce2=None
    ):
        B, C, N = logits.shape
        grad = new_grad(logits)
        for block in _voxel_blocks(B, C, N):
            grad[..., block] = self._block_grad(
                logits[..., block], target[..., block], (coef_a, coef_b, coef_ce, coef_ce2), spec
            )
        return grad

    def _block_grad(self, logits, target, coefs, spec: KernelSpec):
        coef_a, coef_b, coef_ce, coef_ce2 = coefs
        B, C, N = logits.shape
        cdtype = coef_a.dtype
        x = logits.to(cdtype)
        p = _probs(x, spec.activation)
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
            e2 = coef_ce2.unsqueeze(-1) if coef_ce2 is not None else None
            q = _ce_target(g, w, spec)
            dx = dx + _ce_grad(x, p, q, w, coef_ce.unsqueeze(-1), e2, spec)
        return dx


BACKEND = _TorchBackend()
