"""CLIP-IQA: the softmax probability of the positive prompt of an antonym pair chosen by the query.

As CLIP-IQA does, each image is compared with two antonym prompts ("Good photo." / "Bad photo.")
and its score is the softmax probability of the first at CLIP's logit scale. The pair is picked by
the query's words: the first row of ANTONYM_PAIRS sharing a word with the query (lower-cased, split
on anything that is not a letter); a query matching none uses the quality pair. The positive prompt
is the one that should grow with the label. The score is then mapped to label units by a
least-squares affine fit on the train split (prompts.fit_affine).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from rankpipe.adapter.baselines import register_method
from rankpipe.adapter.baselines.base import AffineBaseline
from rankpipe.adapter.baselines.data import LabelSplits
from rankpipe.adapter.baselines.prompts import PromptEncoder, cosine, softmax

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class AntonymPair:
    """Two opposite prompts and the query words that select them."""

    # Query words (lower case) that select this pair.
    words: frozenset[str]
    # The prompt whose probability should grow with the label.
    positive: str
    # Its antonym.
    negative: str


# First match wins, so the specific attributes come before the generic quality pair
# ("the image quality of colorfulness" picks the colourfulness pair).
ANTONYM_PAIRS: tuple[AntonymPair, ...] = (
    AntonymPair(frozenset({"colorful", "colourful", "colorfulness", "colourfulness", "saturation"}), "Colorful photo.", "Dull photo."),
    AntonymPair(frozenset({"contrast"}), "High contrast photo.", "Low contrast photo."),
    AntonymPair(frozenset({"bright", "brightness"}), "Bright photo.", "Dark photo."),
    AntonymPair(frozenset({"sharp", "sharpness"}), "Sharp photo.", "Blurry photo."),
    AntonymPair(frozenset({"blur", "blurry", "blurriness"}), "Blurry photo.", "Sharp photo."),
    AntonymPair(frozenset({"noise", "noisy", "noisiness"}), "Noisy photo.", "Clean photo."),
    AntonymPair(frozenset({"quality", "good", "aesthetic", "aesthetics"}), "Good photo.", "Bad photo."),
)
QUALITY_PAIR = ANTONYM_PAIRS[-1]


def antonym_pair(query: str) -> AntonymPair:
    """The pair a query selects (see the module docstring); the quality pair when none matches."""
    words = set(re.findall(r"[a-z]+", query.lower()))
    for pair in ANTONYM_PAIRS:
        if pair.words & words:
            return pair
    log.info("query %r names none of CLIP-IQA's attributes; using the quality pair", query)
    return QUALITY_PAIR


@dataclasses.dataclass(frozen=True)
class ClipIqaConfig:
    """Temperature of CLIP-IQA's softmax."""

    # Multiplies cosines before the softmax over the pair (CLIP's trained logit scale, 100).
    logit_scale: float = 100.0

    def __post_init__(self) -> None:
        if not self.logit_scale > 0:
            raise ValueError(f"logit_scale must be positive, not {self.logit_scale}")


@register_method("clip-iqa")
class ClipIqa(AffineBaseline):
    """Untrained antonym-pair probability, affinely mapped to label units."""

    config_class = ClipIqaConfig

    @classmethod
    def fit(cls, config: ClipIqaConfig, data: Sequence[LabelSplits], prompts: PromptEncoder) -> ClipIqa:
        params: dict[str, dict[str, Any]] = {}
        for split in data:
            pair = antonym_pair(split.query)
            texts = [pair.positive, pair.negative]
            params[split.name] = {"prompts": texts, "prompt_embeds": torch.from_numpy(prompts(texts))}  # [2, E]
        baseline = cls(config, params)
        baseline.fit_affine_maps(data)
        return baseline

    def raw_scores(self, label: str, embed: np.ndarray) -> np.ndarray:
        """[n, E] embeddings -> [n] probability of the positive prompt."""
        p = self.label_params(label)
        sims = cosine(embed, p["prompt_embeds"].numpy())  # [n, 2]
        return softmax(self.config.logit_scale * sims)[:, 0]
