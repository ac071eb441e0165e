"""The application's steps as library functions: synthesise, train, load, predict,
evaluate, and the demo that chains them. The CLI (``fasttversky.app.cli``) only parses
arguments, calls these and prints; they raise exceptions and never exit the process:

* :class:`~fasttversky.app.config.ConfigError` — a setting out of range (CLI exit 2),
* :class:`~fasttversky.app.data.DataError` — a dataset, file or run folder that cannot
  be used, naming it (CLI exit 1),
* :class:`~fasttversky.app.training.NonFiniteLossError` — training diverged (exit 1).

Every input is checked before expensive work starts: settings first, then every
subject is read in full (readable, 3-D, one grid, finite, binary mask) before a model
is built.

Folders:

* dataset: ``DATA/<subject>/{T1,T2,FLAIR,mask}.nii(.gz)`` (see fasttversky.app.data)
* run (:func:`train_run`): ``RUN/last.pt`` (checkpoint), ``RUN/run.json``
  (:class:`~fasttversky.app.config.RunSettings`), ``RUN/metrics.jsonl`` (loss per step);
  with validation subjects also ``RUN/best.pt`` and ``RUN/val.jsonl`` (score per
  validation)
* predictions (:func:`predict_dataset`): ``PRED/<subject>/{prob,mask}.nii.gz`` with the
  input's affine, and ``PRED/inference.json`` (the settings, each run's checkpoint and
  its SHA-256; one run or an ensemble, :mod:`fasttversky.app.ensemble`)
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from .config import (
    RUN_CHECKPOINTS,
    TRANSPLANT_CONTRASTS,
    DataConfig,
    PredictConfig,
    RunSettings,
    check_threshold,
)
from .data.io import Subject, find_subjects, load_volume
from .errors import ConfigError, DataError
from .report import metric_table, progress_bar, write_metrics_csv

__all__ = [
    "build_model",
    "demo",
    "evaluate_folder",
    "evaluate_volumes",
    "find_dataset",
    "load_run",
    "load_run_state",
    "metric_table",
    "predict_dataset",
    "predict_prepared",
    "segment_prepared",
    "prepare_all",
    "read_run_settings",
    "split_validation",
    "synth",
    "train_run",
    "validation_scores",
    "write_metrics_csv",
]

RUN_SETTINGS = "run.json"
METRICS_LOG = "metrics.jsonl"
VAL_LOG = "val.jsonl"


# --------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------
def find_dataset(data: str | Path, config: DataConfig, require_mask: bool = True) -> list[Subject]:
    """The subjects of a dataset folder (DataError if there is none)."""
    return find_subjects(
        data, config.modalities, config.mask_pattern if require_mask else None, require_mask
    )


def prepare_all(
    subjects, target_shape=None, progress: bool = False, normalisation=("zscore", 0)
) -> list:
    """Read, check and prepare every subject now (Subjects -> PreparedSubjects; already
    prepared ones pass through), so a broken file fails before any training.
    normalisation: ``DataConfig.normalisation``."""
    from .data import PreparedSubject, prepare_subject

    return [
        s if isinstance(s, PreparedSubject) else prepare_subject(s, target_shape, normalisation)
        for s in progress_bar(subjects, "load", progress)
    ]


def synth(
    out: str | Path,
    *,
    n: int | None = None,
    shape: Sequence[int] | None = None,
    seed: int | None = None,
    lesion_fraction: Sequence[float] | None = None,
    noise: float | None = None,
    bias: float | None = None,
    keep_skull: bool | None = None,
    brains: str | Path | None = None,
    lesion_masks: str | Path | None = None,
    exclude_masks: Sequence[str] = (),
    contrast: str | None = None,
    progress: bool = True,
) -> list[dict]:
    """Write a phantom dataset (or, with ``brains`` and ``lesion_masks``, real lesion
    masks transplanted into real brains) -> per-subject stats (``lesion_fraction``...).
    Transplant mode skips masks named like a brain or in ``exclude_masks``; ``contrast``
    a mode of :data:`fasttversky.app.config.TRANSPLANT_CONTRASTS`. An option left None
    takes :class:`~fasttversky.app.config.SynthConfig`'s default."""
    from .config import SynthConfig
    from .data import synth as synth_mod

    given = dict(
        shape=shape, seed=seed, noise=noise, bias=bias, keep_skull=keep_skull, contrast=contrast
    )
    d = SynthConfig(**{k: v for k, v in given.items() if v is not None})
    if n is not None and n < 1:
        raise ConfigError("n", f"must be >= 1, got {n}")
    if d.seed < 0:
        raise ConfigError("seed", f"must be >= 0, got {d.seed}")
    if exclude_masks and not lesion_masks:
        raise ConfigError("exclude_masks", "only applies with --lesion-masks (transplant mode)")
    if brains or lesion_masks:
        if not (brains and lesion_masks):
            raise ConfigError("brains", "and --lesion-masks go together (transplant mode)")
        if d.contrast not in TRANSPLANT_CONTRASTS:
            raise ConfigError(
                "contrast", f"must be one of {list(TRANSPLANT_CONTRASTS)}, got {d.contrast!r}"
            )
        return synth_mod.write_transplant_dataset(
            out,
            brains,
            lesion_masks,
            n_subjects=n,
            seed=d.seed,
            progress=lambda it: progress_bar(it, "transplant", progress),
            exclude=exclude_masks,
            contrast=d.contrast,
        )
    return synth_mod.write_phantom_dataset(
        out,
        n_subjects=n or 4,
        shape=tuple(d.shape),
        seed=d.seed,
        progress=lambda it: progress_bar(it, "synth", progress),
        lesion_fraction=_checked_phantom_options(d.shape, d.noise, d.bias, lesion_fraction),
        skull_strip=not d.keep_skull,
        noise=d.noise,
        bias=d.bias,
    )


def _checked_phantom_options(shape, noise, bias, lesion_fraction):
    """ConfigError for a phantom option out of range -> the lesion fraction as
    make_phantom takes it (F, (LOW, HIGH), or None for its default)."""
    if len(shape) != 3 or min(shape) < 8:
        raise ConfigError("shape", f"must be 3 sizes >= 8, got {list(shape)}")
    if noise < 0 or not math.isfinite(noise):
        raise ConfigError("noise", f"must be >= 0, got {noise}")
    if not math.isfinite(bias):
        raise ConfigError("bias", f"must be finite, got {bias}")
    if not lesion_fraction:
        return None
    if len(lesion_fraction) > 2 or not all(0 < f < 1 for f in lesion_fraction):
        raise ConfigError(
            "lesion_fraction", f"must be F or LOW HIGH in (0, 1), got {list(lesion_fraction)}"
        )
    lf = lesion_fraction[0] if len(lesion_fraction) == 1 else tuple(lesion_fraction)
    if isinstance(lf, tuple) and lf[0] > lf[1]:
        raise ConfigError("lesion_fraction", f"LOW must be <= HIGH, got {list(lf)}")
    return lf


# --------------------------------------------------------------------------------------
# training and inference
# --------------------------------------------------------------------------------------
def build_model(settings: RunSettings):
    """The UNet3D of a run: channels from the data's modalities, background + lesion."""
    from dataclasses import asdict

    from .models import UNet3D

    return UNet3D(
        in_channels=len(settings.data.modalities), num_classes=2, **asdict(settings.model)
    )


def with_default_window(settings: RunSettings) -> RunSettings:
    """``settings`` with the prediction window set to the training patch size when the
    run trains on patches and no window was chosen: a network trained on patches (with
    instance norm in particular, whose statistics are those of a patch) sees inputs like
    its training ones on windows of that size. Whole-volume passes against windows,
    measured per patch size: bench/results/lesion_cpu.md."""
    if settings.predict.window is None and settings.data.patch_size is not None:
        return replace(
            settings, predict=replace(settings.predict, window=list(settings.data.patch_size))
        )
    return settings


def train_run(
    subjects,
    settings: RunSettings,
    out: str | Path,
    *,
    resume: bool = False,
    progress=True,
    transplant_masks: str | Path | None = None,
    exclude: Sequence[str] = (),
):
    """Train a U-Net on ``subjects`` (Subjects or PreparedSubjects) -> (model, TrainResult).

    Checks the settings, then reads every subject, before building the model. Writes
    ``out/run.json``, ``out/last.pt`` and ``out/metrics.jsonl``. ``resume=True``
    continues from ``out/last.pt`` (DataError if there is none or it cannot be read).
    Nothing written names ``out``, so ``out`` may be a temporary folder renamed to its
    final name afterwards.

    ``transplant_masks``: a folder of real lesion masks, each transplanted into the
    training brains (cycling) as an extra training subject with
    ``settings.data.transplant_contrast``; masks named like a training subject or like
    a name in ``exclude`` (held-out patients) are left out. The names used are written
    to ``out/transplants.json``. A patch-trained run records its patch size as the
    prediction window unless one was set: a network trained on patches (with instance
    norm in particular) predicts best on windows of that size.

    ``settings.data.val_subjects``: names of ``subjects`` held out of training (and of
    the transplanted masks, so their lesion shapes never reach training) and scored
    every ``settings.train.val_every`` steps exactly as ``predict`` would score them
    (the run's windows, brain restriction, threshold and minimum lesion size; DSC pooled
    over them, :func:`validation_scores`); the best checkpoint is kept as
    ``out/best.pt`` and every score is logged in ``out/val.jsonl``.
    """
    settings.validate()
    if not subjects:
        raise DataError("no subjects to train on")
    subjects, val_subjects = split_validation(subjects, settings.data.val_subjects)
    # Held-out subjects' own masks never reach training as transplants either.
    skip = [*exclude, *(s.name for s in val_subjects)]
    out = Path(out)
    if resume:
        _check_resumable_run(out, settings)
    _check_transplant_options(transplant_masks, exclude, skip, subjects)
    # The held-out subjects first: a bad choice fails before the training set is read.
    val_prepared = _prepare_validation(val_subjects, settings)
    prepared = prepare_all(subjects, settings.data.target_shape, False, settings.data.normalisation)
    missing = [p.name for p in prepared if p.mask is None]
    if missing:
        raise DataError(f"subjects without a lesion mask cannot be trained on: {missing}")
    extra = _transplants(subjects, transplant_masks, skip, settings, progress)
    settings = with_default_window(settings)
    _write_run_record(out, settings, resume, transplant_masks, skip, extra)
    batches = _training_batches(prepared + extra, settings)
    return _train_model(settings, batches, out, val_prepared, resume, progress)


def _check_resumable_run(out: Path, settings: RunSettings) -> None:
    """DataError when ``out`` holds no readable checkpoint to resume from (checked
    before any data is read); ConfigError when the held-out subjects differ from the
    run's."""
    from .training import load_checkpoint

    last = out / RUN_CHECKPOINTS["last"]
    if not last.is_file():
        raise DataError(f"{last} missing: nothing to resume (train without --resume)")
    load_checkpoint(last)  # a truncated or corrupt file fails here, naming itself
    if (out / RUN_SETTINGS).is_file():
        held = RunSettings.load(out / RUN_SETTINGS).data.val_subjects
        if held != settings.data.val_subjects:
            # Another held-out set changes the training set and what "best" means.
            raise ConfigError(
                "val_subjects",
                f"{settings.data.val_subjects} differs from the run's {held}: "
                "a resumed run keeps its held-out subjects",
            )


def _check_transplant_options(transplant_masks, exclude, skip, subjects) -> None:
    """A bad transplant folder or excluded name fails before any data is read."""
    if exclude and transplant_masks is None:
        raise ConfigError("exclude_masks", "only applies with --transplant-masks (none given)")
    if transplant_masks is None:
        return
    from .data.synth import check_excluded_names, lesion_mask_files

    try:
        lesion_mask_files(transplant_masks, [*skip, *(s.name for s in subjects)])
        check_excluded_names(transplant_masks, exclude)  # (validation names need no mask)
    except ValueError as e:
        raise DataError(str(e)) from None


def _prepare_validation(val_subjects, settings: RunSettings) -> list:
    """The held-out subjects, prepared; ConfigError when they cannot be scored."""
    val_prepared = prepare_all(
        val_subjects, settings.data.target_shape, False, settings.data.normalisation
    )
    if val_prepared:
        no_mask = [p.name for p in val_prepared if p.full_mask is None]
        if no_mask:
            raise ConfigError("val_subjects", f"{no_mask} have no lesion mask to be scored against")
        if not any(p.full_mask.any() for p in val_prepared):
            raise ConfigError(
                "val_subjects",
                f"{[p.name for p in val_prepared]} hold no lesion voxel, so their DSC is "
                "undefined; hold out subjects with lesions",
            )
    return val_prepared


def _transplants(subjects, transplant_masks, skip, settings: RunSettings, progress) -> list:
    """The extra training subjects made by transplanting real lesion masks into the
    training brains (none without ``transplant_masks``)."""
    if transplant_masks is None:
        return []
    from .data.synth import transplanted_subjects

    try:
        return transplanted_subjects(
            [s for s in subjects if not hasattr(s, "image")],
            transplant_masks,
            skip,
            target_shape=settings.data.target_shape,
            seed=settings.train.seed,
            contrast=settings.data.transplant_contrast,
            progress=(lambda it: progress_bar(it, "transplant", True)) if progress else None,
            normalisation=settings.data.normalisation,
        )
    except ValueError as e:
        raise DataError(str(e)) from e


def _write_run_record(out: Path, settings, resume, transplant_masks, skip, extra) -> None:
    """``run.json`` (and ``transplants.json``) in ``out``; a fresh run drops an earlier
    run's ``val.jsonl``, whose scores must not pass for this run's."""
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        (out / VAL_LOG).unlink(missing_ok=True)
    settings.save(out / RUN_SETTINGS)
    if transplant_masks is not None:
        (out / "transplants.json").write_text(
            json.dumps(
                {
                    "masks": str(transplant_masks),
                    "contrast": settings.data.transplant_contrast,
                    "excluded": sorted(skip),
                    "subjects": [p.name for p in extra],
                },
                indent=1,
            )
        )


def _training_batches(prepared: list, settings: RunSettings):
    """The seeded batch source of a run: patches (augmented if asked) or whole volumes
    padded to the U-Net's multiple."""
    from .data import LesionDataset, PaddedBatches, RandomBatches

    d = settings.data
    augmenter = None
    if d.augment != "none":
        from .data.augment import Augmenter, augment_config

        augmenter = Augmenter(augment_config(d.augment), d.patch_size)
    ds = LesionDataset(
        prepared,
        d.target_shape,
        d.patch_size,
        lesion_prob=d.lesion_prob,
        seed=settings.train.seed,
        augment=augmenter,
        normalisation=d.normalisation,
    )
    batches = RandomBatches(ds, d.batch_size, settings.train.seed)
    if d.patch_size is None:
        batches = PaddedBatches(batches, settings.model.multiple)
    return batches


def _train_model(settings: RunSettings, batches, out: Path, val_prepared, resume, progress):
    """Build the seeded model and train it into ``out`` -> (model, TrainResult)."""
    import torch

    from .training import TrainOutputs, train

    torch.manual_seed(settings.train.seed)  # reproducible initialisation
    model = build_model(settings)
    config = replace(
        settings.train, checkpoint_every=min(settings.train.checkpoint_every, settings.train.steps)
    )
    outputs = TrainOutputs(
        checkpoint_dir=out,
        log_path=out / METRICS_LOG,
        val_log_path=out / VAL_LOG if val_prepared else None,
        progress=progress,
    )
    validate = None
    if val_prepared:

        def validate(m):
            return validation_scores(m, val_prepared, settings)

    resume = True if resume else None
    result = train(model, batches, config, resume=resume, validate=validate, outputs=outputs)
    return model, result


def split_validation(subjects, names: Sequence[str] | None) -> tuple[list, list]:
    """(training subjects, validation subjects) by name; ConfigError for a name that is no
    subject (a typo must not silently validate on nothing) or when none would be left to
    train on."""
    subjects = list(subjects)
    if not names:
        return subjects, []
    known = {s.name for s in subjects}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(
            "val_subjects", f"{unknown} are not subjects of the data: {sorted(known)}"
        )
    train_s = [s for s in subjects if s.name not in names]
    if not train_s:
        raise ConfigError("val_subjects", f"{list(names)} leave no subject to train on")
    return train_s, [s for s in subjects if s.name in names]


def validation_scores(model, prepared, settings: RunSettings) -> dict:
    """Score ``model`` on held-out PreparedSubjects exactly as ``predict`` + ``evaluate``
    would: probabilities by :func:`predict_prepared` (the run's windows, inside the
    brain), then :func:`evaluate_volumes` with the run's threshold and minimum lesion
    size -> its pooled row (voxel scores, APR, lesion-wise scores, counts; numbers)
    plus ``"score"`` = the pooled DSC. ``prepared`` must hold at least one lesion voxel.
    """
    probs = {p.name: predict_prepared(model, p, settings) for p in prepared}
    rows, _ = evaluate_volumes(
        probs,
        {p.name: p.full_mask for p in prepared},
        settings.predict.threshold,
        settings.predict.min_lesion_size,
    )
    pooled = {k: v for k, v in rows[-1].items() if k != "subject"}
    return {"score": pooled["dsc"], **pooled}


def read_run_settings(run: str | Path) -> RunSettings:
    """A run folder's ``run.json`` (DataError naming the folder when it is none)."""
    run = Path(run)
    if not (run / RUN_SETTINGS).is_file():
        raise DataError(
            f"{run} is not a run folder (no {RUN_SETTINGS}); train one with `fasttversky train`"
        )
    return RunSettings.load(run / RUN_SETTINGS)


def load_run(run: str | Path, checkpoint: str = "last"):
    """A trained run folder -> (model on CPU in eval mode, RunSettings). ``checkpoint``:
    "last" (``last.pt``) or "best" (``best.pt``, the best validation score of a run
    trained with validation subjects)."""
    model, settings, _ = load_run_state(run, checkpoint)
    return model, settings


def load_run_state(run: str | Path, checkpoint: str = "last"):
    """:func:`load_run` -> (model, RunSettings, the checkpoint dict it was loaded from)."""
    from .training import load_checkpoint

    if checkpoint not in RUN_CHECKPOINTS:
        raise ConfigError(
            "checkpoint", f"must be one of {', '.join(RUN_CHECKPOINTS)}; got {checkpoint!r}"
        )
    run = Path(run)
    settings = read_run_settings(run)
    file = run / RUN_CHECKPOINTS[checkpoint]
    if not file.is_file():
        why = (
            "the run has not written a checkpoint"
            if checkpoint == "last"
            else "the run was trained without --val-subjects (or has not validated yet)"
        )
        raise DataError(f"{file} missing; {why}")
    advice = (
        "resume or train the run again, or predict with another run"
        if checkpoint == "last"
        else "predict with --weights last, or with another run"
    )
    state = load_checkpoint(file, advice=advice)  # CheckpointError (a DataError), one line
    model = build_model(settings)
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError, TypeError) as e:  # torch's text lists every key: not shown
        raise DataError(
            f"{file}: its weights do not fit the model {run / RUN_SETTINGS} describes "
            f"({type(e).__name__}); the run folder mixes two runs: train it again"
        ) from e
    model.eval()
    return model, settings, state


def predict_prepared(model, prepared, settings: RunSettings, device: str | None = None):
    """Foreground probability of a PreparedSubject on the file's grid, (X, Y, Z) float32
    (the probability of :func:`segment_prepared`, without thresholding)."""
    from .training.inference import lesion_probability

    device, precision = _inference_device(settings, device)
    prob = lesion_probability(
        model, prepared.image, settings.predict, prepared.brain, device=device, precision=precision
    )
    return prepared.to_file_grid(prob)


def segment_prepared(model, prepared, settings: RunSettings, device: str | None = None):
    """(probability, uint8 mask) of a PreparedSubject on the file's grid: the one
    inference path (:func:`fasttversky.app.training.inference.segment_volume`) with the
    run's settings. Voxels outside the brain are 0: lesions are inside the brain by
    definition, and the background is not something the network was trained to judge."""
    from .training.inference import segment_volume

    device, precision = _inference_device(settings, device)
    return segment_volume(
        model,
        prepared.image,
        settings.predict,
        prepared.brain,
        device=device,
        precision=precision,
        to_grid=prepared.to_file_grid,
    )


def _inference_device(settings: RunSettings, device: str | None) -> tuple[str, str]:
    """(device, precision) of inference: the run's device unless one is given; the run's
    precision on an accelerator, fp32 on the CPU."""
    device = device or settings.train.device
    return device, settings.train.precision if device != "cpu" else "fp32"


def mask_from_prob(prob: np.ndarray, config: PredictConfig) -> np.ndarray:
    """(X, Y, Z) probability -> uint8 lesion mask (the last step of the inference path,
    :func:`fasttversky.app.training.inference.lesion_mask`)."""
    from .training.inference import lesion_mask

    return lesion_mask(prob, config)


def predict_dataset(
    data: str | Path,
    run: str | Path | Sequence[str | Path],
    out: str | Path,
    *,
    window: Sequence[int] | None = None,
    threshold: float | None = None,
    device: str | None = None,
    progress: bool = True,
    checkpoint: str = "last",
    **predict_options,
) -> int:
    """Write ``out/<subject>/{prob,mask}.nii.gz`` for every subject of ``data`` with the
    model of ``run`` -> the number of subjects. ``run``: one run folder, or several
    (an ensemble: the mean of their probabilities, :mod:`fasttversky.app.ensemble`).
    ``window``: None = each run's setting, (0, 0, 0) = whole volume; ``checkpoint``:
    "last" or "best" (:func:`load_run`). Masks in ``data`` are not needed (nor read).
    ``out/inference.json`` records every setting and each run's checkpoint hash."""
    from .data import load_subject, save_volume
    from .ensemble import load_ensemble

    runs = [run] if isinstance(run, (str, os.PathLike)) else list(run)
    upd = {}
    if window is not None:
        upd["window"] = None if not any(window) else list(window)
    if threshold is not None:
        upd["threshold"] = threshold
    # weighting, mirror, min_lesion_size, overlap: None = each run's setting
    upd.update({k: v for k, v in predict_options.items() if v is not None})
    ensemble = load_ensemble(runs, checkpoint, upd)  # run.json checks before any volume
    subjects = find_dataset(data, ensemble.data, require_mask=False)
    # Every subject is read and checked before the first prediction is written; they
    # are read again one at a time below, so memory holds one volume, not the dataset.
    for s in subjects:
        load_subject(s)
    out = Path(out)  # written as given: the caller may pass a temporary folder and rename it
    out.mkdir(parents=True, exist_ok=True)
    for s in progress_bar(subjects, "predict", progress):
        prob, affine = ensemble.probability(s, device=device)
        mask = mask_from_prob(prob, ensemble.mask_config)
        save_volume(out / s.name / "prob.nii.gz", prob, affine)
        save_volume(out / s.name / "mask.nii.gz", mask, affine)
    # Every setting that made these files, beside them.
    (out / "inference.json").write_text(json.dumps(ensemble.record(), indent=1))
    return len(subjects)


# --------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------
def evaluate_volumes(
    probs: dict, targets: dict, threshold: float | None = None, min_lesion_size: int = 0
):
    """Per-subject and pooled metrics -> (rows, curves) with curves[name] = PRCurve;
    the last row is ``"pooled"``.

    Thresholded scores (DSC, sensitivity, specificity, F2) and the lesion-wise ones
    (``fasttversky.app.lesion_metrics``: lesion TPR/precision/F1 and counts) are those
    of the mask ``prob >= threshold`` with components below ``min_lesion_size`` voxels
    removed; APR and the curves use the probabilities. ``threshold``: None =
    :class:`~fasttversky.app.config.PredictConfig`'s.
    """
    from .lesion_metrics import lesion_metrics, pool_lesion_counts
    from .metrics import pooled_metrics, segmentation_metrics

    config = PredictConfig(min_lesion_size=min_lesion_size)
    if threshold is not None:
        check_threshold(threshold)
        config = replace(config, threshold=threshold)
    threshold = config.threshold
    masks = {k: mask_from_prob(v, config) for k, v in probs.items()}
    rows, curves = [], {}
    for name in probs:
        _, c = segmentation_metrics(probs[name], targets[name], threshold, return_curve=True)
        m = segmentation_metrics(masks[name].astype(np.float32), targets[name], 0.5)
        m["apr"] = c.average_precision
        rows.append({"subject": name, **m, **lesion_metrics(masks[name], targets[name])})
        curves[name] = c
    _, c = pooled_metrics(
        list(probs.values()), [targets[k] for k in probs], threshold, return_curve=True
    )
    m = pooled_metrics(
        [masks[k].astype(np.float32) for k in probs], [targets[k] for k in probs], 0.5
    )
    m["apr"] = c.average_precision
    rows.append({"subject": "pooled", **m, **pool_lesion_counts(rows)})
    curves["pooled"] = c
    return rows, curves


def evaluate_folder(
    pred: str | Path,
    data: str | Path,
    out: str | Path | None = None,
    *,
    config: DataConfig | None = None,
    threshold: float | None = None,
    min_lesion_size: int = 0,
) -> tuple[list[dict], dict[str, Path]]:
    """Score ``pred/<subject>/prob.nii.gz`` against the masks of ``data`` -> (rows,
    files): writes ``out/metrics.{md,csv}`` and ``out/pr_curve.png`` (out defaults to
    ``pred``; ``threshold``: None = :class:`~fasttversky.app.config.PredictConfig`'s)."""
    from .plots import plot_pr_curves

    threshold = PredictConfig().threshold if threshold is None else threshold
    check_threshold(threshold)
    config = config or DataConfig()
    pred_dir = Path(pred)
    if not pred_dir.is_dir():
        raise DataError(f"predictions folder {pred_dir} does not exist or is not a folder")
    truth = find_dataset(data, config)
    probs, targets = {}, {}
    for s in truth:
        f = pred_dir / s.name / "prob.nii.gz"
        if not f.exists():
            continue
        prob, _ = load_volume(f, kind="prob")
        tgt, _ = load_volume(s.mask, kind="mask")
        if prob.shape != tgt.shape:
            raise DataError(f"{f} has shape {prob.shape} but the mask {s.mask} has {tgt.shape}")
        probs[s.name], targets[s.name] = prob, tgt
    if not probs:
        raise DataError(f"no <subject>/prob.nii.gz in {pred_dir} matches a subject of {data}")
    rows, curves = evaluate_volumes(probs, targets, threshold, min_lesion_size)
    out = Path(out or pred_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = metric_table(rows)
    (out / "metrics.md").write_text(f"threshold {threshold}; values in %\n\n{text}\n")
    files = {
        "md": out / "metrics.md",
        "csv": write_metrics_csv(rows, out / "metrics.csv"),
        "png": plot_pr_curves(curves, out / "pr_curve.png", title="precision-recall, per subject"),
    }
    return rows, files


# --------------------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------------------
DEMO_FILES = ("data", "run", "metrics.md", "metrics.csv", "pr_curve.png", "overlay.png")


def check_fresh_folder(out: str | Path, force: bool, names: Sequence[str]) -> None:
    """ConfigError (option ``out``) when ``out`` holds anything, unless ``force``; with
    ``force``, removes only the entries in ``names`` (what the command writes)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError("out", f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise ConfigError(
                "out", f"{out} already exists and is not empty; pass --force to overwrite it"
            )
        for name in names:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()


def demo(
    out: str | Path,
    *,
    n: int = 6,
    steps: int | None = None,
    seed: int = 0,
    force: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Synthesise phantoms, train with the fused loss (α=0.3, β=0.7), predict the held-out
    third, evaluate and plot -> {"rows", "files", "seconds"}. ``out`` must be new or
    empty unless ``force``."""
    from .data import synth as synth_mod
    from .plots import plot_overlays, plot_pr_curves
    from .presets import PRESETS

    preset = PRESETS["quick"]
    if n < 2:
        raise ConfigError("n", f"must be >= 2 (one subject is held out), got {n}")
    train_cfg = replace(
        preset.run.train,
        alpha=0.3,
        beta=0.7,
        steps=preset.run.train.steps if steps is None else steps,
        seed=seed,
    )
    settings = replace(preset.run, train=train_cfg).validate()
    check_fresh_folder(out, force, DEMO_FILES)
    t0 = time.perf_counter()
    out = Path(out)
    data = out / "data"
    log(f"1/4 synthesising {n} lesion phantoms {preset.shape} in {data}")
    synth_mod.write_phantom_dataset(
        data,
        n_subjects=n,
        shape=preset.shape,
        seed=seed,
        lesion_fraction=preset.lesion_fraction,
        progress=lambda it: progress_bar(it, "synth", progress),
    )
    subjects = find_dataset(data, settings.data)
    n_test = max(1, len(subjects) // 3)
    train_s, test_s = subjects[:-n_test], subjects[-n_test:]
    log(
        f"2/4 training a 3D U-Net on {len(train_s)} subjects with the fused Tversky loss "
        f"(α=0.3, β=0.7), {settings.train.steps} steps"
    )
    model, _ = train_run(train_s, settings, out / "run", progress=progress)
    log(f"3/4 predicting {len(test_s)} held-out subjects")
    prepared = prepare_all(test_s, settings.data.target_shape, False, settings.data.normalisation)
    probs = {p.name: predict_prepared(model, p, settings) for p in prepared}
    targets = {p.name: p.full_mask for p in prepared}
    log(f"4/4 evaluating (threshold {settings.predict.threshold}, values in %)")
    rows, curves = evaluate_volumes(probs, targets, settings.predict.threshold)
    text = metric_table(rows)
    log(text)
    (out / "metrics.md").write_text(text + "\n")
    files = {"md": out / "metrics.md", "csv": write_metrics_csv(rows, out / "metrics.csv")}
    files["pr"] = plot_pr_curves(curves, out / "pr_curve.png", title="demo: held-out phantoms")
    show = max(prepared, key=lambda p: int(p.full_mask.sum()))
    channel, k = overlay_channel(settings.data.modalities)
    files["overlay"] = plot_overlays(
        show.to_file_grid(show.image[k]),
        show.full_mask,
        {"α=0.3, β=0.7": probs[show.name] >= settings.predict.threshold},
        out / "overlay.png",
        channel=channel,
        title=show.name,
    )
    return {"rows": rows, "files": files, "seconds": time.perf_counter() - t0}


def overlay_channel(modalities) -> tuple[str, int]:
    """The channel overlays show -> (name, index): FLAIR, where lesions are brightest,
    if there is one, else the first."""
    names = list(modalities)
    name = "FLAIR" if "FLAIR" in names else names[0]
    return name, names.index(name)
