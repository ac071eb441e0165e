"""``TverskyLoss``, ``DiceLoss``, ``GeneralizedDiceLoss``, ``DiceCELoss``, ``FocalLoss``
and ``DiceFocalLoss`` with the constructors, defaults and values of MONAI's.

Modules: ``_tversky`` (TverskyLoss), ``_dice`` (DiceLoss and GeneralizedDiceLoss: the
Tversky plan with MONAI's Dice ratio, weights and reduction), ``_dice_ce``
(DiceCELoss), ``_focal`` (FocalLoss, DiceFocalLoss), ``_compound`` (a Dice term and a
cross-entropy-family term as one fused pass, or one per term where MONAI gives them
different activations), ``_base`` (the options they all share), ``_mirror`` and
``_mirror_focal`` (MONAI's forwards in plain torch, the slower path); label conversion,
argument checks and :class:`SlowPathWarning` are ``compat._common``'s.

``DiceCELoss``, ``FocalLoss`` and ``DiceFocalLoss`` document their own fused and slower
paths (``DiceLoss`` and ``GeneralizedDiceLoss`` share ``TverskyLoss``'s). What follows
describes ``TverskyLoss``; *When a SlowPathWarning is given* holds for every class.

Migrating is one import line::

    # from monai.losses import TverskyLoss
    from fasttversky.compat.monai import TverskyLoss

    loss = TverskyLoss(softmax=True, to_onehot_y=True)(logits, labels)

MONAI is never imported: every piece of MONAI behaviour this class reproduces is
re-implemented in ``_mirror`` (and checked against MONAI 1.6 in tests/test_compat_monai.py).

Two paths
---------
**Fused** (``fasttversky.tversky_loss``, one pass forward, one pass backward, no one-hot
in memory) whenever MONAI's semantics equal the kernels':

* activation ``sigmoid=True``, ``softmax=True`` (C >= 2) or none (probabilities given);
  ``other_act`` is applied first (like MONAI, materialising its output) and the fused
  loss runs on the result with no activation;
* ``to_onehot_y=True`` with a (B, 1, *spatial) label map of any integer dtype, or float
  labels (MONAI's float ``MetaTensor`` label maps), which the kernels read as they are
  (where the backend ``auto`` picks for integer labels reads float ones; else one cheap
  conversion pass first); non-integer float labels are truncated like MONAI's
  ``one_hot`` (``.long()``) on a second try -- never a one-hot;
* ``to_onehot_y=False`` with a float (B, C, *spatial) target in [0, 1] (one-hot or
  soft), an integer one-hot (converted to the logits' dtype), or for C = 1 a
  (B, 1, *spatial) mask (bool only with an ``ignore_index``, see below);
* ``ignore_index`` whenever MONAI derives its mask from a label map: always with
  ``to_onehot_y=True``, and for C = 1 (float labels must then be integer-valued);
* ``soft_label=True`` when the target is hard (label map or integer one-hot) and an
  activation is applied: MONAI's L1 formulation then equals the product form, values
  and -- through sigmoid/softmax -- gradients;
* include_background, batch, every reduction, alpha/beta/smooth >= 0.

**MONAI-equivalent slower path** (plain torch, a line-by-line mirror of MONAI's
forward, including its errors) for everything else:

* ``soft_label=True`` with a float target (may be soft: MONAI uses |p|, |g|, |p-g|) or
  with no activation (|p| != p for negative inputs);
* ``ignore_index`` with a one-hot target of C > 1 channels (MONAI masks voxels where the
  ignored channel is set, or where all channels are zero for a sentinel value), or with
  non-integer float labels (MONAI compares the unrounded value with ``ignore_index``);
* negative or non-scalar alpha/beta, negative smoothing, a target that requires grad,
  fewer than 1 or more than 3 spatial dims, empty tensors, shapes MONAI would reject;
* any input the fused kernels refuse while running (non-finite logits, a soft target
  outside [0, 1], labels outside [0, C)): the mirror then returns what MONAI returns
  (NaN) or raises MONAI's error.

``TverskyLoss.explain(input, target)`` says which path a call takes and why.

When a SlowPathWarning is given
-------------------------------
Every class here, whenever a call returns MONAI's result computed by the slower path --
for an option, an input, or values the kernels refuse while running -- gives one
:class:`SlowPathWarning` naming the class and the reason (``explain()``'s text after
``"fallback: "``; for a refusal, ``"the fused kernels refused these inputs (...)"``):

* once per loss instance and reason: the first training step with ``squared_pred=True``
  warns, the following ones do not; a new reason (another target dtype, say) warns
  again, and so does a new instance. Refusals count once per kind (the error's type:
  non-finite logits, out-of-range targets), whatever counts their text gives. (A warning
  that the warning filters turn into an error is not counted as given.)
* after MONAI's result is computed, so where the slower path only mirrors MONAI raising
  (a shape, dtype or option MONAI rejects, labels MONAI's ``one_hot`` cannot encode),
  MONAI's error comes alone, with no SlowPathWarning: no slower result was returned.
* MONAI's own warnings (one channel with ``softmax=True``, ``to_onehot_y=True`` or
  ``include_background=False``; FocalLoss's "scalar alpha ignored") are given
  exactly as MONAI gives them, on either path.

The common configurations (softmax or sigmoid, ``to_onehot_y=True`` or a one-hot/soft
target, with or without background, ``batch``, class weights) run fused and give none.

Differences that remain
-----------------------
* Half-precision inputs: MONAI rounds the probabilities to bf16/fp16 and sums in that
  dtype when the target is half too; the fused path computes in fp32 and sums in fp64,
  then casts to MONAI's result dtype. Values agree to the half dtype's rounding.
* MONAI raises for ``soft_label=True`` with an integer target it did not one-hot
  encode itself (``linalg.vector_norm`` of an integer tensor); this class computes the
  loss of that hard mask instead (a bool target raises, as in MONAI).
* A MONAI ``MetaTensor`` input gives a plain ``torch.Tensor`` loss, not a MetaTensor.
"""

from .._common import SlowPathWarning
from ._dice import DiceLoss, GeneralizedDiceLoss
from ._dice_ce import DiceCELoss
from ._focal import DiceFocalLoss, FocalLoss
from ._tversky import TverskyLoss

__all__ = [
    "DiceCELoss",
    "DiceFocalLoss",
    "DiceLoss",
    "FocalLoss",
    "GeneralizedDiceLoss",
    "SlowPathWarning",
    "TverskyLoss",
]
