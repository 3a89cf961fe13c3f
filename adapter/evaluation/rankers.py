"""Rankers: everything that scores images, the adapter and every baseline alike.

A ranker is loaded from a checkpoint and asked for the scores of a batch of cached features under
one or more queries. It says which of the cached features it reads (`reads`): the adapter scores
patch tokens, a baseline the pooled image embedding. Callers (`predict`, `rank`, `eval`, the bench)
hand it that array and never ask which kind of ranker they hold.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Sequence
from typing import ClassVar, Literal

import numpy as np
import torch

from rankpipe.adapter import ADAPTER_METHOD
from rankpipe.adapter.baselines import Baseline
from rankpipe.adapter.model.adapter import RankingAdapter, score_batches
from rankpipe.adapter.training.targets import TargetScale
from rankpipe.errors import InputError

# The cached features a ranker scores: "tokens" = [n, P, D] patch tokens (the store's image/tokens),
# "embed" = [n, E] pooled, projected image embeddings (the store's image/embed).
FeatureKind = Literal["tokens", "embed"]


@dataclasses.dataclass(frozen=True)
class Query:
    """One query as a ranker scores it."""

    # The ranking sentence.
    sentence: str
    # The checkpoint label whose query this is; None for a sentence the ranker was not trained on.
    label: str | None
    # [L, Dt] float32 text tokens up to and including end-of-text, on the ranker's device; None for a
    # baseline, which keeps what it needs of the query in its own parameters.
    text_tokens: torch.Tensor | None
    # The label's training normalisation, mapping the adapter's outputs to label units; None for an
    # unseen query (its scores stay raw) and for a baseline (it predicts target units itself).
    scale: TargetScale | None


class Ranker(abc.ABC):
    """Scores batches of cached image features under queries."""

    # "adapter" or the baseline's method name.
    method: str
    # Which cached features `score` takes.
    reads: ClassVar[FeatureKind]

    @abc.abstractmethod
    def query(self, sentence: str, label: str, text_tokens: torch.Tensor | None, scale: TargetScale) -> Query:
        """A query the ranker was trained on, from the checkpoint's record of it."""

    def unseen_query(self, sentence: str, text_tokens: torch.Tensor) -> Query:
        """A sentence the ranker was not trained on, with its [L, Dt] text tokens.

        Raises:
            InputError: the ranker cannot score sentences it was not fitted on.
        """
        raise InputError(f"a {self.method} baseline scores only the queries it was fitted on, not {sentence!r}")

    @abc.abstractmethod
    def score(self, features: torch.Tensor, queries: Sequence[Query]) -> list[np.ndarray]:
        """[b] float64 scores of a batch per query.

        Args:
            features: [b, P, D] patch tokens or [b, E] pooled embeddings (as `reads` says), float16 as
                the store keeps them, on any device.
            queries: from `query` or `unseen_query`.

        Returns:
            One [b] array per query: label units for a trained query ("distance" targets in target
            units), raw scores for an unseen one.
        """


class AdapterRanker(Ranker):
    """The ranking adapter: its regression head over patch tokens, mapped back through each query's
    training normalisation (the pairwise branch is not needed to score)."""

    method = ADAPTER_METHOD
    reads = "tokens"

    def __init__(self, model: RankingAdapter, device: torch.device) -> None:
        self.model = model
        self.device = device

    def query(self, sentence: str, label: str, text_tokens: torch.Tensor | None, scale: TargetScale) -> Query:
        return Query(sentence, label, text_tokens, scale)

    def unseen_query(self, sentence: str, text_tokens: torch.Tensor) -> Query:
        return Query(sentence, None, text_tokens, None)

    def score(self, features: torch.Tensor, queries: Sequence[Query]) -> list[np.ndarray]:
        out = []
        for q in queries:
            raw = score_batches(self.model, q.text_tokens, [features], self.device)  # [b] normalised units
            out.append(q.scale.to_target_units(raw) if q.scale is not None else raw)
        return out


class BaselineRanker(Ranker):
    """A fitted baseline: per-label parameters over the pooled image embedding, predicting target units."""

    reads = "embed"

    def __init__(self, method: str, baseline: Baseline) -> None:
        self.method = method
        self.baseline = baseline

    def query(self, sentence: str, label: str, text_tokens: torch.Tensor | None, scale: TargetScale) -> Query:
        return Query(sentence, label, None, None)

    def score(self, features: torch.Tensor, queries: Sequence[Query]) -> list[np.ndarray]:
        embed = features.float().cpu().numpy()  # [b, E]
        return [self.baseline.predict(q.label, embed) for q in queries]
