"""Vectorised PyTorch backend: runs anywhere torch runs, for what no kernel covers.

It materialises p and the one-hot target for a (B, C, N) chunk, so it needs a few
times the logits' memory; the fused backends do not. Same contract as every backend
(``fasttversky/_spec.py``).
"""

from __future__ import annotations

import torch

from .._spec import KernelSpec


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


class _TorchBackend:
    name = "torch"

    def unavailable(self):
        return None

    def reasons(self, logits, target, spec):
        return []

    def forward_stats(self, logits, target, spec: KernelSpec):
        B, C, N = logits.shape
        cdtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        x = logits.to(cdtype)
        n_nonfinite = (~torch.isfinite(x)).sum()
        p = _probs(x, spec.activation)
        g, w, n_bad = _onehot_and_mask(target, spec, C, cdtype)
        if w is not None:
            p = p * w
        stats = torch.stack(
            [
                (p * g).sum(-1, dtype=torch.float64),
                p.sum(-1, dtype=torch.float64),
                g.sum(-1, dtype=torch.float64),
            ],
            dim=-1,
        )
        flags = torch.stack([n_nonfinite, n_bad]).to(torch.int64)
        return stats, flags

    def backward(self, logits, target, coef_a, coef_b, spec: KernelSpec):
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
        grad = torch.empty_like(logits)
        grad.copy_(dx)
        return grad


BACKEND = _TorchBackend()
