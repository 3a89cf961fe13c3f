"""L2RCLIP: RankFormer-refined rank templates with global context, trained by an asymmetric contrastive
loss and a cross-modal ordinal pairwise loss.

The paper's code was never released; every choice below is listed in docs/baselines.md.

- Prompts: `[SOS] ctx_1 … ctx_M <template words of rank k> [EOS]`, the template `a photo of <name_k>.`
  (name = the class value written out). The M global context vectors are learned and shared.
- RankFormer: one pre-norm transformer encoder layer attends over the template words' token
  embeddings of all K prompts together (token level, across ranks), and its output is blended with
  the original embeddings residual-style: T' = (1 - blend) · T + blend · RankFormer(T).
- Loss: asymmetric_contrastive + pairwise_weight · ordinal_pairwise (both defined below).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from rankpipe.adapter.baselines import register_method
from rankpipe.adapter.baselines.prompt_learning import (
    ClassPromptBaseline,
    ClassPrompts,
    FrozenTextTower,
    LossFn,
    PromptLearningConfig,
    RankClasses,
    context_template,
    normal_init,
)


@dataclasses.dataclass(frozen=True)
class L2RCLIPConfig(PromptLearningConfig):
    """L2RCLIP's settings: the shared ones, the rank template, RankFormer and the loss weights."""

    # Rank template; {name} is replaced by the class value.
    template: str = "a photo of {name}."
    # Attention heads of RankFormer (must divide the text tower's token width).
    heads: int = 1
    # Share of RankFormer's output in the blended template embeddings (0 keeps the originals).
    blend: float = 0.1
    # Weight of the cross-modal ordinal pairwise loss beside the asymmetric contrastive loss.
    pairwise_weight: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if "{name}" not in self.template:
            raise ValueError(f"template must contain {{name}}, not {self.template!r}")
        if self.heads < 1 or not 0 <= self.blend <= 1 or self.pairwise_weight < 0:
            raise ValueError(f"need heads >= 1, 0 <= blend <= 1, pairwise_weight >= 0; got {self.heads}, {self.blend}, {self.pairwise_weight}")


def asymmetric_contrastive(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean of image->text cross-entropy and text->image cross-entropy with several positives.

    Image->text: each image's softmax over the K rank prompts, target its rank. Text->image: for every
    rank present in the batch, its softmax over the batch's images against the uniform distribution
    over the images of that rank (many images share a rank, so the two directions differ).

    Args:
        logits: [B, K] scaled image-text similarities.
        target: [B] rank index of each image.
    """
    image_to_text = F.cross_entropy(logits, target)
    positives = F.one_hot(target, logits.shape[1]).T.to(logits.dtype)  # [K, B]
    count = positives.sum(dim=1)  # [K]
    present = count > 0
    log_p = F.log_softmax(logits.T, dim=1)  # [K, B] over images
    text_to_image = -((positives * log_p).sum(dim=1)[present] / count[present]).mean()
    return (image_to_text + text_to_image) / 2


def ordinal_weights(values: torch.Tensor) -> torch.Tensor:
    """[K, K] weights w[y, j] = 1 + |v_y - v_j| / (v_max - v_min): a rank's distant ranks weigh more."""
    span = (values.max() - values.min()).clamp_min(torch.finfo(values.dtype).tiny)
    return 1 + (values[:, None] - values[None, :]).abs() / span


def ordinal_pairwise(logits: torch.Tensor, target: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Cross-entropy whose negatives are weighted by ordinal distance: -log(e^{s_y} / Σ_j w[y, j] e^{s_j}).

    Args:
        logits: [B, K] scaled image-text similarities.
        target: [B] rank index of each image.
        values: [K] rank values.
    """
    weights = ordinal_weights(values.to(logits.dtype))[target]  # [B, K], 1 at the positive
    return F.cross_entropy(logits + weights.log(), target)


class RankFormerPrompts(ClassPrompts):
    """Global context, then RankFormer-blended template words of each rank."""

    def __init__(self, config: L2RCLIPConfig, classes: RankClasses, tower: FrozenTextTower, generator: torch.Generator) -> None:
        super().__init__()
        self.blend = config.blend
        ids = tower.tokenize([context_template(config, config.template.format(name=n)) for n in classes.names])  # [K, L]
        positions = torch.arange(ids.shape[1], device=ids.device)[None, :]  # [1, L]
        words = (positions > config.context_tokens) & (positions < tower.pooled_index(ids)[:, None])  # [K, L] template words
        self.register_buffer("ids", ids, persistent=False)
        self.register_buffer("tokens", tower.embed_tokens(ids), persistent=False)  # [K, L, D]
        self.register_buffer("words", words, persistent=False)
        # [M, D] the learned global context.
        self.context = normal_init((config.context_tokens, tower.width), config.init_std, generator)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
            self.rankformer = nn.TransformerEncoderLayer(tower.width, config.heads, 4 * tower.width, dropout=0.0,
                                                         batch_first=True, norm_first=True)

    def refined_tokens(self) -> torch.Tensor:
        """[K, L, D] token embeddings with the template words blended with RankFormer's output."""
        k, length, width = self.tokens.shape
        flat = self.tokens.reshape(1, k * length, width)  # [1, K·L, D]: every token of every rank
        attended = self.rankformer(flat, src_key_padding_mask=~self.words.reshape(1, -1)).reshape(k, length, width)
        blended = (1 - self.blend) * self.tokens + self.blend * attended  # [K, L, D]
        return torch.where(self.words[..., None], blended, self.tokens)

    def forward(self, tower: FrozenTextTower) -> torch.Tensor:
        return tower.encode(self.with_context(self.refined_tokens()), self.ids)  # [K, E]


@register_method("l2rclip")
class L2RCLIP(ClassPromptBaseline):
    """RankFormer prompts with global context; asymmetric contrastive + ordinal pairwise loss."""

    config_class = L2RCLIPConfig

    @classmethod
    def build(cls, config: L2RCLIPConfig, classes: RankClasses, tower: FrozenTextTower, generator: torch.Generator) -> nn.Module:
        if tower.width % config.heads:
            raise ValueError(f"heads {config.heads} must divide the text token width {tower.width}")
        return RankFormerPrompts(config, classes, tower, generator)

    @classmethod
    def loss_fn(cls, config: L2RCLIPConfig) -> LossFn:
        def loss(logits: torch.Tensor, target: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
            return asymmetric_contrastive(logits, target) + config.pairwise_weight * ordinal_pairwise(logits, target, values)

        return loss
