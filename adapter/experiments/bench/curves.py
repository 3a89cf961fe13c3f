"""Learning curves: mean validation SRCC against training step, per variant, from each run's history.jsonl.

Training appends one history line per validation (adapter/training/loop.py: step, val_srcc per
label, mean_val_srcc, …); a resumed run's history is cut back to its last checkpoint first, so the
file always holds the run's one curve. Baselines are fitted, not trained step by step, and have none.

Written beside the table: curves.csv (one line per variant, seed and step), curves.json (the same,
nested) and curves.png (one thin line per seed, a thick line for the mean over seeds at each step).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rankpipe.adapter.evaluation.evaluate import markdown_table
from rankpipe.files import atomic_target


@dataclasses.dataclass(frozen=True)
class Curve:
    """One run's validation curve."""

    variant: str
    seed: int
    # (S,) steps at which it was validated, ascending.
    steps: tuple[int, ...]
    # (S,) mean validation SRCC over its labels at those steps (NaN where undefined).
    mean_srcc: tuple[float, ...]


def read_curve(variant: str, seed: int, history: Path) -> Curve:
    """The curve in one run's history.jsonl."""
    lines = [json.loads(line) for line in history.read_text().splitlines() if line.strip()]
    lines.sort(key=lambda line: line["step"])
    return Curve(variant, seed, tuple(int(line["step"]) for line in lines),
                 tuple(_float(line.get("mean_val_srcc")) for line in lines))


def mean_curve(curves: Sequence[Curve]) -> tuple[list[int], list[float]]:
    """The steps every curve shares and the mean over curves of their SRCC there."""
    shared = sorted(set.intersection(*(set(c.steps) for c in curves)))
    means = [float(np.nanmean([c.mean_srcc[c.steps.index(step)] for c in curves])) for step in shared]
    return shared, means


def curves_markdown(curves: Sequence[Curve]) -> str:
    """The learning-curve section of results.md: per variant, the mean over seeds at each shared step."""
    by_variant: dict[str, list[Curve]] = {}
    for curve in curves:
        by_variant.setdefault(curve.variant, []).append(curve)
    means = {variant: dict(zip(*mean_curve(runs), strict=True)) for variant, runs in by_variant.items()}
    steps = sorted({step for row in means.values() for step in row})
    cells = [[variant, *(_cell(row.get(step, math.nan)) for step in steps)] for variant, row in means.items()]
    return "\n".join([
        "## Learning curves", "",
        "Mean validation SRCC (mean over labels, then over seeds) at each validation step; plotted per seed in "
        "curves.png, data in curves.csv and curves.json.", "",
        markdown_table(["variant", *(f"step {step}" for step in steps)], cells), "",
    ])


def curves_csv(curves: Sequence[Curve]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["variant", "seed", "step", "mean_val_srcc"])
    for curve in curves:
        for step, value in zip(curve.steps, curve.mean_srcc, strict=True):
            writer.writerow([curve.variant, curve.seed, step, "" if math.isnan(value) else f"{value:.6g}"])
    return buffer.getvalue()


def curves_json(curves: Sequence[Curve]) -> str:
    data: dict[str, dict[str, dict]] = {}
    for curve in curves:
        data.setdefault(curve.variant, {})[str(curve.seed)] = {
            "step": list(curve.steps), "mean_val_srcc": [None if math.isnan(v) else v for v in curve.mean_srcc]}
    return json.dumps(data, indent=1) + "\n"


def plot_curves(curves: Sequence[Curve], path: Path, title: str) -> None:
    """curves.png: per variant, each seed thin and the mean over seeds thick, in the variant's colour."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server or in CI
    import matplotlib.pyplot as plt

    by_variant: dict[str, list[Curve]] = {}
    for curve in curves:
        by_variant.setdefault(curve.variant, []).append(curve)
    figure, axes = plt.subplots(figsize=(8, 5), dpi=100)
    for index, (variant, runs) in enumerate(by_variant.items()):
        colour = f"C{index % 10}"
        for run in runs:
            axes.plot(run.steps, run.mean_srcc, color=colour, alpha=0.3, linewidth=0.8)
        steps, means = mean_curve(runs)
        axes.plot(steps, means, color=colour, linewidth=2.0, marker="o", markersize=3,
                  label=f"{variant} ({len(runs)} seed{'s' if len(runs) > 1 else ''})")
    axes.set_xlabel("training step")
    axes.set_ylabel("mean validation SRCC")
    axes.set_title(title, fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    with atomic_target(path) as target:
        figure.savefig(target, format="png")
    plt.close(figure)


def _cell(value: float) -> str:
    return "—" if math.isnan(value) else f"{value:.3f}"


def _float(value) -> float:
    return math.nan if value is None else float(value)
