"""nnU-Net's real command line with the fasttversky trainers: what a user types.

``nnUNetv2_plan_and_preprocess``, ``nnUNetv2_train DATASET 3d_fullres all -tr <trainer>
-device cpu`` (nnU-Net's own trainer lookup: its whole trainer tree, then the folders of
``nnUNet_extTrainer``) and ``nnUNetv2_predict``, as console scripts of an environment
where nnU-Net's imports all load. The CPU build of torch that the tests run on cannot
load PyPI's torchvision (which nnU-Net's trainer tree imports), so these commands run in
a second environment given by ``FASTTVERSKY_NNUNET_VENV`` (torch 2.14.1 + torchvision
0.29.1 + nnunetv2; ``.ci/run`` builds it), importing fasttversky from this checkout.

The trainers run as short, seeded test subclasses (``test_nnunet._TEST_TRAINERS``) kept
in a folder of their own, listed in ``nnUNet_extTrainer`` beside the package's folder,
exactly as the README tells a user to add their own trainer subclasses, on two tiny
datasets: plain labels with an ignore label, and nested regions with an ignore label
(nnU-Net's region-based training: sigmoid outputs, ``DC_and_BCE_loss``).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from test_nnunet import (
    _TEST_TRAINERS,
    DATASET,
    DATASET_ID,
    REGION_DATASET,
    REGION_DATASET_ID,
    REGIONS,
    _check_region_run,
    _close,
    _narrow_plans,
    _write_dataset,
)

pytestmark = [pytest.mark.slow, pytest.mark.nnunet]

ROOT = Path(__file__).resolve().parents[1]
VENV_VAR = "FASTTVERSKY_NNUNET_VENV"
TRAINERS = ("nnUNetTrainerFastDiceCE_tiny", "nnUNetTrainerFastTverskyCE_tiny")


def _venv_bin() -> Path:
    venv = os.environ.get(VENV_VAR)
    if not venv:
        pytest.skip(
            f"{VENV_VAR} is not set: it names an environment with torch 2.14.1, "
            "torchvision 0.29.1 and nnunetv2 (.ci/run builds one)"
        )
    return Path(venv) / "bin"


def _run(cmd, env, cwd) -> str:
    r = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, (
        f"{' '.join(map(str, cmd))} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    )
    return r.stdout + r.stderr


def cli_environment(base: Path, bin_dir: Path, own_trainers: dict[str, str]) -> dict:
    """The environment a user sets for nnU-Net's commands, with its folders under ``base``:
    ``bin_dir`` (the nnU-Net environment's console scripts) first on PATH, this checkout's
    fasttversky, and ``nnUNet_extTrainer`` listing the package's trainer folder and a folder
    of the user's own subclasses (``own_trainers``: module file name -> source)."""
    trainer_dir = (
        _run(
            [bin_dir / "python", "-m", "fasttversky.compat.nnunet"],
            dict(os.environ, PYTHONPATH=str(ROOT)),
            ROOT,
        )
        .strip()
        .splitlines()[-1]
    )
    own = base / "my_trainers"  # a user's own subclasses, beside the package's folder
    own.mkdir(exist_ok=True)
    for name, source in own_trainers.items():
        (own / name).write_text(source)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(
        PATH=os.pathsep.join([str(bin_dir), env.get("PATH", "")]),
        PYTHONPATH=str(ROOT),  # this checkout's fasttversky (its kernels built by the install)
        nnUNet_raw=str(base / "nnUNet_raw"),
        nnUNet_preprocessed=str(base / "nnUNet_preprocessed"),
        nnUNet_results=str(base / "nnUNet_results"),
        nnUNet_extTrainer=os.pathsep.join([trainer_dir, str(own)]),
        nnUNet_compile="false",
        nnUNet_def_n_proc="1",
    )
    return env


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory):
    bin_dir = _venv_bin()
    base = tmp_path_factory.mktemp("nnunet_cli")
    env = cli_environment(base, bin_dir, {"fasttversky_test_trainers.py": _TEST_TRAINERS})
    _write_dataset(base / "nnUNet_raw")
    _write_dataset(base / "nnUNet_raw", regions=True)
    _run(
        ["nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), str(REGION_DATASET_ID),
         "-c", "3d_fullres", "-np", "1", "--verify_dataset_integrity"],
        env, base,
    )  # fmt: skip
    _narrow_plans(base)
    return base, env


@pytest.mark.parametrize("regions", [False, True], ids=["labels", "regions"])
@pytest.mark.parametrize("trainer", TRAINERS)
def test_nnunetv2_train_and_predict(cli_env, trainer, regions):
    base, env = cli_env
    dataset_id, dataset = (REGION_DATASET_ID, REGION_DATASET) if regions else (DATASET_ID, DATASET)
    _run(
        ["nnUNetv2_train", str(dataset_id), "3d_fullres", "all", "-tr", trainer, "-device", "cpu"],
        dict(env, nnUNet_n_proc_DA="0"), base,  # augmentation in-process: seeded, no workers
    )  # fmt: skip
    out = base / "nnUNet_results" / dataset / f"{trainer}__nnUNetPlans__3d_fullres" / "fold_all"
    ckpt = torch.load(out / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["trainer_name"] == trainer and ckpt["current_epoch"] == 2
    dice_per_head = ckpt["logging"]["dice_per_class_or_region"][-1]
    assert len(dice_per_head) == (len(REGIONS) if regions else 2), dice_per_head
    rec = torch.load(out / "first_step.pt", weights_only=False)
    if regions:
        _check_region_run(out, stock_loss="FastDiceCE" in trainer)
    if "FastDiceCE" in trainer:  # the fused loss is nnU-Net's own on the same tensors
        _close(rec["loss"], rec["stock"], "first-step loss vs nnUNetTrainer's")
    losses = [float(v) for v in ckpt["logging"]["train_losses"]]
    assert all(map(torch.isfinite, map(torch.tensor, losses))) and losses[-1] < losses[0], losses

    images, pred = base / "nnUNet_raw" / dataset / "imagesTr", base / f"pred_{trainer}_{dataset}"
    _run(
        ["nnUNetv2_predict", "-i", str(images), "-o", str(pred), "-d", str(dataset_id),
         "-c", "3d_fullres", "-f", "all", "-tr", trainer, "-device", "cpu",
         "-npp", "1", "-nps", "1", "--disable_progress_bar"],
        env, base,
    )  # fmt: skip
    import SimpleITK as sitk

    labels = {0, 1, 2, 3} if regions else {0, 1, 2}  # regions_class_order writes labels 1..3
    for image in sorted(images.glob("*_0000.nii.gz")):
        seg = pred / image.name.replace("_0000.nii.gz", ".nii.gz")
        got = sitk.GetArrayFromImage(sitk.ReadImage(str(seg)))
        assert got.shape == sitk.GetArrayFromImage(sitk.ReadImage(str(image))).shape
        assert set(got.ravel().tolist()) <= labels
