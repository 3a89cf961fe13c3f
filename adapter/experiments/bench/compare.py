"""Which differences between bench rows are real: intervals and paired differences against a reference row.

For every query and variant: the metric pooled over seeds with its bootstrap interval over test
images, and — for every variant but the reference — its difference to the reference row on the same
test images and seeds (adapter/experiments/bench/bootstrap.py), marked better, worse or no
difference at the interval's confidence. A summary line per variant counts its wins, ties and
losses over the queries both rows answer.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from collections.abc import Mapping, Sequence

from rankpipe.adapter.evaluation.evaluate import markdown_table
from rankpipe.adapter.experiments.bench.bootstrap import (
    BETTER,
    SAME,
    WORSE,
    BootstrapConfig,
    Estimate,
    Run,
    labelled_images,
    paired_difference,
    row_estimate,
    verdict,
)
from rankpipe.adapter.experiments.bench.runs import RunScores


@dataclasses.dataclass(frozen=True)
class ComparisonRow:
    """One (query, variant) with its interval and its paired difference to the reference."""

    unseen: bool
    label: str
    variant: str
    # Seeds pooled, and the test images compared: labelled in every run of the row and, where the row
    # is compared with the reference, in every run of the reference too (the images Δ resamples).
    seeds: int
    n: int
    # The metric pooled over seeds, with its interval.
    metric: Estimate
    # This row minus the reference row and its verdict; None for the reference itself, when the
    # reference has no row for this query (a baseline as reference has no unseen queries), and (the
    # verdict) when fewer than 2 test images have the label.
    difference: Estimate | None
    verdict: str | None


def compare_rows(runs: Mapping[tuple[str, int], RunScores], unseen: Mapping[str, bool],
                 variant_order: Sequence[str], reference: str, metric: str,
                 config: BootstrapConfig) -> list[ComparisonRow]:
    """Comparison rows of every query and variant, trained queries first, the variants of a query together.

    Args:
        runs: (variant, seed) -> the run's saved scores.
        unseen: label -> whether it is a held-out query (the labels to compare, in table order).
        variant_order: the table's variant order.
        reference: the variant every other is compared with.
        metric: a key of bootstrap.METRICS.
        config: resampling settings.
    """
    rows = []
    for label in sorted(unseen, key=lambda name: (unseen[name], name)):
        by_variant = {variant: [Run(s.scores[label], s.truth[label]) for (v, _), s in sorted(runs.items())
                                if v == variant and label in s.scores] for variant in variant_order}
        base = by_variant.get(reference) or None
        for variant, row_runs in by_variant.items():
            if not row_runs:
                continue
            difference, compared = None, row_runs
            if base is not None and variant != reference:
                difference = paired_difference(row_runs, base, metric, config)
                compared = [*row_runs, *base]
            n = int(labelled_images(compared).sum())
            rows.append(ComparisonRow(unseen[label], label, variant, len(row_runs), n,
                                      row_estimate(row_runs, metric, config), difference,
                                      _verdict(difference)))
    return rows


def summary_lines(rows: Sequence[ComparisonRow], variant_order: Sequence[str], reference: str) -> list[str]:
    """Per variant: how many queries it is better, not different and worse on than the reference."""
    lines = []
    for variant in variant_order:
        verdicts = [row.verdict for row in rows if row.variant == variant and row.verdict is not None]
        if variant == reference or not verdicts:
            continue
        wins, ties, losses = (verdicts.count(v) for v in (BETTER, SAME, WORSE))
        lines.append(f"- `{variant}` vs `{reference}`: {wins} better, {ties} no difference, {losses} worse "
                     f"(of {len(verdicts)} queries)")
    return lines


def comparison_markdown(rows: Sequence[ComparisonRow], variant_order: Sequence[str], reference: str,
                        metric: str, config: BootstrapConfig) -> str:
    """The comparison section of results.md: how it was computed, one table, the summary lines."""
    name = metric.upper()
    level = f"{config.confidence:.0%}"
    lines = [
        f"## Paired comparison against `{reference}` ({name}, {level} bootstrap intervals)", "",
        f"{name} pooled over seeds (mean of each seed's {name}) with a {level} percentile interval from "
        f"{config.resamples} resamples of the test images (seed {config.seed}); Δ is the row minus `{reference}` "
        "on the same resampled images and seeds (paired bootstrap); a row is better or worse when Δ's interval "
        "excludes 0.", "",
        *summary_lines(rows, variant_order, reference), "",
    ]
    heading = ["label", "variant", "unseen", "seeds", "n", f"{name} [{level}]", f"Δ vs {reference} [{level}]", "verdict"]
    cells = [[row.label, row.variant, "yes" if row.unseen else "", str(row.seeds), str(row.n), _interval(row.metric),
              _interval(row.difference, signed=True), row.verdict or ("reference" if row.variant == reference else "—")]
             for row in rows]
    lines += [markdown_table(heading, cells), ""]
    return "\n".join(lines)


def comparison_csv(rows: Sequence[ComparisonRow], metric: str) -> str:
    """comparison.csv: one line per row; difference columns empty for the reference and uncompared rows."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["section", "label", "variant", "seeds", "n", metric, f"{metric}_low", f"{metric}_high",
                     "diff", "diff_low", "diff_high", "verdict"])
    for row in rows:
        diff = row.difference
        numbers = [row.metric.value, row.metric.low, row.metric.high,
                   *((diff.value, diff.low, diff.high) if diff else (math.nan,) * 3)]
        writer.writerow(["unseen" if row.unseen else "trained", row.label, row.variant, row.seeds, row.n,
                         *("" if math.isnan(v) else f"{v:.6g}" for v in numbers), row.verdict or ""])
    return buffer.getvalue()


def _verdict(difference: Estimate | None) -> str | None:
    """None where there is nothing to judge: no difference computed, or too few labelled images for an interval.

    A difference of exactly 0 is no difference even without an interval: identical rows differ by 0 on
    every resample, a degenerate bootstrap distribution whose interval a scipy release may give as NaN.
    """
    if difference is None or math.isnan(difference.value):
        return None
    if math.isnan(difference.low) or math.isnan(difference.high):
        return SAME if difference.value == 0.0 else None
    return verdict(difference)


def _interval(estimate: Estimate | None, signed: bool = False) -> str:
    if estimate is None or math.isnan(estimate.value):
        return "—"
    number = "{:+.3f}" if signed else "{:.3f}"
    if math.isnan(estimate.low):
        return number.format(estimate.value)
    return f"{number.format(estimate.value)} [{number.format(estimate.low)}, {number.format(estimate.high)}]"
