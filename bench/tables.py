"""Markdown tables from the pytest-benchmark JSON of bench_terms.py, bench_dropins.py and
bench_compound.py (``--benchmark-json=FILE``).

    python bench/tables.py terms|dropins|compound FILE.json [--load "before -> after"]

Prints the run's header (command family, commit, date, CPU, threads, load if given) and
one table per case: medians, ratios taken within the run, and peak extra memory beyond
the gradient buffer. The numbers are read, never edited: a results file is this output.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

MIB = 2**20


def _mib(nbytes) -> str:
    return "n/a" if nbytes is None else f"{nbytes / MIB:.1f}"


def _header(run: dict, load: str | None) -> list[str]:
    m, c = run["machine_info"], run["commit_info"]
    cpu = m.get("cpu", {}).get("brand_raw", m.get("processor", "?"))
    infos = [b["extra_info"] for b in run["benchmarks"]]
    threads = sorted({i.get("threads") for i in infos if i.get("threads") is not None})
    lines = [
        f"Run: {run['datetime'][:16].replace('T', ' ')} UTC, commit {c['id'][:7]}"
        f"{' (dirty)' if c.get('dirty') else ''}; {cpu}; Python {m['python_version']};"
        f" torch threads {threads}.",
    ]
    if load:
        lines.append(f"Load average (1 min) before -> after: {load}.")
    return lines + [""]


def terms(run: dict) -> list[str]:
    by_case = defaultdict(list)
    for b in run["benchmarks"]:
        by_case[b["extra_info"]["case"]].append(b["extra_info"])
    out = []
    for case, rows in by_case.items():
        out += [f"### {case}", "",
                "| term | with term ms | Tversky alone ms | ratio | × copy floor (term / alone)"
                " | peak beyond grad MiB |",
                "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
        for e in rows:
            floor = (f"{e['term_x_floor']:.2f} / {e['baseline_x_floor']:.2f}"
                     if "floor_s" in e else "")  # fmt: skip
            out.append(
                f"| {e['term']} | {e['term_s'] * 1e3:.1f} | {e['baseline_s'] * 1e3:.1f}"
                f" | {e['ratio']:.2f}× | {floor} | {_mib(e['beyond_grad_bytes'])} |"
            )
        out.append("")
    return out


def _beyond(e: dict):
    p = e.get("peak_extra_bytes")
    return None if p is None else p - e["grad_bytes"]


def dropins(run: dict) -> list[str]:
    rows, overhead = defaultdict(dict), []
    for b in run["benchmarks"]:
        e = b["extra_info"]
        if "provider" in e:
            rows[(e["case"], e["loss"])][e["provider"]] = (b["stats"]["median"], e)
        else:
            overhead.append(e)
    out = ["| case | loss | drop-in ms | kernel ms | kernel, float labels ms | MONAI ms"
           " | MONAI / drop-in | beyond grad MiB: drop-in / MONAI | value: drop-in / MONAI |",
           "|---|---|---:|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for (case, loss), p in rows.items():
        d, k, kf = p["dropin"], p["kernel"], p["kernel-float"]
        m = p.get("monai")
        mon = (f"{m[0] * 1e3:.1f} | {m[0] / d[0]:.1f}×", _mib(_beyond(m[1])),
               f"{m[1]['value']:.6f}") if m else ("n/a | n/a", "n/a", "n/a")  # fmt: skip
        out.append(
            f"| {case} | {loss} | {d[0] * 1e3:.1f} | {k[0] * 1e3:.1f} | {kf[0] * 1e3:.1f}"
            f" | {mon[0]} | {_mib(_beyond(d[1]))} / {mon[1]}"
            f" | {d[1]['value']:.6f} / {mon[2]} |"
        )
    out += [
        "",
        "Drop-in over the kernel alone (alternating rounds, fp32, float labels for the"
        " drop-in, uint8 for the kernel):",
        "",
        "| case | loss | drop-in ms | kernel ms | ratio |",
        "|---|---|---:|---:|---:|",
    ]
    for e in overhead:
        out.append(
            f"| {e['case']} | {e['loss']} | {e['dropin_s'] * 1e3:.1f}"
            f" | {e['kernel_s'] * 1e3:.1f} | {e['ratio']:.3f}× |"
        )
    return out + [""]


def compound(run: dict) -> list[str]:
    rows, overhead, dropin = defaultdict(dict), [], []
    for b in run["benchmarks"]:
        e = b["extra_info"]
        if "provider" in e:
            rows[e["case"]][e["provider"]] = (b["stats"]["median"], e)
        else:
            (dropin if "dropin" in e["median_ms"] else overhead).append(e)
    out = []
    for case, p in rows.items():
        ours = p.get("fasttversky-compound")
        out += [f"### {case}", "", "| provider | fwd+bwd ms | vs fasttversky-compound"
                " | peak beyond grad MiB | loss |", "|---|---:|---:|---:|---:|"]  # fmt: skip
        for name, (med, e) in p.items():
            vs = f"{med / ours[0]:.1f}×" if ours else "n/a"
            out.append(
                f"| {name} | {med * 1e3:.1f} | {vs} | {_mib(_beyond(e))} | {e['loss']:.6f} |"
            )
        out.append("")
    if overhead:
        out += ["CE's price (compound / Tversky alone, alternating rounds):", "",
                "| case | threads | compound ms | Tversky ms | ratio |",
                "|---|---:|---:|---:|---:|"]  # fmt: skip
        for e in overhead:
            ms = e["median_ms"]
            out.append(
                f"| {e['case']} | {e['threads']} | {ms['fasttversky-compound']}"
                f" | {ms['fasttversky-tversky']} | {e['ratio']:.3f}× |"
            )
        out.append("")
    if dropin:
        out += ["compat.nnunet.DC_and_CE_loss on nnU-Net's float target over the kernel on"
                " int16 labels (alternating rounds):", "",
                "| case | drop-in ms | kernel ms | ratio |", "|---|---:|---:|---:|"]  # fmt: skip
        for e in dropin:
            ms = e["median_ms"]
            out.append(f"| {e['case']} | {ms['dropin']} | {ms['kernel']} | {e['ratio']:.3f}× |")
        out.append("")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("kind", choices=("terms", "dropins", "compound"))
    ap.add_argument("json")
    ap.add_argument("--load", default=None, help='load averages, e.g. "3.6 -> 3.7"')
    args = ap.parse_args()
    with open(args.json) as f:
        run = json.load(f)
    body = {"terms": terms, "dropins": dropins, "compound": compound}[args.kind](run)
    print("\n".join(_header(run, args.load) + body))


if __name__ == "__main__":
    main()
