"""Zero-shot CLIP: the cosine between an image and the query, or an expected count for counting queries.

A query of the form "Sort images by the number of X." (case-insensitive, final period optional)
is a counting query with category X: each image's score is the expectation of k under the softmax,
at CLIP's logit scale, of its similarities to the prompts "A photo of {k} X." for k = 0..max_count.
Any other query scores by the plain cosine between image and query embeddings. Either score is then
mapped to label units by a least-squares affine fit on the train split (prompts.fit_affine).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from rankpipe.adapter.baselines import register_method
from rankpipe.adapter.baselines.base import AffineBaseline
from rankpipe.adapter.baselines.data import LabelSplits
from rankpipe.adapter.baselines.prompts import PromptEncoder, cosine, softmax

# "Sort images by the number of X." -> X (the counted category).
_COUNT_QUERY = re.compile(r"^\s*sort images by the number of (?P<category>.+?)\s*\.?\s*$", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class ZeroShotConfig:
    """Prompts and temperature of zero-shot CLIP."""

    # Counting prompt; {count} is replaced by k = 0..max_count and {category} by the query's category.
    count_prompt: str = "A photo of {count} {category}."
    # Largest count prompted (the paper's counting baselines use 0..10).
    max_count: int = 10
    # Multiplies cosines before the softmax over count prompts; trained CLIP models reach 100.
    logit_scale: float = 100.0

    def __post_init__(self) -> None:
        if self.max_count < 1:
            raise ValueError(f"max_count must be >= 1, not {self.max_count}")
        if not self.logit_scale > 0:
            raise ValueError(f"logit_scale must be positive, not {self.logit_scale}")
        if "{count}" not in self.count_prompt or "{category}" not in self.count_prompt:
            raise ValueError(f"count_prompt must contain {{count}} and {{category}}, not {self.count_prompt!r}")


def count_category(query: str) -> str | None:
    """The category a counting query counts ("Sort images by the number of cats." -> "cats"), else None."""
    match = _COUNT_QUERY.match(query)
    return match.group("category") if match else None


def label_prompts(query: str, config: ZeroShotConfig) -> tuple[list[str], list[float]]:
    """The prompts a query is scored against and the value each stands for.

    Returns:
        (prompts, values): the count prompts and counts 0..max_count for a counting query; otherwise
        the query itself with value 1 (the score is then its cosine).
    """
    category = count_category(query)
    if category is None:
        return [query], [1.0]
    counts = list(range(config.max_count + 1))
    return [config.count_prompt.format(count=k, category=category) for k in counts], [float(k) for k in counts]


@register_method("zero-shot")
class ZeroShot(AffineBaseline):
    """Untrained CLIP similarity with the query (or expected count), affinely mapped to label units."""

    config_class = ZeroShotConfig

    @classmethod
    def fit(cls, config: ZeroShotConfig, data: Sequence[LabelSplits], prompts: PromptEncoder) -> ZeroShot:
        params: dict[str, dict[str, Any]] = {}
        for split in data:
            texts, values = label_prompts(split.query, config)
            params[split.name] = {
                "prompts": texts,
                "prompt_embeds": torch.from_numpy(prompts(texts)),  # [K, E] float32
                "values": torch.tensor(values, dtype=torch.float64),  # [K]
            }
        baseline = cls(config, params)
        baseline.fit_affine_maps(data)
        return baseline

    def raw_scores(self, label: str, embed: np.ndarray) -> np.ndarray:
        """[n, E] embeddings -> [n] cosine with the query, or expected count for a counting query."""
        p = self.label_params(label)
        sims = cosine(embed, p["prompt_embeds"].numpy())  # [n, K]
        if sims.shape[1] == 1:
            return sims[:, 0]
        return softmax(self.config.logit_scale * sims) @ p["values"].numpy()  # [n]
