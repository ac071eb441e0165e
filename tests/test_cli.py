"""The fasttversky command line on tiny phantoms (seconds on a CPU): synth -> train ->
predict -> evaluate, demo, every --help, and every bad input driven through main():
one ``error:`` line on stderr, no traceback, the documented exit status, and no work
done (no run folder written) when an option is out of range."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from fasttversky.app import cli
from fasttversky.app.cli import EXIT_ERROR, EXIT_OK, EXIT_USAGE, build_parser, main
from fasttversky.app.config import NORMS, PRECISIONS, RunSettings

COMMANDS = ["synth", "train", "predict", "evaluate", "bench", "reproduce", "demo"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY_TRAIN = [
    "--steps",
    "3",
    "--base-features",
    "2",
    "--levels",
    "2",
    "--checkpoint",
    "none",
    "--patch-size",
    "16",
    "16",
    "16",
    "--batch-size",
    "2",
    "--lr",
    "1e-3",
    "--quiet",
]


def _valid_png(path):
    assert path.is_file() and path.read_bytes()[:8] == PNG_MAGIC, path
    import matplotlib.image as mpimg

    img = mpimg.imread(str(path))
    assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50
    assert img[..., :3].std() > 0  # not a blank canvas


def _run(argv, capsys):
    """main(argv) -> (exit status, stdout, stderr)."""
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _assert_one_line_error(err: str, pattern: str):
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert __import__("re").search(pattern, lines[0]), (pattern, lines[0])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Three tiny phantoms (shared read-only by the tests of this module)."""
    data = tmp_path_factory.mktemp("cli") / "data"
    assert (
        main(
            [
                "synth",
                str(data),
                "--n",
                "3",
                "--shape",
                "32",
                "40",
                "32",
                "--lesion-fraction",
                "3e-3",
                "--quiet",
            ]
        )
        == 0
    )
    return data


# --------------------------------------------------------------------------------------
# help text
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", COMMANDS)
def test_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: fasttversky " + command)
    assert "(default: None)" not in out and "[default: None]" not in out
    assert "exit status:" in out


def _subparsers(parser):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    raise AssertionError("no subcommands")


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_has_a_description(command):
    for action in _subparsers(build_parser())[command]._actions:
        assert action.help and action.help.strip(), action.option_strings or action.dest


def test_choices_come_from_the_modules_constants():
    train = _subparsers(build_parser())["train"]
    by_flag = {s: a for a in train._actions for s in a.option_strings}
    assert tuple(by_flag["--norm"].choices) == NORMS
    assert tuple(by_flag["--precision"].choices) == PRECISIONS
    from fasttversky.app.models.unet import CHECKPOINT_MODES

    assert tuple(by_flag["--checkpoint"].choices) == CHECKPOINT_MODES


def test_top_level_help_lists_commands_and_exit_codes():
    text = build_parser().format_help()
    for c in COMMANDS:
        assert c in text
    for code in ("0", "1", "2"):
        assert f"\n  {code} " in text


def test_cli_module_imports_nothing_heavy():
    """`fasttversky --help` must not wait for torch (seconds on a 2-core machine)."""
    code = (
        "import sys\n"
        "from fasttversky.app.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'nibabel', 'matplotlib', 'scipy', 'tqdm') "
        "if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    ).stdout
    assert "HEAVY []" in out, out


def test_missing_app_dependencies_one_line(monkeypatch, capsys, tmp_path):
    real = cli.importlib.util.find_spec
    monkeypatch.setattr(
        cli.importlib.util, "find_spec", lambda n, *a: None if n == "nibabel" else real(n, *a)
    )
    code, _, err = _run(["synth", str(tmp_path / "d"), "--quiet"], capsys)
    assert code == EXIT_ERROR
    _assert_one_line_error(err, r"missing: nibabel.*pip install 'fasttversky\[app\]'")
    assert not (tmp_path / "d").exists()
    # bench needs only the loss (torch): it runs, here up to its own error
    code, _, err = _run(["bench", "--from-json", str(tmp_path / "none.json")], capsys)
    assert code == EXIT_ERROR
    _assert_one_line_error(err, r"none\.json: no such file")


# --------------------------------------------------------------------------------------
# the main path
# --------------------------------------------------------------------------------------
def test_synth_train_predict_evaluate(dataset, tmp_path, capsys):
    data, run, pred = dataset, tmp_path / "run", tmp_path / "pred"
    assert sorted(p.name for p in data.iterdir() if p.is_dir()) == [
        "subject01",
        "subject02",
        "subject03",
    ]
    argv = ["train", str(data), "--out", str(run), *TINY_TRAIN, "--alpha", "0.3", "--beta", "0.7"]
    assert main(argv) == 0
    assert (run / "last.pt").is_file()
    settings = RunSettings.load(run / "run.json")
    assert settings.train.alpha == 0.3 and settings.train.beta == 0.7
    assert settings.train.steps == 3 and settings.model.levels == 2
    assert settings.data.patch_size == [16, 16, 16]
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in log)

    # resume to more steps continues from the checkpoint with the run's own settings
    assert main(["train", str(data), "--out", str(run), "--steps", "4", "--resume", "--quiet"]) == 0
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert RunSettings.load(run / "run.json").model.levels == 2

    assert main(["predict", str(data), "--model", str(run), "--out", str(pred), "--quiet"]) == 0
    src = nib.load(str(data / "subject02" / "FLAIR.nii.gz"))
    prob = nib.load(str(pred / "subject02" / "prob.nii.gz"))
    mask = nib.load(str(pred / "subject02" / "mask.nii.gz"))
    assert prob.shape == mask.shape == src.shape
    np.testing.assert_allclose(prob.affine, src.affine)
    np.testing.assert_allclose(mask.affine, src.affine)
    p = np.asanyarray(prob.dataobj)
    assert p.dtype == np.float32 and 0 <= p.min() and p.max() <= 1
    np.testing.assert_array_equal(np.asanyarray(mask.dataobj), (p >= 0.5).astype(np.uint8))

    code, out, _ = _run(
        ["evaluate", str(pred), "--data", str(data), "--out", str(tmp_path / "ev"), "--quiet"],
        capsys,
    )
    assert code == 0 and "pooled" in out and "APR" in out
    rows = list(csv.DictReader(open(tmp_path / "ev" / "metrics.csv")))
    assert [r["subject"] for r in rows] == ["subject01", "subject02", "subject03", "pooled"]
    # The CSV holds what fasttversky.app.metrics computes from the written files.
    from fasttversky.app.metrics import segmentation_metrics

    for r in rows[:-1]:
        pr = np.asanyarray(nib.load(str(pred / r["subject"] / "prob.nii.gz")).dataobj)
        tg = np.asanyarray(nib.load(str(data / r["subject"] / "mask.nii.gz")).dataobj)
        m = segmentation_metrics(pr, tg.astype(np.uint8))
        for k in ("dsc", "sensitivity", "specificity", "f2", "apr"):
            assert float(r[k]) == pytest.approx(m[k], nan_ok=True, rel=1e-12), k
    _valid_png(tmp_path / "ev" / "pr_curve.png")


def test_train_with_validation_subjects(dataset, tmp_path, capsys, monkeypatch):
    """--val-subjects: the subject is never trained on, it is scored every --val-every
    steps exactly as `predict` scores it (counts checked against the files `predict
    --weights best` writes), and best.pt is the checkpoint of the best score."""
    import shutil

    import torch

    from fasttversky.app import data as data_mod

    trained_on = []
    real = data_mod.LesionDataset

    def spy(subjects, *a, **kw):
        trained_on.extend(s.name for s in subjects)
        return real(subjects, *a, **kw)

    monkeypatch.setattr(data_mod, "LesionDataset", spy)
    run = tmp_path / "run"
    # (4 features, lr 1e-2, lesion-centred patches: at step 2 the net marks lesions and
    # more, so the counts compared below are not all zero)
    argv = ["train", str(dataset), "--out", str(run), *TINY_TRAIN, "--steps", "6"]
    argv += ["--base-features", "4", "--lr", "1e-2", "--lesion-prob", "0.9"]
    argv += ["--val-subjects", "subject03", "--val-every", "2", "--keep-every", "1"]
    code, out, _ = _run(argv, capsys)
    assert code == 0 and "best validation DSC" in out
    assert trained_on == ["subject01", "subject02"]
    assert RunSettings.load(run / "run.json").data.val_subjects == ["subject03"]
    rows = [json.loads(s) for s in (run / "val.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6]
    best = max(rows, key=lambda r: (r["score"], -r["step"]))  # first of the highest
    assert best["best"] and [r["best"] for r in rows].count(True) >= 1
    assert best["tp"] > 0 and best["fp"] > 0, rows  # a comparison that can fail
    ckpt = torch.load(run / "best.pt", weights_only=True)
    assert ckpt["step"] == best["step"]
    step_file = torch.load(run / f"step_{best['step']:06d}.pt", weights_only=True)
    assert all(torch.equal(v, step_file["model"][k]) for k, v in ckpt["model"].items())

    # The logged counts are those of `predict --weights best` on the held-out subject.
    only = tmp_path / "only03"
    shutil.copytree(dataset / "subject03", only / "subject03")
    pred = tmp_path / "pred"
    argv = ["predict", str(only), "--model", str(run), "--out", str(pred), "--weights", "best"]
    assert main([*argv, "--quiet"]) == 0
    assert json.loads((pred / "inference.json").read_text())["checkpoint"] == "best.pt"
    m = np.asanyarray(nib.load(str(pred / "subject03" / "mask.nii.gz")).dataobj) > 0
    t = np.asanyarray(nib.load(str(dataset / "subject03" / "mask.nii.gz")).dataobj) > 0
    assert (best["tp"], best["fp"], best["fn"]) == ((m & t).sum(), (m & ~t).sum(), (~m & t).sum())
    assert best["dsc"] == pytest.approx(2 * (m & t).sum() / (m.sum() + t.sum()), rel=1e-12)

    # A resumed run keeps its held-out subjects (another set changes what is trained on).
    resume = ["train", str(dataset), "--out", str(run), "--resume", "--steps", "8", "--quiet"]
    code, _, err = _run([*resume, "--val-subjects", "subject02"], capsys)
    assert code == EXIT_USAGE
    _assert_one_line_error(err, r"--val-subjects \['subject02'\] differs from the run's")
    # A fresh run without validation replacing this one (--force) leaves no stale best.pt
    # or scores behind, and `predict --weights best` says why there is none: one line,
    # exit 1.
    assert main(["train", str(dataset), "--out", str(run), *TINY_TRAIN, "--force"]) == 0
    assert not (run / "best.pt").exists() and not (run / "val.jsonl").exists()
    code, _, err = _run([*argv[:5], str(tmp_path / "p2"), *argv[6:]], capsys)
    assert code == EXIT_ERROR
    _assert_one_line_error(err, r"best\.pt missing; the run was trained without --val-subjects")


def test_validation_subject_without_lesions_is_refused(tmp_path, capsys):
    data, run = tmp_path / "data", tmp_path / "run"
    _write_subject(data, "s1")
    _write_subject(data, "s2", mask=np.zeros((16, 16, 16), np.uint8))
    code, _, err = _run(
        ["train", str(data), "--out", str(run), *TINY_TRAIN, "--val-subjects", "s2"], capsys
    )
    assert code == EXIT_USAGE
    _assert_one_line_error(err, r"--val-subjects \['s2'\] hold no lesion voxel")
    assert not run.exists()


def test_train_bitwise_reproducible_and_seeded(dataset, tmp_path):
    for name in ("a", "b"):
        assert main(["train", str(dataset), "--out", str(tmp_path / name), *TINY_TRAIN]) == 0
    logs = [
        [json.loads(s)["loss"] for s in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
        for n in ("a", "b")
    ]
    assert logs[0] == logs[1]


# --------------------------------------------------------------------------------------
# bad input: one line, exit status, nothing done
# --------------------------------------------------------------------------------------
BAD_TRAIN_OPTIONS = [
    (["--alpha", "-1"], r"--alpha must be >= 0, got -1"),
    (["--beta", "-1"], r"--beta must be >= 0, got -1"),
    (["--alpha", "0", "--beta", "0"], r"--alpha \+ --beta must be > 0"),
    (["--alpha", "nan"], r"--alpha must be a finite number"),
    (["--alpha", "abc"], r"argument --alpha: invalid float value: 'abc'"),
    (["--steps", "0"], r"--steps must be >= 1, got 0"),
    (["--steps", "-5"], r"--steps must be >= 0, got -5|--steps must be >= 1"),
    (["--gamma", "0"], r"--gamma must be > 0"),
    (["--lr", "0"], r"--lr must be > 0"),
    (["--lr-decay", "-0.5"], r"--lr-decay must be > 0"),
    (["--batch-size", "0"], r"--batch-size must be >= 1"),
    (["--lesion-prob", "1.5"], r"--lesion-prob must be in \[0, 1\]"),
    (["--levels", "0"], r"--levels must be >= 1"),
    (["--seed", "-1"], r"--seed must be >= 0"),
    (["--levels", "3", "--patch-size", "14", "16", "16"], r"--patch-size 14 16 16 must be divis"),
    (["--patch-size", "0", "16", "16"], r"--patch-size must be 3 positive integers"),
    (["--backend", "nope"], r"--backend must be one of auto, .*torch.*; got 'nope'"),
    (["--precision", "fp8"], r"argument --precision: invalid choice: 'fp8'"),
    (["--modality", "T1"], r"--modality expects NAME=PATTERN, got 'T1'"),
    (["--window", "8", "0", "8"], r"--window must be 3 positive integers"),
    (["--bogus"], r"unrecognized arguments: --bogus"),
    (["--device", "cuda:99"], r"--device cuda:99: (only \d+ CUDA device|torch sees no CUDA)"),
    (["--device", "banana"], r"--device 'banana' is not a device name"),
    (["--val-subjects", "nobody"], r"--val-subjects \['nobody'\] are not subjects of the data"),
    (
        ["--val-subjects", "subject01", "subject02", "subject03"],
        r"--val-subjects \[.*\] leave no subject to train on",
    ),
    (["--val-subjects", "subject01", "subject01"], r"--val-subjects names a subject twice"),
    (["--val-every", "0"], r"--val-every must be >= 1, got 0"),
    (["--val-every", "5"], r"--val-every only applies with --val-subjects"),
]


@pytest.mark.parametrize(
    "extra, pattern", BAD_TRAIN_OPTIONS, ids=[" ".join(a) for a, _ in BAD_TRAIN_OPTIONS]
)
def test_train_bad_option(dataset, tmp_path, capsys, extra, pattern):
    run = tmp_path / "run"
    # A tiny valid run first (later options win), so that a wrongly accepted option
    # costs a second, not a 2000-step default run.
    argv = ["train", str(dataset), "--out", str(run), *TINY_TRAIN, *extra]
    try:
        code, _, err = _run(argv, capsys)
    except SystemExit as e:  # argparse's own errors exit from inside parse_args
        code, err = e.code, capsys.readouterr().err
    assert code == EXIT_USAGE
    _assert_one_line_error(err, pattern)
    assert not run.exists()  # rejected before any work


def _write_subject(root, name, *, mask=None, flair=None, shape=(16, 16, 16), affine=None):
    rng = np.random.default_rng(len(name))
    affine = np.eye(4) if affine is None else affine
    d = root / name
    d.mkdir(parents=True)
    for m in ("T1", "T2", "FLAIR"):
        v = rng.random(shape).astype(np.float32) + 0.5
        if m == "FLAIR" and flair is not None:
            v = flair
        nib.save(nib.Nifti1Image(v, affine), str(d / f"{m}.nii.gz"))
    if mask is None:
        mask = np.zeros(shape, np.uint8)
        mask[4:6, 4:6, 4:6] = 1
    nib.save(nib.Nifti1Image(mask, affine), str(d / "mask.nii.gz"))
    return d


def _mask(values, shape=(16, 16, 16)):
    m = np.zeros(shape, np.float32)
    for k, v in enumerate(values):
        m[4 + k, 4, 4] = v
    return m


BAD_DATA = {
    "mask 0-2": (
        lambda r: _write_subject(r, "s2", mask=_mask([2])),
        r"s2/mask\.nii\.gz: .*not binary.*\(2\)",
    ),
    "mask 0-1-2": (
        lambda r: _write_subject(r, "s2", mask=_mask([1, 2])),
        r"s2/mask\.nii\.gz: lesion mask is not binary",
    ),
    "mask 0.5": (lambda r: _write_subject(r, "s2", mask=_mask([0.5])), r"not binary.*0\.5"),
    "mask negative": (lambda r: _write_subject(r, "s2", mask=_mask([1, -1])), r"not binary.*-1"),
    "empty FLAIR": (
        lambda r: _write_subject(r, "s2", flair=np.zeros((16, 16, 16), np.float32)),
        r"s2/FLAIR\.nii\.gz: volume is empty",
    ),
    "4-D FLAIR": (
        lambda r: _write_subject(r, "s2", flair=np.ones((16, 16, 16, 2), np.float32)),
        r"FLAIR\.nii\.gz: expected a 3-D volume",
    ),
    "mask on another grid": (
        lambda r: _write_subject(r, "s2", mask=np.zeros((16, 16, 8), np.uint8)),
        r"mask\.nii\.gz has shape \(16, 16, 8\) but T1\.nii\.gz has \(16, 16, 16\)",
    ),
    "corrupt FLAIR": (
        lambda r: (_write_subject(r, "s2") / "FLAIR.nii.gz").write_bytes(b"not a nifti" * 10),
        r"FLAIR\.nii\.gz: cannot read as NIfTI",
    ),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_train_bad_subject_fails_before_training(tmp_path, capsys, case):
    """The broken subject is the last one: it must still fail before any step runs."""
    make, pattern = BAD_DATA[case]
    data = tmp_path / "data"
    _write_subject(data, "s1")
    make(data)
    run = tmp_path / "run"
    code, _, err = _run(["train", str(data), "--out", str(run), *TINY_TRAIN], capsys)
    assert code == EXIT_ERROR
    _assert_one_line_error(err, pattern)
    assert not (run / "last.pt").exists() and not (run / "metrics.jsonl").exists()


def test_predict_checks_every_subject_before_writing(dataset, tmp_path, capsys):
    run, data = tmp_path / "run", tmp_path / "data"
    assert main(["train", str(dataset), "--out", str(run), *TINY_TRAIN]) == 0
    import shutil

    shutil.copytree(dataset, data)
    (data / "subject03" / "T2.nii.gz").write_bytes(b"broken" * 20)  # the last subject
    pred = tmp_path / "pred"
    code, _, err = _run(
        ["predict", str(data), "--model", str(run), "--out", str(pred), "--quiet"], capsys
    )
    assert code == EXIT_ERROR
    _assert_one_line_error(err, r"subject03/T2\.nii\.gz: cannot read as NIfTI")
    assert not pred.exists()


def test_other_bad_inputs(dataset, tmp_path, capsys):
    missing = str(tmp_path / "missing")
    cases = [
        (["train", missing, "--out", str(tmp_path / "r")], EXIT_ERROR, r"does not exist"),
        (
            ["train", str(dataset), "--out", str(tmp_path / "r"), "--resume"],
            EXIT_ERROR,
            r"last\.pt missing: nothing to resume",
        ),
        (["predict", str(dataset), "--model", missing, "--out", missing], 1, "not a run folder"),
        (
            ["predict", str(dataset), "--model", missing, "--out", missing, "--threshold", "2"],
            2,
            r"--threshold must be in \(0, 1\), got 2",
        ),
        (
            ["predict", str(dataset), "--model", missing, "--out", missing, "--threshold", "0"],
            2,
            r"--threshold must be in \(0, 1\)",
        ),
        (
            ["predict", str(dataset), "--model", missing, "--out", missing, "--device", "gpu0"],
            2,
            r"--device 'gpu0' is not a device name",
        ),
        (["evaluate", missing, "--data", str(dataset)], 1, "predictions folder .* does not exist"),
        (["evaluate", str(dataset), "--data", missing], 1, "dataset folder .* does not exist"),
        (
            ["evaluate", str(dataset), "--data", str(dataset), "--threshold", "1"],
            2,
            r"--threshold must be in \(0, 1\)",
        ),
        (["bench", "--from-json", missing + ".json"], 1, r"missing\.json: no such file"),
        (["bench", "--repeats", "0", "--quick"], 2, r"--repeats must be >= 1"),
        (["demo", "--steps", "0", "--out", missing], 2, r"--steps must be >= 1, got 0"),
        (["demo", "--n", "1", "--out", missing], 2, r"--n must be >= 2"),
        (["synth", missing, "--n", "0"], 2, r"--n must be >= 1"),
        (["synth", missing, "--brains", missing], 2, r"--brains and --lesion-masks go together"),
        (["reproduce", "--folds", "1", "--out", missing], 2, r"--folds must be >= 2"),
        (["reproduce", "--settings", "0,0", "--out", missing], 2, r"--alpha \+ --beta must be > 0"),
        (
            ["reproduce", "--settings", "x", "--out", missing],
            2,
            r"--settings expects A,B or A,B,CE",
        ),
        (
            ["reproduce", "--settings", "0.3,0.7,-1", "--out", missing],
            2,
            r"--ce-weight must be >= 0",
        ),
        (
            ["reproduce", "--threshold", "2", "--out", missing],
            2,
            r"--threshold must be in \(0, 1\)",
        ),
        (["reproduce", "--preset", "nope"], 2, r"argument --preset: invalid choice"),
        (  # the folds hold subjects out in reproduce
            ["reproduce", "--val-subjects", "subject01", "--out", missing],
            2,
            r"unrecognized arguments: --val-subjects subject01",
        ),
        (["nope"], 2, r"invalid choice: 'nope'"),
    ]
    for argv, want, pattern in cases:
        try:
            code, _, err = _run(argv, capsys)
        except SystemExit as e:
            code, err = e.code, capsys.readouterr().err
        assert code == want, (argv, code, err)
        _assert_one_line_error(err, pattern)
    assert not (tmp_path / "missing").exists()  # nothing was written anywhere
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "argv, status, pattern",
    [
        (["train", "DATA", "--out", "RUN", "--alpha", "-1"], 2, r"^error: --alpha must be >= 0"),
        (["bench", "--from-json", "missing.json"], 1, r"^error: missing\.json: no such file"),
        (["train", "DATA"], 2, r"^error: the following arguments are required: --out"),
    ],
)
def test_process_exit_status_and_stderr(tmp_path, argv, status, pattern):
    """As a user's shell sees it: the process's status and its whole stderr."""
    import re

    proc = subprocess.run(
        [sys.executable, "-m", "fasttversky.app.cli", *argv],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == status
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(pattern, lines[0]), proc.stderr
    assert not (tmp_path / "RUN").exists()


def test_error_without_traceback_for_unexpected_exceptions(monkeypatch, capsys, tmp_path):
    def boom(args):
        raise RuntimeError("something\nbroke")

    monkeypatch.setattr(cli, "cmd_synth", boom)
    monkeypatch.setattr(
        cli, "build_parser", lambda real=cli.build_parser: _with_func(real(), "synth", boom)
    )
    code, _, err = _run(["synth", str(tmp_path / "x")], capsys)
    assert code == EXIT_ERROR
    _assert_one_line_error(err, r"RuntimeError: something broke \(FASTTVERSKY_DEBUG=1")


def _with_func(parser, command, func):
    _subparsers(parser)[command].set_defaults(func=func)
    return parser


# --------------------------------------------------------------------------------------
# demo, bench
# --------------------------------------------------------------------------------------
def test_demo_writes_a_fresh_folder_or_asks_for_force(tmp_path, capsys):
    out = tmp_path / "demo"
    code, stdout, _ = _run(
        ["demo", "--out", str(out), "--n", "2", "--steps", "1", "--quiet"], capsys
    )
    assert code == EXIT_OK
    assert "pooled" in stdout and "APR" in stdout
    for f in ("pr_curve.png", "overlay.png"):
        _valid_png(out / f)
    assert (out / "run" / "last.pt").is_file() and (out / "metrics.csv").is_file()
    before = (out / "metrics.csv").read_bytes()
    code, _, err = _run(["demo", "--out", str(out), "--n", "2", "--steps", "1"], capsys)
    assert code == EXIT_USAGE
    _assert_one_line_error(err, r"--out .*demo already exists .*pass --force")
    assert (out / "metrics.csv").read_bytes() == before  # untouched


def test_force_removes_only_what_the_demo_writes(tmp_path):
    from fasttversky.app.pipeline import DEMO_FILES, check_fresh_folder

    out = tmp_path / "d"
    (out / "data" / "s").mkdir(parents=True)
    (out / "metrics.md").write_text("old")
    (out / "notes.txt").write_text("mine")
    check_fresh_folder(out, True, DEMO_FILES)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    check_fresh_folder(tmp_path / "new", False, DEMO_FILES)  # a new folder is fine


def test_demo_default_folder_is_git_ignored():
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    default = _subparsers(build_parser())["demo"].get_default("out")
    ignore = (root / ".gitignore").read_text().split()
    assert f"/{default}/" in ignore or f"{default}/" in ignore


def test_bench_quick_report_and_from_json(tmp_path, capsys):
    out = tmp_path / "b.md"
    code, stdout, _ = _run(
        [
            "bench",
            "--quick",
            "--device",
            "cpu",
            "--backends",
            "torch",
            "--repeats",
            "1",
            "--out",
            str(out),
            "--quiet",
        ],
        capsys,
    )
    assert code == EXIT_OK
    report = json.loads(out.with_suffix(".json").read_text())
    providers = {(r["provider"], r["mode"]) for r in report["results"]}
    assert providers == {(p, m) for p in ("plain torch", "fused torch") for m in ("fwd", "fwdbwd")}
    # The fused loss agrees with the plain composition (fp32, ~2.6e5 voxels).
    assert all(r["abs_diff_vs_plain"] < 1e-5 for r in report["results"])
    assert "| fused torch | fwdbwd |" in stdout
    code, again, _ = _run(["bench", "--from-json", str(out.with_suffix(".json"))], capsys)
    assert code == EXIT_OK and again.strip() == out.read_text().strip()
