"""The paper's experiment (Salehi et al. 2017): a cross-validated sweep over the Tversky
weights (α, β), written as Table 1 (``table.md``/``table.csv``), Fig. 2 (``pr_curves.png``
+ ``pr_curves.npz``), Figs. 3–4 (``overlay_*.png``), loss curves and ``results.json``.

* :func:`reproduce` — the whole experiment on a dataset folder or on phantoms of a
  preset (:mod:`fasttversky.app.presets`); what ``fasttversky reproduce`` calls.
* :func:`run_sweep` — train/predict every (α, β) × seed × fold, then
  :func:`write_table` and :func:`write_figures`; with several seeds each setting also
  gets mean ± sd and a bootstrap 95 % CI over seeds of its pooled scores, the scores of
  its seeds as one ensemble (mean probability), and every setting is compared with the
  Dice setting (or the first one): difference of the means with a bootstrap CI
  (:func:`compare_with_baseline`).
* :func:`transplant_augmenter` — adds real lesion masks transplanted into each fold's
  training brains to that fold's training set.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .config import (
    PAPER_SETTINGS,
    DataConfig,
    ExperimentConfig,
    RunSettings,
    check_threshold,
    field_default,
)
from .ensemble import mean_probability
from .errors import ConfigError
from .lesion_metrics import compare_means, summarize
from .pipeline import (
    evaluate_volumes,
    find_dataset,
    overlay_channel,
    predict_prepared,
    prepare_all,
    train_run,
    with_default_window,
)
from .report import COMPARED_KEYS, SEED_KEYS, progress_bar, write_table

__all__ = [
    "PAPER_SETTINGS",
    "SWEEP_FILES",
    "compare_with_baseline",
    "reproduce",
    "run_sweep",
    "setting_label",
    "transplant_augmenter",
    "write_figures",
    "write_table",
]

# What a sweep writes into its folder (besides the phantoms of `reproduce` in data/):
# the entries `reproduce --force` replaces (fasttversky.app.output_guard).
SWEEP_FILES = (
    "results.json",
    "table.md",
    "table.csv",
    "runs",
    "pr_curves.png",
    "pr_curves.npz",
    "overlay_*.png",
    "overlays.png",
    "loss_curves.png",
)


def setting_label(a: float, b: float, ce: float = 0.0) -> str:
    """The row/legend label of one (α, β) setting, with its cross-entropy weight if > 0."""
    return (
        f"α={a:g}, β={b:g}" + (" (Dice)" if a == b == 0.5 else "") + (f" + {ce:g}×CE" if ce else "")
    )


def setting_slug(a: float, b: float, ce: float = 0.0) -> str:
    """The file-name part of one (α, β) setting (and cross-entropy weight if > 0)."""
    return f"a{a:g}_b{b:g}" + (f"_ce{ce:g}" if ce else "")


def settings_with_ce(settings_list, ce_weight: float) -> list[tuple[float, float, float]]:
    """:class:`~fasttversky.app.config.ExperimentConfig`'s settings (float (α, β) or
    (α, β, ce_weight) tuples, checked there) -> (α, β, ce_weight) triples; a pair takes
    ``ce_weight`` (the run settings' own)."""
    return [tuple(t) if len(t) == 3 else (*t, ce_weight) for t in settings_list]


def _with_setting(base: RunSettings, a: float, b: float, ce: float) -> RunSettings:
    return replace(base, train=replace(base.train, alpha=a, beta=b, ce_weight=ce))


def transplant_augmenter(
    subjects,
    mask_dir: str | Path,
    n_per_fold: int,
    seed: int,
    target_shape,
    progress=True,
    contrast: str | None = None,
    normalisation=("zscore", 0),
) -> Callable:
    """augment(fold, train_set, test_set) -> extra training subjects: real lesion masks
    from ``mask_dir`` transplanted into the fold's training brains (in memory).

    Masks named like a test subject (``masks/patient19.nii.gz`` when patient19 is
    tested) are never used, so no test lesion reaches training in another brain.
    ``contrast``: a mode of :data:`~fasttversky.app.data.synth.TRANSPLANT_CONTRASTS`
    (None = ``DataConfig``'s default); ``normalisation``: ``DataConfig.normalisation``
    (the real subjects' own).
    """
    from .data.synth import lesion_mask_files, transplanted_subjects

    if contrast is None:
        contrast = field_default(DataConfig, "transplant_contrast")

    lesion_mask_files(mask_dir)  # a missing or empty folder fails here, before any fold
    by_name = {s.name: s for s in subjects}

    def augment(fold, train_set, test_set):
        return transplanted_subjects(
            [by_name[p.name] for p in train_set],
            mask_dir,
            exclude=[p.name for p in test_set],
            target_shape=target_shape,
            seed=(seed, fold),
            contrast=contrast,
            normalisation=normalisation,
            n=n_per_fold,
            progress=lambda it: progress_bar(it, f"transplant fold {fold + 1}", progress),
        )

    return augment


def folds_of(names: Sequence[str], folds: int) -> dict[str, int]:
    """Interleaved folds over the given (sorted) order: subject i -> fold i % folds."""
    return {n: i % folds for i, n in enumerate(names)}


def experiment_config(settings_list=None, folds=None, seeds=None) -> ExperimentConfig:
    """An :class:`~fasttversky.app.config.ExperimentConfig` of the parts given (None =
    its default: the paper's five settings, 2 folds, the run's seed)."""
    given = {"settings": settings_list, "folds": folds, "seeds": seeds}
    return ExperimentConfig(**{k: v for k, v in given.items() if v is not None})


@dataclass
class _SweepFigures:
    """What the figures of a sweep show, collected over its runs (the first seed's)."""

    curves: dict = field(default_factory=dict)  # setting label -> pooled PRCurve
    preds: dict = field(default_factory=dict)  # setting label -> {subject: mask}
    losses: dict = field(default_factory=dict)  # run tag -> losses per step


def run_sweep(
    subjects,
    base: RunSettings,
    out: str | Path,
    settings_list: Sequence[tuple[float, ...]] | None = None,
    folds: int | None = None,
    threshold: float | None = None,
    progress: bool = True,
    title: str = "",
    augment: Callable | None = None,
    seeds: Sequence[int] | None = None,
) -> dict:
    """Cross-validated sweep over (alpha, beta): table, PR figure, overlays -> summary dict
    (also written to ``out/results.json``). A setting is (alpha, beta) — trained with
    ``base.train.ce_weight`` — or (alpha, beta, ce_weight), so one sweep can compare the
    Tversky loss alone with Tversky + cross-entropy. ``settings_list``, ``folds``,
    ``seeds``: None = :class:`~fasttversky.app.config.ExperimentConfig`'s defaults (the
    paper's five settings, 2 folds); ``threshold``: None = ``base.predict.threshold``.

    Subjects are split into ``folds`` interleaved folds (sorted names, i::folds); every
    subject is predicted by the model that did not see it, and metrics are pooled over
    all subjects (plus per-subject DSC mean ± sd). ``augment(fold, train, test)``, if
    given, returns extra PreparedSubjects added to that fold's training set (drawn once:
    every seed trains on the same data).

    ``seeds``: training seeds (initialisation, patch sampling, augmentation) to repeat
    every setting with [default: ``base.train.seed`` only]. With several, a setting's
    scores are the mean over seeds of each seed's pooled scores, ``per_seed`` holds
    those, and ``over_seeds[key]`` their :func:`~fasttversky.app.lesion_metrics.summarize`
    (mean, sd, bootstrap 95 % CI); the PR curve and overlays are those of the first seed.
    ``ensemble`` holds the scores of the seeds' mean probability (:func:`_seed_ensemble`;
    Table 1 adds them as a second table).
    Every other setting then gets ``vs_baseline`` (:func:`compare_with_baseline`) and the
    table a second part with those differences.
    """
    exp = experiment_config(settings_list, folds, seeds)
    threshold = base.predict.threshold if threshold is None else threshold
    runs = _check_sweep(subjects, base, exp, threshold)
    seeds = exp.seeds or [base.train.seed]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    prepared = prepare_all(subjects, base.data.target_shape, progress, base.data.normalisation)
    fold_sets, extra = _fold_sets(prepared, exp.folds, augment)
    targets = {p.name: p.full_mask for p in prepared}
    figures = _SweepFigures()
    results = [
        _run_setting(setting, run, seeds, fold_sets, targets, threshold, out, progress, figures)
        for setting, run in runs
    ]
    compare_with_baseline(results)
    seconds = time.perf_counter() - t0
    header = _sweep_header(title, exp.folds, len(prepared), threshold, seeds, seconds)
    table = write_table(results, out, header)
    figs = _write_sweep_figures(results, figures, prepared, base, out, title)
    summary = {
        "title": title,
        "subjects": [p.name for p in prepared],
        "folds": exp.folds,
        "seeds": seeds,
        "augmented_training": {k: [p.name for p in v] for k, v in extra.items()},
        "threshold": threshold,
        "seconds": seconds,
        "settings": base.to_dict(),
        "results": results,
        "figures": [f.name for f in figs],
    }
    (out / "results.json").write_text(json.dumps(summary, indent=1, default=float))
    summary["table"] = header + table  # for printing; not part of results.json
    return summary


def _check_sweep(subjects, base: RunSettings, exp: ExperimentConfig, threshold: float):
    """Every check of a sweep, before any subject is read -> [((α, β, ce), RunSettings)]."""
    if len(subjects) < exp.folds:
        raise ConfigError(
            "folds",
            f"{exp.folds}-fold cross-validation needs >= {exp.folds} subjects, got {len(subjects)}",
        )
    check_threshold(threshold)
    if base.data.val_subjects:  # the folds hold subjects out here
        raise ConfigError("val_subjects", "is for `train`; cross-validation holds out by folds")
    settings = settings_with_ce(exp.settings, base.train.ce_weight)
    runs = [with_default_window(_with_setting(base, *t)) for t in settings]
    for s in runs:
        s.validate()  # every setting before the first training starts
    return list(zip(settings, runs, strict=True))


def _fold_sets(prepared, folds: int, augment: Callable | None):
    """-> ([(training set, test set) per fold], {fold: the extra training subjects})."""
    fold_of = folds_of([p.name for p in prepared], folds)
    sets, extra = [], {}
    for k in range(folds):
        tr = [p for p in prepared if fold_of[p.name] != k]
        te = [p for p in prepared if fold_of[p.name] == k]
        extra[k] = augment(k, tr, te) if augment is not None else []
        sets.append((tr + extra[k], te))
    return sets, extra


def _predict_folds(run, fold_sets, tag: str, run_dir, progress: bool, losses: dict) -> dict:
    """Train one model per fold and predict its test subjects -> {subject: probability}."""
    probs = {}
    for k, (train_set, test_set) in enumerate(fold_sets):
        if progress:
            print(
                f"[{tag}] fold {k + 1}/{len(fold_sets)}: train on {len(train_set)}, "
                f"test on {len(test_set)}",
                file=sys.stderr,
            )
        model, res = train_run(train_set, run, f"{run_dir}_fold{k}", progress=progress)
        losses[f"{tag} fold {k + 1}"] = res.losses
        for p in test_set:
            probs[p.name] = predict_prepared(model, p, run)
    return probs


def _run_setting(setting, s, seeds, fold_sets, targets, threshold, out, progress, figures):
    """Every seed and fold of one (α, β, ce) setting -> its result row (scores pooled per
    seed, then averaged over seeds); its first seed's curve and masks go to ``figures``."""
    a, b, ce = setting
    label = setting_label(a, b, ce)
    per_seed, per_subject, seed_probs = [], [], []
    for seed in seeds:
        run = replace(s, train=replace(s.train, seed=seed))
        tag = label + (f" seed {seed}" if len(seeds) > 1 else "")
        slug = setting_slug(a, b, ce) + (f"_seed{seed}" if len(seeds) > 1 else "")
        probs = _predict_folds(run, fold_sets, tag, out / "runs" / slug, progress, figures.losses)
        rows, c = evaluate_volumes(probs, targets, threshold, s.predict.min_lesion_size)
        per_seed.append({"seed": seed, **rows[-1]})
        per_subject += [{"seed": seed, **r} for r in rows[:-1]]
        seed_probs.append(probs)
        if seed == seeds[0]:
            figures.curves[label] = c["pooled"]
            figures.preds[label] = {n: (v >= threshold) for n, v in probs.items()}
    row = _result_row(setting, label, seeds, per_seed, per_subject)
    if len(seeds) > 1:
        row["ensemble"] = _seed_ensemble(seed_probs, targets, threshold, s.predict.min_lesion_size)
    return row


def _seed_ensemble(seed_probs: list[dict], targets, threshold, min_lesion_size) -> dict:
    """A setting's seeds as one model, as ``predict --model RUN_SEED0 RUN_SEED1 ...``
    would combine them: each subject's mean probability over the seeds' fold models,
    scored as one seed is -> the pooled row (counts, voxel and lesion-wise scores) with
    the per-subject DSC mean and sd. Costs no training and no prediction: the seeds'
    probabilities are already there."""
    probs = {n: mean_probability([p[n] for p in seed_probs]) for n in seed_probs[0]}
    rows, _ = evaluate_volumes(probs, targets, threshold, min_lesion_size)
    dscs = np.array([r["dsc"] for r in rows[:-1]], dtype=float)
    pooled = {k: v for k, v in rows[-1].items() if k != "subject"}
    return {**pooled, "dsc_mean": float(np.nanmean(dscs)), "dsc_sd": float(np.nanstd(dscs))}


def _result_row(setting, label: str, seeds, per_seed: list, per_subject: list) -> dict:
    """One setting's entry of ``results`` (see :func:`run_sweep`)."""
    a, b, ce = setting
    dscs = np.array([r["dsc"] for r in per_subject], dtype=float)
    counts = ("tp", "fp", "fn", "tn", "n_true", "n_detected", "n_pred")
    row = {
        "alpha": a,
        "beta": b,
        "ce_weight": ce,
        "label": label,
        "seeds": seeds,
        **{k: float(np.mean([r[k] for r in per_seed])) for k in SEED_KEYS},
        **{k: _mean_count([r[k] for r in per_seed]) for k in counts},
        "dsc_mean": float(np.nanmean(dscs)),
        "dsc_sd": float(np.nanstd(dscs)),
        "per_subject": per_subject,
        "per_seed": per_seed,
    }
    if len(seeds) > 1:
        row["over_seeds"] = {k: summarize([r[k] for r in per_seed]) for k in SEED_KEYS}
    return row


def _sweep_header(title: str, folds: int, n: int, threshold: float, seeds, seconds) -> str:
    """The text above Table 1: the protocol, the seeds and the sweep's time."""
    return (f"{title}\n\n" if title else "") + (
        f"{folds}-fold cross-validation over {n} subjects; metrics pooled over all "
        f"test voxels at threshold {threshold}, in %"
        + (
            f"; each the mean over seeds {seeds} of the pooled score"
            if len(seeds) > 1
            else f"; seed {seeds[0]}"
        )
        + f"; sweep time {seconds:.0f} s.\n\n"
    )


def _write_sweep_figures(results, figures: _SweepFigures, prepared, base, out, title):
    """:func:`write_figures` on the subject with the most lesion voxels (best overlay)."""
    show = max(prepared, key=lambda p: int(p.full_mask.sum()))
    channel, k = overlay_channel(base.data.modalities)
    return write_figures(
        results,
        figures.curves,
        figures.preds,
        figures.losses,
        show.to_file_grid(show.image[k]),
        show.full_mask,
        show.name,
        channel,
        out,
        title,
    )


def compare_with_baseline(results: list[dict]) -> str | None:
    """Adds ``vs_baseline`` to every result but the baseline's: for each of
    :data:`COMPARED_KEYS` the :func:`~fasttversky.app.lesion_metrics.compare_means` of its
    per-seed pooled scores against the baseline's (difference of the means, bootstrap
    95 % CI resampling each setting's seeds separately), plus ``"baseline"`` (its label).

    The baseline is Tversky with alpha = beta = 0.5 and no CE (the Dice loss the paper
    compares against) where the sweep has it, else the first setting. Nothing is added
    with one seed or one setting (no spread to compare) -> the baseline's label or None.
    The seeds are treated as independent per setting: pairing them would assume that a
    seed means the same run under two losses, which it does not after the first step.
    """
    if len(results) < 2 or len(results[0].get("per_seed", [])) < 2:
        return None
    dice = [
        r for r in results if (r["alpha"], r["beta"], r.get("ce_weight", 0.0)) == (0.5, 0.5, 0.0)
    ]
    base = dice[0] if dice else results[0]
    for r in results:
        if r is base:
            continue
        r["vs_baseline"] = {
            "baseline": base["label"],
            **{
                k: compare_means([x[k] for x in r["per_seed"]], [x[k] for x in base["per_seed"]])
                for k in COMPARED_KEYS
            },
        }
    return base["label"]


def _mean_count(values: list) -> int | float:
    """A count over seeds: itself for one seed, the mean for several."""
    return int(values[0]) if len(values) == 1 else float(np.mean(values))


def write_figures(
    results, curves, preds, losses, image, target, name, channel, out, title=""
) -> list[Path]:
    """Fig. 2 (``pr_curves.png`` and the curves in ``pr_curves.npz``, so the figure can
    be redrawn without retraining), Figs. 3–4 (one ``overlay_<setting>.png`` per setting
    and all in ``overlays.png``, on ``image`` = the ``channel`` of subject ``name``) and
    ``loss_curves.png`` -> the files written."""
    from .plots import plot_loss_curves, plot_overlays, plot_pr_curves

    out = Path(out)
    np.savez_compressed(
        out / "pr_curves.npz",
        **{
            f"{_slug(r)}_{key}": getattr(curves[r["label"]], key)
            for r in results
            for key in ("precision", "recall", "thresholds")
        },
    )
    short = title.split(";")[0] if title else "PR curves per (α, β)"
    figs = [plot_pr_curves(curves, out / "pr_curves.png", title=f"{short}: pooled test voxels")]
    for r in results:
        figs.append(
            plot_overlays(
                image,
                target,
                {r["label"]: preds[r["label"]][name]},
                out / f"overlay_{_slug(r)}.png",
                channel=channel,
                title=name,
            )
        )
    figs.append(
        plot_overlays(
            image,
            target,
            {k: v[name] for k, v in preds.items()},
            out / "overlays.png",
            channel=channel,
            title=name,
        )
    )
    figs.append(plot_loss_curves(losses, out / "loss_curves.png"))
    return figs


def _slug(result: dict) -> str:
    return setting_slug(result["alpha"], result["beta"], result.get("ce_weight", 0.0))


def environment_note(settings: RunSettings) -> str:
    """torch version, CPU, threads and device: quoted in every table's header."""
    import platform

    import torch

    return (
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, device {settings.train.device}"
    )


def reproduce(
    base: RunSettings,
    out: str | Path,
    *,
    preset_name: str,
    data: str | Path | None = None,
    n_subjects: int | None = None,
    settings_list: Sequence[tuple[float, ...]] | None = None,
    folds: int | None = None,
    threshold: float | None = None,
    transplant_masks: str | Path | None = None,
    transplant_n: int = 0,
    seeds: Sequence[int] | None = None,
    progress: bool = True,
) -> dict:
    """The experiment on ``data`` or, without it, on the preset's phantoms (synthesised
    into ``out/data`` unless already there) -> :func:`run_sweep`'s summary; ``seeds``
    repeats every setting with these training seeds, and the other parts default as in
    :func:`run_sweep`. Every option is checked before anything is written."""
    exp = experiment_config(settings_list, folds, seeds)
    if n_subjects is not None and n_subjects < exp.folds:
        raise ConfigError("n_subjects", f"must be >= --folds ({exp.folds}), got {n_subjects}")
    if transplant_n < 0:
        raise ConfigError("transplant_n", f"must be >= 0, got {transplant_n}")
    threshold = base.predict.threshold if threshold is None else threshold
    check_threshold(threshold)
    for t in settings_with_ce(exp.settings, base.train.ce_weight):
        _with_setting(base, *t).validate()
    data, title = _reproduce_data(base, Path(out), preset_name, data, n_subjects, progress)
    subjects = find_dataset(data, base.data)
    augment = None
    if transplant_masks and transplant_n:
        augment = transplant_augmenter(
            subjects,
            transplant_masks,
            transplant_n,
            base.train.seed,
            base.data.target_shape,
            progress,
            contrast=base.data.transplant_contrast,
            normalisation=base.data.normalisation,
        )
        title += f"; training folds + {transplant_n} transplanted real lesion masks"
    title += f"; {environment_note(base)}"
    return run_sweep(
        subjects,
        base,
        out,
        exp.settings,
        folds=exp.folds,
        threshold=threshold,
        progress=progress,
        title=title,
        augment=augment,
        seeds=exp.seeds,
    )


def _reproduce_data(base, out: Path, preset_name: str, data, n_subjects, progress):
    """-> (the dataset folder, the sweep's title): ``data``, or the preset's phantoms in
    ``out/data`` (synthesised unless a dataset is already there)."""
    from .data import synth as synth_mod
    from .presets import PRESETS

    if data:
        data = Path(data)
        return data, f"reproduce on {data.name} (preset {preset_name})"
    preset = PRESETS[preset_name]
    data = out / "data"
    if not any(data.glob("*/mask.nii.gz")):
        synth_mod.write_phantom_dataset(
            data,
            n_subjects=n_subjects or preset.n_subjects,
            shape=preset.shape,
            seed=base.train.seed,
            lesion_fraction=preset.lesion_fraction,
            progress=lambda it: progress_bar(it, "synth", progress),
        )
    return data, f"reproduce on phantoms (preset {preset_name})"
