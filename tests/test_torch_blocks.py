"""The torch backend works one block of voxels at a time (its memory stays the gradient
plus a few blocks at any C): a volume of many blocks must still match the float64
reference, and give the same loss, bitwise, for any thread count (the gradient may differ
by an ulp where ATen's softmax rounds a voxel differently per thread count: README)."""

from __future__ import annotations

import torch

from fasttversky.ops import torch as torch_backend
from tests._helpers import check_against_reference, make_inputs


def test_many_blocks_match_reference_and_are_thread_independent(monkeypatch):
    monkeypatch.setattr(torch_backend, "_BLOCK_ELEMENTS", 3 * 8192)  # blocks of 8192 voxels
    x, t = make_inputs(1, 3, (20, 30, 31), seed=9)  # 18,600 voxels: three blocks, one partial
    assert len(torch_backend._voxel_blocks(1, 3, x[0, 0].numel())) == 3
    for kw in (
        dict(),
        dict(ce_weight=0.5, ignore_index=2),
        dict(activation="sigmoid", ce_weight=1.0),
    ):
        check_against_reference(x, t, "torch", **kw)
    n = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            z = x.clone().requires_grad_(True)
            loss = torch_backend_loss(z, t)
            loss.backward()
            results.append((loss.detach(), z.grad))
    finally:
        torch.set_num_threads(n)
    assert torch.equal(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1], rtol=2.4e-7, atol=1e-12)


def torch_backend_loss(z, t):
    import fasttversky

    return fasttversky.tversky_loss(z, t, ce_weight=0.5, backend="torch")
