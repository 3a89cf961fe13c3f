"""Merging a store ranking's block scores into one `Ranking`: every image, or only both ends of the order.

Two passes over the block files, one block in memory at a time. The first accumulates each query's
mean and standard deviation over all ranked images (`ScoreStats`), which the combination needs.
The second combines each block's scores with them and either keeps every row (for a ranking file)
or keeps only the best and worst `keep` rows seen so far, merged block by block under the same
total order as `Ranking.order` (combined score, then key, then tar). The kept rows then carry their
rank among all images, so the printed table and the contact sheets number them as a full ranking
would, without holding a score per image.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from rankpipe.adapter.evaluation.rankers import Query
from rankpipe.adapter.evaluation.ranking import QueryScores, Ranking, ScoreStats, combine_standardised, rank_order
from rankpipe.adapter.evaluation.score_folder import ScoreFolder
from rankpipe.errors import InputError
from rankpipe.pipeline.data.image_inputs import SkippedImage
from rankpipe.pipeline.store import TokenStore


@dataclasses.dataclass
class _Rows:
    """Rows of the ranking being built, as parallel columns."""

    rows: np.ndarray  # [n] int64 store rows
    keys: np.ndarray  # [n] str
    paths: np.ndarray  # [n] str: the tar
    sources: np.ndarray  # [n] str
    scores: np.ndarray  # [n, Q] per-query scores
    combined: np.ndarray  # [n]

    def take(self, index: np.ndarray) -> _Rows:
        return _Rows(*(getattr(self, f.name)[index] for f in dataclasses.fields(self)))

    @classmethod
    def concat(cls, parts: Sequence[_Rows]) -> _Rows:
        return cls(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(cls)))


def merge_blocks(store: TokenStore, folder: ScoreFolder, queries: Sequence[Query], weights: np.ndarray, rule: str,
                 keep: int | None = None) -> tuple[Ranking, int, int]:
    """The ranking of every block's scores in `folder`.

    Args:
        store: the ranked store.
        folder: every block's scores, one column per query.
        queries: the queries, in the order of the score columns.
        weights: [Q] their weights.
        rule: how several queries combine ("product" or "sum").
        keep: keep only the `keep` best and `keep` worst images (ranks among all images are kept
            with them); None keeps every image and lists the invalid rows as skipped.

    Returns:
        The ranking, the number of images ranked, and the number of invalid rows (samples of the tars
        that hold no image).

    Raises:
        InputError: the store has no valid image.
    """
    blocks = range(len(store.blocks))
    stats = ScoreStats(len(queries))
    for b in blocks:
        stats.add(folder.read(b)[1].T)  # [Q, n]
    if stats.count == 0:
        raise InputError(f"store {store.path} has no valid image to rank; check image/error for why")
    invalid = sum(block.count for block in store.blocks) - stats.count
    parts, best = [], None
    for b in blocks:
        block = _block_rows(store, folder, b, stats, weights, rule)
        if keep is None:
            parts.append(block)
        else:
            best = _ends(block if best is None else _Rows.concat([best, block]), keep)
    held = _Rows.concat(parts) if keep is None else best
    rank_numbers = None if keep is None else _rank_numbers(held, keep, stats.count)
    ranking = Ranking(
        keys=held.keys, paths=held.paths,
        queries=[QueryScores(q.sentence, q.label, held.scores[:, i]) for i, q in enumerate(queries)],
        weights=np.asarray(weights, dtype=np.float64), combined=held.combined,
        skipped=_invalid_rows(store) if keep is None else [], combine=rule,
        sources=held.sources, rank_numbers=rank_numbers,
    )
    return ranking, stats.count, invalid


def _block_rows(store: TokenStore, folder: ScoreFolder, b: int, stats: ScoreStats, weights: np.ndarray,
                rule: str) -> _Rows:
    """One block's rows with their keys, sources and combined scores."""
    rows, scores = folder.read(b)  # [n], [n, Q]
    block = store.blocks[b]
    span = slice(block.row_start, block.row_start + block.count)
    local = rows - block.row_start
    return _Rows(
        rows=rows, keys=store.keys(span)[local], paths=np.full(len(rows), block.url),
        sources=store.sources(span)[local], scores=scores,
        combined=combine_standardised(scores.T, stats.mean, stats.std, weights, rule),  # [n]
    )


def _ends(held: _Rows, keep: int) -> _Rows:
    """The `keep` best and `keep` worst of `held`, in rank order (all of them when that is no fewer)."""
    order = rank_order(held.combined, held.keys, held.paths)
    if len(order) > 2 * keep:
        order = np.concatenate([order[:keep], order[-keep:]])
    return held.take(order)


def _rank_numbers(held: _Rows, keep: int, total: int) -> np.ndarray:
    """[n] ranks among all `total` images of the rows `_ends` kept (in rank order)."""
    if len(held.rows) == total:
        return np.arange(1, total + 1)
    return np.concatenate([np.arange(1, keep + 1), np.arange(total - keep + 1, total + 1)])


def _invalid_rows(store: TokenStore) -> list[SkippedImage]:
    """Every sample of the store's tars that holds no image, with the reason."""
    skipped = []
    for block in store.blocks:
        span = slice(block.row_start, block.row_start + block.count)
        valid = store.valid(span)
        if valid.all():
            continue
        keys, errors = store.keys(span), store.errors(span)
        skipped += [SkippedImage(str(keys[i]), block.url, str(errors[i])) for i in np.flatnonzero(~valid)]
    return skipped
