"""The GPU report: test suite, then the benchmark matrix, as Markdown + JSON.

    PYTHONPATH=. python bench/gpu_report.py --out bench/results/gpu-<date>

One command on a bare GPU machine with torch + triton (nvcc optional: without it the
cuda backend is reported unavailable and its rows say why). Where one command may run
for 10 minutes at most, split it: ``--skip-bench`` (tests + training), then
``--skip-tests --skip-training [--cases ...] [--providers ...]``; every section rewrites
the report, so a run cut short still leaves what it measured. Sections, each of which
records its error in the report instead of ending the run:

1. environment: GPU, driver/CUDA/torch/triton/nvcc versions, backends available;
2. tests: ``pytest tests/test_gpu.py tests/test_triton.py`` with the Triton interpreter
   off (compiled kernels on the GPU, float64 reference on the GPU, 20-repeat bitwise
   determinism);
3. device-to-device copy bandwidth, measured in this run (the yardstick);
4. the matrix: shapes 2x2x128x224x256 (paper, batch 2) and 1x4x160^3, fp32 and bf16
   logits, uint8 labels, modes fwd and fwd+bwd, providers triton, cuda, reference
   (eager), torch.compile(reference), MONAI. Per row: median ms, bytes that must move
   (fwd: logits + labels; fwd+bwd: twice that + the gradient), GB/s, fraction of the
   copy bandwidth, peak extra memory (``max_memory_allocated`` delta: for fwd+bwd it
   includes the gradient buffer itself, shown separately as "beyond grad"), and
   "kernel" rows timing the backend's forward_stats + backward alone, without the
   Python/finalize around them;
5. the compound matrix (fwd+bwd): Dice+CE, Tversky+CE and Dice+CE over 5 deep-supervision
   scales, at C = 2 (paper volume, batch 2), 16 and 118 (128^3), fp32 and bf16: the fused
   backends against nnU-Net's DC_and_CE_loss / DeepSupervisionWrapper and MONAI's
   DiceCELoss, eager and torch.compile'd (``--compound-providers``, ``--skip-compound``;
   ``--cases`` takes ids such as ``dicece-c16-128-fp32``);
6. the U-Net training step, if ``bench/bench_training.py`` has ``gpu_training_report()``.

``--dry-run`` runs the same plumbing on the CPU at toy sizes (triton in the
interpreter, the torch backend standing in for cuda) to check the script itself.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "bench"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

# The interpreter must be decided before triton is imported: on a GPU it must be off
# (compiled kernels); a --dry-run without a GPU needs it on.
import torch  # noqa: E402  (importing torch does not import triton)

if "--dry-run" in sys.argv and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
else:
    os.environ.pop("TRITON_INTERPRET", None)

ALPHA, BETA = 0.3, 0.7
MODES = ("fwd", "fwdbwd")
# (name, batch, classes, spatial) of the matrix; dry-run: toy sizes.
SHAPES = [("paper-b2", 2, 2, (128, 224, 256)), ("4class-160", 1, 4, (160, 160, 160))]
DRY_SHAPES = [("paper-toy", 2, 2, (8, 14, 16)), ("4class-toy", 1, 4, (10, 10, 10))]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PROVIDERS = ("triton", "cuda", "reference", "compile(reference)", "monai")
SLOW = ("reference", "compile(reference)", "monai")
# Issue 28's compound matrix (fwd+bwd only): Dice+CE and Tversky+CE, and Dice+CE with
# 5-scale deep supervision, at C = 2, 16, 118, against nnU-Net's and MONAI's losses,
# eager and torch.compile'd (bench/_baselines.py builds them as users do).
COMPOUND_SHAPES = [
    ("paper-c2", 2, 2, (128, 224, 256)),
    ("c16-128", 1, 16, (128, 128, 128)),
    ("c118-128", 1, 118, (128, 128, 128)),
]
DRY_COMPOUND_SHAPES = [
    ("c2-toy", 2, 2, (8, 14, 16)),
    ("c16-toy", 1, 16, (8, 8, 8)),
    ("c118-toy", 1, 118, (4, 8, 8)),
]
COMPOUND_LOSSES = ("dicece", "tverskyce", "ds5")
COMPOUND_PROVIDERS = ("triton", "cuda", "nnunet", "compile(nnunet)", "monai", "compile(monai)")
DS_SCALES = 5
TARGETS = {
    "copy_fraction": 0.80,
    "vs_eager": 10.0,
    "vs_monai": 10.0,
    "vs_compile": 1.5,
    "extra_mib": 1.0,
}


# --------------------------------------------------------------------------------------
# cases and providers (shared with bench/bench_gpu.py)
# --------------------------------------------------------------------------------------
class Case:
    def __init__(self, name, batch, classes, spatial, dtype_name):
        self.name, self.batch, self.classes, self.spatial = name, batch, classes, spatial
        self.dtype_name, self.dtype = dtype_name, DTYPES[dtype_name]

    @property
    def id(self) -> str:
        return f"{self.name}-{self.dtype_name}"

    @property
    def shape(self):
        return (self.batch, self.classes, *self.spatial)

    @property
    def voxels(self) -> int:
        n = self.batch
        for s in self.spatial:
            n *= s
        return n

    def bytes_moved(self, mode: str) -> int:
        """What any implementation must move: fwd reads logits + labels (uint8); the
        backward reads them again and writes the gradient."""
        L = self.voxels * self.classes * self.dtype.itemsize
        Y = self.voxels
        return (
            L + Y
            if mode in ("fwd", "fwd-kernel")
            else (L + Y + L if mode == "bwd-kernel" else 2 * (L + Y) + L)
        )

    def make(self, device, seed=0):
        g = torch.Generator(device=device).manual_seed(seed)
        logits = torch.randn(self.shape, generator=g, device=device).to(self.dtype)
        u = torch.rand((self.batch, *self.spatial), generator=g, device=device)
        # ~90 % background, the rest spread over the other classes (small lesions).
        fg = ((u - 0.9).clamp_min(0) / 0.1 * (self.classes - 1)).floor() + 1
        labels = torch.where(u < 0.9, 0.0, fg.clamp_max(self.classes - 1)).to(torch.uint8)
        del u, fg
        return logits.requires_grad_(True), labels


def cases(dry: bool):
    return [Case(n, b, c, s, d) for (n, b, c, s) in (DRY_SHAPES if dry else SHAPES) for d in DTYPES]


_COMPILED: dict = {}


def provider_fn(name: str, dry: bool):
    """fn(logits, labels) -> scalar loss, or raise with the reason it cannot run."""
    import fasttversky

    if name in ("triton", "cuda"):
        backend = "torch" if (dry and name == "cuda") else name
        if not dry or name == "triton":
            from fasttversky._dispatch import _load

            impl, err = _load(backend)
            why = err or impl.unavailable()
            if why:
                raise RuntimeError(f"{backend} backend unavailable: {why}")

        def fn(x, y):
            return fasttversky.tversky_loss(x, y, ALPHA, BETA, backend=backend)

        return fn
    from reference import reference_tversky_loss

    if name == "reference":
        return lambda x, y: reference_tversky_loss(x, y, ALPHA, BETA)
    if name == "compile(reference)":
        if "fn" not in _COMPILED:
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            _COMPILED["fn"] = torch.compile(reference_tversky_loss, dynamic=False)
        c = _COMPILED["fn"]
        return lambda x, y: c(x, y, ALPHA, BETA)
    if name == "monai":
        from monai.losses import TverskyLoss  # ImportError: recorded as "not installed"

        loss = TverskyLoss(softmax=True, to_onehot_y=True, alpha=ALPHA, beta=BETA)
        return lambda x, y: loss(x, y.unsqueeze(1))
    raise ValueError(name)


# --------------------------------------------------------------------------------------
# measurement
# --------------------------------------------------------------------------------------
def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_call(fn, device, reps, warmup) -> list[float]:
    """Seconds per call, each call synchronised (what a training step pays)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def peak_extra(fn, device) -> int | None:
    if device != "cuda":
        return None
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def copy_bandwidth(device, nbytes=512 * 2**20, reps=20) -> dict:
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    times = time_call(lambda: dst.copy_(src), device, reps, warmup=3)
    med = statistics.median(times)
    return {"bytes": 2 * nbytes, "median_ms": med * 1e3, "gbps": 2 * nbytes / med / 1e9}


def bench_case(case: Case, device, dry, copy_gbps, reps, errors, providers=PROVIDERS) -> list[dict]:
    rows = []
    try:
        logits, labels = case.make(device)
    except Exception as exc:  # e.g. OOM
        errors.append(f"{case.id}: making inputs: {type(exc).__name__}: {exc}")
        return rows
    for prov in providers:
        try:
            fn = provider_fn(prov, dry)
        except Exception as exc:
            for mode in MODES:
                rows.append(
                    {
                        "case": case.id,
                        "provider": prov,
                        "mode": mode,
                        "error": f"{type(exc).__name__}: {exc}"[:300],
                    }
                )
            continue
        n = max(2, reps // 4) if prov in SLOW else reps
        for mode in MODES:
            row = {"case": case.id, "provider": prov, "mode": mode, "bytes": case.bytes_moved(mode)}
            rows.append(timed_row(row, fn, logits, labels, device, n, copy_gbps))
        gc.collect()
    rows += kernel_rows(case, logits, labels, device, dry, copy_gbps, reps)
    logits = labels = None  # free the case's tensors before the next case
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


def timed_row(row, fn, logits, target, device, n, copy_gbps) -> dict:
    """``row`` with the median time, GB/s, peak extra memory and loss of ``fn(logits,
    target)`` (forward, or forward + backward for mode "fwdbwd"); or its error.
    ``logits`` is a leaf tensor or a list of them (deep supervision)."""
    leaves = logits if isinstance(logits, list) else [logits]

    def clear():
        for x in leaves:
            x.grad = None

    def call():
        clear()
        out = fn(logits, target)
        if row["mode"] == "fwdbwd":
            out.backward()

    try:
        times = time_call(call, device, n, warmup=2)
        med = statistics.median(times)
        row.update(median_ms=med * 1e3, min_ms=min(times) * 1e3, reps=n)
        row["gbps"] = row["bytes"] / med / 1e9
        row["copy_fraction"] = row["gbps"] / copy_gbps if copy_gbps else None
        clear()
        pk = peak_extra(call, device)
        row["peak_extra_bytes"] = pk
        if pk is not None and row["mode"] == "fwdbwd":
            row["beyond_grad_bytes"] = pk - sum(x.numel() * x.element_size() for x in leaves)
        row["loss"] = float(fn(logits, target).detach().float())
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        if device == "cuda":
            torch.cuda.empty_cache()
    clear()
    return row


def kernel_rows(case, logits, labels, device, dry, copy_gbps, reps) -> list[dict]:
    """The fused backends' two kernels alone: forward_stats, backward."""
    from fasttversky._dispatch import _load
    from fasttversky._spec import KernelSpec

    out = []
    x3 = logits.detach().flatten(2)
    y3 = labels.flatten(1)
    spec = KernelSpec(activation=0, soft_target=False, ignore_index=None, num_classes=case.classes)
    B, C = x3.shape[:2]
    coef_a = torch.full((B, C), -1e-7, device=device)
    coef_b = torch.full((B, C), 2e-7, device=device)
    for prov in ("triton", "cuda"):
        name = "torch" if (dry and prov == "cuda") else prov
        impl, err = _load(name)
        why = err or (impl.unavailable() if impl else "not loaded")
        for mode, call in (
            ("fwd-kernel", lambda impl=impl: impl.forward_stats(x3, y3, spec)),
            ("bwd-kernel", lambda impl=impl: impl.backward(x3, y3, coef_a, coef_b, spec)),
        ):
            row = {"case": case.id, "provider": prov, "mode": mode, "bytes": case.bytes_moved(mode)}
            if why:
                row["error"] = why[:300]
            else:
                try:
                    times = time_call(call, device, reps, warmup=2)
                    med = statistics.median(times)
                    row.update(
                        median_ms=med * 1e3,
                        min_ms=min(times) * 1e3,
                        reps=reps,
                        gbps=row["bytes"] / med / 1e9,
                    )
                    row["copy_fraction"] = row["gbps"] / copy_gbps if copy_gbps else None
                    row["peak_extra_bytes"] = peak_extra(call, device)
                except Exception as exc:
                    row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            out.append(row)
    return out


# --------------------------------------------------------------------------------------
# the compound matrix
# --------------------------------------------------------------------------------------
def compound_cases(dry: bool) -> list[tuple[str, Case]]:
    shapes = DRY_COMPOUND_SHAPES if dry else COMPOUND_SHAPES
    return [(loss, Case(*shape, d)) for shape in shapes for d in DTYPES for loss in COMPOUND_LOSSES]


def compound_inputs(loss: str, case: Case, device):
    """(logits, target): one scale, or DS_SCALES scales halving each spatial dim (nnU-Net's
    pooling), each with its target downsampled beforehand as nnU-Net's dataloader does."""
    from fasttversky.deep_supervision import downsample_labels

    logits, labels = case.make(device)
    if loss != "ds5":
        return logits, labels.unsqueeze(1)
    g = torch.Generator(device=device).manual_seed(1)
    xs, ts = [logits], [labels.unsqueeze(1)]
    for i in range(1, DS_SCALES):
        sp = [max(1, s >> i) for s in case.spatial]
        xs.append(
            torch.randn((case.batch, case.classes, *sp), generator=g, device=device)
            .to(case.dtype)
            .requires_grad_(True)
        )
        ts.append(downsample_labels(labels, sp).unsqueeze(1))
    return xs, ts


def compound_fn(loss: str, prov: str, dry: bool):
    """fn(logits, target) for a compound row, or raise with the reason it cannot run."""
    import _baselines

    import fasttversky

    if prov in ("triton", "cuda"):
        provider_fn(prov, dry)  # raises if the backend cannot run
        backend = "torch" if (dry and prov == "cuda") else prov
        if loss == "ds5":
            return _baselines.fused_deep_supervision(_ds_weights(), backend)
        if loss == "tverskyce":
            return lambda x, t: fasttversky.tversky_loss(
                x, t, ALPHA, BETA, include_background=False, ce_weight=1.0, backend=backend
            )
        return _baselines.fused_dice_ce(backend)
    compiled = prov.startswith("compile(")
    if "nnunet" in prov:
        if loss == "ds5":
            return _baselines.nnunet_deep_supervision(_ds_weights(), compiled)
        return _baselines.nnunet_dice_ce(compiled)
    return _baselines.monai_dice_ce(compiled)


def compound_applies(loss: str, prov: str) -> bool:
    """Neither nnU-Net nor MONAI has Tversky + CE; MONAI has no deep-supervision wrapper."""
    if prov in ("triton", "cuda"):
        return True
    return loss == "dicece" or (loss == "ds5" and "nnunet" in prov)


def _ds_weights() -> list[float]:
    from fasttversky.deep_supervision import default_weights

    return default_weights(DS_SCALES)


def compound_bytes(logits) -> int:
    """fwd+bwd: logits and labels read twice, the gradient written (uint8 labels)."""
    xs = logits if isinstance(logits, list) else [logits]
    total = 0
    for x in xs:
        L = x.numel() * x.element_size()
        total += 2 * (L + x.numel() // x.shape[1]) + L
    return total


def bench_compound(loss, case, device, dry, copy_gbps, reps, errors, providers) -> list[dict]:
    rows = []
    cid = f"{loss}-{case.id}"
    try:
        logits, target = compound_inputs(loss, case, device)
    except Exception as exc:  # e.g. OOM
        errors.append(f"{cid}: making inputs: {type(exc).__name__}: {exc}")
        return rows
    for prov in (p for p in providers if compound_applies(loss, p)):
        row = {"case": cid, "provider": prov, "mode": "fwdbwd", "bytes": compound_bytes(logits)}
        try:
            fn = compound_fn(loss, prov, dry)
        except Exception as exc:
            rows.append({**row, "error": f"{type(exc).__name__}: {exc}"[:300]})
            continue
        n = max(2, reps // 4) if prov not in ("triton", "cuda") else reps
        rows.append(timed_row(row, fn, logits, target, device, n, copy_gbps))
        gc.collect()
    logits = target = None
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


# --------------------------------------------------------------------------------------
# sections
# --------------------------------------------------------------------------------------
def environment(device) -> dict:
    env = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "host": platform.node(),
        "device": device,
    }
    import _baselines

    env["nnunetv2"] = _baselines.nnunet_version()
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception as exc:
        env["triton"] = f"unavailable ({exc})"
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        env.update(
            gpu=torch.cuda.get_device_name(0),
            sms=p.multi_processor_count,
            gpu_memory_gib=round(p.total_memory / 2**30, 1),
            capability=".".join(map(str, torch.cuda.get_device_capability(0))),
        )
        try:
            smi = subprocess.run(
                [
                    "nvidia-smi",
                    "--query-gpu=driver_version,clocks.max.sm,clocks.max.mem",
                    "--format=csv,noheader",
                ],
                capture_output=True,
                text=True,
                timeout=30,
            )
            env["nvidia_smi"] = smi.stdout.strip()
        except Exception as exc:
            env["nvidia_smi"] = f"unavailable ({exc})"
    else:
        env["cpu"] = platform.processor() or platform.machine()
    try:
        from fasttversky.ops.cuda import find_nvcc

        nvcc = find_nvcc()
        env["nvcc"] = (
            subprocess.run([nvcc, "--version"], capture_output=True, text=True)
            .stdout.strip()
            .splitlines()[-1]
            if nvcc
            else "not found"
        )
    except Exception as exc:
        env["nvcc"] = f"unknown ({exc})"
    try:
        import fasttversky

        env["backends"] = fasttversky.available_backends()
    except Exception as exc:
        env["backends"] = f"error: {exc}"
    return env


def run_tests(out: Path, dry: bool, timeout_s: float = 1500) -> dict:
    files = ["tests/test_gpu.py", "tests/test_triton.py"]
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        *files,
        "-q",
        "-rs",
        "-p",
        "no:cacheprovider",
        f"--junitxml={out / 'tests.xml'}",
    ]
    if dry:
        cmd += ["-k", "repeat or refuses or gpu"]
    env = dict(os.environ)
    if not dry:
        env.pop("TRITON_INTERPRET", None)  # compiled kernels, on the GPU
    t0 = time.time()
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=timeout_s
        )
    except subprocess.TimeoutExpired as exc:
        text = (
            (exc.stdout or b"").decode(errors="replace")
            if isinstance(exc.stdout, bytes)
            else (exc.stdout or "")
        )
        (out / "tests.log").write_text(text)
        return {
            "command": " ".join(cmd),
            "error": f"timed out after {timeout_s:.0f} s",
            "tail": text[-3000:],
        }
    tail = (proc.stdout + proc.stderr)[-6000:]
    (out / "tests.log").write_text(proc.stdout + proc.stderr)
    summary = next(
        (
            ln
            for ln in reversed(tail.splitlines())
            if " in " in ln
            and ("passed" in ln or "failed" in ln or "skipped" in ln or "error" in ln)
        ),
        "",
    )
    return {
        "command": " ".join(cmd),
        "returncode": proc.returncode,
        "summary": summary,
        "seconds": round(time.time() - t0, 1),
        "tail": tail[-3000:],
    }


def training_section() -> dict:
    try:
        import bench_training
    except Exception as exc:
        return {"skipped": f"bench/bench_training.py not importable ({exc})"}
    fn = getattr(bench_training, "gpu_training_report", None)
    if fn is None:
        return {"skipped": "bench_training has no gpu_training_report()"}
    return fn()


# --------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------
def _fmt(v, nd=3):
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def _mib(b):
    return "–" if b is None else f"{b / 2**20:.2f}"


def targets(rows) -> list[dict]:
    """Issue 3's targets per (case, fused provider), fwd+bwd."""
    by = {(r["case"], r["provider"], r["mode"]): r for r in rows if "median_ms" in r}
    out = []
    for (case, prov, mode), r in by.items():
        if mode != "fwdbwd" or prov not in ("triton", "cuda"):
            continue
        t = {"case": case, "provider": prov, "copy_fraction": r.get("copy_fraction")}
        for key, other in (
            ("vs_eager", "reference"),
            ("vs_compile", "compile(reference)"),
            ("vs_monai", "monai"),
        ):
            o = by.get((case, other, "fwdbwd"))
            t[key] = o["median_ms"] / r["median_ms"] if o else None
        bg = r.get("beyond_grad_bytes")
        t["extra_mib"] = None if bg is None else bg / 2**20
        t["met"] = {
            k: (
                t[k] is not None
                and (t[k] <= TARGETS[k] if k == "extra_mib" else t[k] >= TARGETS[k])
            )
            for k in TARGETS
        }
        out.append(t)
    return out


def markdown(rep: dict) -> str:
    env = rep["environment"]
    L = ["# fasttversky GPU report", ""]
    if rep.get("dry_run"):
        L += [
            "**DRY RUN** on the CPU at toy sizes: checks the script, not the GPU "
            "(triton runs in the interpreter; the torch backend stands in for cuda). "
            "No figure here is a GPU claim.",
            "",
        ]
    L += ["## Environment", ""]
    for k, v in env.items():
        L.append(f"- {k}: {v}")
    t = rep.get("tests", {})
    L += [
        "",
        "## Tests",
        "",
        f"`{t.get('command', '')}`",
        "",
        f"- result: **{t.get('summary') or t.get('error', '?')}** "
        f"(exit {t.get('returncode')}, {t.get('seconds')} s); full log in tests.log",
        "",
    ]
    cb = rep.get("copy_bandwidth", {})
    L += [
        "## Copy bandwidth (device to device, this run)",
        "",
        f"- {_fmt(cb.get('gbps'), 1)} GB/s ({_mib(cb.get('bytes'))} MiB moved per copy, "
        f"median {_fmt(cb.get('median_ms'))} ms)"
        if "gbps" in cb
        else f"- error: {cb.get('error')}",
        "",
    ]
    L += [
        "## Loss benchmarks",
        "",
        "bytes = what must move (fwd: logits + uint8 labels; fwd+bwd: twice that + "
        "the gradient). peak extra = `max_memory_allocated` growth during one call; "
        "for fwd+bwd it includes the gradient buffer, 'beyond grad' does not. "
        "`*-kernel` rows: the backend's forward_stats / backward alone.",
        "",
        "| case | mode | provider | median ms | GB/s | of copy BW | peak extra MiB "
        "| beyond grad MiB | loss / error |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rep.get("rows", []):
        tail = _fmt(r.get("loss"), 6) if "error" not in r else f"error: {r['error'][:120]}"
        frac = r.get("copy_fraction")
        L.append(
            f"| {r['case']} | {r['mode']} | {r['provider']} | {_fmt(r.get('median_ms'))} | "
            f"{_fmt(r.get('gbps'), 1)} | {'–' if frac is None else f'{100 * frac:.0f} %'} | "
            f"{_mib(r.get('peak_extra_bytes'))} | {_mib(r.get('beyond_grad_bytes'))} | "
            f"{tail} |"
        )
    tg = rep.get("targets", [])
    if tg:
        L += [
            "",
            "## Targets (issue 3, fwd+bwd)",
            "",
            f"copy fraction >= {TARGETS['copy_fraction']:.0%}, >= {TARGETS['vs_eager']:g}x "
            f"eager reference and MONAI, >= {TARGETS['vs_compile']:g}x "
            f"torch.compile(reference), < {TARGETS['extra_mib']:g} MiB beyond inputs + "
            "gradient.",
            "",
            "| case | provider | of copy BW | x eager | x compile | x MONAI | MiB beyond grad |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]

        def cell(t, k, f):
            v = t[k]
            return "–" if v is None else f"{f(v)} {'✅' if t['met'][k] else '❌'}"

        for t in tg:
            L.append(
                f"| {t['case']} | {t['provider']} | "
                f"{cell(t, 'copy_fraction', lambda v: f'{100 * v:.0f} %')} | "
                f"{cell(t, 'vs_eager', lambda v: f'{v:.1f}')} | "
                f"{cell(t, 'vs_compile', lambda v: f'{v:.2f}')} | "
                f"{cell(t, 'vs_monai', lambda v: f'{v:.1f}')} | "
                f"{cell(t, 'extra_mib', lambda v: f'{v:.3f}')} |"
            )
    L += compound_markdown(rep.get("compound"))
    tr = rep.get("training")
    L += [
        "",
        "## U-Net training step",
        "",
        "```json",
        json.dumps(tr, indent=2, default=str)[:6000],
        "```",
    ]
    if rep.get("errors"):
        L += ["", "## Errors", ""] + [f"- {e}" for e in rep["errors"]]
    return "\n".join(L) + "\n"


def compound_markdown(rows) -> list[str]:
    """The compound rows, and per case each baseline's time and peak over the fastest
    fused provider's (x > 1: ours is faster / lighter)."""
    if not isinstance(rows, list) or not rows:
        return []
    L = [
        "",
        "## Compound losses, deep supervision, many classes (fwd+bwd)",
        "",
        "dicece: soft Dice without background + CE (nnU-Net's default); tverskyce: Tversky "
        f"({ALPHA}, {BETA}) + CE; ds5: dicece over {DS_SCALES} deep-supervision scales "
        "(nnU-Net: targets downsampled beforehand by its dataloader; ours: from the "
        "full-resolution label map). compile(x): torch.compile as bench/_baselines.py "
        "applies it; nnU-Net's value is ours - 1 (its Dice term is -Dice, ours 1 - Dice). "
        "x time / x peak: the row's median time and peak extra memory over "
        "the fastest fused row of the same case.",
        "",
        "| case | provider | median ms | GB/s | of copy BW | peak extra MiB | beyond grad MiB "
        "| x time | x peak | loss / error |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    fused = {}
    for r in rows:
        if r["provider"] in ("triton", "cuda") and "median_ms" in r:
            best = fused.get(r["case"])
            if best is None or r["median_ms"] < best["median_ms"]:
                fused[r["case"]] = r
    for r in rows:
        f = fused.get(r["case"])
        xt = xp = None
        if f is not None and "median_ms" in r:
            xt = r["median_ms"] / f["median_ms"]
            if r.get("peak_extra_bytes") and f.get("peak_extra_bytes"):
                xp = r["peak_extra_bytes"] / f["peak_extra_bytes"]
        tail = _fmt(r.get("loss"), 6) if "error" not in r else f"error: {r['error'][:120]}"
        frac = r.get("copy_fraction")
        L.append(
            f"| {r['case']} | {r['provider']} | {_fmt(r.get('median_ms'))} | "
            f"{_fmt(r.get('gbps'), 1)} | {'–' if frac is None else f'{100 * frac:.0f} %'} | "
            f"{_mib(r.get('peak_extra_bytes'))} | {_mib(r.get('beyond_grad_bytes'))} | "
            f"{_fmt(xt, 2)} | {_fmt(xp, 2)} | {tail} |"
        )
    return L


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for gpu_report.md/.json and logs")
    ap.add_argument("--dry-run", action="store_true", help="CPU plumbing check, toy sizes")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--skip-training", action="store_true")
    ap.add_argument("--reps", type=int, default=20, help="timed calls per fast row")
    ap.add_argument("--providers", default=",".join(PROVIDERS), help="comma-separated subset")
    ap.add_argument("--cases", default=None, help="comma-separated case ids (e.g. paper-b2-bf16)")
    ap.add_argument("--skip-bench", action="store_true", help="tests (and training) only")
    ap.add_argument("--skip-compound", action="store_true", help="no compound/DS/many-class rows")
    ap.add_argument(
        "--compound-providers",
        default=",".join(COMPOUND_PROVIDERS),
        help="comma-separated subset for the compound rows",
    )
    ap.add_argument("--tests-timeout", type=float, default=1500, help="seconds for pytest")
    args = ap.parse_args(argv)
    providers = tuple(p for p in args.providers.split(",") if p)
    unknown = set(providers) - set(PROVIDERS)
    if unknown:
        ap.error(f"unknown providers {sorted(unknown)}; known: {PROVIDERS}")
    compound_providers = tuple(p for p in args.compound_providers.split(",") if p)
    unknown = set(compound_providers) - set(COMPOUND_PROVIDERS)
    if unknown:
        ap.error(f"unknown compound providers {sorted(unknown)}; known: {COMPOUND_PROVIDERS}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dry = args.dry_run
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not dry:
        print("no CUDA device: use --dry-run to check the script on the CPU", file=sys.stderr)
        return 2
    reps = 3 if dry else args.reps
    rep: dict = {"dry_run": dry, "errors": []}

    def section(name, fn):
        t0 = time.time()
        print(f"[gpu_report] {name} ...", flush=True)
        try:
            rep[name] = fn()
        except Exception as exc:
            rep[name] = {"error": f"{type(exc).__name__}: {exc}"}
            rep["errors"].append(
                f"{name}: {type(exc).__name__}: {exc}\n" + traceback.format_exc()[-1500:]
            )
        print(f"[gpu_report] {name} done in {time.time() - t0:.1f} s", flush=True)
        _write(out, rep)  # a partial report survives a later crash

    section("environment", lambda: environment(device))
    if args.skip_tests:
        rep["tests"] = {"skipped": "--skip-tests"}
    else:
        section("tests", lambda: run_tests(out, dry, args.tests_timeout))
    section(
        "copy_bandwidth",
        lambda: copy_bandwidth(device, nbytes=(16 if dry else 512) * 2**20, reps=5 if dry else 20),
    )
    copy_gbps = rep["copy_bandwidth"].get("gbps")

    wanted = set(args.cases.split(",")) if args.cases else None

    def matrix():
        rows = []
        for case in cases(dry):
            if wanted is not None and case.id not in wanted:
                continue
            print(f"[gpu_report]   {case.id}", flush=True)
            rows += bench_case(case, device, dry, copy_gbps, reps, rep["errors"], providers)
            rep["rows"] = rows
            _write(out, rep)
        return rows

    def compound():
        rows = []
        for loss, case in compound_cases(dry):
            if wanted is not None and f"{loss}-{case.id}" not in wanted:
                continue
            print(f"[gpu_report]   {loss}-{case.id}", flush=True)
            rows += bench_compound(
                loss, case, device, dry, copy_gbps, reps, rep["errors"], compound_providers
            )
            rep["compound"] = rows
            _write(out, rep)
        return rows

    if args.skip_bench:
        rep["rows"] = []
    else:
        section("rows", matrix)
    if args.skip_bench or args.skip_compound:
        rep["compound"] = []
    else:
        section("compound", compound)
    if isinstance(rep.get("rows"), list):
        rep["targets"] = targets(rep["rows"])
    if args.skip_training:
        rep["training"] = {"skipped": "--skip-training"}
    else:
        section("training", training_section)
    _write(out, rep)
    print(f"[gpu_report] wrote {out / 'gpu_report.md'} and {out / 'gpu_report.json'}")
    return 0


def _write(out: Path, rep: dict):
    (out / "gpu_report.json").write_text(json.dumps(rep, indent=2, default=str))
    (out / "gpu_report.md").write_text(markdown(rep))


if __name__ == "__main__":
    sys.exit(main())
