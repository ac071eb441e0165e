"""Run the loss benchmark matrix and write a human Markdown summary (+ the raw JSON).

    python bench/report.py --out bench/results/loss_cpu.md [--quick]

Runs ``python -m pytest bench/bench_loss.py --benchmark-only`` in a child process (so the
big cases' memory is returned when it ends), keeps pytest-benchmark's JSON next to the
Markdown (same name, ``.json``) with this script's metadata added under
``"fasttversky_report"``, and writes: machine, date, versions, load, the copy
bandwidth, issue 2's targets with met/missed and by how much, and per case the medians,
GB/s, fraction of copy bandwidth, peak extra memory and speedups vs MONAI and vs
``torch.compile(reference)``.

``main(argv)`` returns the exit code. It needs this source tree (pytest-benchmark over
bench/bench_loss.py, reference/); ``fasttversky bench`` (fasttversky/app/bench.py) is the
smaller fused-vs-plain timing that runs from an installed package.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_CASE, TARGET_MODE = "paper-b1-fp32", "fwdbwd"
TARGET_SHAPE = [1, 2, 128, 224, 256]
LOSS_SOURCES = (
    "fasttversky/functional.py",
    "fasttversky/_dispatch.py",
    "fasttversky/_spec.py",
    "fasttversky/ops",
    "fasttversky/compat",
    "csrc",
    "reference",
    "bench",
)
TARGETS = {  # issue 2, CPU, fp32, 1x2x128x224x256, fwd+bwd
    "vs_monai": 8.0,
    "vs_compiled": 10.0,
    "x_floor": 2.0,
    "beyond_grad_frac": 0.01,
}


def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "loss_cpu.md")
    ap.add_argument("--quick", action="store_true", help="smaller shapes: a smoke run")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--providers", default=None, help="comma-separated provider names")
    ap.add_argument("-k", dest="keyword", default=None, help="pytest -k expression")
    ap.add_argument(
        "--from-json",
        type=Path,
        default=None,
        help="only re-render the Markdown from an earlier run's JSON",
    )
    return ap.parse_args(argv)


def _git(*args) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def _thp() -> str:
    """Transparent huge pages: the kernel's mode and PyTorch's opt-in (first-touch cost)."""
    try:
        mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
        mode = mode.split("[")[1].split("]")[0]
    except (OSError, IndexError):
        mode = "?"
    return f"THP {mode}, THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')}"


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for mod in ("torch", "monai", "pytest_benchmark"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # a missing optional package is reported, not fatal
            out[mod] = "not installed"
    sys.path.insert(0, str(ROOT))
    import fasttversky

    out["fasttversky"] = fasttversky.__version__
    out["commit"] = _git("rev-parse", "--short", "HEAD")
    # Only the files the loss runs on: other engineers' work in progress elsewhere in the
    # tree does not change these numbers.
    out["dirty"] = bool(_git("status", "--porcelain", "--", *LOSS_SOURCES))
    return out


def _run_matrix(args, json_path: Path) -> int:
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        str(ROOT / "bench" / "bench_loss.py"),
        "--benchmark-only",
        f"--benchmark-json={json_path}",
        "-q",
        "-p",
        "no:cacheprovider",
    ]
    if args.quick:
        cmd.append("--quick")
    if args.device:
        cmd += ["--device", args.device]
    if args.providers:
        cmd += ["--providers", args.providers]
    if args.keyword:
        cmd += ["-k", args.keyword]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    print("+", " ".join(cmd), flush=True)
    return subprocess.call(cmd, cwd=ROOT, env=env)


# --------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------
def _fmt_ms(s):
    return "–" if s is None else (f"{s * 1e3:.1f}" if s >= 0.01 else f"{s * 1e3:.2f}")


def _fmt_x(v):
    return "–" if v is None else (f"{v:.1f}×" if v < 100 else f"{v:.0f}×")


def _fmt_mb(b):
    return "–" if b is None else f"{b / 1e6:.1f}"


def _table(rows: dict, case: str, providers: list[str]) -> list[str]:
    def get(p, m):
        return rows.get((case, p, m))

    def median(p, m):
        r = get(p, m)
        return r["stats"]["median"] if r else None

    def speedup(base, p, m):
        a, b = median(base, m), median(p, m)
        return a / b if a and b else None

    out = [
        "| provider | fwd ms | fwd+bwd ms | bwd ms | fwd+bwd IQR ms | GB/s | of copy BW | × floor "
        "| peak fwd MB | peak fwd+bwd MB | beyond grad | vs MONAI fwd / fwd+bwd "
        "| vs compile(ref) fwd / fwd+bwd |",
        "|---|" + "---:|" * 12,
    ]
    for p in providers:
        f, fb = get(p, "fwd"), get(p, "fwdbwd")
        if not (f or fb):
            continue
        tf, tfb = median(p, "fwd"), median(p, "fwdbwd")
        tb = median(p, "bwd")  # measured alone for the fused backends
        e = fb["extra_info"] if fb else {}
        ef = f["extra_info"] if f else {}
        bg = e.get("beyond_grad_frac")
        out.append(
            f"| {p} | {_fmt_ms(tf)} | {_fmt_ms(tfb)} "
            f"| {_fmt_ms(tb) if tb else (f'({_fmt_ms(tfb - tf)})' if tf and tfb else '–')} "
            f"| {_fmt_ms(fb['stats']['iqr']) if fb else '–'} "
            f"| {e.get('gbps', 0):.2f} | {100 * e.get('frac_copy_bw', 0):.0f} % "
            f"| {_fmt_x(e.get('x_floor'))} "
            f"| {_fmt_mb(ef.get('peak_extra_bytes'))} | {_fmt_mb(e.get('peak_extra_bytes'))} "
            f"| {'–' if bg is None else f'{100 * bg:.2f} %'} "
            f"| {_fmt_x(speedup('monai', p, 'fwd'))} / {_fmt_x(speedup('monai', p, 'fwdbwd'))} "
            f"| {_fmt_x(speedup('compile(reference)', p, 'fwd'))} / "
            f"{_fmt_x(speedup('compile(reference)', p, 'fwdbwd'))} |"
        )
    return out


def _split_section(rows, fused, copy_gbps) -> list[str]:
    """fwd, bwd alone and the gradient buffer's page faults for the target case."""

    def med(p, m):
        r = rows.get((TARGET_CASE, p, m))
        return (r["stats"]["median"], r["extra_info"]) if r else (None, {})

    tf, ef = med(fused, "fwd")
    tb, eb = med(fused, "bwd")
    tfb, efb = med(fused, "fwdbwd")
    fresh, _ = med("grad buffer (fresh pages)", "write")
    touched, et = med("grad buffer (touched pages)", "write")
    if not (tf and tb and tfb):
        return []
    L = [
        f"## Where a fused fwd+bwd goes ({fused}, {TARGET_CASE})",
        "",
        "| part | median ms | floor ms (bytes / copy BW) | × floor |",
        "|---|---:|---:|---:|",
    ]
    for name, t, e in (("forward", tf, ef), ("backward alone", tb, eb), ("fwd+bwd", tfb, efb)):
        L.append(
            f"| {name} | {_fmt_ms(t)} | {_fmt_ms(e.get('floor_s'))} | {_fmt_x(e.get('x_floor'))} |"
        )
    if fresh and touched and copy_gbps:
        L.append(
            f"| writing a gradient-sized buffer, fresh pages (alloc + first touch) | "
            f"{_fmt_ms(fresh)} | | |"
        )
        L.append(f"| the same write into touched pages | {_fmt_ms(touched)} | | |")
        L += [
            "",
            f"First-touch page faults of a freshly allocated gradient cost about "
            f"{_fmt_ms(fresh - touched)} ms of the backward's {_fmt_ms(tb)} ms: any "
            "backward that allocates its output pays them (MONAI's and the reference's "
            "too, many times over); only reusing the buffer across steps avoids them, "
            "which the CPU backward does once the previous step's gradient is free "
            "(fasttversky/ops/_grad_buffers.py): its timed rounds reset `x.grad` as a "
            "training step does, so they reuse it.",
        ]
    L.append("")
    return L


def _verdict(value, target, higher_is_better, unit="×"):
    if value is None:
        return "not measured", "–"
    ok = value >= target if higher_is_better else value <= target
    if ok:
        return "**met**", ""
    factor = target / value if higher_is_better else value / target
    return "**missed**", f"needs {factor:.2f}× better"


def render(data: dict) -> str:
    meta = data.get("fasttversky_report", {})
    ver = meta.get("versions", {})
    benches = data["benchmarks"]
    rows, cases, providers = {}, [], []
    copy_row = None
    for b in benches:
        e = b["extra_info"]
        if e.get("provider") == "copy":
            copy_row = b
            continue
        key = (e["case"], e["provider"], e["mode"])
        rows[key] = b
        if e["case"] not in cases:
            cases.append(e["case"])
        if e["provider"] not in providers:
            providers.append(e["provider"])
    fused = next((p for p in providers if p == "fasttversky[cpu]"), None) or next(
        (p for p in providers if p.startswith("fasttversky[")), None
    )
    any_e = next(iter(rows.values()))["extra_info"] if rows else {}

    L = [f"# Tversky loss benchmark — {any_e.get('device', '?').upper()}", ""]
    if meta.get("quick"):
        L += ["> **--quick run**: 64× smaller volumes; not the issue's targets.", ""]
    L += [
        f"- Date: {meta.get('date', data.get('datetime', '?'))}",
        f"- Machine: {meta.get('cpu', '?')}, {meta.get('cores', '?')} cores, "
        f"{meta.get('mem_gib', 0):.0f} GiB RAM, {meta.get('platform', '?')}; "
        f"torch threads: {any_e.get('threads', '?')}",
        f"- Versions: torch {ver.get('torch')}, fasttversky {ver.get('fasttversky')} "
        f"(commit {ver.get('commit')}{', with uncommitted changes' if ver.get('dirty') else ''}), "
        f"MONAI {ver.get('monai')}, Python {ver.get('python')}, "
        f"pytest-benchmark {ver.get('pytest_benchmark')}",
        f"- Load average (1 min) before / after: {meta.get('load_before', '?')} / "
        f"{meta.get('load_after', '?')} — a shared 2-core machine; medians are "
        "robust to it, single rounds are not",
        f"- Command: `{meta.get('command', '?')}` (wall {meta.get('wall_s', 0):.0f} s)",
    ]
    copy_gbps = any_e.get("copy_gbps")
    if copy_gbps:
        L.append(
            f"- Copy bandwidth (median `dst.copy_(src)`, 256 MiB float32, read+write "
            f"counted): {copy_gbps:.2f} GB/s at session start"
            + (
                f"; {copy_row['extra_info']['gbps']:.2f} GB/s as its own benchmark row"
                if copy_row
                else ""
            )
        )
    L.append("")

    # ---- targets
    tr = rows.get((TARGET_CASE, fused, TARGET_MODE)) if fused else None
    if tr and tr["extra_info"]["shape"] != TARGET_SHAPE:
        L += [f"(Issue 2's targets are for {TARGET_SHAPE}; this run has other shapes.)", ""]
    elif tr:
        t = tr["stats"]["median"]
        mon = rows.get((TARGET_CASE, "monai", TARGET_MODE))
        com = rows.get((TARGET_CASE, "compile(reference)", TARGET_MODE))
        vs_m = mon["stats"]["median"] / t if mon else None
        vs_c = com["stats"]["median"] / t if com else None
        e = tr["extra_info"]
        L += [
            f"## Issue 2's targets: {fused}, fp32, 1×2×128×224×256, fwd+bwd "
            f"(median {_fmt_ms(t)} ms)",
            "",
            "| target | measured | verdict | gap |",
            "|---|---:|---|---|",
        ]
        for label, val, tgt, hib, shown in (
            ("≥ 8× faster than MONAI", vs_m, 8.0, True, _fmt_x(vs_m)),
            ("≥ 10× faster than torch.compile(reference)", vs_c, 10.0, True, _fmt_x(vs_c)),
            (
                "within 2× of the copy-bandwidth floor",
                e.get("x_floor"),
                2.0,
                False,
                f"{_fmt_x(e.get('x_floor'))} floor ({_fmt_ms(e.get('floor_s'))} ms)",
            ),
            (
                "memory beyond the gradient ≤ 1 % of it",
                e.get("beyond_grad_frac"),
                0.01,
                False,
                "–"
                if e.get("beyond_grad_frac") is None
                else f"{100 * e['beyond_grad_frac']:.2f} %"
                f" ({_fmt_mb(e.get('beyond_grad_bytes'))} MB)",
            ),
        ):
            v, gap = _verdict(val, tgt, hib)
            L.append(f"| {label} | {shown} | {v} | {gap} |")
        L.append("")

    # ---- where a fused step's time goes
    if fused and tr:
        L += _split_section(rows, fused, copy_gbps)

    # ---- per case
    L += ["## Medians per case", ""]
    for case in cases:
        any_row = next(r for (c, _, _), r in rows.items() if c == case)
        e = any_row["extra_info"]
        shape = "×".join(map(str, e["shape"]))
        moved = {
            m: _fmt_mb(rows.get((case, providers[0], m), any_row)["extra_info"]["bytes_moved"])
            for m in ("fwd", "fwdbwd")
        }
        L += [
            f"### {case}: logits {shape} {e['dtype']}, labels uint8",
            "",
            f"Bytes that must move: fwd {moved['fwd']} MB, fwd+bwd {moved['fwdbwd']} MB.",
            "",
            *_table(rows, case, providers),
            "",
        ]
        losses = [
            r["extra_info"]["loss"]
            for (c, _, _), r in rows.items()
            if c == case and "loss" in r["extra_info"]
        ]
        if losses:
            spread = (max(losses) - min(losses)) / max(abs(max(losses)), 1e-30)
            L += [f"Loss values agree across providers to {spread:.1e} (relative).", ""]

    L += [
        "## How these were measured",
        "",
        "- Each benchmark: `logits` a leaf with `requires_grad=True`; *fwd* = the loss "
        "call, *fwd+bwd* = the call and `backward()`; `logits.grad = None` before every "
        "round (untimed), so the backward allocates its gradient as a training step "
        "does. Warm-up rounds first (2 for torch.compile), so compilation and the CPU "
        "kernels' first-use build are not timed. Medians of 15 rounds (fast "
        "providers) or 5 (reference, torch.compile, MONAI, fasttversky[torch]).",
        "- Bytes that must move: fwd reads logits + labels; fwd+bwd reads them twice and "
        "writes the gradient (3 L + 2 Y). GB/s = bytes / median; *of copy BW* = that / "
        "the copy bandwidth; *× floor* = median / (bytes / copy bandwidth), so the "
        "issue's 'within 2× of the floor' is × floor ≤ 2.",
        "- Peak extra memory (CPU): peak RSS growth of one more call, via "
        "`/proc/self/clear_refs` (reset VmHWM) and VmHWM − VmRSS before; glibc's mmap "
        "threshold is pinned to 64 KiB so every tensor's pages come and go with it. "
        "For fwd+bwd it includes the gradient buffer that the call leaves in "
        "`logits.grad`; *beyond grad* = (peak − gradient bytes) / gradient bytes. "
        "On CUDA: `torch.cuda.max_memory_allocated` growth.",
        "- Providers: `fasttversky[<backend>]` = `fasttversky.tversky_loss(..., "
        "backend=...)`; `compat.monai` = `fasttversky.compat.monai.TverskyLoss(softmax="
        "True, to_onehot_y=True)` fed like MONAI; `reference` = "
        "`reference.reference_tversky_loss` in the logits' dtype (float32, or bfloat16 "
        "for the bf16 cases); `compile(reference)` = `torch.compile(reference, "
        "dynamic=False)`; `monai` = `monai.losses.TverskyLoss(softmax=True, "
        "to_onehot_y=True)` with (B, 1, ...) uint8 labels. All with alpha=0.3, "
        "beta=0.7, mean over (B, C).",
        "- Labels: 90 % background, the rest spread over the other classes, i.i.d. per "
        "voxel; logits standard normal.",
        "",
    ]
    return "\n".join(L)


def main(argv=None) -> int:
    args = _parse(argv)
    out = args.out.resolve()  # the benchmark child runs in the repository root
    json_path = out.with_suffix(".json")
    if args.from_json:
        try:
            data = json.loads(args.from_json.read_text())
        except (OSError, ValueError) as e:
            print(f"error: --from-json {args.from_json}: {e}", file=sys.stderr)
            return 1
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(render(data))
        print(f"wrote {out}")
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    start = dt.datetime.now(dt.timezone.utc)
    rc = _run_matrix(args, json_path)
    wall = (dt.datetime.now(dt.timezone.utc) - start).total_seconds()
    if not json_path.exists():
        print(f"benchmark run failed (exit {rc}); no {json_path}", file=sys.stderr)
        return rc or 1
    data = json.loads(json_path.read_text())
    data["fasttversky_report"] = {
        "date": start.strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "mem_gib": _mem_total_gib(),
        "platform": f"{platform.system()} {platform.release()}, {_thp()}",
        "versions": _versions(),
        "load_before": round(load_before, 2),
        "load_after": round(os.getloadavg()[0], 2),
        "quick": args.quick,
        "command": " ".join(
            ["python", "bench/report.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "wall_s": wall,
        "exit_code": rc,
    }
    json_path.write_text(json.dumps(data, indent=1))
    out.write_text(render(data))
    print(f"wrote {out} and {json_path}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
