"""Does the query steer the ranking? SRCC of the scores under each query against each label.

For a variant, entry (q, l) is the SRCC between the test images' scores under query q and their
label l, over the images that have label l, averaged over seeds. When the text steers the ranking,
scores under "Sort images by the amount of blur." follow the blur label and not the brightness label:
the diagonal dominates. A model that ignores the text ranks every query alike, and each column is
then flat. Diagonal dominance = mean diagonal SRCC − mean off-diagonal |SRCC|.

Labels can correlate with each other on the images themselves (blur lowers measured contrast). The
`truth` matrix — the same entries with each label's own values as the scores, over the images that
have both labels — shows how much off-diagonal SRCC a perfect ranker would have, and its dominance
is the most a variant can reach.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np

from rankpipe.adapter.evaluation.evaluate import markdown_table
from rankpipe.adapter.experiments.bench.bootstrap import spearman
from rankpipe.adapter.experiments.bench.runs import RunScores

TRUTH = "truth"


@dataclasses.dataclass(frozen=True)
class QueryMatrix:
    """One variant's SRCC of scores under each query (rows) against each label (columns)."""

    variant: str
    # Labels, both the queries (rows) and the labels (columns), in the same order.
    labels: tuple[str, ...]
    # (Q, Q) SRCC, rows = query, columns = label; NaN where fewer than 2 images have the label.
    srcc: np.ndarray

    @property
    def dominance(self) -> float:
        """Mean diagonal SRCC minus mean off-diagonal |SRCC| (NaN entries left out)."""
        diagonal = np.diag(self.srcc)
        off = np.abs(self.srcc[~np.eye(len(self.labels), dtype=bool)])
        if not np.isfinite(diagonal).any():
            return math.nan
        return float(np.nanmean(diagonal) - (np.nanmean(off) if np.isfinite(off).any() else 0.0))

    def to_dict(self) -> dict:
        return {"variant": self.variant, "labels": list(self.labels), "dominance": _json(self.dominance),
                "srcc": [[_json(v) for v in row] for row in self.srcc]}


def variant_matrix(variant: str, runs: Sequence[RunScores], labels: Mapping[str, np.ndarray]) -> QueryMatrix:
    """The matrix of one variant's runs over the labels every run scored.

    Args:
        variant: its name.
        runs: the variant's runs (one per seed), scoring the same test images.
        labels: label -> (N,) its values on those images (NaN where absent), for every label of the store.
    """
    names = tuple(name for name in labels if all(name in run.scores for run in runs))
    matrix = np.full((len(names), len(names)), np.nan)  # (Q, Q)
    for j, label in enumerate(names):
        has = np.isfinite(labels[label])  # (N,)
        if has.sum() < 2:
            continue
        for i, query in enumerate(names):
            matrix[i, j] = np.mean([spearman(run.scores[query][has], labels[label][has]) for run in runs])
    return QueryMatrix(variant, names, matrix)


def truth_matrix(labels: Mapping[str, np.ndarray], names: Sequence[str]) -> QueryMatrix:
    """The matrix of a perfect ranker: each query scores by its own label, over images with both labels."""
    matrix = np.full((len(names), len(names)), np.nan)  # (Q, Q)
    for i, query in enumerate(names):
        for j, label in enumerate(names):
            both = np.isfinite(labels[query]) & np.isfinite(labels[label])  # (N,)
            if both.sum() >= 2:
                matrix[i, j] = spearman(labels[query][both], labels[label][both])
    return QueryMatrix(TRUTH, tuple(names), matrix)


def matrices_markdown(matrices: Sequence[QueryMatrix], truth: QueryMatrix | None) -> str:
    """The query-matrix section of results.md: the dominance summary, then one matrix per variant."""
    lines = [
        "## Query matrix: does the query steer the ranking?", "",
        "SRCC of the test scores under query q (row) against label l (column), over the images with label l, "
        "mean over seeds. The text steers the ranking when the diagonal dominates; dominance = mean diagonal "
        "SRCC − mean off-diagonal |SRCC|. `truth` scores each query by its own label: the off-diagonal a "
        "perfect ranker would show, since labels can correlate on the images themselves.", "",
    ]
    everything = ([truth] if truth is not None else []) + list(matrices)
    lines += [f"- `{m.variant}`: dominance {_number(m.dominance)} over {len(m.labels)} queries" for m in everything]
    for matrix in everything:
        columns = [f"l{j + 1}" for j in range(len(matrix.labels))]
        cells = [[f"l{i + 1} {query}", *(_number(v) for v in row)] for i, (query, row) in
                 enumerate(zip(matrix.labels, matrix.srcc, strict=True))]
        lines += ["", f"### `{matrix.variant}`", "", markdown_table(["query \\ label", *columns], cells)]
    return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    return "—" if math.isnan(value) else f"{value:+.2f}"


def _json(value: float) -> float | None:
    return None if math.isnan(value) else float(value)
