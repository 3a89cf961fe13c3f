"""Named rows of `rankpipe bench`: which method a row trains and with which run-config overrides.

A variant is (method, overrides). The ranking adapter's ablations are presets of `--set` overrides
of the paper's adapter (rankpipe.adapter.model.config); another method (a baseline of adapter/baselines)
becomes a row by registering a variant whose `method` names it and a trainer for that method in
adapter/experiments/bench/run.py. `get_variant` refuses an unknown name and lists the known ones.
"""

from __future__ import annotations

import dataclasses

from rankpipe.adapter import ADAPTER_METHOD
from rankpipe.errors import InputError


@dataclasses.dataclass(frozen=True)
class Variant:
    """One row family of the bench table."""

    # Name used in --variants, in run folders (OUT/runs/<name>/) and in the table.
    name: str
    # What is trained: "adapter", or the name of another method.
    method: str
    # For the adapter: `section.field=value` run-config overrides applied after the bench's own settings;
    # for a baseline: its own `FIELD=VALUE` settings (as `rankpipe train --method NAME --set`).
    overrides: tuple[str, ...]
    # One line for `rankpipe bench --help` and docs/bench.md.
    description: str

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or "," in self.name:
            raise ValueError(f"variant name must be non-empty without '/' or ',', not {self.name!r}")


_VARIANTS: dict[str, Variant] = {}
# The rows `rankpipe bench` trains when --variants is left out.
DEFAULT_VARIANTS = "default,regression-only,subtraction-head,spread-pooling"


def register_variant(variant: Variant) -> Variant:
    """Make `variant` selectable by its name; a name can be registered once."""
    if variant.name in _VARIANTS:
        raise ValueError(f"bench variant {variant.name!r} is already registered")
    _VARIANTS[variant.name] = variant
    return variant


def variant_names() -> list[str]:
    """Every registered variant name, in registration order."""
    return list(_VARIANTS)


def get_variant(name: str) -> Variant:
    """The variant registered as `name`.

    Raises:
        InputError: no variant has that name (the message lists the known ones).
    """
    if name not in _VARIANTS:
        raise InputError(f"unknown bench variant {name!r}; choose from: {', '.join(variant_names())}")
    return _VARIANTS[name]


def parse_variants(text: str) -> list[Variant]:
    """The variants of a comma-separated list, in order, each once.

    Raises:
        InputError: an empty list or an unknown name.
    """
    names = list(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    if not names:
        raise InputError(f"--variants {text!r} names no variant; choose from: {', '.join(variant_names())}")
    return [get_variant(name) for name in names]


def _adapter(name: str, description: str, *overrides: str) -> None:
    register_variant(Variant(name, ADAPTER_METHOD, tuple(overrides), description))


_adapter("default", "the paper's adapter: relational ranking head, 16 relational tokens, BCE pairwise loss")
_adapter("regression-only", "no pairwise branch: the regression head alone", "adapter.ranking_head=none")
_adapter("subtraction-head", "pairwise branch on the difference of token-averaged features",
         "adapter.ranking_head=subtraction")
for _k in (1, 4, 9, 16):
    _adapter(f"k{_k}", f"relational attention with {_k} relational token(s)", f"adapter.relational_tokens={_k}")
_adapter("merged", "one softmax over the pair's 2P keys, no split dot-product", "adapter.split_dot_product=false")
_adapter("concat", "pair feature [a_i ; a_j] instead of a_i - a_j", "adapter.pair_combine=concat")
_adapter("self-pooling", "the pair's own tokens query the pair (self-attention) instead of relational tokens",
         "adapter.pooling=self")
_adapter("hinge", "the paper's hinge pairwise loss instead of BCE", "loss.pairwise=hinge")
_adapter("spread-pooling", "regression head adds an MLP of the tokens' std over the image to the sum's",
         "adapter.regression_pooling=sum_spread")



def _baseline(method: str, description: str, *settings: str) -> None:
    register_variant(Variant(method, method, tuple(settings), description))


_baseline("zero-shot", "frozen CLIP, no training: cosine to the query, expected count over number prompts or expected class over named-class prompts")
_baseline("clip-iqa", "frozen CLIP, no training: softmax over an antonym prompt pair (CLIP-IQA)")
_baseline("linear-probe", "ridge regression on the pooled image embedding, penalty chosen on val")
_baseline("coop", "learned context tokens before class names, trained through the frozen text tower (CoOp)")
_baseline("ordinalclip", "learned context and base ranks interpolated into rank prompts (OrdinalCLIP)")
_baseline("l2rclip", "RankFormer rank prompts with global context, contrastive + ordinal pairwise loss (L2RCLIP)")
_baseline("rank-axis", "projection on the axis from the lowest to the highest train image (rankability, k=1)")
register_variant(Variant("rank-axis-all", "rank-axis", ("k=all",),
                         "projection on the rank axis regressed on every train image (rankability, k=all)"))
_baseline("text-axis", "frozen CLIP, no training: projection on the high-minus-low prompt direction")
