"""The CPU backward's kept gradient buffers (fasttversky/ops/_grad_buffers.py): a free
buffer is reused, one that any tensor or array still refers to never is, and a reused
buffer gives the same gradient as a fresh one (the float64 reference's)."""

from __future__ import annotations

import pytest
import torch
from _helpers import check_against_reference, make_inputs, use_backend

from fasttversky.ops import _grad_buffers

pytestmark = pytest.mark.skipif(
    _grad_buffers._use_count is None, reason="this torch has no storage use count"
)
SHAPE = (1, 8, (32, 32, 32))  # a 1 MiB float32 gradient: large enough to be kept


@pytest.fixture(autouse=True)
def cpu_and_fresh_cache(monkeypatch):
    use_backend("cpu", monkeypatch)
    monkeypatch.delenv("FASTTVERSKY_GRAD_CACHE_MB", raising=False)
    _grad_buffers.limit_bytes.cache_clear()
    _grad_buffers.release()
    yield
    _grad_buffers.limit_bytes.cache_clear()
    _grad_buffers.release()


def grad_of(seed, ce_weight=1.0):
    x, t = make_inputs(*SHAPE, seed=seed)
    x.requires_grad_(True)
    loss = __import__("fasttversky").tversky_loss(
        x, t, 0.3, 0.7, ce_weight=ce_weight, backend="cpu"
    )
    (g,) = torch.autograd.grad(loss, x)
    return g


def test_a_free_buffer_is_reused_and_gives_the_reference_gradient():
    first = grad_of(0)
    ptr = first.data_ptr()
    del first
    x, t = make_inputs(*SHAPE, seed=1)
    _, grad = check_against_reference(x, t, "cpu", alpha=0.3, beta=0.7, ce_weight=1.0)
    assert grad.data_ptr() == ptr


def test_a_held_gradient_is_never_written():
    held = grad_of(0)
    before = held.clone()
    other = grad_of(1)
    assert other.data_ptr() != held.data_ptr()
    assert torch.equal(held, before)


def test_a_numpy_view_keeps_its_buffer():
    array = grad_of(0).numpy()  # the tensor is gone, the array still refers to its memory
    before = array.copy()
    grad_of(1)
    assert (array == before).all()


def test_reuse_is_bitwise_the_fresh_result():
    fresh = grad_of(2).clone()  # kept buffer now free
    assert torch.equal(grad_of(2), fresh)


@pytest.mark.parametrize("mb", ["0", "0.5"])
def test_a_bound_below_the_gradient_keeps_nothing(monkeypatch, mb):
    monkeypatch.setenv("FASTTVERSKY_GRAD_CACHE_MB", mb)
    first = grad_of(0)
    ptr = first.data_ptr()
    del first
    assert not _grad_buffers._kept
    grad_of(1)  # may land at the same address by chance; nothing kept is the check
    assert not _grad_buffers._kept and ptr


@pytest.mark.parametrize("raw", ["-1", "lots", "nan"])
def test_a_bad_bound_is_a_one_line_error(monkeypatch, raw):
    monkeypatch.setenv("FASTTVERSKY_GRAD_CACHE_MB", raw)
    with pytest.raises(ValueError, match="FASTTVERSKY_GRAD_CACHE_MB") as exc:
        grad_of(0)
    assert "\n" not in str(exc.value)
