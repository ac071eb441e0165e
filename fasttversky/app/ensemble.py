"""Several trained runs as one model: ``fasttversky predict --model RUN [RUN ...]``.

An ensemble's probability is the mean of its runs' foreground probabilities, each run
predicting exactly as it does alone (its own windows, mirroring, normalisation and crop,
as recorded in its ``run.json``) on the file's grid; the mean is then thresholded and
small components removed as for one run. nnU-Net ensembles its folds the same way
(mean of probabilities, then the argmax/threshold). One run is the single-run path
unchanged: its probability is used as it comes, bit for bit.

Runs are combined only when they read the same input: the same channels in the same
order with the same file patterns (``data.modalities``), prepared on the same grid
(``data.target_shape``) and trained on the same patch grid (``data.patch_size``); the
threshold and minimum lesion size, which act on the mean, must agree or be given.
:func:`check_ensemble` refuses anything else from the ``run.json`` files alone, before a
checkpoint or a volume is read, with one line naming the run.

``inference.json`` records each member (its folder, checkpoint file, the checkpoint's
SHA-256 and step, and its prediction settings), so a prediction folder says which
weights made it.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from .config import RUN_CHECKPOINTS, PredictConfig, RunSettings
from .errors import ConfigError
from .pipeline import load_run_state, predict_prepared, read_run_settings

__all__ = [
    "Ensemble",
    "Member",
    "check_ensemble",
    "file_sha256",
    "load_ensemble",
    "mean_probability",
]

# Settings that act on the ensemble's mean (one value for all members).
MASK_FIELDS = ("threshold", "min_lesion_size")
# Settings of each member's own probability (they may differ between members).
PROB_FIELDS = ("window", "overlap", "weighting", "mirror")


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def mean_probability(probs: list[np.ndarray]) -> np.ndarray:
    """The members' probabilities (same shape, float32) -> their mean, float32. One
    member's comes back as it is (the single-run path, bitwise); several are summed in
    float64 and rounded once."""
    if len(probs) == 1:
        return probs[0]
    total = np.zeros(probs[0].shape, dtype=np.float64)
    for p in probs:
        total += p
    return (total / len(probs)).astype(np.float32)


def _shown(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, dict):
        return " ".join(f"{k}={v}" for k, v in value.items())
    return "×".join(map(str, value))


def _comparable(value):
    """Channels compare in order (a dict's == ignores it); shapes as they are."""
    return list(value.items()) if isinstance(value, dict) else value


def check_ensemble(runs: list, settings: list[RunSettings]) -> None:
    """ConfigError (option ``model``) unless every run reads the same input as the first
    (channels and their file patterns in order, prediction grid, patch grid) and no run
    is named twice; ConfigError (``threshold``/``min_lesion_size``) when the runs'
    mask settings differ. Reads nothing but ``settings`` (the runs' ``run.json``)."""
    seen: dict[Path, object] = {}
    for run in runs:
        key = Path(run).resolve()
        if key in seen:
            raise ConfigError("model", f"names the run {run} twice ({seen[key]} and {run})")
        seen[key] = run
    first, ref = runs[0], settings[0].data
    checks = (
        ("modalities", "channels (NAME=PATTERN)", "read the same channels"),
        ("target_shape", "target shape", "predict on the same grid"),
        ("patch_size", "patch size", "be trained on the same patch grid"),
    )
    for run, s in zip(runs[1:], settings[1:], strict=True):
        for name, what, must in checks:
            a, b = getattr(s.data, name), getattr(ref, name)
            if _comparable(a) != _comparable(b):
                raise ConfigError(
                    "model",
                    f"{run} was trained with {what} {_shown(a)} but {first} with {_shown(b)}; "
                    f"the runs of an ensemble must {must}",
                )
    for name in MASK_FIELDS:
        values = [getattr(s.predict, name) for s in settings]
        if len(set(values)) > 1:
            each = ", ".join(f"{r}: {v}" for r, v in zip(runs, values, strict=True))
            raise ConfigError(name, f"differs between the runs ({each}); give one value")


@dataclass
class Member:
    """One run of an ensemble: its folder (as given), settings (with the command's
    prediction options applied), model on the CPU in eval mode, checkpoint file and that
    file's SHA-256 and training step."""

    run: Path
    settings: RunSettings
    model: object
    checkpoint: Path
    sha256: str
    step: int | None

    def record(self) -> dict:
        """This member's entry of ``inference.json``."""
        p = asdict(self.settings.predict)
        return {
            "run": str(self.run),
            "checkpoint": self.checkpoint.name,
            "sha256": self.sha256,
            "step": self.step,
            **{k: p[k] for k in PROB_FIELDS},
        }


def load_ensemble(runs, checkpoint: str = "last", options: dict | None = None) -> Ensemble:
    """Run folders -> :class:`Ensemble`. ``options``: prediction settings given by the
    command (PredictConfig fields; they replace every run's own). Every ``run.json`` is
    read and :func:`check_ensemble` passed before any checkpoint is loaded."""
    runs = [Path(r) for r in runs]
    if not runs:
        raise ConfigError("model", "needs at least one run folder")
    options = options or {}
    settings = [_with_options(read_run_settings(r), options) for r in runs]
    check_ensemble(runs, settings)
    members = []
    for run, s in zip(runs, settings, strict=True):
        model, _, state = load_run_state(run, checkpoint)
        file = run / RUN_CHECKPOINTS[checkpoint]
        members.append(Member(run, s, model, file, file_sha256(file), state.get("step")))
    return Ensemble(members)


def _with_options(settings: RunSettings, options: dict) -> RunSettings:
    return replace(settings, predict=replace(settings.predict, **options))


@dataclass
class Ensemble:
    """The members of a prediction (one or several runs; see the module docstring)."""

    members: list[Member]

    @property
    def data(self):
        """The DataConfig that finds the subjects (the channels are every member's)."""
        return self.members[0].settings.data

    @property
    def mask_config(self) -> PredictConfig:
        """Threshold and minimum lesion size of the mask (every member's, checked)."""
        return self.members[0].settings.predict

    def probability(self, subject, device: str | None = None):
        """A Subject -> (probability (X, Y, Z) float32 on the file's grid, affine): the
        mean of the members' probabilities, each from the subject prepared with that
        member's crop and normalisation (read from disk once)."""
        from .data import load_subject, prepare_arrays

        image, _, affine = load_subject(subject)
        prepared, probs = {}, []
        for m in self.members:
            d = m.settings.data
            key = (None if d.target_shape is None else tuple(d.target_shape), d.normalisation)
            if key not in prepared:
                prepared[key] = prepare_arrays(
                    subject.name, image, None, affine, d.target_shape, d.normalisation
                )
            probs.append(predict_prepared(m.model, prepared[key], m.settings, device=device))
        return mean_probability(probs), affine

    def record(self) -> dict:
        """``inference.json``: every setting that made the files. For one run the keys
        of a single run's record (run, checkpoint, its prediction settings) plus
        ``models``; for several, ``run`` lists the folders and the top level holds
        the settings the members share."""
        members = [m.record() for m in self.members]
        first = members[0]
        top = {
            k: v
            for k, v in asdict(self.mask_config).items()
            if k in MASK_FIELDS or all(m[k] == first[k] for m in members)
        }
        one = len(members) == 1
        return {
            "run": first["run"] if one else [m["run"] for m in members],
            "checkpoint": first["checkpoint"],
            **top,
            "brain_only": True,
            **({} if one else {"ensemble": "mean of the models' probabilities, then the mask"}),
            "models": members,
        }
