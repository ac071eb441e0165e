"""No command overwrites a result (issue 25, item 2): synth, train, predict, evaluate,
reproduce and demo refuse an output folder that already holds their kind of result,
before any work, with exit status 2 and one line naming the folder and --force (or
--resume); the folder stays byte-identical. --force replaces the result whole, keeping
the folder's other files, and a forced run that fails, is interrupted or is killed
leaves the old result byte-identical. Also the clean errors of synth's transplant mode
(item 6)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fasttversky.app import experiment, output_guard, pipeline
from fasttversky.app.cli import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, main
from fasttversky.app.output_guard import ResultKind, guarded_output, result_kind

TINY_TRAIN = ["--steps", "2", "--base-features", "2", "--levels", "2", "--checkpoint", "none"]
TINY_TRAIN += ["--patch-size", "16", "16", "16", "--batch-size", "1", "--quiet"]
TINY_SYNTH = ["--shape", "32", "40", "32", "--lesion-fraction", "3e-3", "--quiet"]


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` -> its bytes (what "byte-identical" compares)."""
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def partials(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.glob(f".{folder.name}.partial-*"))


def run(argv, capsys):
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def assert_refused(argv, out: Path, capsys, hint=r"pass --force"):
    """The command exits 2 with one line naming ``out`` and the way out, and ``out``
    is left byte-identical."""
    before = snapshot(out)
    code, err = run(argv, capsys)
    assert code == EXIT_USAGE, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert str(out) in lines[0] and re.search(hint, lines[0]), lines[0]
    assert snapshot(out) == before


def assert_all_owned(out: Path, command: str, besides=()):
    """Every entry a command wrote belongs to its kind of result (so --force replaces
    all of it): the guard's file names and the writers' agree."""
    kind = result_kind(command)
    stray = [e.name for e in out.iterdir() if not kind.owns(e) and e.name not in besides]
    assert not stray, stray


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("outputs") / "data"
    assert main(["synth", str(d), "--n", "2", *TINY_SYNTH]) == EXIT_OK
    return d


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    r = tmp_path_factory.mktemp("outputs") / "run"
    assert main(["train", str(data), "--out", str(r), *TINY_TRAIN]) == EXIT_OK
    return r


# --------------------------------------------------------------------------------------
# each command: refusal, --force
# --------------------------------------------------------------------------------------
def test_synth(data, tmp_path, capsys):
    assert_all_owned(data, "synth")
    out = tmp_path / "d"
    shutil.copytree(data, out)
    assert_refused(["synth", out, "--n", "3", *TINY_SYNTH], out, capsys)
    (out / "notes.txt").write_text("mine")
    old = (out / "subject01" / "FLAIR.nii.gz").read_bytes()
    argv = ["synth", out, "--n", "3", "--seed", "1", "--force", *TINY_SYNTH]
    assert run(argv, capsys)[0] == EXIT_OK
    subjects = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert subjects == ["subject01", "subject02", "subject03"]
    assert (out / "subject01" / "FLAIR.nii.gz").read_bytes() != old  # seed 1, not 0
    assert (out / "notes.txt").read_text() == "mine" and not partials(out)
    # a file, not a folder, is refused too
    (tmp_path / "f").write_text("x")
    code, err = run(["synth", tmp_path / "f", *TINY_SYNTH], capsys)
    assert code == EXIT_USAGE and "exists and is not a folder" in err


def test_train(data, trained, tmp_path, capsys):
    assert_all_owned(trained, "train")
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    assert_refused(["train", data, "--out", out, *TINY_TRAIN], out, capsys, r"--resume .*--force")
    code, err = run(["train", data, "--out", out, *TINY_TRAIN, "--force", "--resume"], capsys)
    assert code == EXIT_USAGE and "--force and --resume exclude each other" in err
    old = (out / "last.pt").read_bytes()
    argv = ["train", data, "--out", out, *TINY_TRAIN, "--force", "--steps", "3"]
    assert run(argv, capsys)[0] == EXIT_OK
    assert (out / "last.pt").read_bytes() != old and not partials(out)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    # --resume still continues the run in place
    assert run(["train", data, "--out", out, "--resume", "--steps", "4", "--quiet"], capsys)[0] == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 4


def test_predict_and_evaluate(data, trained, tmp_path, capsys):
    pred = tmp_path / "pred"
    argv = ["predict", data, "--model", trained, "--out", pred, "--quiet"]
    assert run(argv, capsys)[0] == EXIT_OK
    assert_all_owned(pred, "predict")
    assert_refused(argv, pred, capsys)
    old = snapshot(pred)
    assert run([*argv, "--force", "--threshold", "0.3"], capsys)[0] == EXIT_OK
    assert set(snapshot(pred)) == set(old) and not partials(pred)
    assert '"threshold": 0.3' in (pred / "inference.json").read_text()

    # evaluate writes into PRED by default: only its own three files count
    ev = ["evaluate", pred, "--data", data, "--quiet"]
    assert run(ev, capsys)[0] == EXIT_OK
    assert_all_owned(pred, "evaluate", besides={k.split("/")[0] for k in old})
    assert_refused(ev, pred, capsys)
    predictions = {k: v for k, v in snapshot(pred).items() if k in old}
    assert run([*ev, "--force", "--threshold", "0.3"], capsys)[0] == EXIT_OK
    assert (pred / "metrics.md").read_text().startswith("threshold 0.3")
    assert {k: v for k, v in snapshot(pred).items() if k in old} == predictions
    assert not partials(pred)


def test_an_input_inside_the_output_is_refused_even_with_force(data, trained, tmp_path, capsys):
    # Every sub-folder of a dataset or predictions folder is its result: forcing predict
    # into the dataset it reads would delete the dataset, synth into a folder holding
    # the real brains it reads would delete those.
    ds = tmp_path / "ds"
    shutil.copytree(data, ds)
    (tmp_path / "masks").mkdir()
    cases = (
        (["predict", ds, "--model", trained, "--out", ds, "--force", "--quiet"], ds, ds),
        (
            ["predict", ds, "--model", trained, "--out", tmp_path, "--force", "--quiet"],
            tmp_path,
            ds,
        ),
        (
            ["synth", tmp_path, "--brains", ds, "--lesion-masks", tmp_path / "masks", "--force"],
            tmp_path,
            ds,
        ),
    )
    for argv, out, inside in cases:
        before = snapshot(out)
        code, err = run(argv, capsys)
        lines = err.strip().splitlines()
        assert code == EXIT_USAGE and len(lines) == 1, err
        assert f"{out} is or contains the" in lines[0] and str(inside) in lines[0], lines[0]
        assert snapshot(out) == before and not partials(out)


def test_reproduce(data, tmp_path, capsys):
    out = tmp_path / "rep"
    shutil.copytree(data, out / "data")  # the phantoms reproduce reuses
    (out / "results.json").write_text("{}")  # an earlier result
    argv = ["reproduce", "--preset", "tiny", "--settings", "0.5,0.5", "--out", out, "--quiet"]
    assert_refused(argv, out, capsys)
    phantoms = snapshot(out / "data")
    assert run([*argv, "--force"], capsys)[0] == EXIT_OK
    assert_all_owned(out, "reproduce", besides=["data"])
    assert snapshot(out / "data") == phantoms  # kept and reused, not re-synthesised
    assert (out / "results.json").read_text() != "{}" and not partials(out)


def test_demo_force_keeps_other_files(tmp_path, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "metrics.csv").write_text("old")
    argv = ["demo", "--out", out, "--n", "2", "--steps", "1", "--quiet"]
    assert_refused(argv, out, capsys)
    assert run([*argv, "--force"], capsys)[0] == EXIT_OK
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "metrics.csv").read_text() != "old" and not partials(out)
    assert_all_owned(out, "demo", besides=["notes.txt"])


# --------------------------------------------------------------------------------------
# a forced run that fails or is interrupted leaves the old result
# --------------------------------------------------------------------------------------
def _existing(tmp_path, command) -> tuple[Path, list]:
    """A folder holding a (fake) result of ``command`` and the command's argv."""
    out = tmp_path / "out"
    names = {
        "synth": ["subject01/mask.nii.gz", "synth.json"],
        "train": ["last.pt", "run.json", "metrics.jsonl"],
        "predict": ["subject01/prob.nii.gz", "inference.json"],
        "evaluate": ["metrics.md", "metrics.csv", "pr_curve.png", "subject01/prob.nii.gz"],
        "reproduce": ["results.json", "table.md", "runs/a0.5_b0.5_fold0/last.pt"],
        "demo": ["metrics.md", "run/last.pt", "notes.txt"],
    }[command]
    for n in names:
        (out / n).parent.mkdir(parents=True, exist_ok=True)
        (out / n).write_text(f"old {n}")
    argv = {
        "synth": ["synth", out],
        "train": ["train", "DATA", "--out", out],
        "predict": ["predict", "DATA", "--model", "RUN", "--out", out],
        "evaluate": ["evaluate", out, "--data", "DATA"],
        "reproduce": ["reproduce", "--out", out],
        "demo": ["demo", "--out", out],
    }[command]
    return out, [*argv, "--force", "--quiet"]


# the function each command calls, and the argument that is its output folder
WRITERS = {
    "synth": (pipeline, "synth", 0),
    "train": (pipeline, "train_run", 2),
    "predict": (pipeline, "predict_dataset", 2),
    "evaluate": (pipeline, "evaluate_folder", 2),
    "reproduce": (experiment, "reproduce", 1),
    "demo": (pipeline, "demo", 0),
}


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
@pytest.mark.parametrize("command", list(WRITERS))
def test_failed_forced_run_leaves_the_old_result(command, error, tmp_path, capsys, monkeypatch):
    out, argv = _existing(tmp_path, command)
    before = snapshot(out)
    module, name, position = WRITERS[command]
    seen = []

    def half_done(*args, **kwargs):  # writes part of a result, then fails
        dest = Path(args[position])
        seen.append(dest)
        (dest / "half").mkdir(parents=True, exist_ok=True)
        for n in before:
            (dest / n).parent.mkdir(parents=True, exist_ok=True)
            (dest / n).write_text("new")
        raise error

    monkeypatch.setattr(module, name, half_done)
    if command == "train":  # find_dataset runs before train_run
        monkeypatch.setattr(pipeline, "find_dataset", lambda *a, **k: [])
    code, _ = run(argv, capsys)
    assert code == (EXIT_ERROR if isinstance(error, RuntimeError) else EXIT_INTERRUPTED)
    assert seen and seen[0] != out and seen[0].parent == out.parent  # wrote beside it
    assert snapshot(out) == before
    assert not partials(out)


def _wait_for(path: Path, proc, timeout=240.0):
    t0 = time.monotonic()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_killed_forced_training_leaves_the_old_run(sig, data, trained, tmp_path):
    """A real `train --force` process, killed once it is writing its new run."""
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    before = snapshot(out)
    argv = ["train", data, "--out", out, *TINY_TRAIN, "--steps", "100000", "--force"]
    argv += ["--checkpoint-every", "1"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "fasttversky.app.cli", *map(str, argv)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ,
        # A shell without job control starts a background job (`.ci/run ... &`) with
        # SIGINT ignored, the child inherits that, and Python then installs no
        # KeyboardInterrupt handler: Ctrl-C as a terminal sends it needs the default.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        t0 = time.monotonic()
        while not list(tmp_path.glob(".run.partial-*/last.pt")):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() - t0 < 240, "the forced run never wrote a checkpoint"
            time.sleep(0.05)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert snapshot(out) == before
    if sig == signal.SIGINT:  # interrupted: exit 130, and the partial run is cleaned up
        assert proc.returncode == EXIT_INTERRUPTED, err
        assert err.strip() == "error: interrupted" and not partials(out)
    else:  # killed outright: the partial run is left beside it, hidden
        assert proc.returncode == -signal.SIGKILL and len(partials(out)) == 1


# --------------------------------------------------------------------------------------
# the guard itself
# --------------------------------------------------------------------------------------
KIND = ResultKind("a thing", ("result*",))


def test_guard_without_atomic_exchange(tmp_path, monkeypatch):
    """Where renameat2 is missing the swap is two renames: the same result."""
    monkeypatch.setattr(output_guard, "_exchange", lambda a, b: False)
    out = tmp_path / "o"
    out.mkdir()
    (out / "result.txt").write_text("old")
    (out / "other").mkdir()
    (out / "other" / "x").write_text("kept")
    with guarded_output(out, KIND, force=True) as dest:
        assert dest != out and not (dest / "other").exists()  # joins after the work
        (dest / "result.txt").write_text("new")
    assert snapshot(out) == {"result.txt": b"new", "other/x": b"kept"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_guard_forces_the_current_folder(tmp_path, monkeypatch):
    """`synth . --force` run inside the dataset: "." has no name of its own, yet the
    new result is still written beside the folder and swapped in."""
    out = tmp_path / "o"
    out.mkdir()
    (out / "result.txt").write_text("old")
    (out / "notes").write_text("kept")
    monkeypatch.chdir(out)
    with guarded_output(".", KIND, force=True) as dest:
        assert dest.parent == tmp_path and dest != out
        (dest / "result.txt").write_text("new")
    assert snapshot(out) == {"result.txt": b"new", "notes": b"kept"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_guard_forces_through_a_symlink(tmp_path):
    """An output folder reached through a symlink (e.g. to a bigger disk) is replaced
    where it lies; the link stays a link and nothing is left beside either."""
    real = tmp_path / "real"
    real.mkdir()
    (real / "result.txt").write_text("old")
    link = tmp_path / "link"
    link.symlink_to(real)
    with guarded_output(link, KIND, force=True) as dest:
        (dest / "result.txt").write_text("new")
    assert link.is_symlink() and snapshot(real) == {"result.txt": b"new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


def test_guard_passes_new_and_unrelated_folders_through(tmp_path):
    out = tmp_path / "o"
    with guarded_output(out, KIND) as dest:
        assert dest == out and not out.exists()  # nothing is created for the command
    out.mkdir()
    (out / "notes").write_text("x")
    with guarded_output(out, KIND) as dest:
        assert dest == out
    demo = result_kind("demo")
    with pytest.raises(output_guard.OutputExistsError, match="is not empty"):
        with guarded_output(out, demo):
            pass


# --------------------------------------------------------------------------------------
# synth's transplant mode: the same clean messages as train (item 6)
# --------------------------------------------------------------------------------------
def test_synth_transplant_errors_are_clean(data, tmp_path, capsys):
    masks = tmp_path / "masks"
    masks.mkdir()
    shutil.copy(data / "subject01" / "mask.nii.gz", masks / "patient01.nii.gz")
    out = tmp_path / "t"
    cases = [
        (["--lesion-masks", tmp_path / "MISSING"], r"transplant masks folder .*MISSING does not"),
        (["--lesion-masks", masks, "--exclude-masks", "patient1"], r"no mask named patient1"),
    ]
    for extra, pattern in cases:
        code, err = run(["synth", out, "--brains", data, *extra, "--quiet"], capsys)
        assert code == EXIT_ERROR, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and re.search(pattern, lines[0]), err
        assert "ValueError" not in err and "FASTTVERSKY_DEBUG" not in err
        assert not out.exists()


def test_unreadable_nifti_names_the_file_without_the_library_text(tmp_path):
    from fasttversky.app.data import DataError, load_volume

    bad = tmp_path / "T1.nii.gz"
    bad.write_bytes(b"broken" * 20)
    with pytest.raises(DataError) as e:
        load_volume(bad)
    msg = str(e.value)
    assert msg.startswith(f"{bad}: cannot read as NIfTI") and "gzip" not in msg.lower(), msg
    with pytest.raises(DataError, match=r"missing\.nii\.gz: cannot read \(no such file\)"):
        load_volume(tmp_path / "missing.nii.gz")
