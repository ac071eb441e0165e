"""The fasttversky command line end to end on tiny phantoms (seconds on a CPU):
synth -> train -> predict -> evaluate, reproduce --preset tiny, and every --help."""

import csv
import json

import nibabel as nib
import numpy as np
import pytest

from fasttversky.app.cli import PAPER_SETTINGS, build_parser, main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _valid_png(path):
    assert path.is_file() and path.read_bytes()[:8] == PNG_MAGIC, path
    import matplotlib.image as mpimg

    img = mpimg.imread(str(path))
    assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50
    assert img[..., :3].std() > 0  # not a blank canvas


@pytest.mark.parametrize(
    "command", ["synth", "train", "predict", "evaluate", "bench", "reproduce", "demo"]
)
def test_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: fasttversky " + command)


def test_top_level_help_lists_commands():
    text = build_parser().format_help()
    for c in ("synth", "train", "predict", "evaluate", "bench", "reproduce", "demo"):
        assert c in text


def test_synth_train_predict_evaluate(tmp_path, capsys):
    data, run, pred = tmp_path / "data", tmp_path / "run", tmp_path / "pred"
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
    assert sorted(p.name for p in data.iterdir() if p.is_dir()) == [
        "subject01",
        "subject02",
        "subject03",
    ]

    assert (
        main(
            [
                "train",
                str(data),
                "--out",
                str(run),
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
                "--alpha",
                "0.3",
                "--beta",
                "0.7",
                "--quiet",
            ]
        )
        == 0
    )
    assert (run / "last.pt").is_file()
    cfg = json.loads((run / "run.json").read_text())
    assert cfg["alpha"] == 0.3 and cfg["beta"] == 0.7 and cfg["steps"] == 3
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in log)

    # resume to more steps continues from the checkpoint
    assert (
        main(
            [
                "train",
                str(data),
                "--out",
                str(run),
                "--steps",
                "4",
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
                "--resume",
                "--quiet",
            ]
        )
        == 0
    )
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 4

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

    capsys.readouterr()
    assert (
        main(["evaluate", str(pred), "--data", str(data), "--out", str(tmp_path / "ev"), "--quiet"])
        == 0
    )
    out = capsys.readouterr().out
    assert "pooled" in out and "APR" in out
    rows = list(csv.DictReader(open(tmp_path / "ev" / "metrics.csv")))
    assert [r["subject"] for r in rows] == ["subject01", "subject02", "subject03", "pooled"]
    for r in rows:
        for k in ("dsc", "sensitivity", "specificity", "f2", "apr"):
            v = float(r[k])
            assert np.isnan(v) or 0 <= v <= 1
    _valid_png(tmp_path / "ev" / "pr_curve.png")


def test_predict_needs_a_run_folder(tmp_path):
    data = tmp_path / "data"
    assert main(["synth", str(data), "--n", "1", "--shape", "32", "40", "32", "--quiet"]) == 0
    with pytest.raises(SystemExit, match="not a run folder"):
        main(
            ["predict", str(data), "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "p")]
        )


def test_reproduce_tiny(tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["reproduce", "--preset", "tiny", "--out", str(out), "--quiet"]) == 0
    table = (out / "table.md").read_text()
    for a, b in PAPER_SETTINGS:
        assert f"α={a:g}, β={b:g}" in table
    for col in ("DSC", "Sensitivity", "Specificity", "F2", "APR"):
        assert col in table
    rows = list(csv.DictReader(open(out / "table.csv")))
    assert [(float(r["alpha"]), float(r["beta"])) for r in rows] == list(PAPER_SETTINGS)
    res = json.loads((out / "results.json").read_text())
    assert res["folds"] == 2 and len(res["subjects"]) == 4
    _valid_png(out / "pr_curves.png")
    _valid_png(out / "overlays.png")
    for a, b in PAPER_SETTINGS:
        _valid_png(out / f"overlay_a{a:g}_b{b:g}.png")
    assert "DSC" in capsys.readouterr().out


def test_bench_passes_arguments_to_report(tmp_path, monkeypatch):
    """`fasttversky bench` stays a thin wrapper over bench/report.py's main(argv)."""
    import fasttversky.app.cli as cli

    fake = tmp_path / "bench" / "report.py"
    fake.parent.mkdir()
    seen = tmp_path / "argv.json"
    fake.write_text(
        f"import json\ndef main(argv):\n    open({str(seen)!r}, 'w').write("
        "json.dumps(argv))\n    return 0\n"
    )
    monkeypatch.setattr(cli, "_find_bench_report", lambda: fake)
    assert main(["bench", "--quick", "--out", "x.md", "-k", "paper"]) == 0
    assert json.loads(seen.read_text()) == ["--quick", "--out", "x.md", "-k", "paper"]
