"""Typed configuration of the ranking-aware adapter and of its training loss.

Both dataclasses are built from plain dicts (YAML, checkpoints) at the boundary with `from_dict`, which
refuses unknown fields by name, and validate themselves in `__post_init__`. A checkpoint stores
`dataclasses.asdict(cfg)` beside the weights so the exact architecture can be rebuilt.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from rankpipe.errors import InputError

RANKING_HEAD_NAMES = ("none", "subtraction", "relational")
PAIR_COMBINES = ("subtract", "concat")
POOLINGS = ("cross", "self")
FUSION_BLOCKS = ("released", "paper")
REGRESSION_POOLINGS = ("sum", "sum_spread")
PAIRWISE_LOSSES = ("bce", "hinge")
REGRESSION_FORMS = ("plain", "log")
TIE_RULES = ("exclude", "half")

_C = TypeVar("_C")


def _from_dict(cls: type[_C], d: dict[str, Any]) -> _C:
    """Build `cls` from a dict, naming any key that is not one of its fields."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise InputError(
            f"unknown {cls.__name__} field(s) {', '.join(unknown)}; valid fields are {', '.join(sorted(names))}."
        )
    return cls(**d)


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InputError(f"{name} must be one of {', '.join(choices)}, not {value!r}.")


def _positive(name: str, value: int | float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise InputError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, not {value!r}.")


@dataclasses.dataclass
class AdapterConfig:
    """Architecture of the ranking-aware adapter (paper §3.2 and the released configuration)."""

    # Width of every token inside the adapter (768 in the paper).
    d_model: int = 768
    # Attention heads of every attention layer, including the relational attention; must divide d_model.
    heads: int = 8
    # Learnable tokens appended to the query's text tokens, so the prompt can adapt to ranking (32 released).
    text_extra_tokens: int = 32
    # Fusion blocks of the encoder.
    blocks: int = 2
    # Form of each fusion block: "released" (self-attention + MLP, then cross-attention to the text +
    # MLP: two pre-norm residual blocks, as the released code) or "paper" (self-attention ->
    # cross-attention -> one MLP, the paper's description; ~9.4 M fewer parameters at d_model 768).
    fusion_block: str = "released"
    # Plain post-norm transformer encoder layers after the blocks, as in the released code (0 = off).
    plain_layers: int = 2
    # Hidden width of the fusion blocks' MLPs as a multiple of d_model (the plain layers use width d_model).
    mlp_ratio: float = 4.0
    # Dropout inside the fusion blocks' attention and MLPs (none in the released code).
    fusion_dropout: float = 0.0
    # Dropout inside the plain layers' attention and feed-forward (0.1, nn.TransformerEncoderLayer's
    # default, in the released code).
    plain_dropout: float = 0.1
    # Hidden width of the regression and pair MLPs; None = d_model, as in the released code.
    head_hidden: int | None = None
    # Hidden Linear-LN-ReLU layers of the regression head (2 in the paper).
    regression_layers: int = 2
    # How the regression head pools its normalised tokens: "sum" (the paper) or "sum_spread", which adds
    # a second MLP's score of the per-channel spread of the tokens over the image (std over tokens):
    # blur and similar distortions make patch tokens alike, a change a sum cannot see (docs/fidelity.md).
    regression_pooling: str = "sum"
    # Hidden Linear-LN-ReLU layers of the pair head that turns a pair feature into a logit (3 released).
    pair_layers: int = 3
    # Auxiliary pairwise branch: "none" (regression only), "subtraction" (difference of token-averaged
    # embeddings, the paper's Table 5 middle row) or "relational" (ranking-aware relational attention).
    ranking_head: str = "relational"
    # K, the number of learnable relational tokens that query each image pair (1/4/9/16 in the paper).
    relational_tokens: int = 16
    # True: the softmax over the pair's 2P keys is split into the two images' halves, giving a_i and
    # a_j (the paper). False: the "merged" ablation, one plain attention output over the 2P keys.
    split_dot_product: bool = True
    # How the halves a_i, a_j become one pair feature: "subtract" (a_i - a_j, the paper) or "concat"
    # ([a_i ; a_j], ablation). Only meaningful with split_dot_product.
    pair_combine: str = "subtract"
    # Who queries the pair: "cross" (the K relational tokens, attentional pooling) or "self" (the
    # pair's own 2P tokens, self-attention ablation; relational_tokens is then unused).
    pooling: str = "cross"
    # Ordered pairs processed at once in the pairwise branch; bounds its transient memory for any batch
    # (~20 KB per pair at d_model 768, K 16). Smaller chunks cost launches: on an H100 a train step at
    # N=512 took 230 ms with 4096 and 82 ms with 32768 at the same peak memory.
    pair_chunk: int = 32768
    # Recompute each pair chunk in the backward pass instead of keeping its activations: training
    # memory of the pairwise branch becomes O(N·P·D + pair_chunk·D) instead of O(N²·D), for ~1/3 more work.
    pair_checkpoint: bool = False

    def __post_init__(self) -> None:
        for name in ("d_model", "heads", "relational_tokens", "pair_chunk", "regression_layers", "pair_layers"):
            _positive(name, getattr(self, name))
        for name in ("text_extra_tokens", "blocks", "plain_layers"):
            _positive(name, getattr(self, name), allow_zero=True)
        _positive("mlp_ratio", self.mlp_ratio)
        if self.head_hidden is not None:
            _positive("head_hidden", self.head_hidden)
        for name in ("fusion_dropout", "plain_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise InputError(f"{name} must be in [0, 1), not {getattr(self, name)!r}.")
        if self.d_model % self.heads:
            raise InputError(f"d_model ({self.d_model}) must be divisible by heads ({self.heads}).")
        _choice("fusion_block", self.fusion_block, FUSION_BLOCKS)
        _choice("ranking_head", self.ranking_head, RANKING_HEAD_NAMES)
        _choice("pair_combine", self.pair_combine, PAIR_COMBINES)
        _choice("pooling", self.pooling, POOLINGS)
        _choice("regression_pooling", self.regression_pooling, REGRESSION_POOLINGS)
        if not self.split_dot_product and self.pair_combine != "subtract":
            raise InputError(
                "pair_combine 'concat' needs split_dot_product: the merged form has no halves to concatenate."
            )

    @property
    def hidden(self) -> int:
        """Hidden width of the regression and pair MLPs."""
        return self.head_hidden if self.head_hidden is not None else self.d_model

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AdapterConfig:
        """Build from a plain dict (YAML or a checkpoint); unknown keys raise InputError naming them."""
        return _from_dict(cls, d)


@dataclasses.dataclass
class LossConfig:
    """The training objective: regression on normalised targets + weight · pairwise ranking loss.

    Defaults follow the released code: BCE-with-logits on 1[y_i > y_j] and a regression term of
    0.2 · log(1 + SmoothL1). With pairwise="hinge" (the paper) the regression term defaults to the
    plain SmoothL1 with weight 1.
    """

    # Pairwise loss on the pair logits: "bce" (BCE-with-logits on 1[y_i > y_j], released code) or
    # "hinge" (max(0, margin - sign(y_i - y_j) · logit_ij), the paper).
    pairwise: str = "bce"
    # λ, the weight of the pairwise term.
    weight: float = 1.0
    # Margin of the hinge loss, in logit units.
    margin: float = 1.0
    # Regression term: "plain" SmoothL1 or "log" = log(1 + SmoothL1) (released code, bounds large early
    # errors). None = "log" for pairwise "bce", "plain" for "hinge".
    regression_form: str | None = None
    # Weight of the regression term. None = 0.2 for the "log" form (released code), 1.0 for "plain".
    regression_weight: float | None = None
    # Beta of SmoothL1 (the error where it turns from quadratic to linear), in normalised target units.
    smooth_l1_beta: float = 1.0
    # Pairs with equal targets: "exclude" (left out of the pairwise loss; the diagonal i = j always is)
    # or "half" (BCE target 0.5, pushing the logit of tied pairs to 0; bce only).
    ties: str = "exclude"

    def __post_init__(self) -> None:
        _choice("pairwise", self.pairwise, PAIRWISE_LOSSES)
        _choice("ties", self.ties, TIE_RULES)
        if self.regression_form is None:
            self.regression_form = "log" if self.pairwise == "bce" else "plain"
        _choice("regression_form", self.regression_form, REGRESSION_FORMS)
        if self.regression_weight is None:
            self.regression_weight = 0.2 if self.regression_form == "log" else 1.0
        _positive("weight", self.weight, allow_zero=True)
        _positive("regression_weight", self.regression_weight, allow_zero=True)
        _positive("margin", self.margin, allow_zero=True)
        _positive("smooth_l1_beta", self.smooth_l1_beta)
        if self.ties == "half" and self.pairwise != "bce":
            raise InputError("ties 'half' needs pairwise 'bce'; use ties 'exclude' with the hinge loss.")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LossConfig:
        """Build from a plain dict (YAML or a checkpoint); unknown keys raise InputError naming them."""
        return _from_dict(cls, d)
