"""OrdinalCLIP: a few learned base-rank embeddings, interpolated into the K rank embeddings.

The prompt of rank k is `[SOS] ctx_1 … ctx_M r_k . [EOS]`: the context is learned and shared, and the
rank embedding r_k (one token) is a weighted mean of all B base-rank embeddings, the base ranks sitting
evenly over the ranks (base b at c_b = b·(K-1)/(B-1)) and weighing by their distance |k - c_b|, so
neighbouring ranks share their parameters and stay ordered by construction. Context and base ranks
are learned by cross-entropy over the rank prompts plus OrdinalCLIP's KL term (`rank_kl`), as in
OrdinalCLIP's released code.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from rankpipe.adapter.baselines import register_method
from rankpipe.adapter.baselines.prompt_learning import (
    PLACEHOLDER,
    ClassPromptBaseline,
    ClassPrompts,
    FrozenTextTower,
    LossFn,
    PromptLearningConfig,
    RankClasses,
    context_template,
    normal_init,
)

# How a base rank's weight falls with its distance d = |k - c_b| (in ranks) from rank k, before the
# weights of a rank are normalised to sum to 1; OrdinalCLIP's three, "linear" its default.
INTERPOLATIONS = ("linear", "inv_prop", "normal")
# The inverse-proportional weight 1/(d + eps) of OrdinalCLIP's code, finite at d = 0.
INV_PROP_EPS = 1e-5
# OrdinalCLIP's KL target over a batch's images for rank k is softmax(LABEL_SHARPNESS · [y_i = k]):
# nearly uniform over the images of rank k, a little mass on the others (the released code's 10).
LABEL_SHARPNESS = 10.0


@dataclasses.dataclass(frozen=True)
class OrdinalCLIPConfig(PromptLearningConfig):
    """OrdinalCLIP's settings: the shared ones, the base ranks, their interpolation and the KL weight."""

    # Learned context tokens M (OrdinalCLIP's released default 10).
    context_tokens: int = 10
    # Learned base-rank embeddings B the K rank embeddings are interpolated from.
    base_ranks: int = 3
    # Weight of a base rank by its distance: "linear" 1 - d/(K-1), "inv_prop" 1/(d + 1e-5), "normal" exp(-d²).
    interpolation: str = "linear"
    # Weight of the KL term beside the cross-entropy (OrdinalCLIP's 1).
    kl_weight: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.base_ranks < 2:
            raise ValueError(f"base_ranks must be >= 2, not {self.base_ranks}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, not {self.interpolation!r}")
        if self.kl_weight < 0:
            raise ValueError(f"kl_weight must be >= 0, not {self.kl_weight}")


def interpolation_weights(num_ranks: int, num_base: int, interpolation: str = "linear") -> torch.Tensor:
    """[K, B] weights of the base ranks in each rank embedding; rows sum to 1.

    Base rank b sits at c_b = b·(K-1)/(B-1) on the rank axis; rank k weighs it by its distance
    d = |k - c_b|: 1 - d/(K-1) ("linear", never negative since d <= K-1), 1/(d + 1e-5) ("inv_prop")
    or exp(-d²) ("normal"), then each row is divided by its sum. Every base rank contributes to every
    rank, not only the two around it.
    """
    rank = torch.arange(num_ranks, dtype=torch.float64)[:, None]  # [K, 1]
    centre = torch.linspace(0, num_ranks - 1, num_base, dtype=torch.float64)[None, :]  # [1, B]
    distance = (rank - centre).abs()  # [K, B]
    if interpolation == "linear":
        weights = 1 - distance / (num_ranks - 1)
    elif interpolation == "inv_prop":
        weights = 1 / (distance + INV_PROP_EPS)
    elif interpolation == "normal":
        weights = torch.exp(-distance * distance)
    else:
        raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, not {interpolation!r}")
    return (weights / weights.sum(dim=1, keepdim=True)).float()


def rank_kl(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """OrdinalCLIP's KL term: per rank present in the batch, KL(label || prediction) over the images.

    For rank k, the prediction is the softmax over the batch's images of their logits for k (the
    text-to-image direction) and the label the softmax of LABEL_SHARPNESS · [y_i = k]; the KL
    divergences are summed over the present ranks and divided by their number.

    Args:
        logits: [B, K] scaled image-text similarities.
        target: [B] rank index of each image.
    """
    positives = F.one_hot(target, logits.shape[1]).T.to(logits.dtype)  # [K, B]
    present = positives.sum(dim=1) > 0  # [K]
    label = (LABEL_SHARPNESS * positives[present]).softmax(dim=1)  # [P, B] over images
    log_prediction = F.log_softmax(logits.T[present], dim=1)  # [P, B] over images
    return F.kl_div(log_prediction, label, reduction="sum") / present.sum()


class InterpolatedRankPrompts(ClassPrompts):
    """Learned context, then one interpolated rank token, then '.'."""

    def __init__(self, config: OrdinalCLIPConfig, classes: RankClasses, tower: FrozenTextTower, generator: torch.Generator) -> None:
        super().__init__()
        k = len(classes.values)
        ids = tower.tokenize([context_template(config, f"{PLACEHOLDER}.")] * k)  # [K, L]
        self.register_buffer("ids", ids, persistent=False)
        self.register_buffer("tokens", tower.embed_tokens(ids), persistent=False)  # [K, L, D]
        self.register_buffer("weights", interpolation_weights(k, config.base_ranks, config.interpolation), persistent=False)  # [K, B]
        # [M, D] the learned context.
        self.context = normal_init((config.context_tokens, tower.width), config.init_std, generator)
        # [B, D] the learned base-rank embeddings.
        self.base = normal_init((self.weights.shape[1], tower.width), config.init_std, generator)

    def forward(self, tower: FrozenTextTower) -> torch.Tensor:
        ranks = (self.weights @ self.base).unsqueeze(1)  # [K, 1, D]
        return tower.encode(self.with_context(self.tokens, ranks), self.ids)  # [K, E]


@register_method("ordinalclip")
class OrdinalCLIP(ClassPromptBaseline):
    """Interpolated rank embeddings with learned context; cross-entropy + KL; expectation over the rank prompts."""

    config_class = OrdinalCLIPConfig

    @classmethod
    def build(cls, config: OrdinalCLIPConfig, classes: RankClasses, tower: FrozenTextTower, generator: torch.Generator) -> nn.Module:
        return InterpolatedRankPrompts(config, classes, tower, generator)

    @classmethod
    def loss_fn(cls, config: OrdinalCLIPConfig) -> LossFn:
        def loss(logits: torch.Tensor, target: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(logits, target) + config.kl_weight * rank_kl(logits, target)

        return loss
