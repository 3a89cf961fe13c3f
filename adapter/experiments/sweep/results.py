"""The results table of a sweep: one row per trial, best validation SRCC first, as CSV and markdown.

Columns: rank, trial id, the varied fields' values, state, mean validation SRCC of the trial's best
checkpoint, the evaluation metrics of that checkpoint (mean over labels; with several labels also
each label's SRCC), its step, the trial's seconds and, for a failed trial, the reason. Finished
trials come first (NaN SRCC last among them), then unfinished, then failed ones.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rankpipe.adapter.evaluation.evaluate import markdown_table
from rankpipe.adapter.evaluation.metrics import METRICS
from rankpipe.adapter.experiments.sweep.trial import DONE, FAILED, TrialRecord

CSV_FILE, MARKDOWN_FILE = "results.csv", "results.md"
# Characters of a failure reason shown in the markdown table (the CSV and status.json keep it whole).
REASON_CHARS = 100
_STATE_ORDER = {DONE: 0, FAILED: 2}


def sort_records(records: Sequence[TrialRecord]) -> list[TrialRecord]:
    """Finished trials by mean validation SRCC (best first), then unfinished, then failed; ties by id."""

    def key(record: TrialRecord) -> tuple:
        srcc = record.mean_val_srcc
        return (_STATE_ORDER.get(record.state, 1), math.isnan(srcc), -srcc if not math.isnan(srcc) else 0.0, record.id)

    return sorted(records, key=key)


def results_rows(records: Sequence[TrialRecord], values: dict[str, dict[str, str]],
                 varied: Sequence[str]) -> tuple[list[str], list[list[float | int | str | None]]]:
    """Header and rows of the table (numbers unformatted).

    Args:
        records: the trials' records.
        values: trial id -> {varied field: value} (from Trial.values).
        varied: the varied fields, in column order.
    """
    ordered = sort_records(records)
    evals = [r.metrics.get("eval") or {} for r in ordered if r.metrics]
    split = next((r.metrics.get("eval_split") for r in ordered if r.metrics and r.metrics.get("eval_split")), None)
    labels = list(dict.fromkeys(label for e in evals for label in e))
    metric_names = [m for m in METRICS if any(m in per_label for e in evals for per_label in e.values())]
    header = ["rank", "trial", *varied, "state", "val SRCC"]
    mean = " (mean)" if len(labels) > 1 else ""
    header += [f"{split} {METRICS[m][0]}{mean}" for m in metric_names]
    if len(labels) > 1 and "srcc" in metric_names:
        header += [f"{split} SRCC {label}" for label in labels]
    header += ["best step", "seconds", "reason"]
    rows = []
    for rank, record in enumerate(ordered, start=1):
        metrics = record.metrics or {}
        evaluated = metrics.get("eval") or {}
        row: list[float | int | str | None] = [rank, record.id, *(values.get(record.id, {}).get(f, "") for f in varied)]
        row += [record.state, metrics.get("mean_val_srcc")]
        row += [_mean([evaluated.get(label, {}).get(m) for label in labels]) if evaluated else None for m in metric_names]
        if len(labels) > 1 and "srcc" in metric_names:
            row += [evaluated.get(label, {}).get("srcc") for label in labels]
        row += [metrics.get("best_step"), metrics.get("seconds"), record.reason or ""]
        rows.append(row)
    return header, rows


def write_results_table(sweep_dir: str | Path, records: Sequence[TrialRecord], values: dict[str, dict[str, str]],
                        varied: Sequence[str]) -> tuple[Path, Path, str]:
    """Write results.csv and results.md into the sweep folder; returns their paths and the markdown table."""
    sweep_dir = Path(sweep_dir)
    header, rows = results_rows(records, values, varied)
    csv_path, md_path = sweep_dir / CSV_FILE, sweep_dir / MARKDOWN_FILE
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows([["" if cell is None else cell for cell in row] for row in rows])
    shown = [[_cell(cell) for cell in row[:-1]] + [_shorten(str(row[-1]))] for row in rows]
    table = markdown_table(header, shown)
    done = sum(r.state == DONE for r in records)
    failed = sum(r.state == FAILED for r in records)
    md_path.write_text(f"# Sweep {sweep_dir.name}\n\n{len(records)} trials: {done} done, {failed} failed, "
                       f"{len(records) - done - failed} unfinished.\n\n{table}\n")
    return csv_path, md_path, table


def _mean(values: list[float | None]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def _cell(value: float | int | str | None) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _shorten(text: str) -> str:
    return text if len(text) <= REASON_CHARS else text[: REASON_CHARS - 1] + "…"
