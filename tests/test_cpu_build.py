"""How the CPU kernels get onto a machine: the install-time variants, the choice among
them, and the first-use build from source (fasttversky/ops/cpu.py, _cpu_build.py).

An installed checkout (``pip install -e .``, as in CI) has
``fasttversky/ops/_tversky_cpu_{avx512,avx2,baseline}.so``: every variant this CPU can
run is checked against the float64 reference. The from-source fallback (a checkout
without them, or edited sources) is exercised for real in a subprocess with a fresh
kernel cache (one compile, shared by the tests below through the cache).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from _helpers import check_against_reference

import fasttversky
from fasttversky.ops import _cpu_build as recipe
from fasttversky.ops import _native, cpu

ROOT = Path(__file__).resolve().parents[1]
MESSAGE = "fasttversky: compiling the CPU kernels"


def _installed_variants() -> list[str]:
    return [v.name for v in recipe.variants() if cpu._installed(v.name) is not None]


def _supported(name: str) -> bool:
    probe = cpu._open(cpu._installed(recipe.BASELINE))
    return cpu._supports(probe, next(v for v in recipe.variants() if v.name == name))


def _use(monkeypatch, isa: str):
    """Load the CPU backend afresh with FASTTVERSKY_CPU_ISA=isa (restored afterwards)."""
    monkeypatch.setenv("FASTTVERSKY_CPU_ISA", isa)
    monkeypatch.setattr(cpu, "_LIB", _native.LazyLibrary(cpu._build))


def _inputs(C=2, dtype=torch.float32, seed=0, spatial=(5, 13, 17)):
    g = torch.Generator().manual_seed(seed)
    x = (2 * torch.randn(2, C, *spatial, generator=g)).to(dtype)
    t = torch.randint(0, C, (2, *spatial), generator=g).to(torch.uint8)
    return x, t


def test_installed_in_ci():
    """CI installs the package, so every variant must have been built there."""
    if os.environ.get("FASTTVERSKY_CI") != "1":
        pytest.skip("only CI is sure to have run `pip install -e .` on this checkout")
    assert _installed_variants() == [v.name for v in recipe.variants()]


@pytest.mark.parametrize("isa", [v.name for v in recipe.variants()])
def test_each_installed_variant_matches_reference(isa, monkeypatch):
    if cpu._installed(isa) is None:
        pytest.skip(f"{isa} library not installed (run `pip install -e .`)")
    if not _supported(isa):
        pytest.skip(f"this CPU cannot run the {isa} variant")
    _use(monkeypatch, isa)
    assert cpu.variant_name(cpu._library()) == isa
    # two-class fused paths (planar, tail) and the general softmax path, two dtypes
    for C, dtype in [(2, torch.float32), (3, torch.float32), (2, torch.bfloat16)]:
        x, t = _inputs(C, dtype, seed=C)
        check_against_reference(x, t, "cpu", alpha=0.3, beta=0.7)
    x, t = _inputs(4, seed=9)
    check_against_reference(x, t.clamp_max(1), "cpu", activation="sigmoid")


def test_vector_widths_agree_bitwise(monkeypatch):
    """avx512 and avx2 builds run the same arithmetic lane by lane (fixed tiles, fixed
    summation order), so they give bitwise-identical results."""
    names = [n for n in ("avx512", "avx2") if n in _installed_variants() and _supported(n)]
    if len(names) < 2:
        pytest.skip("needs both the avx512 and avx2 variants on an AVX-512 CPU")
    x, t = _inputs(2, seed=3, spatial=(9, 40, 41))
    outs = []
    for isa in names:
        _use(monkeypatch, isa)
        xk = x.clone().requires_grad_()
        loss = fasttversky.tversky_loss(xk, t, backend="cpu")
        loss.backward()
        outs.append((loss.detach(), xk.grad))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@pytest.fixture(scope="module")
def source_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("kernel-cache")


_CHILD = textwrap.dedent(
    """
    import torch, fasttversky
    from fasttversky.ops import cpu
    from _helpers import check_against_reference
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 2, 4, 9, 10, generator=g)
    t = torch.randint(0, 2, (2, 4, 9, 10), generator=g)
    check_against_reference(x, t, "cpu", alpha=0.3, beta=0.7)
    print("variant", cpu.variant_name(cpu._library()))
    """
)


def test_source_build_on_first_use_says_so(source_cache):
    """FASTTVERSKY_CPU_ISA=native ignores the installed libraries: the kernels compile
    into a fresh cache with one line on stderr, and the second process reuses them."""
    env = {**os.environ, "FASTTVERSKY_CPU_ISA": "native", "FASTTVERSKY_CACHE": str(source_cache)}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    runs = []
    for _ in range(2):
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "variant native" in proc.stdout
        runs.append(proc.stderr)
    first = [ln for ln in runs[0].splitlines() if MESSAGE in ln]
    assert len(first) == 1 and "FASTTVERSKY_CPU_ISA=native" in first[0], runs[0]
    assert MESSAGE not in runs[1]


def test_checkout_without_installed_library_builds_from_source(source_cache, monkeypatch, tmp_path):
    """A source checkout that was never pip-installed: the native build (a cache hit
    after the test above, else one compile) runs and matches the reference."""
    monkeypatch.setenv("FASTTVERSKY_CACHE", str(source_cache))
    monkeypatch.setattr(cpu, "_HERE", tmp_path)  # no _tversky_cpu_*.so there
    _use(monkeypatch, "auto")
    assert cpu.variant_name(cpu._library()) == "native"
    x, t = _inputs(3, seed=11)
    check_against_reference(x, t, "cpu")


def test_edited_sources_are_rebuilt_not_ignored(monkeypatch):
    """An editable install whose kernel sources changed after install must not keep
    running the old library."""
    if cpu._installed(recipe.BASELINE) is None:
        pytest.skip("no installed library (run `pip install -e .`)")
    reasons = []
    monkeypatch.setattr(cpu, "_build_native", lambda why: reasons.append(why) or "rebuilt")
    monkeypatch.setattr(recipe, "build_key", lambda csrc: "0" * 16)
    monkeypatch.delenv("FASTTVERSKY_CPU_ISA", raising=False)
    assert cpu._build() == "rebuilt"
    assert reasons == ["the kernel sources changed since the package was installed"]


def test_no_compiler_and_no_library_is_one_clear_reason(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu, "_HERE", tmp_path)
    monkeypatch.setattr(recipe, "find_compiler", lambda: None)
    _use(monkeypatch, "auto")
    why = cpu.BACKEND.unavailable()
    assert why and "\n" not in why
    assert "no installed library" in why and "no C++ compiler" in why


@pytest.mark.parametrize("value, match", [("sse9", "not one of"), ("AVX9000", "not one of")])
def test_bad_isa_variable_is_named(value, match, monkeypatch):
    _use(monkeypatch, value)
    why = cpu.BACKEND.unavailable()
    assert "FASTTVERSKY_CPU_ISA" in why and match in why


def test_missing_compiler_program_is_a_build_error_not_a_crash(tmp_path):
    """setup.py turns RuntimeError into an optional-extension warning; a CXX naming a
    missing program must land there too, or `pip install` would fail without g++."""
    with pytest.raises(RuntimeError, match="cannot run the C.. compiler"):
        recipe.build(
            cpu.csrc_dir(), recipe.variants()[-1], tmp_path / "x.so", cxx=str(tmp_path / "nope")
        )
