"""Compiles the C++ CPU kernels when the package is installed (pyproject.toml holds
everything else).

``pip install -e .`` and a wheel build both run build_ext, which compiles
csrc/cpu/*.cpp once per instruction-set variant (AVX-512, AVX2+FMA, baseline; see
fasttversky/ops/_cpu_build.py) into ``fasttversky/ops/_tversky_cpu_<variant>.so``,
concurrently. The libraries are plain shared objects loaded with ctypes, not Python
extension modules: they include no Python or torch headers. The loader picks the best
variant for the running CPU.

A failed build (no compiler, say) does not fail the install: the extensions are
optional, and at run time the package compiles the kernels on first use instead (with
a message), or falls back to the torch backend if that fails too.
"""

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CompileError

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"


def _load_recipe():
    # By path: the package itself imports torch, which pip's build environment lacks.
    path = ROOT / "fasttversky" / "ops" / "_cpu_build.py"
    spec = importlib.util.spec_from_file_location("_fasttversky_cpu_build", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


recipe = _load_recipe()


class CpuKernelLibrary(Extension):
    """One variant's shared library; its sources are listed for sdists only."""

    def __init__(self, variant):
        self.variant = variant
        name = "fasttversky.ops." + recipe.library_name(variant.name)[: -len(".so")]
        sources = [str(p.relative_to(ROOT)) for p in recipe.source_files(CSRC)]
        super().__init__(
            name, sources=[s for s in sources if s.endswith(".cpp")], depends=sources, optional=True
        )


class BuildCpuKernels(build_ext):
    def finalize_options(self):
        super().finalize_options()
        if not self.parallel:  # the variants are independent compiles
            self.parallel = True

    def get_ext_filename(self, fullname):
        # No Python ABI tag: ctypes loads these, Python never imports them.
        if fullname in self.ext_map and isinstance(self.ext_map[fullname], CpuKernelLibrary):
            return os.path.join(*fullname.split(".")) + ".so"
        return super().get_ext_filename(fullname)

    def build_extension(self, ext):
        if not isinstance(ext, CpuKernelLibrary):
            return super().build_extension(ext)
        out = Path(self.get_ext_fullpath(ext.name))
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            recipe.build(CSRC, ext.variant, out)
        except (RuntimeError, OSError) as exc:
            # optional=True turns this into a warning; the install goes on
            raise CompileError(
                f"{exc}\nfasttversky: the CPU kernels will be compiled on first use instead"
            ) from exc


setup(
    ext_modules=[CpuKernelLibrary(v) for v in recipe.variants()],
    cmdclass={"build_ext": BuildCpuKernels},
)
