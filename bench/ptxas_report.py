"""Registers and spills of every GPU kernel variant, without a GPU (``ptxas -v``).

CUDA: csrc/cuda/tversky_cuda.cu through ``nvcc -c -Xptxas -v`` for sm_80 and sm_90 (one
line per template instantiation: logits dtype, activation, MAXC, CE). Triton: each
kernel of fasttversky/ops/_triton_math.py compiled by triton for sm_80 / sm_90 and its
PTX assembled by triton's own ``ptxas -v``. Rows with CE=0 are the Tversky-only kernels
(the same code as before the cross-entropy term: it is a compile-time switch), CE=1 the
compound ones, so the table is the before/after comparison.

    python3 bench/ptxas_report.py [--cuda] [--triton] > report.md

Needs nvcc (CUDA part) and triton (Triton part); runs on a CPU-only machine.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

_FUNC = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_REGS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_STACK = re.compile(r"(\d+) bytes stack frame")


def parse_ptxas(text: str) -> list[dict]:
    """[{name, arch, regs, stack, spill_st, spill_ld}] from ``ptxas -v`` output."""
    out, cur = [], None
    for line in text.splitlines():
        m = _FUNC.search(line)
        if m:
            cur = {"name": m.group(1), "arch": m.group(2)}
            out.append(cur)
            continue
        if cur is None:
            continue
        if (m := _STACK.search(line)) and "stack" not in cur:
            cur["stack"] = int(m.group(1))
        if (m := _SPILL.search(line)) and "spill_st" not in cur:
            cur["spill_st"], cur["spill_ld"] = int(m.group(1)), int(m.group(2))
        if (m := _REGS.search(line)) and "regs" not in cur:
            cur["regs"] = int(m.group(1))
    return out


def _demangle(names: list[str]) -> list[str]:
    try:
        proc = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
        return proc.stdout.splitlines()
    except OSError:
        return names


def _short_cuda(name: str) -> str:
    # "(anonymous namespace)::_tversky_fwd_partials_kernel<float, 0, 4, true>(...)"
    m = re.search(r"(_tversky_\w+)(?:<([^>]*)>)?", name)
    if not m:
        return name
    kern, args = m.group(1), m.group(2)
    if not args:
        return kern
    parts = [a.strip() for a in args.split(",")]
    labels = ["S"] if "finalize" in kern else ["T", "ACT", "MAXC", "CE"]
    return kern + " " + " ".join(f"{k}={v}" for k, v in zip(labels, parts, strict=False))


def cuda_rows() -> list[dict]:
    from fasttversky.ops import cuda as cu

    src = ROOT / "csrc" / "cuda" / "tversky_cuda.cu"
    with tempfile.TemporaryDirectory() as tmp:
        cmd = cu.nvcc_command("80", src, Path(tmp) / "k.o", shared=False)
        cmd[-3:-3] = ["-gencode=arch=compute_90,code=sm_90", "-Xptxas", "-v", "--threads", "2"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    rows = parse_ptxas(proc.stderr)
    for r, d in zip(rows, _demangle([r["name"] for r in rows]), strict=True):
        r["name"] = _short_cuda(d)
    return rows


def _triton_variants():
    import triton.language as tl

    from fasttversky.ops.triton import bwd_block_elems, fwd_block_elems

    ptr = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16", "fp64": "*fp64"}
    # (activation, target, ignore, binary, C_PAD, CE, other switches): the shapes the
    # backend launches; target "soft" (the logits' dtype), else a label map's dtype; CE
    # (0 none, 1 plain, 2 focal) only with softmax/sigmoid.
    cases = [
        (0, "*u8", True, False, 2, 0, {}),
        (0, "*u8", True, False, 2, 1, {}),
        (0, "*u8", True, False, 4, 0, {}),
        (0, "*u8", True, False, 4, 1, {}),
        (1, "*u8", True, True, 2, 0, {}),
        (1, "*u8", True, True, 2, 1, {}),
        (1, "soft", False, False, 8, 0, {}),
        (0, "*fp32", True, False, 4, 1, {}),  # a float label map
        (0, "*u8", True, False, 4, 1, dict(HAS_SMOOTHING=True)),
        (0, "soft", False, False, 4, 1, {}),
        (0, "*u8", True, False, 4, 2, {}),
        (1, "*u8", True, True, 2, 2, {}),
        (1, "*u8", True, False, 4, 1, dict(HAS_REGIONS=True)),
        (1, "soft", False, False, 4, 2, {}),
    ]
    for xdt, cdt in (("fp32", tl.float32), ("bf16", tl.float32), ("fp64", tl.float64)):
        part = "*fp64" if xdt == "fp64" else "*fp32"
        for act, tdt, ign, binary, cpad, ce, other in cases:
            soft = tdt == "soft"
            consts = dict(
                ACTIVATION=act,
                HAS_SOFT_TARGET=soft,
                HAS_IGNORE_INDEX=ign,
                BINARY_LABELS=binary,
                C_PAD=cpad,
                BLOCK_N=fwd_block_elems(ce != 0, xdt == "fp64") // cpad,
                CDTYPE=cdt,
                CE=ce,
                **other,
            )
            tdt = ptr[xdt] if soft else tdt
            extra = "".join(f" {k}" for k in other) + (
                " float-labels" if "fp" in tdt and not soft else ""
            )
            tag = f"x={xdt} act={act} soft={int(soft)} C_PAD={cpad} CE={ce}{extra}"
            common = dict(logits_ptr=ptr[xdt], target_ptr=tdt, regions_ptr="*i64", params_ptr=part)
            yield (
                "fwd_partials " + tag,
                "_tversky_fwd_partials_kernel",
                dict(common, partials_ptr=part, counts_ptr="*i32"),
                consts,
            )
            yield (
                "bwd " + tag,
                "_tversky_bwd_kernel",
                dict(common, coefs_ptr=part, grad_ptr=ptr[xdt]),
                {**consts, "BLOCK_N": bwd_block_elems(ce, xdt == "fp64") // cpad},
            )
        for nce in (0, 1, 2):
            yield (
                f"finalize x={xdt} CE columns={nce}",
                "_tversky_finalize_kernel",
                dict(partials_ptr=part, counts_ptr="*i32", stats_ptr="*fp64", flag_sums_ptr="*i64"),
                dict(C_PAD=4, BLOCK_T=256, NCE=nce),
            )


def triton_rows() -> list[dict]:
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fasttversky.ops import _triton_math as K

    bindir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    # triton's PTX may be newer than its plain ptxas understands; its newest one reads it
    assemblers = [bindir / "ptxas-blackwell", bindir / "ptxas"]
    rows = []
    for arch in (80, 90):
        for label, kname, ptrs, consts in _triton_variants():
            kern = getattr(K, kname)
            sig = {}
            for name in kern.arg_names:
                if name in consts:
                    sig[name] = "constexpr"
                elif name.endswith("_ptr"):
                    sig[name] = ptrs[name]
                else:
                    sig[name] = "i64"
            src = ASTSource(kern, sig, constexprs=consts)
            ck = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4})
            with tempfile.TemporaryDirectory() as tmp:
                ptx = Path(tmp) / "k.ptx"
                ptx.write_text(ck.asm["ptx"])
                # triton targets sm_90a on Hopper: assemble for what the PTX says
                gpu = re.search(r"\.target\s+(sm_\w+)", ck.asm["ptx"]).group(1)
                errors = []
                for ptxas in (a for a in assemblers if a.exists()):
                    proc = subprocess.run(
                        [
                            str(ptxas),
                            "-v",
                            f"--gpu-name={gpu}",
                            str(ptx),
                            "-o",
                            f"{tmp}/k.cubin",
                        ],
                        capture_output=True,
                        text=True,
                    )
                    if proc.returncode == 0:
                        break
                    errors.append(f"{ptxas.name}: {proc.stderr[-500:]}")
            parsed = parse_ptxas(proc.stderr)
            if proc.returncode != 0 or not parsed:
                raise SystemExit(f"ptxas failed for {label}: {errors}")
            r = parsed[0]
            r["name"] = label
            rows.append(r)
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| kernel variant | arch | registers | stack | spill st/ld (bytes) |",
        "|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["name"], r["arch"])):
        lines.append(
            f"| {r['name']} | {r['arch']} | {r.get('regs', '?')} | {r.get('stack', 0)} | "
            f"{r.get('spill_st', 0)}/{r.get('spill_ld', 0)} |"
        )
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cuda", action="store_true")
    ap.add_argument("--triton", action="store_true")
    args = ap.parse_args(argv)
    both = not (args.cuda or args.triton)
    if args.cuda or both:
        print("### CUDA (nvcc -Xptxas -v)\n")
        print(table(cuda_rows()))
        print()
    if args.triton or both:
        print("### Triton (triton.compile + ptxas -v)\n")
        print(table(triton_rows()))


if __name__ == "__main__":
    main()
