"""End to end through nnU-Net v2 on the CPU: raw dataset -> plan/preprocess -> train.

A tiny synthetic dataset (4 cases of 32^3, labels background/two blobs/an ignore label)
is written in nnU-Net's raw format under tmp_path, ``nnUNetv2_plan_and_preprocess``
plans and preprocesses it, and ``nnUNetv2_train ... -tr <trainer> -device cpu`` runs a
few iterations of each fasttversky trainer, found through ``nnUNet_extTrainer``.

The trainers run as test subclasses (written next to the dataset) that shorten the
epochs and record the first training step's deep-supervision outputs, targets and loss
value, plus what the stock ``nnUNetTrainer`` loss gives on exactly those tensors. The
test then checks that the fused loss equals the stock loss (FastDiceCE) or the float64
reference Tversky + cross-entropy (FastTverskyCE), and that training finished and wrote
its final checkpoint.

Marked ``nnunet`` (required in CI) and ``slow``; about a minute on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _helpers import TOLERANCES, describe_mismatch

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DATASET_ID = 917
DATASET = f"Dataset{DATASET_ID:03d}_FastTverskyTiny"
LABELS = {"background": 0, "blob_a": 1, "blob_b": 2, "ignore": 3}
# Region-based (nnU-Net's BraTS layout): nested regions whole ⊇ core ⊇ enhancing over
# labels 1..3, and an ignore label (the largest value, as nnU-Net requires).
REGION_DATASET_ID = 918
REGION_DATASET = f"Dataset{REGION_DATASET_ID:03d}_FastTverskyRegions"
REGION_LABELS = {"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enhancing": 3, "ignore": 4}
REGIONS = ((1, 2, 3), (2, 3), (3,))
N_CASES, SIZE = 4, 32

# Test subclasses: short epochs, seeded, and a record of the first step. nnU-Net imports
# this file as a top-level module from the nnUNet_extTrainer folder.
_TEST_TRAINERS = '''
import random

import numpy as np
import torch
from batchgeneratorsv2.transforms.utils.seg_to_regions import ConvertSegmentationToRegionsTransform
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from fasttversky.compat.nnunet.trainers.fasttversky_trainers import (
    nnUNetTrainerFastDiceCE,
    nnUNetTrainerFastTverskyCE,
)


def _stock_targets(trainer, target):
    """What nnUNetTrainer's own pipeline gives its loss: on region datasets the label
    maps (the fasttversky trainers' targets) through nnU-Net's region transform."""
    lm = trainer.label_manager
    if not lm.has_regions:
        return target
    ii = [lm.ignore_label] if lm.has_ignore_label else []
    tr = ConvertSegmentationToRegionsTransform(list(lm.foreground_regions) + ii, 0)
    one = lambda t: torch.stack([tr._apply_to_segmentation(s) for s in t.cpu()]).to(t.device)
    return [one(t) for t in target] if isinstance(target, list) else one(target)


class _FirstStepRecorder(torch.nn.Module):
    """Passes the loss through; on its first call also saves the step's tensors, the
    value and what the stock nnUNetTrainer loss gives on the same tensors."""

    def __init__(self, loss, stock, path, trainer):
        super().__init__()
        self.loss, self.stock, self.path = loss, stock, path
        self.to_stock = lambda t: _stock_targets(trainer, t)

    def forward(self, output, target):
        value = self.loss(output, target)
        if self.path is not None:
            with torch.no_grad():
                stock = self.stock(output, self.to_stock(target))
            torch.save(
                {
                    "outputs": [o.detach().clone() for o in output],
                    "targets": [t.clone() for t in target],
                    "loss": value.detach().clone(),
                    "stock": stock.detach().clone(),
                    "weights": list(getattr(self.loss, "weight_factors", ())),
                    "batch_dice": bool(self.trainer_batch_dice),
                },
                self.path,
            )
            self.path = None
        return value


class _Tiny:
    # nnUNetTrainer reads its own __init__ signature: keep it exactly.
    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        random.seed(0)
        np.random.seed(0)
        torch.manual_seed(0)
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_iterations_per_epoch = 4  # enough steps for the mean loss to fall
        self.num_val_iterations_per_epoch = 1
        self.num_epochs = 2
        self._val_path = None

    def _build_loss(self):
        stock = nnUNetTrainer._build_loss(self)
        path = self.output_folder + "/first_step.pt"
        rec = _FirstStepRecorder(super()._build_loss(), stock, path, self)
        rec.trainer_batch_dice = self.configuration_manager.batch_dice
        self._val_path = self.output_folder + "/first_val_step.pt"
        return rec

    def validation_step(self, batch):
        # Also nnUNetTrainer's own validation step on what its pipeline gives (the
        # stock loss, the region targets), once: the metrics must be the same.
        got = super().validation_step(batch)
        if self._val_path is not None and self.label_manager.has_regions:
            ours, self.loss = self.loss, self.loss.stock
            try:
                stock = nnUNetTrainer.validation_step(
                    self, {**batch, "target": _stock_targets(self, batch["target"])}
                )
            finally:
                self.loss = ours
            torch.save({"ours": got, "stock": stock}, self._val_path)
            self._val_path = None
        return got

    def perform_actual_validation(self, save_probabilities=False):
        pass  # sliding-window inference of the validation cases is nnU-Net's, not ours


class nnUNetTrainerFastDiceCE_tiny(_Tiny, nnUNetTrainerFastDiceCE):
    pass


class nnUNetTrainerFastTverskyCE_tiny(_Tiny, nnUNetTrainerFastTverskyCE):
    pass
'''


# `nnUNetv2_train`'s entry point, with its trainer lookup limited to the nnUNet_extTrainer
# folders (searched by nnU-Net's own function, as nnU-Net searches them). Why: nnU-Net
# first imports every module of its own trainer tree, including its Primus trainers,
# which import timm and so torchvision; the PyPI torchvision wheel links libtorch_cuda
# and cannot load with the CPU build of torch that CI has, so that search crashes before
# it reaches nnUNet_extTrainer. test_full_nnunet_lookup checks the full search wherever
# torchvision loads.
_TRAIN_ENTRY = """
import os
import sys

import nnunetv2.run.run_training as run_training
from nnunetv2.utilities.find_class_by_name import recursive_find_python_class


def ext_trainer_lookup(name):
    for path in os.environ["nnUNet_extTrainer"].split(os.pathsep):
        cls = recursive_find_python_class(
            path, name, None, base_folder=path, cleanup_imports_from_base_folder=True
        )
        if cls is not None:
            return cls
    raise RuntimeError(f"trainer {name} not found in nnUNet_extTrainer")


run_training.recursive_find_trainer_class_by_name = ext_trainer_lookup
sys.argv[0] = "nnUNetv2_train"
run_training.run_training_entry()
"""


def write_raw_dataset(ds: Path, cases, labels: dict, regions_class_order=None) -> None:
    """nnU-Net's raw layout under ``ds``: each (image, label map) of ``cases`` as
    ``imagesTr/caseNNN_0000.nii.gz`` and ``labelsTr/caseNNN.nii.gz`` (1 mm spacing), and
    ``dataset.json`` (``regions_class_order`` given: a region-based dataset)."""
    sitk = pytest.importorskip("SimpleITK")
    (ds / "imagesTr").mkdir(parents=True)
    (ds / "labelsTr").mkdir()
    n = 0
    for n, (img, seg) in enumerate(cases, 1):
        for arr, path in (
            (img, ds / "imagesTr" / f"case{n - 1:03d}_0000.nii.gz"),
            (seg, ds / "labelsTr" / f"case{n - 1:03d}.nii.gz"),
        ):
            im = sitk.GetImageFromArray(arr)
            im.SetSpacing((1.0, 1.0, 1.0))
            sitk.WriteImage(im, str(path))
    meta = {
        "channel_names": {"0": "T1"},
        "labels": labels,
        "numTraining": n,
        "file_ending": ".nii.gz",
    }
    if regions_class_order is not None:
        meta["regions_class_order"] = list(regions_class_order)
    (ds / "dataset.json").write_text(json.dumps(meta))


def _write_dataset(raw: Path, regions: bool = False) -> None:
    """Labels: two blobs (1, 2) and an unannotated slab (the ignore label). Regions: three
    nested balls (labels 1 ⊃ 2 ⊃ 3 as BraTS's whole tumour, core, enhancing) and a slab."""
    rng = np.random.default_rng(0)
    zz, yy, xx = np.meshgrid(*(np.arange(SIZE),) * 3, indexing="ij")
    labels = REGION_LABELS if regions else LABELS

    def case():
        seg = np.zeros((SIZE,) * 3, np.uint8)
        c = rng.integers(8, SIZE - 8, 3)
        for label, radius in ((1, 8), (2, 5), (3, 2)) if regions else ((1, 7), (2, 4)):
            if not regions:
                c = rng.integers(8, SIZE - 8, 3)
            seg[(zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= radius**2] = label
        slab = slice(14, 17) if regions else slice(0, 3)  # regions: where every patch sees it
        seg[:, :, slab] = labels["ignore"]  # an unannotated slab
        img = (seg * 40.0 + rng.normal(0, 10, seg.shape)).astype(np.float32)
        return img, seg

    write_raw_dataset(
        raw / (REGION_DATASET if regions else DATASET),
        (case() for _ in range(N_CASES)),
        labels,
        [1, 2, 3] if regions else None,
    )


def _run(cmd, env, cwd):
    r = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


@pytest.fixture(scope="module")
def nnunet_env(tmp_path_factory):
    pytest.importorskip("nnunetv2")
    from fasttversky.compat.nnunet import TRAINER_DIR

    base = tmp_path_factory.mktemp("nnunet")
    ext = base / "ext_trainers"
    ext.mkdir()
    (ext / "fasttversky_test_trainers.py").write_text(_TEST_TRAINERS)
    (base / "train_entry.py").write_text(_TRAIN_ENTRY)  # outside the trainer folder
    env = dict(os.environ)
    env.update(
        nnUNet_raw=str(base / "nnUNet_raw"),
        nnUNet_preprocessed=str(base / "nnUNet_preprocessed"),
        nnUNet_results=str(base / "nnUNet_results"),
        nnUNet_extTrainer=os.pathsep.join([TRAINER_DIR, str(ext)]),
        nnUNet_compile="false",
        nnUNet_def_n_proc="1",
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
    )
    _write_dataset(base / "nnUNet_raw")
    _write_dataset(base / "nnUNet_raw", regions=True)
    # The console script's entry function, run by this interpreter (its bin/ may not be
    # on PATH or next to sys.executable).
    plan_entry = (
        "import sys; sys.argv[0] = 'nnUNetv2_plan_and_preprocess'; from nnunetv2."
        "experiment_planning.plan_and_preprocess_entrypoints import plan_and_preprocess_entry"
        " as main; main()"
    )
    _run(
        [
            sys.executable, "-c", plan_entry,
            "-d", str(DATASET_ID), str(REGION_DATASET_ID),
            "-c", "3d_fullres",
            "-np", "1",
            "--verify_dataset_integrity",
        ],
        env,
        base,
    )  # fmt: skip
    _narrow_plans(base)
    return base, env


def _narrow_plans(base: Path, datasets=(DATASET, REGION_DATASET)) -> None:
    """A narrower U-Net than planned (same stages, 8..64 features instead of 32..256):
    the loss sees the same shapes, the CPU does 16x less convolution work."""
    for dataset in datasets:
        plans_path = base / "nnUNet_preprocessed" / dataset / "nnUNetPlans.json"
        plans = json.loads(plans_path.read_text())
        arch = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
        arch["features_per_stage"] = [min(8 * 2**i, 64) for i in range(arch["n_stages"])]
        plans_path.write_text(json.dumps(plans))


def _train(nnunet_env, trainer: str, regions: bool = False) -> Path:
    base, env = nnunet_env
    env = dict(env, nnUNet_n_proc_DA="0")  # single-threaded augmentation, no workers
    dataset_id, dataset = (REGION_DATASET_ID, REGION_DATASET) if regions else (DATASET_ID, DATASET)
    _run(
        [
            sys.executable, str(base / "train_entry.py"),
            str(dataset_id), "3d_fullres", "all",
            "-tr", trainer,
            "-device", "cpu",
        ],
        env,
        base,
    )  # fmt: skip
    out = base / "nnUNet_results" / dataset / f"{trainer}__nnUNetPlans__3d_fullres" / "fold_all"
    assert (out / "checkpoint_final.pth").is_file(), sorted(p.name for p in out.iterdir())
    ckpt = torch.load(out / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["trainer_name"] == trainer
    assert ckpt["current_epoch"] == 2  # two epochs ran
    return out


def _close(got, want, what):
    loss_rtol, _ = TOLERANCES[torch.float32]
    tol = loss_rtol * max(abs(float(want)), 1e-3)
    assert abs(float(got) - float(want)) <= tol, f"{what}: {describe_mismatch(got, want, tol)}"


@pytest.mark.nnunet
def test_fast_dice_ce_trainer_matches_stock_loss(nnunet_env):
    out = _train(nnunet_env, "nnUNetTrainerFastDiceCE_tiny")
    rec = torch.load(out / "first_step.pt", weights_only=False)
    assert len(rec["outputs"]) > 1 and rec["weights"][-1] == 0  # deep supervision is on
    assert bool((rec["targets"][0] == LABELS["ignore"]).any())  # the ignore label is used
    _close(rec["loss"], rec["stock"], "first-step loss vs nnUNetTrainer's")


@pytest.mark.nnunet
def test_fast_tversky_ce_trainer(nnunet_env):
    from reference import reference_tversky_loss

    out = _train(nnunet_env, "nnUNetTrainerFastTverskyCE_tiny")
    rec = torch.load(out / "first_step.pt", weights_only=False)
    ii = LABELS["ignore"]
    want = 0.0
    for w, x, y in zip(rec["weights"], rec["outputs"], rec["targets"], strict=True):
        if w == 0:
            continue
        x, lab = x.double(), y[:, 0].long()
        tv = reference_tversky_loss(
            x, lab, 0.3, 0.7, include_background=False, batch=rec["batch_dice"],
            smooth_nr=1e-5, smooth_dr=1e-5, ignore_index=ii,
        )  # fmt: skip
        want += w * (tv + F.cross_entropy(x, lab, ignore_index=ii)).item()
    _close(rec["loss"], want, "first-step loss vs reference Tversky + CE")


def _check_region_run(out: Path, stock_loss: bool) -> dict:
    """What every region run must show: the fused region loss announced in the log, the
    loss fed the label map (no region channels), and a validation step whose metrics
    (and loss, with ``stock_loss``) equal nnUNetTrainer's own on the region targets its
    pipeline makes."""
    log = "".join(p.read_text() for p in out.glob("training_log_*.txt"))
    assert "fasttversky: fused region loss" in log, log[-2000:]
    rec = torch.load(out / "first_step.pt", weights_only=False)
    assert len(rec["outputs"]) > 1 and rec["weights"][-1] == 0  # deep supervision is on
    assert all(t.shape[1] == 1 for t in rec["targets"])  # label maps at every scale
    assert rec["outputs"][0].shape[1] == len(REGIONS)
    assert bool((rec["targets"][0] == REGION_LABELS["ignore"]).any())
    val = torch.load(out / "first_val_step.pt", weights_only=False)
    for key in ("tp_hard", "fp_hard", "fn_hard"):
        assert val["ours"][key].shape == (len(REGIONS),), val["ours"][key]
        np.testing.assert_array_equal(val["ours"][key], val["stock"][key], err_msg=key)
    if stock_loss:
        _close(val["ours"]["loss"], val["stock"]["loss"], "validation loss vs nnUNetTrainer's")
    return rec


@pytest.mark.nnunet
def test_fast_dice_ce_trainer_regions_matches_stock_loss(nnunet_env):
    out = _train(nnunet_env, "nnUNetTrainerFastDiceCE_tiny", regions=True)
    rec = _check_region_run(out, stock_loss=True)
    _close(rec["loss"], rec["stock"], "first-step region loss vs nnUNetTrainer's")


def _region_tversky_bce(x: torch.Tensor, labels: torch.Tensor, batch: bool) -> float:
    """Tversky (0.3, 0.7, smooth 1e-5, every region) + BCE (mean over regions and kept
    voxels) in float64, from a (B, 1, ...) label map with the ignore label."""
    keep = labels != REGION_LABELS["ignore"]
    g = torch.cat([torch.isin(labels, torch.tensor(r, dtype=labels.dtype)) for r in REGIONS], 1)
    g = g.double() * keep
    p = torch.sigmoid(x) * keep
    axes = (0, *range(2, x.dim())) if batch else tuple(range(2, x.dim()))
    tp = (p * g).sum(axes)
    fp, fn = p.sum(axes) - tp, g.sum(axes) - tp
    tv = (1 - (tp + 1e-5) / (tp + 0.3 * fp + 0.7 * fn + 1e-5)).mean()
    bce = F.binary_cross_entropy_with_logits(x, g, reduction="none")
    return (tv + (bce * keep).sum() / (len(REGIONS) * keep.sum())).item()


@pytest.mark.nnunet
def test_fast_tversky_ce_trainer_regions(nnunet_env):
    out = _train(nnunet_env, "nnUNetTrainerFastTverskyCE_tiny", regions=True)
    rec = _check_region_run(out, stock_loss=False)
    want = sum(
        w * _region_tversky_bce(x.double(), y, rec["batch_dice"])
        for w, x, y in zip(rec["weights"], rec["outputs"], rec["targets"], strict=True)
        if w != 0
    )
    _close(rec["loss"], want, "first-step loss vs reference Tversky + BCE over regions")


@pytest.mark.nnunet
def test_ext_trainer_folder_lookup(monkeypatch):
    # nnU-Net's search of an nnUNet_extTrainer folder finds both trainers by name.
    pytest.importorskip("nnunetv2")
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    from fasttversky.compat.nnunet import TRAINER_DIR

    for name in ("nnUNetTrainerFastDiceCE", "nnUNetTrainerFastTverskyCE"):
        cls = recursive_find_python_class(
            TRAINER_DIR, name, None, base_folder=TRAINER_DIR, cleanup_imports_from_base_folder=True
        )
        assert cls is not None and cls.__name__ == name


def test_full_nnunet_lookup(monkeypatch):
    # What `nnUNetv2_train -tr nnUNetTrainerFastDiceCE` does: nnU-Net's own tree, then
    # nnUNet_extTrainer. Not required in CI, where torchvision cannot load (see above).
    pytest.importorskip("nnunetv2")
    try:
        import torchvision  # noqa: F401
    except Exception as exc:  # RuntimeError from a CUDA-only torchvision build
        pytest.skip(
            f"torchvision does not load with this torch ({exc}); nnU-Net's own "
            "trainer tree imports it"
        )
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from fasttversky.compat.nnunet import TRAINER_DIR

    monkeypatch.setenv("nnUNet_extTrainer", TRAINER_DIR)
    for name in ("nnUNetTrainerFastDiceCE", "nnUNetTrainerFastTverskyCE"):
        assert recursive_find_trainer_class_by_name(name).__name__ == name
