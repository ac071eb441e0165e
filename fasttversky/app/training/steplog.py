"""What a training run reports while it runs: the step log (JSONL, one line per step),
the validation log (JSONL, one line per validation) and the progress bar.

Both logs are cut back to the starting step when a run starts (0 for a fresh run, the
checkpoint's step on resume), so steps re-run after a resume are not logged twice.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .outputs import TrainOutputs

__all__ = ["StepLog"]


def truncate_log(path: Path, step: int) -> None:
    """Keep only the log lines of steps <= ``step``. A torn last line (killed
    mid-write) is dropped too. Rewritten atomically."""
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


class StepLog:
    """The reports of one train() call from ``start_step`` on, for a ``TrainConfig``
    (its ``steps`` and ``log_every``). ``enabled=False`` (ranks other than 0) reports
    nothing. ``validating``: whether validations will be logged."""

    def __init__(
        self, outputs: TrainOutputs, config, start_step: int, *, enabled: bool, validating: bool
    ):
        self.total, self.every = config.steps, config.log_every
        self.file = None
        self.val_path = None
        self.bar = None
        if not enabled:
            return
        if outputs.log_path:
            path = Path(outputs.log_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            truncate_log(path, start_step)
            self.file = open(path, "a")  # noqa: SIM115 - closed by close()
        if validating and outputs.val_log_path:
            self.val_path = Path(outputs.val_log_path)
            self.val_path.parent.mkdir(parents=True, exist_ok=True)
            truncate_log(self.val_path, start_step)
        if outputs.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, initial=start_step, unit="step", dynamic_ncols=True)

    def step(self, step: int, loss: float, lr: float, seconds: float, voxels_per_s: float):
        """One optimiser step done: a log line every ``log_every`` steps and after the last."""
        if self.file is not None and (step % self.every == 0 or step == self.total):
            row = {
                "step": step,
                "loss": loss,
                "lr": lr,
                "seconds": seconds,
                "voxels_per_s": voxels_per_s,
                "time": time.time(),
            }
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", vox_s=f"{voxels_per_s:.3g}")

    def validation(self, row: dict) -> None:
        if self.val_path is not None:
            with open(self.val_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()
