"""Backend registry.

A backend is an ``ops._base.Backend`` instance, ``BACKEND`` in its module under
``fasttversky/ops/``: ``unavailable()`` says why it cannot run on this machine at all
(missing compiler, no GPU, import error), ``reasons(logits, target, spec)`` why it
cannot run *these* inputs (declared limits, devices, dtypes), and ``forward_stats`` /
``backward`` do the work (contract: ``_spec.py``).

``"auto"`` takes the first backend, in the priority order for the device, that can run
the inputs; an explicitly requested backend that cannot raises with its reasons
(xformers-style), so a user never silently gets a slower path they did not ask for.
"""

from __future__ import annotations

import importlib
import os

import torch

from .errors import BackendUnavailableError, InvalidInputError

# Priority per device type. CPU: measured (bench/RESULTS.md). CUDA: cuda before triton
# is a guess until a GPU run of bench/gpu_report.py measures both side by side.
_PRIORITY = {
    "cpu": ("cpu", "torch"),
    "cuda": ("cuda", "triton", "torch"),
}
_MODULES = {
    "cpu": "fasttversky.ops.cpu",
    "torch": "fasttversky.ops.torch",
    "triton": "fasttversky.ops.triton",
    "cuda": "fasttversky.ops.cuda",
}
BACKENDS = tuple(_MODULES)


def _load(name: str):
    try:
        return importlib.import_module(_MODULES[name]).BACKEND, None
    except Exception as exc:  # a missing toolchain must never break `import fasttversky`
        return None, f"{type(exc).__name__}: {exc}"


def _why_not(name: str, logits: torch.Tensor, target: torch.Tensor, spec) -> list[str]:
    backend, err = _load(name)
    if backend is None:
        return [f"could not be loaded ({err})"]
    why = backend.unavailable()
    if why:
        return [why]
    return list(backend.reasons(logits, target, spec))


def check_backend_name(backend) -> None:
    """Raise InvalidInputError unless ``backend`` is "auto" or a known backend name."""
    if not isinstance(backend, str) or (backend != "auto" and backend not in _MODULES):
        raise InvalidInputError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")


def select_backend(requested: str, logits: torch.Tensor, target: torch.Tensor, spec) -> str:
    """Return the name of the backend that will run these inputs.

    Only metadata (device, dtypes, shapes, strides) decides. It is called inside the
    custom ops (functional.py), which ``torch.compile`` treats as opaque, so tracing never
    runs it: no ``torch._dynamo`` marking (whose import alone costs ~1.5 s and 150 MiB at
    ``import fasttversky``) is needed to keep the loss free of graph breaks.
    """
    if requested == "auto":
        env = os.environ.get("FASTTVERSKY_BACKEND", "auto") or "auto"
        if env != "auto" and env not in _MODULES:
            raise InvalidInputError(
                f"environment variable FASTTVERSKY_BACKEND must be 'auto' or one of "
                f"{BACKENDS}, got {env!r}"
            )
        requested = env
    if requested != "auto":
        check_backend_name(requested)
        why = _why_not(requested, logits, target, spec)
        if why:
            raise BackendUnavailableError(
                f"backend {requested!r} cannot run these inputs: " + "; ".join(why)
            )
        return requested

    tried = {}
    for name in _PRIORITY.get(logits.device.type, ("torch",)):
        why = _why_not(name, logits, target, spec)
        if not why:
            return name
        tried[name] = why
    raise BackendUnavailableError(
        "no backend can run these inputs: "
        + "; ".join(f"{k}: {', '.join(v)}" for k, v in tried.items())
    )


def available_backends(device: str = "cpu") -> dict[str, str | None]:
    """Map each backend to None (usable on this machine) or the reason it is not."""
    out = {}
    for name in _MODULES:
        backend, err = _load(name)
        out[name] = err if backend is None else backend.unavailable()
    return out
