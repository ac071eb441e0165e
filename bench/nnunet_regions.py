"""nnU-Net's region-based loss, fwd+bwd: its pipeline's region conversion + its
``DC_and_BCE_loss``, against ``fasttversky.compat.nnunet.DC_and_BCE_loss`` from the label
map (and from nnU-Net's region target), side by side in one run.

    taskset -c 1 python bench/nnunet_regions.py [--shape 2,3,96,96,96] [--repeats 5]

Providers, on the same fp32 logits and the same (B, 1, ...) int16 label map as
nnU-Net's loader gives it (labels 0..R, ignore label R + 1 on ~10 % of the voxels;
nested regions r = {r + 1, ..., R}, as BraTS's), with nnUNetTrainer's arguments
(batch_dice, do_bg=True, smooth=1e-5, use_ignore_label=True):

* ``nnunet: convert + loss``: ``ConvertSegmentationToRegionsTransform`` on each sample
  (what nnU-Net's data workers do) then its ``DC_and_BCE_loss`` with
  ``MemoryEfficientSoftDiceLoss``;
* ``nnunet: loss alone``: the same loss on the ready region target;
* ``fasttversky: label map``: ours given the label map and ``regions=``;
* ``fasttversky: region target``: ours given nnU-Net's region target.

Each round times loss + ``backward()`` (the gradient reset untimed); medians of
``--repeats`` rounds after one warm-up. Prints a markdown table with the machine's load
average before and after and torch's thread count.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def _case(shape, seed=0):
    B, R, *sp = shape
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((B, R, *sp), generator=gen)
    y = torch.randint(0, R + 1, (B, 1, *sp), generator=gen, dtype=torch.int16)
    y = torch.where(torch.rand((B, 1, *sp), generator=gen) < 0.1, R + 1, y).to(torch.int16)
    regions = tuple(tuple(range(r + 1, R + 1)) for r in range(R))
    return x, y, regions


def _providers(R, regions, batch_dice=True):
    from batchgeneratorsv2.transforms.utils.seg_to_regions import (
        ConvertSegmentationToRegionsTransform,
    )
    from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss as Stock
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    from fasttversky.compat.nnunet import DC_and_BCE_loss

    dice = {"batch_dice": batch_dice, "do_bg": True, "smooth": 1e-5, "ddp": False}
    stock = Stock({}, dict(dice), use_ignore_label=True, dice_class=MemoryEfficientSoftDiceLoss)
    ours = DC_and_BCE_loss(
        {}, dict(dice), use_ignore_label=True, regions=regions, ignore_label=R + 1
    )
    convert = ConvertSegmentationToRegionsTransform(list(regions) + [R + 1], 0)

    def to_regions(y):
        return torch.stack([convert._apply_to_segmentation(s) for s in y])

    return {
        "nnunet: convert + loss": lambda x, y, t: stock(x, to_regions(y)),
        "nnunet: loss alone": lambda x, y, t: stock(x, t),
        "fasttversky: label map": lambda x, y, t: ours(x, y),
        "fasttversky: region target": lambda x, y, t: ours(x, t),
    }, to_regions


def _time(fn, x, y, t, repeats):
    xi = x.clone().requires_grad_(True)
    times, value = [], None
    for i in range(repeats + 1):
        xi.grad = None
        t0 = time.perf_counter()
        loss = fn(xi, y, t)
        loss.backward()
        if i:
            times.append(time.perf_counter() - t0)
        value = float(loss.detach())
    return statistics.median(times) * 1e3, value


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="2,3,96,96,96")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    x, y, regions = _case(shape)
    providers, to_regions = _providers(shape[1], regions)
    t = to_regions(y)
    load0 = os.getloadavg()[0]
    rows = [(name, *_time(fn, x, y, t, args.repeats)) for name, fn in providers.items()]
    load1 = os.getloadavg()[0]
    base = rows[0][1]
    print(f"shape {shape}, fp32, int16 labels, {torch.get_num_threads()} thread(s), "
          f"torch {torch.__version__}, load average {load0:.1f} -> {load1:.1f}")  # fmt: skip
    print("\n| provider | fwd+bwd ms | vs convert + loss | loss value |\n|---|---:|---:|---:|")
    for name, ms, value in rows:
        print(f"| {name} | {ms:.1f} | {base / ms:.2f}x | {value:.6f} |")


if __name__ == "__main__":
    main()
