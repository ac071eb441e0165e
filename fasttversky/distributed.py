"""Cross-rank Tversky statistics for DistributedDataParallel training.

The Tversky index is a ratio of sums, so the loss of a batch split over ranks is not
the mean of the per-rank losses. ``gather_stats`` all-gathers the per-sample
statistics ``stats`` (B_r, C, S) of every rank — [sum_pg, sum_p, sum_g], plus the
cross-entropy's sum (and, for sigmoid, its voxel count) when ``ce_weight > 0`` — and
concatenates them along the batch, in rank order; every rank then evaluates the
loss of the global batch (B = Σ_r B_r), the same number on every rank, equal to the
single-process loss on the concatenated batch (``batch=True`` pools over all of it;
the CE is the mean over the global batch's voxels). nnU-Net's DDP trainer instead
averages each rank's own loss (its CE a per-rank mean), which differs from this when
ranks hold different numbers of labelled voxels.

Gradient scaling. Let L(s_0, …, s_{W-1}) be the global loss and s_r rank r's stats.
Single-process training computes dL/dθ = Σ_r ∂L/∂s_r · ∂s_r/∂θ. Each rank runs
backward through its own copy of L, so the gradient arriving at the gathered tensor
is ∂L/∂s_q for *every* q, on every rank. The backward here all-reduces (sums) that
gradient over ranks and keeps rank r's slice: W · ∂L/∂s_r. Rank r's parameter
gradient is then W · ∂L/∂s_r · ∂s_r/∂θ, and DDP's average over the W ranks gives
Σ_r ∂L/∂s_r · ∂s_r/∂θ — exactly the single-process gradient. (Without the sum, the
average would be 1/W too small.) If you reduce gradients yourself with a SUM instead
of DDP's mean, divide the loss by the world size.

The sum in backward is a SUM all-reduce of a (B, C, S) float64 tensor per step:
negligible next to DDP's gradient all-reduce. Ranks may hold different batch sizes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["gather_stats", "is_distributed"]


def is_distributed() -> bool:
    """True when torch.distributed is available and a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def _all_gather_varsize(x: torch.Tensor, group) -> tuple[torch.Tensor, list[int]]:
    """Concatenate x (B_r, ...) of every rank along dim 0 -> (Σ B_r, ...), and the B_r."""
    world = dist.get_world_size(group)
    n = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
    sizes = [torch.empty_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    sizes = [int(s.item()) for s in sizes]
    biggest = max(sizes)
    # all_gather needs equal shapes: pad to the largest batch, strip after.
    padded = x.new_zeros((biggest, *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)], dim=0), sizes


class _GatherStats(torch.autograd.Function):
    """stats (B_r, C, 3) -> (Σ_r B_r, C, 3); backward = SUM all-reduce + own slice."""

    @staticmethod
    def forward(ctx, stats: torch.Tensor, group) -> torch.Tensor:
        gathered, sizes = _all_gather_varsize(stats.detach(), group)
        rank = dist.get_rank(group)
        ctx.group = group
        ctx.start = sum(sizes[:rank])
        ctx.stop = ctx.start + sizes[rank]
        return gathered

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.start : ctx.stop], None


def gather_stats(stats: torch.Tensor, group=None) -> torch.Tensor:
    """All-gather per-sample Tversky statistics over ranks, with autograd.

    Args:
        stats: (B_r, C, 3) float64 on this rank: [sum_pg, sum_p, sum_g] per sample and
            class (as produced inside ``fasttversky.tversky_loss``).
        group: process group (default: the world).

    Returns:
        (Σ_r B_r, C, 3) float64, rank 0's samples first. Its backward makes DDP's
        averaged gradients equal the single-process gradients (see the module
        docstring). Without an initialised process group (or with one rank) ``stats``
        is returned unchanged.
    """
    if not is_distributed() or dist.get_world_size(group) == 1:
        return stats
    return _GatherStats.apply(stats, group)
