"""The training loop: seeded Adam + StepLR, mixed precision, accumulation, atomic resume.

:func:`train` is a loop over three collaborators: a :class:`~.checkpoint.Checkpointer`
(the run's ``last.pt``/``best.pt``/``step_<N>.pt``, written atomically, and resume), a
:class:`~.steplog.StepLog` (metrics JSONL, validation JSONL, progress bar) and the
:class:`_TrainState` a checkpoint holds.

Resume is exact (bitwise) because a checkpoint holds everything the next step reads:
model and optimiser tensors, the scheduler, the GradScaler, every RNG the loop or a
data pipeline may draw from (torch CPU and CUDA, numpy, Python ``random``), the step
counter and the number of micro-batches already consumed.

Validation (optional, ``train(..., validate=fn)``) scores the model every
``config.val_every`` steps and keeps the best-scoring checkpoint as ``best.pt`` beside
``last.pt``. It is invisible to training: the RNG states are saved before and restored
after each call and the model is put back in train mode, so the weights of a run with
validation are bitwise those of the same run without it (tested).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ... import NonFiniteInputError, tversky_loss
from ..config import TrainConfig
from .batches import BatchStream
from .checkpoint import (
    BEST_NAME,
    CHECKPOINT_NAME,
    CHECKPOINT_VERSION,
    Checkpointer,
    load_checkpoint,
    rng_state,
    seed_everything,
    set_rng_state,
)
from .outputs import TrainOutputs
from .steplog import StepLog

__all__ = [
    "BEST_NAME",
    "CHECKPOINT_NAME",
    "NonFiniteLossError",
    "TrainConfig",
    "TrainOutputs",
    "TrainResult",
    "load_checkpoint",
    "train",
]

POLY_POWER = 0.9  # nnU-Net's poly learning-rate schedule: lr · (1 - step/steps)^0.9


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf. Raised before the optimiser step, so the parameters, the
    optimiser state and the last checkpoint on disk are those of the last good step.

    Attributes: ``step`` (1-based step that failed), ``loss`` (float, or None when the
    logits themselves were non-finite), ``checkpoint`` (path of the last good
    checkpoint, or None).
    """

    def __init__(self, step: int, loss: float | None, checkpoint: Path | None, detail: str = ""):
        self.step, self.loss, self.checkpoint = step, loss, checkpoint
        what = f"loss = {loss}" if loss is not None else detail
        where = (
            f"the last good checkpoint is {checkpoint} (step {step - 1} or earlier); "
            "resume from it with a lower lr or another precision"
            if checkpoint is not None
            else "no checkpoint was written (TrainOutputs.checkpoint_dir keeps one)"
        )
        super().__init__(f"non-finite loss at step {step} ({what}); training stopped, {where}")


@dataclass
class TrainResult:
    """What :func:`train` returns.

    losses: the loss of each optimiser step run by this call (mean over micro-batches),
        as Python floats, in order; ``start_step`` + len(losses) == ``step``.
    step: the optimiser step reached. start_step: where this call started (0 or the
    resumed step). checkpoint: path of the last checkpoint written, or None.
    seconds: wall time of this call's steps. voxels_per_s: input voxels (B·D·H·W) per
    second over this call.
    validations: with ``validate``, one dict per validation of this call: ``{"step",
        "score", "best", ...}`` (what ``validate`` returned, ``best`` = it set a new best).
    best_step, best_score: the best validation so far (over the whole run, a resumed
        one included); None without validation or before a finite score.
    """

    losses: list[float] = field(default_factory=list)
    step: int = 0
    start_step: int = 0
    checkpoint: Path | None = None
    seconds: float = 0.0
    voxels_per_s: float = 0.0
    validations: list[dict] = field(default_factory=list)
    best_step: int | None = None
    best_score: float | None = None

    def finish(self, step: int, best: dict | None, clock) -> None:
        """Fill in where the call ended (also when it raised)."""
        self.step = step
        if best is not None:
            self.best_step, self.best_score = best["step"], best["score"]
        self.seconds, self.voxels_per_s = clock.total()


class _TrainState:
    """Model, optimiser, scheduler, GradScaler, step and best validation of a run: what
    a checkpoint holds besides the RNG states and the micro-batches consumed."""

    def __init__(self, model: nn.Module, config: TrainConfig, device: torch.device):
        self.model, self.config = model, config
        self.optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
        if config.lr_schedule == "poly":
            total = max(config.steps, 1)
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(
                self.optimizer, lambda k: max(0.0, 1.0 - k / total) ** POLY_POWER
            )
        else:
            self.scheduler = torch.optim.lr_scheduler.StepLR(
                self.optimizer, step_size=config.lr_decay_every, gamma=config.lr_decay
            )
        self.scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
        self.dtype = _param_dtype(model)  # batches are cast to it (a .double() model: fp64)
        self.step, self.consumed = 0, 0
        self.best: dict | None = None  # {"step", "score"} of the best validation so far

    def restore(self, ckpt: dict) -> None:
        _module(self.model).load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.step, self.consumed, self.best = ckpt["step"], ckpt["consumed"], ckpt.get("best")

    def checkpoint(self, consumed: int) -> dict:
        return {
            "version": CHECKPOINT_VERSION,
            "model": _module(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "step": self.step,
            "consumed": consumed,
            "best": self.best,
            "config": asdict(self.config),
        }


def train(
    model: nn.Module,
    batches: Iterable | Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    config: TrainConfig,
    resume: str | os.PathLike | bool | None = None,
    validate: Callable[[nn.Module], dict] | None = None,
    outputs: TrainOutputs | None = None,
) -> TrainResult:
    """Train ``model`` with the fused Tversky loss until ``config.steps`` optimiser steps.

    Args:
        model: returns logits (B, C, D, H, W) for an image (B, Cin, D, H, W), e.g.
            ``fasttversky.app.models.UNet3D``. It is moved to ``config.device`` and put in
            train mode; a DistributedDataParallel wrapper works (set
            ``config.sync_across_ranks`` to compute the loss over the global batch).
        batches: micro-batches ``(image, label)``: image (B, Cin, D, H, W) float (cast
            to the model's parameter dtype, so a ``.double()`` model trains in
            float64), label (B, D, H, W) integer (uint8) class map. Either a callable
            ``batches(i)`` giving micro-batch ``i`` (0-based, counted over the whole
            run; best for exact resume) or an iterable (re-iterated per epoch, and
            fast-forwarded on resume).
        config: a :class:`TrainConfig` (the run's settings).
        resume: None/False for a fresh run; a checkpoint file or directory; or True for
            ``outputs.checkpoint_dir``. Model, optimiser, scheduler, GradScaler, RNG
            states and the step are restored, so the run continues bitwise as if it
            had not stopped (same device, threads and library versions).
        validate: optional ``validate(model) -> {"score": float, ...}`` (higher is
            better; NaN never counts as best), called every ``config.val_every`` steps
            and after the last, on the unwrapped model in eval mode, each result logged
            in ``outputs.val_log_path``. A score beating every earlier one (a tie keeps
            the earlier step) saves that step's checkpoint as ``best.pt`` too; a resumed
            run keeps its best. RNG states are restored after each call, so validation
            does not change the training.
        outputs: a :class:`TrainOutputs` (checkpoint folder, logs, progress bar);
            default: no files, a progress bar.

    Returns:
        :class:`TrainResult` with the per-step losses of this call.

    Raises:
        NonFiniteLossError: the loss (or the logits) became NaN/inf. The step is not
            applied and no checkpoint is written, so the last one stays good.
        CheckpointError: the checkpoint to resume from is truncated or corrupt.
        fasttversky.InvalidInputError: bad labels; with ``sync_across_ranks``, also on
            the ranks whose own input is fine when another rank's is bad.
    """
    outputs = outputs or TrainOutputs()
    device = torch.device(config.device)
    state, stream, checkpoints = _start(model, batches, config, resume, outputs, device)
    # Under torch.distributed every rank holds the same model and optimiser state, so
    # only rank 0 writes the checkpoints and logs and validates (the others wait for it
    # in the next step's collectives: keep a validation well inside the process
    # group's timeout; their TrainResult has no validations).
    main = _is_main_rank()
    checkpoints.start(fresh=not resume, main=main)
    validate = validate if main else None
    log = StepLog(outputs, config, state.step, enabled=main, validating=validate is not None)
    result = TrainResult(step=state.step, start_step=state.step)
    clock = _Clock()
    try:
        while state.step < config.steps:
            clock.tick()
            loss, lr, voxels = _train_step(state, stream, device, checkpoints.last_good)
            result.losses.append(loss)
            log.step(state.step, loss, lr, *clock.lap(voxels))
            due = validate is not None and _every(config.val_every, state.step, config.steps)
            improved = due and _validate(validate, state, result, log)
            keep = config.keep_every is not None and state.step % config.keep_every == 0
            save = keep or due or _every(config.checkpoint_every, state.step, config.steps)
            if checkpoints.enabled and save:
                checkpoints.save(
                    state.checkpoint(stream.index), state.step, best=improved, keep=keep
                )
                result.checkpoint = checkpoints.written
    finally:
        log.close()
        result.finish(state.step, state.best, clock)
    return result


def _start(model, batches, config: TrainConfig, resume, outputs: TrainOutputs, device):
    """Model on its device in train mode, and the state to start from: the checkpoint's
    (every RNG restored after the batch stream's fast-forward, which may draw itself)
    or a fresh one seeded by ``config.seed`` -> (state, batch stream, checkpointer)."""
    model.to(device)
    model.train()
    state = _TrainState(model, config, device)
    checkpoints = Checkpointer(outputs.checkpoint_dir)
    ckpt = checkpoints.load(resume)
    if ckpt is None:
        seed_everything(config.seed)
    else:
        state.restore(ckpt)
    stream = BatchStream(batches, state.consumed)
    if ckpt is not None:
        set_rng_state(ckpt["rng"])
    return state, stream, checkpoints


def _every(n: int, step: int, steps: int) -> bool:
    """Whether something done every ``n`` steps and after the last is due at ``step``."""
    return step % n == 0 or step == steps


class _Clock:
    """Wall time and voxel throughput of one train() call and of each of its steps."""

    def __init__(self):
        self.start = self.step_start = time.perf_counter()
        self.voxels = 0

    def tick(self) -> None:
        """A step starts."""
        self.step_start = time.perf_counter()

    def lap(self, voxels: int) -> tuple[float, float]:
        """The step ended, having read ``voxels`` input voxels -> (seconds, voxels/s)."""
        dt = time.perf_counter() - self.step_start
        self.voxels += voxels
        return dt, voxels / dt if dt > 0 else float("inf")

    def total(self) -> tuple[float, float]:
        """(seconds since the start, voxels/s over them)."""
        seconds = time.perf_counter() - self.start
        return seconds, self.voxels / seconds if seconds > 0 else 0.0


def _train_step(state: _TrainState, stream: BatchStream, device, last_good) -> tuple:
    """One optimiser step over ``grad_accum`` micro-batches -> (mean loss, the lr it
    used, input voxels). ``last_good()`` names the checkpoint a NonFiniteLossError
    points to; the failing step is not applied."""
    config, model, dtype = state.config, state.model, state.dtype
    loss_sum, voxels = 0.0, 0
    for _ in range(config.grad_accum):
        image, label = stream.next()
        image = image.to(device=device, dtype=dtype, non_blocking=True)
        prepare = getattr(_module(model), "prepare_input", None)
        if prepare is not None:  # e.g. UNet3D's channels_last on the CPU
            image = prepare(image)
        label = label.to(device=device, non_blocking=True)
        voxels += image.shape[0] * math.prod(image.shape[2:])
        loss = _loss(model, image, label, config, device, state.step + 1, last_good)
        value = loss.item()
        if not math.isfinite(value):
            raise NonFiniteLossError(state.step + 1, value, last_good())
        loss_sum += value
        state.scaler.scale(loss / config.grad_accum).backward()
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.optimizer.zero_grad(set_to_none=True)
    lr = state.optimizer.param_groups[0]["lr"]
    state.scheduler.step()
    state.step += 1
    return loss_sum / config.grad_accum, lr, voxels


def _loss(model, image, label, config: TrainConfig, device, step: int, last_good):
    """The fused Tversky (+ CE) loss of one micro-batch; NonFiniteLossError when the
    logits are not finite (the loss refuses them)."""
    try:
        with _autocast(device, config.precision):
            logits = model(image)
        return tversky_loss(
            logits,
            label,
            config.alpha,
            config.beta,
            gamma=config.gamma,
            ce_weight=config.ce_weight,
            backend=config.backend,
            sync_across_ranks=config.sync_across_ranks,
        )
    except NonFiniteInputError as exc:
        raise NonFiniteLossError(step, None, last_good(), str(exc)) from exc


def _validate(validate: Callable, state: _TrainState, result: TrainResult, log: StepLog) -> bool:
    """Score the model at this step (before its checkpoint, so that it records a new
    best) -> whether the score is a new best."""
    row = _run_validation(validate, state.model, state.step)
    improved = math.isfinite(row["score"]) and (
        state.best is None or row["score"] > state.best["score"]
    )
    if improved:
        state.best = {"step": state.step, "score": row["score"]}
    row["best"] = improved
    result.validations.append(row)
    log.validation(row)
    return improved


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _param_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _run_validation(validate: Callable, model: nn.Module, step: int) -> dict:
    """One call of ``validate`` that leaves no trace on the training: the RNG states
    (inference may draw, e.g. dropout or a randomised window order) are restored and
    the model goes back to train mode. -> ``{"step", "score", ...}`` (numbers)."""
    rng = rng_state()
    inner = _module(model)
    inner.eval()
    try:
        with torch.no_grad():
            out = validate(inner)
    finally:
        inner.train()
        set_rng_state(rng)
    if not isinstance(out, dict) or "score" not in out:
        raise TypeError("validate(model) must return a dict with a 'score' entry")
    bad = [k for k, v in out.items() if not isinstance(v, (int, float)) or isinstance(v, bool)]
    if bad:
        raise TypeError(f"validate(model) must return numbers; {bad} are not")
    # Counts stay ints; the step is the loop's, whatever validate returned.
    return {**out, "score": float(out["score"]), "step": step}


def _is_main_rank() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _module(model: nn.Module) -> nn.Module:
    """The wrapped module of a DDP/DataParallel model (so checkpoints load anywhere)."""
    return getattr(model, "module", model)
