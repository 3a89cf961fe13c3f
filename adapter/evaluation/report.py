"""The evaluation report: one static HTML page with the metrics table and, per query, a scatter plot of
predicted against true and contact sheets of the top- and bottom-ranked images.

The page is self-contained: index.html plus PNGs in the same folder, linked by relative names, so the
folder can be copied, zipped or served as it is. Plots use matplotlib's Agg canvas directly (no
pyplot state, no display needed).
"""

from __future__ import annotations

import dataclasses
import html
import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from rankpipe.adapter.evaluation.contact_sheet import (
    SheetConfig,
    contact_sheet,
    read_thumbnails,
)
from rankpipe.adapter.evaluation.query_rankings import QueryRanking

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ReportConfig:
    """What the report shows and how large."""

    # Images on each of the top and bottom contact sheets.
    top_k: int = 10
    # Layout of the contact sheets.
    sheet: SheetConfig = SheetConfig()
    # Size of a scatter plot in inches, and its resolution.
    scatter_inches: float = 4.5
    scatter_dpi: int = 100
    # Scatter plots draw at most this many points (a seeded random subset beyond it) to stay readable.
    scatter_max_points: int = 20000

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, not {self.top_k}")
        if self.scatter_inches <= 0 or self.scatter_dpi < 10 or self.scatter_max_points < 1:
            raise ValueError("scatter_inches must be > 0, scatter_dpi >= 10 and scatter_max_points >= 1")


@dataclasses.dataclass(frozen=True)
class ReportSection:
    """One query of the report."""

    # Section heading, e.g. the label name.
    title: str
    # The query's predictions, labels and keys on the evaluated split.
    ranking: QueryRanking
    # One line under the heading, e.g. the headline metrics.
    summary: str = ""
    # Remarks shown with the section (undefined metrics, excluded samples).
    notes: tuple[str, ...] = ()


def write_report(
    out_dir: str | Path,
    title: str,
    table_header: Sequence[str],
    table_rows: Sequence[Sequence[str]],
    sections: Sequence[ReportSection],
    tar_urls: Sequence[str],
    config: ReportConfig = ReportConfig(),
    details: Sequence[tuple[str, str]] = (),
) -> Path:
    """Write index.html and its PNGs into out_dir.

    Args:
        out_dir: the report folder (created; files of an earlier report with the same names are replaced).
        title: page title.
        table_header, table_rows: the metrics table, already formatted as text.
        sections: one per query.
        tar_urls: the tars to read thumbnails from (the store's).
        config: top-k and figure sizes.
        details: (name, value) pairs shown under the title (store, checkpoint, split...).

    Returns:
        The path of index.html.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    picks = [_top_bottom(section.ranking, config.top_k) for section in sections]
    wanted = set()
    for section, (top, bottom) in zip(sections, picks):
        wanted.update(np.asarray(section.ranking.keys, dtype=str)[np.concatenate([top, bottom])])
    thumbs = read_thumbnails(tar_urls, wanted, config.sheet.thumb_px)

    parts = [_head(title), _details(details), "<h2>Metrics</h2>", _table(table_header, table_rows)]
    for i, (section, (top, bottom)) in enumerate(zip(sections, picks)):
        stem = f"{i:02d}-{_slug(section.title)}"
        scatter = f"{stem}-scatter.png"
        _scatter(section.ranking, config).savefig(out_dir / scatter, dpi=config.scatter_dpi)
        bottom_rank = len(section.ranking.keys) - len(bottom) + 1
        sheets = []
        for name, order, first_rank in (("top", top, 1), ("bottom", bottom, bottom_rank)):
            file = f"{stem}-{name}.png"
            _sheet(section.ranking, order, first_rank, thumbs, config.sheet).save(out_dir / file)
            sheets.append((name, file, len(order)))
        parts.append(_section(section, scatter, sheets))
    parts.append("</body>\n</html>\n")
    index = out_dir / "index.html"
    index.write_text("\n".join(parts), encoding="utf-8")
    log.info("report written to %s", index)
    return index


def _top_bottom(ranking: QueryRanking, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the k highest scores (best first) and the k lowest (lowest last)."""
    order = ranking.order()
    k = min(k, len(order))
    return order[:k], order[len(order) - k :]


def _scatter(ranking: QueryRanking, config: ReportConfig) -> Figure:
    true = np.asarray(ranking.labels, dtype=np.float64)
    pred = np.asarray(ranking.scores, dtype=np.float64)
    keep = np.flatnonzero(np.isfinite(true))
    if len(keep) > config.scatter_max_points:
        keep = np.sort(np.random.default_rng(0).choice(keep, config.scatter_max_points, replace=False))
    fig = Figure(figsize=(config.scatter_inches, config.scatter_inches))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.scatter(true[keep], pred[keep], s=8, alpha=0.6, linewidths=0)
    if len(keep):
        lo = float(min(true[keep].min(), pred[keep].min()))
        hi = float(max(true[keep].max(), pred[keep].max()))
        ax.plot([lo, hi], [lo, hi], color="grey", linewidth=0.8, linestyle="--", label="predicted = true")
        ax.legend(loc="upper left", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no labelled samples", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("true")
    ax.set_ylabel("predicted")
    ax.set_title(f"{len(keep)} samples", fontsize=9)
    fig.tight_layout()
    return fig


def _sheet(ranking: QueryRanking, order: np.ndarray, first_rank: int, thumbs: dict, config: SheetConfig):
    """The contact sheet of the images `order` picks, which hold consecutive ranks from `first_rank`."""
    keys = np.asarray(ranking.keys, dtype=str)
    images, captions = [], []
    for rank, i in enumerate(order, start=first_rank):
        label = float(ranking.labels[i])
        images.append(thumbs.get(keys[i]))
        captions.append(
            [f"#{rank}  score {float(ranking.scores[i]):.3g}", f"label {'—' if np.isnan(label) else f'{label:.3g}'}  {keys[i]}"]
        )
    return contact_sheet(images, captions, config)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-")[:40] or "query"


def _head(title: str) -> str:
    t = html.escape(title)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{t}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; max-width: 1100px; }}
table {{ border-collapse: collapse; font-size: 14px; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
th:first-child, td:first-child, th:nth-child(2), td:nth-child(2) {{ text-align: left; }}
img {{ max-width: 100%; border: 1px solid #ddd; }}
.note {{ color: #a33; }}
dt {{ font-weight: bold; float: left; clear: left; width: 9em; }}
dd {{ margin-left: 10em; }}
</style>
</head>
<body>
<h1>{t}</h1>"""


def _details(details: Sequence[tuple[str, str]]) -> str:
    if not details:
        return ""
    rows = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in details)
    return f"<dl>{rows}</dl>"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>{body}</tbody>\n</table>"


def _section(section: ReportSection, scatter: str, sheets: list[tuple[str, str, int]]) -> str:
    out = [f"<h2>{html.escape(section.title)}</h2>", f"<p><em>{html.escape(section.ranking.query)}</em></p>"]
    if section.summary:
        out.append(f"<p>{html.escape(section.summary)}</p>")
    out.extend(f'<p class="note">{html.escape(note)}</p>' for note in section.notes)
    out.append(f'<h3>Predicted against true</h3>\n<img src="{scatter}" alt="scatter plot of predicted against true">')
    for name, file, k in sheets:
        heading = f"Top {k} (highest scores)" if name == "top" else f"Bottom {k} (lowest scores)"
        out.append(f'<h3>{heading}</h3>\n<img src="{file}" alt="{heading}">')
    return "\n".join(out)
