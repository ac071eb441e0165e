"""`train_run` and `predict_dataset` write into the folder they are given and record no
trace of its name, so a caller can write into a temporary sibling and rename it to the
final name after success (what `--force` does to replace a result atomically): the
renamed run resumes and predicts, and nothing in it names the temporary folder."""

from __future__ import annotations

from dataclasses import replace

from fasttversky.app.data.synth import write_phantom_dataset
from fasttversky.app.pipeline import find_dataset, predict_dataset, train_run
from fasttversky.app.presets import PRESETS
from fasttversky.app.training import load_checkpoint


def _names_of(folder) -> list[str]:
    """Files under ``folder`` whose bytes contain the folder's name."""
    needle = folder.name.encode()
    return [str(f) for f in folder.rglob("*") if f.is_file() and needle in f.read_bytes()]


def test_a_run_and_its_predictions_survive_a_rename(tmp_path):
    data = tmp_path / "data"
    write_phantom_dataset(data, n_subjects=2, shape=(24, 24, 24), seed=1)
    s = PRESETS["tiny"].run
    s = replace(s, train=replace(s.train, steps=2))
    subjects = find_dataset(data, s.data)

    staging = tmp_path / ".run-staging"
    _, first = train_run(subjects, s, staging, progress=False)
    assert first.step == 2 and _names_of(staging) == []
    run = tmp_path / "run"
    staging.rename(run)

    more = replace(s, train=replace(s.train, steps=3))
    _, second = train_run(subjects, more, run, resume=True, progress=False)
    assert (second.start_step, second.step) == (2, 3)
    assert load_checkpoint(run)["step"] == 3 and second.checkpoint == run / "last.pt"

    pred_staging = tmp_path / ".pred-staging"
    assert predict_dataset(data, run, pred_staging, progress=False) == 2
    assert _names_of(pred_staging) == []
    pred = tmp_path / "pred"
    pred_staging.rename(pred)
    assert sorted(p.name for p in pred.iterdir()) == ["inference.json", "subject01", "subject02"]
    assert (pred / "subject01" / "mask.nii.gz").is_file()
