"""`fasttversky predict --model RUN [RUN ...]` (issue 29, item 1): an ensemble's
probability is the mean of its runs' own probabilities (each with its own windows and
normalisation), thresholded as one run's; one run is the single-run path bit for bit;
runs that read different channels or grids are refused from their run.json alone,
before any checkpoint or volume is read; inference.json names every run and checkpoint
hash. Two tiny runs trained here on phantoms (seconds)."""

from __future__ import annotations

import hashlib
import json
import re
import shutil

import nibabel as nib
import numpy as np
import pytest

from fasttversky.app.cli import EXIT_ERROR, EXIT_OK, EXIT_USAGE, main
from fasttversky.app.config import RunSettings

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_TRAIN = ["--steps", "2", "--base-features", "2", "--levels", "2", "--checkpoint", "none"]
TINY_TRAIN += ["--patch-size", "16", "16", "16", "--batch-size", "1", "--quiet"]
TINY_SYNTH = ["--shape", "32", "40", "32", "--lesion-fraction", "3e-3", "--quiet"]
# One rounding to float32 of a mean in [0, 1]: the ensemble rounds its float64 mean once.
FLOAT32_ROUNDING = 2.0**-24


def run(argv, capsys):
    """main(argv) -> (exit status, stdout, stderr), argparse's exits included."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str, pattern: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and re.search(pattern, lines[0]), (pattern, lines[0])
    return lines[0]


def volume(path) -> np.ndarray:
    return np.asanyarray(nib.load(str(path)).dataobj)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("ensemble") / "data"
    assert main(["synth", str(d), "--n", "2", *TINY_SYNTH]) == EXIT_OK
    return d


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """Two runs that differ in seed, normalisation and prediction window."""
    root = tmp_path_factory.mktemp("ensemble")
    a, b = root / "a", root / "b"
    assert main(["train", str(data), "--out", str(a), *TINY_TRAIN]) == EXIT_OK
    extra = ["--seed", "1", "--normalize", "white-matter", "--window", "32", "32", "32"]
    assert main(["train", str(data), "--out", str(b), *TINY_TRAIN, *extra]) == EXIT_OK
    return a, b


@pytest.fixture(scope="module")
def singles(data, runs, tmp_path_factory):
    """Each run's own predictions: {run: folder}."""
    out = {}
    for r in runs:
        pred = tmp_path_factory.mktemp("ensemble") / f"pred_{r.name}"
        argv = ["predict", str(data), "--model", str(r), "--out", str(pred), "--quiet"]
        assert main(argv) == EXIT_OK
        out[r] = pred
    return out


def test_ensemble_probability_is_the_mean_of_the_runs(data, runs, singles, tmp_path, capsys):
    pred = tmp_path / "ens"
    code, out, _ = run(["predict", data, "--model", *runs, "--out", pred, "--quiet"], capsys)
    assert code == EXIT_OK and "mean of 2 runs" in out
    for subject in ("subject01", "subject02"):
        pa, pb = (volume(singles[r] / subject / "prob.nii.gz") for r in runs)
        assert np.abs(pa.astype(np.float64) - pb).max() > 1e-3  # the runs differ
        got = volume(pred / subject / "prob.nii.gz")
        assert got.dtype == np.float32
        want = (pa.astype(np.float64) + pb.astype(np.float64)) / 2
        np.testing.assert_allclose(got, want, rtol=0, atol=FLOAT32_ROUNDING)
        mask = volume(pred / subject / "mask.nii.gz")
        np.testing.assert_array_equal(mask, (got >= 0.5).astype(np.uint8))


def test_inference_json_records_the_ensemble(data, runs, tmp_path, capsys):
    pred = tmp_path / "ens"
    argv = ["predict", data, "--model", *runs, "--out", pred, "--threshold", "0.4", "--quiet"]
    assert run(argv, capsys)[0] == EXIT_OK
    rec = json.loads((pred / "inference.json").read_text())
    assert rec["run"] == [str(r) for r in runs] and rec["checkpoint"] == "last.pt"
    assert rec["threshold"] == 0.4 and rec["min_lesion_size"] == 0
    assert rec["brain_only"] is True and "mean" in rec["ensemble"]
    assert "window" not in rec  # the runs' windows differ: recorded per model
    assert rec["overlap"] == 0.5 and rec["weighting"] == "gaussian" and rec["mirror"] == "none"
    for m, r, window in zip(rec["models"], runs, ([16] * 3, [32] * 3), strict=True):
        assert m["run"] == str(r) and m["checkpoint"] == "last.pt" and m["step"] == 2
        assert m["sha256"] == hashlib.sha256((r / "last.pt").read_bytes()).hexdigest()
        assert m["window"] == window
    mask = volume(pred / "subject01" / "mask.nii.gz")
    prob = volume(pred / "subject01" / "prob.nii.gz")
    np.testing.assert_array_equal(mask, (prob >= 0.4).astype(np.uint8))


def test_one_run_is_the_single_run_path_bitwise(data, runs, singles):
    """The single-run path (`segment_prepared`, what predict ran before ensembles)
    gives exactly the files `predict --model A` writes."""
    from fasttversky.app.data import find_subjects, prepare_subject
    from fasttversky.app.pipeline import load_run, segment_prepared

    model, settings = load_run(runs[0])
    for s in find_subjects(data, settings.data.modalities, None, False):
        p = prepare_subject(s, settings.data.target_shape, settings.data.normalisation)
        prob, mask = segment_prepared(model, p, settings)
        got = volume(singles[runs[0]] / s.name / "prob.nii.gz")
        assert got.dtype == prob.dtype and got.tobytes() == prob.tobytes()
        assert volume(singles[runs[0]] / s.name / "mask.nii.gz").tobytes() == mask.tobytes()
    rec = json.loads((singles[runs[0]] / "inference.json").read_text())
    assert list(rec)[:9] == [
        "run",
        "checkpoint",
        "window",
        "overlap",
        "threshold",
        "weighting",
        "mirror",
        "min_lesion_size",
        "brain_only",
    ]
    assert rec["run"] == str(runs[0]) and rec["window"] == [16] * 3 and len(rec["models"]) == 1


def _variant(run, tmp_path, name, section, **changes):
    """A copy of ``run``'s run.json alone (no checkpoint) with ``changes`` to a section:
    enough for the checks, which must refuse before any checkpoint is read."""
    d = tmp_path / name
    d.mkdir()
    s = json.loads((run / "run.json").read_text())
    s[section].update(changes)
    (d / "run.json").write_text(json.dumps(s))
    return d


def test_incompatible_runs_are_refused_before_any_file_is_read(runs, tmp_path, capsys):
    a = runs[0]
    channels = json.loads((a / "run.json").read_text())["data"]["modalities"]
    swapped = dict(reversed(list(channels.items())))
    t6 = _variant(a, tmp_path, "t6", "predict", threshold=0.6)
    cases = [
        (
            [a, _variant(a, tmp_path, "t1flair", "data", modalities={"T1": "t1", "FLAIR": "f"})],
            r"t1flair was trained with channels \(NAME=PATTERN\) T1=t1 FLAIR=f but .* "
            r"T1=t1 T2=t2 FLAIR=flair; the runs of an ensemble must read the same channels",
        ),
        (
            [a, _variant(a, tmp_path, "swapped", "data", modalities=swapped)],
            r"swapped was trained with channels .*FLAIR=flair T2=t2 T1=t1",
        ),
        (
            [a, _variant(a, tmp_path, "cropped", "data", target_shape=[32, 32, 32])],
            r"cropped was trained with target shape 32×32×32 but .* with none",
        ),
        (
            [a, _variant(a, tmp_path, "patch32", "data", patch_size=[32, 32, 32])],
            r"patch32 was trained with patch size 32×32×32 but .* with 16×16×16",
        ),
        ([a, t6], r"--threshold differs between the runs \(.*a: 0\.5, .*t6: 0\.6\); give one"),
        ([t6, tmp_path / ".." / tmp_path.name / "t6"], r"--model names the run .*t6 twice"),
    ]
    missing = tmp_path / "no-data"  # nothing is read: the dataset is never looked for
    for models, pattern in cases:
        pred = tmp_path / "pred"
        code, _, err = run(["predict", missing, "--model", *models, "--out", pred], capsys)
        assert code == EXIT_USAGE, err
        line = one_line_error(err, pattern)
        assert str(models[-1]) in line
        assert not pred.exists()
    # A threshold given for all resolves the disagreement: the checks pass, and the
    # run without weights is the next problem (exit 1, one line).
    argv = ["predict", missing, "--model", a, t6, "--out", tmp_path / "p"]
    code, _, err = run([*argv, "--threshold", "0.5"], capsys)
    assert code == EXIT_ERROR
    one_line_error(err, r"t6/last\.pt missing; the run has not written a checkpoint")


def test_cli_errors_and_no_overwrite(data, runs, tmp_path, capsys):
    a, b = runs
    code, _, err = run(["predict", data, "--model", "--out", tmp_path / "p"], capsys)
    assert code == EXIT_USAGE
    one_line_error(err, r"argument --model: expected at least one argument")
    code, _, err = run(
        ["predict", data, "--model", a, tmp_path / "nope", "--out", tmp_path], capsys
    )
    assert code == EXIT_ERROR
    one_line_error(err, r"nope is not a run folder \(no run\.json\)")
    # a run inside the output folder would be deleted by --force with the old result
    inside = tmp_path / "out" / "b"
    shutil.copytree(b, inside)
    argv = ["predict", data, "--model", a, inside, "--out", tmp_path / "out", "--force"]
    code, _, err = run(argv, capsys)
    assert code == EXIT_USAGE
    one_line_error(err, r"--out .*out is or contains the run folder .*out/b")
    # no overwrite without --force; --force replaces the predictions whole
    pred = tmp_path / "pred"
    argv = ["predict", data, "--model", a, b, "--out", pred, "--quiet"]
    assert run(argv, capsys)[0] == EXIT_OK
    before = (pred / "subject01" / "prob.nii.gz").read_bytes()
    code, _, err = run(argv, capsys)
    assert code == EXIT_USAGE
    one_line_error(err, r"--out .*pred already exists and holds predictions .* pass --force")
    assert run([*argv, "--force", "--weights", "last"], capsys)[0] == EXIT_OK
    assert (pred / "subject01" / "prob.nii.gz").read_bytes() == before
    assert len(json.loads((pred / "inference.json").read_text())["models"]) == 2
    assert RunSettings.load(a / "run.json").predict.threshold == 0.5  # runs untouched
