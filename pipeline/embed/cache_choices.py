"""What a store caches besides the backbone itself: resize mode, image views, token normalisation.

Each is a provenance field of the store (docs/store.md) and travels into every checkpoint trained on
it. Stores made before these fields were recorded were all made one way: shortest side + centre crop
(or whatever the weights' own open_clip `resize_mode` was), the original view only, and ConvNeXt
tokens straight from the trunk map; `cache_choices` fills those in, so old and new records compare.

- `resize`: "squash" (the paper's) or "crop" (resize.py).
- `views`: ("original",) or ("original", "hflip"): whether a horizontally flipped copy of every image
  was embedded too (`embed --flip-view`), for training's flip augmentation.
- `token_norm`: how image tokens were normalised: "ln_post" (ViT towers, always), "head_norm" (timm
  towers such as ConvNeXt: the tower's own pretrained head norm, per token, as the released code
  keeps it) or "none" (the raw trunk map).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import open_clip

from rankpipe.pipeline.embed.resize import CROP, OPEN_CLIP_RESIZE_MODE

ORIGINAL, HFLIP = "original", "hflip"
ORIGINAL_ONLY = (ORIGINAL,)
WITH_FLIP = (ORIGINAL, HFLIP)
LN_POST, HEAD_NORM, NO_NORM = "ln_post", "head_norm", "none"
# The fields a checkpoint's store and a store scored with it must share: evaluation reads only the
# original view, which a store with a flip view holds byte for byte as one without (docs/store.md).
SCORING_FIELDS = ("resize", "token_norm")
# What a resumed training run must also share: the views it draws from.
TRAINING_FIELDS = ("resize", "token_norm", "views")


@dataclasses.dataclass(frozen=True)
class CacheChoices:
    """The cache choices of one provenance record."""

    # "squash", "crop", or (older stores of weights whose own mode was another) open_clip's mode name.
    resize: str
    # The embedded views of every image, the original first.
    views: tuple[str, ...]
    # "ln_post", "head_norm" or "none".
    token_norm: str

    @property
    def flip_view(self) -> bool:
        return HFLIP in self.views


def cache_choices(provenance: dict[str, Any]) -> CacheChoices:
    """A provenance record's choices, with those of stores made before they were recorded filled in."""
    resize = provenance.get("resize")
    if resize is None:
        # open_clip's mode names ("shortest", "squash"), as the preprocess record always kept them.
        recorded = provenance.get("preprocess", {}).get("resize_mode", OPEN_CLIP_RESIZE_MODE[CROP])
        resize = {mode: choice for choice, mode in OPEN_CLIP_RESIZE_MODE.items()}.get(recorded, recorded)
    token_norm = provenance.get("token_norm")
    if token_norm is None:
        token_norm = NO_NORM if is_timm_tower(str(provenance.get("model", ""))) else LN_POST
    return CacheChoices(str(resize), tuple(provenance.get("views", ORIGINAL_ONLY)), str(token_norm))


def with_cache_choices(provenance: dict[str, Any]) -> dict[str, Any]:
    """The record with its cache choices written out (defaults of older stores included)."""
    choices = cache_choices(provenance)
    return {**provenance, "resize": choices.resize, "views": list(choices.views), "token_norm": choices.token_norm}


def is_timm_tower(model: str) -> bool:
    """Whether open_clip builds `model`'s image tower from timm (ConvNeXt and the like)."""
    config = open_clip.get_model_config(model) or {}
    return "timm_model_name" in config.get("vision_cfg", {})


def describe(field: str, value: Any) -> str:
    """How a choice reads in a sentence, in the words of the option that makes it."""
    if field == "resize":
        return f"--resize {value}" if value in OPEN_CLIP_RESIZE_MODE else f"open_clip's {value!r} resize"
    if field == "views":
        return "--flip-view" if HFLIP in value else "no --flip-view"
    return {
        LN_POST: "ViT tokens after ln_post",
        HEAD_NORM: "timm-tower tokens through the tower's head norm",
        NO_NORM: "raw timm trunk-map tokens (how rankpipe cached ConvNeXt tokens before applying the head norm)",
    }.get(value, f"token normalisation {value!r}")


def first_difference(a: dict[str, Any], b: dict[str, Any], fields: tuple[str, ...]) -> tuple[str, Any, Any] | None:
    """(field, a's value, b's value) of the first of `fields` whose cache choice differs, or None."""
    ca, cb = cache_choices(a), cache_choices(b)
    for field in fields:
        if getattr(ca, field) != getattr(cb, field):
            return field, getattr(ca, field), getattr(cb, field)
    return None


def remedy(field: str, wanted: Any) -> str:
    """What re-embedding gives a store the choice `wanted`, as a clause."""
    if field == "token_norm" and wanted == NO_NORM:
        return "this rankpipe no longer caches raw trunk-map tokens, so train a checkpoint on the store instead"
    if field == "token_norm":
        return "re-embed the images with this rankpipe"
    return f"re-embed the images with {describe(field, wanted)}"


def checkpoint_store_problem(provenance: dict[str, Any], store_provenance: dict[str, Any], what: str,
                             store: str, fields: tuple[str, ...] = SCORING_FIELDS) -> str | None:
    """The sentence refusing a checkpoint (`what`) on a store of other cache choices, or None.

    Args:
        provenance: the provenance the checkpoint records (its training store's).
        store_provenance: the store's.
        what: how the checkpoint is named, e.g. "checkpoint runs/x/best.pt".
        store: how the store is named, e.g. its path.
        fields: the choices that must agree (SCORING_FIELDS, or TRAINING_FIELDS for a resume).
    """
    difference = first_difference(provenance, store_provenance, fields)
    if difference is None:
        return None
    field, trained, theirs = difference
    return (f"{what} was trained on a store embedded with {describe(field, trained)}, but store {store} was "
            f"embedded with {describe(field, theirs)}; {remedy(field, trained)}, or use a checkpoint trained on "
            f"store {store}")
