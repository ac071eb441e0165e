"""Resident-memory growth of one Dice + CE forward+backward, one process per provider.

    python bench/memory_growth.py --out bench/results/memory_growth.md \
        --plot bench/results/memory_growth.png [--classes 2,16,118]

Each measurement runs in a fresh process (so no provider inherits another's freed but
still mapped pages): fp32 logits 1×C×64×96×96 that require grad, a label map, and the
gradient buffer ``logits.grad`` allocated *before* the measurement (a training step
keeps it across steps). The figure is the growth of the process's peak resident set
(VmHWM, reset just before the call) during ``loss(logits, target).backward()``: what
one loss call costs beyond its inputs, the new gradient that autograd accumulates
included. Providers: ``ours`` (``fasttversky.tversky_loss`` α=β=½ + CE, backend auto),
``nnunet`` (nnU-Net's DC_and_CE_loss with MemoryEfficientSoftDiceLoss, its float
(B, 1, …) target), ``monai`` (MONAI's DiceCELoss, softmax, to_onehot_y). The ideal is
the gradient alone (the logits' size), shown as a line in the plot.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time

SHAPE = (64, 96, 96)
PROVIDERS = ("ours", "nnunet", "monai")


def _peak_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def _loss_fn(provider: str, x, t):
    if provider == "ours":
        import fasttversky

        return lambda: fasttversky.tversky_loss(x, t, 0.5, 0.5, ce_weight=1.0)
    if provider == "nnunet":
        from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
        from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

        dice = {"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}
        loss = DC_and_CE_loss(dice, {}, 1, 1, dice_class=MemoryEfficientSoftDiceLoss)
        tf = t[:, None].float()
        return lambda: loss(x, tf)
    from monai.losses import DiceCELoss

    loss = DiceCELoss(softmax=True, to_onehot_y=True)
    t1 = t[:, None]
    return lambda: loss(x, t1)


def measure(provider: str, classes: int) -> None:
    """Print one line: '<growth MiB> <logits MiB>' for this provider (in this process)."""
    import torch

    torch.manual_seed(0)
    x = torch.randn(1, classes, *SHAPE, requires_grad=True)
    t = torch.randint(0, classes, (1, *SHAPE))
    x.grad = torch.zeros_like(x)
    fn = _loss_fn(provider, x, t)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    base = _peak_mib()
    fn().backward()
    print(f"{_peak_mib() - base:.0f} {x.numel() * 4 / 2**20:.0f}")


def _run(provider: str, classes: int) -> tuple[float, float]:
    cmd = [sys.executable, __file__, "--measure", provider, "--classes", str(classes)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()
    return float(out[-2]), float(out[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--classes", default="2,16,118")
    ap.add_argument("--measure", choices=PROVIDERS, help=argparse.SUPPRESS)
    ap.add_argument("--out")
    ap.add_argument("--plot", help="also draw the table as a bar chart (PNG)")
    args = ap.parse_args()
    if args.measure:
        return measure(args.measure, int(args.classes))
    rows, table = [], {}
    for c in map(int, args.classes.split(",")):
        grown = {p: _run(p, c) for p in PROVIDERS}
        table[c] = grown
        ratio = grown["ours"][0] / grown["nnunet"][0]
        rows.append(
            f"| {c} | {grown['ours'][1]:.0f} | {grown['ours'][0]:.0f} | "
            f"{grown['nnunet'][0]:.0f} | {grown['monai'][0]:.0f} | {ratio:.2f}× |"
        )
    if args.plot:
        plot(table, args.plot)
    import torch

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    head = (
        f"`python bench/memory_growth.py --classes {args.classes}` at commit {commit or '?'} "
        f"on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, load average "
        f"{os.getloadavg()[0]:.1f}.\n\n"
        "Resident-memory growth (MiB) of one Dice+CE fwd+bwd, fp32 1×C×64×96×96, gradient "
        "buffer allocated beforehand, one process per provider:\n\n"
        "| C | logits MiB | fasttversky (auto) | nnU-Net DC_and_CE | MONAI DiceCELoss "
        "| ours / nnU-Net |\n"
        "|---:|---:|---:|---:|---:|---:|\n"
    )
    text = head + "\n".join(rows) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


def plot(table: dict, path: str) -> None:
    """Grouped bars per number of classes (log scale), the gradient's size as a tick."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {
        "ours": "fasttversky (auto)",
        "nnunet": "nnU-Net DC_and_CE",
        "monai": "MONAI DiceCELoss",
    }
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=120)
    width = 0.26
    for i, prov in enumerate(PROVIDERS):
        xs = [k + (i - 1) * width for k in range(len(table))]
        ax.bar(xs, [table[c][prov][0] for c in table], width, label=labels[prov])
    for k, c in enumerate(table):
        grad = table[c]["ours"][1]
        ax.hlines(grad, k - 1.5 * width, k + 1.5 * width, colors="k", linestyles="dashed")
    ax.plot([], [], "k--", label="the gradient alone (ideal)")
    ax.set_xticks(range(len(table)), [f"C = {c}" for c in table])
    ax.set_yscale("log")
    ax.set_ylabel("resident memory growth, MiB")
    ax.set_title("One Dice+CE fwd+bwd, fp32 1×C×64×96×96 (CPU)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
