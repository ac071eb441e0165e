"""What the application reports: progress bars, Markdown tables and CSV files of the
metrics (``evaluate``, ``demo``) and of the (α, β) sweep (``reproduce``: Table 1).

Numpy-light and torch-free; tqdm loads only when a progress bar is shown.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .lesion_metrics import LESION_NAMES
from .metrics import METRIC_NAMES

__all__ = [
    "COMPARED_KEYS",
    "SEED_KEYS",
    "TABLE_COLUMNS",
    "markdown_table",
    "metric_table",
    "pct",
    "progress_bar",
    "write_metrics_csv",
    "write_table",
]

# Table 1's columns (the sweep's table.md).
TABLE_COLUMNS = ["Penalties", *METRIC_NAMES.values(), "DSC per subject", *LESION_NAMES.values()]
# Scores summarised over seeds (mean, sd, bootstrap CI) when a sweep repeats its runs.
SEED_KEYS = (*METRIC_NAMES, *LESION_NAMES)
# Scores of the comparison with the baseline setting (the paper's question: does raising
# beta trade precision for recall, and beat Dice on DSC/F2/APR?).
COMPARED_KEYS = ("dsc", "sensitivity", "f2", "apr", "lesion_tpr", "lesion_f1")


def progress_bar(iterable, desc: str, enable: bool = True, **kw):
    """tqdm over ``iterable`` (on stderr), or the iterable itself when disabled."""
    if not enable:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, dynamic_ncols=True, **kw)


# --------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------
def pct(v: float | None) -> str:
    """A fraction as a percentage with two decimals ("n/a" when undefined)."""
    return "n/a" if v is None or not math.isfinite(v) else f"{100 * v:.2f}"


def markdown_table(rows: list[dict], columns: Sequence[str]) -> str:
    """A Markdown table (also readable in a terminal)."""
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    for r in rows:
        cells = (str(r.get(c, "")).ljust(w) for c, w in zip(columns, widths, strict=True))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def metric_table(rows: list[dict]) -> str:
    """Per-subject (+ pooled) metric rows from :func:`evaluate_volumes` as a Markdown
    table, values in %."""
    printable = [
        {
            "subject": r["subject"],
            **{METRIC_NAMES[k]: pct(r[k]) for k in METRIC_NAMES},
            "lesion voxels": r["tp"] + r["fn"],
            **(
                {
                    **{LESION_NAMES[k]: pct(r[k]) for k in LESION_NAMES},
                    "lesions (found / true / predicted)": (
                        f"{r['n_detected']} / {r['n_true']} / {r['n_pred']}"
                    ),
                }
                if "lesion_f1" in r
                else {}
            ),
        }
        for r in rows
    ]
    cols = ["subject", *METRIC_NAMES.values(), "lesion voxels"]
    if rows and "lesion_f1" in rows[0]:
        cols += [*LESION_NAMES.values(), "lesions (found / true / predicted)"]
    return markdown_table(printable, cols)


def write_metrics_csv(rows: list[dict], path: str | Path) -> Path:
    """Metric rows as CSV (fractions in [0, 1], not %, plus the voxel counts)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = ["subject", *METRIC_NAMES, "tp", "fp", "fn", "tn"]
    if rows and "lesion_f1" in rows[0]:
        keys += ["lesion_tpr", "lesion_precision", "lesion_f1", "n_true", "n_detected", "n_pred"]
        keys += ["n_pred_tp", "n_pred_fp"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


# --------------------------------------------------------------------------------------
# the sweep's Table 1
# --------------------------------------------------------------------------------------
def _over_seeds_cell(s: dict) -> str:
    """'mean ± sd [CI low, high]' in % of a summarize() dict ('n/a' where no seed had
    a finite value, e.g. lesion F1 of runs that predicted nothing)."""
    lo, hi = s["ci95"]
    if not np.isfinite(s["mean"]):
        return "n/a"
    if not np.isfinite(s["sd"]):
        return f"{100 * s['mean']:.1f} (n = {s['n']})"
    return f"{100 * s['mean']:.1f} ± {100 * s['sd']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def _comparison_table(results: list[dict]) -> str:
    """The ``vs_baseline`` differences as a second Markdown table ('' if none)."""
    compared = [r for r in results if "vs_baseline" in r]
    if not compared:
        return ""
    names = {**METRIC_NAMES, **LESION_NAMES}

    def cell(c: dict) -> str:
        lo, hi = c["ci95"]
        if not np.isfinite(c["diff"]):
            return "n/a"
        mark = " *" if c["separated"] else ""
        return f"{100 * c['diff']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]{mark}"

    base = compared[0]["vs_baseline"]["baseline"]
    columns = [f"Penalties − {base}", *(f"Δ {names[k]}" for k in COMPARED_KEYS)]
    rows = [
        {
            columns[0]: r["label"],
            **{f"Δ {names[k]}": cell(r["vs_baseline"][k]) for k in COMPARED_KEYS},
        }
        for r in compared
    ]
    return (
        f"\n\nAgainst {base} over seeds: difference of the means in points "
        "[bootstrap 95 % CI resampling each setting's seeds separately]; * = the CI "
        "excludes 0 (with a few seeds the bootstrap under-covers: a lead, not a test).\n\n"
        + markdown_table(rows, columns)
    )


def _ensemble_table(results: list[dict]) -> str:
    """The ``ensemble`` rows (each setting's seeds as one model) as a Markdown table
    ('' without them), with the ensemble's DSC minus the mean over seeds."""
    ens = [r for r in results if "ensemble" in r]
    if not ens:
        return ""
    columns = ["Seeds as one model", *METRIC_NAMES.values(), "DSC per subject"]
    columns += [*LESION_NAMES.values(), "DSC − mean over seeds"]
    rows = []
    for r in ens:
        e = r["ensemble"]
        rows.append(
            {
                columns[0]: r["label"],
                **{METRIC_NAMES[k]: pct(e[k]) for k in METRIC_NAMES},
                "DSC per subject": f"{100 * e['dsc_mean']:.2f} ± {100 * e['dsc_sd']:.2f}",
                **{v: pct(e[k]) for k, v in LESION_NAMES.items()},
                columns[-1]: f"{100 * (e['dsc'] - r['dsc']):+.2f}",
            }
        )
    return (
        "\n\nEach setting's seeds as one model (`predict --model` with the seeds' runs): "
        "the mean of their probabilities per voxel, thresholded and scored as one seed; "
        "in %.\n\n" + markdown_table(rows, columns)
    )


def write_table(results: list[dict], out: str | Path, header: str = "") -> str:
    """Table 1: ``out/table.md`` (values in %, with ``header`` above) and ``out/table.csv``
    (fractions and counts) from :func:`run_sweep`'s results -> the Markdown table.
    Results repeated over seeds add the columns "DSC over seeds" and "lesion F1 over
    seeds": mean ± sd [bootstrap 95 % CI of the mean], and results with ``ensemble``
    a table of their seeds as one model (table.md only); results with ``vs_baseline``
    (:func:`compare_with_baseline`) add a table of differences to the baseline."""
    out = Path(out)
    repeated = any("over_seeds" in r for r in results)
    rows = [
        {
            "Penalties": r["label"],
            **{METRIC_NAMES[k]: pct(r[k]) for k in METRIC_NAMES},
            **{v: pct(r[k]) for k, v in LESION_NAMES.items()},
            "DSC per subject": f"{100 * r['dsc_mean']:.2f} ± {100 * r['dsc_sd']:.2f}",
            **(
                {
                    f"{name} over seeds": _over_seeds_cell(r["over_seeds"][key])
                    for key, name in (("dsc", "DSC"), ("lesion_f1", "lesion F1"))
                    if "over_seeds" in r
                }
            ),
        }
        for r in results
    ]
    columns = TABLE_COLUMNS + (["DSC over seeds", "lesion F1 over seeds"] if repeated else [])
    table = markdown_table(rows, columns) + _ensemble_table(results) + _comparison_table(results)
    (out / "table.md").write_text(header + table + "\n")
    with open(out / "table.csv", "w", newline="") as f:
        w = csv.writer(f)
        keys = [*METRIC_NAMES, *LESION_NAMES, "dsc_mean", "dsc_sd", "tp", "fp", "fn", "tn"]
        spread = [f"{k}_{x}" for k in SEED_KEYS for x in ("sd", "ci_lo", "ci_hi")]
        w.writerow(["alpha", "beta", "ce_weight", "seeds", *keys, *(spread if repeated else [])])
        for r in results:
            o = r.get("over_seeds", {})
            extra = [
                v
                for k in SEED_KEYS
                for v in ((o[k]["sd"], *o[k]["ci95"]) if k in o else ("", "", ""))
            ]
            seeds = " ".join(str(x) for x in r.get("seeds", []))
            w.writerow(
                [
                    r["alpha"],
                    r["beta"],
                    r.get("ce_weight", 0.0),
                    seeds,
                    *(r[k] for k in keys),
                    *(extra if repeated else []),
                ]
            )
    return table
