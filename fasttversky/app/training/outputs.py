"""The per-call plumbing of :func:`~fasttversky.app.training.train`: where it writes and
whether it shows progress. Kept apart from :class:`~fasttversky.app.config.TrainConfig`,
which holds the run's settings (what ``run.json`` records): the same settings can be
trained into any folder, a temporary one included."""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["TrainOutputs"]


@dataclass(frozen=True)
class TrainOutputs:
    """Where one call of :func:`~fasttversky.app.training.train` writes and whether it
    shows progress: plumbing of the call, not a setting of the run (``run.json`` holds
    the settings; the run folder is these paths).

    checkpoint_dir: where ``last.pt`` (and ``best.pt``, ``step_<N>.pt``) are written,
        atomically; None = no checkpoints.
    log_path: JSONL metrics file, one object per logged step ``{"step", "loss", "lr",
        "seconds", "voxels_per_s", "time"}``; None = none.
    val_log_path: JSONL file of the validation scores, one object per validation
        (``{"step", "score", "best", ...}``); None = none.
    progress: show a tqdm progress bar with loss and voxels/s.
    """

    checkpoint_dir: str | os.PathLike | None = None
    log_path: str | os.PathLike | None = None
    val_log_path: str | os.PathLike | None = None
    progress: bool = True
