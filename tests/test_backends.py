"""The one backend shape (ops/_base.py): declared limits, one error enum, struct checks."""

from __future__ import annotations

import ctypes
import importlib
import re

import pytest
import torch

from fasttversky._dispatch import _MODULES, BACKENDS
from fasttversky._spec import KernelSpec
from fasttversky.ops import _base, _native
from fasttversky.ops._sources import csrc_dir

HEADER = (csrc_dir() / "tversky.h").read_text()


def test_error_enum_matches_the_header():
    body = re.search(r"enum TverskyError \{(.*?)\};", HEADER, re.S).group(1)
    codes = {int(v) for v in re.findall(r"TV_ERR_\w+ = (-?\d+)", body)}
    assert codes == set(_base.KERNEL_ERRORS)


def test_batch_limit_matches_the_header():
    limit = int(re.search(r"#define TV_MAX_BATCH (\d+)", HEADER).group(1))
    assert limit == _base.MAX_GRID_BATCH


def test_no_kernel_source_repeats_the_batch_limit():
    # One number in one place per language: tversky.h for C, _base.py for Python.
    for path in [*csrc_dir().rglob("*.cu"), *csrc_dir().rglob("*.cpp")]:
        assert "65535" not in path.read_text(), path


@pytest.mark.parametrize("name", BACKENDS)
def test_every_backend_has_the_one_shape(name):
    backend = importlib.import_module(_MODULES[name]).BACKEND
    assert isinstance(backend, _base.Backend) and backend.name == name


@pytest.mark.parametrize("name", ["cpu", "cuda", "triton"])
def test_class_limit_is_a_reason(name):
    backend = importlib.import_module(_MODULES[name]).BACKEND
    C = backend.max_classes + 1
    x, t = torch.zeros(1, C, 4), torch.zeros(1, 4, dtype=torch.long)
    why = backend.reasons(x, t, KernelSpec(0, False, None, C))
    assert any(f"C={C} classes > {backend.max_classes}" in w for w in why), why


def test_kernel_codes_decode_the_same_way():
    with pytest.raises(RuntimeError, match="CPU forward kernel failed: unsupported logits dtype"):
        _base.check_kernel_code(-1, "CPU", "forward")
    with pytest.raises(RuntimeError, match="CUDA backward .*: out of memory \\(runtime error 2\\)"):
        _base.check_kernel_code(2, "CUDA", "backward", lambda c: "out of memory")
    _base.check_kernel_code(0, "CPU", "forward")


def _cpu_library():
    from fasttversky.ops import cpu

    try:
        return cpu._library()
    except RuntimeError as exc:
        pytest.skip(f"C++ kernels unavailable: {exc}")


def test_cpu_kernel_returns_the_enum():
    lib = _cpu_library()
    x, t = torch.zeros(1, 2, 8), torch.zeros(1, 8, dtype=torch.uint8)
    p = _native.make_params(x, t, KernelSpec(0, False, None, 2))
    p.logits_dtype = 99
    assert lib.tversky_cpu_forward(ctypes.byref(p)) == -1
    p = _native.make_params(x, t, KernelSpec(0, False, None, 2))
    p.target_dtype = 99
    assert lib.tversky_cpu_forward(ctypes.byref(p)) == -4
    p = _native.make_params(x, t, KernelSpec(0, False, None, 2))
    p.C = 1000
    assert lib.tversky_cpu_backward(ctypes.byref(p)) == -2


def test_cpu_struct_size_is_checked(monkeypatch):
    """A TverskyParams mirror that drifted from the header fails at load, on CPU too."""
    _cpu_library()
    from fasttversky.ops import cpu

    class Drifted(ctypes.Structure):
        _fields_ = [*_native.TverskyParams._fields_, ("extra", ctypes.c_int64)]

    lib_path = cpu._library()._name  # the library the cpu backend loaded
    assert _native.load_library(lib_path, "tversky_cpu", "CPU")
    monkeypatch.setattr(_native, "TverskyParams", Drifted)
    with pytest.raises(RuntimeError, match="CPU kernels were compiled with a .*-byte"):
        _native.load_library(lib_path, "tversky_cpu", "CPU")
