"""Summarise the issue-11 lesion-cpu models (one row per trained model) by arm.

    python bench/lesion_cpu_summary.py [--runs bench/results/lesion_cpu_runs.csv]
        [--out bench/results/lesion_cpu_summary]

Input: ``lesion_cpu_runs.csv`` — one leave-one-patient-out model per row (test patient,
α, β, CE weight, transplant contrast, normalisation, quantile-remap strength, U-Net
levels, augmentation set, seed; the last two columns may be absent: 3 and ``default``) and
its scores at the final checkpoint with the preset's inference (64³ Gaussian windows,
brain only, components ≥ 10 voxels); fractions, counts in voxels/lesions. The rows are
what ``fasttversky evaluate`` reported for each model; this script only groups them.

Output: ``OUT.md`` — per arm (same everything but the seed) the seeds and, for each
score, one value or mean ± sd [percentile-bootstrap 95 % CI of the mean]
(``fasttversky.app.lesion_metrics.summarize``, the same summary ``reproduce`` uses), and
a second table comparing each arm run with two or more seeds to the preset's arm
(α=0.3, β=0.7, `varied`, no CE) on the same test patient: difference of the means and a
bootstrap 95 % CI that resamples each arm's seeds separately
(``fasttversky.app.lesion_metrics.compare_means``), marked when the CI excludes 0; and
``OUT.png`` — DSC, sensitivity, APR, lesion F1 and false-positive voxels per arm, one
dot per seed and a bar at the mean, the two test patients side by side.
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

import numpy as np

from fasttversky.app.experiment import setting_label
from fasttversky.app.lesion_metrics import compare_means, summarize

HERE = Path(__file__).resolve().parent
ARM_KEYS = (
    "test_patient",
    "alpha",
    "beta",
    "ce_weight",
    "transplant_contrast",
    "normalize",
    "remap",
    "levels",
    "augment",
)
# The preset's value of the columns older rows do not have.
DEFAULTS = {"levels": "3", "augment": "default"}
SCORES = [
    ("dsc", "DSC"),
    ("sensitivity", "Sens."),
    ("specificity", "Spec."),
    ("f2", "F2"),
    ("apr", "APR"),
    ("lesion_tpr", "lesion TPR"),
    ("lesion_precision", "lesion prec."),
    ("lesion_f1", "lesion F1"),
]
# The arm every other is compared with: the preset lesion-cpu (bench/results/lesion_cpu.md).
REFERENCE = {
    "alpha": 0.3,
    "beta": 0.7,
    "ce_weight": 0.0,
    "transplant_contrast": "varied",
    "normalize": "zscore",
    "remap": 0.0,
    "levels": 3,
    "augment": "default",
}
COMPARED = [
    ("dsc", "Δ DSC"),
    ("sensitivity", "Δ Sens."),
    ("f2", "Δ F2"),
    ("apr", "Δ APR"),
    ("lesion_tpr", "Δ lesion TPR"),
    ("lesion_precision", "Δ lesion prec."),
]
PLOTTED = [
    ("dsc", "DSC %"),
    ("sensitivity", "sensitivity %"),
    ("apr", "APR %"),
    ("lesion_f1", "lesion F1 %"),
    ("fp", "false-positive voxels"),
]


def read_runs(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k, v in DEFAULTS.items():
            r[k] = r.get(k) or v
        r["levels"] = int(r["levels"])
        for k in ("alpha", "beta", "ce_weight", "remap"):
            r[k] = float(r[k])
        for k in ("seed", "step", "version", "fp", "tp", "fn", "n_true", "n_detected", "n_pred"):
            r[k] = int(r[k])
        for k, _ in SCORES:
            r[k] = float(r[k])
    return rows


def arm_label(arm: dict) -> str:
    text = setting_label(arm["alpha"], arm["beta"], arm["ce_weight"])
    extras = [arm["transplant_contrast"]]
    if arm["normalize"] != "zscore":
        extras.append(f"{arm['normalize']} norm.")
    if arm["remap"]:
        extras.append(f"remap {arm['remap']:g}")
    if arm["levels"] != int(DEFAULTS["levels"]):
        extras.append(f"{arm['levels']} levels")
    if arm["augment"] != DEFAULTS["augment"]:
        extras.append(f"{arm['augment']} augmentation")
    return f"{text}; {', '.join(extras)}"


def group(rows: list[dict]) -> list[tuple[dict, list[dict]]]:
    """Rows -> [(arm, its rows sorted by seed)], arms in first-appearance order."""
    arms: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        arms[tuple(r[k] for k in ARM_KEYS)].append(r)
    return [
        (dict(zip(ARM_KEYS, k, strict=True)), sorted(v, key=lambda r: r["seed"]))
        for k, v in arms.items()
    ]


def cell(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    if len(values) == 1:
        return f"{scale * values[0]:.{digits}f}"
    s = summarize(values)
    lo, hi = s["ci95"]
    return (
        f"{scale * s['mean']:.{digits}f} ± {scale * s['sd']:.{digits}f} "
        f"[{scale * lo:.{digits}f}, {scale * hi:.{digits}f}]"
    )


def table(arms: list[tuple[dict, list[dict]]]) -> str:
    head = ["test patient", "arm", "version", "seeds", *(n for _, n in SCORES), "FP voxels"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm, rs in sorted(arms, key=lambda t: t[0]["test_patient"], reverse=True):
        cells = [
            arm["test_patient"],
            arm_label(arm),
            "/".join(sorted({str(r["version"]) for r in rs})),
            ", ".join(str(r["seed"]) for r in rs),
        ]
        for k, _ in SCORES:
            cells.append(cell([r[k] for r in rs], digits=2 if k == "specificity" else 1))
        fps = [r["fp"] for r in rs]
        cells.append(" / ".join(f"{x:,}" for x in fps))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def comparison(arms: list[tuple[dict, list[dict]]]) -> str:
    """Markdown table: each arm with >= 2 seeds minus the reference arm of its test
    patient (also >= 2 seeds), in points; '*' where the bootstrap CI excludes 0."""
    head = ["test patient", "arm − preset", "seeds", *(n for _, n in COMPARED)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for patient in sorted({a["test_patient"] for a, _ in arms}, reverse=True):
        mine = [(a, rs) for a, rs in arms if a["test_patient"] == patient and len(rs) >= 2]
        ref = [rs for a, rs in mine if all(a[k] == v for k, v in REFERENCE.items())]
        if not ref:
            continue
        for arm, rs in mine:
            if rs is ref[0]:
                continue
            cells = [patient, arm_label(arm), f"{len(rs)} vs {len(ref[0])}"]
            for k, _ in COMPARED:
                c = compare_means([r[k] for r in rs], [r[k] for r in ref[0]])
                lo, hi = c["ci95"]
                mark = " *" if c["separated"] else ""
                cells.append(f"{100 * c['diff']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]{mark}")
            lines.append("| " + " | ".join(cells) + " |")
    if len(lines) == 2:
        return ""
    return (
        "\n## Against the preset (α=0.3, β=0.7; varied), same test patient\n\n"
        "Difference of the means over seeds in points, [bootstrap 95 % CI resampling each "
        "arm's seeds separately]; * = the CI excludes 0. With 2-3 seeds per arm the "
        "bootstrap can only recombine the runs seen and under-covers: a * is a lead, not "
        "a test.\n\n" + "\n".join(lines) + "\n"
    )


def figure(arms: list[tuple[dict, list[dict]]], path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    patients = sorted({a["test_patient"] for a, _ in arms}, reverse=True)
    fig = Figure(figsize=(4.2 * len(patients), 2.3 * len(PLOTTED)), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(PLOTTED), len(patients), squeeze=False)
    for j, patient in enumerate(patients):
        mine = [(a, rs) for a, rs in arms if a["test_patient"] == patient]
        labels = [arm_label(a) for a, _ in mine]
        for i, (key, name) in enumerate(PLOTTED):
            ax = axes[i][j]
            scale = 1.0 if key == "fp" else 100.0
            for x, (_, rs) in enumerate(mine):
                vals = np.array([r[key] for r in rs], dtype=np.float64) * scale
                ax.bar(x, vals.mean(), color="0.85", width=0.7)
                ax.plot(np.full(vals.size, x), vals, "o", color="C0", ms=4)
            ax.set_ylabel(name, fontsize=8)
            ax.set_xticks(range(len(mine)))
            ax.set_xticklabels(
                labels if i == len(PLOTTED) - 1 else [], rotation=70, ha="right", fontsize=6
            )
            ax.tick_params(axis="y", labelsize=7)
            if i == 0:
                ax.set_title(f"test = {patient} (dots: seeds, bars: mean)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=Path, default=HERE / "results" / "lesion_cpu_runs.csv")
    p.add_argument("--out", type=Path, default=HERE / "results" / "lesion_cpu_summary")
    args = p.parse_args(argv)
    arms = group(read_runs(args.runs))
    header = (
        f"# lesion-cpu models by arm ({args.runs.name}; final checkpoint, 64³ Gaussian windows, "
        "brain, ≥ 10-voxel components; values in %, several seeds as mean ± sd "
        "[bootstrap 95 % CI])\n\n"
        "Versions: 2 = `wide` transplants, 3 = `varied`, 4-5 = the β sweep, CE and the "
        "patient07 arms, 6 = network depth and resolution augmentation, 7 = third seeds of "
        "the β sweep and CE, the preset's seeds on patient07 (bench/results/lesion_cpu.md).\n\n"
    )
    args.out.with_suffix(".md").write_text(header + table(arms) + comparison(arms))
    figure(arms, args.out.with_suffix(".png"))
    print(f"wrote {args.out.with_suffix('.md')} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
