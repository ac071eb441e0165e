"""Issue 29, item 2: the `lesion-cpu` preset's inference choices, measured on the
leave-one-patient-out folds with the preset's three seeds, read by the rules written
before the runs (``bench/results/lesion_cpu.md``, "Version 8 — planned").

    taskset -c 1 python bench/lesion_inference.py --data ../shared/data/open_ms_data \\
        --runs RUNS --out bench/results/lesion_inference [--train-missing]
    python bench/lesion_inference.py --dry-run --out /tmp/lesion_inference   # seconds
    # one fold per core, then the report from the cache (RUNS/_inference) in seconds:
    taskset -c 0 python bench/lesion_inference.py ... --only v64_f19_s0 v64_f19_s1 v64_f19_s2

Runs: ``RUNS/v64_f{19,07}_s{0,1,2}``, the preset trained on the other patient plus the
27 transplanted masks that are not the test patient's (the protocol of versions 3–7:
``train ONLY_OTHER --preset lesion-cpu --transplant-masks masks --exclude-masks TEST
--seed S``). Missing runs are an error listing them, or are trained with
``--train-missing`` (~30–40 min each on 2 cores).

Per run, on its test patient (each arm's probability from the same weights):

* mirroring none / lr / all (``--mirror``), each timed (wall seconds per brain, at
  ``--threads`` torch threads), scored at threshold 0.5;
* the threshold chosen on ``--val-n`` fresh transplants into the run's own training
  brain (transplant seed 1000 + training seed, the test patient's mask excluded; never
  the test patient): the grid 0.05–0.95 by 0.05 maximising pooled DSC, ties to the value
  nearest 0.5; the test patient scored at that threshold (mirror none);
* per fold, the three seeds as one model (mean probability, mirror none, 0.5).

Scores as the preset's masks are made (brain only, components >= 10 voxels): DSC,
voxel precision, sensitivity, lesion-wise F1. Summaries: mean ± sd over seeds, paired
differences by seed (same weights, other inference) with a bootstrap 95 % CI of their
mean (``fasttversky.app.lesion_metrics.summarize``). Writes OUT.json (every number)
and OUT.md (the tables and each rule's verdict, computed by :func:`verdicts`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fasttversky.app.config import PredictConfig  # noqa: E402
from fasttversky.app.ensemble import mean_probability  # noqa: E402
from fasttversky.app.lesion_metrics import lesion_metrics, summarize  # noqa: E402

FOLDS = {"patient19": "patient07", "patient07": "patient19"}  # test -> training brain
SEEDS = (0, 1, 2)
MIRRORS = ("none", "lr", "all")
GRID = tuple(round(0.05 * k, 2) for k in range(1, 20))
KEYS = ("dsc", "precision", "sensitivity", "lesion_f1")
BASE = "mirror none, t=0.5"  # the preset's inference: every arm is compared with it


def run_name(test: str, seed: int) -> str:
    return f"v64_f{test[-2:]}_s{seed}"


# -- scoring ---------------------------------------------------------------------------
def score(prob: np.ndarray, target: np.ndarray, threshold: float, min_size: int) -> dict:
    """The preset's mask of ``prob`` (threshold, components >= min_size) against
    ``target``: DSC, voxel precision and sensitivity, lesion F1 and the counts."""
    from fasttversky.app.training.inference import lesion_mask

    mask = lesion_mask(prob, PredictConfig(threshold=threshold, min_lesion_size=min_size)) > 0
    t = target > 0
    tp, fp, fn = int((mask & t).sum()), int((mask & ~t).sum()), int((~mask & t).sum())
    nan = float("nan")
    return {
        "dsc": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0,
        "precision": tp / (tp + fp) if tp + fp else nan,
        "sensitivity": tp / (tp + fn) if tp + fn else nan,
        "lesion_f1": lesion_metrics(mask, t)["lesion_f1"],
        "tp": tp,
        "fp": fp,
        "fn": fn,
    }


def choose_threshold(probs: list, targets: list, min_size: int) -> tuple[float, dict]:
    """The grid value with the highest DSC pooled over (prob, target) pairs; ties go to
    the value nearest 0.5 -> (threshold, {threshold: pooled DSC})."""
    from fasttversky.app.training.inference import lesion_mask

    dsc = {}
    for t in GRID:
        config = PredictConfig(threshold=t, min_lesion_size=min_size)
        tp = fp = fn = 0
        for p, y in zip(probs, targets, strict=True):
            m, y = lesion_mask(p, config) > 0, y > 0
            tp, fp, fn = tp + (m & y).sum(), fp + (m & ~y).sum(), fn + (~m & y).sum()
        dsc[t] = float(2 * tp / (2 * tp + fp + fn)) if tp + fp + fn else 1.0
    best = max(dsc.values())
    return min((t for t in GRID if dsc[t] == best), key=lambda t: abs(t - 0.5)), dsc


# -- one run ---------------------------------------------------------------------------
def timed_probability(model, prepared, settings, mirror: str) -> tuple[np.ndarray, float]:
    from fasttversky.app.pipeline import predict_prepared

    s = replace(settings, predict=replace(settings.predict, mirror=mirror))
    t0 = time.perf_counter()
    prob = predict_prepared(model, prepared, s, device="cpu")
    return prob, time.perf_counter() - t0


def measure_run(run: Path, test, brain, masks: Path, seed: int, val_n: int) -> dict:
    """Every arm of one run on its test patient -> {"arms": {arm: scores}, "seconds",
    "threshold", "val_dsc", "prob_none"}."""
    from fasttversky.app.data import prepare_subject
    from fasttversky.app.data.synth import transplanted_subjects
    from fasttversky.app.pipeline import load_run, predict_prepared

    model, settings = load_run(run)
    d, min_size = settings.data, settings.predict.min_lesion_size
    p = prepare_subject(test, d.target_shape, d.normalisation)
    probs, seconds = {}, {}
    for m in MIRRORS:
        probs[m], seconds[m] = timed_probability(model, p, settings, m)
    arms = {f"mirror {m}, t=0.5": score(probs[m], p.full_mask, 0.5, min_size) for m in MIRRORS}
    val = transplanted_subjects(
        [brain],
        masks,
        exclude=[test.name],
        target_shape=d.target_shape,
        seed=1000 + seed,
        contrast=d.transplant_contrast,
        n=val_n,
        normalisation=d.normalisation,
    )
    assert all(test.name not in v.name for v in val)  # never the test patient's lesions
    val_probs = [predict_prepared(model, v, settings, device="cpu") for v in val]
    chosen, val_dsc = choose_threshold(val_probs, [v.full_mask for v in val], min_size)
    arms["mirror none, t=chosen"] = score(probs["none"], p.full_mask, chosen, min_size)
    return {
        "arms": arms,
        "seconds": seconds,
        "threshold": chosen,
        "val_dsc": val_dsc,
        "prob_none": probs["none"],
        "target": p.full_mask,
        "min_size": min_size,
    }


# -- the folds -------------------------------------------------------------------------
def _fingerprint(run: Path, val_n: int) -> dict:
    """What a cached result depends on: the weights measured and the validation count."""
    digest = hashlib.sha256((run / "last.pt").read_bytes()).hexdigest()[:16]
    return {"weights_sha256": digest, "val_n": val_n}


def cached_run(cache: Path, name: str, key: dict, measure) -> dict:
    """``measure()`` of one run, done once per ``key``: its scores are kept in
    CACHE/NAME.json and its mirror-none probability and target in CACHE/NAME.npz, so an
    interrupted session loses only the run in progress, runs can be measured on two
    cores at once (``--only``) and the report is rebuilt from the cache in seconds. A
    cache made from other weights or settings (another ``key``) is measured again."""
    js, npz = cache / f"{name}.json", cache / f"{name}.npz"
    if js.is_file() and npz.is_file():
        kept = json.loads(js.read_text())
        if kept.pop("key", None) == key:
            with np.load(npz) as arrays:
                return {**kept, **arrays}
    r = measure()
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(npz, prob_none=r["prob_none"], target=r["target"])
    scores = {k: v for k, v in r.items() if k not in ("prob_none", "target")}
    js.write_text(json.dumps({"key": key, **scores}, indent=1))  # last: run complete
    return r


def measured(test: str, seed: int, subjects: dict, runs: Path, masks: Path, opts) -> dict:
    """One run's measurement on its test patient, from the cache when it is there."""
    name = run_name(test, seed)
    train_brain = subjects[FOLDS[test]]
    args = (runs / name, subjects[test], train_brain, masks, seed, opts.val_n)
    key = _fingerprint(runs / name, opts.val_n)
    return cached_run(opts.cache, name, key, partial(measure_run, *args))


def measure_fold(test: str, subjects: dict, runs: Path, masks: Path, seeds, opts) -> dict:
    """Every run of one fold (cached), then its seeds' ensemble -> the fold's entry."""
    per_seed = {}
    for s in seeds:
        print(f"[{test}] seed {s}", file=sys.stderr)
        per_seed[s] = measured(test, s, subjects, runs, masks, opts)
    first = per_seed[seeds[0]]
    ens = mean_probability([r["prob_none"] for r in per_seed.values()])
    ensemble = score(ens, first["target"], 0.5, first["min_size"])
    for r in per_seed.values():
        for k in ("prob_none", "target", "min_size"):
            r.pop(k)
    return {"seeds": {str(s): r for s, r in per_seed.items()}, "ensemble": ensemble}


def paired(fold: dict, arm: str, key: str, base: str = BASE) -> dict:
    """Differences arm − base by seed (same weights) and their summary."""
    runs = fold["seeds"].values()
    diffs = [r["arms"][arm][key] - r["arms"][base][key] for r in runs]
    return {"by_seed": diffs, **summarize(diffs)}


def ensemble_vs_seeds(fold: dict, key: str) -> dict:
    """Ensemble − each single seed (same fold, mirror none, 0.5) and their summary."""
    diffs = [fold["ensemble"][key] - r["arms"][BASE][key] for r in fold["seeds"].values()]
    return {"by_seed": diffs, **summarize(diffs)}


# -- the reading rules (bench/results/lesion_cpu.md, version 8) --------------------------
def _helps(d: dict, points: float) -> bool:
    """Rule 1's test on a paired DSC difference: every seed > 0, CI above 0, mean >=
    ``points`` (fractions: 0.01 = one DSC point)."""
    lo = d["ci95"][0]
    return all(x > 0 for x in d["by_seed"]) and lo > 0 and d["mean"] >= points


def _no_harm(d: dict, points: float) -> bool:
    return d["mean"] >= -points


def _verdict(rule: str, ok: bool, detail: str) -> str:
    return f"{rule}: {'passes' if ok else 'fails'} ({detail})"


def _points(values) -> str:
    """Differences (fractions) by seed as DSC points: '+1.2 / -0.3 / +0.8'."""
    return " / ".join(f"{100 * x:+.1f}" for x in values)


def _mirror_verdicts(f19: dict, f07: dict) -> list[str]:
    """Rule 1: mirroring, lr and all against none, then all against lr."""
    out = []
    for m in ("lr", "all"):
        arm = f"mirror {m}, t=0.5"
        gain = _helps(paired(f19, arm, "dsc"), 0.01)
        prec = all(x >= -0.01 for x in paired(f19, arm, "precision")["by_seed"])
        safe = _no_harm(paired(f07, arm, "dsc"), 0.005)
        detail = f"patient19 DSC gain {gain}, precision kept {prec}, patient07 kept {safe}"
        out.append(_verdict(f"R1 mirror {m}", gain and prec and safe, detail))
    d = paired(f19, "mirror all, t=0.5", "dsc", base="mirror lr, t=0.5")
    out.append(_verdict("R1 all over lr", _helps(d, 0.01), f"all − lr {_points(d['by_seed'])}"))
    return out


def verdicts(folds: dict) -> list[str]:
    """Each rule of the plan applied to the measurements -> one line per rule."""
    f19, f07 = folds["patient19"], folds["patient07"]
    out = _mirror_verdicts(f19, f07)
    chosen = [r["threshold"] for f in (f19, f07) for r in f["seeds"].values()]
    stable = max(chosen) - min(chosen) <= 0.2 + 1e-9
    gain = _helps(paired(f19, "mirror none, t=chosen", "dsc"), 0.01)
    safe = _no_harm(paired(f07, "mirror none, t=chosen", "dsc"), 0.005)
    t_star = round(float(np.median(chosen)) * 20) / 20
    detail = f"chosen {chosen}, stable {stable}, patient19 gain {gain}, patient07 kept {safe}"
    out.append(_verdict(f"R2 threshold {t_star:g}", stable and gain and safe, detail))
    e19, e07 = ensemble_vs_seeds(f19, "dsc"), ensemble_vs_seeds(f07, "dsc")
    ok = all(x > 0 for x in e19["by_seed"]) and e19["mean"] >= 0.01 and _no_harm(e07, 0.005)
    detail = f"patient19 ensemble − seeds {_points(e19['by_seed'])}, patient07 mean "
    detail += _points([e07["mean"]])
    out.append(_verdict("R3 3-seed ensemble", ok, detail))
    return out


# -- report ----------------------------------------------------------------------------
def _cell(s: dict) -> str:
    if not np.isfinite(s["mean"]):
        return "n/a"
    sd = f" ± {100 * s['sd']:.1f}" if np.isfinite(s.get("sd", np.nan)) else ""
    return f"{100 * s['mean']:.1f}{sd}"


def _ci_cell(d: dict) -> str:
    lo, hi = d["ci95"]
    if not np.isfinite(lo):
        return f"{100 * d['mean']:+.1f}"
    return f"{100 * d['mean']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"


def fold_table(test: str, fold: dict) -> list[str]:
    """Markdown lines: per arm mean ± sd over seeds and the paired difference to BASE."""
    arms = list(next(iter(fold["seeds"].values()))["arms"])
    head = "| arm | " + " | ".join(KEYS) + " | Δ DSC vs preset [95 % CI] | s / brain |"
    lines = [f"### test {test}", "", head, "|" + "---|" * (len(KEYS) + 3)]
    for arm in arms:
        runs = fold["seeds"].values()
        cells = [_cell(summarize([r["arms"][arm][k] for r in runs])) for k in KEYS]
        delta = "—" if arm == BASE else _ci_cell(paired(fold, arm, "dsc"))
        mirror = arm.split(",")[0].split()[-1]
        sec = summarize([r["seconds"][mirror] for r in runs])["mean"]
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {delta} | {sec:.1f} |")
    e = fold["ensemble"]
    cells = [f"{100 * e[k]:.1f}" for k in KEYS]
    delta = _ci_cell(ensemble_vs_seeds(fold, "dsc"))
    lines.append("| 3 seeds as one model | " + " | ".join(cells) + f" | {delta} | — |")
    chosen = [r["threshold"] for r in fold["seeds"].values()]
    return [*lines, "", f"thresholds chosen on the transplants, by seed: {chosen}", ""]


def write_report(folds: dict, out: Path, note: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"note": note, "folds": folds}, indent=1))
    lines = [f"# lesion-cpu inference arms ({note})", "", "metrics in %", ""]
    for test, fold in folds.items():
        lines += fold_table(test, fold)
    lines += ["## Verdicts (rules of bench/results/lesion_cpu.md, version 8)", ""]
    lines += [f"- {v}" for v in verdicts(folds)]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


# -- data and runs ---------------------------------------------------------------------
def dry_data(root: Path) -> tuple[Path, Path]:
    """Tiny phantoms named like the two patients, and a masks folder: the plumbing of
    the real measurement in seconds (the numbers mean nothing)."""
    from fasttversky.app.data.synth import write_phantom_dataset

    data, masks = root / "data", root / "masks"
    write_phantom_dataset(root / "raw", n_subjects=4, shape=(32, 40, 32), seed=0)
    masks.mkdir(parents=True, exist_ok=True)
    names = ["patient07", "patient19", "patient01", "patient02"]
    for src, name in zip(sorted((root / "raw").glob("subject*")), names, strict=True):
        shutil.copy(src / "mask.nii.gz", masks / f"{name}.nii.gz")
        if name in FOLDS:
            shutil.copytree(src, data / name, dirs_exist_ok=True)
    return data, masks


def run_settings(dry: bool, seed: int):
    from fasttversky.app.presets import PRESETS

    s = PRESETS["lesion-cpu"].run
    if dry:  # the preset's inference (windows, brain, components) on a tiny network
        s = replace(
            s,
            model=replace(s.model, base_features=2, levels=2),
            data=replace(s.data, target_shape=None, patch_size=[16, 16, 16], batch_size=1),
            train=replace(s.train, steps=2, keep_every=None),
            predict=replace(s.predict, window=[16, 16, 16], min_lesion_size=3),
        )
    return replace(s, train=replace(s.train, seed=seed))


def ensure_runs(subjects: dict, runs: Path, masks: Path, seeds, train: bool, dry: bool):
    """Every fold's runs exist, or are trained (``train``), or SystemExit naming them."""
    from fasttversky.app.pipeline import train_run

    missing = [(t, s) for t in FOLDS for s in seeds if not (runs / run_name(t, s)).is_dir()]
    if missing and not train:
        names = ", ".join(run_name(t, s) for t, s in missing)
        raise SystemExit(f"error: missing runs in {runs}: {names} (or pass --train-missing)")
    for test, seed in missing:
        print(f"training {run_name(test, seed)}", file=sys.stderr)
        train_run(
            [subjects[FOLDS[test]]],
            run_settings(dry, seed),
            runs / run_name(test, seed),
            progress=False,
            transplant_masks=masks,
            exclude=[test],
        )


def measure_only(names, subjects: dict, runs: Path, masks: Path, opts) -> None:
    """Measure (and cache) just the named runs, e.g. one fold per core; no report."""
    known = {run_name(t, s): (t, s) for t in FOLDS for s in SEEDS}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"error: --only: unknown run(s) {', '.join(unknown)}")
    missing = [str(runs / n) for n in names if not (runs / n).is_dir()]
    if missing:  # before any measurement, not after the first runs' minutes
        raise SystemExit(f"error: --only: missing run(s) {', '.join(missing)}")
    for name in names:
        test, seed = known[name]
        measured(test, seed, subjects, runs, masks, opts)
        print(f"measured {name} -> {opts.cache}", file=sys.stderr)


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, help="folder with patient07/ and patient19/")
    ap.add_argument("--masks", type=Path, help="lesion masks [default: DATA/masks]")
    ap.add_argument("--runs", type=Path, help="folder of the v64_f*_s* runs")
    ap.add_argument("--out", type=Path, required=True, help="report path without suffix")
    ap.add_argument("--cache", type=Path, help="per-run results [default: RUNS/_inference]")
    ap.add_argument("--only", nargs="+", metavar="RUN", help="measure just these runs")
    ap.add_argument("--val-n", type=int, default=6, help="validation transplants per run")
    ap.add_argument("--threads", type=int, default=1, help="torch threads [default: 1]")
    ap.add_argument("--train-missing", action="store_true", help="train missing runs")
    ap.add_argument("--dry-run", action="store_true", help="tiny phantoms, tiny runs")
    args = ap.parse_args(argv)
    if args.dry_run:
        work = args.out.parent / (args.out.name + "_work")
        args.data, args.masks = dry_data(work)
        args.runs, args.train_missing, args.val_n = work / "runs", True, 2
    elif args.data is None or args.runs is None:
        ap.error("--data and --runs are needed (or --dry-run)")
    args.masks = args.masks or args.data / "masks"
    args.cache = args.cache or args.runs / "_inference"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from fasttversky.app.data import find_subjects

    torch.set_num_threads(args.threads)
    subjects = {s.name: s for s in find_subjects(args.data) if s.name in FOLDS}
    if args.only:
        measure_only(args.only, subjects, args.runs, args.masks, args)
        return 0
    ensure_runs(subjects, args.runs, args.masks, SEEDS, args.train_missing, args.dry_run)
    folds = {t: measure_fold(t, subjects, args.runs, args.masks, SEEDS, args) for t in FOLDS}
    note = "dry run: tiny phantoms, numbers meaningless" if args.dry_run else "measured"
    note += f"; torch {torch.__version__}, {args.threads} thread(s)"
    write_report(folds, args.out, note)
    print(f"wrote {args.out.with_suffix('.md')} and {args.out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
