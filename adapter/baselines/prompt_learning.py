"""What CoOp, OrdinalCLIP and L2RCLIP share: rank classes, the frozen text tower run on learned token
embeddings, a training loop over cached image embeddings, and prediction by expectation.

Each label is turned into K ordered classes with a value in target units: the manifest's `classes`
for an ordinal label with an identity target, otherwise K equal-frequency bins of the train targets
(class value = the mean target of its bin). A method builds K class prompts in the text tower's
token-embedding space with learned parts; the gradient of the loss flows through the frozen
transformer into those parts only. After training, the K class text embeddings are computed once and
saved, so prediction needs no text tower: the softmax over `logit_scale · cosine(image, class)`
weights the class values (its argmax is the predicted class).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rankpipe.adapter.baselines.base import Baseline
from rankpipe.adapter.baselines.data import LabelSplits
from rankpipe.adapter.baselines.prompts import PromptEncoder, cosine, softmax
from rankpipe.adapter.training.targets import transform_target
from rankpipe.errors import InputError

log = logging.getLogger(__name__)

# The word that marks a learned token's place in a tokenized template; its embedding is replaced.
PLACEHOLDER = "X"


@dataclasses.dataclass(frozen=True)
class PromptLearningConfig:
    """Settings every prompt-learning method shares."""

    # Learned context tokens M before the class part of every prompt.
    context_tokens: int = 8
    # Bins K of a continuous label (equal-frequency on the train split); ordinal labels use their classes.
    num_bins: int = 10
    # Adam steps per label.
    steps: int = 300
    # Images per step (sampled with replacement from the train split).
    batch_size: int = 32
    # Adam learning rate.
    lr: float = 2e-3
    # Multiplies cosines before the softmax over class prompts; trained CLIP models reach 100.
    logit_scale: float = 100.0
    # Standard deviation of the normal initialisation of learned token embeddings (CoOp's 0.02).
    init_std: float = 0.02
    # Seeds initialisation and batch sampling.
    seed: int = 0

    def __post_init__(self) -> None:
        if self.context_tokens < 0:
            raise ValueError(f"context_tokens must be >= 0, not {self.context_tokens}")
        if self.num_bins < 2:
            raise ValueError(f"num_bins must be >= 2, not {self.num_bins}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {self.steps}, {self.batch_size}")
        if not (self.lr > 0 and self.logit_scale > 0 and self.init_std > 0):
            raise ValueError(f"lr, logit_scale and init_std must be positive, got {self.lr}, {self.logit_scale}, {self.init_std}")


@dataclasses.dataclass(frozen=True)
class RankClasses:
    """A label's ordered classes and the class of every training image."""

    # [K] increasing class values in target units.
    values: np.ndarray
    # [n_train] int64 class index of each train image.
    train_class: np.ndarray
    # K names written into the prompts: the manifest's class names, else the values (3 significant digits).
    names: list[str]


def rank_classes(split: LabelSplits, num_bins: int) -> RankClasses:
    """The label's classes: its manifest classes when they are ordered targets, else equal-frequency bins.

    Manifest classes are used when the target transform is the identity (a distance target folds them,
    so it is binned like a continuous label), named by the manifest's class names when it has them.
    Each train target goes to its nearest class. Bins: edges at the train targets' quantiles i/K;
    empty bins (ties) are dropped; value = mean target in the bin.

    Raises:
        InputError: the train targets fall in fewer than two classes.
    """
    t = np.asarray(split.train_targets, dtype=np.float64)
    named = split.named_classes()
    names = None
    if named is not None:
        values, names = named  # [K], K names
        assign = np.abs(t[:, None] - values[None, :]).argmin(axis=1)  # [n]
    elif split.classes and split.scale.transform.kind == "identity":
        values = np.unique(transform_target(np.asarray(split.classes), split.scale.transform))  # [K]
        assign = np.abs(t[:, None] - values[None, :]).argmin(axis=1)  # [n]
    else:
        edges = np.quantile(t, np.linspace(0, 1, num_bins + 1)[1:-1])  # [K-1]
        raw = np.searchsorted(edges, t, side="right")  # [n] in 0..K-1
        used = np.unique(raw)
        assign = np.searchsorted(used, raw)  # renumbered without empty bins
        values = np.array([t[assign == k].mean() for k in range(len(used))])
    # The classes the train split holds, not those the manifest lists: the loss needs images of 2 of them.
    present = len(np.unique(assign))
    if present < 2:
        noun = "class" if present == 1 else "classes"
        raise InputError(f"label {split.name!r} has {present} {noun} on the train split (of {len(values)}); "
                         "prompt learning needs train images of at least 2 classes")
    return RankClasses(values, assign.astype(np.int64), names or [f"{v:.3g}" for v in values])


class FrozenTextTower:
    """An open_clip CLIP text tower run on token embeddings instead of token ids.

    The token ids of a template still decide where the end-of-text token is (pooling), so a template's
    placeholder words can be replaced by learned embeddings of the same count. Sequences are cut to the
    longest template: with the causal mask the pooled token never sees the padding after it.
    """

    def __init__(self, encoder: PromptEncoder) -> None:
        backbone = encoder.backbone()
        model = backbone.model
        for attr in ("token_embedding", "positional_embedding", "transformer", "ln_final", "attn_mask", "text_pool_type"):
            if not hasattr(model, attr):
                raise InputError(f"prompt learning needs an open_clip CLIP text tower; {type(model).__name__} has no {attr}")
        if model.attn_mask is None or model.text_pool_type not in ("argmax", "eos"):
            raise InputError("prompt learning needs a causal text tower pooled at the end-of-text token")
        self.model = model
        self.tokenizer = backbone.tokenizer
        self.device = torch.device(backbone.device)
        # Width D of the token embeddings.
        self.width = int(model.token_embedding.weight.shape[1])

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """[K, L] token ids, cut to the longest text (L = its end-of-text position + 1)."""
        ids = self.tokenizer(list(texts)).to(self.device)  # [K, 77]
        return ids[:, : int(self.pooled_index(ids).max()) + 1]

    def pooled_index(self, ids: torch.Tensor) -> torch.Tensor:
        """[K] position of each sequence's end-of-text token."""
        if self.model.text_pool_type == "eos":
            return (ids == self.model.text_eos_id).int().argmax(dim=-1)
        return ids.argmax(dim=-1)

    @torch.no_grad()
    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """[K, L] ids -> [K, L, D] token embeddings (constants; the learned parts are put in by callers)."""
        return self.model.token_embedding(ids).float()

    def encode(self, tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """[K, L, D] token embeddings of the sequences `ids` -> [K, E] projected text embeddings.

        Differentiable in `tokens`; the tower's own weights are frozen.
        """
        model = self.model
        length = tokens.shape[1]
        cast = model.transformer.get_cast_dtype()
        x = tokens.to(cast) + model.positional_embedding[:length].to(cast)  # [K, L, D]
        x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
        x = model.ln_final(x)  # [K, L, D]
        x = x[torch.arange(x.shape[0], device=x.device), self.pooled_index(ids)]  # [K, D]
        proj = model.text_projection
        if proj is not None:
            x = proj(x) if isinstance(proj, nn.Linear) else x @ proj  # [K, E]
        return x.float()


class ClassPrompts(nn.Module):
    """The learned part of a method: produces the K class text embeddings through the frozen tower.

    Subclasses hold `context`, the [M, D] learned context shared by every class prompt.
    """

    context: nn.Parameter

    def forward(self, tower: FrozenTextTower) -> torch.Tensor:  # pragma: no cover - interface
        """[K, E] class text embeddings."""
        raise NotImplementedError

    def with_context(self, tokens: torch.Tensor, *learned: torch.Tensor) -> torch.Tensor:
        """Template embeddings with their placeholders after [SOS] replaced: first the M context tokens,
        then each further learned block in order.

        Args:
            tokens: [K, L, D] token embeddings of the tokenized templates (`context_template`).
            learned: [K, n, D] blocks that take the places of the placeholders after the context.

        Returns:
            [K, L, D] token embeddings.
        """
        context = self.context.unsqueeze(0).expand(tokens.shape[0], -1, -1)  # [K, M, D]
        blocks = [context, *learned]
        end = 1 + sum(block.shape[1] for block in blocks)  # first template token after the placeholders
        return torch.cat([tokens[:, :1], *blocks, tokens[:, end:]], dim=1)


# (logits [B, K], class index [B], class values [K]) -> scalar loss.
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy_loss(logits: torch.Tensor, target: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """CoOp's and OrdinalCLIP's loss: cross-entropy of each image over the class prompts."""
    return F.cross_entropy(logits, target)


def train_prompts(prompts: ClassPrompts, tower: FrozenTextTower, split: LabelSplits, classes: RankClasses,
                  config: PromptLearningConfig, loss_fn: LossFn, what: str) -> list[float]:
    """Adam on `prompts`' parameters; each step scores a random batch of train images against the classes.

    Returns:
        The loss of every step.
    """
    generator = torch.Generator().manual_seed(config.seed)
    images = F.normalize(torch.as_tensor(split.train_embed, dtype=torch.float32), dim=-1).to(tower.device)  # [n, E]
    target = torch.as_tensor(classes.train_class).to(tower.device)  # [n]
    values = torch.as_tensor(classes.values, dtype=torch.float32).to(tower.device)  # [K]
    optimiser = torch.optim.Adam(prompts.parameters(), lr=config.lr)
    losses = []
    for step in range(config.steps):
        batch = torch.randint(0, len(images), (config.batch_size,), generator=generator).to(tower.device)  # [B]
        text = F.normalize(prompts(tower), dim=-1)  # [K, E]
        logits = config.logit_scale * images[batch] @ text.T  # [B, K]
        loss = loss_fn(logits, target[batch], values)
        if not torch.isfinite(loss):
            raise RuntimeError(f"{what}: non-finite loss {loss.item()} at step {step}")
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
    log.info("%s: %d classes, loss %.4f -> %.4f over %d steps", what, len(classes.values), losses[0], losses[-1], config.steps)
    return losses


class ClassPromptBaseline(Baseline):
    """A prompt-learning method: per label, K class text embeddings and their values, scored by expectation.

    Subclasses implement `build(config, classes, tower, generator)` -> ClassPrompts and may override
    `loss_fn(config)`.
    """

    @classmethod
    def build(cls, config: Any, classes: RankClasses, tower: FrozenTextTower, generator: torch.Generator) -> ClassPrompts:
        raise NotImplementedError

    @classmethod
    def loss_fn(cls, config: Any) -> LossFn:
        return cross_entropy_loss

    @classmethod
    def fit(cls, config: PromptLearningConfig, data: Sequence[LabelSplits], prompts: PromptEncoder) -> ClassPromptBaseline:
        tower = FrozenTextTower(prompts)
        params: dict[str, dict[str, Any]] = {}
        for split in data:
            classes = rank_classes(split, config.num_bins)
            generator = torch.Generator().manual_seed(config.seed)
            learned = cls.build(config, classes, tower, generator).to(tower.device)
            losses = train_prompts(learned, tower, split, classes, config, cls.loss_fn(config), f"{cls.name} {split.name}")
            with torch.no_grad():
                class_embeds = learned(tower).float().cpu()  # [K, E]
            params[split.name] = {
                "class_names": classes.names,
                "values": torch.as_tensor(classes.values, dtype=torch.float64),  # [K]
                "class_embeds": class_embeds,  # [K, E] float32
                "learned": {k: v.detach().float().cpu() for k, v in learned.state_dict().items()},
                "first_loss": losses[0],
                "final_loss": losses[-1],
            }
        return cls(config, params)

    def class_probabilities(self, label: str, embed: np.ndarray) -> np.ndarray:
        """[n, E] embeddings -> [n, K] softmax over the class prompts."""
        p = self.label_params(label)
        return softmax(self.config.logit_scale * cosine(embed, p["class_embeds"].numpy()))

    def predict(self, label: str, embed: np.ndarray) -> np.ndarray:
        return self.class_probabilities(label, embed) @ self.label_params(label)["values"].numpy()  # [n]

    def predict_class(self, label: str, embed: np.ndarray) -> np.ndarray:
        """[n] value of the most probable class (the argmax prediction)."""
        values = self.label_params(label)["values"].numpy()
        return values[self.class_probabilities(label, embed).argmax(axis=1)]


def context_template(config: PromptLearningConfig, tail: str) -> str:
    """The text tokenized for a prompt: M placeholders (the learned context) then `tail`."""
    return " ".join([PLACEHOLDER] * config.context_tokens + [tail])


def normal_init(shape: tuple[int, ...], std: float, generator: torch.Generator) -> nn.Parameter:
    """A learned token-embedding block, N(0, std²), seeded."""
    return nn.Parameter(torch.randn(shape, generator=generator) * std)
