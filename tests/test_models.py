"""UNet3D: same function as the plain reference U-Net, in every configuration."""

from __future__ import annotations

import pytest
import torch

from fasttversky.app.models import CHECKPOINT_MODES, NORMS, UNet3D
from reference.unet import ReferenceUNet3D

X_SHAPE = (2, 3, 8, 12, 16)


pytestmark = pytest.mark.usefixtures("one_thread")


def _pair(norm="none", checkpoint="all", levels=3, base=2, dtype=torch.float64):
    torch.manual_seed(0)
    fast = UNet3D(3, 2, base, levels, checkpoint=checkpoint, norm=norm).to(dtype)
    ref = ReferenceUNet3D(3, 2, base, levels, norm=norm).to(dtype)
    ref.load_state_dict(fast.state_dict())
    return fast, ref


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("checkpoint", CHECKPOINT_MODES)
def test_forward_and_backward_equal_reference(norm, checkpoint):
    fast, ref = _pair(norm, checkpoint)
    x = torch.randn(X_SHAPE, dtype=torch.float64)
    w = torch.randn(X_SHAPE[0], 2, *X_SHAPE[2:], dtype=torch.float64)
    y_fast, y_ref = fast(x), ref(x)
    assert y_fast.shape == (X_SHAPE[0], 2, *X_SHAPE[2:])
    # Equal up to summation order (the decoder's split concat-conv, the matmul head).
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-12, atol=1e-12)
    (y_fast * w).sum().backward()
    (y_ref * w).sum().backward()
    for (name, p), q in zip(fast.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=name)
    # Checkpoint recomputation must not update batch-norm running stats twice.
    for (name, a), b in zip(fast.named_buffers(), ref.buffers(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("norm", NORMS)
def test_checkpoint_modes_are_bitwise_identical(norm):
    """Recomputation replays the same ops: checkpointing changes memory, not numbers."""
    x = torch.randn(X_SHAPE, dtype=torch.float64)
    outs, grads = [], []
    for mode in CHECKPOINT_MODES:
        model, _ = _pair(norm, mode)
        y = model(x)
        y.square().sum().backward()
        outs.append(y)
        grads.append([p.grad for p in model.parameters()])
    for y, g in zip(outs[1:], grads[1:], strict=True):
        assert torch.equal(y, outs[0])
        assert all(torch.equal(a, b) for a, b in zip(g, grads[0], strict=True))


def test_state_dicts_load_into_each_other():
    fast, ref = _pair("batch")
    assert list(fast.state_dict()) == list(ref.state_dict())
    assert [n for n, _ in fast.named_parameters()] == [n for n, _ in ref.named_parameters()]
    fast.load_state_dict(ref.state_dict())


def test_architecture_shapes():
    model = UNet3D(3, 2, base_features=4, levels=4)
    feats = [m.conv2.out_channels for m in model.encoders]
    assert feats == [4, 8, 16, 32]
    assert [d.up.out_channels for d in model.decoders] == [4, 8, 16]
    assert model.decoders[0].conv.conv1.in_channels == 8  # skip concatenation
    assert model.head.kernel_size == (1, 1, 1) and model.head.out_channels == 2
    with torch.no_grad():
        out = model(torch.randn(1, 3, 8, 8, 8))
    assert out.shape == (1, 2, 8, 8, 8)


def test_single_level():
    fast, ref = _pair(levels=1)
    x = torch.randn(1, 3, 5, 6, 7, dtype=torch.float64)
    torch.testing.assert_close(fast(x), ref(x), rtol=1e-12, atol=1e-12)


def test_bf16_autocast_gives_bf16_logits_and_grads():
    torch.manual_seed(0)
    model = UNet3D(3, 2, 2, 3)
    x = torch.randn(1, 3, 8, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


def test_no_checkpointing_without_grad():
    model = UNet3D(3, 2, 2, 2)
    with torch.no_grad():
        assert not model._checkpointed(0)
    assert model._checkpointed(0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="checkpoint"):
        UNet3D(checkpoint="some")
    with pytest.raises(ValueError, match="norm"):
        UNet3D(norm="layer")
    with pytest.raises(ValueError, match="levels"):
        UNet3D(levels=0)
    model = UNet3D(3, 2, 2, 3)
    with pytest.raises(ValueError, match="divisible"):
        model(torch.randn(1, 3, 8, 8, 6))
    with pytest.raises(ValueError, match="expected input"):
        model(torch.randn(1, 1, 8, 8, 8))


def test_channels_last_input_and_weights():
    """channels_last_3d (faster on the CPU, see bench/results/training_cpu.md) gives the
    same function, and the matmul head keeps the layout without a copy."""
    fast, ref = _pair(dtype=torch.float32)
    x = torch.randn(X_SHAPE)
    expect = ref(x)
    fast.to(memory_format=torch.channels_last_3d)
    y = fast(x.to(memory_format=torch.channels_last_3d))
    # float32 convs run on oneDNN in channels-last (float64 ones fall back to contiguous)
    assert y.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(y, expect, rtol=1e-4, atol=1e-5)


def test_depth_folded_conv_equals_plain_conv():
    """The CPU batch-1 conv that folds depth halves into the batch (oneDNN instead of
    im2col) computes the same padded conv, forward and backward."""
    from fasttversky.app.models.unet import _conv3x3, _fold_depth

    torch.manual_seed(0)
    x = torch.randn(1, 4, 8, 10, 12, requires_grad=True)
    w = torch.randn(6, 4, 3, 3, 3, requires_grad=True)
    b = torch.randn(6, requires_grad=True)
    assert _fold_depth(x) == torch.backends.mkldnn.is_available()
    g = torch.randn(1, 6, 8, 10, 12)
    grads = []
    for fn in (_conv3x3, lambda x, w, b: torch.nn.functional.conv3d(x, w, b, padding=1)):
        y = fn(x, w, b)
        grads.append((y.detach(), *torch.autograd.grad(y, (x, w, b), g)))
    for a, e in zip(*grads, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)
