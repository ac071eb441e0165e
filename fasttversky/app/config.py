"""Configuration of a training run: one dataclass per concern, composed into RunSettings.

* :class:`ModelConfig`   -> ``UNet3D`` (width, depth, checkpointing, normalisation)
* :class:`DataConfig`    -> which files, crop, patches and batches
* :class:`TrainConfig`   -> ``fasttversky.app.training.train`` (optimiser, loss, precision)
* :class:`PredictConfig` -> ``fasttversky.app.training.inference`` (windows, threshold)
* :class:`RunSettings`   -> the four together; saved as ``run.json`` beside the checkpoint
* :class:`SynthConfig`   -> the phantoms of ``fasttversky synth`` (``app.data.synth``)
* :class:`ExperimentConfig` -> the cross-validated sweep of ``reproduce`` (``app.experiment``)

Every setting is declared exactly once, here, with its default and a one-line help in
the field's metadata; the command line builds its options from these fields (see
:func:`cli_fields`) and the constants below give the choices. The module imports no
torch, so ``fasttversky --help`` stays fast; checks that need torch (the loss backend
name) run in :meth:`RunSettings.validate`.

Every check raises :class:`ConfigError` (a ``ValueError``) naming the field.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError, DataError

__all__ = [
    "CHECKPOINT_MODES",
    "DEFAULT_MASK_PATTERN",
    "DEFAULT_MODALITIES",
    "LR_SCHEDULES",
    "NORMALIZATIONS",
    "NORMS",
    "PRECISIONS",
    "ConfigError",
    "DataConfig",
    "ExperimentConfig",
    "ModelConfig",
    "PredictConfig",
    "RunSettings",
    "SynthConfig",
    "TrainConfig",
    "cli_fields",
    "field_default",
]

CHECKPOINT_MODES = ("none", "top", "all")  # UNet3D activation checkpointing
NORMS = ("none", "batch", "instance")  # UNet3D normalisation after each conv
PRECISIONS = ("fp32", "bf16", "fp16")  # training/inference compute precision
LR_SCHEDULES = ("step", "poly")  # StepLR (the paper's) or nnU-Net's poly decay
DEFAULT_MODALITIES: dict[str, str] = {"T1": "t1", "T2": "t2", "FLAIR": "flair"}
DEFAULT_MASK_PATTERN = "mask"
# DataConfig.augment: none, or a named set of fasttversky.app.data.augment.AUGMENTATIONS
AUGMENTS = ("none", "default", "resolution")
# DataConfig.normalize: brain z-score per modality, or each modality over its own median
# in normal-appearing white matter (defined by the T1 channel; data.transforms)
NORMALIZATIONS = ("zscore", "white-matter")
# DataConfig.transplant_contrast, SynthConfig.contrast: the names of the modes whose
# parameters data.synth.TRANSPLANT_CONTRASTS gives, keyed by these names (this module
# stays numpy-free for the CLI's help)
TRANSPLANT_CONTRASTS = ("typical", "wide", "varied", "varied-cortex")
WEIGHTINGS = ("gaussian", "uniform")  # sliding-window combination
MIRRORS = {"none": (), "lr": (0,), "all": (0, 1, 2)}  # test-time mirroring axes
# The weights a run folder keeps: the end of training, and (with validation subjects)
# the best validation score; `predict --weights` picks one.
RUN_CHECKPOINTS = {"last": "last.pt", "best": "best.pt"}


def _opt(default: Any = MISSING, help: str = "", *, factory=MISSING, **cli) -> Any:
    """A dataclass field whose metadata carries its command-line help (and argparse
    extras such as ``choices``, ``nargs``, ``metavar``). ``help=""`` = not an option."""
    meta = {"help": help, **cli} if help else {}
    if factory is not MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def cli_fields(cls) -> Iterator[Any]:
    """The fields of a config class that are command-line options, in declaration order."""
    return (f for f in fields(cls) if f.metadata.get("help"))


def field_default(cls, name: str) -> Any:
    """The default a config class declares for one field: the value other modules'
    keyword defaults take, so that it is written once (``field_default(PredictConfig,
    "threshold")``)."""
    f = next(f for f in fields(cls) if f.name == name)
    return f.default if f.default_factory is MISSING else f.default_factory()


# -- checks ---------------------------------------------------------------------------
def _finite(name: str, v: float) -> None:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise ConfigError(name, f"must be a finite number, got {v!r}")


def _at_least(name: str, v, low) -> None:
    if isinstance(v, float):
        _finite(name, v)
    if v < low:
        raise ConfigError(name, f"must be >= {low}, got {v}")


def _int_at_least(name: str, v, low: int) -> None:
    if not isinstance(v, int) or isinstance(v, bool):
        raise ConfigError(name, f"must be an integer, got {v!r}")
    _at_least(name, v, low)


def _choice(name: str, v, choices) -> None:
    if v not in choices:
        raise ConfigError(name, f"must be one of {', '.join(map(str, choices))}; got {v!r}")


def _shape(name: str, v) -> list | None:
    """None or 3 positive ints, returned as a list (the form run.json round-trips)."""
    if v is None:
        return None
    v = list(v)
    if len(v) != 3 or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in v):
        raise ConfigError(name, f"must be 3 positive integers (D H W), got {v}")
    return v


def _t1_channel(modalities: dict) -> int:
    names = [n.lower() for n in modalities]
    if "t1" not in names:
        raise ConfigError(
            "normalize",
            f"white-matter needs a modality named T1 to find white matter; got {list(modalities)}",
        )
    return names.index("t1")


# -- the configs -----------------------------------------------------------------------
@dataclass
class ModelConfig:
    """The U-Net's own settings (``UNet3D(in_channels, num_classes, **asdict(self))``;
    the channels come from the data, the classes are background + lesion)."""

    base_features: int = _opt(32, "features of the top level (doubled per level)")
    levels: int = _opt(4, "U-Net levels (resolutions); patch sizes divide by 2**(levels-1)")
    checkpoint: str = _opt(
        "all", "activation checkpointing: less memory, one extra forward", choices=CHECKPOINT_MODES
    )
    norm: str = _opt("none", "normalisation after each conv", choices=NORMS)

    def __post_init__(self):
        _int_at_least("base_features", self.base_features, 1)
        _int_at_least("levels", self.levels, 1)
        _choice("checkpoint", self.checkpoint, CHECKPOINT_MODES)
        _choice("norm", self.norm, NORMS)

    @property
    def multiple(self) -> int:
        """Spatial sizes the U-Net takes are multiples of this (it pools levels-1 times)."""
        return 2 ** (self.levels - 1)


@dataclass
class DataConfig:
    """Which files make a subject, and how volumes become training batches."""

    modalities: dict = _opt(
        factory=lambda: dict(DEFAULT_MODALITIES),
        help="image channel and its case-insensitive file-name pattern (shell style, without "
        ".nii/.nii.gz); repeat per channel, in channel order",
        metavar="NAME=PATTERN",
        action="append",
    )
    mask_pattern: str = _opt(DEFAULT_MASK_PATTERN, "lesion-mask file-name pattern")
    target_shape: list | None = _opt(
        None,
        "crop/pad every volume to D H W around the brain (paper: 128 224 256); "
        "0 0 0 = keep the file grid",
        nargs=3,
        metavar=("D", "H", "W"),
    )
    patch_size: list | None = _opt(
        None,
        "train on random D H W patches; 0 0 0 = whole volumes",
        nargs=3,
        metavar=("D", "H", "W"),
    )
    lesion_prob: float = _opt(0.5, "fraction of patches centred on a lesion voxel")
    batch_size: int = _opt(1, "volumes or patches per optimiser step")
    augment: str = _opt(
        "none",
        "on-the-fly patch augmentation: default = flips, rotation/scaling, per-modality "
        "gamma/contrast/brightness/noise; resolution = default plus per-modality blur "
        "and simulated low resolution (fasttversky.app.data.augment)",
        choices=AUGMENTS,
    )
    normalize: str = _opt(
        "zscore",
        "per-modality intensity normalisation inside the brain: zscore = mean 0, sd 1; "
        "white-matter = ratio to the median of normal white matter (the top 35 percent of "
        "the brain on the modality named T1), in units of 0.3x that median",
        choices=NORMALIZATIONS,
    )
    transplant_contrast: str = _opt(
        "typical",
        "contrast of transplanted lesions (--transplant-masks): typical = one severity per "
        "subject around FLAIR 1.35x white matter; wide = one per lesion, FLAIR 1.1-1.9x; "
        "varied = one per lesion and modality, FLAIR 1.2-1.7x (faint end above cortex); "
        "varied-cortex = varied, and each copy's grey matter re-contrasted (FLAIR 1.0-1.3x)",
        choices=TRANSPLANT_CONTRASTS,
    )
    val_subjects: list | None = _opt(
        None,
        "subjects of DATA held out of training (with the --transplant-masks named like "
        "them) and scored every --val-every steps, as `predict` would (DSC pooled over "
        "them); the best checkpoint is kept as best.pt beside last.pt",
        nargs="+",
        metavar="NAME",
    )

    def __post_init__(self):
        if not self.modalities:
            raise ConfigError("modalities", "needs at least one NAME=PATTERN")
        if not self.mask_pattern:
            raise ConfigError("mask_pattern", "must not be empty")
        self.modalities = dict(self.modalities)
        self.target_shape = _shape("target_shape", self.target_shape)
        self.patch_size = _shape("patch_size", self.patch_size)
        _finite("lesion_prob", self.lesion_prob)
        if not 0 <= self.lesion_prob <= 1:
            raise ConfigError("lesion_prob", f"must be in [0, 1], got {self.lesion_prob}")
        _int_at_least("batch_size", self.batch_size, 1)
        _choice("augment", self.augment, AUGMENTS)
        _choice("normalize", self.normalize, NORMALIZATIONS)
        if self.normalize == "white-matter":
            _t1_channel(self.modalities)  # a missing T1 fails here, before any data is read
        _choice("transplant_contrast", self.transplant_contrast, TRANSPLANT_CONTRASTS)
        if self.val_subjects is not None:
            if isinstance(self.val_subjects, str):
                raise ConfigError(
                    "val_subjects", f"must be a list of names, got {self.val_subjects!r}"
                )
            names = list(self.val_subjects)
            if not names or not all(isinstance(n, str) and n for n in names):
                raise ConfigError("val_subjects", f"must be subject names, got {names!r}")
            if len(set(names)) != len(names):
                raise ConfigError("val_subjects", f"names a subject twice: {names}")
            self.val_subjects = names

    @property
    def normalisation(self) -> tuple[str, int]:
        """(mode, reference channel) for :func:`fasttversky.app.data.normalise_in_brain`;
        the reference of white-matter is the modality named T1 (case-insensitive): white
        matter is its brightest tissue and lesions are dark there."""
        ref = _t1_channel(self.modalities) if self.normalize == "white-matter" else 0
        return (self.normalize, ref)


@dataclass
class TrainConfig:
    """Settings of :func:`fasttversky.app.training.train`. Defaults are the paper's
    (Salehi et al. 2017).

    steps: optimiser steps to reach (a resumed run continues up to the same total).
    lr, lr_decay, lr_decay_every: Adam learning rate, multiplied by ``lr_decay`` every
        ``lr_decay_every`` optimiser steps (torch.optim.lr_scheduler.StepLR).
    alpha, beta, gamma: Tversky loss weights of false positives / false negatives and
        the focal exponent (``fasttversky.tversky_loss``, softmax over the logits);
        alpha, beta >= 0 with alpha + beta > 0 (else the loss is constant), gamma > 0.
    ce_weight: >= 0; when > 0 the loss is Tversky + ``ce_weight`` × cross-entropy (mean
        over voxels, nnU-Net's and LST-AI's compound), from the same single fused pass.
    backend: loss backend ("auto" or a name of ``fasttversky.available_backends()``).
    precision: "fp32", "bf16" (autocast) or "fp16" (autocast + GradScaler).
    grad_accum: micro-batches per optimiser step; the loss of each is divided by it,
        so the gradient is the mean over micro-batches.
    seed: seeds torch, numpy and ``random`` at the start of a fresh run (a resumed run
        restores the saved RNG states instead). The model is built by the caller:
        seed before constructing it for a reproducible initialisation.
    checkpoint_every: write a checkpoint every this many steps (and after the last).
    lr_schedule: "step" (StepLR with lr_decay / lr_decay_every, the paper's) or "poly"
        (lr · (1 - step/steps)^0.9, nnU-Net's: a short CPU run ends annealed instead of
        at full lr, where the weights still jump between steps).
    keep_every: also keep a copy of the checkpoint every this many steps as
        ``step_<N>.pt`` beside ``last.pt`` (to evaluate or pick a training length
        afterwards); None = only ``last.pt``.
    val_every: with validation (``train(..., validate=...)``; at the command line
        ``--val-subjects``), score the model every this many steps and after the last,
        keeping the best-scoring checkpoint as ``best.pt``.
    log_every: write a metrics-log line every this many steps.
    device: where the model and batches are put ("cpu", "cuda", "cuda:1", ...).
    sync_across_ranks: under torch.distributed, compute the loss on the batch
        concatenated over ranks (see ``fasttversky.distributed``).

    Where a call of ``train`` writes (checkpoint folder, log files) and whether it shows
    progress are not settings of the run: see
    :class:`fasttversky.app.training.TrainOutputs`.
    """

    steps: int = _opt(help="optimiser steps (a resumed run continues up to this total)")
    lr: float = _opt(1e-4, "Adam learning rate")
    lr_decay: float = _opt(0.9, "learning-rate factor applied every --lr-decay-every steps")
    lr_decay_every: int = _opt(1000, "steps between learning-rate decays")
    alpha: float = _opt(0.3, "Tversky weight of false positives (>= 0)")
    beta: float = _opt(0.7, "Tversky weight of false negatives (>= 0; alpha + beta > 0)")
    gamma: float = _opt(1.0, "focal exponent (> 0); 1 = plain Tversky loss")
    ce_weight: float = _opt(
        0.0, "weight of a cross-entropy term added in the loss's one fused pass (0 = Tversky alone)"
    )
    backend: str = _opt("auto", "loss backend: auto, or a name in fasttversky.available_backends()")
    precision: str = _opt("fp32", "compute precision (fp16 adds a GradScaler)", choices=PRECISIONS)
    grad_accum: int = _opt(1, "micro-batches per optimiser step")
    seed: int = _opt(0, "seed of the initialisation, patches and batches (>= 0)")
    checkpoint_every: int = _opt(500, "write the checkpoint every this many steps")
    lr_schedule: str = _opt(
        "step",
        "learning-rate schedule: step (the paper's) or poly (nnU-Net's)",
        choices=LR_SCHEDULES,
    )
    keep_every: int | None = _opt(
        None, "also keep step_<N>.pt every this many steps; none = only last.pt"
    )
    val_every: int = _opt(
        300, "with --val-subjects: score them every this many steps (and after the last)"
    )
    log_every: int = 1
    device: str = _opt("cpu", "where to train: cpu, cuda, cuda:1, ...")
    sync_across_ranks: bool = False

    def __post_init__(self):
        _int_at_least("steps", self.steps, 0)
        for name in ("grad_accum", "lr_decay_every", "checkpoint_every", "log_every", "val_every"):
            _int_at_least(name, getattr(self, name), 1)
        _int_at_least("seed", self.seed, 0)
        _finite("lr", self.lr)
        if self.lr <= 0:
            raise ConfigError("lr", f"must be > 0, got {self.lr}")
        _finite("lr_decay", self.lr_decay)
        if self.lr_decay <= 0:
            raise ConfigError("lr_decay", f"must be > 0, got {self.lr_decay}")
        _at_least("alpha", self.alpha, 0)
        _at_least("beta", self.beta, 0)
        if self.alpha + self.beta <= 0:
            raise ConfigError(
                "alpha + beta", "must be > 0 (with both 0 the loss is constant: nothing is learned)"
            )
        _at_least("ce_weight", self.ce_weight, 0)
        _finite("gamma", self.gamma)
        if self.gamma <= 0:
            raise ConfigError("gamma", f"must be > 0, got {self.gamma}")
        _choice("precision", self.precision, PRECISIONS)
        _choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        if self.keep_every is not None:
            _int_at_least("keep_every", self.keep_every, 1)
        if not isinstance(self.device, str) or not self.device:
            raise ConfigError(
                "device", f"must be a device name such as cpu or cuda, got {self.device!r}"
            )


@dataclass
class PredictConfig:
    """Every choice of a prediction (``fasttversky.app.training.inference.segment_volume``):
    sliding windows, mirroring, the mask threshold and the minimum lesion size."""

    window: list | None = _opt(
        None,
        "sliding-window size D H W for prediction; 0 0 0 = the whole volume at once",
        nargs=3,
        metavar=("D", "H", "W"),
    )
    overlap: float = _opt(0.5, "fraction by which neighbouring sliding windows overlap, in [0, 1)")
    threshold: float = _opt(0.5, "probability at or above which a voxel is lesion, in (0, 1)")
    weighting: str = _opt(
        "gaussian",
        "how overlapping windows combine: gaussian (centre counts most) or uniform",
        choices=WEIGHTINGS,
    )
    mirror: str = _opt(
        "none",
        "mirroring test-time augmentation: lr = also the left-right mirror image (2 "
        "passes), all = every axis (8 passes; for models trained with flips on every axis: "
        "the default augmentation flips left-right only)",
        choices=tuple(MIRRORS),
    )
    min_lesion_size: int = _opt(
        0, "remove predicted lesions (26-connected) smaller than this many voxels; 0 = keep all"
    )

    def __post_init__(self):
        self.window = _shape("window", self.window)
        _finite("overlap", self.overlap)
        if not 0 <= self.overlap < 1:
            raise ConfigError("overlap", f"must be in [0, 1), got {self.overlap}")
        check_threshold(self.threshold)
        _choice("weighting", self.weighting, WEIGHTINGS)
        _choice("mirror", self.mirror, tuple(MIRRORS))
        _int_at_least("min_lesion_size", self.min_lesion_size, 0)


def check_threshold(threshold: float, name: str = "threshold") -> None:
    """A probability threshold must lie strictly inside (0, 1): 0 marks every voxel, and
    nothing reaches a threshold above 1."""
    _finite(name, threshold)
    if not 0 < threshold < 1:
        raise ConfigError(name, f"must be in (0, 1), got {threshold}")


def check_device(device: str, name: str = "device") -> None:
    """A torch device that exists here (before data is loaded, not at the first .to())."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(name, f"{device!r} is not a device name (cpu, cuda, cuda:1, ...)") from e
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ConfigError(name, f"{device}: torch sees no CUDA device here")
        if dev.index is not None and dev.index >= n:
            raise ConfigError(name, f"{device}: only {n} CUDA device(s) here")
    elif dev.type not in ("cpu", "mps", "xpu"):
        raise ConfigError(name, f"{device}: unsupported device type {dev.type!r}")


_SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "predict": PredictConfig,
}


@dataclass
class RunSettings:
    """One training run: the model's, the data's, the loop's and inference's settings.

    ``run.json`` is ``{"model": {...}, "data": {...}, "train": {...}, "predict": {...}}``
    (:meth:`to_dict`); :meth:`from_dict` reads it back to an equal object. Where a run
    writes is not part of it (``TrainOutputs``): the run folder is.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=2000))
    predict: PredictConfig = field(default_factory=PredictConfig)

    def validate(self) -> RunSettings:
        """Cross-field checks (each section checked itself on construction) and the
        loss backend name, which needs torch. Returns self."""
        for name, cls in _SECTIONS.items():
            if not isinstance(getattr(self, name), cls):
                raise ConfigError(name, f"must be a {cls.__name__}")
        m = self.model.multiple
        for name in ("patch_size", "target_shape"):
            shape = getattr(self.data, name)
            if shape is not None and any(s % m for s in shape):
                raise ConfigError(
                    name,
                    f"{' '.join(map(str, shape))} must be divisible by 2**(levels-1) = {m} "
                    "on every axis",
                )
        if self.train.steps < 1:
            raise ConfigError("steps", f"must be >= 1, got {self.train.steps}")
        if self.data.augment != "none" and self.data.patch_size is None:
            raise ConfigError("augment", "needs patch training (a --patch-size)")
        from fasttversky import BACKENDS

        _choice("backend", self.train.backend, ("auto", *BACKENDS))
        check_device(self.train.device)
        return self

    def to_dict(self) -> dict:
        out = {}
        for name in _SECTIONS:
            out[name] = asdict(getattr(self, name))
        return out

    @classmethod
    def from_dict(cls, d: dict) -> RunSettings:
        """Inverse of :meth:`to_dict`; an unknown section or key is a ConfigError."""
        if not isinstance(d, dict):
            raise ConfigError("run.json", f"must hold an object, got {type(d).__name__}")
        if d and not set(d) & set(_SECTIONS):
            d = _from_flat(d)
        unknown = set(d) - set(_SECTIONS)
        if unknown:
            raise ConfigError("run.json", f"has unknown section(s) {sorted(unknown)}")
        parts = {}
        for name, sub in _SECTIONS.items():
            values = d.get(name, {})
            known = {f.name for f in fields(sub)}
            bad = set(values) - known
            if bad:
                raise ConfigError(f"run.json {name}", f"has unknown key(s) {sorted(bad)}")
            if name == "train" and "steps" not in values:
                values = {**values, "steps": 2000}
            parts[name] = sub(**values)
        return cls(**parts)

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as JSON (``run.json``)."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> RunSettings:
        """Read a ``run.json``; a missing, unreadable or invalid file is a DataError (a
        bad file, exit status 1 at the CLI) naming it."""
        d = read_json(path)
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise DataError(f"{path}: {e}") from e


def read_json(path: str | Path) -> Any:
    """A JSON file's content; DataError naming the file and what is wrong with it, in
    words rather than the decoder's or the OS's own text."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or type(e).__name__})") from e
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: cannot be read as JSON (not a text file)") from e
    except json.JSONDecodeError as e:
        where = f"line {e.lineno}, column {e.colno}"
        raise DataError(f"{path}: cannot be read as JSON (invalid at {where})") from e


def _from_flat(d: dict) -> dict:
    """The flat ``run.json`` written before the settings were split by concern (one
    object with every field) -> the sectioned form; field names are unique across
    sections, so each goes to its own."""
    flat, parts = dict(d), {name: {} for name in _SECTIONS}
    for name, sub in _SECTIONS.items():
        for f in fields(sub):
            if f.name in flat:
                parts[name][f.name] = flat.pop(f.name)
    if flat:
        raise ConfigError("run.json", f"has unknown key(s) {sorted(flat)}")
    return parts


# -- commands outside a training run ---------------------------------------------------
@dataclass
class SynthConfig:
    """The phantoms of ``fasttversky synth`` (``fasttversky.app.data.synth.make_phantom``
    and ``write_phantom_dataset`` take their defaults from here); the transplant mode
    uses ``seed`` and ``contrast``. Checked where the data is written
    (``fasttversky.app.pipeline.synth``)."""

    shape: tuple = _opt(
        (96, 112, 96),
        "phantom grid; the head fills an MNI-sized 182×218×182 mm box",
        nargs=3,
        metavar=("X", "Y", "Z"),
    )
    seed: int = _opt(0, "random seed (>= 0)")
    lesion_fraction: tuple = _opt(
        # inside the 0.01-0.7 % lesion load of the Ljubljana MS data (data.synth)
        (1.2e-4, 6.5e-3),
        "lesion voxels / all voxels, or LOW HIGH for a log-uniform range",
        nargs="+",
        metavar="F",
        type=float,
    )
    noise: float = _opt(0.03, "Rician noise / WM intensity")
    bias: float = _opt(0.12, "bias-field amplitude (log)")
    keep_skull: bool = _opt(False, "keep scalp and skull", action="store_true")
    contrast: str = _opt(
        "varied",
        "transplant mode: lesion contrast: typical = one per subject, FLAIR ~1.35x "
        "white matter; wide = one per lesion, FLAIR 1.1-1.9x; varied = one per lesion and "
        "modality, FLAIR 1.2-1.7x; varied-cortex = varied, grey matter re-contrasted per "
        "brain copy (varied is what the lesion-cpu preset trains on)",
        choices=TRANSPLANT_CONTRASTS,
    )


# The paper's sweep (Table 1): (alpha, beta); alpha weighs false positives, beta false
# negatives; (0.5, 0.5) is the Dice loss.
PAPER_SETTINGS = ((0.5, 0.5), (0.4, 0.6), (0.3, 0.7), (0.2, 0.8), (0.1, 0.9))


@dataclass
class ExperimentConfig:
    """The cross-validated (alpha, beta) sweep of ``fasttversky reproduce``
    (``fasttversky.app.experiment.run_sweep``).

    settings: (alpha, beta) or (alpha, beta, ce_weight) tuples, or their command-line
        spelling "A,B[,CE]"; a pair is trained with the run's own ce_weight.
    seeds: training seeds every setting is repeated with; None = the run's seed only.
    """

    folds: int = _opt(2, "cross-validation folds (>= 2)")
    settings: list = _opt(
        factory=lambda: list(PAPER_SETTINGS),
        help="(α, β) pairs instead of the paper's five, e.g. 0.5,0.5 0.3,0.7; a third "
        "number adds that weight of cross-entropy (0.3,0.7,1 = Tversky + CE; pairs take "
        "--ce-weight)",
        nargs="+",
        metavar="A,B[,CE]",
    )
    seeds: list | None = _opt(
        None,
        "repeat every setting with these training seeds; the table adds mean ± sd and a "
        "bootstrap 95 %% CI over seeds; none = --seed only",
        nargs="+",
        metavar="N",
        type=int,
    )

    def __post_init__(self):
        _int_at_least("folds", self.folds, 2)
        if not self.settings:
            raise ConfigError("settings", "needs at least one (alpha, beta) pair")
        self.settings = [_setting(t) for t in self.settings]
        if self.seeds is not None:
            seeds = list(self.seeds)
            ok = all(isinstance(x, int) and not isinstance(x, bool) for x in seeds)
            if not seeds or not ok or len(set(seeds)) != len(seeds) or min(seeds) < 0:
                raise ConfigError("seeds", f"must be distinct integers >= 0, got {seeds}")
            self.seeds = seeds


def _setting(t) -> tuple[float, ...]:
    """(alpha, beta[, ce_weight]) from a tuple or its command-line spelling "A,B[,CE]"."""
    try:
        values = tuple(float(v) for v in (t.split(",") if isinstance(t, str) else t))
    except (TypeError, ValueError):
        values = ()
    if len(values) not in (2, 3):
        if isinstance(t, str):
            msg = f"expects A,B or A,B,CE such as 0.3,0.7 or 0.3,0.7,1, got {t!r}"
        else:
            msg = f"expects (alpha, beta[, ce_weight]), got {t!r}"
        raise ConfigError("settings", msg)
    return values
