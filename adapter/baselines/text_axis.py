"""Text axis: the zero-shot rank axis from a "high" prompt's text embedding minus a "low" prompt's.

The zero-shot counterpart of the rank axis ("On the rankability of visual embeddings", arXiv
2507.03683): with CLIP's joint embedding, the direction from the text of a low end to the text of a
high end is an axis of the image embedding needing no labelled image. Each image's score is its
unit-normalised embedding projected on that unit direction, then mapped to label units by a
least-squares affine fit on the train split (prompts.fit_affine), as zero-shot's scores are.

The prompts come from the query: "Sort images by X." gives the attribute X (a leading "the" dropped)
for `high_prompt` / `low_prompt`; a counting query ("Sort images by the number of X.", as zero-shot
reads it) gives the category X for `count_high_prompt` / `count_low_prompt`. A query of another form
is used whole (final period dropped) as the attribute.
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
from rankpipe.adapter.baselines.prompts import PromptEncoder
from rankpipe.adapter.baselines.rank_axis import unit_rows
from rankpipe.adapter.baselines.zero_shot import count_category
from rankpipe.templates import check_template

# "Sort images by [the] X." -> X (the ranked attribute).
_SORT_QUERY = re.compile(r"^\s*sort images by\s+(?:the\s+)?(?P<attribute>.+?)\s*\.?\s*$", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class TextAxisConfig:
    """The prompts at the two ends of the axis and the embedding geometry."""

    # Prompt of the high end; {attribute} is replaced by the query's attribute.
    high_prompt: str = "A photo with high {attribute}."
    # Prompt of the low end.
    low_prompt: str = "A photo with low {attribute}."
    # High end of a counting query; {category} is replaced by the counted category.
    count_high_prompt: str = "A photo of many {category}."
    # Low end of a counting query.
    count_low_prompt: str = "A photo of no {category}."
    # Unit-normalise image and text embeddings before the difference and the projection (CLIP's cosine geometry).
    normalize: bool = True

    def __post_init__(self) -> None:
        check_template("high_prompt", self.high_prompt, ("attribute",), required=False)
        check_template("low_prompt", self.low_prompt, ("attribute",), required=False)
        check_template("count_high_prompt", self.count_high_prompt, ("category",), required=False)
        check_template("count_low_prompt", self.count_low_prompt, ("category",), required=False)
        if self.high_prompt == self.low_prompt or self.count_high_prompt == self.count_low_prompt:
            raise ValueError("the high and low prompts must differ, or the axis has no direction")


def query_attribute(query: str) -> str:
    """The attribute a query ranks by: "Sort images by the brightness." -> "brightness"; else the query itself."""
    match = _SORT_QUERY.match(query)
    return match.group("attribute") if match else query.strip().rstrip(".").strip()


def axis_prompts(query: str, config: TextAxisConfig) -> tuple[str, str]:
    """The (high, low) prompts of a query (see the module docstring)."""
    category = count_category(query)
    if category is not None:
        return config.count_high_prompt.format(category=category), config.count_low_prompt.format(category=category)
    attribute = query_attribute(query)
    return config.high_prompt.format(attribute=attribute), config.low_prompt.format(attribute=attribute)


@register_method("text-axis")
class TextAxis(AffineBaseline):
    """Projection on the high-minus-low prompt direction, affinely mapped to label units."""

    config_class = TextAxisConfig

    @classmethod
    def fit(cls, config: TextAxisConfig, data: Sequence[LabelSplits], prompts: PromptEncoder) -> TextAxis:
        params: dict[str, dict[str, Any]] = {}
        for split in data:
            texts = list(axis_prompts(split.query, config))
            embeds = prompts(texts)  # [2, E] float32
            ends = unit_rows(embeds) if config.normalize else embeds.astype(np.float64)
            direction = ends[0] - ends[1]  # [E] high minus low
            params[split.name] = {
                "prompts": texts,
                "prompt_embeds": torch.from_numpy(embeds),
                # A zero direction (a text tower mapping both prompts alike) stays zero: the train mean everywhere.
                "axis": torch.from_numpy(direction / max(float(np.linalg.norm(direction)), np.finfo(float).tiny)),
            }
        baseline = cls(config, params)
        baseline.fit_affine_maps(data)
        return baseline

    def raw_scores(self, label: str, embed: np.ndarray) -> np.ndarray:
        """[n, E] embeddings -> [n] projection on the label's unit text axis."""
        x = unit_rows(embed) if self.config.normalize else np.asarray(embed, dtype=np.float64)
        return x @ self.label_params(label)["axis"].numpy()
