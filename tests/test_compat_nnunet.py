"""``fasttversky.compat.nnunet.DC_and_CE_loss`` against nnU-Net v2's own ``DC_and_CE_loss``.

The reference is nnunetv2's class built as ``nnUNetTrainer._build_loss`` builds it
(``MemoryEfficientSoftDiceLoss``, do_bg=False, smooth=1e-5, weight_ce=weight_dice=1,
batch_dice both ways, with and without ignore label, inside its DeepSupervisionWrapper),
on fresh seeded inputs, value and gradient. nnU-Net accumulates its Dice sums in float32
whatever the logits' dtype, so the comparison with it uses the float32 row of the shared
tolerance table for both dtypes; float64 is additionally checked at float64 tolerance
against nnU-Net's formula written out in float64 here.

Marked ``nnunet``: CI installs the [nnunet] extra and a skip fails the run there.
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from _helpers import TOLERANCES, describe_mismatch

pytestmark = [pytest.mark.nnunet, pytest.mark.usefixtures("one_thread")]
# "auto" (what users get) and the torch fallback, which every build has.
_BACKENDS = ["auto", "torch"]


@pytest.fixture
def nn_losses():
    # Per test (not at module level) so that a missing nnunetv2 is a skip of each marked
    # test, which conftest turns into a failure under FASTTVERSKY_CI=1.
    pytest.importorskip("nnunetv2")
    from nnunetv2.training.loss import compound_losses, deep_supervision, dice

    return compound_losses, dice, deep_supervision


def _case(C=3, shape=(6, 7, 5), B=2, ignore_label=None, dtype=torch.float64, seed=0):
    """(logits (B, C, *shape), labels (B, 1, *shape) float like nnU-Net's loader)."""
    gen = torch.Generator().manual_seed(seed)
    x = (2 * torch.randn((B, C, *shape), generator=gen, dtype=torch.float64)).to(dtype)
    y = torch.randint(0, C, (B, 1, *shape), generator=gen)
    if ignore_label is not None:
        holes = torch.rand((B, 1, *shape), generator=gen) < 0.25
        y = torch.where(holes, ignore_label, y)
    return x, y.float()


def _kwargs(batch_dice, ignore_label, ce_kwargs=None):
    # nnUNetTrainer._build_loss's arguments (ddp=False: single process).
    return dict(
        soft_dice_kwargs={"batch_dice": batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": False},
        ce_kwargs=dict(ce_kwargs or {}),
        weight_ce=1,
        weight_dice=1,
        ignore_label=ignore_label,
    )


def _value_and_grad(loss_fn, x, *args):
    xi = [t.detach().clone().requires_grad_(True) for t in x] if isinstance(x, list) else None
    if xi is None:
        xi = x.detach().clone().requires_grad_(True)
    out = loss_fn(xi, *args)
    # a zero-weighted deep-supervision scale is not in the graph: its gradient is 0
    grads = torch.autograd.grad(out, xi, allow_unused=True, materialize_grads=True)
    return out.detach(), grads


def _assert_close(got, want, dtype, what):
    loss_rtol, grad_rtol = TOLERANCES[dtype]
    v, gs = got
    rv, rgs = want
    assert v.dtype == rv.dtype, f"{what}: dtype {v.dtype} vs nnU-Net's {rv.dtype}"
    tol = loss_rtol * max(rv.abs().item(), 1e-3)
    assert torch.allclose(v.double(), rv.double(), rtol=0, atol=tol), (
        f"{what} value: {describe_mismatch(v, rv, tol)}"
    )
    for g, rg in zip(gs, rgs, strict=True):
        gtol = grad_rtol * max(rg.abs().max().item(), 1e-30)
        assert torch.allclose(g.double(), rg.double(), rtol=0, atol=gtol), (
            f"{what} grad: {describe_mismatch(g, rg, gtol)}"
        )


def _pair(nn_losses, **kw):
    """(nnU-Net's DC_and_CE_loss with MemoryEfficientSoftDiceLoss, ours)."""
    from fasttversky.compat.nnunet import DC_and_CE_loss

    compound, dice, _ = nn_losses
    ref = compound.DC_and_CE_loss(dice_class=dice.MemoryEfficientSoftDiceLoss, **kw)
    ours = DC_and_CE_loss(dice_class=dice.MemoryEfficientSoftDiceLoss, **kw)
    return ref, ours


def _no_slow_path(fn, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a SlowPathWarning would mean the fused path refused
        return fn(*args)


@pytest.mark.parametrize("backend", _BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch_dice", [False, True])
@pytest.mark.parametrize("ignore_label", [None, 3])
def test_matches_nnunet_default_loss(nn_losses, backend, dtype, batch_dice, ignore_label):
    ref, ours = _pair(nn_losses, **_kwargs(batch_dice, ignore_label))
    ours.backend = backend
    x, y = _case(ignore_label=ignore_label, dtype=dtype)
    assert ours.explain(x, y) == "fused"
    got = _no_slow_path(_value_and_grad, ours, x, y)
    want = _value_and_grad(ref, x, y)
    # nnU-Net's Dice sums are float32 even for float64 logits: its float32 tolerance.
    _assert_close(got, want, torch.float32, f"{dtype} batch_dice={batch_dice} ii={ignore_label}")


@pytest.mark.parametrize("batch_dice", [False, True])
@pytest.mark.parametrize("ignore_label", [None, 3])
def test_float64_matches_nnunet_formula_exactly(nn_losses, batch_dice, ignore_label):
    # nnU-Net's formula in float64: CE + (-mean dc), dc = (2I + s) / (Sg + Sp + s) over
    # the kept classes (c >= 1) and the non-ignored voxels.
    _, ours = _pair(nn_losses, **_kwargs(batch_dice, ignore_label))
    x, y = _case(C=4, ignore_label=ignore_label)

    def formula(xi, yi):
        keep = torch.ones_like(yi) if ignore_label is None else (yi != ignore_label).double()
        lab = torch.where(keep.bool(), yi, 0).long()
        p = torch.softmax(xi, 1)[:, 1:] * keep
        g = F.one_hot(lab[:, 0], 4).movedim(-1, 1)[:, 1:].double() * keep
        axes = (0, 2, 3, 4) if batch_dice else (2, 3, 4)
        inter, sp, sg = (p * g).sum(axes), p.sum(axes), g.sum(axes)
        dc = (2 * inter + 1e-5) / (sg + sp + 1e-5)
        ce = F.cross_entropy(xi, yi[:, 0].long(), ignore_index=-100 if ignore_label is None else 3)
        return ce - dc.mean()

    got = _no_slow_path(_value_and_grad, ours, x, y)
    _assert_close(got, _value_and_grad(formula, x, y), torch.float64, "float64 formula")


@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int8, torch.int16, torch.int64])
def test_integer_label_maps_and_2d(nn_losses, label_dtype):
    ref, ours = _pair(nn_losses, **_kwargs(False, 2))
    x, y = _case(C=2, shape=(9, 11), B=3, ignore_label=2, seed=1)
    assert ours.explain(x, y.to(label_dtype)) == "fused"
    got = _no_slow_path(_value_and_grad, ours, x, y.to(label_dtype))
    _assert_close(got, _value_and_grad(ref, x, y), torch.float32, f"labels {label_dtype}")


def test_class_weights_and_term_weights(nn_losses):
    compound, dice, _ = nn_losses
    from fasttversky.compat.nnunet import DC_and_CE_loss

    w = torch.tensor([0.2, 1.0, 3.0], dtype=torch.float64)
    kw = _kwargs(True, 3, ce_kwargs={"weight": w})
    kw.update(weight_ce=0.7, weight_dice=2.5)
    x, y = _case(ignore_label=3, seed=2)
    ref = compound.DC_and_CE_loss(dice_class=dice.MemoryEfficientSoftDiceLoss, **kw)
    ours = DC_and_CE_loss(dice_class=dice.MemoryEfficientSoftDiceLoss, **kw)
    got = _no_slow_path(_value_and_grad, ours, x, y)
    _assert_close(got, _value_and_grad(ref, x, y), torch.float32, "weights")


def test_default_dice_class_is_soft_dice(nn_losses):
    # nnU-Net's constructor default is SoftDiceLoss (same value, unfused memory profile).
    compound, _, _ = nn_losses
    from fasttversky.compat.nnunet import DC_and_CE_loss

    kw = _kwargs(False, None)
    x, y = _case(seed=3)
    got = _value_and_grad(DC_and_CE_loss(**kw), x, y)
    _assert_close(got, _value_and_grad(compound.DC_and_CE_loss(**kw), x, y), torch.float32, "sd")


@pytest.mark.parametrize("batch_dice", [False, True])
def test_deep_supervision_wrapper(nn_losses, batch_dice):
    # As nnUNetTrainer wraps it: weights 1, 1/2, 1/4 with the last zeroed, normalised;
    # the lower-resolution targets come downsampled from the loader.
    _, _, ds = nn_losses
    ref, ours = _pair(nn_losses, **_kwargs(batch_dice, 3))
    w = torch.tensor([1.0, 0.5, 0.25])
    w[-1] = 0
    w = (w / w.sum()).tolist()
    xs, ys = [], []
    for i, s in enumerate(((8, 8, 8), (4, 4, 4), (2, 2, 2))):
        x, y = _case(shape=s, ignore_label=3, seed=10 + i)
        xs.append(x)
        ys.append(y)
    got = _no_slow_path(_value_and_grad, ds.DeepSupervisionWrapper(ours, w), xs, ys)
    want = _value_and_grad(ds.DeepSupervisionWrapper(ref, w), xs, ys)
    _assert_close(got, want, torch.float32, "deep supervision")


def test_all_voxels_ignored(nn_losses):
    # nnU-Net skips CE when no voxel is labelled (num_fg == 0); Dice is then -1.
    ref, ours = _pair(nn_losses, **_kwargs(False, 3))
    x, _ = _case()
    y = torch.full((2, 1, 6, 7, 5), 3.0)
    got = _no_slow_path(_value_and_grad, ours, x, y)
    want = _value_and_grad(ref, x, y)
    assert want[0].item() == -1.0
    # nnU-Net's result is then its float32 Dice alone; ours keeps the logits' dtype.
    got = (got[0].to(want[0].dtype), got[1])
    _assert_close(got, want, torch.float32, "all ignored")


def test_slow_paths_match_nnunet(nn_losses):
    # Options outside the fused kernels: nnU-Net's own computation, same values.
    compound, dice, _ = nn_losses
    from fasttversky.compat.nnunet import DC_and_CE_loss

    x, y = _case(ignore_label=3, seed=4)
    for kw in (
        _kwargs(False, 3, ce_kwargs={"label_smoothing": 0.1}),
        {**_kwargs(True, 3), "weight_dice": 0},
        {**_kwargs(False, None), "soft_dice_kwargs": {"smooth": 0.0, "do_bg": False}},
    ):
        ref = compound.DC_and_CE_loss(dice_class=dice.MemoryEfficientSoftDiceLoss, **kw)
        ours = DC_and_CE_loss(dice_class=dice.MemoryEfficientSoftDiceLoss, **kw)
        yy = y if kw["ignore_label"] is not None else y.clamp_max(2)
        assert ours.explain(x, yy).startswith("fallback: ")
        _assert_close(_value_and_grad(ours, x, yy), _value_and_grad(ref, x, yy), torch.float32, kw)
    # another Dice class is used as nnU-Net would use it
    kw = _kwargs(False, 3)
    ref = compound.DC_and_CE_loss(dice_class=dice.SoftDiceLoss, **kw)
    ours = DC_and_CE_loss(dice_class=dice.SoftDiceLoss, **kw)
    _assert_close(_value_and_grad(ours, x, y), _value_and_grad(ref, x, y), torch.float32, "sd")


def test_nan_logits_give_nan(nn_losses):
    from fasttversky.compat.monai import SlowPathWarning

    ref, ours = _pair(nn_losses, **_kwargs(False, None))
    x, y = _case(seed=5)
    x[0, 1, 2, 3, 4] = float("nan")
    assert torch.isnan(ref(x, y))
    with pytest.warns(SlowPathWarning):
        assert torch.isnan(ours(x, y))


def test_imports_stay_light():
    # `import fasttversky` never imports the compat packages, and the nnU-Net loss
    # itself needs no nnunetv2 (only the trainers module does).
    code = (
        "import sys, fasttversky; assert 'fasttversky.compat.nnunet' not in sys.modules;"
        "import fasttversky.compat.nnunet; assert 'nnunetv2' not in sys.modules, 'nnunetv2'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(_root()))


def _root():
    from pathlib import Path

    return Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("batch_dice", [False, True])
@pytest.mark.parametrize("ignore_label", [None, 3])
def test_tversky_and_ce_matches_reference(batch_dice, ignore_label):
    # The FastTverskyCE trainer's loss: float64 reference Tversky (c >= 1) + CE.
    from fasttversky.compat.nnunet import Tversky_and_CE_loss
    from reference import reference_tversky_loss

    loss = Tversky_and_CE_loss(0.3, 0.7, batch_dice=batch_dice, ignore_label=ignore_label)
    x, y = _case(ignore_label=ignore_label, seed=6)
    ii = ignore_label

    def ref(xi, yi):
        lab = yi[:, 0].long()
        tv = reference_tversky_loss(
            xi, lab, 0.3, 0.7, include_background=False, batch=batch_dice, ignore_index=ii
        )
        return tv + F.cross_entropy(xi, lab, ignore_index=-100 if ii is None else ii)

    want = _value_and_grad(ref, x, y)
    _assert_close(_no_slow_path(_value_and_grad, loss, x, y), want, torch.float64, "fused")
    _assert_close(_value_and_grad(loss._torch_forward, x, y), want, torch.float64, "torch path")


# ------------------------------------------------------------------------------------
# Edge semantics: NaN and errors where nnU-Net gives them; explain() agrees with forward;
# the constructors check every argument they store.
# ------------------------------------------------------------------------------------
def _assert_nan_like(got, want, what):
    """NaN value, and the gradient NaN exactly where nnU-Net's is (elsewhere equal)."""
    assert bool(torch.isnan(want[0])), f"{what}: nnU-Net's value {want[0]} is not NaN"
    assert bool(torch.isnan(got[0])), f"{what}: value {got[0]} where nnU-Net gives NaN"
    for g, rg in zip(got[1], want[1], strict=True):
        assert bool(torch.isnan(rg).any())
        assert torch.equal(torch.isnan(g), torch.isnan(rg)), f"{what}: NaN gradients differ"
    finite = (torch.nan_to_num(got[0], 0.0), [torch.nan_to_num(g, 0.0) for g in got[1]])
    ref = (torch.nan_to_num(want[0], 0.0), [torch.nan_to_num(g, 0.0) for g in want[1]])
    _assert_close(finite, ref, torch.float32, what)


@pytest.mark.parametrize("backend", _BACKENDS)
@pytest.mark.parametrize(
    "ignore_label,weight,fill",
    [
        (None, [0.0, 1.0, 2.0], 0),  # every voxel in the zero-weight class
        (3, [0.0, 1.0, 2.0], 0),  # ... and the others ignored
        (1, [0.0, 1.0, 0.0], 2),  # the weighted class is the ignored one
        (None, [0.0, 0.0, 0.0], None),  # every weight 0
    ],
)
def test_nan_when_no_counted_voxel_has_a_weighted_class(
    nn_losses, backend, ignore_label, weight, fill
):
    # nnU-Net's weighted CE is 0/0 over the counted voxels: NaN, value and gradient.
    kw = _kwargs(False, ignore_label, ce_kwargs={"weight": torch.tensor(weight).double()})
    ref, ours = _pair(nn_losses, **kw)
    ours.backend = backend
    x, y = _case(ignore_label=3 if ignore_label == 3 else None, seed=7)
    if fill is not None:
        y = torch.where(y == 3, y, float(fill))
    want = _value_and_grad(ref, x, y)
    assert ours.explain(x, y).startswith("fallback: ")
    got = _no_slow_path(_value_and_grad, ours, x, y)
    _assert_nan_like(got, want, f"weight {weight}, ignore_label {ignore_label}")


def test_zero_ce_weights_that_leave_a_counted_voxel_stay_fused(nn_losses):
    # One counted voxel of a weighted class (or every voxel ignored: nnU-Net skips CE)
    # and the fused value is nnU-Net's.
    kw = _kwargs(True, 3, ce_kwargs={"weight": torch.tensor([0.0, 1.0, 0.0]).double()})
    ref, ours = _pair(nn_losses, **kw)
    x, _ = _case(seed=8)
    y = torch.zeros(2, 1, 6, 7, 5)
    y[0, 0, 1, 2, 3] = 1.0
    for yy in (y, torch.where(y == 1, 1.0, 3.0), torch.full_like(y, 3.0)):
        assert ours.explain(x, yy) == "fused"
        got = _no_slow_path(_value_and_grad, ours, x, yy)
        want = _value_and_grad(ref, x, yy)
        got = (got[0].to(want[0].dtype), got[1])  # nnU-Net's Dice alone is float32
        _assert_close(got, want, torch.float32, f"labels {yy.unique().tolist()}")


@pytest.mark.parametrize("wdtype", [torch.float64, torch.float16])
def test_ce_weight_of_another_dtype_raises_like_nnunet(nn_losses, wdtype):
    kw = _kwargs(False, 3, ce_kwargs={"weight": torch.tensor([0.5, 1.0, 2.0], dtype=wdtype)})
    ref, ours = _pair(nn_losses, **kw)
    x, y = _case(ignore_label=3, dtype=torch.float32, seed=9)
    with pytest.raises(RuntimeError) as want:
        ref(x, y)
    assert ours.explain(x, y).startswith("fallback: ")
    with pytest.raises(want.type):
        ours(x, y)


def test_ce_ignore_index_without_ignore_label_masks_ce_only(nn_losses):
    # ce_kwargs' own ignore_index: nnU-Net's CE skips those voxels, its Dice does not.
    kw = _kwargs(False, None, ce_kwargs={"ignore_index": 2})
    ref, ours = _pair(nn_losses, **kw)
    x, y = _case(seed=10)
    assert ours.explain(x, y).startswith("fallback: ")
    got = _no_slow_path(_value_and_grad, ours, x, y)
    _assert_close(got, _value_and_grad(ref, x, y), torch.float32, "ce ignore_index")


def test_non_integer_float_labels_explained_and_warned(nn_losses):
    # nnU-Net truncates them (.long()) where its ignore mask compares the raw value: the
    # plan says fallback, forward warns and gives nnU-Net's value.
    from fasttversky.compat.nnunet import SlowPathWarning

    ref, ours = _pair(nn_losses, **_kwargs(False, 3))
    x, y = _case(ignore_label=3, seed=11)
    y = torch.where(y == 3, y, y + 0.25)
    assert ours.explain(x, y).startswith("fallback: ")
    with pytest.warns(SlowPathWarning, match="non-integer"):
        got = _value_and_grad(ours, x, y)
    _assert_close(got, _value_and_grad(ref, x, y), torch.float32, "fractional labels")


_BAD_ARGS = [
    # (class, kwargs, error, name in the message): values stored unchecked before
    ("dc_ce", dict(weight_ce="1"), TypeError, "weight_ce"),
    ("dc_ce", dict(weight_dice=None), TypeError, "weight_dice"),
    ("dc_ce", dict(ignore_label=2.5), TypeError, "ignore_label"),
    ("dc_ce", dict(backend="gpu"), ValueError, "backend"),
    ("dc_ce", dict(soft_dice_kwargs={"batch_dice": "yes"}), TypeError, "batch_dice"),
    ("dc_ce", dict(soft_dice_kwargs={"smooth": "1e-5"}), TypeError, "smooth"),
    ("dc_ce", dict(soft_dice_kwargs=[("smooth", 1.0)]), TypeError, "soft_dice_kwargs"),
    ("dc_ce", dict(dice_class=3), TypeError, "dice_class"),
    ("tv_ce", dict(alpha="0.3"), TypeError, "alpha"),
    ("tv_ce", dict(weight_ce=True), TypeError, "weight_ce"),
    ("tv_ce", dict(batch_dice="no"), TypeError, "batch_dice"),
    ("tv_ce", dict(ignore_label="3"), TypeError, "ignore_label"),
    ("tv_ce", dict(backend="gpu"), ValueError, "backend"),
]


@pytest.mark.parametrize("which,kwargs,error,name", _BAD_ARGS)
def test_constructors_check_every_argument(which, kwargs, error, name):
    from fasttversky.compat.nnunet import DC_and_CE_loss, Tversky_and_CE_loss

    if which == "dc_ce":
        kwargs = {**_kwargs(False, None), **kwargs}
        cls = DC_and_CE_loss
    else:
        cls = Tversky_and_CE_loss
    with pytest.raises(error, match=name):
        cls(**kwargs)


def test_tversky_and_ce_raises_for_a_wrong_target_shape():
    # A real bad input raises, naming the problem, instead of running the torch path.
    from fasttversky.compat.nnunet import Tversky_and_CE_loss

    x, y = _case(seed=12)
    with pytest.raises(ValueError, match="target of shape"):
        Tversky_and_CE_loss()(x, y[:, :, :3])


def test_an_invalid_option_raises_instead_of_taking_the_slower_path(nn_losses):
    # Only what the kernels refuse in the values takes nnU-Net's path; an option the
    # fused call rejects is a bug to see, not a slow path to hide.
    import fasttversky

    _, ours = _pair(nn_losses, **_kwargs(False, 3))
    ours.backend = "gpu"  # set after construction, which checks it
    x, y = _case(ignore_label=3, seed=13)
    with pytest.raises(fasttversky.InvalidInputError, match="backend"):
        _no_slow_path(ours, x, y)
