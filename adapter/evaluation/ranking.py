"""A ranking of images by one or more queries: per-query scores, their combination, the order.

Pure data and arithmetic (numpy); `rankpipe.adapter.evaluation.rank` (images) and
`rankpipe.adapter.evaluation.store_rank` (a store) fill it, `rankpipe.adapter.evaluation.rank_outputs`
writes it. Queries are standardised with their mean and standard deviation over the ranked images
before they combine; `ScoreStats` accumulates those block by block, so a collection too large to
hold can be combined in a second pass over its scores.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from rankpipe.pipeline.data.image_inputs import SkippedImage


@dataclasses.dataclass(frozen=True)
class QueryScores:
    """The scores of one query over the ranked images."""

    # The ranking sentence.
    query: str
    # The checkpoint label it was trained as, or None for an unseen query.
    label: str | None
    # [n] scores: label (target) units for a known query, raw adapter outputs for an unseen one.
    scores: np.ndarray

    @property
    def in_label_units(self) -> bool:
        return self.label is not None


@dataclasses.dataclass
class Ranking:
    """Every ranked image with its per-query and combined scores, and the images that were skipped."""

    # [n] relative path (folder) or WebDataset key (tars) of each ranked image.
    keys: np.ndarray
    # [n] the image file, or the tar holding the sample.
    paths: np.ndarray
    # One entry per query, in the order given.
    queries: list[QueryScores]
    # [Q] the weights used for the combined score.
    weights: np.ndarray
    # [n] the combined score (the single query's score when there is one query).
    combined: np.ndarray
    # Images that could not be read, with the reason.
    skipped: list[SkippedImage]
    # The rule that made `combined` from several queries: "product" or "sum" (see combine_scores).
    combine: str
    # [n] the image's original path (the file, or the source recorded in its tar sample; "" when unknown);
    # None when no image has one.
    sources: np.ndarray | None = None
    # [n] each image's rank among all ranked images, when the ranking holds only some of them (the top
    # and bottom of a collection); None when it holds them all and ranks follow from `order`.
    rank_numbers: np.ndarray | None = None

    def order(self) -> np.ndarray:
        """Indices from the highest combined score to the lowest; ties by key, then path. [n] -> [n]."""
        return rank_order(self.combined, self.keys, self.paths)

    def ranks(self) -> np.ndarray:
        """[n] int64 rank of each image, 1 = highest combined score."""
        if self.rank_numbers is not None:
            return np.asarray(self.rank_numbers, dtype=np.int64)
        ranks = np.empty(len(self.keys), dtype=np.int64)
        ranks[self.order()] = np.arange(1, len(self.keys) + 1)
        return ranks

    def source_column(self) -> np.ndarray:
        """[n] str sources, "" where unknown."""
        return np.full(len(self.keys), "", dtype=str) if self.sources is None else np.asarray(self.sources, dtype=str)


def rank_order(combined: np.ndarray, keys: np.ndarray, paths: np.ndarray) -> np.ndarray:
    """Indices from the highest combined score to the lowest; ties by key, then path. [n] -> [n]."""
    # lexsort sorts by its last key first.
    return np.lexsort((np.asarray(paths).astype(str), np.asarray(keys).astype(str), -np.asarray(combined)))


COMBINE_RULES = ("product", "sum")


def combine_scores(scores: np.ndarray, weights: np.ndarray, rule: str = "product") -> np.ndarray:
    """Combine per-query scores into one, after putting each query on a common scale.

    Each query's scores are first standardised over the ranked images, z_q = (s_q - mean) / std
    (population std; a query whose scores are all equal gets z = 0), so queries in different units
    (label units, raw outputs) become comparable. Then:
      - "product" (the paper's appendix E: normalise, then multiply): each z is squashed into (0, 1)
        with the logistic function and the weighted product prod_q sigmoid(z_q)^w_q is taken, computed
        as sum_q w_q * log sigmoid(z_q). The squashing keeps every factor positive, so two
        below-average scores never multiply into a high one.
      - "sum": the weighted sum sum_q w_q * z_q.
    One query is returned unchanged, keeping its units.

    Args:
        scores: [Q, n] scores of Q queries for n images.
        weights: [Q] weight per query (a negative weight ranks by the opposite of its query).
        rule: "product" or "sum".

    Returns:
        [n] float64 combined scores (for "product", the log of the product).
    """
    scores = np.asarray(scores, dtype=np.float64)
    return combine_standardised(scores, scores.mean(axis=1), scores.std(axis=1), weights, rule)


def combine_standardised(scores: np.ndarray, mean: np.ndarray, std: np.ndarray, weights: np.ndarray,
                         rule: str = "product") -> np.ndarray:
    """`combine_scores` with each query's mean and (population) standard deviation given.

    The mean and std are those of all ranked images, so a collection can be combined block by block
    (`ScoreStats` accumulates them).

    Args:
        scores: [Q, n] scores of Q queries for n images (some or all of the ranked ones).
        mean: [Q] each query's mean over all ranked images.
        std: [Q] each query's population standard deviation over all ranked images.
        weights: [Q] weight per query.
        rule: "product" or "sum".

    Returns:
        [n] float64 combined scores; with one query, its scores unchanged.
    """
    if rule not in COMBINE_RULES:
        raise ValueError(f"rule must be one of {COMBINE_RULES}, not {rule!r}")
    scores = np.asarray(scores, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    Q, n = scores.shape
    if weights.shape != (Q,):
        raise ValueError(f"need one weight per query: {Q} queries, weights of shape {weights.shape}")
    if Q == 1:
        return scores[0].copy()
    mean = np.asarray(mean, dtype=np.float64)[:, None]  # [Q, 1]
    std = np.asarray(std, dtype=np.float64)[:, None]  # [Q, 1]
    safe = np.where(std > 0, std, 1.0)
    z = np.where(std > 0, (scores - mean) / safe, 0.0)  # [Q, n]
    if rule == "sum":
        return weights @ z  # [n]
    log_sigmoid = -np.logaddexp(0.0, -z)  # [Q, n] log(1 / (1 + e^-z)), stable for any z
    return weights @ log_sigmoid  # [n]


class ScoreStats:
    """Each query's count, mean and population standard deviation, accumulated block by block.

    Blocks merge with Chan et al.'s pairwise update of (count, mean, sum of squared deviations), which
    stays accurate over millions of images where a running sum of squares would not. Adding the same
    blocks in the same order gives the same bits.
    """

    def __init__(self, num_queries: int) -> None:
        self.count = 0
        self.mean = np.zeros(num_queries)  # [Q]
        self.m2 = np.zeros(num_queries)  # [Q] sum of squared deviations from the mean

    def add(self, scores: np.ndarray) -> None:
        """Fold in a block of [Q, n] scores."""
        scores = np.asarray(scores, dtype=np.float64)
        n = scores.shape[1]
        if n == 0:
            return
        block_mean = scores.mean(axis=1)  # [Q]
        block_m2 = ((scores - block_mean[:, None]) ** 2).sum(axis=1)  # [Q]
        total = self.count + n
        delta = block_mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + block_m2 + delta**2 * (self.count * n / total)
        self.count = total

    @property
    def std(self) -> np.ndarray:
        """[Q] population standard deviation (0 before any score)."""
        return np.sqrt(self.m2 / self.count) if self.count else np.zeros_like(self.m2)
