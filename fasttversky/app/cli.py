"""The ``fasttversky`` command line: synth, train, predict, evaluate, bench, reproduce, demo.

Run ``fasttversky <command> --help`` for each command's options. The model and the
training loop are imported inside the commands that need them, so ``--help``,
``synth`` and ``evaluate`` start fast and work without the training stack.

Folders the commands read and write:

* dataset: ``DATA/<subject>/{T1,T2,FLAIR,mask}.nii(.gz)`` (see fasttversky.app.data)
* run (``train --out RUN``): ``RUN/last.pt`` (checkpoint), ``RUN/run.json`` (model and
  data settings that ``predict`` needs), ``RUN/metrics.jsonl`` (loss per step)
* predictions (``predict --out PRED``): ``PRED/<subject>/{prob,mask}.nii.gz`` with the
  input's affine
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

# The paper's sweep (Salehi et al. 2017, Table 1): (alpha, beta), alpha weighs false
# positives, beta false negatives; (0.5, 0.5) is the Dice loss.
PAPER_SETTINGS = ((0.5, 0.5), (0.4, 0.6), (0.3, 0.7), (0.2, 0.8), (0.1, 0.9))
METRIC_NAMES = {
    "dsc": "DSC",
    "sensitivity": "Sensitivity",
    "specificity": "Specificity",
    "f2": "F2",
    "apr": "APR",
}


# --------------------------------------------------------------------------------------
# settings shared by train / reproduce / demo
# --------------------------------------------------------------------------------------
@dataclass
class RunSettings:
    """Model, data and optimisation settings of one training run (saved as run.json)."""

    modalities: dict = field(default_factory=lambda: {"T1": "t1", "T2": "t2", "FLAIR": "flair"})
    mask_pattern: str = "mask"
    target_shape: list | None = None
    patch_size: list | None = None
    lesion_prob: float = 0.5
    batch_size: int = 1
    base_features: int = 32
    levels: int = 4
    checkpoint: str = "all"
    norm: str = "none"
    steps: int = 2000
    lr: float = 1e-4
    lr_decay: float = 0.9
    lr_decay_every: int = 1000
    alpha: float = 0.3
    beta: float = 0.7
    gamma: float = 1.0
    backend: str = "auto"
    precision: str = "fp32"
    device: str = "cpu"
    seed: int = 0
    window: list | None = None  # sliding-window size for prediction; None = whole volume


@dataclass
class Preset:
    """A reproduce/demo configuration: phantom data + run settings."""

    n_subjects: int
    shape: tuple
    lesion_fraction: tuple
    run: RunSettings
    description: str


# Quick/tiny data: the upper half of the real lesion-load range (0.1–0.65 %) so that a
# few hundred CPU steps see enough lesion voxels; the full range is the synth default.
PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        4,
        (32, 40, 32),
        (2e-3, 6.5e-3),
        RunSettings(
            base_features=2,
            levels=2,
            checkpoint="none",
            steps=2,
            lr=1e-3,
            batch_size=1,
            patch_size=[16, 16, 16],
            lesion_prob=0.9,
        ),
        "seconds; for tests: 4 phantoms 32×40×32, 2-level U-Net with 2 features, 2 steps",
    ),
    # Instance norm and lr 3e-3 (not the paper's plain net at 1e-4): measured on these
    # phantoms, the plain 8-feature net collapses to all-background within ~10 steps at
    # lr 1e-3 or 3e-4, and lr 1e-4 learns nothing in a CPU budget.
    "quick": Preset(
        6,
        (64, 80, 64),
        (1e-3, 6.5e-3),
        RunSettings(
            base_features=8,
            levels=3,
            checkpoint="none",
            norm="instance",
            steps=100,
            lr=3e-3,
            lr_decay_every=1000,
            batch_size=2,
            patch_size=[32, 32, 32],
            lesion_prob=0.7,
        ),
        "≤ 20 min on a 2-core CPU: 6 phantoms 64×80×64 (2.8 mm voxels), 3-level U-Net "
        "with 8 features + instance norm, 32³ patches, 100 Adam steps (lr 3e-3) per fold",
    ),
    "gpu": Preset(
        20,
        (182, 218, 182),
        (1.2e-4, 6.5e-3),
        RunSettings(
            base_features=32,
            levels=4,
            checkpoint="all",
            steps=4000,
            lr=1e-4,
            lr_decay_every=1000,
            batch_size=1,
            target_shape=[160, 192, 160],
            patch_size=None,
            precision="bf16",
            device="cuda",
        ),
        "full-size volumes on a GPU: 20 MNI-sized phantoms, whole 160×192×160 volumes, "
        "the paper's 4-level U-Net (32 features) and schedule, bf16",
    ),
}


def _progress(iterable, desc: str, enable: bool = True, **kw):
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, disable=not enable, dynamic_ncols=True, **kw)


def _print_table(rows: list[dict], columns: Sequence[str], file=None) -> str:
    """Markdown table (also readable in a terminal)."""
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=False)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    for r in rows:
        lines.append(
            "| "
            + " | ".join(str(r.get(c, "")).ljust(w) for c, w in zip(columns, widths, strict=False))
            + " |"
        )
    text = "\n".join(lines)
    print(text, file=file or sys.stdout)
    return text


def _pct(v: float) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{100 * v:.2f}"


# --------------------------------------------------------------------------------------
# pipeline pieces (library-style functions the commands compose)
# --------------------------------------------------------------------------------------
def _find(data: str | Path, settings: RunSettings, require_mask: bool = True):
    from .data import find_subjects

    return find_subjects(
        data, settings.modalities, settings.mask_pattern, require_mask=require_mask
    )


def build_model(settings: RunSettings):
    from .models import UNet3D

    return UNet3D(
        in_channels=len(settings.modalities),
        num_classes=2,
        base_features=settings.base_features,
        levels=settings.levels,
        checkpoint=settings.checkpoint,
        norm=settings.norm,
    )


class _PaddedBatches:
    """Whole-volume batches zero-padded at the far end of each axis up to a multiple the
    U-Net can pool (e.g. the 182×218×182 MNI grid for 4 levels). Zero is background
    in both the z-scored image and the label, and predict() pads the same way."""

    def __init__(self, batches, multiple: int):
        self.batches, self.multiple = batches, multiple

    def __call__(self, i: int):
        import torch.nn.functional as F

        image, label = self.batches(i)
        pad = []
        for s in reversed(label.shape[1:]):
            pad += [0, -(-s // self.multiple) * self.multiple - s]
        if any(pad):
            image, label = F.pad(image, pad), F.pad(label, pad)
        return image, label


def train_run(
    subjects, settings: RunSettings, out: str | Path, *, resume=None, progress: bool = True
):
    """Train a U-Net on ``subjects`` (Subjects or PreparedSubjects) -> (model, TrainResult).

    Writes ``out/run.json``, ``out/last.pt`` and ``out/metrics.jsonl``.
    """
    import torch

    from .data import LesionDataset, RandomBatches
    from .training import TrainConfig, train

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(json.dumps(asdict(settings), indent=1))
    ds = LesionDataset(
        subjects,
        settings.target_shape,
        settings.patch_size,
        lesion_prob=settings.lesion_prob,
        seed=settings.seed,
    )
    batches = RandomBatches(ds, settings.batch_size, settings.seed)
    multiple = 2 ** (settings.levels - 1)  # the U-Net pools levels-1 times
    if settings.patch_size is not None:
        if any(int(p) % multiple for p in settings.patch_size):
            raise SystemExit(
                f"error: --patch-size {' '.join(map(str, settings.patch_size))} must be "
                f"divisible by 2**(levels-1) = {multiple} on every axis"
            )
    else:
        batches = _PaddedBatches(batches, multiple)
    torch.manual_seed(settings.seed)  # reproducible initialisation
    model = build_model(settings)
    config = TrainConfig(
        steps=settings.steps,
        lr=settings.lr,
        lr_decay=settings.lr_decay,
        lr_decay_every=settings.lr_decay_every,
        alpha=settings.alpha,
        beta=settings.beta,
        gamma=settings.gamma,
        backend=settings.backend,
        precision=settings.precision,
        seed=settings.seed,
        checkpoint_dir=out,
        checkpoint_every=max(1, min(500, settings.steps)),
        log_path=out / "metrics.jsonl",
        progress=progress,
        device=settings.device,
    )
    result = train(model, batches, config, resume=resume)
    return model, result


def load_run(run: str | Path):
    """A trained run folder -> (model on CPU in eval mode, RunSettings)."""
    from .training import load_checkpoint

    run = Path(run)
    if not (run / "run.json").is_file():
        raise SystemExit(
            f"error: {run} is not a run folder (no run.json); train one with `fasttversky train`"
        )
    settings = RunSettings(**json.loads((run / "run.json").read_text()))
    model = build_model(settings)
    if not (run / "last.pt").is_file():
        raise SystemExit(f"error: {run}/last.pt missing; the run has not written a checkpoint")
    ckpt = load_checkpoint(run)
    model.load_state_dict(ckpt["model"])
    model.eval()
    return model, settings


def predict_prepared(model, prepared, settings: RunSettings, device: str | None = None):
    """Foreground probability of a PreparedSubject on the file's grid, (X, Y, Z) float32.

    Voxels outside the brain are set to 0: lesions are inside the brain by definition,
    and the background is not something the network was trained to judge.
    """
    import torch

    from .training import predict

    prob = predict(
        model,
        torch.from_numpy(prepared.image),
        window=settings.window,
        precision=settings.precision if settings.device != "cpu" else "fp32",
        device=device or settings.device,
    )
    prob = prob.cpu().numpy().astype(np.float32) * prepared.brain
    return prepared.to_file_grid(prob)


def evaluate_volumes(probs: dict, targets: dict, threshold: float = 0.5):
    """Per-subject and pooled metrics -> (rows, curves) with curves[name] = PRCurve."""
    from .metrics import pooled_metrics, segmentation_metrics

    rows, curves = [], {}
    for name in probs:
        m, c = segmentation_metrics(probs[name], targets[name], threshold, return_curve=True)
        rows.append({"subject": name, **m})
        curves[name] = c
    m, c = pooled_metrics(
        list(probs.values()), [targets[k] for k in probs], threshold, return_curve=True
    )
    rows.append({"subject": "pooled", **m})
    curves["pooled"] = c
    return rows, curves


def _metric_rows_for_print(rows: list[dict]) -> list[dict]:
    return [
        {
            "subject": r["subject"],
            **{METRIC_NAMES[k]: _pct(r[k]) for k in METRIC_NAMES},
            "lesion voxels": r["tp"] + r["fn"],
        }
        for r in rows
    ]


# --------------------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------------------
def cmd_synth(args) -> int:
    from .data import synth

    t0 = time.perf_counter()
    if args.brains or args.lesion_masks:
        if not (args.brains and args.lesion_masks):
            raise SystemExit("error: transplant mode needs both --brains and --lesion-masks")
        stats = synth.write_transplant_dataset(
            args.out,
            args.brains,
            args.lesion_masks,
            n_subjects=args.n,
            seed=args.seed,
            progress=lambda it: _progress(it, "transplant", not args.quiet),
        )
    else:
        lf = args.lesion_fraction
        stats = synth.write_phantom_dataset(
            args.out,
            n_subjects=args.n or 4,
            shape=tuple(args.shape),
            seed=args.seed,
            progress=lambda it: _progress(it, "synth", not args.quiet),
            lesion_fraction=(lf[0] if lf and len(lf) == 1 else tuple(lf) if lf else None),
            skull_strip=not args.keep_skull,
            noise=args.noise,
            bias=args.bias,
        )
    fr = [s["lesion_fraction"] for s in stats]
    print(
        f"wrote {len(stats)} subjects to {args.out} in {time.perf_counter() - t0:.1f} s; "
        f"lesion fraction {100 * min(fr):.3f}–{100 * max(fr):.3f} % of voxels"
    )
    return 0


def _settings_from_args(args, base: RunSettings | None = None) -> RunSettings:
    s = base or RunSettings()
    upd = {}
    for name in ("target_shape", "patch_size", "window"):
        v = getattr(args, name, None)
        if v is not None:
            upd[name] = None if not any(v) else list(v)
    for name in (
        "lesion_prob",
        "batch_size",
        "base_features",
        "levels",
        "checkpoint",
        "norm",
        "steps",
        "lr",
        "lr_decay",
        "lr_decay_every",
        "alpha",
        "beta",
        "gamma",
        "backend",
        "precision",
        "device",
        "seed",
    ):
        v = getattr(args, name, None)
        if v is not None:
            upd[name] = v
    if getattr(args, "modality", None):
        upd["modalities"] = dict(m.split("=", 1) for m in args.modality)
    if getattr(args, "mask_pattern", None):
        upd["mask_pattern"] = args.mask_pattern
    return replace(s, **upd)


def cmd_train(args) -> int:
    settings = _settings_from_args(args)
    subjects = _find(args.data, settings)
    print(
        f"training on {len(subjects)} subjects from {args.data}: alpha={settings.alpha} "
        f"beta={settings.beta} gamma={settings.gamma}, {settings.steps} steps"
    )
    _, result = train_run(
        subjects, settings, args.out, resume=True if args.resume else None, progress=not args.quiet
    )
    last = f"{result.losses[-1]:.4f}" if result.losses else "n/a"
    print(
        f"done: step {result.step}, last loss {last}, {result.seconds:.1f} s, "
        f"checkpoint {result.checkpoint}"
    )
    return 0


def cmd_predict(args) -> int:
    from .data import prepare_subject, save_volume

    model, settings = load_run(args.model)
    if args.window is not None:
        settings.window = None if not any(args.window) else list(args.window)
    subjects = _find(args.data, settings, require_mask=False)
    out = Path(args.out)
    for s in _progress(subjects, "predict", not args.quiet):
        p = prepare_subject(s, settings.target_shape)
        prob = predict_prepared(model, p, settings, device=args.device)
        save_volume(out / s.name / "prob.nii.gz", prob, p.affine)
        save_volume(
            out / s.name / "mask.nii.gz", (prob >= args.threshold).astype(np.uint8), p.affine
        )
    print(f"wrote probability maps and masks of {len(subjects)} subjects to {out}")
    return 0


def _write_metrics(rows: list[dict], out: Path, stem: str = "metrics") -> None:
    out.mkdir(parents=True, exist_ok=True)
    keys = ["subject", *METRIC_NAMES, "tp", "fp", "fn", "tn"]
    with open(out / f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def cmd_evaluate(args) -> int:
    from .data import find_subjects, load_volume
    from .plots import plot_pr_curves

    modalities = dict(m.split("=", 1) for m in args.modality) if args.modality else None
    truth = {
        s.name: s
        for s in find_subjects(args.data, modalities=modalities, mask_pattern=args.mask_pattern)
    }
    pred_dir = Path(args.pred)
    probs, targets = {}, {}
    for name, s in truth.items():
        f = pred_dir / name / "prob.nii.gz"
        if not f.exists():
            continue
        prob, _ = load_volume(f, kind="prob")
        tgt, _ = load_volume(s.mask, kind="mask")
        if prob.shape != tgt.shape:
            raise SystemExit(f"error: {f} has shape {prob.shape}, mask {s.mask} {tgt.shape}")
        probs[name], targets[name] = prob, tgt
    if not probs:
        raise SystemExit(
            f"error: no <subject>/prob.nii.gz in {pred_dir} matches a subject of {args.data}"
        )
    rows, curves = evaluate_volumes(probs, targets, args.threshold)
    out = Path(args.out or pred_dir)
    text = _print_table(
        _metric_rows_for_print(rows), ["subject", *METRIC_NAMES.values(), "lesion voxels"]
    )
    (out / "metrics.md").parent.mkdir(parents=True, exist_ok=True)
    (out / "metrics.md").write_text(f"threshold {args.threshold}; values in %\n\n{text}\n")
    _write_metrics(rows, out)
    png = plot_pr_curves(curves, out / "pr_curve.png", title="precision-recall, per subject")
    print(f"wrote {out / 'metrics.csv'}, {out / 'metrics.md'} and {png}")
    return 0


def _find_bench_report() -> Path | None:
    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
        f = root / "bench" / "report.py"
        if f.is_file():
            return f
    return None


def cmd_bench(args) -> int:
    """Thin wrapper: bench/report.py (pytest-benchmark matrix + Markdown report) owns the
    benchmark; this only finds it and passes the arguments on."""
    import importlib.util

    report = _find_bench_report()
    if report is None:
        raise SystemExit(
            "error: bench/report.py not found; run `fasttversky bench` from a "
            "source checkout of fasttversky"
        )
    spec = importlib.util.spec_from_file_location("fasttversky_bench_report", report)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return int(module.main(list(args.report_args)) or 0)


# --------------------------------------------------------------------------------------
# reproduce: the paper's (alpha, beta) sweep with two-fold cross-validation
# --------------------------------------------------------------------------------------
def _setting_label(a: float, b: float) -> str:
    return f"α={a:g}, β={b:g}" + (" (Dice)" if a == b == 0.5 else "")


def _setting_slug(a: float, b: float) -> str:
    return f"a{a:g}_b{b:g}"


def transplant_augmenter(
    subjects, mask_dir: str | Path, n_per_fold: int, seed: int, target_shape, progress: bool = True
):
    """augment(fold, train_set, test_set) -> extra training subjects: real lesion masks
    from ``mask_dir`` transplanted into the fold's training brains (in memory).

    Masks named like a test subject (``masks/patient19.nii.gz`` when patient19 is
    tested) are never used, so no test lesion reaches training in another brain.
    """
    from .data import load_subject, load_volume, prepare_arrays
    from .data.synth import transplant

    by_name = {s.name: s for s in subjects}
    files = sorted(
        p for p in Path(mask_dir).iterdir() if p.name.lower().endswith((".nii", ".nii.gz"))
    )

    def augment(fold, train_set, test_set):
        banned = {p.name for p in test_set} | {p.name for p in train_set}
        usable = [f for f in files if f.name.split(".")[0] not in banned]
        rng = np.random.default_rng((seed, fold))
        picks = rng.choice(len(usable), size=min(n_per_fold, len(usable)), replace=False)
        extra = []
        for j, k in enumerate(_progress(picks, f"transplant fold {fold + 1}", progress)):
            brain = train_set[j % len(train_set)]
            img, own, aff = load_subject(by_name[brain.name])
            lm, _ = load_volume(usable[k], kind="mask")
            imgs, mask = transplant(
                dict(zip(by_name[brain.name].modalities, img, strict=False)),
                own,
                lm,
                np.random.default_rng((seed, fold, j)),
            )
            extra.append(
                prepare_arrays(
                    f"{brain.name}+{usable[k].name.split('.')[0]}",
                    np.stack(list(imgs.values())),
                    mask,
                    aff,
                    target_shape,
                )
            )
        return extra

    return augment


def run_sweep(
    subjects,
    base: RunSettings,
    out: str | Path,
    settings_list=PAPER_SETTINGS,
    folds: int = 2,
    threshold: float = 0.5,
    progress: bool = True,
    title: str = "",
    augment=None,
) -> dict:
    """Cross-validated sweep over (alpha, beta): table, PR figure, overlays -> summary dict.

    Subjects are split into ``folds`` interleaved folds (sorted names, i::folds); every
    subject is predicted by the model that did not see it, and metrics are pooled over
    all subjects (plus per-subject DSC mean ± sd). ``augment(fold, train, test)``, if
    given, returns extra PreparedSubjects added to that fold's training set.
    """
    from .data import prepare_subject
    from .plots import plot_loss_curves, plot_overlays, plot_pr_curves

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if len(subjects) < folds:
        raise SystemExit(
            f"error: {folds}-fold cross-validation needs >= {folds} subjects, got {len(subjects)}"
        )
    t0 = time.perf_counter()
    prepared = [
        prepare_subject(s, base.target_shape) for s in _progress(subjects, "load", progress)
    ]
    fold_of = {p.name: i % folds for i, p in enumerate(prepared)}
    extra = {}
    for k in range(folds):
        tr = [p for p in prepared if fold_of[p.name] != k]
        te = [p for p in prepared if fold_of[p.name] == k]
        extra[k] = augment(k, tr, te) if augment is not None else []
    results, curves, preds, losses = [], {}, {}, {}
    for a, b in settings_list:
        label = _setting_label(a, b)
        probs = {}
        for k in range(folds):
            train_set = [p for p in prepared if fold_of[p.name] != k] + extra[k]
            test_set = [p for p in prepared if fold_of[p.name] == k]
            s = replace(base, alpha=a, beta=b)
            if progress:
                print(
                    f"[{label}] fold {k + 1}/{folds}: train on {len(train_set)}, "
                    f"test on {len(test_set)}",
                    file=sys.stderr,
                )
            model, res = train_run(
                train_set, s, out / "runs" / f"{_setting_slug(a, b)}_fold{k}", progress=progress
            )
            losses[f"{label} fold {k + 1}"] = res.losses
            for p in test_set:
                probs[p.name] = predict_prepared(model, p, s)
        targets = {p.name: p.full_mask for p in prepared}
        rows, c = evaluate_volumes(probs, targets, threshold)
        pooled = rows[-1]
        dscs = np.array([r["dsc"] for r in rows[:-1]], dtype=float)
        results.append(
            {
                "alpha": a,
                "beta": b,
                "label": label,
                **{k: pooled[k] for k in (*METRIC_NAMES, "tp", "fp", "fn", "tn")},
                "dsc_mean": float(np.nanmean(dscs)),
                "dsc_sd": float(np.nanstd(dscs)),
                "per_subject": rows[:-1],
            }
        )
        curves[label] = c["pooled"]
        preds[label] = {n: (v >= threshold) for n, v in probs.items()}
    seconds = time.perf_counter() - t0

    # Table 1
    table_rows = [
        {
            "Penalties": r["label"],
            **{METRIC_NAMES[k]: _pct(r[k]) for k in METRIC_NAMES},
            "DSC per subject": f"{100 * r['dsc_mean']:.2f} ± {100 * r['dsc_sd']:.2f}",
        }
        for r in results
    ]
    print()
    table = _print_table(table_rows, ["Penalties", *METRIC_NAMES.values(), "DSC per subject"])
    header = (f"{title}\n\n" if title else "") + (
        f"{folds}-fold cross-validation over {len(prepared)} subjects; metrics pooled over all "
        f"test voxels at threshold {threshold}, in %; sweep time {seconds:.0f} s.\n\n"
    )
    (out / "table.md").write_text(header + table + "\n")
    with open(out / "table.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["alpha", "beta", *METRIC_NAMES, "dsc_mean", "dsc_sd", "tp", "fp", "fn", "tn"])
        for r in results:
            w.writerow(
                [
                    r["alpha"],
                    r["beta"],
                    *(r[k] for k in METRIC_NAMES),
                    r["dsc_mean"],
                    r["dsc_sd"],
                    r["tp"],
                    r["fp"],
                    r["fn"],
                    r["tn"],
                ]
            )
    # Fig. 2, Figs. 3-4
    # The curves themselves, so the figure can be redrawn without retraining.
    np.savez_compressed(
        out / "pr_curves.npz",
        **{
            f"{_setting_slug(r['alpha'], r['beta'])}_{key}": getattr(curves[r["label"]], key)
            for r in results
            for key in ("precision", "recall", "thresholds")
        },
    )
    short = title.split(";")[0] if title else "PR curves per (α, β)"
    figs = [plot_pr_curves(curves, out / "pr_curves.png", title=f"{short}: pooled test voxels")]
    show = max(prepared, key=lambda p: int(p.full_mask.sum()))  # most lesions: best overlay
    flair = list(base.modalities).index("FLAIR") if "FLAIR" in base.modalities else 0
    img = show.to_file_grid(show.image[flair])
    for label, pr in preds.items():
        a, b = next((r["alpha"], r["beta"]) for r in results if r["label"] == label)
        figs.append(
            plot_overlays(
                img,
                show.full_mask,
                {label: pr[show.name]},
                out / f"overlay_{_setting_slug(a, b)}.png",
                title=show.name,
            )
        )
    figs.append(
        plot_overlays(
            img,
            show.full_mask,
            {k: v[show.name] for k, v in preds.items()},
            out / "overlays.png",
            title=show.name,
        )
    )
    figs.append(plot_loss_curves(losses, out / "loss_curves.png"))
    summary = {
        "title": title,
        "subjects": [p.name for p in prepared],
        "folds": folds,
        "augmented_training": {k: [p.name for p in v] for k, v in extra.items()},
        "threshold": threshold,
        "seconds": seconds,
        "settings": asdict(base),
        "results": results,
        "figures": [str(f.name) for f in figs],
    }
    (out / "results.json").write_text(json.dumps(summary, indent=1, default=float))
    print(f"\nwrote {out / 'table.md'}, {out / 'pr_curves.png'} and overlays in {seconds:.0f} s")
    return summary


def _environment_note(settings: RunSettings) -> str:
    import platform

    import torch

    return (
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, device {settings.device}"
    )


def cmd_reproduce(args) -> int:
    from .data import synth

    preset = PRESETS[args.preset]
    base = _settings_from_args(args, preset.run)
    settings_list = PAPER_SETTINGS
    if args.settings:
        settings_list = tuple(tuple(float(v) for v in s.split(",")) for s in args.settings)
    out = Path(args.out)
    if args.data:
        data = Path(args.data)
        title = f"reproduce on {data.name} (preset {args.preset})"
    else:
        data = out / "data"
        if not any(data.glob("*/mask.nii.gz")):
            synth.write_phantom_dataset(
                data,
                n_subjects=args.n_subjects or preset.n_subjects,
                shape=preset.shape,
                seed=base.seed,
                lesion_fraction=preset.lesion_fraction,
                progress=lambda it: _progress(it, "synth", not args.quiet),
            )
        title = f"reproduce on phantoms (preset {args.preset})"
    subjects = _find(data, base)
    augment = None
    if args.transplant_masks and args.transplant_n:
        augment = transplant_augmenter(
            subjects,
            args.transplant_masks,
            args.transplant_n,
            base.seed,
            base.target_shape,
            not args.quiet,
        )
        title += f"; training folds + {args.transplant_n} transplanted real lesion masks"
    title += f"; {_environment_note(base)}"
    run_sweep(
        subjects,
        base,
        out,
        settings_list,
        folds=args.folds,
        threshold=args.threshold,
        progress=not args.quiet,
        title=title,
        augment=augment,
    )
    return 0


def cmd_demo(args) -> int:
    """Synthesise, train with the fused loss, evaluate, plot — a few minutes on a CPU."""
    from .data import find_subjects, prepare_subject, synth
    from .plots import plot_overlays, plot_pr_curves

    t0 = time.perf_counter()
    out = Path(args.out)
    preset = PRESETS["quick"]
    settings = replace(preset.run, alpha=0.3, beta=0.7, steps=args.steps, seed=args.seed)
    data = out / "data"
    print(f"1/4 synthesising {args.n} lesion phantoms {preset.shape} in {data}")
    synth.write_phantom_dataset(
        data,
        n_subjects=args.n,
        shape=preset.shape,
        seed=args.seed,
        lesion_fraction=preset.lesion_fraction,
        progress=lambda it: _progress(it, "synth", not args.quiet),
    )
    subjects = find_subjects(data)
    n_test = max(1, len(subjects) // 3)
    train_s, test_s = subjects[:-n_test], subjects[-n_test:]
    print(
        f"2/4 training a 3D U-Net on {len(train_s)} subjects with the fused Tversky loss "
        f"(α=0.3, β=0.7), {settings.steps} steps"
    )
    model, res = train_run(train_s, settings, out / "run", progress=not args.quiet)
    print(f"3/4 predicting {len(test_s)} held-out subjects")
    prepared = [prepare_subject(s, settings.target_shape) for s in test_s]
    probs = {p.name: predict_prepared(model, p, settings) for p in prepared}
    targets = {p.name: p.full_mask for p in prepared}
    print("4/4 evaluating (threshold 0.5, values in %)")
    rows, curves = evaluate_volumes(probs, targets)
    text = _print_table(
        _metric_rows_for_print(rows), ["subject", *METRIC_NAMES.values(), "lesion voxels"]
    )
    (out / "metrics.md").write_text(text + "\n")
    _write_metrics(rows, out)
    plot_pr_curves(curves, out / "pr_curve.png", title="demo: held-out phantoms")
    show = max(prepared, key=lambda p: int(p.full_mask.sum()))
    plot_overlays(
        show.to_file_grid(show.image[2]),
        show.full_mask,
        {"α=0.3, β=0.7": probs[show.name] >= 0.5},
        out / "overlay.png",
        title=show.name,
    )
    print(
        f"done in {time.perf_counter() - t0:.0f} s: {out / 'metrics.md'}, "
        f"{out / 'pr_curve.png'}, {out / 'overlay.png'}"
    )
    return 0


# --------------------------------------------------------------------------------------
# argument parsing
# --------------------------------------------------------------------------------------
class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def _add_data_options(p) -> None:
    p.add_argument(
        "--modality",
        action="append",
        metavar="NAME=PATTERN",
        help="image channel and its case-insensitive file-name pattern (shell "
        "style, without .nii/.nii.gz); repeat per channel, in order "
        "[default: T1=t1 T2=t2 FLAIR=flair]",
    )
    p.add_argument("--mask-pattern", default=None, help="lesion mask file pattern [mask]")
    p.add_argument(
        "--target-shape",
        type=int,
        nargs=3,
        metavar=("D", "H", "W"),
        help="crop/pad every volume to this shape around the brain (paper: "
        "128 224 256); 0 0 0 = keep the file grid",
    )


def _add_train_options(p, defaults: RunSettings) -> None:
    _add_data_options(p)
    g = p.add_argument_group("loss")
    g.add_argument("--alpha", type=float, help=f"false-positive weight [{defaults.alpha}]")
    g.add_argument("--beta", type=float, help=f"false-negative weight [{defaults.beta}]")
    g.add_argument("--gamma", type=float, help=f"focal exponent, 1 = Tversky [{defaults.gamma}]")
    g.add_argument(
        "--backend",
        choices=["auto", "cpu", "torch", "triton", "cuda"],
        help=f"loss backend [{defaults.backend}]",
    )
    g = p.add_argument_group("model")
    g.add_argument("--base-features", type=int, help=f"[{defaults.base_features}]")
    g.add_argument("--levels", type=int, help=f"U-Net levels [{defaults.levels}]")
    g.add_argument(
        "--checkpoint",
        choices=["none", "top", "all"],
        help=f"activation checkpointing [{defaults.checkpoint}]",
    )
    g.add_argument("--norm", choices=["none", "batch", "instance"], help=f"[{defaults.norm}]")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, help=f"optimiser steps [{defaults.steps}]")
    g.add_argument("--batch-size", type=int, help=f"[{defaults.batch_size}]")
    g.add_argument(
        "--patch-size",
        type=int,
        nargs=3,
        metavar=("D", "H", "W"),
        help="random patches of this size; 0 0 0 = whole volumes [whole volumes]",
    )
    g.add_argument(
        "--lesion-prob",
        type=float,
        help=f"fraction of patches centred on a lesion [{defaults.lesion_prob}]",
    )
    g.add_argument("--lr", type=float, help=f"Adam learning rate [{defaults.lr}]")
    g.add_argument("--lr-decay", type=float, help=f"[{defaults.lr_decay}]")
    g.add_argument("--lr-decay-every", type=int, help=f"[{defaults.lr_decay_every}]")
    g.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help=f"[{defaults.precision}]")
    g.add_argument("--device", help=f"cpu, cuda, cuda:1, ... [{defaults.device}]")
    g.add_argument("--seed", type=int, help=f"[{defaults.seed}]")
    g.add_argument(
        "--window",
        type=int,
        nargs=3,
        metavar=("D", "H", "W"),
        help="sliding-window size for prediction; 0 0 0 = whole volume",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fasttversky",
        formatter_class=_Formatter,
        description="Tversky-loss 3D lesion segmentation (Salehi et al. 2017): synthesise "
        "data, train, predict, evaluate, benchmark and reproduce the paper.",
        epilog="Start with `fasttversky demo` (a few minutes on a CPU, no download).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser(
        "synth",
        parents=[common],
        formatter_class=_Formatter,
        help="write a dataset of lesion phantoms (or transplanted real lesions)",
        description="Write OUT/subjectNN/{T1,T2,FLAIR,mask}.nii.gz: procedural "
        "brains with MS-like white-matter lesions, or with --brains and "
        "--lesion-masks real lesion masks transplanted into real brains.",
    )
    p.add_argument("out", help="output dataset folder")
    p.add_argument(
        "--n",
        type=int,
        default=None,
        help="number of subjects (phantoms: 4; transplant: one per lesion mask)",
    )
    p.add_argument(
        "--shape",
        type=int,
        nargs=3,
        default=[96, 112, 96],
        metavar=("X", "Y", "Z"),
        help="phantom grid; the head fills an MNI-sized 182×218×182 mm box",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--lesion-fraction",
        type=float,
        nargs="+",
        metavar="F",
        help="lesion voxels / all voxels, or LOW HIGH for a log-uniform range "
        "[1.2e-4 6.5e-3, i.e. 0.012–0.65 %%]",
    )
    p.add_argument("--noise", type=float, default=0.03, help="Rician noise / WM intensity")
    p.add_argument("--bias", type=float, default=0.12, help="bias-field amplitude (log)")
    p.add_argument("--keep-skull", action="store_true", help="keep scalp and skull")
    p.add_argument("--brains", help="transplant mode: dataset folder of real brains")
    p.add_argument("--lesion-masks", help="transplant mode: folder of lesion-mask NIfTI files")
    p.set_defaults(func=cmd_synth)

    d = RunSettings()
    p = sub.add_parser(
        "train",
        parents=[common],
        formatter_class=_Formatter,
        help="train a 3D U-Net",
        description="Train the 3D U-Net with the fused Tversky loss on a "
        "dataset folder; writes OUT/last.pt, OUT/run.json, OUT/metrics.jsonl.",
    )
    p.add_argument("data", help="dataset folder (one sub-folder per subject)")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    _add_train_options(p, d)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "predict",
        parents=[common],
        formatter_class=_Formatter,
        help="probability maps and masks for a dataset",
        description="Write OUT/<subject>/prob.nii.gz (float32 lesion "
        "probability) and mask.nii.gz (prob >= threshold) on each input's "
        "grid and affine. Masks in the input are not needed.",
    )
    p.add_argument("data", help="dataset folder")
    p.add_argument("--model", required=True, help="run folder written by `train`")
    p.add_argument("--out", required=True, help="predictions folder")
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument(
        "--window",
        type=int,
        nargs=3,
        metavar=("D", "H", "W"),
        help="sliding-window size; 0 0 0 = whole volume [the run's setting]",
    )
    p.add_argument("--device", default=None, help="[the run's device]")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser(
        "evaluate",
        parents=[common],
        formatter_class=_Formatter,
        help="metrics table and PR-curve plot",
        description="DSC, sensitivity, specificity, F2 and APR per subject and "
        "pooled, written to OUT/metrics.{md,csv} with OUT/pr_curve.png.",
    )
    p.add_argument("pred", help="predictions folder (PRED/<subject>/prob.nii.gz)")
    p.add_argument("--data", required=True, help="dataset folder with the true masks")
    p.add_argument("--mask-pattern", default="mask")
    p.add_argument(
        "--modality",
        action="append",
        metavar="NAME=PATTERN",
        help="image file patterns used to recognise subject folders, as given to train",
    )
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--out", default=None, help="output folder [PRED]")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "bench",
        formatter_class=_Formatter,
        help="the loss benchmark report",
        description="Run the loss benchmark matrix (bench/report.py: "
        "pytest-benchmark over bench/bench_loss.py) and write the Markdown "
        "report + JSON. Every other argument goes to bench/report.py: --out "
        "FILE.md, --quick (smaller shapes), --device cpu|cuda, --providers "
        "a,b, -k EXPR, --from-json FILE.",
    )
    p.add_argument("report_args", nargs=argparse.REMAINDER, help="bench/report.py arguments")
    p.set_defaults(func=cmd_bench)

    presets = "\n".join(f"  {k}: {v.description}" for k, v in PRESETS.items())
    p = sub.add_parser(
        "reproduce",
        parents=[common],
        formatter_class=_Formatter,
        help="the paper's (α, β) sweep: Table 1, Fig. 2, overlays",
        description="Train and test with two-fold cross-validation for "
        "(α, β) ∈ {(.5,.5), (.4,.6), (.3,.7), (.2,.8), (.1,.9)}; write "
        "table.md/csv, pr_curves.png (Fig. 2), overlay_*.png (Figs. 3–4).\n\n"
        "presets:\n" + presets,
    )
    p.add_argument("--preset", choices=list(PRESETS), default="quick")
    p.add_argument("--data", help="dataset folder (default: synthesise phantoms in OUT/data)")
    p.add_argument("--out", default="reproduce_out", help="output folder")
    p.add_argument("--n-subjects", type=int, help="phantoms to synthesise [preset]")
    p.add_argument("--folds", type=int, default=2)
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument(
        "--transplant-masks",
        metavar="DIR",
        help="add real lesion masks from DIR, transplanted into each fold's "
        "training brains, to the training set (e.g. open_ms_data/masks)",
    )
    p.add_argument(
        "--transplant-n", type=int, default=0, help="transplanted training subjects per fold"
    )
    p.add_argument(
        "--settings",
        nargs="+",
        metavar="A,B",
        help="(α, β) pairs instead of the paper's five, e.g. 0.5,0.5 0.3,0.7",
    )
    _add_train_options(p, RunSettings())
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser(
        "demo",
        parents=[common],
        formatter_class=_Formatter,
        help="phantoms -> train -> evaluate -> plots, in minutes on a CPU",
        description="Synthesise small lesion phantoms, train a 3D U-Net "
        "briefly with the fused Tversky loss (α=0.3, β=0.7), evaluate the "
        "held-out subjects, print the metrics and write the plots.",
    )
    p.add_argument("--out", default="fasttversky_demo", help="output folder")
    p.add_argument("--n", type=int, default=6, help="phantoms (a third held out)")
    p.add_argument("--steps", type=int, default=PRESETS["quick"].run.steps)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if args.command == "bench":  # options of bench/report.py are passed through as-is
        args.report_args = [a for a in [*unknown, *args.report_args] if a != "--"]
    elif unknown:
        parser.error("unrecognized arguments: " + " ".join(unknown))
    from .data import DataError

    try:
        return int(args.func(args) or 0)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
