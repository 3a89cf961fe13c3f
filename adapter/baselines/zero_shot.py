"""Zero-shot CLIP: an expected class for ordinal labels with named classes, an expected count for
counting queries, else the cosine between an image and the query.

- An ordinal label whose manifest names its classes (Adience's age groups, HCI's decades) is scored as
  a classification, as the published zero-shot rows: one prompt per class (the label's `class_prompt`
  with the class name, e.g. "A photo taken in the 1950s."), and the score is the expectation of the
  class values under the softmax, at CLIP's logit scale, of the image's similarities to those prompts.
  That is already in label units: no affine map.
- A query of the form "Sort images by the number of X." (case-insensitive, final period optional) is
  a counting query with category X: the expectation of k under the softmax of the similarities to
  the prompts "A photo of {k} X." for k = 0..max_count.
- Any other query scores by the plain cosine between image and query embeddings.

The last two are mapped to label units by a least-squares affine fit on the train split
(prompts.fit_affine).
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
from rankpipe.templates import check_template

# "Sort images by the number of X." -> X (the counted category).
_COUNT_QUERY = re.compile(r"^\s*sort images by the number of (?P<category>.+?)\s*\.?\s*$", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class ZeroShotConfig:
    """Prompts and temperature of zero-shot CLIP."""

    # Counting prompt; {count} is replaced by k = 0..max_count and {category} by the query's category.
    count_prompt: str = "A photo of {count} {category}."
    # Largest count prompted (the paper's counting baselines use 0..10).
    max_count: int = 10
    # Class prompt of an ordinal label with class names but no `class_prompt` in its manifest.
    class_prompt: str = "A photo of {name}."
    # Multiplies cosines before the softmax over count or class prompts; trained CLIP models reach 100.
    logit_scale: float = 100.0

    def __post_init__(self) -> None:
        if self.max_count < 1:
            raise ValueError(f"max_count must be >= 1, not {self.max_count}")
        if not self.logit_scale > 0:
            raise ValueError(f"logit_scale must be positive, not {self.logit_scale}")
        check_template("count_prompt", self.count_prompt, ("count", "category"))
        check_template("class_prompt", self.class_prompt, ("name",))


def count_category(query: str) -> str | None:
    """The category a counting query counts ("Sort images by the number of cats." -> "cats"), else None."""
    match = _COUNT_QUERY.match(query)
    return match.group("category") if match else None


def class_prompts(split: LabelSplits, config: ZeroShotConfig) -> tuple[list[str], list[float]] | None:
    """One prompt per class of an ordinal label with named classes, and each class's value; else None."""
    named = split.named_classes()
    if named is None:
        return None
    values, names = named
    template = split.class_prompt or config.class_prompt
    return [template.format(name=name) for name in names], [float(v) for v in values]


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
    """Untrained CLIP: expected class (label units), or similarity with the query or expected count
    affinely mapped to label units."""

    config_class = ZeroShotConfig

    @classmethod
    def fit(cls, config: ZeroShotConfig, data: Sequence[LabelSplits], prompts: PromptEncoder) -> ZeroShot:
        params: dict[str, dict[str, Any]] = {}
        need_affine = []
        for split in data:
            by_class = class_prompts(split, config)
            texts, values = by_class or label_prompts(split.query, config)
            params[split.name] = {
                "prompts": texts,
                "prompt_embeds": torch.from_numpy(prompts(texts)),  # [K, E] float32
                "values": torch.tensor(values, dtype=torch.float64),  # [K]
            }
            if by_class is None:
                need_affine.append(split)
            else:
                # The expected class value is a prediction in label units already.
                params[split.name].update(slope=1.0, intercept=0.0)
        baseline = cls(config, params)
        baseline.fit_affine_maps(need_affine)
        return baseline

    def raw_scores(self, label: str, embed: np.ndarray) -> np.ndarray:
        """[n, E] embeddings -> [n] cosine with the query, or expected count or class value."""
        p = self.label_params(label)
        sims = cosine(embed, p["prompt_embeds"].numpy())  # [n, K]
        if sims.shape[1] == 1:
            return sims[:, 0]
        return softmax(self.config.logit_scale * sims) @ p["values"].numpy()  # [n]
