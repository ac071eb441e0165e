"""Compound loss (Dice/Tversky + cross-entropy) fwd+bwd, side by side in one run.

    python -m pytest bench/bench_compound.py --benchmark-only [--quick] [--device cpu]
    FASTTVERSKY_BENCH_BIG=1 ...   # also 2x4x128x128x128 (slow providers take minutes)
    FASTTVERSKY_BENCH_MANY=1 ...  # also C = 16 (1x16x64x128x128) and C = 118 (1x118x64x96x96)

Providers, all computing nnU-Net's default loss (soft Dice without background + CE, the
Dice as Tversky alpha = beta = 1/2) on the same logits and int16 label map (B, 1, ...)
as nnU-Net's dataloader delivers it:

* ``fasttversky-compound``: ``tversky_loss(..., ce_weight=1)``, one fused pass each way;
* ``fasttversky-tversky``: the same call without the CE term (what the CE costs);
* ``nnunet-eager``: nnunetv2's ``DC_and_CE_loss`` with ``MemoryEfficientSoftDiceLoss`` as
  ``nnUNetTrainer._build_loss`` builds it; ``nnunet-compiled``: the same with
  ``loss.dc = torch.compile(loss.dc)``, as nnU-Net does (both skipped, with the reason,
  when nnunetv2 is not importable);
* ``monai-dicece``: ``monai.losses.DiceCELoss(to_onehot_y=True, softmax=True,
  include_background=False)`` (skipped without monai); ``monai-dicece-compiled``: the
  same module through ``torch.compile``.

The baselines are built in ``bench/_baselines.py`` (shared with ``gpu_report.py``);
``extra_info`` records the nnunetv2 version (its Dice one-hot is float32 since 2.6.4).

``test_nnunet_dropin_overhead`` is issue 28's drop-in ratio: ``fasttversky.compat.nnunet.
DC_and_CE_loss`` (nnU-Net's arguments) on nnU-Net's float32 (B, 1, ...) target against
``fasttversky-compound`` on the int16 label map, alternating as below (target <= 1.15x).

``test_compound_overhead`` is the CE's price (issue 10's target: at most 1.15x): each
round calls ``fasttversky-compound`` and ``fasttversky-tversky`` once each, in an order
that alternates between rounds, so that the load of a shared machine hits both alike;
``extra_info`` holds both medians and their ratio, at the default thread count and at one
thread (CPU). The benchmark's own time is that of one round (both calls).

Each round times loss + ``backward()`` on a leaf tensor whose ``.grad`` is reset before
the round (untimed), as in a training step; warm-up rounds run first (compilation, the
CPU kernels' first build). ``extra_info``: peak extra memory of one more call
(bench/conftest.py ``peak_memory``) and the loss value (the providers must agree).
"""

from __future__ import annotations

import dataclasses
import gc
import os

import _baselines
import pytest
import torch
from conftest import InputCache, alternating, peak_memory, sync


@dataclasses.dataclass(frozen=True)
class Case:
    shape: tuple  # (B, C, *spatial)
    dtype: torch.dtype

    @property
    def id(self) -> str:
        return "x".join(map(str, self.shape)) + "-" + str(self.dtype).removeprefix("torch.")

    def make(self, device, quick):
        B, C, *sp = self.shape
        if quick:
            sp = [max(4, s // 4) for s in sp]
        gen = torch.Generator().manual_seed(0)
        x = torch.randn((B, C, *sp), generator=gen).to(self.dtype).to(device)
        # small lesions: ~1 % foreground, spread over the foreground classes
        fg = torch.rand((B, 1, *sp), generator=gen) < 0.01
        lab = torch.randint(1, C, (B, 1, *sp), generator=gen) * fg
        return x.requires_grad_(True), lab.to(torch.int16).to(device)


CASES = [Case((1, 2, 128, 224, 256), torch.float32), Case((1, 2, 128, 224, 256), torch.bfloat16)]
if os.environ.get("FASTTVERSKY_BENCH_BIG") == "1":
    CASES.append(Case((2, 4, 128, 128, 128), torch.float32))
# Many classes (AMOS 16, TotalSegmentator 118): where a one-hot costs most.
if os.environ.get("FASTTVERSKY_BENCH_MANY") == "1":
    CASES += [Case((1, 16, 64, 128, 128), torch.float32), Case((1, 118, 64, 96, 96), torch.float32)]

PROVIDERS = (
    "fasttversky-compound",
    "fasttversky-tversky",
    "nnunet-eager",
    "nnunet-compiled",
    "monai-dicece",
    "monai-dicece-compiled",
)
SLOW = {"nnunet-eager", "nnunet-compiled", "monai-dicece", "monai-dicece-compiled"}
COMPILED = {"nnunet-compiled", "monai-dicece-compiled"}


def _provider(name: str):
    builders = {
        "fasttversky-compound": _baselines.fused_dice_ce,
        "fasttversky-tversky": _baselines.fused_tversky,
        "nnunet-eager": lambda: _baselines.nnunet_dice_ce(compiled=False),
        "nnunet-compiled": lambda: _baselines.nnunet_dice_ce(compiled=True),
        "monai-dicece": lambda: _baselines.monai_dice_ce(compiled=False),
        "monai-dicece-compiled": lambda: _baselines.monai_dice_ce(compiled=True),
    }
    try:
        return builders[name]()
    except ImportError as exc:  # nnunetv2 / monai not installed, or a broken install
        pytest.skip(f"{name}: not importable ({type(exc).__name__}: {exc})")


_inputs = InputCache().get


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_compound(benchmark, case, provider, device, request):
    quick = request.config.getoption("--quick")
    benchmark.group = f"compound-{case.id}{'-quick' if quick else ''}"
    fn = _provider(provider)
    x, t = _inputs(case, device, quick)

    def setup():
        x.grad = None

    def run():
        fn(x, t).backward()
        sync(device)

    slow = provider in SLOW
    rounds = (3 if quick else 5) if slow else 15
    warmup = 2 if provider in COMPILED else 1
    benchmark.pedantic(run, setup=setup, rounds=rounds, iterations=1, warmup_rounds=warmup)
    x.grad = None
    peak = peak_memory(run, device)
    x.grad = None
    value = float(fn(x, t).detach())
    benchmark.extra_info.update(
        provider=provider,
        case=case.id,
        shape=list(x.shape),
        dtype=str(case.dtype).removeprefix("torch."),
        device=device,
        threads=torch.get_num_threads(),
        peak_extra_bytes=peak,
        grad_bytes=x.numel() * x.element_size(),
        loss=value,
        nnunetv2=_baselines.nnunet_version(),
    )


@pytest.mark.parametrize("threads", ["default", "1"])
@pytest.mark.parametrize("case", CASES[:2], ids=[c.id for c in CASES[:2]])
def test_compound_overhead(benchmark, case, threads, device, request):
    quick = request.config.getoption("--quick")
    if threads == "1" and device != "cpu":
        pytest.skip("the one-thread ratio is a CPU measurement")
    benchmark.group = f"compound-overhead{'-quick' if quick else ''}"
    x, t = _inputs(case, device, quick)
    fns = {name: _provider(name) for name in ("fasttversky-compound", "fasttversky-tversky")}
    calls = {name: (lambda f=fn: f(x, t).backward()) for name, fn in fns.items()}

    def reset():
        x.grad = None

    n = torch.get_num_threads()
    try:
        if threads == "1":
            torch.set_num_threads(1)
        med, times = alternating(benchmark, calls, device, reset, rounds=60, warmup_rounds=2)
    finally:
        torch.set_num_threads(n)
    benchmark.extra_info.update(
        case=case.id,
        device=device,
        threads=1 if threads == "1" else n,
        median_ms={k: round(v * 1e3, 2) for k, v in med.items()},
        ratio=round(med["fasttversky-compound"] / med["fasttversky-tversky"], 3),
        ratio_of_minima=round(
            min(times["fasttversky-compound"]) / min(times["fasttversky-tversky"]), 3
        ),
    )


def _nnunet_dropin():
    from fasttversky.compat.nnunet import DC_and_CE_loss

    loss = DC_and_CE_loss(
        {"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, 1, 1
    )
    return loss


@pytest.mark.parametrize("case", CASES[:1], ids=[c.id for c in CASES[:1]])
def test_nnunet_dropin_overhead(benchmark, case, device, request):
    quick = request.config.getoption("--quick")
    benchmark.group = f"compound-nnunet-dropin{'-quick' if quick else ''}"
    x, t = _inputs(case, device, quick)
    inputs = {"dropin": t.float(), "kernel": t}  # nnU-Net's loader gives float32 labels
    fns = {"dropin": _nnunet_dropin(), "kernel": _baselines.fused_dice_ce()}
    calls = {name: (lambda k=name: fns[k](x, inputs[k]).backward()) for name in fns}

    def reset():
        x.grad = None

    med, _ = alternating(benchmark, calls, device, reset, rounds=5 if quick else 30)
    benchmark.extra_info.update(
        case=case.id,
        device=device,
        threads=torch.get_num_threads(),
        median_ms={k: round(v * 1e3, 2) for k, v in med.items()},
        ratio=round(med["dropin"] / med["kernel"], 3),
        values=[float(fns[k](x, inputs[k]).detach()) for k in fns],
    )


# Issue 28's many-class target: Dice+CE at C = 16 at least 10x MONAI's DiceCELoss.
MANY = [c for c in CASES if c.shape[1] > 4]


@pytest.mark.parametrize("case", MANY, ids=[c.id for c in MANY])
def test_many_classes_ratio(benchmark, case, device, request):
    """Ours against MONAI's and nnU-Net's eager Dice+CE, alternating rounds, twice: as a
    training step runs it (the gradient buffer of the previous step is free again and
    reused, ops/_grad_buffers.py) and with a fresh buffer each call (``-fresh``: the
    kept buffers are released, untimed, before the call)."""
    from fasttversky.ops import _grad_buffers

    quick = request.config.getoption("--quick")
    benchmark.group = f"compound-many-classes{'-quick' if quick else ''}"
    x, t = _inputs(case, device, quick)
    names = ("fasttversky-compound", "monai-dicece", "nnunet-eager")
    fns = {name: _provider(name) for name in names}
    fns["fasttversky-compound-fresh"] = fns["fasttversky-compound"]
    calls = {name: (lambda f=fn: f(x, t).backward()) for name, fn in fns.items()}

    def reset():
        x.grad = None

    def reset_fresh():
        x.grad = None
        _grad_buffers.release()

    resets = {name: reset for name in calls} | {"fasttversky-compound-fresh": reset_fresh}
    med, _ = alternating(benchmark, calls, device, resets, rounds=3 if quick else 12)
    ours, fresh = med["fasttversky-compound"], med["fasttversky-compound-fresh"]
    benchmark.extra_info.update(
        case=case.id,
        device=device,
        threads=torch.get_num_threads(),
        grad_cache_mb=_grad_buffers.limit_bytes() >> 20,
        median_ms={k: round(v * 1e3, 2) for k, v in med.items()},
        monai_over_ours=round(med["monai-dicece"] / ours, 2),
        monai_over_ours_fresh=round(med["monai-dicece"] / fresh, 2),
        nnunet_over_ours=round(med["nnunet-eager"] / ours, 2),
        nnunet_over_ours_fresh=round(med["nnunet-eager"] / fresh, 2),
        nnunetv2=_baselines.nnunet_version(),
    )


@pytest.fixture(autouse=True)
def _free_after(request):
    yield
    gc.collect()
