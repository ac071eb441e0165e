"""The one shape every backend has, its declared limits, and the helpers they share.

A backend is a :class:`Backend` subclass instance named ``BACKEND`` in its module
(``ops/cpu.py``, ``ops/torch.py``, ``ops/triton.py``, ``ops/cuda.py``); ``_dispatch.py``
asks it ``unavailable()`` (can it run on this machine at all) and ``reasons()`` (can it
run these inputs), then calls ``forward_stats`` / ``backward`` (contract: ``_spec.py``).

Limits are declared as class attributes (``max_classes``, ``max_batch``) and checked in
one place, :meth:`Backend.reasons`; a backend adds only what is its own in
:meth:`Backend.input_reasons`. The native kernels (cpu, cuda) return the error codes of
``enum TverskyError`` in csrc/tversky.h, decoded here by :func:`check_kernel_code`.
"""

from __future__ import annotations

import contextlib

import torch

from .._spec import KernelSpec

# CUDA's limit on grid axis 1, which carries the batch in the cuda and triton kernels.
# csrc/tversky.h's TV_MAX_BATCH is the same number (tests/test_backends.py checks).
MAX_GRID_BATCH = 65535

# csrc/tversky.h ``enum TverskyError`` (tests/test_backends.py checks that they agree).
KERNEL_ERRORS = {
    -1: "unsupported logits dtype",
    -2: "number of classes outside the kernel's range",
    -3: "unknown activation",
    -4: "unsupported target dtype",
    -5: "batch or volume size out of range",
    -6: "workspace too small",
    -7: "cross-entropy needs a label map and softmax or sigmoid",
}


def check_kernel_code(code: int, backend: str, what: str, native_error=None) -> None:
    """Raise RuntimeError for a kernel entry point's nonzero return ``code``.

    Negative codes are ``enum TverskyError`` (the same on every native backend); a
    positive one is the runtime's own error (a cudaError_t), named by ``native_error``.
    """
    if code == 0:
        return
    if code in KERNEL_ERRORS:
        why = KERNEL_ERRORS[code]
    elif code > 0 and native_error is not None:
        why = f"{native_error(code)} (runtime error {code})"
    else:
        why = f"unknown error code {code}"
    raise RuntimeError(f"{backend} {what} kernel failed: {why}")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the kernels compute in: float64 for float64 logits, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def kernel_coefs(logits: torch.Tensor, *coefs: torch.Tensor | None):
    """The backward's (B, C) coefficients as the kernels read them: contiguous, in the
    logits' compute dtype (None passes through)."""
    cdt = compute_dtype(logits.dtype)
    return tuple(c if c is None else c.to(cdt).contiguous() for c in coefs)


def new_grad(logits: torch.Tensor) -> torch.Tensor:
    """An uninitialised gradient with the logits' shape, dtype, device and strides.

    Overlapping or otherwise non-dense views (an expanded tensor, a strided crop) cannot
    keep their strides in a fresh tensor: they get a dense (B, C, N) buffer instead.
    """
    grad = torch.empty_like(logits)
    if grad.stride() != logits.stride():
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    return grad


# torch's private hook for "inside a torch.func transform"; absent -> never detected.
_peek_functorch = getattr(getattr(torch._C, "_functorch", None), "peek_interpreter_stack", None)


def in_functorch_transform() -> bool:
    """Inside torch.func.grad/vmap/...: where vmap forbids data-dependent branches."""
    return _peek_functorch is not None and _peek_functorch() is not None


def device_guard(t: torch.Tensor):
    """Make t's device current for a launch (a no-op for CPU tensors: the interpreter
    and the host emulation)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


class Backend:
    """Base of every backend. Subclasses set ``name`` and the limits, and implement
    ``forward_stats`` and ``backward``; ``unavailable`` and ``input_reasons`` as needed."""

    name: str = ""
    max_classes: int | None = None  # C above this cannot run
    class_limit_why: str = "supported by the kernels"
    max_batch: int | None = None  # B above this cannot run
    # What this backend implements of KernelSpec.features() ("ce", "soft_ce", ...).
    features: frozenset[str] = frozenset()

    def unavailable(self) -> str | None:
        """Why this backend cannot run on this machine at all, or None."""
        return None

    def reasons(self, logits: torch.Tensor, target: torch.Tensor, spec: KernelSpec) -> list[str]:
        """Why this backend cannot run these inputs (empty when it can)."""
        why = []
        B, C, _ = logits.shape
        missing = spec.features() - self.features
        if missing:
            why.append(f"not implemented in this backend yet: {', '.join(sorted(missing))}")
        if self.max_classes is not None and C > self.max_classes:
            why.append(f"C={C} classes > {self.max_classes} {self.class_limit_why}")
        if self.max_batch is not None and B > self.max_batch:
            why.append(f"batch size {B} > {self.max_batch} (the grid's batch axis)")
        return why + list(self.input_reasons(logits, target, spec))

    def input_reasons(self, logits, target, spec: KernelSpec) -> list[str]:
        """Backend-specific reasons (device, dtypes); the limits are checked already."""
        return []

    def forward_stats(self, logits, target, spec: KernelSpec):
        """(stats (B, C, 3 + spec.ce_columns) float64, flags (2,) int64); see ``_spec.py``."""
        raise NotImplementedError

    def backward(
        self, logits, target, coef_a, coef_b, spec: KernelSpec, coef_ce=None, coef_ce2=None
    ):
        """dL/dlogits, shaped like the logits (see ``_spec.py``)."""
        raise NotImplementedError
