"""One nnU-Net training epoch on a many-region dataset: the stock region-based trainer
(``nnUNetTrainer``: its data pipeline converts the label map to region channels, then
``DC_and_BCE_loss``) against ``nnUNetTrainerFastDiceCE`` (the fused ``DC_and_BCE_loss``
read from the label map, the conversion dropped), through nnU-Net's own command line.

    PYTHONPATH=. taskset -c 0 python3 bench/nnunet_epoch.py --venv /tmp/nnv \\
        --work /tmp/nnunet_epoch --patch 96 --iterations 25 --rounds 2 --workers 0

(and ``--rounds 1 --workers 1``: nnU-Net's data pipeline in one worker process).

What it does (``--work`` keeps the dataset and its preprocessing between invocations):

1. writes a synthetic raw dataset (``--cases`` cases of ``--size``³ voxels, 1 mm): labels
   0..10 as 10 nested balls (label k inside ball k, balls shrinking with k, random
   centres), label 11 an unannotated slab (the ignore label); 10 nested regions
   r = {r, ..., 10} for r = 1..10, as BraTS's whole tumour ⊇ core ⊇ enhancing but deeper;
2. ``nnUNetv2_plan_and_preprocess -c 3d_fullres`` in the nnU-Net environment ``--venv``
   (torch + torchvision + nnunetv2, e.g. the one ``.ci/run`` builds for
   ``tests/test_nnunet_cli.py``, whose helpers set up the environment here); the planned
   patch is capped at ``--patch`` voxels per axis (a multiple of the U-Net's total
   stride; the planned stages and batch size are kept) and, unless ``--full-width``, the
   U-Net narrowed to 8..64 features (the tests' ``_narrow_plans``); fasttversky's CPU
   kernels are built once in that environment, outside any timing;
3. ``--rounds`` times, the two trainers one after the other, each as ``nnUNetv2_train
   DATASET 3d_fullres all -tr <trainer> -device cpu`` with ``nnUNet_n_proc_DA=--workers``,
   through the timed subclasses of ``bench/_nnunet_epoch_trainers.py`` (what is timed
   and how: that file's docstring), the load average (``os.getloadavg``) read before and
   after each run;
4. prints a markdown row per run as it ends, then the whole table with the setup, and
   writes every run's record (per-iteration times included) to ``--json``.

Pin it (``taskset``) to the cores it may use: the nnU-Net processes inherit the pinning,
and the trainers run torch on one thread.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # this checkout; the tests' helpers
from test_nnunet import _narrow_plans, write_raw_dataset  # noqa: E402
from test_nnunet_cli import _run, cli_environment  # noqa: E402

DATASET_ID = 919
DATASET = f"Dataset{DATASET_ID:03d}_FastTverskyEpochRegions"
LEVELS = 10  # nested labels 1..10, one region each; label 11 is the ignore label
TRAINERS = ("nnUNetTrainer_epochbench", "nnUNetTrainerFastDiceCE_epochbench")


def _labels() -> dict:
    labels = {"background": 0}
    labels.update({f"level{r}": list(range(r, LEVELS + 1)) for r in range(1, LEVELS)})
    labels[f"level{LEVELS}"] = LEVELS
    labels["ignore"] = LEVELS + 1
    return labels


def _cases(n: int, size: int, seed: int = 0):
    """(image, label map) pairs: nested balls 1..LEVELS, an ignore slab, noisy image."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*(np.arange(size),) * 3, indexing="ij", sparse=True)
    for _ in range(n):
        seg = np.zeros((size,) * 3, np.uint8)
        c = rng.integers(int(0.4 * size), int(0.6 * size), 3)
        d2 = sum((g - ci) ** 2 for g, ci in zip(grid, c, strict=True))
        for k, radius in enumerate(np.linspace(0.35 * size, 0.04 * size, LEVELS), 1):
            seg[d2 <= radius**2] = k
        seg[:, :, size // 2 - 2 : size // 2 + 2] = LEVELS + 1  # an unannotated slab
        img = (seg * 20.0 + rng.normal(0, 10, seg.shape)).astype(np.float32)
        yield img, seg


# Builds fasttversky's CPU kernels in the nnU-Net environment, outside any timing.
_WARM_UP = """
import torch
from fasttversky.compat.nnunet import DC_and_BCE_loss
dice = {"batch_dice": False, "do_bg": True, "smooth": 1e-5, "ddp": False}
loss = DC_and_BCE_loss({}, dice, use_ignore_label=True, regions=((1, 2), (2,)), ignore_label=3)
x = torch.randn(1, 2, 4, 4, 4, requires_grad=True)
loss(x, torch.randint(0, 4, (1, 1, 4, 4, 4))).backward()
"""


def _set_plans(work: Path, cap: int, full_width: bool) -> tuple[list[int], list[int]]:
    """The planned plans (kept aside once), narrowed unless ``full_width`` and the patch
    capped at ``cap`` voxels per axis: returns the planned and the capped patch size."""
    path = work / "nnUNet_preprocessed" / DATASET / "nnUNetPlans.json"
    planned = path.with_name("nnUNetPlans.planned.json")
    if not planned.is_file():
        shutil.copyfile(path, planned)
    shutil.copyfile(planned, path)
    if not full_width:
        _narrow_plans(work, (DATASET,))
    plans = json.loads(path.read_text())
    conf = plans["configurations"]["3d_fullres"]
    strides = np.prod(np.array(conf["architecture"]["arch_kwargs"]["strides"]), axis=0)
    was = list(conf["patch_size"])
    conf["patch_size"] = [
        int(min(p, max(s, cap // s * s))) for p, s in zip(was, strides, strict=True)
    ]
    path.write_text(json.dumps(plans, indent=1))
    return was, conf["patch_size"]


def prepare(args) -> dict:
    """The environment for nnU-Net's commands; the dataset, planned and preprocessed."""
    source = (ROOT / "bench" / "_nnunet_epoch_trainers.py").read_text()
    env = cli_environment(args.work, args.venv / "bin", {"fasttversky_epoch_trainers.py": source})
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    done = args.work / "nnUNet_preprocessed" / DATASET / "nnUNetPlans.json"
    if not done.is_file():
        shutil.rmtree(args.work / "nnUNet_raw" / DATASET, ignore_errors=True)
        write_raw_dataset(
            args.work / "nnUNet_raw" / DATASET,
            _cases(args.cases, args.size),
            _labels(),
            list(range(1, LEVELS + 1)),
        )
        _run(
            ["nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", "3d_fullres",
             "-np", "1", "--verify_dataset_integrity"],
            env, args.work,
        )  # fmt: skip
    was, patch = _set_plans(args.work, args.patch, args.full_width)
    width = "as planned" if args.full_width else "narrowed (test_nnunet._narrow_plans)"
    print(f"planned patch {was}, used {patch}, U-Net widths {width}", flush=True)
    _run([args.venv / "bin" / "python", "-c", _WARM_UP], env, args.work)
    return env


def train_once(args, env: dict, trainer: str) -> dict:
    out = args.work / "nnUNet_results" / DATASET / f"{trainer}__nnUNetPlans__3d_fullres"
    shutil.rmtree(out, ignore_errors=True)
    env = dict(env, nnUNet_n_proc_DA=str(args.workers), FT_EPOCH_ITERATIONS=str(args.iterations))
    load0, t0 = os.getloadavg(), time.perf_counter()
    _run(
        ["nnUNetv2_train", str(DATASET_ID), "3d_fullres", "all", "-tr", trainer, "-device", "cpu"],
        env, args.work,
    )  # fmt: skip
    wall, load1 = time.perf_counter() - t0, os.getloadavg()
    record = json.loads((out / "fold_all" / "epoch_bench.json").read_text())
    record.update(load_before=load0, load_after=load1, process_s=wall)
    return record


def _ms(seconds: list[float]) -> float:
    """Mean per iteration in ms, the first (warm-up) iteration left out."""
    return 1e3 * statistics.mean(seconds[1:] if len(seconds) > 1 else seconds)


def _row(r: dict) -> str:
    loss, step, loader = _ms(r["loss_s"]), _ms(r["step_s"]), _ms(r["loader_s"])
    workers = max((m or 0 for m in r["worker_hwm_mib"]), default=0)
    hwm = f"{r['vm_hwm_mib']:.0f}" + (f" (+ workers {workers:.0f})" if workers else "")
    return (
        f"| {r['trainer'].removesuffix('_epochbench')} | {r['load_before'][0]:.2f} -> "
        f"{r['load_after'][0]:.2f} | {r['train_s']:.1f} | {r['epoch_s']:.1f} | {loader:.0f} | "
        f"{loss:.0f} | {step - loss:.0f} | {step:.0f} | {hwm} | {r['first_loss']:.6f} |"
    )


HEADER = (
    "| trainer | load avg (1 min) before -> after | train loop s | nnU-Net epoch s | "
    "loader wait ms/it | loss fwd+bwd ms/it | rest of step ms/it | step ms/it | "
    "peak RSS MiB | first loss |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--venv", type=Path, default=Path(os.environ.get("FASTTVERSKY_NNUNET_VENV", ""))
    )
    ap.add_argument("--work", type=Path, default=Path("/tmp/nnunet_epoch"))
    ap.add_argument("--cases", type=int, default=5)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--patch", type=int, default=96)
    ap.add_argument("--full-width", action="store_true", help="the planned U-Net widths")
    ap.add_argument("--iterations", type=int, default=25)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=0, help="nnUNet_n_proc_DA")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if not (args.venv / "bin" / "nnUNetv2_train").is_file():
        sys.exit(f"--venv: {args.venv} has no bin/nnUNetv2_train (set FASTTVERSKY_NNUNET_VENV)")
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    env = prepare(args)
    records = []
    print(HEADER, flush=True)
    for _ in range(args.rounds):
        for trainer in TRAINERS:
            records.append(train_once(args, env, trainer))
            print(_row(records[-1]), flush=True)
    r0 = records[0]
    print(f"\npatch {r0['patch_size']}, batch {r0['batch_size']}, {r0['regions']} regions, "
          f"{r0['iterations']} iterations, nnUNet_n_proc_DA={r0['n_proc_DA']}, "
          f"{r0['torch_threads']} torch thread(s); per-iteration figures: means over "
          "iterations 2..N\n")  # fmt: skip
    print(HEADER)
    for r in records:
        print(_row(r))
    if args.json:
        args.json.write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
