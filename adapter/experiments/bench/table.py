"""The bench's results table: per-run metrics records → mean ± std over seeds per (query, variant).

Rows are grouped by section ("trained queries", then "unseen categories": held-out counting queries
the runs never trained on) and, within a section, by query, so the variants of one query sit
together. Mean and std are over the seeds where a metric is defined (a correlation is undefined for
constant scores); the std is the sample standard deviation (n − 1), and with one seed only the mean
is shown. MAE is in label units and only for trained queries (an unseen query's scores have no units).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from collections.abc import Sequence

from rankpipe.adapter.evaluation.evaluate import markdown_table
from rankpipe.adapter.evaluation.folds import fold_stat

# Metric keys of a run's metrics.json -> table heading, in column order.
BENCH_METRICS: dict[str, str] = {"srcc": "SRCC", "plcc": "PLCC", "krcc": "KRCC", "mae": "MAE"}
SECTIONS = {False: "Trained queries", True: "Unseen categories (held-out counting queries, never trained on)"}


@dataclasses.dataclass(frozen=True)
class TableRow:
    """One (query, variant) over its seeds."""

    # True for a query the runs never trained on.
    unseen: bool
    # Label name and its query sentence.
    label: str
    query: str
    # Variant name and the method it trains.
    variant: str
    method: str
    # Seeds aggregated.
    seeds: int
    # Labelled images of the split.
    n: int
    # Metric key -> (mean, std) over seeds; NaN where undefined (std with one seed, MAE of unseen queries).
    stats: dict[str, tuple[float, float]]


def table_rows(records: Sequence[dict], variant_order: Sequence[str]) -> list[TableRow]:
    """Aggregate run records (metrics.json contents) into rows, trained queries first."""
    groups: dict[tuple[bool, str, str], list[tuple[dict, dict]]] = {}
    for record in records:
        for q in record["queries"]:
            groups.setdefault((q["unseen"], q["label"], record["variant"]), []).append((record, q))
    rank = {name: i for i, name in enumerate(variant_order)}
    rows = []
    for (unseen, label, variant), items in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], rank[kv[0][2]])):
        stats = {}
        for key in BENCH_METRICS:
            stat = fold_stat([_number(q["metrics"].get(key)) for _, q in items])  # mean ± sample std over seeds
            stats[key] = (stat.mean, stat.std)
        record, first = items[0]
        rows.append(TableRow(unseen, label, first["query"], variant, record["method"], len(items), first["n"], stats))
    return rows


def results_markdown(header: Sequence[str], rows: Sequence[TableRow]) -> str:
    """results.md: a title, the header lines, then one table per section."""
    lines = ["# rankpipe bench", "", *header, ""]
    for unseen, title in SECTIONS.items():
        section = [row for row in rows if row.unseen == unseen]
        if not section:
            continue
        heading = ["label", "query", "variant", "seeds", "n"] + list(BENCH_METRICS.values())
        cells = [
            [row.label, row.query, row.variant, str(row.seeds), str(row.n)]
            + [_cell(*row.stats[key]) for key in BENCH_METRICS]
            for row in section
        ]
        lines += [f"## {title}", "", markdown_table(heading, cells), ""]
    return "\n".join(lines)


def results_csv(rows: Sequence[TableRow]) -> str:
    """results.csv: one line per row with the mean and std of each metric (empty where undefined)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["section", "label", "query", "variant", "method", "seeds", "n"]
                    + [f"{key}_{part}" for key in BENCH_METRICS for part in ("mean", "std")])
    for row in rows:
        numbers = [_csv_number(v) for key in BENCH_METRICS for v in row.stats[key]]
        writer.writerow(["unseen" if row.unseen else "trained", row.label, row.query, row.variant, row.method,
                         row.seeds, row.n, *numbers])
    return buffer.getvalue()


def _number(value) -> float:
    return math.nan if value is None else float(value)


def _cell(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "—"
    return f"{mean:.3f}" if math.isnan(std) else f"{mean:.3f} ± {std:.3f}"


def _csv_number(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.6g}"
