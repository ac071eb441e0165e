"""Checkpoints of a training run: what they hold, how they are written and read.

A checkpoint holds everything the next step reads (model and optimiser tensors, the
scheduler, the GradScaler, every RNG state, the step and the micro-batches consumed), so
a resumed run continues bitwise. Files are written atomically (temp file in the same
folder, fsync, ``os.replace``): a kill at any point leaves the old file or the new one,
never a torn one. :class:`Checkpointer` owns the files of one run folder — ``last.pt``,
``best.pt`` (best validation score) and the ``step_<N>.pt`` copies — and the order in
which they are written.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch

from ..config import RUN_CHECKPOINTS
from ..errors import DataError

__all__ = [
    "BEST_NAME",
    "CHECKPOINT_NAME",
    "CheckpointError",
    "Checkpointer",
    "load_checkpoint",
]

CHECKPOINT_NAME = RUN_CHECKPOINTS["last"]
BEST_NAME = RUN_CHECKPOINTS["best"]  # the checkpoint of the best validation score so far
CHECKPOINT_VERSION = 1
# Keys of a checkpoint written by train(); resuming reads them all.
TRAINING_KEYS = ("model", "optimizer", "scheduler", "scaler", "rng", "step", "consumed")
# What a person can do about a checkpoint that cannot be read.
RESUME_ADVICE = "delete it to train afresh, or resume from another run's checkpoint"


class CheckpointError(DataError):
    """A checkpoint file that cannot be used (truncated, corrupt, or not a checkpoint of
    this application). The message is one line naming the file and what to do; the
    cause is never torch's own text (it suggests unpickling untrusted files)."""

    def __init__(self, path: str | os.PathLike, problem: str, advice: str = RESUME_ADVICE):
        self.path = Path(path)
        super().__init__(f"{self.path}: {problem}; {advice}")


def load_checkpoint(
    path: str | os.PathLike, map_location="cpu", advice: str = RESUME_ADVICE
) -> dict:
    """Load a checkpoint written by :func:`~fasttversky.app.training.train` (a file, or
    a directory holding ``last.pt``). Keys: "model", "optimizer", "scheduler", "scaler",
    "rng", "step", "consumed", "config", "version", "best" (``{"step", "score"}`` of
    the best validation so far, or None). Loaded with ``weights_only=True`` (no
    arbitrary unpickling).

    Raises:
        CheckpointError: the file is truncated, corrupt or holds no checkpoint; the
            one-line message names it and ends with ``advice``.
        FileNotFoundError: no such file.
    """
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except PermissionError:
        raise
    except Exception:
        # A cut or damaged file fails in many ways (RuntimeError from the zip reader,
        # EOFError, OSError, UnpicklingError, KeyError...): each means the same to a
        # person, and torch's text would advise unpickling it unsafely.
        problem = "cannot be read as a checkpoint (truncated or corrupt)"
        raise CheckpointError(path, problem, advice) from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(path, "is not a checkpoint of fasttversky train", advice)
    return state


def check_resumable(state: dict, path: Path) -> None:
    """CheckpointError when ``state`` lacks what resuming reads (a weights-only file)."""
    missing = [k for k in TRAINING_KEYS if k not in state]
    if missing:
        raise CheckpointError(
            path, f"holds no training state ({', '.join(missing)} missing) to resume from"
        )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_state() -> dict:
    """Every RNG a loop or a data pipeline may draw from. numpy's state is converted to
    tensors/ints so the checkpoint loads with ``weights_only=True``."""
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


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def _interrupt_deferred():
    """Hold Ctrl-C back until the block is done, then raise it. torch.save's zip writer,
    interrupted inside a write, replaces the KeyboardInterrupt with a RuntimeError
    ("unexpected pos"): the command would fail with that instead of stopping as asked.
    Only the main thread receives signals, and a handler other than Python's default
    (ignored, or someone else's) is left to do what it does."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    received = []
    signal.signal(signal.SIGINT, lambda *_: received.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if received:
        raise KeyboardInterrupt


def atomic_save(obj, path: Path) -> None:
    """Write to a temp file in the same directory, fsync, then os.replace. An interrupt
    meanwhile is raised once the new file is in place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with _interrupt_deferred():
            with os.fdopen(fd, "wb") as f:
                torch.save(obj, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_copy(src: Path, dst: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class Checkpointer:
    """The checkpoint files of one run: ``last.pt`` (or the file resumed from when no
    folder is given), ``best.pt`` and ``step_<N>.pt`` beside it. ``folder=None`` and no
    resume = no checkpoints."""

    def __init__(self, folder: str | os.PathLike | None):
        self.last: Path | None = Path(folder) / CHECKPOINT_NAME if folder else None
        self.written: Path | None = None  # last.pt once this call has written it

    def load(self, resume: str | os.PathLike | bool | None) -> dict | None:
        """The checkpoint to resume from (None for a fresh run): ``resume`` True = this
        folder's ``last.pt``; a file or folder otherwise. Without a folder of its own
        the run then writes where it resumed from.

        Loaded on the CPU whatever the training device: the RNG states must be CPU
        byte tensors (``torch.set_rng_state`` and ``torch.cuda.set_rng_state_all``
        refuse others), and ``load_state_dict`` moves model and optimiser tensors to
        their parameters' device itself."""
        if resume is True:
            if self.last is None:
                raise ValueError("resume=True needs a checkpoint folder (outputs.checkpoint_dir)")
            resume = self.last
        if not resume:
            return None
        state = load_checkpoint(resume, map_location="cpu")
        file = Path(resume) / CHECKPOINT_NAME if Path(resume).is_dir() else Path(resume)
        check_resumable(state, file)
        if self.last is None:
            self.last = file
        return state

    def start(self, fresh: bool, main: bool) -> None:
        """Before the first step. Only rank 0 writes (every rank holds the same state).
        A fresh run in a used folder drops that folder's ``best.pt`` (``predict --weights
        best`` would load an earlier run's without a word); temp files a killed writer
        left (kill -9 runs no cleanup) are removed."""
        if not main:
            self.last = None
            return
        if self.last is None:
            return
        if fresh:
            with contextlib.suppress(FileNotFoundError):
                self.last.with_name(BEST_NAME).unlink()
        # .last.pt.<random>.tmp from atomic_save, .step_<N>.pt.<random>.tmp from atomic_copy
        for tmp in self.last.parent.glob(".*.pt.*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    @property
    def enabled(self) -> bool:
        """Whether this call writes checkpoints (a folder, or a file resumed, on rank 0)."""
        return self.last is not None

    def last_good(self) -> Path | None:
        """The newest intact checkpoint of this run on disk, or None."""
        if self.written is not None:
            return self.written
        return self.last if self.last is not None and self.last.exists() else None

    def save(self, state: dict, step: int, *, best: bool, keep: bool) -> None:
        """Write ``state`` as ``last.pt``; first as ``best.pt`` when it is the new best,
        then copied to ``step_<step>.pt`` when ``keep``.

        best.pt before last.pt: a kill in between leaves last.pt at an earlier step,
        whose resume re-runs and re-scores this one (same score, bitwise) and writes
        best.pt again. The other order could leave a last.pt that names a best step
        best.pt does not hold."""
        if self.last is None:
            return
        if best:
            atomic_save(state, self.last.with_name(BEST_NAME))
        atomic_save(state, self.last)
        self.written = self.last
        if keep:
            atomic_copy(self.last, self.last.with_name(f"step_{step:06d}.pt"))
