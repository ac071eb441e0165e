"""What each of the loss family's terms costs over the fused Tversky loss alone (issue 26).

    taskset -c 1 python -m pytest bench/bench_terms.py --benchmark-only [--quick]
    python -m pytest bench/bench_terms.py --benchmark-disable --quick   # smoke run

Cases: the paper's volume 1x2x128x224x256 and 1x4x128x128x128, fp32 and bf16 logits
(standard normal), a uint8 label map with ~1 % foreground spread over the foreground
classes; the soft target is that label map one-hot, smoothed by 0.1 (fp32, (B, C, ...)).

Each term is ``fasttversky.tversky_loss`` with the term switched on, against the same call
without it (the baseline: Tversky alone, same activation, same target kind):

* ``ce``: + cross-entropy (the compound loss, for comparison);
* ``ce-smooth``: + CE with label smoothing 0.1;
* ``focal-softmax`` / ``focal-sigmoid``: + MONAI's focal term, gamma 2 (sigmoid: against
  sigmoid Tversky);
* ``focal-gamma1.5``: the same at gamma 1.5 (no squared-factor shortcut);
* ``generalized``: generalized-Dice weights ("square"), computed from the pass's counts;
* ``gamma-per-class``: a per-class focal-Tversky exponent;
* ``soft-ce``: soft target + CE against Tversky on the same soft target (both read C
  floats of target per voxel, so ``extra_info`` also gives each against the copy floor:
  the bytes a fused fwd+bwd must move at the same run's copy bandwidth).

Every benchmark is one round of ``term`` then ``baseline`` (the order alternating between
rounds so that a shared machine's load hits both); each call is loss + ``backward()`` on a
leaf whose ``.grad`` is reset first, as in a training step. ``extra_info``: both medians,
their ratio (issue 26's target: at most 1.2x), the peak extra memory of one term call
beyond its gradient (bench/conftest.py ``peak_memory``), and for soft targets the floor.
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
from conftest import InputCache, alternating, peak_memory

import fasttversky


@dataclasses.dataclass(frozen=True)
class Case:
    shape: tuple  # (B, C, *spatial)
    dtype: torch.dtype

    @property
    def id(self) -> str:
        return "x".join(map(str, self.shape)) + "-" + str(self.dtype).removeprefix("torch.")

    def make(self, device, quick):
        """(logits requiring grad, uint8 label map (B, ...), soft fp32 target (B, C, ...))."""
        B, C, *sp = self.shape
        if quick:
            sp = [max(4, s // 4) for s in sp]
        gen = torch.Generator().manual_seed(0)
        x = torch.randn((B, C, *sp), generator=gen).to(device, self.dtype)
        fg = torch.rand((B, *sp), generator=gen) < 0.01
        lab = (torch.randint(1, C, (B, *sp), generator=gen) * fg).to(torch.uint8)
        soft = torch.nn.functional.one_hot(lab.long(), C).movedim(-1, 1).float()
        soft = soft * 0.9 + 0.1 / C
        return x.requires_grad_(True), lab.to(device), soft.to(device)


CASES = [
    Case(shape, dtype)
    for shape in ((1, 2, 128, 224, 256), (1, 4, 128, 128, 128))
    for dtype in (torch.float32, torch.bfloat16)
]

_BASE = dict(alpha=0.3, beta=0.7)
_SIG = dict(_BASE, activation="sigmoid")
# name -> (options with the term, options of the baseline, target kind)
TERMS = {
    "ce": (dict(_BASE, ce_weight=1.0), _BASE, "labels"),
    "ce-smooth": (dict(_BASE, ce_weight=1.0, ce_label_smoothing=0.1), _BASE, "labels"),
    "focal-softmax": (dict(_BASE, ce_weight=1.0, ce_focal_gamma=2.0), _BASE, "labels"),
    "focal-sigmoid": (dict(_SIG, ce_weight=1.0, ce_focal_gamma=2.0), _SIG, "labels"),
    "focal-gamma1.5": (dict(_BASE, ce_weight=1.0, ce_focal_gamma=1.5), _BASE, "labels"),
    "generalized": (dict(_BASE, generalized="square"), _BASE, "labels"),
    "gamma-per-class": (dict(_BASE, gamma="per-class"), _BASE, "labels"),
    "soft-ce": (dict(_BASE, ce_weight=1.0), _BASE, "soft"),
}  # fmt: skip

_inputs = InputCache().get


def _options(opts: dict, C: int) -> dict:
    if opts.get("gamma") == "per-class":  # one exponent per class, none equal to 1
        return dict(opts, gamma=tuple(0.75 + 0.1 * c for c in range(C)))
    return opts


def _floor_s(x, target, gbps) -> float:
    """Seconds a fused fwd+bwd must move at copy bandwidth: logits + target read twice
    (forward, backward), the gradient written once."""
    nbytes = 2 * (x.numel() * x.element_size() + target.numel() * target.element_size())
    return (nbytes + x.numel() * x.element_size()) / (gbps * 1e9)


@pytest.mark.parametrize("term", list(TERMS))
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_term_cost(benchmark, case, term, device, copy_bandwidth, request):
    quick = request.config.getoption("--quick")
    benchmark.group = f"terms-{case.id}{'-quick' if quick else ''}"
    x, lab, soft = _inputs(case, device, quick)
    with_term, baseline, kind = TERMS[term]
    target = soft if kind == "soft" else lab
    C = x.shape[1]
    fns = {
        name: functools.partial(fasttversky.tversky_loss, x, target, **_options(opts, C))
        for name, opts in (("term", with_term), ("baseline", baseline))
    }

    def reset():
        x.grad = None

    calls = {name: (lambda f=fn: f().backward()) for name, fn in fns.items()}
    med, _ = alternating(benchmark, calls, device, reset, rounds=3 if quick else 21)
    x.grad = None
    peak = peak_memory(lambda: fns["term"]().backward(), device)
    grad_bytes = x.numel() * x.element_size()
    x.grad = None
    info = dict(
        term=term, case=case.id, device=device, threads=torch.get_num_threads(),
        term_s=med["term"], baseline_s=med["baseline"], ratio=med["term"] / med["baseline"],
        peak_extra_bytes=peak, grad_bytes=grad_bytes,
        beyond_grad_bytes=None if peak is None else peak - grad_bytes,
    )  # fmt: skip
    if kind == "soft":
        floor = _floor_s(x, target, copy_bandwidth["gbps"])
        info.update(floor_s=floor, term_x_floor=med["term"] / floor,
                    baseline_x_floor=med["baseline"] / floor)  # fmt: skip
    benchmark.extra_info.update(info)
