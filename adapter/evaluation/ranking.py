"""A ranking of images by one or more queries: per-query scores, their combination, the order.

Pure data and arithmetic (numpy); `rankpipe.adapter.evaluation.rank` fills it and `rankpipe.adapter.evaluation.rank_outputs`
writes it.
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

    def order(self) -> np.ndarray:
        """Indices from the highest combined score to the lowest; ties by key, then path. [n] -> [n]."""
        # lexsort sorts by its last key first.
        return np.lexsort((self.paths.astype(str), self.keys.astype(str), -self.combined))

    def ranks(self) -> np.ndarray:
        """[n] int64 rank of each image, 1 = highest combined score."""
        ranks = np.empty(len(self.keys), dtype=np.int64)
        ranks[self.order()] = np.arange(1, len(self.keys) + 1)
        return ranks


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
    if rule not in COMBINE_RULES:
        raise ValueError(f"rule must be one of {COMBINE_RULES}, not {rule!r}")
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
    if rule == "sum":
        return weights @ z  # [n]
    log_sigmoid = -np.logaddexp(0.0, -z)  # [Q, n] log(1 / (1 + e^-z)), stable for any z
    return weights @ log_sigmoid  # [n]
