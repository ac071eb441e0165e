"""Pieces of the lesion-cpu preset: the poly schedule and kept checkpoints of the loop,
per-lesion and per-modality transplant contrast, which masks are transplanted for a
fold, and leave-one-patient-out `reproduce` over seeds."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from fasttversky.app.data import save_volume
from fasttversky.app.data.synth import (
    WIDE_LESION_FACTOR,
    WM,
    make_phantom,
    transplant,
    transplant_contrast,
    transplanted_subjects,
)
from fasttversky.app.models import UNet3D
from fasttversky.app.training import TrainConfig, TrainOutputs, load_checkpoint, train
from fasttversky.app.training.loop import POLY_POWER

pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(i):
    g = torch.Generator().manual_seed(50 + i)
    image = torch.randn((1, 3, 8, 8, 8), generator=g)
    return image, (image[:, 2] > 1.0).to(torch.uint8)


def test_poly_schedule_and_kept_checkpoints(tmp_path):
    torch.manual_seed(0)
    model = UNet3D(3, 2, 2, 2)
    steps, lr = 5, 2e-3
    res = train(
        model,
        _batch,
        TrainConfig(
            steps=steps,
            lr=lr,
            lr_schedule="poly",
            keep_every=2,
            checkpoint_every=100,
            backend="torch",
        ),
        outputs=TrainOutputs(
            checkpoint_dir=tmp_path, log_path=tmp_path / "m.jsonl", progress=False
        ),
    )
    rows = [json.loads(s) for s in (tmp_path / "m.jsonl").read_text().splitlines()]
    expect = [lr * (1 - k / steps) ** POLY_POWER for k in range(steps)]
    assert [r["lr"] for r in rows] == pytest.approx(expect, rel=1e-12)
    kept = sorted(p.name for p in tmp_path.glob("step_*.pt"))
    assert kept == ["step_000002.pt", "step_000004.pt"]
    assert load_checkpoint(tmp_path / "step_000004.pt")["step"] == 4
    assert load_checkpoint(tmp_path)["step"] == res.step == steps
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(steps=1, lr_schedule="cosine-ish")
    with pytest.raises(ValueError, match="keep_every"):
        TrainConfig(steps=1, keep_every=0)


SHAPE = (64, 80, 64)
WIDE = transplant_contrast("wide")  # one severity per lesion, modalities coupled


def _deep_wm(p):
    """Deep white matter (no partial volume) away from the phantom's own lesions."""
    return ndi.binary_erosion(p.tissue == WM, iterations=2) & ~ndi.binary_dilation(
        p.mask.astype(bool), iterations=2
    )


def _deep_wm_blocks(p):
    """Two separate blocks of deep white matter (no partial volume), as one mask."""
    deep = _deep_wm(p)
    extra = np.zeros(SHAPE, bool)
    extra[16:30, 20:60, 30:50] = True
    extra[36:50, 20:60, 30:50] = True
    return extra & deep


@pytest.mark.parametrize("seed", range(2))
def test_per_lesion_severity_gives_each_lesion_its_own_contrast(seed):
    p = make_phantom(SHAPE, 3, lesion_fraction=1e-3)
    extra = _deep_wm_blocks(p)
    labels, n = ndi.label(extra, structure=np.ones((3, 3, 3), bool))
    assert n >= 2
    imgs, mask = transplant(
        p.images, p.mask, extra.astype(np.uint8), np.random.default_rng(seed), **WIDE
    )
    new = mask.astype(bool) & ~p.mask.astype(bool)
    lo, hi = WIDE_LESION_FACTOR["FLAIR"]
    ratios = []
    for k in range(1, n + 1):
        core = ndi.binary_erosion(labels == k, iterations=2) & new
        if core.sum() < 20:
            continue
        r = imgs["FLAIR"][core].mean() / p.images["FLAIR"][core].mean()
        assert lo - 0.15 < r < hi + 0.15
        ratios.append(r)
    assert len(ratios) >= 2 and max(ratios) - min(ratios) > 1e-3  # not one shared draw
    # The default (one severity per subject) is unchanged by the new options' defaults.
    a, _ = transplant(p.images, p.mask, extra.astype(np.uint8), np.random.default_rng(seed))
    b, _ = transplant(
        p.images,
        p.mask,
        extra.astype(np.uint8),
        np.random.default_rng(seed),
        severity=(0.3, 0.8),
        per_lesion=False,
    )
    for m in a:
        np.testing.assert_array_equal(a[m], b[m])


def test_transplanted_subjects_leave_out_the_folds_patients(tmp_path):
    from fasttversky.app.data import find_subjects

    p = make_phantom(SHAPE, 1, lesion_fraction=1e-3)
    for m, img in p.images.items():
        save_volume(tmp_path / "data" / "patient07" / f"{m}.nii.gz", img, p.affine)
    save_volume(tmp_path / "data" / "patient07" / "mask.nii.gz", p.mask, p.affine)
    extra = _deep_wm_blocks(p).astype(np.uint8)
    for name in ("patient01", "patient07", "patient19", "patient20"):
        save_volume(tmp_path / "masks" / f"{name}.nii.gz", extra, p.affine)
    brains = find_subjects(tmp_path / "data")
    out = transplanted_subjects(brains, tmp_path / "masks", exclude=["patient19"], seed=1)
    # patient19 = the test patient (left out); patient07 = the training brain's own mask.
    assert [s.name for s in out] == ["patient07+patient01", "patient07+patient20"]
    assert out[0].image.shape == (3, *SHAPE) and out[0].mask.sum() > p.mask.sum()
    with pytest.raises(ValueError, match="does not exist"):
        transplanted_subjects(brains, tmp_path / "nope")


def test_reproduce_transplants_per_fold_leave_out_the_test_patients(tmp_path):
    """`reproduce --transplant-masks M --transplant-n N`: each fold draws N masks, never
    a test patient's or a training brain's own, reproducibly per (seed, fold)."""
    from types import SimpleNamespace

    from fasttversky.app.data import find_subjects
    from fasttversky.app.errors import DataError
    from fasttversky.app.experiment import transplant_augmenter

    p = make_phantom(SHAPE, 1, lesion_fraction=1e-3)
    for name in ("patient07", "patient19"):
        for m, img in p.images.items():
            save_volume(tmp_path / "data" / name / f"{m}.nii.gz", img, p.affine)
        save_volume(tmp_path / "data" / name / "mask.nii.gz", p.mask, p.affine)
    extra = _deep_wm_blocks(p).astype(np.uint8)
    for name in ("patient01", "patient07", "patient19", "patient20", "patient21"):
        save_volume(tmp_path / "masks" / f"{name}.nii.gz", extra, p.affine)
    subjects = find_subjects(tmp_path / "data")
    aug = transplant_augmenter(subjects, tmp_path / "masks", 2, 0, None, False, "varied")
    p07, p19 = SimpleNamespace(name="patient07"), SimpleNamespace(name="patient19")
    out = aug(0, [p07], [p19])
    names = [s.name for s in out]
    assert len(names) == 2 and len(set(names)) == 2
    assert all(n.split("+")[1] in ("patient01", "patient20", "patient21") for n in names)
    again = aug(0, [p07], [p19])
    assert [s.name for s in again] == names
    for a, b in zip(out, again, strict=True):
        np.testing.assert_array_equal(a.image, b.image)
    assert all(s.name.startswith("patient19+") for s in aug(1, [p19], [p07]))
    with pytest.raises(DataError, match="does not exist"):
        transplant_augmenter(subjects, tmp_path / "nope", 2, 0, None, False)


def test_reproduce_lesion_cpu_leave_one_out_with_seeds(tmp_path, capsys):
    """`reproduce --preset lesion-cpu --data D --folds <n> --transplant-masks M
    --seeds ...` is leave-one-patient-out: each fold trains on the other patient plus
    transplants that never include the test patient's own mask (tiny sizes)."""
    from fasttversky.app.cli import main
    from fasttversky.app.data import find_subjects
    from fasttversky.app.data.synth import write_phantom_dataset

    shape = (32, 40, 32)
    write_phantom_dataset(
        tmp_path / "data", n_subjects=2, shape=shape, seed=0, lesion_fraction=(3e-3, 6e-3)
    )
    subs = [s.name for s in find_subjects(tmp_path / "data")]
    p = make_phantom(shape, 9, lesion_fraction=3e-3)
    for name in ("patient01", subs[0]):  # subs[0]'s own mask must stay out of fold 0
        save_volume(tmp_path / "masks" / f"{name}.nii.gz", p.mask, p.affine)
    tiny = ["--target-shape", "0", "0", "0", "--patch-size", "16", "16", "16", "--window"]
    tiny += ["16", "16", "16", "--base-features", "2", "--levels", "2", "--steps", "2"]
    out = tmp_path / "out"
    args = ["reproduce", "--preset", "lesion-cpu", "--data", str(tmp_path / "data")]
    args += ["--out", str(out), "--folds", "2", "--transplant-masks", str(tmp_path / "masks")]
    args += ["--transplant-n", "5", "--settings", "0.3,0.7", "--seeds", "0", "1", "--quiet"]
    assert main([*args, *tiny]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["seeds"] == [0, 1] and res["subjects"] == subs
    # fold k tests subs[k]; its training brain is the other patient
    assert res["augmented_training"] == {
        "0": [f"{subs[1]}+patient01"],
        "1": [f"{subs[0]}+patient01"],
    }
    (r,) = res["results"]
    assert sorted((x["seed"], x["subject"]) for x in r["per_subject"]) == sorted(
        (k, n) for k in (0, 1) for n in subs
    )
    assert "lesion F1 over seeds" in (out / "table.md").read_text()


def test_cli_train_preset_with_transplants_then_predict_and_evaluate(tmp_path, capsys):
    """`train --preset lesion-cpu --transplant-masks`, `predict` with mirroring and the
    minimum lesion size, `evaluate` with lesion-wise columns (tiny sizes overridden)."""
    from fasttversky.app.cli import main
    from fasttversky.app.data.synth import write_phantom_dataset

    shape = (32, 40, 32)
    write_phantom_dataset(
        tmp_path / "data", n_subjects=1, shape=shape, seed=2, lesion_fraction=(4e-3, 6e-3)
    )
    p = make_phantom(shape, 9, lesion_fraction=3e-3)
    save_volume(tmp_path / "masks" / "patient01.nii.gz", p.mask, p.affine)
    save_volume(tmp_path / "masks" / "subject01.nii.gz", p.mask, p.affine)  # own: skipped
    save_volume(tmp_path / "masks" / "patient09.nii.gz", p.mask, p.affine)  # excluded
    run, pred = tmp_path / "run", tmp_path / "pred"
    tiny = ["--target-shape", "0", "0", "0", "--patch-size", "16", "16", "16"]
    tiny += ["--base-features", "2", "--levels", "2", "--steps", "2", "--keep-every", "1"]
    args = ["train", str(tmp_path / "data"), "--preset", "lesion-cpu", "--out", str(run)]
    args += ["--transplant-masks", str(tmp_path / "masks"), "--exclude-masks", "patient09"]
    assert main([*args, "--transplant-contrast", "varied", *tiny, "--quiet"]) == 0
    settings = json.loads((run / "run.json").read_text())
    assert settings["data"]["augment"] == "default"
    assert settings["train"]["lr_schedule"] == "poly"
    # the preset's window is kept; min_lesion_size from the preset
    assert settings["predict"]["window"] == [64, 64, 64]
    assert settings["predict"]["min_lesion_size"] == 10
    transplants = json.loads((run / "transplants.json").read_text())
    assert transplants["subjects"] == ["subject01+patient01"]
    assert transplants["excluded"] == ["patient09"] and transplants["contrast"] == "varied"
    assert sorted(x.name for x in run.glob("step_*.pt")) == ["step_000001.pt", "step_000002.pt"]
    pargs = ["predict", str(tmp_path / "data"), "--model", str(run), "--out", str(pred)]
    pargs += ["--window", "16", "16", "16", "--mirror", "lr", "--min-lesion-size", "3"]
    assert main([*pargs, "--quiet"]) == 0
    inf = json.loads((pred / "inference.json").read_text())
    assert inf["mirror"] == "lr" and inf["min_lesion_size"] == 3 and inf["window"] == [16] * 3
    assert inf["weighting"] == "gaussian" and inf["brain_only"] is True
    capsys.readouterr()
    assert main(["evaluate", str(pred), "--data", str(tmp_path / "data"), "--quiet"]) == 0
    assert "lesion F1" in capsys.readouterr().out


def test_cli_train_validation_subject_stays_out_of_the_transplants(tmp_path, capsys):
    """`train --transplant-masks M --val-subjects V`: V's own mask in M is not
    transplanted (its lesion shapes would leak into training), V's brain is not a
    transplant host, and V is scored (val.jsonl, best.pt)."""
    from fasttversky.app.cli import main
    from fasttversky.app.data.synth import write_phantom_dataset

    shape = (32, 40, 32)
    write_phantom_dataset(
        tmp_path / "data", n_subjects=2, shape=shape, seed=2, lesion_fraction=(4e-3, 6e-3)
    )
    p = make_phantom(shape, 9, lesion_fraction=3e-3)
    for name in ("patient01", "subject02"):  # subject02 = the validation subject
        save_volume(tmp_path / "masks" / f"{name}.nii.gz", p.mask, p.affine)
    run = tmp_path / "run"
    tiny = ["--target-shape", "0", "0", "0", "--patch-size", "16", "16", "16", "--window"]
    tiny += ["16", "16", "16", "--base-features", "2", "--levels", "2", "--steps", "2"]
    args = ["train", str(tmp_path / "data"), "--preset", "lesion-cpu", "--out", str(run)]
    args += ["--transplant-masks", str(tmp_path / "masks"), "--val-subjects", "subject02"]
    assert main([*args, *tiny, "--quiet"]) == 0
    transplants = json.loads((run / "transplants.json").read_text())
    assert transplants["subjects"] == ["subject01+patient01"]
    assert transplants["excluded"] == ["subject02"]
    rows = [json.loads(x) for x in (run / "val.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2] and rows[0]["best"] and (run / "best.pt").is_file()
    import nibabel as nib

    mask = np.asanyarray(nib.load(str(tmp_path / "data" / "subject02" / "mask.nii.gz")).dataobj)
    assert rows[0]["tp"] + rows[0]["fn"] == np.count_nonzero(mask)  # subject02 is scored


def test_a_sweep_refuses_validation_subjects():
    """reproduce holds subjects out by its folds; a base with val_subjects is an error."""
    from fasttversky.app.config import ConfigError, DataConfig, RunSettings
    from fasttversky.app.experiment import run_sweep

    base = RunSettings(data=DataConfig(val_subjects=["a"]))
    with pytest.raises(ConfigError, match="cross-validation holds out by folds"):
        run_sweep([object(), object()], base, "unused", folds=2)


@pytest.mark.parametrize(
    ("extra", "code", "message"),
    [
        # a misspelt held-out patient would exclude nothing and leak its lesions
        (["--transplant-masks", "M", "--exclude-masks", "patient9"], 1, "no mask named patient9"),
        (["--transplant-masks", "M", "--exclude-masks", "patient09", "nobody"], 1, "nobody"),
        (["--exclude-masks", "patient09"], 2, "--exclude-masks only applies"),
        (["--transplant-masks", "NOWHERE"], 1, "NOWHERE does not exist"),
    ],
)
def test_cli_train_transplant_arguments_fail_in_one_line_before_any_work(
    tmp_path, capsys, monkeypatch, extra, code, message
):
    """Bad --transplant-masks / --exclude-masks: a one-line error naming the option or
    folder, the exit code, and nothing read or written (no subject prepared, no run)."""
    from fasttversky.app import pipeline
    from fasttversky.app.cli import main
    from fasttversky.app.data.synth import write_phantom_dataset

    write_phantom_dataset(tmp_path / "data", n_subjects=1, shape=(16, 16, 16), seed=2)
    p = make_phantom((16, 16, 16), 9, lesion_fraction=3e-3)
    for name in ("patient01", "patient09"):
        save_volume(tmp_path / "M" / f"{name}.nii.gz", p.mask, p.affine)
    called = []
    monkeypatch.setattr(pipeline, "prepare_all", lambda *a, **k: called.append(a))
    extra = [str(tmp_path / x) if x in ("M", "NOWHERE") else x for x in extra]
    run = tmp_path / "run"
    capsys.readouterr()
    assert main(["train", str(tmp_path / "data"), "--out", str(run), *extra, "--quiet"]) == code
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not called and not run.exists()


def test_transplant_dataset_rejects_an_unknown_excluded_name(tmp_path):
    """`synth --lesion-masks M --exclude-masks NAME`: NAME must be a mask of M."""
    from fasttversky.app.data.synth import write_phantom_dataset, write_transplant_dataset
    from fasttversky.app.pipeline import synth

    write_phantom_dataset(tmp_path / "brains", n_subjects=1, shape=(16, 16, 16), seed=3)
    p = make_phantom((16, 16, 16), 5, lesion_fraction=3e-3)
    save_volume(tmp_path / "masks" / "patient05.nii.gz", p.mask, p.affine)
    with pytest.raises(ValueError, match="no mask named patient5 "):
        write_transplant_dataset(
            tmp_path / "out", tmp_path / "brains", tmp_path / "masks", exclude=["patient5"]
        )
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="only applies with --lesion-masks"):
        synth(tmp_path / "out", exclude_masks=["patient05"], progress=False)


def _lesion_severities(p, imgs, labels, n, table):
    """Per lesion and modality, the severity read back from the lesion core's contrast."""
    out = []
    for k in range(1, n + 1):
        core = ndi.binary_erosion(labels == k, iterations=1)
        row = {}
        for m, (f0, f1) in table.items():
            r = imgs[m][core].mean() / p.images[m][core].mean()
            row[m] = (r - f0) / (f1 - f0)
        out.append(row)
    return out


@pytest.mark.parametrize("seed", range(2))
def test_per_modality_severity_decouples_the_modalities(seed):
    # Real lesions are not one-parameter (black on T1 yet only moderately bright on
    # FLAIR): per_modality draws each modality's severity on its own; without it one
    # severity moves all three together.
    p = make_phantom(SHAPE, 3, lesion_fraction=1e-3)
    deep = _deep_wm(p)
    extra = np.zeros(SHAPE, bool)
    for x, y, z in np.ndindex(9, 11, 9):  # separate 5³ cubes wholly in deep WM
        box = np.s_[x * 7 + 1 : x * 7 + 6, y * 7 + 1 : y * 7 + 6, z * 7 + 1 : z * 7 + 6]
        if deep[box].all():
            extra[box] = True
    labels, n = ndi.label(extra, structure=np.ones((3, 3, 3), bool))
    coupled, indep = (
        _lesion_severities(
            p,
            transplant(
                p.images,
                p.mask,
                extra.astype(np.uint8),
                np.random.default_rng(seed),
                **{**WIDE, "per_modality": per_modality},
            )[0],
            labels,
            n,
            WIDE_LESION_FACTOR,
        )
        for per_modality in (False, True)
    )
    assert len(coupled) >= 8

    def corr(rows):  # correlation over lesions of each pair of modalities' severities
        u = np.array([[r[m] for m in WIDE_LESION_FACTOR] for r in rows])
        c = np.corrcoef(u.T)
        return c[np.triu_indices(len(c), 1)]

    assert corr(coupled).min() > 0.85  # one severity, read back through noise and blending
    assert np.abs(corr(indep)).max() < 0.7  # three independent draws per lesion


def test_white_matter_normalisation_reaches_training_transplants_and_predict(tmp_path, monkeypatch):
    """`train --normalize white-matter`: recorded in run.json, applied to the real and
    the transplanted training subjects alike, and `predict` prepares new data the way
    the run was trained (not with the default z-score)."""
    from fasttversky.app.cli import main
    from fasttversky.app.data import find_subjects, load_volume, prepare_subject
    from fasttversky.app.data.synth import write_phantom_dataset
    from fasttversky.app.data.transforms import WM_QUANTILE, WM_UNIT
    from fasttversky.app.pipeline import load_run, predict_prepared

    shape = (32, 40, 32)
    write_phantom_dataset(
        tmp_path / "data", n_subjects=1, shape=shape, seed=2, lesion_fraction=(4e-3, 6e-3)
    )
    p = make_phantom(shape, 9, lesion_fraction=3e-3)
    save_volume(tmp_path / "masks" / "patient01.nii.gz", p.mask, p.affine)
    run, pred = tmp_path / "run", tmp_path / "pred"
    tiny = ["--target-shape", "0", "0", "0", "--patch-size", "16", "16", "16"]
    tiny += ["--base-features", "2", "--levels", "2", "--steps", "2", "--window", "16", "16", "16"]
    args = ["train", str(tmp_path / "data"), "--preset", "lesion-cpu", "--out", str(run)]
    args += ["--transplant-masks", str(tmp_path / "masks"), "--normalize", "white-matter"]
    import fasttversky.app.data as data_pkg

    seen = []  # how train prepared its real subjects

    def spy(subject, target_shape=None, normalisation=("zscore", 0)):
        seen.append(normalisation)
        return prepare_subject(subject, target_shape, normalisation)

    monkeypatch.setattr(data_pkg, "prepare_subject", spy)
    assert main([*args, *tiny, "--quiet"]) == 0
    monkeypatch.undo()
    assert seen == [("white-matter", 0)]
    assert json.loads((run / "run.json").read_text())["data"]["normalize"] == "white-matter"

    # the transplanted copy: normal WM (top of T1 in the brain) at 1 / WM_UNIT per modality
    brains = find_subjects(tmp_path / "data")
    (copy,) = transplanted_subjects(
        brains, tmp_path / "masks", seed=0, contrast="varied", normalisation=("white-matter", 0)
    )
    t1 = copy.image[0][copy.brain]
    wm = t1 >= np.quantile(t1, WM_QUANTILE)
    for c in range(3):
        assert np.median(copy.image[c][copy.brain][wm]) == pytest.approx(1 / WM_UNIT, rel=1e-5)

    assert (
        main(
            ["predict", str(tmp_path / "data"), "--model", str(run), "--out", str(pred), "--quiet"]
        )
        == 0
    )
    model, settings = load_run(run)
    (subject,) = brains
    want = predict_prepared(model, prepare_subject(subject, None, ("white-matter", 0)), settings)
    got, _ = load_volume(pred / subject.name / "prob.nii.gz")
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    zscored = predict_prepared(model, prepare_subject(subject, None), settings)
    assert np.abs(zscored - want).max() > 1e-3  # the check above can tell the two apart
