"""A ranking of images by one or more queries: per-query scores, their combination, the order.

Pure data and arithmetic (numpy); `rankpipe.adapter.rank` fills it and `rankpipe.pipeline.rank_outputs`
writes it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from rankpipe.pipeline.image_inputs import SkippedImage


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

    def order(self) -> np.ndarray:
        """Indices from the highest combined score to the lowest; ties by key, then path. [n] -> [n]."""
        # lexsort sorts by its last key first.
        return np.lexsort((self.paths.astype(str), self.keys.astype(str), -self.combined))

    def ranks(self) -> np.ndarray:
        """[n] int64 rank of each image, 1 = highest combined score."""
        ranks = np.empty(len(self.keys), dtype=np.int64)
        ranks[self.order()] = np.arange(1, len(self.keys) + 1)
        return ranks


def combine_scores(scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Combine per-query scores into one: the weighted sum of each query's z-scores.

    z_q = (s_q - mean(s_q)) / std(s_q) over the ranked images (population std; a query whose scores are
    all equal contributes 0), and combined = sum_q w_q * z_q. The z-score puts queries in different
    units (label units, raw outputs) on one scale. The paper multiplies normalised scores instead; a
    product of z-scores would rank two below-average scores (both negative) above one good and one
    average score, so a sum is used. One query is returned unchanged, keeping its units.

    Args:
        scores: [Q, n] scores of Q queries for n images.
        weights: [Q] weight per query (negative weights rank by the opposite of a query).

    Returns:
        [n] float64 combined scores.
    """
    scores = np.asarray(scores, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    Q, n = scores.shape
    if weights.shape != (Q,):
        raise ValueError(f"need one weight per query: {Q} queries, weights of shape {weights.shape}")
    if Q == 1:
        return scores[0].copy()
    mean = scores.mean(axis=1, keepdims=True)  # [Q, 1]
    std = scores.std(axis=1, keepdims=True)  # [Q, 1]
    safe = np.where(std > 0, std, 1.0)
    z = np.where(std > 0, (scores - mean) / safe, 0.0)  # [Q, n]
    return weights @ z  # [n]
