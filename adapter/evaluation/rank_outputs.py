"""What `rankpipe rank` hands back: the printed table, a ranking file, and contact sheets.

A ranking file holds one row per image: the ranked ones in rank order, then the skipped ones with
an empty rank and score and the reason in `error`, so the file accounts for every image found.
Columns: rank, key, path, source, score, one `score[<query>]` per query, error; a JSONL record has
the same fields with the per-query scores as one object {query: score}. Files are written through
the export stack (rankpipe.adapter.evaluation.exports), in any of its formats.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image

from rankpipe.adapter.evaluation.contact_sheet import (
    SheetConfig,
    contact_sheet,
    read_thumbnails,
    thumbnail,
)
from rankpipe.adapter.evaluation.exports import Table, write_table
from rankpipe.adapter.evaluation.ranking import Ranking

log = logging.getLogger(__name__)

# rank (1 = best; empty when skipped), key, path (file or tar), source (original path), combined score,
# why it was skipped.
FIXED_COLUMNS = ("rank", "key", "path", "source", "score", "error")
# The table's kind: the `format` attribute of its HDF5 files.
KIND = "rankpipe-rank"


def ranking_table(ranking: Ranking) -> Table:
    """Every image of `ranking` as a table: ranked ones in rank order, then skipped ones.

    Columns: rank, key, path, source, score, one `score[<query>]` per query, error. A JSONL record
    gathers the per-query scores into one object {query: score}.
    """
    order = ranking.order()
    n, skipped = len(order), ranking.skipped
    query_columns = {f"score[{q.query}]": q for q in ranking.queries}
    columns = {
        "rank": np.concatenate([ranking.ranks()[order], np.zeros(len(skipped), dtype=np.int64)]).astype(np.int64),
        "key": np.array([*ranking.keys[order].tolist(), *(s.key for s in skipped)], dtype=str),
        "path": np.array([*ranking.paths[order].tolist(), *(s.path for s in skipped)], dtype=str),
        "source": np.array([*ranking.source_column()[order].tolist(), *("" for _ in skipped)], dtype=str),
        "score": np.concatenate([ranking.combined[order], np.full(len(skipped), np.nan)]),
        **{name: np.concatenate([q.scores[order], np.full(len(skipped), np.nan)]) for name, q in query_columns.items()},
        "error": np.array([""] * n + [s.reason for s in skipped], dtype=str),
    }
    missing = {"rank": np.arange(n + len(skipped)) >= n}
    return Table(KIND, columns, missing, {"scores": {name: q.query for name, q in query_columns.items()}})


def write_ranking(path: str | Path, ranking: Ranking) -> Path:
    """Write every image of `ranking` (ranked, then skipped) in the export format chosen by the suffix."""
    return write_table(path, ranking_table(ranking))


def query_lines(ranking: Ranking) -> list[str]:
    """One line per query: its weight and the units of its scores."""
    lines = []
    several = len(ranking.queries) > 1
    for i, (q, weight) in enumerate(zip(ranking.queries, ranking.weights), start=1):
        units = (f"label units of '{q.label}'" if q.in_label_units
                 else "raw adapter scores: the checkpoint was not trained on this query, so no normalisation is known")
        weight_text = f", weight {weight:g}" if several else ""
        lines.append(f"query {i}: {q.query!r}{weight_text} ({units})")
    if several:
        lines.append(_COMBINE_LINES[ranking.combine])
    return lines


# How the terminal explains each rule of `combine_scores`.
_COMBINE_LINES = {
    "product": "score = sum over queries of weight x log sigmoid(z-score), the log of the weighted product "
               "(each query's scores standardised over the ranked images)",
    "sum": "score = sum over queries of weight x z-score (each query's scores standardised over the ranked images)",
}


def format_table(ranking: Ranking, top: int) -> str:
    """The `top` best images as an aligned text table: rank, score, key, image (its source, else its path)."""
    ranks, sources = ranking.ranks(), ranking.source_column()
    rows = [("rank", "score", "key", "image")]
    rows += [(str(ranks[i]), f"{ranking.combined[i]:.4g}", str(ranking.keys[i]), str(sources[i] or ranking.paths[i]))
             for i in ranking.order()[:top]]
    widths = [max(len(row[c]) for row in rows) for c in range(3)]
    return "\n".join(
        f"{row[0]:>{widths[0]}}  {row[1]:>{widths[1]}}  {row[2]:<{widths[2]}}  {row[3]}".rstrip() for row in rows
    )


def write_contact_sheets(out_dir: str | Path, ranking: Ranking, k: int, config: SheetConfig = SheetConfig()) -> list[Path]:
    """top.png and bottom.png: the k highest and k lowest combined scores, with rank, score and key.

    Thumbnails are read from the image files, or found by key in the tars the images came from (the
    tars a store records, for a ranked store).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    order, ranks = ranking.order(), ranking.ranks()
    k = min(k, len(order))
    top, bottom = order[:k], order[len(order) - k:]
    wanted = np.concatenate([top, bottom])
    thumbs = _thumbnails(ranking, wanted, config.thumb_px)
    written = []
    for name, rows in (("top", top), ("bottom", bottom)):
        images = [thumbs.get(int(i)) for i in rows]
        captions = [[f"#{ranks[i]}  score {ranking.combined[i]:.3g}", str(ranking.keys[i])] for i in rows]
        path = out_dir / f"{name}.png"
        contact_sheet(images, captions, config).save(path)
        written.append(path)
    return written


def _thumbnails(ranking: Ranking, rows: np.ndarray, max_px: int) -> dict[int, Image.Image]:
    """Thumbnail per row index; rows whose image cannot be found are left out (drawn as placeholders)."""
    out: dict[int, Image.Image] = {}
    # A ranked image's path is its file, or for a tar sample the tar (image files never end in .tar).
    in_tars = [int(i) for i in rows if str(ranking.paths[i]).endswith(".tar")]
    if in_tars:
        urls = list(dict.fromkeys(str(ranking.paths[i]) for i in in_tars))
        by_key = read_thumbnails(urls, {str(ranking.keys[i]) for i in in_tars}, max_px)
        out.update({i: by_key[str(ranking.keys[i])] for i in in_tars if str(ranking.keys[i]) in by_key})
    for i in rows:
        i = int(i)
        if i in out or i in in_tars:
            continue
        try:
            with Image.open(ranking.paths[i]) as image:
                out[i] = thumbnail(image, max_px)
        except OSError as e:
            log.warning("cannot make a thumbnail of %s: %s", ranking.paths[i], e)
    return out
