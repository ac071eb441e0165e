"""The ``fasttversky`` command line: argument parsing, calling the application, printing.

Commands: synth, train, predict, evaluate, bench, reproduce, demo (``fasttversky
COMMAND --help``). The work is done by :mod:`fasttversky.app.pipeline`,
:mod:`fasttversky.app.experiment` and :mod:`fasttversky.app.bench`, which raise
exceptions; :func:`main` turns them into one ``error: ...`` line and an exit status:

* 0 — success
* 1 — bad data or a failure while running (unreadable or inconsistent file, missing
  run folder, training diverged, missing application dependencies)
* 2 — bad usage (unknown command or option, a value out of range, an output folder
  that exists without ``--force``)
* 130 — interrupted (Ctrl-C)

Options of train/reproduce are generated from the fields of
:mod:`fasttversky.app.config` (one declaration per setting, its help in the field).
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
from dataclasses import replace
from pathlib import Path

from .config import (
    RUN_CHECKPOINTS,
    TRANSPLANT_CONTRASTS,
    DataConfig,
    ModelConfig,
    PredictConfig,
    RunSettings,
    TrainConfig,
    check_device,
    check_threshold,
    cli_fields,
)
from .errors import ConfigError, DataError
from .presets import PRESETS

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
APP_DEPENDENCIES = ("nibabel", "matplotlib", "scipy", "tqdm")
EPILOG = """exit status:
  0    success
  1    bad data or a failure while running (unreadable or inconsistent file, missing
       run folder, training diverged, application dependencies not installed)
  2    bad usage (unknown command or option, a value out of range, an existing
       output folder without --force)
  130  interrupted"""

# config section -> (class, argparse group title)
SECTIONS = {
    "data": (DataConfig, "data"),
    "model": (ModelConfig, "model"),
    "train": (TrainConfig, "training"),
    "predict": (PredictConfig, "prediction"),
}
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
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return str(value)


def _add_fields(p, section: str, defaults, only: Sequence[str] | None = None, group=None):
    """One option per CLI field of a config section. Every option defaults to None (=
    keep the base settings' value); the help shows the default the command uses
    (``defaults``: an instance, or a string such as "the preset's")."""
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
        elif meta.get("action") == "append":
            pass
        elif kind.startswith("int"):
            kw["type"] = int
        elif kind.startswith("float"):
            kw["type"] = float
        if isinstance(defaults, str):
            shown = defaults
        else:
            value = getattr(getattr(defaults, section), f.name)
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


def settings_from_args(args, base: RunSettings) -> RunSettings:
    """``base`` with every option the user gave applied (ConfigError when out of range)."""
    parts = {}
    for section, (cls, _) in SECTIONS.items():
        upd = {}
        for f in cli_fields(cls):
            v = getattr(args, f"{section}.{f.name}", None)
            if v is None:
                continue
            if f.metadata.get("nargs") == 3:
                v = None if not any(v) else list(v)
            elif f.name == "modalities":
                pairs = [m.split("=", 1) for m in v]
                for m, pair in zip(v, pairs, strict=True):
                    if len(pair) != 2 or not all(pair):
                        raise ConfigError("modalities", f"expects NAME=PATTERN, got {m!r}")
                v = dict(pairs)
            upd[f.name] = v
        parts[section] = replace(getattr(base, section), **upd)
    return RunSettings(**parts)


# --------------------------------------------------------------------------------------
# commands: parse -> call the application -> print
# --------------------------------------------------------------------------------------
def cmd_synth(args) -> int:
    from .pipeline import synth

    t0 = time.perf_counter()
    stats = synth(
        args.out,
        n=args.n,
        shape=args.shape,
        seed=args.seed,
        lesion_fraction=args.lesion_fraction,
        noise=args.noise,
        bias=args.bias,
        keep_skull=args.keep_skull,
        brains=args.brains,
        lesion_masks=args.lesion_masks,
        exclude_masks=args.exclude_masks,
        contrast=args.contrast,
        progress=not args.quiet,
    )
    fr = [s["lesion_fraction"] for s in stats]
    print(
        f"wrote {len(stats)} subjects to {args.out} in {time.perf_counter() - t0:.1f} s; "
        f"lesion fraction {100 * min(fr):.3f}–{100 * max(fr):.3f} % of voxels"
    )
    return EXIT_OK


def cmd_train(args) -> int:
    out = Path(args.out)
    base = PRESETS[args.preset].run if args.preset else RunSettings()
    if args.resume and (out / "run.json").is_file():
        base = RunSettings.load(out / "run.json")  # resume with the run's own settings
    settings = settings_from_args(args, base).validate()
    if getattr(args, "train.val_every") is not None and not settings.data.val_subjects:
        raise ConfigError("val_every", "only applies with --val-subjects (none given)")
    from .pipeline import find_dataset, train_run

    subjects = find_dataset(args.data, settings.data)
    held = settings.data.val_subjects or []
    t = settings.train
    print(
        f"training on {len(subjects) - len(held)} subjects from {args.data}"
        + (f" ({', '.join(held)} held out for validation)" if held else "")
        + f": alpha={t.alpha} "
        f"beta={t.beta} gamma={t.gamma}"
        + (f" + {t.ce_weight:g}×cross-entropy" if t.ce_weight else "")
        + f", {t.steps} steps"
    )
    _, result = train_run(
        subjects,
        settings,
        out,
        resume=args.resume,
        progress=not args.quiet,
        transplant_masks=args.transplant_masks,
        exclude=args.exclude_masks,
    )
    last = f"{result.losses[-1]:.4f}" if result.losses else "n/a"
    print(
        f"done: step {result.step}, last loss {last}, {result.seconds:.1f} s, "
        f"checkpoint {result.checkpoint}"
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
    from .pipeline import predict_dataset

    n = predict_dataset(
        args.data,
        args.model,
        args.out,
        window=window,
        threshold=threshold,
        device=args.device,
        progress=not args.quiet,
        weighting=getattr(args, "predict.weighting"),
        mirror=getattr(args, "predict.mirror"),
        min_lesion_size=getattr(args, "predict.min_lesion_size"),
        checkpoint=args.weights,
    )
    print(f"wrote probability maps and masks of {n} subjects to {args.out}")
    return EXIT_OK


def cmd_evaluate(args) -> int:
    settings = settings_from_args(args, RunSettings())
    threshold = settings.predict.threshold
    from .pipeline import evaluate_folder, metric_table

    rows, files = evaluate_folder(
        args.pred,
        args.data,
        args.out,
        config=settings.data,
        threshold=threshold,
        min_lesion_size=settings.predict.min_lesion_size,
    )
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
    preset = PRESETS[args.preset]
    base = settings_from_args(args, preset.run)
    settings_list = None
    if args.settings:
        settings_list = []
        for s in args.settings:
            try:
                t = tuple(float(v) for v in s.split(","))
                if len(t) not in (2, 3):
                    raise ValueError
            except ValueError:
                msg = f"expects A,B or A,B,CE such as 0.3,0.7 or 0.3,0.7,1, got {s!r}"
                raise ConfigError("settings", msg) from None
            settings_list.append(t)
    from .experiment import PAPER_SETTINGS, reproduce

    summary = reproduce(
        base,
        args.out,
        preset_name=args.preset,
        data=args.data,
        n_subjects=args.n_subjects,
        settings_list=settings_list or PAPER_SETTINGS,
        folds=args.folds,
        threshold=base.predict.threshold,
        transplant_masks=args.transplant_masks,
        transplant_n=args.transplant_n,
        seeds=args.seeds,
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

    result = demo(
        args.out,
        n=args.n,
        steps=args.steps,
        seed=args.seed,
        force=args.force,
        progress=not args.quiet,
    )
    f = result["files"]
    print(f"done in {result['seconds']:.0f} s: {f['md']}, {f['pr']}, {f['overlay']}")
    return EXIT_OK


# --------------------------------------------------------------------------------------
# argument parsing
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
    common = [quiet]

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
    p.add_argument(
        "--shape",
        type=int,
        nargs=3,
        default=[96, 112, 96],
        metavar=("X", "Y", "Z"),
        help="phantom grid; the head fills an MNI-sized 182×218×182 mm box [default: 96 112 96]",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (>= 0) [default: 0]")
    p.add_argument(
        "--lesion-fraction",
        type=float,
        nargs="+",
        metavar="F",
        help="lesion voxels / all voxels, or LOW HIGH for a log-uniform range "
        "[default: 1.2e-4 6.5e-3, i.e. 0.012–0.65 %%]",
    )
    p.add_argument(
        "--noise", type=float, default=0.03, help="Rician noise / WM intensity [default: 0.03]"
    )
    p.add_argument(
        "--bias", type=float, default=0.12, help="bias-field amplitude (log) [default: 0.12]"
    )
    p.add_argument("--keep-skull", action="store_true", help="keep scalp and skull")
    p.add_argument("--brains", help="transplant mode: dataset folder of real brains")
    p.add_argument("--lesion-masks", help="transplant mode: folder of lesion-mask NIfTI files")
    p.add_argument(
        "--exclude-masks",
        nargs="+",
        default=[],
        metavar="NAME",
        help="transplant mode: also skip these masks (e.g. held-out test patients); masks "
        "named like one of the brains are always skipped [default: none]",
    )
    p.add_argument(
        "--contrast",
        choices=list(TRANSPLANT_CONTRASTS),
        default="varied",
        help="transplant mode: lesion contrast: typical = one per subject, FLAIR ~1.35x "
        "white matter; wide = one per lesion, FLAIR 1.1-1.9x; varied = one per lesion and "
        "modality, FLAIR 1.2-1.7x; varied-cortex = varied, grey matter re-contrasted per "
        "brain copy [default: varied, as the lesion-cpu preset trains]",
    )

    defaults = RunSettings()
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
    p.add_argument(
        "--exclude-masks",
        nargs="+",
        default=[],
        metavar="NAME",
        help="with --transplant-masks: also skip these masks, e.g. the patients you will "
        "test on, so their lesion shapes never reach training [default: none]",
    )
    for section in SECTIONS:
        _add_fields(
            p,
            section,
            defaults,
            only=None if section != "predict" else ["window", "min_lesion_size"],
        )

    p = _sub(
        sub,
        "predict",
        common,
        "probability maps and masks for a dataset",
        "Write OUT/<subject>/prob.nii.gz (float32 lesion probability) and mask.nii.gz "
        "(prob >= threshold) on each input's grid and affine. Masks in the input are "
        "not needed.",
        cmd_predict,
    )
    p.add_argument("data", help="dataset folder")
    p.add_argument("--model", required=True, help="run folder written by `train`")
    p.add_argument("--out", required=True, help="predictions folder")
    g = p.add_argument_group("prediction")
    _add_fields(
        p,
        "predict",
        "the run's",
        only=["window", "threshold", "weighting", "mirror", "min_lesion_size"],
        group=g,
    )
    g.add_argument("--device", default=None, help="cpu, cuda, ... [default: the run's]")
    g.add_argument(  # not --checkpoint: train's --checkpoint is activation checkpointing
        "--weights",
        choices=list(RUN_CHECKPOINTS),
        default="last",
        help="which weights: last (the end of training) or best (the best validation "
        "score, for a run trained with --val-subjects) [default: last]",
    )

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
    _add_fields(p, "data", defaults, only=["modalities", "mask_pattern"])
    _add_fields(p, "predict", defaults, only=["threshold", "min_lesion_size"])

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
    p.add_argument("--n-subjects", type=int, help="phantoms to synthesise [default: the preset's]")
    p.add_argument(
        "--folds", type=int, default=2, help="cross-validation folds (>= 2) [default: 2]"
    )
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
    p.add_argument(
        "--settings",
        nargs="+",
        metavar="A,B[,CE]",
        help="(α, β) pairs instead of the paper's five, e.g. 0.5,0.5 0.3,0.7; a third "
        "number adds that weight of cross-entropy (0.3,0.7,1 = Tversky + CE) "
        "[default: --ce-weight for pairs]",
    )
    p.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        metavar="N",
        help="repeat every setting with these training seeds; the table adds mean ± sd "
        "and a bootstrap 95 %% CI over seeds [default: --seed only]",
    )
    for section in SECTIONS:  # the folds choose the held-out subjects, not --val-subjects
        only = [f.name for f in cli_fields(SECTIONS[section][0]) if f.name not in TRAIN_ONLY]
        _add_fields(p, section, "the preset's", only=only)

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
    p.add_argument(
        "--force", action="store_true", help="overwrite the demo's files in an existing --out"
    )
    p.add_argument("--n", type=int, default=6, help="phantoms, a third held out [default: 6]")
    p.add_argument(
        "--steps",
        type=int,
        default=PRESETS["quick"].run.train.steps,
        help=f"training steps (>= 1) [default: {PRESETS['quick'].run.train.steps}]",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of data, initialisation, batches [default: 0]"
    )
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
