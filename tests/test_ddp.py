"""DDP with ``sync_across_ranks=True`` equals single-process training on the concatenated
batch: two gloo processes on the CPU (loopback only), uneven local batches (1 and 2).
"""

from __future__ import annotations

import datetime
import gc
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fasttversky
from fasttversky.app.models import UNet3D
from fasttversky.app.training import TrainConfig, TrainOutputs, train
from fasttversky.distributed import gather_stats

WORLD = 2
LOCAL_B = (1, 2)  # uneven on purpose: the loss must not assume equal shards
SPATIAL = (8, 8, 8)


def _global_batch(i: int):
    g = torch.Generator().manual_seed(50 + i)
    image = torch.randn(sum(LOCAL_B), 3, *SPATIAL, generator=g, dtype=torch.float64)
    label = (image[:, 2] > 0.8).to(torch.uint8)
    return image, label


def _shard(rank: int, x: torch.Tensor) -> torch.Tensor:
    start = sum(LOCAL_B[:rank])
    return x[start : start + LOCAL_B[rank]]


def _model():
    torch.manual_seed(0)
    return UNet3D(3, 2, 2, 2).double()


def _worker(rank: int, port: int, errors):
    torch.set_num_threads(1)
    # A short collective timeout: a rank that dies must fail its peer, not hang CI.
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        _checks(rank)
    except BaseException as exc:  # report to the parent, which asserts
        errors.put(f"rank {rank}: {type(exc).__name__}: {exc}")
        raise
    finally:
        # DDP's reducer holds the gloo process group, so destroy_process_group alone does
        # not free it: the group then dies at interpreter exit, where gloo's threads abort
        # the process (SIGABRT, "terminate called without an active exception", seen in 9
        # of 25 runs). _checks has returned, so its DDP wrappers are garbage: collect them
        # (they sit in reference cycles) while the interpreter is whole (0 of 65 runs).
        gc.collect()
        dist.destroy_process_group()


def _checks(rank: int):
    """Everything rank ``rank`` asserts; its DDP wrappers die when it returns."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    image, label = _global_batch(0)
    for kwargs in (
        dict(),
        dict(batch=True),
        dict(gamma=0.75, include_background=False),
        # the CE term's sums and voxel counts are gathered like the Tversky sums:
        # its mean is over the global batch's voxels, as in one process
        dict(ce_weight=1.0, ce_class_weights=[0.3, 1.0]),
        dict(ce_weight=0.5, activation="sigmoid", batch=True),
    ):
        # Single process, whole batch.
        single = _model()
        loss_ref = fasttversky.tversky_loss(single(image), label, backend="torch", **kwargs)
        loss_ref.backward()
        # DDP, each rank its shard; the loss sees the gathered statistics.
        ddp = DDP(_model())
        loss = fasttversky.tversky_loss(
            ddp(_shard(rank, image)),
            _shard(rank, label),
            backend="torch",
            sync_across_ranks=True,
            **kwargs,
        )
        loss.backward()
        torch.testing.assert_close(loss, loss_ref, rtol=1e-12, atol=0)
        for (name, p), q in zip(ddp.module.named_parameters(), single.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-14, msg=name)

    # The training loop end to end: 3 Adam steps, DDP vs single process.
    config = TrainConfig(steps=3, lr=1e-2, backend="torch")
    quiet = TrainOutputs(progress=False)
    single = _model()
    r_single = train(single, _global_batch, config, outputs=quiet)
    ddp = DDP(_model())
    r_ddp = train(
        ddp,
        lambda i: tuple(_shard(rank, t) for t in _global_batch(i)),
        TrainConfig(steps=3, lr=1e-2, backend="torch", sync_across_ranks=True),
        outputs=quiet,
    )
    torch.testing.assert_close(r_ddp.losses, r_single.losses, rtol=1e-10, atol=0)
    for (name, p), q in zip(ddp.module.named_parameters(), single.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12, msg=name)

    # Bad input on one rank: every rank raises at once (none waits in the gather).
    x = torch.randn(LOCAL_B[rank], 2, *SPATIAL, dtype=torch.float64)
    if rank == 1:
        x[0, 1, 0, 0, 0] = float("nan")
    t0 = time.monotonic()
    with pytest.raises(ValueError) as info:
        fasttversky.tversky_loss(x, _shard(rank, label), backend="cpu", sync_across_ranks=True)
    assert time.monotonic() - t0 < 30
    expected = "non-finite" if rank == 1 else "another rank"
    assert expected in str(info.value), str(info.value)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="torch.distributed with gloo is not available",
)
def test_ddp_equals_single_process_on_concatenated_batch():
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    procs = mp.start_processes(
        _worker, args=(_free_port(), errors), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 300
    failure = None
    try:
        while not procs.join(timeout=5):
            if time.monotonic() > deadline:
                failure = "DDP workers did not finish within 300 s"
                break
    except Exception as exc:  # a worker raised or died: join() says which
        failure = str(exc)
    finally:
        for p in procs.processes:
            if p.is_alive():
                p.terminate()
    if failure is not None:
        msgs = []
        while not errors.empty():
            msgs.append(errors.get())
        pytest.fail("\n".join(msgs) or failure)


def test_gather_stats_is_a_no_op_without_a_process_group():
    stats = torch.rand(2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert gather_stats(stats) is stats
