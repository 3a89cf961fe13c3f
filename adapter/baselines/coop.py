"""CoOp: M learned context vectors shared by all classes, followed by each class's name.

The prompt of class k is `[SOS] ctx_1 … ctx_M <name_k> . [EOS]` in the text tower's token-embedding
space (CoOp's default: one generic context, the class name at the end, M = 16 context vectors drawn
from N(0, 0.02²)), where the name is the manifest's class name or else the class value written out
(prompt_learning.rank_classes); only the context vectors are learned, through the frozen text
tower, by cross-entropy over the class prompts.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from rankpipe.adapter.baselines import register_method
from rankpipe.adapter.baselines.prompt_learning import (
    ClassPromptBaseline,
    ClassPrompts,
    FrozenTextTower,
    PromptLearningConfig,
    RankClasses,
    context_template,
    normal_init,
)


@dataclasses.dataclass(frozen=True)
class CoOpConfig(PromptLearningConfig):
    """CoOp's settings: the shared prompt-learning ones, with CoOp's context length."""

    # Learned context tokens M (the CoOp paper's and code's default 16).
    context_tokens: int = 16


class ContextPrompts(ClassPrompts):
    """Learned context in front of fixed class-name tokens."""

    def __init__(self, config: CoOpConfig, classes: RankClasses, tower: FrozenTextTower, generator: torch.Generator) -> None:
        super().__init__()
        ids = tower.tokenize([context_template(config, f"{name}.") for name in classes.names])  # [K, L]
        self.register_buffer("ids", ids, persistent=False)
        self.register_buffer("tokens", tower.embed_tokens(ids), persistent=False)  # [K, L, D]
        # [M, D] the learned context, shared by every class.
        self.context = normal_init((config.context_tokens, tower.width), config.init_std, generator)

    def forward(self, tower: FrozenTextTower) -> torch.Tensor:
        return tower.encode(self.with_context(self.tokens), self.ids)  # [K, E]


@register_method("coop")
class CoOp(ClassPromptBaseline):
    """Learned context + class names, trained through the frozen text tower; expectation over classes."""

    config_class = CoOpConfig

    @classmethod
    def build(cls, config: CoOpConfig, classes: RankClasses, tower: FrozenTextTower, generator: torch.Generator) -> nn.Module:
        return ContextPrompts(config, classes, tower, generator)
