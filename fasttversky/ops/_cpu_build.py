"""How the C++ CPU kernels are compiled: one recipe for the install-time build
(setup.py) and for the first-use fallback build (ops/cpu.py).

Standard library only: setup.py loads this file by its path, in pip's isolated build
environment, where neither torch nor the package can be imported.

An installed package carries one shared library per instruction-set *variant*
(``_tversky_cpu_<variant>.so`` beside this file), each compiled from the same sources
with different target flags; the loader picks the best one the CPU supports. They are
separate libraries, not one library with a dispatcher, because the kernels instantiate
C++ standard-library templates (std::vector, std::thread): linked into one library,
the linker would keep a single copy of each, possibly the AVX-512 one, and call it
from the baseline variant on a CPU without AVX-512. ``-Wl,-Bsymbolic`` binds each
library's references to its own copies for the same reason, since the loader briefly
holds two of them (the baseline one answers the CPU-feature questions: it runs on any
x86-64 CPU, so calling it is always safe).

Each library embeds the hash of the sources and flags it was built from
(``tversky_cpu_build_key()``), so an editable install whose kernel sources were edited
afterwards is detected and rebuilt instead of silently running the old code.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import NamedTuple

# -fno-trapping-math lets gcc if-convert and vectorise the tile loops (4x here); no
# -ffast-math: the non-finite check must see NaN and inf.
COMMON_FLAGS = (
    "-O3",
    "-fno-math-errno",
    "-fno-trapping-math",
    "-std=c++20",
    "-shared",
    "-fPIC",
    "-pthread",
    "-Wl,-Bsymbolic",
)


class Variant(NamedTuple):
    """One build of the kernels: its name, compiler flags, and the CPU features
    (``__builtin_cpu_supports`` names) a CPU needs to run it."""

    name: str
    flags: tuple[str, ...]
    needs: tuple[str, ...] = ()


# x86-64, best first: the psABI's micro-architecture levels, which both the compiler
# (-march) and the runtime check (__builtin_cpu_supports) know as a whole. v4 is AVX-512
# F/BW/CD/DQ/VL; v3 is AVX2, FMA, F16C, BMI1/2, LZCNT, MOVBE; both also give the scalar
# code POPCNT and the rest of v2. Tuning stays generic: the machine is unknown.
_X86 = (
    Variant("avx512", ("-march=x86-64-v4",), ("x86-64-v4",)),
    Variant("avx2", ("-march=x86-64-v3",), ("x86-64-v3",)),
    Variant("baseline", ()),
)
_GENERIC = (Variant("baseline", ()),)

BASELINE = "baseline"


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


# Built on the machine that runs it (the first-use fallback): no feature check needed.
# gcc's tuning for recent Intel cores (Sapphire Rapids, Ice Lake) prefers 256-bit vectors
# even with AVX-512; the tile loops are faster with 512-bit ones (bench/results/
# many_classes_cpu.md), which is what the installed avx512 variant (generic tuning) uses.
# On x86 CPUs without AVX-512 the flag changes nothing.
NATIVE = Variant("native", ("-march=native", *(("-mprefer-vector-width=512",) if is_x86() else ())))


def variants() -> tuple[Variant, ...]:
    """The variants an install builds on this architecture, best first; the last is
    the baseline, which runs on every CPU of the architecture."""
    return _X86 if is_x86() else _GENERIC


def library_name(variant: str) -> str:
    return f"_tversky_cpu_{variant}.so"


def source_files(csrc: Path) -> list[Path]:
    """Everything a build depends on, in a fixed order (the .cpp files are compiled)."""
    return [csrc / "tversky.h", *sorted((csrc / "cpu").glob("*.cpp"))]


def build_key(csrc: Path) -> str:
    """Hash of the kernel sources and of this recipe's common flags."""
    h = hashlib.sha256()
    for src in source_files(csrc):
        h.update(src.name.encode() + b"\0" + src.read_bytes() + b"\0")
    h.update(" ".join(COMMON_FLAGS).encode())
    return h.hexdigest()[:16]


def find_compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def command(cxx: str, csrc: Path, variant: Variant, out: str | os.PathLike) -> list[str]:
    cpp = [str(p) for p in source_files(csrc) if p.suffix == ".cpp"]
    return [
        cxx,
        *COMMON_FLAGS,
        *variant.flags,
        f'-DTV_BUILD_KEY="{build_key(csrc)}"',
        f'-DTV_CPU_VARIANT="{variant.name}"',
        *cpp,
        "-o",
        str(out),
    ]


def build(csrc: Path, variant: Variant, out: str | os.PathLike, cxx: str | None = None) -> None:
    """Compile one variant into the shared library ``out``; raise RuntimeError with the
    compiler's message on failure."""
    cxx = cxx or find_compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (install g++ or set CXX)")
    cmd = command(cxx, csrc, variant, out)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as exc:  # CXX names a missing or unrunnable program
        raise RuntimeError(f"cannot run the C++ compiler {cxx!r}: {exc}") from exc
    if proc.returncode != 0:
        raise RuntimeError(
            f"compiling the {variant.name} CPU kernels failed ({' '.join(cmd)}):\n"
            + proc.stderr[-2000:]
        )
