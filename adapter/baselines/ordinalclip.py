"""OrdinalCLIP: a few learned base-rank embeddings, linearly interpolated into the K rank embeddings.

The prompt of rank k is `[SOS] ctx_1 … ctx_M r_k . [EOS]`: the context is learned and shared, and the
rank embedding r_k (one token) is interpolated between the B base-rank embeddings at position
k·(B-1)/(K-1), so neighbouring ranks share their parameters and stay ordered by construction (the
linear interpolation of OrdinalCLIP). Context and base ranks are learned by cross-entropy over the
rank prompts through the frozen text tower.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from rankpipe.adapter.baselines import register_method
from rankpipe.adapter.baselines.prompt_learning import (
    PLACEHOLDER,
    ClassPromptBaseline,
    ClassPrompts,
    FrozenTextTower,
    PromptLearningConfig,
    RankClasses,
    context_template,
    normal_init,
)


@dataclasses.dataclass(frozen=True)
class OrdinalCLIPConfig(PromptLearningConfig):
    """OrdinalCLIP's settings: the shared ones and the number of base ranks."""

    # Learned base-rank embeddings B the K rank embeddings are interpolated from (fewer when K < B).
    base_ranks: int = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.base_ranks < 2:
            raise ValueError(f"base_ranks must be >= 2, not {self.base_ranks}")


def interpolation_weights(num_ranks: int, num_base: int) -> torch.Tensor:
    """[K, B] weights: rank k sits at k·(B-1)/(K-1) between base ranks, linearly interpolated; rows sum to 1."""
    position = torch.linspace(0, num_base - 1, num_ranks, dtype=torch.float64)  # [K]
    low = position.floor().clamp(max=num_base - 2).long()  # [K]
    frac = position - low  # [K] in [0, 1]
    weights = torch.zeros(num_ranks, num_base, dtype=torch.float64)
    weights[torch.arange(num_ranks), low] = 1 - frac
    weights[torch.arange(num_ranks), low + 1] += frac
    return weights.float()


class InterpolatedRankPrompts(ClassPrompts):
    """Learned context, then one interpolated rank token, then '.'."""

    def __init__(self, config: OrdinalCLIPConfig, classes: RankClasses, tower: FrozenTextTower, generator: torch.Generator) -> None:
        super().__init__()
        k = len(classes.values)
        ids = tower.tokenize([context_template(config, f"{PLACEHOLDER}.")] * k)  # [K, L]
        self.register_buffer("ids", ids, persistent=False)
        self.register_buffer("tokens", tower.embed_tokens(ids), persistent=False)  # [K, L, D]
        self.register_buffer("weights", interpolation_weights(k, min(config.base_ranks, k)), persistent=False)  # [K, B]
        # [M, D] the learned context.
        self.context = normal_init((config.context_tokens, tower.width), config.init_std, generator)
        # [B, D] the learned base-rank embeddings.
        self.base = normal_init((self.weights.shape[1], tower.width), config.init_std, generator)

    def forward(self, tower: FrozenTextTower) -> torch.Tensor:
        ranks = (self.weights @ self.base).unsqueeze(1)  # [K, 1, D]
        return tower.encode(self.with_context(self.tokens, ranks), self.ids)  # [K, E]


@register_method("ordinalclip")
class OrdinalCLIP(ClassPromptBaseline):
    """Interpolated rank embeddings with learned context; expectation over the rank prompts."""

    config_class = OrdinalCLIPConfig

    @classmethod
    def build(cls, config: OrdinalCLIPConfig, classes: RankClasses, tower: FrozenTextTower, generator: torch.Generator) -> nn.Module:
        return InterpolatedRankPrompts(config, classes, tower, generator)
