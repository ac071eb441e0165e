"""A checkpoint that cannot be read (truncated by a full disk or a killed copy, or plain
garbage) gives one line naming the file and what to do, through the command line
(`train --resume`, `predict`, `predict --weights best`) and the library
(`load_checkpoint`, `train(resume=...)`): never torch's unpickling text, which advises
loading with weights_only=False (unsafe for a file of unknown origin)."""

from __future__ import annotations

import re
import shutil

import pytest
import torch

from fasttversky.app.cli import EXIT_ERROR, main
from fasttversky.app.errors import DataError
from fasttversky.app.models import UNet3D
from fasttversky.app.training import (
    CheckpointError,
    TrainConfig,
    TrainOutputs,
    load_checkpoint,
    train,
)

TINY = ["--base-features", "2", "--levels", "2", "--checkpoint", "none", "--quiet"]
TINY += ["--patch-size", "16", "16", "16", "--batch-size", "1", "--steps", "2"]


def _truncated(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(path):
    path.write_bytes(b"\x80\x02not a checkpoint at all" * 20)


DAMAGE = {"truncated": _truncated, "garbage": _garbage}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(data folder, run folder) of two tiny phantoms and a 2-step run on them."""
    root = tmp_path_factory.mktemp("ckpt")
    data, run = root / "data", root / "run"
    argv = ["synth", str(data), "--n", "2", "--shape", "16", "16", "16", "--quiet"]
    assert main([*argv, "--lesion-fraction", "3e-2"]) == 0
    assert main(["train", str(data), "--out", str(run), *TINY]) == 0
    return data, run


def _one_line(capsys, argv) -> tuple[int, str]:
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return code, lines[0]


def _assert_actionable(line: str, file) -> None:
    assert str(file) in line, line
    assert "weights_only" not in line and "Unpickling" not in line, line
    assert "Traceback" not in line


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_train_resume_from_a_damaged_checkpoint(trained, tmp_path, capsys, damage):
    data, good = trained
    run = tmp_path / "run"
    shutil.copytree(good, run)
    DAMAGE[damage](run / "last.pt")
    before = (run / "metrics.jsonl").read_bytes()
    argv = ["train", str(data), "--out", str(run), "--resume", "--steps", "3", "--quiet"]
    code, line = _one_line(capsys, argv)
    assert code == EXIT_ERROR
    _assert_actionable(line, run / "last.pt")
    assert re.search(r"(truncated|corrupt).*delete it", line), line
    assert (run / "metrics.jsonl").read_bytes() == before  # refused before any work


@pytest.mark.parametrize("weights", ["last", "best"])
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_predict_with_a_damaged_checkpoint(trained, tmp_path, capsys, damage, weights):
    data, good = trained
    run, pred = tmp_path / "run", tmp_path / "pred"
    shutil.copytree(good, run)
    shutil.copyfile(run / "last.pt", run / "best.pt")
    DAMAGE[damage](run / f"{weights}.pt")
    argv = ["predict", str(data), "--model", str(run), "--out", str(pred), "--quiet"]
    code, line = _one_line(capsys, [*argv, "--weights", weights])
    assert code == EXIT_ERROR
    _assert_actionable(line, run / f"{weights}.pt")
    assert re.search(r"(truncated|corrupt).*(train|another run)", line), line
    assert not pred.exists()


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_library_names_the_damaged_file(trained, tmp_path, damage):
    _, good = trained
    file = tmp_path / "last.pt"
    shutil.copyfile(good / "last.pt", file)
    assert load_checkpoint(file)["step"] == 2
    DAMAGE[damage](file)
    with pytest.raises(CheckpointError, match=re.escape(str(file))) as info:
        load_checkpoint(tmp_path)
    assert isinstance(info.value, DataError) and info.value.path == file
    assert "weights_only" not in str(info.value) and "\n" not in str(info.value)
    config = TrainConfig(steps=3, backend="torch")
    with pytest.raises(CheckpointError, match="delete it"):
        train(UNet3D(3, 2, 2, 2), [], config, resume=file, outputs=TrainOutputs(progress=False))


def test_resume_from_weights_alone_is_refused(tmp_path):
    """A file holding only weights (a valid torch file) cannot be resumed from."""
    model = UNet3D(3, 2, 2, 2)
    torch.save({"model": model.state_dict()}, tmp_path / "weights.pt")
    config = TrainConfig(steps=3, backend="torch")
    with pytest.raises(CheckpointError, match=r"weights\.pt: holds no training state"):
        train(model, [], config, resume=tmp_path / "weights.pt", outputs=TrainOutputs())
