"""Loader for the CUDA kernels (csrc/cuda/tversky_cuda.cu): build, cache, call.

The kernels include no torch headers, only csrc/tversky.h's plain parameter struct; this
is the only file that knows about both torch and the kernels. On first use the .cu is
compiled by nvcc for the current GPU's architecture into a cache folder keyed by the
sources' hash, the nvcc and torch CUDA versions, the flags and the architecture
(``FASTTVERSKY_CACHE``, default ``~/.cache/fasttversky``), loaded with ctypes, and
called on torch's current stream. A machine without a GPU, a CUDA build of torch or
nvcc gets one reason from ``unavailable()``; importing this module never fails.

``FASTTVERSKY_CUDA_EMULATE=1`` builds the same .cu with the host C++ compiler and
csrc/cuda/host_emulation.h instead (each block's threads as std::threads) and runs the
backend on CPU tensors: slow, but it executes the real kernel code, which is how CI
checks it against the reference without a GPU.
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import subprocess
from pathlib import Path

import torch

from .._spec import KernelSpec
from ._base import (
    MAX_GRID_BATCH,
    Backend,
    check_kernel_code,
    device_guard,
    kernel_coefs,
    new_grad,
)
from ._native import (
    DTYPE_CODES,
    LazyLibrary,
    TverskyParams,
    build_cached,
    load_library,
    make_params,
)
from ._sources import csrc_dir

MAX_CLASSES = 8  # the kernels keep a voxel's classes in registers (MAXC = 4 or 8)
# Everything of KernelSpec.features() the kernels implement (tests/test_cuda_terms.py).
FEATURES = frozenset({"ce", "float_labels", "regions", "soft_ce", "label_smoothing", "focal"})

_LOGITS_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _csrc() -> Path:
    return csrc_dir()


def emulating() -> bool:
    return os.environ.get("FASTTVERSKY_CUDA_EMULATE", "0") == "1"


def find_nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.exists() else None


def _cuda_include() -> Path:
    """The CUDA toolkit's include folder (the emulation build needs cuda_fp16.h)."""
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = find_nvcc()
    if nvcc is not None:
        roots.append(str(Path(nvcc).resolve().parents[1]))
    for root in roots:
        if root and (Path(root) / "include" / "cuda_fp16.h").exists():
            return Path(root) / "include"
    raise RuntimeError("the CUDA headers (cuda_fp16.h) were not found; set CUDA_HOME")


def nvcc_command(arch: str, src: Path, out: Path, *, shared: bool = True) -> list[str]:
    """The nvcc call that builds the kernels for one architecture, e.g. arch='90'."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found (put it on PATH or set CUDA_HOME)")
    cmd = [
        nvcc,
        "-O3",
        "-std=c++17",
        f"-I{src.parent.parent}",
        "-Xcompiler",
        "-fPIC",
        f"-gencode=arch=compute_{arch},code=sm_{arch}",
    ]
    cmd += ["--shared"] if shared else ["-c"]
    return [*cmd, str(src), "-o", str(out)]


def _build_command(src: Path, out: Path) -> tuple[list[str], str]:
    """(command, cache-key text) for this machine: nvcc for the current GPU, or g++ emulation."""
    if emulating():
        cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
        if cxx is None:
            raise RuntimeError("no C++ compiler for the CUDA emulation build")
        cmd = [
            cxx,
            "-std=c++20",
            "-O2",
            "-shared",
            "-fPIC",
            "-pthread",
            "-DTV_HOST_EMULATION",
            "-x",
            "c++",
            f"-I{_cuda_include()}",
            f"-I{src.parent.parent}",
            str(src),
            "-o",
            str(out),
        ]
        return cmd, " ".join(cmd[:-3])
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device (torch.cuda.is_available() is False)")
    if torch.version.cuda is None:
        raise RuntimeError("torch is a CPU-only build")
    major, minor = torch.cuda.get_device_capability()
    cmd = nvcc_command(f"{major}{minor}", src, out)
    return cmd, " ".join(cmd[:-3]) + _nvcc_version(cmd[0]) + f"torch-cuda-{torch.version.cuda}"


@functools.cache
def _nvcc_version(nvcc: str) -> str:
    """``nvcc --version``, part of the build's cache key; asked once per process."""
    return subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout


def _build() -> ctypes.CDLL:
    csrc = _csrc()
    src = csrc / "cuda" / "tversky_cuda.cu"
    key = b"".join(
        f.read_bytes() for f in (csrc / "tversky.h", src, csrc / "cuda" / "host_emulation.h")
    )
    probe_cmd, flags_key = _build_command(src, Path("OUT"))
    lib = build_cached(
        "cuda-emu" if emulating() else "cuda",
        key + flags_key.encode(),
        "libtversky_cuda.so",
        lambda out: _build_command(src, Path(out))[0],
        "CUDA",
    )
    dll = load_library(lib, "tversky_cuda", "CUDA")
    P = ctypes.POINTER(TverskyParams)
    dll.tversky_cuda_forward_workspace.argtypes = [P, ctypes.c_int]
    dll.tversky_cuda_forward_workspace.restype = ctypes.c_int64
    dll.tversky_cuda_forward.argtypes = [
        P,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_void_p,
    ]
    dll.tversky_cuda_forward.restype = ctypes.c_int
    dll.tversky_cuda_backward.argtypes = [P, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    dll.tversky_cuda_backward.restype = ctypes.c_int
    dll.tversky_cuda_check.argtypes = [ctypes.c_int]
    dll.tversky_cuda_check.restype = ctypes.c_int
    dll.tversky_cuda_error_string.argtypes = [ctypes.c_int]
    dll.tversky_cuda_error_string.restype = ctypes.c_char_p
    if not emulating():
        # Fails here, with the runtime's words, when e.g. nvcc's CUDA is newer than the
        # driver: better one reason from unavailable() than an error at the first loss.
        code = dll.tversky_cuda_check(torch.cuda.current_device())
        if code != 0:
            raise RuntimeError(
                f"the kernels built by {probe_cmd[0]} cannot run here: "
                f"{dll.tversky_cuda_error_string(code).decode()} (cudaError {code})"
            )
    return dll


_LIB = LazyLibrary(_build)


def _library():
    """The loaded kernels, or raise the (remembered) reason they cannot be built."""
    return _LIB.get()


def _launch_env(t: torch.Tensor):
    """(device index, SM count, stream handle) for launches on t's device."""
    if emulating():
        return 0, 1, None
    idx = t.device.index if t.device.index is not None else torch.cuda.current_device()
    return idx, _sm_count(idx), torch.cuda.current_stream(t.device).cuda_stream


@functools.cache
def _sm_count(idx: int) -> int:
    return torch.cuda.get_device_properties(idx).multi_processor_count


def _check(code: int, what: str):
    check_kernel_code(
        code, "CUDA", what, lambda c: _library().tversky_cuda_error_string(c).decode()
    )


@functools.lru_cache(maxsize=32)
def _region_table(masks: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """spec.region_masks as the kernels read it: an int64 tensor on ``device``, uploaded
    once per (table, device) rather than at every step (it is never written)."""
    return torch.tensor(masks, dtype=torch.int64, device=device)


def _params(logits, target, spec: KernelSpec) -> TverskyParams:
    """make_params plus the region table's device pointer (spec.region_masks)."""
    p = make_params(logits, target, spec)
    if spec.region_masks is not None:
        p.region_masks_ptr = _region_table(spec.region_masks, logits.device).data_ptr()
    return p


class _CudaBackend(Backend):
    name = "cuda"
    max_classes = MAX_CLASSES
    class_limit_why = "kept in registers by the CUDA kernels"
    max_batch = MAX_GRID_BATCH
    features = FEATURES

    def unavailable(self):
        if not emulating():
            # Cheap checks first, so that a CPU-only machine never runs a compiler.
            if not torch.cuda.is_available():
                return "no CUDA device (torch.cuda.is_available() is False)"
            if torch.version.cuda is None:
                return "torch is a CPU-only build"
            if find_nvcc() is None:
                return (
                    "nvcc not found: the CUDA kernels are compiled on first use (put nvcc "
                    "on PATH or set CUDA_HOME)"
                )
        try:
            _library()
        except RuntimeError as exc:
            return f"CUDA kernels unavailable: {exc}"
        return None

    def input_reasons(self, logits, target, spec: KernelSpec):
        why = []
        want = "cpu" if emulating() else "cuda"
        if logits.device.type != want:
            need = "CPU tensors under FASTTVERSKY_CUDA_EMULATE=1" if emulating() else "CUDA tensors"
            why.append(f"logits are on {logits.device}, the cuda backend needs {need}")
        if logits.dtype not in _LOGITS_DTYPES:
            why.append(
                f"{logits.dtype} logits: the CUDA kernels compute in fp32 "
                "(float64 runs on the triton backend, in fp64)"
            )
        if target.dtype not in DTYPE_CODES:
            why.append(f"target dtype {target.dtype} not supported by the kernels")
        return why

    def forward_stats(self, logits, target, spec: KernelSpec):
        lib = _library()
        B, C, _ = logits.shape
        dev = logits.device
        stats = torch.empty((B, C, 3 + spec.ce_columns), dtype=torch.float64, device=dev)
        flags = torch.empty(2, dtype=torch.int64, device=dev)
        p = _params(logits, target, spec)
        p.stats_ptr = stats.data_ptr()
        p.flags_ptr = flags.data_ptr()
        with device_guard(logits):
            idx, sms, stream = _launch_env(logits)
            nbytes = lib.tversky_cuda_forward_workspace(ctypes.byref(p), sms)
            if nbytes < 0:
                _check(int(nbytes), "forward")
            # Per-block partials: a few KiB, from torch's caching allocator (stream-ordered).
            work = torch.empty(max(int(nbytes), 16), dtype=torch.uint8, device=dev)
            code = lib.tversky_cuda_forward(
                ctypes.byref(p), work.data_ptr(), work.numel(), idx, sms, stream
            )
            _check(code, "forward")
        return stats, flags

    def backward(
        self, logits, target, coef_a, coef_b, spec: KernelSpec, coef_ce=None, coef_ce2=None
    ):
        grad = new_grad(logits)
        p = _params(logits, target, spec)
        p.grad_ptr = grad.data_ptr()
        p.grad_stride_b, p.grad_stride_c, p.grad_stride_n = grad.stride()
        # float32: no float64 logits here
        coefs = kernel_coefs(logits, coef_a, coef_b, coef_ce, coef_ce2)
        p.coef_a_ptr, p.coef_b_ptr = coefs[0].data_ptr(), coefs[1].data_ptr()
        if coefs[2] is not None:
            p.coef_ce_ptr = coefs[2].data_ptr()
        if coefs[3] is not None:
            p.coef_ce2_ptr = coefs[3].data_ptr()
        with device_guard(logits):
            idx, sms, stream = _launch_env(logits)
            code = _library().tversky_cuda_backward(ctypes.byref(p), idx, sms, stream)
            _check(code, "backward")
        return grad


BACKEND = _CudaBackend()
