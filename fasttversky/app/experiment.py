"""The paper's experiment (Salehi et al. 2017): a cross-validated sweep over the Tversky
weights (α, β), written as Table 1 (``table.md``/``table.csv``), Fig. 2 (``pr_curves.png``
+ ``pr_curves.npz``), Figs. 3–4 (``overlay_*.png``), loss curves and ``results.json``.

* :func:`reproduce` — the whole experiment on a dataset folder or on phantoms of a
  preset (:mod:`fasttversky.app.presets`); what ``fasttversky reproduce`` calls.
* :func:`run_sweep` — train/predict every (α, β) × fold, then :func:`write_table` and
  :func:`write_figures`.
* :func:`transplant_augmenter` — adds real lesion masks transplanted into each fold's
  training brains to that fold's training set.
"""

from __future__ import annotations

import csv
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from .config import RunSettings, check_threshold
from .errors import ConfigError, DataError
from .metrics import METRIC_NAMES
from .pipeline import (
    evaluate_volumes,
    find_dataset,
    markdown_table,
    overlay_channel,
    pct,
    predict_prepared,
    prepare_all,
    progress_bar,
    train_run,
    with_default_window,
)

__all__ = [
    "PAPER_SETTINGS",
    "reproduce",
    "run_sweep",
    "setting_label",
    "transplant_augmenter",
    "write_figures",
    "write_table",
]

# The paper's sweep (Table 1): (alpha, beta), alpha weighs false positives, beta false
# negatives; (0.5, 0.5) is the Dice loss.
PAPER_SETTINGS = ((0.5, 0.5), (0.4, 0.6), (0.3, 0.7), (0.2, 0.8), (0.1, 0.9))
TABLE_COLUMNS = ["Penalties", *METRIC_NAMES.values(), "DSC per subject"]


def setting_label(a: float, b: float) -> str:
    """The row/legend label of one (α, β) setting."""
    return f"α={a:g}, β={b:g}" + (" (Dice)" if a == b == 0.5 else "")


def setting_slug(a: float, b: float) -> str:
    """The file-name part of one (α, β) setting."""
    return f"a{a:g}_b{b:g}"


def transplant_augmenter(
    subjects,
    mask_dir: str | Path,
    n_per_fold: int,
    seed: int,
    target_shape,
    progress=True,
    contrast: str = "typical",
) -> Callable:
    """augment(fold, train_set, test_set) -> extra training subjects: real lesion masks
    from ``mask_dir`` transplanted into the fold's training brains (in memory).

    Masks named like a test subject (``masks/patient19.nii.gz`` when patient19 is
    tested) are never used, so no test lesion reaches training in another brain.
    ``contrast``: a mode of :data:`~fasttversky.app.data.synth.TRANSPLANT_CONTRASTS`.
    """
    from .data.synth import lesion_mask_files
    from .recipe import transplanted_subjects

    try:  # a missing or empty folder fails here, before any fold trains
        lesion_mask_files(mask_dir)
    except ValueError as e:
        raise DataError(str(e)) from None
    by_name = {s.name: s for s in subjects}

    def augment(fold, train_set, test_set):
        return transplanted_subjects(
            [by_name[p.name] for p in train_set],
            mask_dir,
            exclude=[p.name for p in test_set],
            target_shape=target_shape,
            seed=(seed, fold),
            contrast=contrast,
            n=n_per_fold,
            progress=lambda it: progress_bar(it, f"transplant fold {fold + 1}", progress),
        )

    return augment


def folds_of(names: Sequence[str], folds: int) -> dict[str, int]:
    """Interleaved folds over the given (sorted) order: subject i -> fold i % folds."""
    return {n: i % folds for i, n in enumerate(names)}


def run_sweep(
    subjects,
    base: RunSettings,
    out: str | Path,
    settings_list: Sequence[tuple[float, float]] = PAPER_SETTINGS,
    folds: int = 2,
    threshold: float = 0.5,
    progress: bool = True,
    title: str = "",
    augment: Callable | None = None,
) -> dict:
    """Cross-validated sweep over (alpha, beta): table, PR figure, overlays -> summary dict
    (also written to ``out/results.json``).

    Subjects are split into ``folds`` interleaved folds (sorted names, i::folds); every
    subject is predicted by the model that did not see it, and metrics are pooled over
    all subjects (plus per-subject DSC mean ± sd). ``augment(fold, train, test)``, if
    given, returns extra PreparedSubjects added to that fold's training set.
    """
    if folds < 2:
        raise ConfigError("folds", f"must be >= 2, got {folds}")
    if len(subjects) < folds:
        raise ConfigError(
            "folds", f"{folds}-fold cross-validation needs >= {folds} subjects, got {len(subjects)}"
        )
    check_threshold(threshold)
    if not settings_list:
        raise ConfigError("settings", "needs at least one (alpha, beta) pair")
    runs = [
        with_default_window(replace(base, train=replace(base.train, alpha=a, beta=b)))
        for a, b in settings_list
    ]
    for s in runs:
        s.validate()  # every setting before the first training starts
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    prepared = prepare_all(subjects, base.data.target_shape, progress)
    fold_of = folds_of([p.name for p in prepared], folds)
    extra = {}
    for k in range(folds):
        tr = [p for p in prepared if fold_of[p.name] != k]
        te = [p for p in prepared if fold_of[p.name] == k]
        extra[k] = augment(k, tr, te) if augment is not None else []
    results, curves, preds, losses = [], {}, {}, {}
    for (a, b), s in zip(settings_list, runs, strict=True):
        label = setting_label(a, b)
        probs = {}
        for k in range(folds):
            train_set = [p for p in prepared if fold_of[p.name] != k] + extra[k]
            test_set = [p for p in prepared if fold_of[p.name] == k]
            if progress:
                print(
                    f"[{label}] fold {k + 1}/{folds}: train on {len(train_set)}, "
                    f"test on {len(test_set)}",
                    file=sys.stderr,
                )
            model, res = train_run(
                train_set, s, out / "runs" / f"{setting_slug(a, b)}_fold{k}", progress=progress
            )
            losses[f"{label} fold {k + 1}"] = res.losses
            for p in test_set:
                probs[p.name] = predict_prepared(model, p, s)
        targets = {p.name: p.full_mask for p in prepared}
        rows, c = evaluate_volumes(probs, targets, threshold, s.predict.min_lesion_size)
        pooled = rows[-1]
        dscs = np.array([r["dsc"] for r in rows[:-1]], dtype=float)
        results.append(
            {
                "alpha": a,
                "beta": b,
                "label": label,
                **{k: pooled[k] for k in (*METRIC_NAMES, "tp", "fp", "fn", "tn")},
                **{k: pooled[k] for k in ("lesion_tpr", "lesion_precision", "lesion_f1")},
                "dsc_mean": float(np.nanmean(dscs)),
                "dsc_sd": float(np.nanstd(dscs)),
                "per_subject": rows[:-1],
            }
        )
        curves[label] = c["pooled"]
        preds[label] = {n: (v >= threshold) for n, v in probs.items()}
    seconds = time.perf_counter() - t0
    header = (f"{title}\n\n" if title else "") + (
        f"{folds}-fold cross-validation over {len(prepared)} subjects; metrics pooled over all "
        f"test voxels at threshold {threshold}, in %; sweep time {seconds:.0f} s.\n\n"
    )
    table = write_table(results, out, header)
    show = max(prepared, key=lambda p: int(p.full_mask.sum()))  # most lesions: best overlay
    channel, k = overlay_channel(base.data.modalities)
    figs = write_figures(
        results,
        curves,
        preds,
        losses,
        show.to_file_grid(show.image[k]),
        show.full_mask,
        show.name,
        channel,
        out,
        title,
    )
    summary = {
        "title": title,
        "subjects": [p.name for p in prepared],
        "folds": folds,
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


def write_table(results: list[dict], out: str | Path, header: str = "") -> str:
    """Table 1: ``out/table.md`` (values in %, with ``header`` above) and ``out/table.csv``
    (fractions and counts) from :func:`run_sweep`'s results -> the Markdown table."""
    out = Path(out)
    rows = [
        {
            "Penalties": r["label"],
            **{METRIC_NAMES[k]: pct(r[k]) for k in METRIC_NAMES},
            "DSC per subject": f"{100 * r['dsc_mean']:.2f} ± {100 * r['dsc_sd']:.2f}",
        }
        for r in results
    ]
    table = markdown_table(rows, TABLE_COLUMNS)
    (out / "table.md").write_text(header + table + "\n")
    with open(out / "table.csv", "w", newline="") as f:
        w = csv.writer(f)
        keys = [*METRIC_NAMES, "dsc_mean", "dsc_sd", "tp", "fp", "fn", "tn"]
        w.writerow(["alpha", "beta", *keys])
        for r in results:
            w.writerow([r["alpha"], r["beta"], *(r[k] for k in keys)])
    return table


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
            f"{setting_slug(r['alpha'], r['beta'])}_{key}": getattr(curves[r["label"]], key)
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
                out / f"overlay_{setting_slug(r['alpha'], r['beta'])}.png",
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
    settings_list: Sequence[tuple[float, float]] = PAPER_SETTINGS,
    folds: int = 2,
    threshold: float = 0.5,
    transplant_masks: str | Path | None = None,
    transplant_n: int = 0,
    progress: bool = True,
) -> dict:
    """The experiment on ``data`` or, without it, on the preset's phantoms (synthesised
    into ``out/data`` unless already there) -> :func:`run_sweep`'s summary."""
    from .data import synth as synth_mod
    from .presets import PRESETS

    preset = PRESETS[preset_name]
    if folds < 2:
        raise ConfigError("folds", f"must be >= 2, got {folds}")
    if n_subjects is not None and n_subjects < folds:
        raise ConfigError("n_subjects", f"must be >= --folds ({folds}), got {n_subjects}")
    if transplant_n < 0:
        raise ConfigError("transplant_n", f"must be >= 0, got {transplant_n}")
    check_threshold(threshold)
    for s in (replace(base, train=replace(base.train, alpha=a, beta=b)) for a, b in settings_list):
        s.validate()
    out = Path(out)
    if data:
        data = Path(data)
        title = f"reproduce on {data.name} (preset {preset_name})"
    else:
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
        title = f"reproduce on phantoms (preset {preset_name})"
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
        )
        title += f"; training folds + {transplant_n} transplanted real lesion masks"
    title += f"; {environment_note(base)}"
    return run_sweep(
        subjects,
        base,
        out,
        settings_list,
        folds=folds,
        threshold=threshold,
        progress=progress,
        title=title,
        augment=augment,
    )
