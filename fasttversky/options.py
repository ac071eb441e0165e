"""``TverskyOptions``: every option of the loss, declared once and checked once.

``tversky_loss``, ``TverskyLoss``, ``deep_supervision_loss`` and the compat shims all
build one of these and hand it on, so a default or a range lives in exactly one place.
Construction checks everything that does not depend on the number of classes (types,
ranges, combinations); :meth:`TverskyOptions.validate` adds the checks that need C (the
length of per-class values), at the first call that knows it.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

from ._dispatch import check_backend_name
from ._spec import ACTIVATIONS
from .errors import InvalidInputError, InvalidInputTypeError

REDUCTIONS = ("mean", "sum", "none")
_PER_CLASS = ("alpha", "beta", "class_weights", "ce_class_weights")

PerClass = float | tuple[float, ...]


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _real(name: str, value, *, positive: bool = False) -> float:
    """A finite float >= 0 (> 0 with ``positive``); a 0-d tensor counts as a number."""
    if hasattr(value, "dim") and value.dim() == 0:  # a 0-d torch.Tensor
        value = value.item()
    if not _is_real(value):
        raise InvalidInputTypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise InvalidInputError(f"{name} must be finite and {'>' if positive else '>='} 0, got {value}")
    return value


def _per_class(name: str, value) -> PerClass:
    """One number for every class, or a tuple of one per class (from a sequence or tensor)."""
    if hasattr(value, "detach"):  # torch.Tensor: read once, here, not at every call
        value = value.detach().cpu()
        value = value.item() if value.dim() == 0 else value.flatten().tolist()
    if _is_real(value):
        return _real(name, value)
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        if len(value) == 0:
            raise InvalidInputError(f"{name} is empty; give a number or one per class")
        try:
            return tuple(_real(name, v) for v in value)
        except InvalidInputError as exc:  # name the whole value, not one entry of it
            raise type(exc)(str(exc).rsplit(", got", 1)[0] + f", got {value}") from None
    raise InvalidInputTypeError(f"{name} must be a float or a sequence of C floats, got {value!r}")


def _flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise InvalidInputTypeError(f"{name} must be True or False, got {value!r}")
    return value


def _choice(name: str, value, allowed) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise InvalidInputError(f"{name} must be one of {tuple(allowed)}, got {value!r}")
    return value


@dataclass(frozen=True)
class TverskyOptions:
    """Every option of :func:`fasttversky.tversky_loss` (see there for their meaning).

    Per-class values (``alpha``, ``beta``, ``class_weights``, ``ce_class_weights``) are
    stored as a float or a tuple of floats; tensors are read once, at construction.
    ``clamp_terms=False`` keeps MONAI's unclamped ``(1 - T) ** gamma`` (``compat.monai``).
    """

    alpha: PerClass = 0.3
    beta: PerClass = 0.7
    activation: str = "softmax"
    include_background: bool = True
    batch: bool = False
    reduction: str = "mean"
    smooth_nr: float = 1e-5
    smooth_dr: float = 1e-5
    gamma: float = 1.0
    ignore_index: int | None = None
    class_weights: tuple[float, ...] | None = None
    backend: str = "auto"
    sync_across_ranks: bool = False
    ce_weight: float = 0.0
    ce_class_weights: tuple[float, ...] | None = None
    clamp_terms: bool = True

    def __post_init__(self):
        for name, value in self._checked().items():
            object.__setattr__(self, name, value)
        self._check_combinations()

    def _checked(self) -> dict:
        """Each field checked on its own, normalised (floats, tuples)."""
        out = {name: _per_class(name, getattr(self, name)) for name in ("alpha", "beta")}
        for name in ("class_weights", "ce_class_weights"):
            value = getattr(self, name)
            if value is not None:
                value = _per_class(name, value)
                out[name] = value if isinstance(value, tuple) else (value,)
        out["activation"] = _choice("activation", self.activation, ACTIVATIONS)
        out["reduction"] = _choice("reduction", self.reduction, REDUCTIONS)
        check_backend_name(self.backend)
        for name in ("include_background", "batch", "sync_across_ranks", "clamp_terms"):
            out[name] = _flag(name, getattr(self, name))
        out["smooth_nr"] = _real("smooth_nr", self.smooth_nr)
        out["smooth_dr"] = _real("smooth_dr", self.smooth_dr)
        out["gamma"] = _real("gamma", self.gamma, positive=True)
        out["ce_weight"] = _real("ce_weight", self.ce_weight)
        ii = self.ignore_index
        if ii is not None and (isinstance(ii, bool) or not isinstance(ii, numbers.Integral)):
            raise InvalidInputTypeError(f"ignore_index must be an int or None, got {ii!r}")
        out["ignore_index"] = None if ii is None else int(ii)
        return out

    def _check_combinations(self) -> None:
        lengths = {n: len(v) for n in _PER_CLASS if isinstance(v := getattr(self, n), tuple)}
        if len(set(lengths.values())) > 1:
            raise InvalidInputError(f"per-class options have different lengths: {lengths}")
        if self.ce_class_weights is not None and sum(self.ce_class_weights) <= 0:
            raise InvalidInputError("ce_class_weights must not all be zero")
        if self.ce_weight > 0 and self.reduction == "none":
            raise InvalidInputError(
                "reduction='none' is not defined with ce_weight > 0 (the cross-entropy is "
                "one mean over the batch); use 'mean' or 'sum'"
            )
        if self.ce_weight > 0 and self.activation not in ("softmax", "sigmoid"):
            raise InvalidInputError(
                f"ce_weight > 0 needs activation 'softmax' or 'sigmoid', got {self.activation!r}"
            )

    def validate(self, num_classes: int) -> None:
        """Raise InvalidInputError unless the per-class values fit ``num_classes`` classes."""
        for name in _PER_CLASS:
            value = getattr(self, name)
            if isinstance(value, tuple) and len(value) != num_classes:
                raise InvalidInputError(
                    f"{name} has {len(value)} entries but logits have C={num_classes} classes"
                )
        if self.class_weights is not None:
            kept = self.class_weights
            if not self.include_background and num_classes > 1:
                kept = kept[1:]
            if sum(kept) <= 0:
                raise InvalidInputError("class_weights of the kept classes must not all be zero")

    def per_class(self, name: str, num_classes: int) -> list[float] | None:
        """The option ``name`` as one float per class (None stays None)."""
        value = getattr(self, name)
        if value is None or isinstance(value, tuple):
            return None if value is None else list(value)
        return [value] * num_classes

    def replace(self, **changes) -> TverskyOptions:
        """A copy with some options changed, checked like a new one."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def of(cls, args: tuple, kwargs: dict, options: TverskyOptions | None) -> TverskyOptions:
        """The options of a call ``f(logits, target, *args, options=..., **kwargs)``:
        ``alpha`` and ``beta`` may come positionally; keywords override ``options``."""
        if len(args) > 2:
            raise InvalidInputTypeError(
                f"only alpha and beta may be given by position, got {len(args)} positional options"
            )
        positional = dict(zip(("alpha", "beta"), args))
        twice = positional.keys() & kwargs.keys()
        if twice:
            raise InvalidInputTypeError(f"{sorted(twice)} given both by position and by keyword")
        unknown = (positional.keys() | kwargs.keys()) - _FIELDS
        if unknown:
            raise InvalidInputTypeError(f"unknown loss option(s): {sorted(unknown)}")
        if options is None:
            return cls(**positional, **kwargs)
        if not isinstance(options, cls):
            raise InvalidInputTypeError(f"options must be a TverskyOptions, got {type(options)}")
        return options.replace(**positional, **kwargs) if positional or kwargs else options


# Read once: a traced call (torch.compile) cannot introspect the class itself.
_FIELDS = frozenset(f.name for f in dataclasses.fields(TverskyOptions))
