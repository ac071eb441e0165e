"""Timed nnU-Net trainers for ``bench/nnunet_epoch.py``: the stock ``nnUNetTrainer`` and
fasttversky's ``nnUNetTrainerFastDiceCE``, each with the same instrumentation.

``bench/nnunet_epoch.py`` copies this file into a folder listed in ``nnUNet_extTrainer``
(nnU-Net imports it there as a top-level module, so imports are absolute). Each run:
one training epoch of ``FT_EPOCH_ITERATIONS`` iterations, one validation iteration (the
smallest nnU-Net allows without patching its epoch end), no final sliding-window
validation, one torch thread, seeded as the test trainers are. At the end of the epoch
it writes ``epoch_bench.json`` into the output folder:

* ``loader_s``: per iteration, the time the training loop waits in
  ``next(self.dataloader_train)`` (with ``nnUNet_n_proc_DA=0`` the whole data pipeline,
  nnU-Net's region conversion included, runs in this wait);
* ``loss_s``: per iteration, forward + backward of ``self.loss`` alone (deep
  supervision wrapper included): the loss runs on detached copies of the network's
  outputs, its gradients are handed to the network's backward unchanged (``_GradsFrom``),
  so the step computes exactly what nnU-Net's does;
* ``step_s``: per iteration, the whole ``train_step`` (its rest is network forward and
  backward, gradient clipping, the optimizer step);
* ``train_s``: wall time of the epoch's training loop; ``epoch_s``: nnU-Net's own epoch
  time (training, the validation iteration, logging, the "best" checkpoint);
* ``vm_hwm_mib``: the process's peak resident set during the training loop (``VmHWM``,
  reset when the loop starts); ``worker_hwm_mib``: the data workers' lifetime peaks;
* ``first_loss``: the first iteration's loss value.
"""

from __future__ import annotations

import json
import os
import random
import re
import resource
import time

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from fasttversky.compat.nnunet.trainers.fasttversky_trainers import nnUNetTrainerFastDiceCE


def _status_mib(key: str, pid: str = "self") -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1)) / 1024
    except (OSError, AttributeError):
        return None


class _GradsFrom(torch.autograd.Function):
    """The loss value, whose backward hands the network's outputs the loss gradients
    already computed (times the incoming gradient, 1 in nnU-Net's step)."""

    @staticmethod
    def forward(ctx, value, grads, *outputs):
        ctx.grads = grads
        return value.clone()

    @staticmethod
    def backward(ctx, g):
        scale = None if float(g) == 1.0 else g
        grads = [gr if gr is None or scale is None else gr * scale for gr in ctx.grads]
        return (None, None, *grads)


class _TimedLoss(torch.nn.Module):
    """``loss`` with its forward + backward timed on each training call (validation
    calls, under no_grad, pass through untimed)."""

    def __init__(self, loss):
        super().__init__()
        self.loss, self.seconds = loss, []

    def forward(self, output, target):
        if not torch.is_grad_enabled():
            return self.loss(output, target)
        many = isinstance(output, (list, tuple))
        outs = list(output) if many else [output]
        leaves = [o.detach().requires_grad_(True) for o in outs]
        t0 = time.perf_counter()
        value = self.loss(leaves if many else leaves[0], target)
        value.backward()
        self.seconds.append(time.perf_counter() - t0)
        return _GradsFrom.apply(value.detach(), [leaf.grad for leaf in leaves], *outs)


class _TimedLoader:
    """The training data loader, with the wait in each ``next`` timed."""

    def __init__(self, loader):
        self.loader, self.seconds = loader, []

    def __iter__(self):
        return self

    def __next__(self):
        t0 = time.perf_counter()
        batch = next(self.loader)
        self.seconds.append(time.perf_counter() - t0)
        return batch


class _EpochBench:
    # nnUNetTrainer reads its own __init__ signature: keep it exactly.
    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):  # noqa: B008
        random.seed(0)
        np.random.seed(0)
        torch.manual_seed(0)
        super().__init__(plans, configuration, fold, dataset_json, device)
        torch.set_num_threads(1)  # nnUNetv2_train sets os.cpu_count() threads on the CPU
        self.num_iterations_per_epoch = int(os.environ.get("FT_EPOCH_ITERATIONS", "20"))
        self.num_val_iterations_per_epoch = 1
        self.num_epochs = 1
        self._step_s, self._first_loss = [], None

    def _build_loss(self):
        return _TimedLoss(super()._build_loss())

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self.dataloader_train = _TimedLoader(self.dataloader_train)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := current RSS: the peak below is the loop's
        self._t0 = time.perf_counter()

    def train_step(self, batch):
        t0 = time.perf_counter()
        out = super().train_step(batch)
        self._step_s.append(time.perf_counter() - t0)
        if self._first_loss is None:
            self._first_loss = float(out["loss"])
        return out

    def on_train_epoch_end(self, train_outputs):
        self._train_s = time.perf_counter() - self._t0
        self._hwm = _status_mib("VmHWM")
        timed, self.dataloader_train = self.dataloader_train, self.dataloader_train.loader
        self._loader_s = timed.seconds
        super().on_train_epoch_end(train_outputs)

    def on_epoch_end(self):
        super().on_epoch_end()
        get = self.logger.get_value
        workers = getattr(self.dataloader_train, "_processes", None) or []
        record = {
            "trainer": type(self).__name__,
            "iterations": self.num_iterations_per_epoch,
            "n_proc_DA": os.environ.get("nnUNet_n_proc_DA"),
            "torch_threads": torch.get_num_threads(),
            "patch_size": list(self.configuration_manager.patch_size),
            "batch_size": self.batch_size,
            "regions": len(self.label_manager.foreground_regions or ()),
            "train_s": self._train_s,
            "epoch_s": get("epoch_end_timestamps", -1) - get("epoch_start_timestamps", -1),
            "loader_s": self._loader_s,
            "loss_s": self.loss.seconds,
            "step_s": self._step_s,
            "vm_hwm_mib": self._hwm,
            "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "worker_hwm_mib": [_status_mib("VmHWM", str(p.pid)) for p in workers],
            "first_loss": self._first_loss,
            "train_loss": float(get("train_losses", -1)),
        }
        with open(os.path.join(self.output_folder, "epoch_bench.json"), "w") as f:
            json.dump(record, f, indent=1)

    def perform_actual_validation(self, save_probabilities=False):
        pass  # sliding-window inference of the validation cases: not the epoch's cost


class nnUNetTrainer_epochbench(_EpochBench, nnUNetTrainer):  # noqa: N801 -- nnU-Net's naming
    pass


class nnUNetTrainerFastDiceCE_epochbench(_EpochBench, nnUNetTrainerFastDiceCE):  # noqa: N801
    pass
