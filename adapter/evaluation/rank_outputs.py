"""What `rankpipe rank` hands back: the printed table, a CSV or JSONL file, and contact sheets.

A ranking file holds one row per image: the ranked ones in rank order, then the skipped ones with
an empty rank and score and the reason in `error`, so the file accounts for every image found.
CSV columns are `FIXED_COLUMNS` with one `score[<query>]` column per query inserted before `error`;
a JSONL record has the same fields with the per-query scores as one object {query: score}. Files
are written to a temporary name and renamed, so a failed write never leaves half a file.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from rankpipe.adapter.evaluation.contact_sheet import (
    SheetConfig,
    contact_sheet,
    read_thumbnails,
    thumbnail,
)
from rankpipe.adapter.evaluation.ranking import Ranking
from rankpipe.errors import InputError
from rankpipe.files import atomic_target

log = logging.getLogger(__name__)

# rank (1 = best; empty when skipped), key, path (file or tar), combined score, why it was skipped.
FIXED_COLUMNS = ("rank", "key", "path", "score", "error")


def ranking_format(path: str | Path) -> str:
    """"csv" or "jsonl" from the file's suffix.

    Raises:
        InputError: any other suffix.
    """
    suffix = Path(path).suffix.lower()
    if suffix not in _WRITERS:
        raise InputError(f"cannot write rankings to {path}: use a file name ending in {', '.join(_WRITERS)}")
    return suffix[1:]


def write_ranking(path: str | Path, ranking: Ranking) -> Path:
    """Write every image of `ranking` (ranked, then skipped) as CSV or JSONL, chosen by the suffix."""
    path = Path(path)
    writer = _WRITERS[f".{ranking_format(path)}"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_target(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        writer(f, ranking)
    return path


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
    """The `top` best images as an aligned text table: rank, score, key, path."""
    rows = [("rank", "score", "key", "path")]
    rows += [(str(rank), f"{ranking.combined[i]:.4g}", str(ranking.keys[i]), str(ranking.paths[i]))
             for rank, i in enumerate(ranking.order()[:top], start=1)]
    widths = [max(len(row[c]) for row in rows) for c in range(3)]
    return "\n".join(
        f"{row[0]:>{widths[0]}}  {row[1]:>{widths[1]}}  {row[2]:<{widths[2]}}  {row[3]}".rstrip() for row in rows
    )


def write_contact_sheets(out_dir: str | Path, ranking: Ranking, k: int, config: SheetConfig = SheetConfig()) -> list[Path]:
    """top.png and bottom.png: the k highest and k lowest combined scores, with rank, score and key.

    Thumbnails are read from the image files, or found by key in the tars the images came from.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    order = ranking.order()
    k = min(k, len(order))
    top, bottom = order[:k], order[len(order) - k:]
    wanted = np.concatenate([top, bottom])
    thumbs = _thumbnails(ranking, wanted, config.thumb_px)
    written = []
    for name, rows, first_rank in (("top", top, 1), ("bottom", bottom, len(order) - k + 1)):
        images = [thumbs.get(int(i)) for i in rows]
        captions = [[f"#{rank}  score {ranking.combined[i]:.3g}", str(ranking.keys[i])]
                    for rank, i in enumerate(rows, start=first_rank)]
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


def _records(ranking: Ranking) -> Iterator[dict]:
    """One dict per image: ranked ones in rank order, then skipped ones (rank and scores None)."""
    for rank, i in enumerate(ranking.order(), start=1):
        yield {
            "rank": rank, "key": str(ranking.keys[i]), "path": str(ranking.paths[i]),
            "score": float(ranking.combined[i]),
            "scores": {q.query: float(q.scores[i]) for q in ranking.queries},
            "error": "",
        }
    for skipped in ranking.skipped:
        yield {
            "rank": None, "key": skipped.key, "path": skipped.path, "score": None,
            "scores": {q.query: None for q in ranking.queries}, "error": skipped.reason,
        }


def _number(value: float | int | None) -> str:
    # repr of a Python float is the shortest text that reads back to the same float.
    return "" if value is None else repr(value)


def _write_csv(f: io.TextIOBase, ranking: Ranking) -> None:
    writer = csv.writer(f)
    query_columns = [f"score[{q.query}]" for q in ranking.queries]
    writer.writerow([*FIXED_COLUMNS[:-1], *query_columns, FIXED_COLUMNS[-1]])
    for r in _records(ranking):
        writer.writerow([_number(r["rank"]), r["key"], r["path"], _number(r["score"]),
                         *(_number(v) for v in r["scores"].values()), r["error"]])


def _write_jsonl(f: io.TextIOBase, ranking: Ranking) -> None:
    for record in _records(ranking):
        f.write(json.dumps(record, ensure_ascii=False) + "\n")


_WRITERS: dict[str, Callable[[io.TextIOBase, Ranking], None]] = {".csv": _write_csv, ".jsonl": _write_jsonl}
