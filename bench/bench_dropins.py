"""MONAI drop-ins (``fasttversky.compat.monai``) against MONAI's originals and against the
fused kernel alone, fwd+bwd, side by side in one run.

    taskset -c 1 python -m pytest bench/bench_dropins.py --benchmark-only [--quick]
    python -m pytest bench/bench_dropins.py --benchmark-disable --quick   # smoke run

Cases: the paper's volume 1x2x128x224x256 and 1x4x128x128x128, fp32 and bf16 logits
(``test_dropin_overhead``: fp32 only); logits standard normal, a label map with ~1 %
foreground spread over the foreground classes, given as MONAI's loaders give it: float32
(B, 1, *spatial).

Losses, each in the configuration people train with (``to_onehot_y=True``):
``TverskyLoss(softmax, alpha=0.3, beta=0.7)``, ``DiceLoss(softmax)``,
``GeneralizedDiceLoss(softmax)``, ``DiceCELoss(softmax)``, ``DiceFocalLoss(sigmoid)``
(one fused pass) and ``DiceFocalLoss(softmax)`` (MONAI's focal term is sigmoid whatever
the Dice's: two passes). Providers:

* ``dropin``: the ``fasttversky.compat.monai`` class on the float label map;
* ``monai``: MONAI's class on the same tensors (skipped without monai);
* ``kernel``: ``fasttversky.tversky_loss`` with the same terms on a uint8 label map --
  the floor the drop-in's own work (planning, label handling, a second pass where MONAI's
  terms need one) is measured against;
* ``kernel-float``: the same call on the float32 label map itself (what reading float
  labels in the pass costs over uint8 ones).

``test_dropin_overhead`` is that ratio taken in one benchmark (issue 28: at most 1.15x
for DiceCELoss on a float target): each round calls the drop-in and the kernel once each,
in an order that alternates between rounds, so that a shared machine's load hits both.

Each round times loss + ``backward()`` on a leaf tensor whose ``.grad`` is reset before
the round (untimed); warm-up rounds first (the CPU kernels' first build). ``extra_info``:
peak extra memory of one more call (bench/conftest.py ``peak_memory``) and the value
(the providers must agree).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import InputCache, alternating, peak_memory, sync

import fasttversky
from fasttversky.compat import monai as dropins


@dataclasses.dataclass(frozen=True)
class Case:
    shape: tuple  # (B, C, *spatial)
    dtype: torch.dtype = torch.float32

    @property
    def id(self) -> str:
        return "x".join(map(str, self.shape)) + "-" + str(self.dtype).removeprefix("torch.")

    def make(self, device, quick):
        """(logits requiring grad, float32 label map (B, 1, ...), the same as uint8)."""
        B, C, *sp = self.shape
        if quick:
            sp = [max(4, s // 4) for s in sp]
        gen = torch.Generator().manual_seed(0)
        x = torch.randn((B, C, *sp), generator=gen).to(device, self.dtype)
        fg = torch.rand((B, 1, *sp), generator=gen) < 0.01
        lab = torch.randint(1, C, (B, 1, *sp), generator=gen) * fg
        return x.requires_grad_(True), lab.float().to(device), lab.to(torch.uint8).to(device)


SHAPES = ((1, 2, 128, 224, 256), (1, 4, 128, 128, 128))
CASES = [Case(s, d) for s in SHAPES for d in (torch.float32, torch.bfloat16)]
FP32_CASES = [Case(s) for s in SHAPES]

# name -> (MONAI class, its arguments, the kernel's options for the same terms)
_DICE = dict(alpha=0.5, beta=0.5, smooth_nr=0.5e-5, smooth_dr=0.5e-5, clamp_terms=False)
_FOCAL = dict(_DICE, activation="sigmoid", ce_weight=1.0, ce_focal_gamma=2.0)
LOSSES = {
    "TverskyLoss": ("TverskyLoss", dict(softmax=True, alpha=0.3, beta=0.7),
                    dict(alpha=0.3, beta=0.7, clamp_terms=False)),
    "DiceLoss": ("DiceLoss", dict(softmax=True), _DICE),
    "GeneralizedDiceLoss": ("GeneralizedDiceLoss", dict(softmax=True),
                            dict(_DICE, generalized="square")),
    "DiceCELoss": ("DiceCELoss", dict(softmax=True), dict(_DICE, ce_weight=1.0)),
    "DiceFocalLoss-sigmoid": ("DiceFocalLoss", dict(sigmoid=True), _FOCAL),
    "DiceFocalLoss-softmax": ("DiceFocalLoss", dict(softmax=True), _FOCAL),
}  # fmt: skip
PROVIDERS = ("dropin", "monai", "kernel", "kernel-float")


def _provider(loss: str, provider: str):
    """fn(logits, float labels, uint8 labels) -> loss."""
    cls, kwargs, kernel_options = LOSSES[loss]
    if provider == "kernel":
        return lambda x, _, lab: fasttversky.tversky_loss(x, lab, **kernel_options)
    if provider == "kernel-float":
        return lambda x, y, _: fasttversky.tversky_loss(x, y, **kernel_options)
    if provider == "dropin":
        module = getattr(dropins, cls)(to_onehot_y=True, **kwargs)
    else:
        try:
            import monai.losses
        except Exception as exc:
            pytest.skip(f"monai not importable ({type(exc).__name__}: {exc})")
        module = getattr(monai.losses, cls)(to_onehot_y=True, **kwargs)
    return lambda x, y, _: module(x, y)


_inputs = InputCache().get


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_dropin(benchmark, case, loss, provider, device, request):
    quick = request.config.getoption("--quick")
    benchmark.group = f"dropins-{loss}-{case.id}{'-quick' if quick else ''}"
    fn = _provider(loss, provider)
    x, y, lab = _inputs(case, device, quick)

    def setup():
        x.grad = None

    def run():
        fn(x, y, lab).backward()
        sync(device)

    rounds = (3 if quick else 5) if provider == "monai" else 15
    benchmark.pedantic(run, setup=setup, rounds=rounds, iterations=1, warmup_rounds=1)
    x.grad = None
    peak = peak_memory(run, device)
    x.grad = None
    benchmark.extra_info.update(
        loss=loss,
        provider=provider,
        case=case.id,
        device=device,
        threads=torch.get_num_threads(),
        peak_extra_bytes=peak,
        grad_bytes=x.numel() * x.element_size(),
        value=float(fn(x, y, lab).detach()),
    )


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("case", FP32_CASES, ids=[c.id for c in FP32_CASES])
def test_dropin_overhead(benchmark, case, loss, device, request):
    quick = request.config.getoption("--quick")
    benchmark.group = f"dropins-overhead{'-quick' if quick else ''}"
    x, y, lab = _inputs(case, device, quick)
    fns = {p: _provider(loss, p) for p in ("dropin", "kernel")}
    calls = {name: (lambda f=fn: f(x, y, lab).backward()) for name, fn in fns.items()}

    def reset():
        x.grad = None

    med, _ = alternating(benchmark, calls, device, reset, rounds=5 if quick else 30)
    benchmark.extra_info.update(
        loss=loss,
        case=case.id,
        device=device,
        threads=torch.get_num_threads(),
        dropin_s=med["dropin"],
        kernel_s=med["kernel"],
        ratio=med["dropin"] / med["kernel"],
    )
