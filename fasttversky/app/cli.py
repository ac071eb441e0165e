"""The ``fasttversky`` command line: argument parsing, calling the application, printing.

Commands: synth, train, predict, evaluate, bench, reproduce, demo (``fasttversky
COMMAND --help``). The work is done by :mod:`fasttversky.app.pipeline`,
:mod:`fasttversky.app.experiment` and :mod:`fasttversky.app.bench`, which raise
exceptions; :func:`main` turns them into one ``error: ...`` line and an exit status:

* 0 — success
* 1 — bad data or a failure while running (unreadable or inconsistent file, missing
  run folder, training diverged, missing application dependencies)
* 2 — bad usage (unknown command or option, a value out of range, an output folder
  that already holds a result without ``--force``)
* 130 — interrupted (Ctrl-C)

Options of synth/train/predict/evaluate/reproduce are generated from the fields of
:mod:`fasttversky.app.config` (one declaration per setting, its help in the field).
Every command that writes a folder goes through :mod:`fasttversky.app.output_guard`:
an existing result is refused before any work, and ``--force`` replaces it whole.
This module imports nothing heavy: torch and the data stack load inside the commands,
so ``--help`` is fast.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import sys
import textwrap
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, replace
from pathlib import Path

from .config import (
    RUN_CHECKPOINTS,
    DataConfig,
    ExperimentConfig,
    ModelConfig,
    PredictConfig,
    RunSettings,
    SynthConfig,
    TrainConfig,
    check_device,
    check_threshold,
    cli_fields,
)
from .errors import ConfigError, DataError
from .output_guard import OutputExistsError, guarded_output, result_kind
from .presets import PRESETS

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
APP_DEPENDENCIES = ("nibabel", "matplotlib", "scipy", "tqdm")
EPILOG = """exit status:
  0    success
  1    bad data or a failure while running (unreadable or inconsistent file, missing
       run folder, training diverged, application dependencies not installed)
  2    bad usage (unknown command or option, a value out of range, an output folder
       that already holds a result without --force)
  130  interrupted"""

# config section -> (class, argparse group title); the first four make a RunSettings
SECTIONS = {
    "data": (DataConfig, "data"),
    "model": (ModelConfig, "model"),
    "train": (TrainConfig, "training"),
    "predict": (PredictConfig, "prediction"),
    "synth": (SynthConfig, "phantoms"),
    "experiment": (ExperimentConfig, "experiment"),
}
RUN_SECTIONS = ("data", "model", "train", "predict")
# Options of `train` alone: `reproduce` holds out subjects by its folds.
TRAIN_ONLY = ("val_subjects", "val_every")
# Options spelt differently from their field (one flag per repeated channel).
FLAGS = {"modalities": "--modality"}


def _flag(name: str) -> str:
    return FLAGS.get(name, "--" + name.replace("_", "-"))


def describe(e: ConfigError) -> str:
    """A ConfigError as the user typed it: ``alpha + beta`` -> ``--alpha + --beta``."""
    if "." in e.field or "/" in e.field:  # a file (run.json), not an option
        return f"{e.field} {e.reason}"
    return re.sub(r"[a-z][a-z0-9_]*", lambda m: _flag(m.group()), e.field) + f" {e.reason}"


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``error: <problem> (see `<prog> --help`)``, exit 2."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"error: {message} (see `{self.prog} --help`)\n")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog):
        super().__init__(prog, max_help_position=32)


def _show(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, dict):
        return " ".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, (list, tuple)):  # (α, β) settings show as A,B
        return " ".join(",".join(map(str, v)) if isinstance(v, tuple) else str(v) for v in value)
    return str(value)


def _add_fields(p, section: str, defaults, only: Sequence[str] | None = None, group=None):
    """One option per CLI field of a config section. Every option defaults to None (=
    keep the base settings' value); the help shows the default the command uses
    (``defaults``: an instance of the section's class, or a string such as "the
    preset's")."""
    cls, title = SECTIONS[section]
    g = group or p.add_argument_group(title)
    for f in cli_fields(cls):
        if only is not None and f.name not in only:
            continue
        meta = dict(f.metadata)
        text = meta.pop("help")
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "str")
        kw: dict = {}
        if meta.get("nargs") == 3:
            kw["type"] = int
        elif meta.get("action") or "type" in meta:
            pass
        elif kind.startswith("int"):
            kw["type"] = int
        elif kind.startswith("float"):
            kw["type"] = float
        if meta.get("action") == "store_true":  # a switch: no value, no default to show
            g.add_argument(_flag(f.name), dest=f"{section}.{f.name}", help=text, **meta)
            continue
        if isinstance(defaults, str):
            shown = defaults
        else:
            value = getattr(defaults, f.name)
            shown = _show(value) if value is not None or meta.get("nargs") != 3 else "0 0 0"
        if "metavar" not in meta and "choices" not in meta:  # choices show as {a,b}
            meta["metavar"] = f.name.upper()
        g.add_argument(
            _flag(f.name),
            dest=f"{section}.{f.name}",
            default=None,
            help=f"{text} [default: {shown}]",
            **meta,
            **kw,
        )


def _given(args, section: str) -> dict:
    """The options of a config section the user gave -> {field: value}."""
    given = {}
    for f in cli_fields(SECTIONS[section][0]):
        v = getattr(args, f"{section}.{f.name}", None)
        if v is None:
            continue
        if section in RUN_SECTIONS and f.metadata.get("nargs") == 3:
            v = None if not any(v) else list(v)  # 0 0 0 = none
        elif f.name == "modalities":
            pairs = [m.split("=", 1) for m in v]
            for m, pair in zip(v, pairs, strict=True):
                if len(pair) != 2 or not all(pair):
                    raise ConfigError("modalities", f"expects NAME=PATTERN, got {m!r}")
            v = dict(pairs)
        given[f.name] = v
    return given


def settings_from_args(args, base: RunSettings) -> RunSettings:
    """``base`` with every option the user gave applied (ConfigError when out of range)."""
    return RunSettings(**{s: replace(getattr(base, s), **_given(args, s)) for s in RUN_SECTIONS})


def config_from_args(args, section: str):
    """The config of a section outside a run (synth, experiment) with the options given."""
    return SECTIONS[section][0](**_given(args, section))


# --------------------------------------------------------------------------------------
# commands: parse -> call the application -> print
# --------------------------------------------------------------------------------------
def _guarded(args, command: str, out=None, option: str = "--out"):
    """The command's output folder through the output guard (refused if it holds a
    result, unless --force; see fasttversky.app.output_guard)."""
    out = args.out if out is None else out
    return guarded_output(out, result_kind(command), force=args.force, option=option)


def _check_inputs_outside(out, option: str, **inputs) -> None:
    """OutputExistsError when an input folder (keyword: what it is, underscores for
    spaces) is the output folder or inside it: every sub-folder of a dataset or
    predictions folder counts as its result, so ``--force`` would delete that input
    with the old result (``predict DATA --out DATA`` would lose the dataset)."""
    o = Path(out).resolve()
    for what, path in inputs.items():
        if path is None or not Path(path).exists():  # (the command says it is missing)
            continue
        p = Path(path).resolve()
        if p == o or o in p.parents:
            raise OutputExistsError(
                f"{option} {out} is or contains the {what.replace('_', ' ')} {path}; "
                "write the result to a folder of its own"
            )


def _moved(path, dest: Path, out: Path) -> Path:
    """Where a file written under ``dest`` (a forced run's partial folder) now is."""
    path = Path(path)
    return out / path.relative_to(dest) if path.is_relative_to(dest) else path


def cmd_synth(args) -> int:
    from .pipeline import synth

    config = config_from_args(args, "synth")
    _check_inputs_outside(
        args.out, "output folder", brains=args.brains, lesion_masks_folder=args.lesion_masks
    )
    t0 = time.perf_counter()
    with _guarded(args, "synth", option="output folder") as dest:
        stats = synth(
            dest,
            n=args.n,
            brains=args.brains,
            lesion_masks=args.lesion_masks,
            exclude_masks=args.exclude_masks,
            progress=not args.quiet,
            **asdict(config),
        )
    fr = [s["lesion_fraction"] for s in stats]
    print(
        f"wrote {len(stats)} subjects to {args.out} in {time.perf_counter() - t0:.1f} s; "
        f"lesion fraction {100 * min(fr):.3f}–{100 * max(fr):.3f} % of voxels"
    )
    return EXIT_OK


def _train_settings(args, out: Path) -> RunSettings:
    """The run's settings: the preset's (or the run's own on --resume) + the options."""
    if args.force and args.resume:
        raise ConfigError(
            "force", "and --resume exclude each other (continue the run, or replace it)"
        )
    from .pipeline import RUN_SETTINGS

    base = PRESETS[args.preset].run if args.preset else RunSettings()
    if args.resume and (out / RUN_SETTINGS).is_file():
        base = RunSettings.load(out / RUN_SETTINGS)  # resume with the run's own settings
    settings = settings_from_args(args, base).validate()
    if getattr(args, "train.val_every") is not None and not settings.data.val_subjects:
        raise ConfigError("val_every", "only applies with --val-subjects (none given)")
    return settings


def cmd_train(args) -> int:
    out = Path(args.out)
    settings = _train_settings(args, out)
    from .pipeline import find_dataset, train_run

    with nullcontext(out) if args.resume else _guarded(args, "train") as dest:
        subjects = find_dataset(args.data, settings.data)
        held = settings.data.val_subjects or []
        t = settings.train
        print(
            f"training on {len(subjects) - len(held)} subjects from {args.data}"
            + (f" ({', '.join(held)} held out for validation)" if held else "")
            + f": alpha={t.alpha} beta={t.beta} gamma={t.gamma}"
            + (f" + {t.ce_weight:g}×cross-entropy" if t.ce_weight else "")
            + f", {t.steps} steps"
        )
        _, result = train_run(
            subjects,
            settings,
            dest,
            resume=args.resume,
            progress=not args.quiet,
            transplant_masks=args.transplant_masks,
            exclude=args.exclude_masks,
        )
    last = f"{result.losses[-1]:.4f}" if result.losses else "n/a"
    print(
        f"done: step {result.step}, last loss {last}, {result.seconds:.1f} s, "
        f"checkpoint {_moved(result.checkpoint, Path(dest), out)}"
    )
    if result.best_step is not None:
        print(
            f"best validation DSC {100 * result.best_score:.2f} % at step {result.best_step}: "
            f"{out / 'best.pt'} (`predict --weights best`; every score in {out / 'val.jsonl'})"
        )
    return EXIT_OK


def cmd_predict(args) -> int:
    window, threshold = getattr(args, "predict.window"), getattr(args, "predict.threshold")
    if args.device is not None:
        check_device(args.device)
    if threshold is not None:
        check_threshold(threshold)
    if window is not None and any(window):
        PredictConfig(window=window)  # checks the sizes
    _check_inputs_outside(args.out, "--out", dataset=args.data)
    for run in args.model:
        _check_inputs_outside(args.out, "--out", run_folder=run)
    from .pipeline import predict_dataset

    with _guarded(args, "predict") as dest:
        n = predict_dataset(
            args.data,
            args.model,
            dest,
            window=window,
            threshold=threshold,
            device=args.device,
            progress=not args.quiet,
            weighting=getattr(args, "predict.weighting"),
            mirror=getattr(args, "predict.mirror"),
            min_lesion_size=getattr(args, "predict.min_lesion_size"),
            checkpoint=args.weights,
        )
    models = f" (mean of {len(args.model)} runs)" if len(args.model) > 1 else ""
    print(f"wrote probability maps and masks of {n} subjects{models} to {args.out}")
    return EXIT_OK


def cmd_evaluate(args) -> int:
    settings = settings_from_args(args, RunSettings())
    threshold = settings.predict.threshold
    from .pipeline import evaluate_folder
    from .report import metric_table

    out = Path(args.out or args.pred)
    with _guarded(args, "evaluate", out=out) as dest:
        rows, files = evaluate_folder(
            args.pred,
            args.data,
            dest,
            config=settings.data,
            threshold=threshold,
            min_lesion_size=settings.predict.min_lesion_size,
        )
    files = {k: _moved(v, Path(dest), out) for k, v in files.items()}
    print(f"threshold {threshold}; values in %\n")
    print(metric_table(rows))
    print(f"wrote {files['csv']}, {files['md']} and {files['png']}")
    return EXIT_OK


def cmd_bench(args) -> int:
    from .bench import SHAPES, load_report, render

    if args.from_json:
        report = load_report(args.from_json)
    else:
        from .bench import run_benchmark

        backends = args.backends.split(",") if args.backends else None
        report = run_benchmark(
            SHAPES["quick" if args.quick else "paper"],
            device=args.device,
            backends=backends,
            repeats=args.repeats,
            log=None if args.quiet else lambda m: print(m, file=sys.stderr),
        )
    text = render(report)
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        if not args.from_json:
            out.with_suffix(".json").write_text(json.dumps(report, indent=1))
        print(f"wrote {out}" + ("" if args.from_json else f" and {out.with_suffix('.json')}"))
    return EXIT_OK


def cmd_reproduce(args) -> int:
    base = settings_from_args(args, PRESETS[args.preset].run)
    experiment = config_from_args(args, "experiment")
    from .experiment import reproduce

    with _guarded(args, "reproduce") as dest:
        summary = reproduce(
            base,
            dest,
            preset_name=args.preset,
            data=args.data,
            n_subjects=args.n_subjects,
            settings_list=experiment.settings,
            folds=experiment.folds,
            threshold=base.predict.threshold,
            transplant_masks=args.transplant_masks,
            transplant_n=args.transplant_n,
            seeds=experiment.seeds,
            progress=not args.quiet,
        )
    print(summary["table"])
    print(
        f"\nwrote {Path(args.out) / 'table.md'}, {Path(args.out) / 'pr_curves.png'} and "
        f"overlays in {summary['seconds']:.0f} s"
    )
    return EXIT_OK


def cmd_demo(args) -> int:
    from .pipeline import demo

    out = Path(args.out)
    with _guarded(args, "demo") as dest:
        result = demo(
            dest,
            n=args.n,
            steps=args.steps,
            seed=args.seed,
            force=args.force,
            progress=not args.quiet,
        )
    f = {k: _moved(v, Path(dest), out) for k, v in result["files"].items()}
    print(f"done in {result['seconds']:.0f} s: {f['md']}, {f['pr']}, {f['overlay']}")
    return EXIT_OK


# --------------------------------------------------------------------------------------
# argument parsing: one _add_<command> per command
# --------------------------------------------------------------------------------------
def _wrap(text: str, width: int = 88) -> str:
    """Fill each paragraph (the raw formatter keeps the epilog's table and the preset
    list as written; prose paragraphs are filled here)."""
    return "\n\n".join(
        par if "\n" in par else textwrap.fill(par, width) for par in text.split("\n\n")
    )


def _sub(sub, name, common, help, description, func):
    p = sub.add_parser(
        name,
        parents=common,
        formatter_class=_Formatter,
        help=help,
        description=_wrap(description),
        epilog=EPILOG,
    )
    p.set_defaults(func=func)
    return p


def _add_force(p, what: str, note: str = "") -> None:
    p.add_argument(
        "--force",
        action="store_true",
        help=f"replace {what} already in the folder: the new one is written beside it and "
        f"swapped in when complete, so an interrupted run leaves the old one as it was{note}",
    )


def _add_exclude_masks(p, help: str) -> None:
    p.add_argument("--exclude-masks", nargs="+", default=[], metavar="NAME", help=help)


def _add_synth(sub, common) -> None:
    p = _sub(
        sub,
        "synth",
        common,
        "write a dataset of lesion phantoms (or transplanted real lesions)",
        "Write OUT/subjectNN/{T1,T2,FLAIR,mask}.nii.gz: procedural brains with MS-like "
        "white-matter lesions, or with --brains and --lesion-masks real lesion masks "
        "transplanted into real brains.",
        cmd_synth,
    )
    p.add_argument("out", help="output dataset folder")
    p.add_argument(
        "--n",
        type=int,
        help="number of subjects [default: 4 phantoms; transplant: one per lesion mask]",
    )
    _add_fields(p, "synth", SynthConfig())
    p.add_argument("--brains", help="transplant mode: dataset folder of real brains")
    p.add_argument("--lesion-masks", help="transplant mode: folder of lesion-mask NIfTI files")
    _add_exclude_masks(
        p,
        "transplant mode: also skip these masks (e.g. held-out test patients); masks "
        "named like one of the brains are always skipped [default: none]",
    )
    _add_force(p, "a dataset", "; other files (not folders) are kept")


def _add_train(sub, common) -> None:
    p = _sub(
        sub,
        "train",
        common,
        "train a 3D U-Net",
        "Train the 3D U-Net with the fused Tversky loss on a dataset folder; writes "
        "OUT/last.pt, OUT/run.json and OUT/metrics.jsonl. Every subject is read and "
        "checked (readable, 3-D, one grid, binary mask) before training starts.",
        cmd_train,
    )
    p.add_argument("data", help="dataset folder (one sub-folder per subject)")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUT/last.pt with OUT/run.json's settings (options given "
        "override them, e.g. more --steps)",
    )
    _add_force(p, "a trained run", "; other files are kept (--resume continues it instead)")
    p.add_argument(
        "--preset",
        choices=list(PRESETS),
        default=None,
        help="start from a preset's run settings (options given override them); "
        "lesion-cpu = the real-data CPU recipe (bench/results/lesion_cpu.md) "
        "[default: none, the paper's settings]",
    )
    p.add_argument(
        "--transplant-masks",
        metavar="DIR",
        help="also train on every real lesion mask in DIR transplanted into the training "
        "brains (masks named like a training subject are skipped) [default: none]",
    )
    _add_exclude_masks(
        p,
        "with --transplant-masks: also skip these masks, e.g. the patients you will "
        "test on, so their lesion shapes never reach training [default: none]",
    )
    defaults = RunSettings()
    for section in RUN_SECTIONS:
        only = ["window", "min_lesion_size"] if section == "predict" else None
        _add_fields(p, section, getattr(defaults, section), only=only)


def _add_predict(sub, common) -> None:
    p = _sub(
        sub,
        "predict",
        common,
        "probability maps and masks for a dataset",
        "Write OUT/<subject>/prob.nii.gz (float32 lesion probability) and mask.nii.gz "
        "(prob >= threshold) on each input's grid and affine. Masks in the input are "
        "not needed. With several runs (an ensemble) the probability is the mean of "
        "theirs, each run predicting with its own windows and preprocessing; the runs must "
        "read the same channels on the same grid. OUT/inference.json records the settings "
        "and each run's checkpoint (SHA-256).",
        cmd_predict,
    )
    p.add_argument("data", help="dataset folder")
    p.add_argument(
        "--model",
        required=True,
        nargs="+",
        metavar="RUN",
        help="run folder written by `train`; several = an ensemble (mean probability)",
    )
    p.add_argument("--out", required=True, help="predictions folder")
    _add_force(p, "predictions", "; other files (not folders) are kept")
    g = p.add_argument_group("prediction")
    only = ["window", "threshold", "weighting", "mirror", "min_lesion_size"]
    _add_fields(p, "predict", "each run's", only=only, group=g)
    g.add_argument("--device", default=None, help="cpu, cuda, ... [default: each run's]")
    g.add_argument(  # not --checkpoint: train's --checkpoint is activation checkpointing
        "--weights",
        choices=list(RUN_CHECKPOINTS),
        default="last",
        help="which weights (of every run): last (the end of training) or best (the best "
        "validation score, for a run trained with --val-subjects) [default: last]",
    )


def _add_evaluate(sub, common) -> None:
    p = _sub(
        sub,
        "evaluate",
        common,
        "metrics table and PR-curve plot",
        "DSC, sensitivity, specificity, F2 and APR (in %) per subject and pooled, "
        "written to OUT/metrics.{md,csv} with OUT/pr_curve.png.",
        cmd_evaluate,
    )
    p.add_argument("pred", help="predictions folder (PRED/<subject>/prob.nii.gz)")
    p.add_argument("--data", required=True, help="dataset folder with the true masks")
    p.add_argument("--out", default=None, help="output folder [default: PRED]")
    _add_force(p, "an evaluation", " (metrics.md, metrics.csv, pr_curve.png; PRED keeps the rest)")
    defaults = RunSettings()
    _add_fields(p, "data", defaults.data, only=["modalities", "mask_pattern"])
    _add_fields(p, "predict", defaults.predict, only=["threshold", "min_lesion_size"])


def _add_bench(sub, common) -> None:
    p = _sub(
        sub,
        "bench",
        common,
        "time the fused loss against plain PyTorch",
        "Time the fused Tversky loss on every backend that runs here against the same "
        "loss as plain PyTorch ops (forward, forward+backward; median after warm-up) and "
        "print a Markdown report. Works from an installed package; the full matrix "
        "(MONAI, torch.compile, memory) is `python bench/report.py` in a source checkout.",
        cmd_bench,
    )
    p.add_argument("--out", help="also write the report to this .md file (+ .json beside it)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="logits 1×2×32×48×40 instead of the paper's 1×2×128×224×256",
    )
    p.add_argument("--device", help="cpu or cuda [default: cuda when available]")
    p.add_argument(
        "--backends", metavar="A,B", help="fused backends to time [default: all that run here]"
    )
    p.add_argument("--repeats", type=int, default=5, help="timed runs per case (>= 1) [default: 5]")
    p.add_argument(
        "--from-json", metavar="FILE", help="only re-render the report of an earlier --out JSON"
    )


def _add_reproduce(sub, common) -> None:
    presets = "\n".join(f"  {k}: {v.description}" for k, v in PRESETS.items())
    p = _sub(
        sub,
        "reproduce",
        common,
        "the paper's (α, β) sweep: Table 1, Fig. 2, overlays",
        "Train and test with cross-validation for (α, β) ∈ {(.5,.5), (.4,.6), (.3,.7), "
        "(.2,.8), (.1,.9)}; write table.md/csv (Table 1), pr_curves.png (Fig. 2), "
        "overlay_*.png (Figs. 3–4), results.json.\n\npresets (settings not given as "
        "options come from the preset):\n" + presets,
        cmd_reproduce,
    )
    p.add_argument("--preset", choices=list(PRESETS), default="quick", help="[default: quick]")
    p.add_argument(
        "--data", help="dataset folder [default: synthesise the preset's phantoms in OUT/data]"
    )
    p.add_argument("--out", default="reproduce_out", help="output folder [default: reproduce_out]")
    _add_force(p, "a reproduce result", "; OUT/data (the phantoms) is kept and re-used")
    p.add_argument("--n-subjects", type=int, help="phantoms to synthesise [default: the preset's]")
    p.add_argument(
        "--transplant-masks",
        metavar="DIR",
        help="add real lesion masks from DIR, transplanted into each fold's training "
        "brains, to the training set (e.g. open_ms_data/masks)",
    )
    p.add_argument(
        "--transplant-n",
        type=int,
        default=0,
        help="transplanted training subjects per fold [default: 0]",
    )
    _add_fields(p, "experiment", ExperimentConfig())
    for section in RUN_SECTIONS:  # the folds choose the held-out subjects, not --val-subjects
        only = [f.name for f in cli_fields(SECTIONS[section][0]) if f.name not in TRAIN_ONLY]
        _add_fields(p, section, "the preset's", only=only)


def _add_demo(sub, common) -> None:
    p = _sub(
        sub,
        "demo",
        common,
        "phantoms -> train -> evaluate -> plots, in minutes on a CPU",
        "Synthesise small lesion phantoms, train a 3D U-Net briefly with the fused "
        "Tversky loss (α=0.3, β=0.7), evaluate the held-out subjects, print the metrics "
        "and write the plots into a new folder.",
        cmd_demo,
    )
    p.add_argument(
        "--out", default="fasttversky_demo", help="output folder [default: fasttversky_demo]"
    )
    _add_force(p, "the demo's files", "; other files are kept")
    p.add_argument("--n", type=int, default=6, help="phantoms, a third held out [default: 6]")
    quick = PRESETS["quick"].run.train  # what the demo trains
    p.add_argument(
        "--steps",
        type=int,
        default=quick.steps,
        help=f"training steps (>= 1) [default: {quick.steps}]",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=quick.seed,
        help=f"seed of data, initialisation, batches [default: {quick.seed}]",
    )


COMMAND_PARSERS = (
    _add_synth,
    _add_train,
    _add_predict,
    _add_evaluate,
    _add_bench,
    _add_reproduce,
    _add_demo,
)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fasttversky",
        formatter_class=_Formatter,
        description=_wrap(
            "Tversky-loss 3D lesion segmentation (Salehi et al. 2017): synthesise "
            "data, train, predict, evaluate, benchmark and reproduce the paper."
        ),
        epilog="Start with `fasttversky demo` (a few minutes on a CPU, no download).\n\n" + EPILOG,
    )
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )
    quiet = argparse.ArgumentParser(add_help=False)
    quiet.add_argument("--quiet", action="store_true", help="no progress bars")
    for add in COMMAND_PARSERS:
        add(sub, [quiet])
    return parser


def _missing_dependencies(command: str) -> list[str]:
    if command == "bench":  # the loss alone: torch only
        return []
    return [m for m in APP_DEPENDENCIES if importlib.util.find_spec(m) is None]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line -> exit status (see the module docstring). Set
    FASTTVERSKY_DEBUG=1 to get the traceback of an unexpected error."""
    args = build_parser().parse_args(argv)
    missing = _missing_dependencies(args.command)
    if missing:
        print(
            f"error: `fasttversky {args.command}` needs the application's dependencies "
            f"(missing: {', '.join(missing)}); install them with: "
            "pip install 'fasttversky[app]'",
            file=sys.stderr,
        )
        return EXIT_ERROR
    try:
        return int(args.func(args) or EXIT_OK)
    except OutputExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ConfigError as e:
        print(f"error: {describe(e)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        if os.environ.get("FASTTVERSKY_DEBUG") == "1":
            raise
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return EXIT_ERROR


def _one_line(e: BaseException) -> str:
    """The message of an error, on one line; the type where it is not self-explanatory."""
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, (DataError, OSError)) or type(e).__name__ == "NonFiniteLossError":
        return text
    return f"{type(e).__name__}: {text} (FASTTVERSKY_DEBUG=1 shows the traceback)"


if __name__ == "__main__":
    sys.exit(main())
