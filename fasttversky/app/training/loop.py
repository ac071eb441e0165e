"""The training loop: seeded Adam + StepLR, mixed precision, accumulation, atomic resume.

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
import json
import math
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ...functional import tversky_loss
from ..config import LR_SCHEDULES, RUN_CHECKPOINTS, TrainConfig  # noqa: F401 - re-exported

__all__ = [
    "BEST_NAME",
    "CHECKPOINT_NAME",
    "NonFiniteLossError",
    "TrainConfig",
    "TrainResult",
    "load_checkpoint",
    "train",
]

CHECKPOINT_NAME = RUN_CHECKPOINTS["last"]
BEST_NAME = RUN_CHECKPOINTS["best"]  # the checkpoint of the best validation score so far
POLY_POWER = 0.9  # nnU-Net's poly learning-rate schedule: lr · (1 - step/steps)^0.9
_CHECKPOINT_VERSION = 1


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
            else "no checkpoint was written (set checkpoint_dir to keep one)"
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


# --------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------
class _BatchStream:
    """Micro-batches numbered 0, 1, 2, ... from a callable ``fn(i)`` or an iterable.

    An iterable is iterated again from the start when exhausted (epochs), and on resume
    it is re-iterated and the first ``consumed`` micro-batches are skipped, which is
    exact for deterministic iterables (the RNG states are restored afterwards).
    """

    def __init__(self, batches, consumed: int):
        self.index = consumed
        self._fn: Callable | None = None
        self._src: Iterable | None = None
        self._it: Iterator | None = None
        if callable(batches) and not hasattr(batches, "__iter__"):
            self._fn = batches
            return
        if not hasattr(batches, "__iter__"):
            raise TypeError("batches must be an iterable or a callable batch(i) -> (image, label)")
        self._src = batches
        self._it = iter(batches)
        for _ in range(consumed):
            self._next_from_iterable()

    def _next_from_iterable(self):
        try:
            return next(self._it)
        except StopIteration:
            if self._it is self._src:  # a one-shot iterator cannot be restarted
                raise RuntimeError(
                    "batches ran out; pass a re-iterable (list, Dataset) or a callable "
                    "batch(i) for more steps than the iterator yields"
                ) from None
            self._it = iter(self._src)
            try:
                return next(self._it)
            except StopIteration:
                raise RuntimeError("batches is empty") from None

    def next(self):
        batch = self._fn(self.index) if self._fn is not None else self._next_from_iterable()
        self.index += 1
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise TypeError("each batch must be a pair (image, label)")
        return batch


# --------------------------------------------------------------------------------------
# RNG and checkpoint state
# --------------------------------------------------------------------------------------
def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def _rng_state() -> dict:
    # numpy's state is converted to tensors/ints so the checkpoint loads with
    # torch.load(weights_only=True) (no arbitrary unpickling).
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_save(obj, path: Path) -> None:
    """Write to a temp file in the same directory, fsync, then os.replace.

    A crash at any point leaves either the old or the new file, never a torn one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _atomic_copy(src: Path, dst: Path) -> None:
    import shutil

    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _remove_stale_temps(path: Path) -> list[Path]:
    """Delete temp files a killed :func:`_atomic_save` / :func:`_atomic_copy` left beside
    ``path`` (kill -9 runs
    no cleanup). Called when a run starts, before this process writes any; two runs
    writing one checkpoint folder at once are not supported anyway."""
    removed = []
    # .last.pt.<random>.tmp from _atomic_save, .step_<N>.pt.<random>.tmp from _atomic_copy
    for tmp in path.parent.glob(".*.pt.*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
            removed.append(tmp)
    return removed


def _truncate_log(path: Path, step: int) -> None:
    """Keep only the log lines of steps <= ``step`` (the checkpoint's step on resume, 0
    for a fresh run), so that steps re-run after a resume are not logged twice. A torn
    last line (killed mid-write) is dropped too. Rewritten atomically."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            keep.append(line + "\n")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(keep))
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a checkpoint written by :func:`train` (a file, or a directory holding
    ``last.pt``). Keys: "model", "optimizer", "scheduler", "scaler", "rng", "step",
    "consumed", "config", "version", "best" (``{"step", "score"}`` of the best
    validation so far, or None). Loaded with ``weights_only=True``."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    return torch.load(path, map_location=map_location, weights_only=True)


# --------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------
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


def train(
    model: nn.Module,
    batches: Iterable | Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    config: TrainConfig,
    resume: str | os.PathLike | bool | None = None,
    validate: Callable[[nn.Module], dict] | None = None,
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
        config: a :class:`TrainConfig`.
        resume: None/False for a fresh run; a checkpoint file or directory; or True for
            ``config.checkpoint_dir``. Model, optimiser, scheduler, GradScaler, RNG
            states and the step are restored, so the run continues bitwise as if it
            had not stopped (same device, threads and library versions).
        validate: optional ``validate(model) -> {"score": float, ...}`` (higher is
            better; NaN never counts as best), called every ``config.val_every`` steps
            and after the last, on the unwrapped model in eval mode. Each result is
            appended to ``config.val_log_path`` (JSONL, with "step" and "best"), and
            when the score beats every earlier one (strictly: a tie keeps the earlier
            step) the checkpoint of that step is copied to ``best.pt`` beside
            ``last.pt``. The best step and score are part of the checkpoint, so a
            resumed run keeps them. RNG states are restored after each call, so
            validation does not change the training.

    Returns:
        :class:`TrainResult` with the per-step losses of this call.

    Raises:
        NonFiniteLossError: the loss (or the logits) became NaN/inf. The step is not
            applied and no checkpoint is written, so the last one stays good.
    """
    device = torch.device(config.device)
    model.to(device)
    model.train()
    dtype = _param_dtype(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    if config.lr_schedule == "poly":
        total = max(config.steps, 1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda k: max(0.0, 1.0 - k / total) ** POLY_POWER
        )
    else:
        scheduler = torch.optim.lr_scheduler.StepLR(
            optimizer, step_size=config.lr_decay_every, gamma=config.lr_decay
        )
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
    ckpt_path = Path(config.checkpoint_dir) / CHECKPOINT_NAME if config.checkpoint_dir else None

    step, consumed = 0, 0
    rng = None
    best: dict | None = None  # {"step", "score"} of the best validation so far
    if resume is True:
        if ckpt_path is None:
            raise ValueError("resume=True needs config.checkpoint_dir")
        resume = ckpt_path
    if resume:
        state = load_checkpoint(resume, map_location=device)
        _module(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        step, consumed, rng = state["step"], state["consumed"], state["rng"]
        best = state.get("best")
        if ckpt_path is None:
            ckpt_path = (
                Path(resume) if not Path(resume).is_dir() else Path(resume) / CHECKPOINT_NAME
            )
    else:
        _seed_everything(config.seed)
        if ckpt_path is not None and _is_main_rank():
            # A fresh run in a used folder: an earlier run's best.pt must not pass for
            # this run's (predict --weights best would load it without a word).
            with contextlib.suppress(FileNotFoundError):
                ckpt_path.with_name(BEST_NAME).unlink()

    stream = _BatchStream(batches, consumed)
    if rng is not None:
        # After the fast-forward, which may have drawn random numbers itself.
        _set_rng_state(rng)

    # Under torch.distributed every rank holds the same model and optimiser state, so
    # only rank 0 writes the checkpoint, the log and the progress bar.
    main = _is_main_rank()
    if not main:
        ckpt_path = None
    result = TrainResult(step=step, start_step=step, checkpoint=None)
    if ckpt_path is not None:
        _remove_stale_temps(ckpt_path)
    log = None
    if config.log_path and main:
        Path(config.log_path).parent.mkdir(parents=True, exist_ok=True)
        _truncate_log(Path(config.log_path), step)
        log = open(config.log_path, "a")  # noqa: SIM115
    if validate is not None and not main:
        # Rank 0 validates and writes best.pt; the others only train (and wait for it in
        # the next step's collectives: keep a validation well inside the process
        # group's timeout). Their TrainResult has no validations.
        validate = None
    if validate is not None and config.val_log_path:
        Path(config.val_log_path).parent.mkdir(parents=True, exist_ok=True)
        _truncate_log(Path(config.val_log_path), step)
    bar = None
    if config.progress and main:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, initial=step, unit="step", dynamic_ncols=True)
    voxels_total = 0
    t_start = time.perf_counter()

    def save(path=None):
        _atomic_save(
            {
                "version": _CHECKPOINT_VERSION,
                "model": _module(model).state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": _rng_state(),
                "step": step,
                "consumed": stream.index,
                "best": best,
                "config": {
                    k: (str(v) if isinstance(v, os.PathLike) else v)
                    for k, v in asdict(config).items()
                },
            },
            path or ckpt_path,
        )
        if path is None:
            result.checkpoint = ckpt_path

    try:
        while step < config.steps:
            t0 = time.perf_counter()
            loss_sum = 0.0
            voxels = 0
            for _ in range(config.grad_accum):
                image, label = stream.next()
                image = image.to(device=device, dtype=dtype, non_blocking=True)
                prepare = getattr(_module(model), "prepare_input", None)
                if prepare is not None:  # e.g. UNet3D's channels_last on the CPU
                    image = prepare(image)
                label = label.to(device=device, non_blocking=True)
                voxels += image.shape[0] * math.prod(image.shape[2:])
                try:
                    with _autocast(device, config.precision):
                        logits = model(image)
                    loss = tversky_loss(
                        logits,
                        label,
                        config.alpha,
                        config.beta,
                        gamma=config.gamma,
                        ce_weight=config.ce_weight,
                        backend=config.backend,
                        sync_across_ranks=config.sync_across_ranks,
                    )
                except ValueError as exc:
                    # The fused loss refuses non-finite logits with a ValueError.
                    if "non-finite" in str(exc):
                        raise NonFiniteLossError(
                            step + 1, None, result.checkpoint or _existing(ckpt_path), str(exc)
                        ) from exc
                    raise
                value = loss.item()
                if not math.isfinite(value):
                    raise NonFiniteLossError(
                        step + 1, value, result.checkpoint or _existing(ckpt_path)
                    )
                loss_sum += value
                scaler.scale(loss / config.grad_accum).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            step += 1
            mean_loss = loss_sum / config.grad_accum
            result.losses.append(mean_loss)
            dt = time.perf_counter() - t0
            voxels_total += voxels
            vps = voxels / dt if dt > 0 else float("inf")
            if log is not None and (step % config.log_every == 0 or step == config.steps):
                log.write(
                    json.dumps(
                        {
                            "step": step,
                            "loss": mean_loss,
                            "lr": lr,
                            "seconds": dt,
                            "voxels_per_s": vps,
                            "time": time.time(),
                        }
                    )
                    + "\n"
                )
                log.flush()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{mean_loss:.4f}", vox_s=f"{vps:.3g}")
            improved = False
            due = validate is not None and (step % config.val_every == 0 or step == config.steps)
            if due:
                # Before the checkpoint of this step, so that it records the new best.
                row = _run_validation(validate, model, step)
                improved = math.isfinite(row["score"]) and (
                    best is None or row["score"] > best["score"]
                )
                if improved:
                    best = {"step": step, "score": row["score"]}
                row["best"] = improved
                result.validations.append(row)
                if config.val_log_path:
                    with open(config.val_log_path, "a") as f:
                        f.write(json.dumps(row) + "\n")
            keep = config.keep_every is not None and step % config.keep_every == 0
            if ckpt_path is not None and (
                keep or due or step % config.checkpoint_every == 0 or step == config.steps
            ):
                if improved:
                    # best.pt before last.pt: a kill in between leaves last.pt at an
                    # earlier step, whose resume re-runs and re-scores this one (same
                    # score, bitwise) and writes best.pt again. The other order could
                    # leave a last.pt that names a best step best.pt does not hold.
                    save(ckpt_path.with_name(BEST_NAME))
                save()
                if keep:
                    _atomic_copy(ckpt_path, ckpt_path.with_name(f"step_{step:06d}.pt"))
    finally:
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
        result.step = step
        if best is not None:
            result.best_step, result.best_score = best["step"], best["score"]
        result.seconds = time.perf_counter() - t_start
        result.voxels_per_s = voxels_total / result.seconds if result.seconds > 0 else 0.0
    return result


def _run_validation(validate: Callable, model: nn.Module, step: int) -> dict:
    """One call of ``validate`` that leaves no trace on the training: the RNG states
    (inference may draw, e.g. dropout or a randomised window order) are restored and
    the model goes back to train mode. -> ``{"step", "score", ...}`` (numbers)."""
    rng = _rng_state()
    inner = _module(model)
    inner.eval()
    try:
        with torch.no_grad():
            out = validate(inner)
    finally:
        inner.train()
        _set_rng_state(rng)
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


def _existing(path: Path | None) -> Path | None:
    return path if path is not None and path.exists() else None


def _module(model: nn.Module) -> nn.Module:
    """The wrapped module of a DDP/DataParallel model (so checkpoints load anywhere)."""
    return getattr(model, "module", model)
