"""The training loop written plainly: the oracle for ``fasttversky.app.training.train``.

Adam, the learning rate set by hand from the paper's step schedule
(lr · decay ** (step // decay_every)), the reference loss, no autocast, no
checkpointing, no accumulation tricks beyond summing ``loss / grad_accum``.
Never imported by the package.
"""

from __future__ import annotations

import torch

from .tversky import reference_tversky_loss


def reference_train(
    model: torch.nn.Module,
    batch,
    *,
    steps: int,
    lr: float = 1e-4,
    lr_decay: float = 0.9,
    lr_decay_every: int = 1000,
    alpha: float = 0.3,
    beta: float = 0.7,
    gamma: float = 1.0,
    ce_weight: float = 0.0,
    grad_accum: int = 1,
) -> list[float]:
    """Train ``model`` for ``steps`` Adam steps; return the loss of each step.

    ``batch(i)`` gives micro-batch i = step * grad_accum + k as (image (B, Cin, D, H, W)
    float, label (B, D, H, W) integer); the image is cast to the model's dtype. The
    step loss is the mean of the micro-batch losses.
    """
    dtype = next(model.parameters()).dtype
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    losses = []
    i = 0
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * lr_decay ** (step // lr_decay_every)
        optimizer.zero_grad()
        total = 0.0
        for _ in range(grad_accum):
            image, label = batch(i)
            i += 1
            logits = model(image.to(dtype))
            loss = reference_tversky_loss(
                logits, label, alpha, beta, gamma=gamma, ce_weight=ce_weight
            )
            (loss / grad_accum).backward()
            total += loss.item()
        optimizer.step()
        losses.append(total / grad_accum)
    return losses
