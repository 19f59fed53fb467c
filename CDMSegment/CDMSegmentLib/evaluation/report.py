"""The evaluation report: a Markdown table, a CSV of every number, and two PNG figures, with the command that made them.

It reads ``slices.EvalCase`` and ``slices.MethodRun`` objects (not imported: slices.py calls this file).
"""

import csv
import math
from pathlib import Path
from typing import List, Sequence

COLUMNS = ("method", "rule", "dice", "iou", "hd95_mm", "hd95_undefined", "lesion_slices", "dice_3d", "lesion_cases",
           "fp_pixels_per_healthy_slice", "healthy_slices_with_fp", "healthy_slices", "fp_pixels_per_healthy_case",
           "healthy_cases", "auroc", "seconds_per_slice", "diffusion_evals_per_slice", "classifier_passes_per_slice")
MARKDOWN_COLUMNS = (("method", "method"), ("rule", "threshold"), ("dice", "Dice"), ("iou", "IoU"),
                    ("hd95_mm", "HD95 mm"), ("dice_3d", "3D Dice"), ("auroc", "AUROC"),
                    ("fp_pixels_per_healthy_slice", "FP px / healthy slice"),
                    ("healthy_slices_with_fp", "healthy slices with FP"),
                    ("fp_pixels_per_healthy_case", "FP px / healthy case"), ("seconds_per_slice", "s / slice"),
                    ("diffusion_evals_per_slice", "diffusion evals / slice"),
                    ("classifier_passes_per_slice", "classifier passes / slice"))


def _cell(value) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def write_csv(rows: Sequence[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row[k] for k in COLUMNS})


def markdown(rows: Sequence[dict], cases: Sequence["EvalCase"], command: str, figures: Sequence[str]) -> str:
    """The table people read; undefined values are "n/a", with how many there were underneath."""
    n_slices = sum(len(c.masks) for c in cases)
    lines = ["# CDMSegment evaluation", "", "Command:", "", "```", command, "```", "",
             f"{len(cases)} cases, {n_slices} slices with content; Dice, IoU and HD95 are means over slices "
             "with lesion, 3D Dice over cases with lesion; FP = predicted pixels where the ground truth is empty; "
             "AUROC over all content pixels (threshold-free).", "",
             "| " + " | ".join(title for _, title in MARKDOWN_COLUMNS) + " |",
             "|" + "---|" * len(MARKDOWN_COLUMNS)]
    lines += ["| " + " | ".join(_cell(row[key]) for key, _ in MARKDOWN_COLUMNS) + " |" for row in rows]
    undefined = [f"{r['method']} ({r['rule']}): {r['hd95_undefined']} of {r['lesion_slices']}"
                 for r in rows if r["hd95_undefined"]]
    lines += ["", "HD95 is undefined (n/a, left out of the mean, never counted as 0 mm) on lesion slices where "
              "the prediction is empty: " + ("; ".join(undefined) if undefined else "none") + "."]
    lines += [""] + [f"![{Path(f).stem}]({f})" for f in figures]
    return "\n".join(lines) + "\n"


def example_slices(cases: Sequence["EvalCase"], count: int) -> List[tuple]:
    """(case index, slice index) of the ``count`` slices with the largest lesions, at most one per case first."""
    ranked = sorted(((int(m.sum()), ci, si) for ci, c in enumerate(cases) for si, m in enumerate(c.masks) if m.any()),
                    reverse=True)
    chosen, used = [], set()
    for _, ci, si in ranked:
        if ci not in used:
            chosen.append((ci, si))
            used.add(ci)
    chosen += [(ci, si) for _, ci, si in ranked if (ci, si) not in chosen]
    return chosen[:count]


def heatmap_grid(runs: Sequence["MethodRun"], cases: Sequence["EvalCase"], path: Path, count: int = 4) -> None:
    """Rows: example slices; columns: image (first modality), ground truth, each method's heatmap (own colour scale)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picks = example_slices(cases, count)
    if not picks:
        picks = [(0, len(cases[0].masks) // 2)]
    cols = 2 + len(runs)
    fig, axes = plt.subplots(len(picks), cols, figsize=(1.8 * cols, 1.9 * len(picks)), squeeze=False)
    for r, (ci, si) in enumerate(picks):
        panels = [(cases[ci].slices[si, 0].numpy(), "image", "gray"), (cases[ci].masks[si], "ground truth", "gray")]
        panels += [(run.heatmaps[ci][si], run.variant.label, "inferno") for run in runs]
        for c, (img, title, cmap) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(img, cmap=cmap, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=6)
        axes[r, 0].set_ylabel(f"{cases[ci].case_id} #{si}", fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def dice_vs_time(rows: Sequence[dict], path: Path) -> None:
    """Dice against seconds per slice (log scale), one marker per method and threshold rule."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for rule, marker in zip(sorted({r["rule"] for r in rows}), "os^"):
        for row in (r for r in rows if r["rule"] == rule):
            ax.scatter(max(row["seconds_per_slice"], 1e-4), row["dice"], marker=marker)
            ax.annotate(f"{row['method']} ({rule})", (max(row["seconds_per_slice"], 1e-4), row["dice"]), fontsize=6)
    ax.set_xscale("log")
    ax.set_xlabel("seconds per slice (this machine)")
    ax.set_ylabel("Dice (slices with lesion)")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(runs: Sequence["MethodRun"], cases: Sequence["EvalCase"], output_dir: Path, command: str) -> dict:
    """Write results.csv, results.md, heatmaps.png and dice_vs_time.png into ``output_dir``; returns their paths."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    rows = [row for run in runs for row in run.rows]
    paths = {"csv": output_dir / "results.csv", "markdown": output_dir / "results.md",
             "heatmaps": output_dir / "heatmaps.png", "dice_vs_time": output_dir / "dice_vs_time.png"}
    write_csv(rows, paths["csv"])
    heatmap_grid(runs, cases, paths["heatmaps"])
    dice_vs_time(rows, paths["dice_vs_time"])
    paths["markdown"].write_text(markdown(rows, cases, command, [paths["heatmaps"].name, paths["dice_vs_time"].name]))
    return paths


def summary_lines(runs: Sequence["MethodRun"]) -> List[str]:
    """One console line per results row."""
    return [f"{r['method']:<40} {r['rule']:<12} Dice {_cell(r['dice'])}  3D {_cell(r['dice_3d'])}  "
            f"AUROC {_cell(r['auroc'])}  {r['seconds_per_slice']:.3f} s/slice" for run in runs for r in run.rows]

