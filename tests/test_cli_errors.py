"""Errors a person can act on (issue 25, item 5): predict, evaluate, reproduce and bench
name the bad file in one line and say what is wrong with it in words, never passing a
dependency's own text through (nibabel's or gzip's reason, the JSON decoder's)."""

from __future__ import annotations

import re
import shutil

import pytest

from fasttversky.app.cli import EXIT_ERROR, main

RAW = re.compile(r"gzip|Expecting|char \d|[A-Z]\w*Error\b|DEBUG|\(b'")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("errors") / "data"
    argv = ["synth", str(d), "--n", "2", "--shape", "32", "40", "32", "--quiet"]
    assert main(argv) == 0
    return d


def _one_clean_line(argv, capsys, pattern):
    capsys.readouterr()
    assert main([str(a) for a in argv]) == EXIT_ERROR
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert re.search(pattern, lines[0]), lines[0]
    assert not RAW.search(lines[0]), lines[0]


def test_predict_with_a_damaged_run_json(data, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text("{not json")
    argv = ["predict", data, "--model", run, "--out", tmp_path / "p", "--quiet"]
    _one_clean_line(argv, capsys, r"run\.json: cannot be read as JSON \(invalid at line 1, col")


def test_evaluate_and_reproduce_with_a_damaged_volume(data, tmp_path, capsys):
    pred = tmp_path / "pred"
    for s in ("subject01", "subject02"):
        (pred / s).mkdir(parents=True)
        shutil.copy(data / s / "mask.nii.gz", pred / s / "prob.nii.gz")
    (pred / "subject02" / "prob.nii.gz").write_bytes(b"broken" * 20)
    argv = ["evaluate", pred, "--data", data, "--quiet"]
    _one_clean_line(argv, capsys, r"subject02/prob\.nii\.gz: cannot read as NIfTI \(not a")

    broken = tmp_path / "data"
    shutil.copytree(data, broken)
    (broken / "subject01" / "T2.nii.gz").write_bytes(b"\x1f\x8b" + b"\x00" * 30)  # truncated
    argv = ["reproduce", "--preset", "tiny", "--data", broken, "--out", tmp_path / "r"]
    _one_clean_line([*argv, "--quiet"], capsys, r"subject01/T2\.nii\.gz: cannot read as NIfTI")
    assert not list((tmp_path / "r").glob("runs/*"))  # failed before any training


def test_bench_with_a_damaged_report(tmp_path, capsys):
    bad = tmp_path / "b.json"
    bad.write_text('{"results": [}')
    _one_clean_line(["bench", "--from-json", bad], capsys, r"b\.json: cannot be read as JSON \(")
