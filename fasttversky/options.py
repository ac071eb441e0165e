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
from ._spec import ACTIVATIONS, MAX_REGIONS
from .errors import InvalidInputError, InvalidInputTypeError

REDUCTIONS = ("mean", "sum", "none")
# Generalized Dice (Sudre et al., 2017; MONAI's GeneralizedDiceLoss w_type): class c
# weighs 1/G_c² ("square"), 1/G_c ("simple") or 1 ("uniform"), G_c its label count.
GENERALIZED_WEIGHTS = ("square", "simple", "uniform")
_PER_CLASS = ("alpha", "beta", "gamma", "class_weights", "ce_class_weights")

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
        raise InvalidInputError(
            f"{name} must be finite and {'>' if positive else '>='} 0, got {value}"
        )
    return value


def _per_class(name: str, value, *, positive: bool = False) -> PerClass:
    """One number for every class, or a tuple of one per class (from a sequence or tensor)."""
    if hasattr(value, "detach"):  # torch.Tensor: read once, here, not at every call
        value = value.detach().cpu()
        value = value.item() if value.dim() == 0 else value.flatten().tolist()
    if _is_real(value):
        return _real(name, value, positive=positive)
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        if len(value) == 0:
            raise InvalidInputError(f"{name} is empty; give a number or one per class")
        try:
            return tuple(_real(name, v, positive=positive) for v in value)
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


def _unit(name: str, value) -> float:
    """A float in [0, 1]."""
    value = _real(name, value)
    if value > 1:
        raise InvalidInputError(f"{name} must be in [0, 1], got {value}")
    return value


def _label(name: str, value) -> int:
    """A non-negative int label value."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidInputTypeError(f"{name} must hold int labels, got {value!r}")
    if value < 0:
        raise InvalidInputError(f"{name} must hold labels >= 0, got {value}")
    return int(value)


def _regions(value) -> tuple[tuple[int, ...], ...]:
    """``regions`` as a tuple of regions, each a tuple of labels (a bare label: one)."""
    if not isinstance(value, Sequence) or isinstance(value, (str, bytes)) or not value:
        raise InvalidInputTypeError(
            f"regions must be a non-empty sequence of labels or tuples of labels, got {value!r}"
        )
    if len(value) > MAX_REGIONS:
        raise InvalidInputError(f"regions has {len(value)} regions; at most {MAX_REGIONS}")
    out = []
    for region in value:
        labels = region if isinstance(region, Sequence) else (region,)
        if isinstance(region, (str, bytes)) or not labels:
            raise InvalidInputError(f"regions: each region must name labels, got {region!r}")
        out.append(tuple(_label("regions", v) for v in labels))
    return tuple(out)


@dataclass(frozen=True)
class TverskyOptions:
    """Every option of :func:`fasttversky.tversky_loss`, declared and checked here.

    Per-class values (``alpha``, ``beta``, ``gamma``, ``class_weights``,
    ``ce_class_weights``) are stored as a float or a tuple of floats; tensors are read
    once, at construction.

    Attributes:
        alpha, beta: >= 0, a float or one value per class.
        activation: "softmax" (C >= 2), "sigmoid" (binary C = 1 or multi-label) or
            "none" (logits already are probabilities).
        include_background: if False, class 0 adds no term (ignored when C = 1, whose
            single channel is the foreground).
        batch: pool the sums over the batch (one term per class).
        reduction: "mean" (Σ w_c·term / (Σ w_c · B), B = 1 with ``batch=True``), "sum"
            or "none", which returns the (B, C') terms (times ``class_weights`` when
            given), or (C',) with ``batch=True``; C' = classes kept.
        smooth_nr, smooth_dr: >= 0, added to numerator and denominator.
        gamma: > 0, exponent of each term, a float or one value per class. The term is
            ``max(1 - T, 0) ** gamma`` for every gamma (1 - T < 0 only when smooth_nr >
            smooth_dr, or for activation="none" inputs outside [0, 1]): continuous in
            gamma, exactly 0 for a perfectly predicted class, with a finite gradient
            (0 where 1 - T <= 0). ``compat.monai`` keeps MONAI's unclamped 1 - T.
        generalized: None, or "square", "simple", "uniform": the generalized Tversky
            (Dice for alpha = beta = 0.5) of Sudre et al. 2017, one term per sample (per
            batch with ``batch``): ``(Σ_c w_c TP_c + smooth_nr) / (Σ_c w_c (TP_c +
            alpha_c FP_c + beta_c FN_c) + smooth_dr)``, ``w_c`` = 1/G_c², 1/G_c or 1 for
            G_c the count of class c (no gradient through it); a class absent from the
            sample takes the largest weight of the present ones (MONAI's rule).
            "none" reduction gives (B, 1) (or (1,)). Needs one gamma, no class_weights.
        ignore_index: label value whose voxels add nothing and get zero gradient.
        class_weights: C non-negative weights of the terms.
        backend: "auto", "cpu", "torch", "triton" or "cuda" (env FASTTVERSKY_BACKEND
            overrides "auto"). An explicit backend that cannot run raises with reasons.
        sync_across_ranks: under torch.distributed, compute the loss on the batch
            concatenated over all ranks (the per-sample sums are all-gathered, with
            autograd), so DDP's averaged gradients equal single-process training.
        ce_weight: >= 0. When > 0 the result is the Tversky loss (as above) +
            ``ce_weight`` × CE, computed in the same single pass over the volume (the
            compound loss of nnU-Net / MONAI DiceCE). CE is always ONE mean over the
            whole batch's non-ignored voxels, whatever ``batch`` says (like
            ``F.cross_entropy``), and it is added once to the "mean" or "sum" of the
            Tversky terms; ``reduction="none"`` raises. Needs activation "softmax" or
            "sigmoid"; the target is a label map (integer or float) or a soft target of
            the logits' shape.
            softmax: ``F.cross_entropy(logits, labels, weight=ce_class_weights,
            ignore_index=ignore_index)``, i.e. Σ w_y·(−log p_y) / Σ w_y over the
            non-ignored voxels; with a soft target q, ``F.cross_entropy(logits, q,
            weight=ce_class_weights)``: Σ_c w_c q_c·(−log p_c), mean over the B·N voxels.
            sigmoid: ``F.binary_cross_entropy_with_logits(logits, onehot,
            weight=ce_class_weights[c] per channel)`` where onehot is (label == c), or
            (label == 1) for C = 1, the region targets with ``regions``, or the soft
            target, averaged over the C × non-ignored voxels (ignored voxels add nothing,
            like a zero weight, and are not counted). Where no voxel counts, CE is 0
            rather than F.cross_entropy's NaN. See also ``ce_label_smoothing`` and
            ``ce_focal_gamma``.
        ce_class_weights: C non-negative weights of the CE classes (torch's ``weight``),
            not all zero; independent of ``class_weights``.
        clamp_terms: False keeps MONAI's unclamped ``(1 - T) ** gamma`` (compat.monai).
        ce_label_smoothing: ε in [0, 1], softmax only (like ``ce_focal_*``, it acts on
            the CE term, so only when ``ce_weight > 0``): the CE target becomes
            ``(1 - ε)·onehot + ε / C``, exactly ``F.cross_entropy(..., weight=
            ce_class_weights, ignore_index=ignore_index, label_smoothing=ε)`` (with a
            label map: Σ_c w_c Σ_voxels q_c·(−log p_c) / Σ w_label over the non-ignored
            voxels; with a soft target: the same smoothing of the soft target, mean over
            B·N voxels).
        ce_focal_gamma: None (plain CE/BCE) or γ >= 0: MONAI's ``FocalLoss(gamma=γ,
            alpha=ce_focal_alpha, weight=ce_class_weights, use_softmax=(activation ==
            "softmax"), reduction="mean")`` replaces the CE term, on the one-hot, soft
            or region target: softmax ``−(1 − p_c)^γ·q_c·log p_c`` (q smoothed by
            ``ce_label_smoothing`` when given), sigmoid ``σ(−x·(2q − 1))^γ·BCE(x, q)``,
            summed over classes and voxels and divided by C × the non-ignored voxels (B·C·N
            without ignore_index, as MONAI; ignored voxels add nothing to the sum and are
            not counted, where MONAI 1.6 divides by the non-ignored voxels without the C).
        ce_focal_alpha: None or α in [0, 1] (needs ``ce_focal_gamma``), MONAI's scalar
            alpha: softmax: class 0 weighs 1 − α, every other class α; sigmoid: each
            element weighs ``α·q + (1 − α)·(1 − q)``.
        regions: nnU-Net's region-based training: a tuple of regions, each a label or a
            tuple of labels (``label_manager.foreground_regions``); activation "sigmoid"
            (or "none"), logits C = number of regions (at most 63), target an integer or
            float label map. Region r's target at a voxel is ``label ∈ regions[r]``, read
            from the label map inside the pass (no one-hot is built). Sigmoid CE (``ce_weight
            > 0``) is then the BCE against those region targets, mean over C × the
            non-ignored voxels.
        num_labels: with ``regions``, the valid labels are ``[0, num_labels)`` (default:
            the largest label named + 1); any other label raises, except
            ``ignore_index``, which must lie outside that range (nnU-Net's ignore label is
            the largest label value and no region names it): its voxels add nothing to
            any term and get zero gradient.
    """

    alpha: PerClass = 0.3
    beta: PerClass = 0.7
    activation: str = "softmax"
    include_background: bool = True
    batch: bool = False
    reduction: str = "mean"
    smooth_nr: float = 1e-5
    smooth_dr: float = 1e-5
    gamma: PerClass = 1.0
    generalized: str | None = None
    ignore_index: int | None = None
    class_weights: tuple[float, ...] | None = None
    backend: str = "auto"
    sync_across_ranks: bool = False
    ce_weight: float = 0.0
    ce_class_weights: tuple[float, ...] | None = None
    clamp_terms: bool = True
    ce_label_smoothing: float = 0.0
    ce_focal_gamma: float | None = None
    ce_focal_alpha: float | None = None
    regions: tuple[tuple[int, ...], ...] | None = None
    num_labels: int | None = None

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
        out["gamma"] = _per_class("gamma", self.gamma, positive=True)
        if self.generalized is not None:
            out["generalized"] = _choice("generalized", self.generalized, GENERALIZED_WEIGHTS)
        out["ce_weight"] = _real("ce_weight", self.ce_weight)
        ii = self.ignore_index
        if ii is not None and (isinstance(ii, bool) or not isinstance(ii, numbers.Integral)):
            raise InvalidInputTypeError(f"ignore_index must be an int or None, got {ii!r}")
        out["ignore_index"] = None if ii is None else int(ii)
        out.update(self._checked_ce_terms())
        if self.regions is not None:
            out["regions"] = _regions(self.regions)
        if self.num_labels is not None:
            n = self.num_labels
            if isinstance(n, bool) or not isinstance(n, numbers.Integral):
                raise InvalidInputTypeError(f"num_labels must be an int or None, got {n!r}")
            out["num_labels"] = int(n)
        return out

    def _checked_ce_terms(self) -> dict:
        out = {"ce_label_smoothing": _unit("ce_label_smoothing", self.ce_label_smoothing)}
        if self.ce_focal_gamma is not None:
            out["ce_focal_gamma"] = _real("ce_focal_gamma", self.ce_focal_gamma)
        if self.ce_focal_alpha is not None:
            out["ce_focal_alpha"] = _unit("ce_focal_alpha", self.ce_focal_alpha)
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
        if self.generalized is not None and (
            isinstance(self.gamma, tuple) or self.class_weights is not None
        ):
            raise InvalidInputError(
                "generalized weights make one term per sample: give one gamma and no "
                "class_weights with them"
            )
        if self.ce_weight > 0 and self.activation not in ("softmax", "sigmoid"):
            raise InvalidInputError(
                f"ce_weight > 0 needs activation 'softmax' or 'sigmoid', got {self.activation!r}"
            )
        if self.ce_label_smoothing > 0 and self.activation != "softmax":
            raise InvalidInputError(
                "ce_label_smoothing applies to the softmax cross-entropy, got activation "
                f"{self.activation!r}"
            )
        if self.ce_focal_alpha is not None and self.ce_focal_gamma is None:
            raise InvalidInputError("ce_focal_alpha weighs the focal term: give ce_focal_gamma too")
        self._check_regions()

    def _check_regions(self) -> None:
        if self.regions is None:
            if self.num_labels is not None:
                raise InvalidInputError("num_labels applies with regions; give regions too")
            return
        if self.activation not in ("sigmoid", "none"):
            raise InvalidInputError(
                "regions need activation 'sigmoid' (one output per region), got "
                f"{self.activation!r}"
            )
        largest = max(max(region) for region in self.regions)
        if self.num_labels is not None and self.num_labels <= largest:
            raise InvalidInputError(
                f"num_labels={self.num_labels} must exceed every label the regions name "
                f"(largest: {largest})"
            )
        ii, n = self.ignore_index, self.region_num_labels
        if ii is not None and 0 <= ii < n:
            raise InvalidInputError(
                f"ignore_index={ii} must not be a valid label of the regions [0, {n}) "
                "(nnU-Net's ignore label is the largest label value, and no region names it)"
            )

    @property
    def region_num_labels(self) -> int | None:
        """With ``regions``: the number of valid labels (``num_labels``, or the largest
        label named + 1); None without regions."""
        if self.regions is None:
            return None
        if self.num_labels is not None:
            return self.num_labels
        return max(max(region) for region in self.regions) + 1

    def region_masks(self) -> tuple[int, ...] | None:
        """One int64 bitmask per valid label: bit r set when the label is in region r."""
        if self.regions is None:
            return None
        masks = [0] * self.region_num_labels
        for r, region in enumerate(self.regions):
            for label in region:
                masks[label] |= 1 << r
        return tuple(masks)

    def validate(self, num_classes: int) -> None:
        """Raise InvalidInputError unless the per-class values fit ``num_classes`` classes."""
        if self.regions is not None and len(self.regions) != num_classes:
            raise InvalidInputError(
                f"regions has {len(self.regions)} regions but logits have C={num_classes} "
                "channels (one per region)"
            )
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
        positional = dict(zip(("alpha", "beta"), args, strict=False))
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


def with_option_signature(fn):
    """Show the options in ``fn``'s signature (``help()``, IDEs, ``inspect``), generated
    from the dataclass so that no default is written a second time: ``fn(..., *args,
    options=None, **kwargs)`` reads as ``fn(..., alpha=0.3, beta=0.7, *, activation=...,
    options=None)``."""
    import inspect

    sig = inspect.signature(fn)
    head = [p for p in sig.parameters.values() if p.kind <= p.POSITIONAL_OR_KEYWORD]
    kinds = {
        "alpha": inspect.Parameter.POSITIONAL_OR_KEYWORD,
        "beta": inspect.Parameter.POSITIONAL_OR_KEYWORD,
    }
    options = [
        inspect.Parameter(
            f.name, kinds.get(f.name, inspect.Parameter.KEYWORD_ONLY), default=f.default
        )
        for f in dataclasses.fields(TverskyOptions)
    ]
    tail = [sig.parameters["options"]]
    fn.__signature__ = sig.replace(parameters=head + options + tail)
    return fn
