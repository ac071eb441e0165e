"""The training loop's collaborators on their own: the Checkpointer's files and their
order, and the StepLog's lines (train() end to end is in test_training.py)."""

from __future__ import annotations

import json
import os
import signal
from types import SimpleNamespace

import pytest
import torch

from fasttversky.app.training import CheckpointError, TrainOutputs
from fasttversky.app.training import checkpoint as ckpt_mod
from fasttversky.app.training.checkpoint import Checkpointer
from fasttversky.app.training.steplog import StepLog


def _state(step: int) -> dict:
    return {"model": {"w": torch.full((3,), float(step))}, "step": step}


def test_checkpointer_writes_best_before_last_and_keeps_copies(tmp_path, monkeypatch):
    order = []
    real = ckpt_mod.atomic_save

    def spy(obj, path):
        order.append((path.name, obj["step"]))
        real(obj, path)

    monkeypatch.setattr(ckpt_mod, "atomic_save", spy)
    c = Checkpointer(tmp_path)
    c.start(fresh=True, main=True)
    assert c.enabled and c.last_good() is None
    c.save(_state(2), 2, best=True, keep=False)
    c.save(_state(4), 4, best=False, keep=True)
    assert order == [("best.pt", 2), ("last.pt", 2), ("last.pt", 4)]
    assert c.last_good() == tmp_path / "last.pt"
    assert torch.load(tmp_path / "best.pt", weights_only=True)["step"] == 2
    assert torch.load(tmp_path / "step_000004.pt", weights_only=True)["step"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt", "step_000004.pt"]


def test_ctrl_c_while_saving_stops_after_the_file_is_written(tmp_path, monkeypatch):
    """Ctrl-C arriving inside torch.save's writes (a checkpoint every step makes that
    likely) is raised as KeyboardInterrupt once last.pt is whole, not as torch's
    "unexpected pos" RuntimeError from a torn zip."""
    real_save = torch.save

    class InterruptedFile:  # sends SIGINT to this process from inside the 2nd write
        def __init__(self, f):
            self.f, self.writes = f, 0

        def write(self, data):
            self.writes += 1
            if self.writes == 2:
                os.kill(os.getpid(), signal.SIGINT)
            return self.f.write(data)

        def flush(self):
            self.f.flush()

    monkeypatch.setattr(torch, "save", lambda obj, f: real_save(obj, InterruptedFile(f)))
    # `.ci/run ... &` may start the tests with SIGINT ignored; Ctrl-C at a terminal has
    # Python's default handler.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            ckpt_mod.atomic_save(_state(7), tmp_path / "last.pt")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 7
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_checkpointer_start_and_resume(tmp_path):
    (tmp_path / "best.pt").write_bytes(b"an earlier run's")
    (tmp_path / ".last.pt.x1.tmp").write_bytes(b"torn")
    Checkpointer(tmp_path).start(fresh=False, main=True)  # a resume keeps its best.pt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt"]
    Checkpointer(tmp_path).start(fresh=True, main=True)  # a fresh run drops it
    assert list(tmp_path.iterdir()) == []

    other = Checkpointer(tmp_path)
    other.start(fresh=True, main=False)  # ranks other than 0 write nothing
    assert not other.enabled
    other.save(_state(1), 1, best=True, keep=True)
    assert list(tmp_path.iterdir()) == []

    assert Checkpointer(tmp_path).load(None) is None
    with pytest.raises(ValueError, match="checkpoint folder"):
        Checkpointer(None).load(True)
    torch.save(_state(3), tmp_path / "weights.pt")
    with pytest.raises(CheckpointError, match="holds no training state"):
        Checkpointer(None).load(tmp_path / "weights.pt")


def test_step_log_lines_and_truncation(tmp_path):
    log, val = tmp_path / "m.jsonl", tmp_path / "v.jsonl"
    # lines of an earlier attempt past step 2, and a torn last line
    log.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"st')
    val.write_text('{"step": 2, "score": 0.1}\n{"step": 4, "score": 0.2}\n')
    outputs = TrainOutputs(log_path=log, val_log_path=val, progress=False)
    config = SimpleNamespace(steps=7, log_every=3)
    s = StepLog(outputs, config, 2, enabled=True, validating=True)
    for step in range(3, 8):
        s.step(step, loss=0.5, lr=1e-3, seconds=0.1, voxels_per_s=10.0)
    s.validation({"step": 6, "score": 0.3, "best": True})
    s.close()
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [1, 2, 3, 6, 7]
    assert [json.loads(x)["step"] for x in val.read_text().splitlines()] == [2, 6]

    quiet = tmp_path / "quiet.jsonl"
    s = StepLog(TrainOutputs(log_path=quiet), config, 0, enabled=False, validating=True)
    s.step(7, 0.5, 1e-3, 0.1, 10.0)
    s.close()
    assert not quiet.exists()
