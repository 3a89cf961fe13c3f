"""Rebuild the frozen backbone a checkpoint's features came from, from its recorded provenance.

Ranking new images means running them through exactly the CLIP whose tokens the adapter was trained
on. The provenance says which: random weights are recreated from the recorded seed; a local weights
file must be passed again (`--backbone-weights`) and must have the recorded SHA-256; an open_clip
pretrained tag is loaded from the local cache or downloaded, or taken from a file given with
`--backbone-weights` (tags record no hash, so such a file is trusted and a warning says so). The
rebuilt backbone's provenance must then agree with the recorded one, or it is refused.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import open_clip
import torch

from rankpipe.errors import InputError
from rankpipe.pipeline.embed.backbone import (
    COMPATIBILITY_FIELDS,
    Backbone,
    BackboneSpec,
    compatibility_problem,
    create_frozen_model,
    load_backbone,
)
from rankpipe.pipeline.embed.weights import (
    FILE_WEIGHTS,
    RANDOM_WEIGHTS,
    ResolvedWeights,
    check_model_name,
    file_sha256,
)

logger = logging.getLogger(__name__)

# Provenance fields (besides COMPATIBILITY_FIELDS) that fix the token shapes the adapter expects.
_SHAPE_FIELDS = ("token_grid", "token_dim", "text_token_dim")


def load_recorded_backbone(provenance: dict[str, Any], device: str | torch.device = "cpu",
                           backbone_weights: str | Path | None = None, what: str = "the checkpoint") -> Backbone:
    """The frozen backbone described by `provenance`, checked against it.

    Args:
        provenance: the provenance record a store or checkpoint carries (docs/store.md).
        device: where the backbone runs.
        backbone_weights: a local weights file for a `file` or tag provenance; must be None for random weights.
        what: how error messages name the provenance's owner, e.g. "checkpoint runs/x/best.pt".

    Raises:
        InputError: the weights cannot be loaded (offline tag, missing file, SHA-256 mismatch), or the
            rebuilt backbone differs from the recorded one.
    """
    model = str(provenance["model"])
    pretrained = str(provenance["pretrained"])
    weights_path = Path(backbone_weights) if backbone_weights is not None else None
    if weights_path is not None and not weights_path.is_file():
        raise InputError(f"--backbone-weights {weights_path} does not exist; pass the weights file of {what}'s backbone")
    if pretrained == RANDOM_WEIGHTS:
        if weights_path is not None:
            raise InputError(
                f"{what} was trained on a backbone with random weights (model {model}, seed {provenance['seed']}); "
                "they are recreated from the seed, leave out --backbone-weights"
            )
        backbone = load_backbone(BackboneSpec(model, RANDOM_WEIGHTS, seed=int(provenance["seed"])), device)
    elif pretrained == FILE_WEIGHTS:
        backbone = _from_file(provenance, weights_path, device, what)
    else:
        backbone = _from_tag(model, pretrained, weights_path, device, what)
    problem = compatibility_problem(provenance, backbone.provenance, COMPATIBILITY_FIELDS + _SHAPE_FIELDS)
    if problem is not None:
        raise InputError(
            f"the backbone rebuilt for {what} differs from the one it was trained on ({problem}); "
            "pass the backbone weights it was trained with"
        )
    return backbone


def _from_file(provenance: dict[str, Any], path: Path | None, device: str | torch.device, what: str) -> Backbone:
    recorded = provenance.get("checkpoint_sha256")
    if path is None:
        raise InputError(
            f"{what} was trained on features of {provenance['model']} with weights from a local file "
            f"(SHA-256 {recorded}); pass that file with --backbone-weights PATH"
        )
    actual = file_sha256(path)
    if actual != recorded:
        raise InputError(
            f"--backbone-weights {path} has SHA-256 {actual}, but {what} was trained with weights of SHA-256 "
            f"{recorded}; pass the file the features were embedded with"
        )
    return load_backbone(BackboneSpec(str(provenance["model"]), str(path)), device)


def _from_tag(model: str, tag: str, path: Path | None, device: str | torch.device, what: str) -> Backbone:
    if path is None:
        try:
            return load_backbone(BackboneSpec(model, tag), device)
        except InputError as e:
            raise InputError(
                f"cannot load the backbone weights of {what} (open_clip model {model}, pretrained {tag!r}): {e}; "
                f"pass the tag's weights file with --backbone-weights PATH"
            ) from e
    tag_cfg = open_clip.get_pretrained_cfg(model, tag)
    if not tag_cfg:
        raise InputError(f"{what} names pretrained tag {tag!r}, which open_clip {open_clip.__version__} does not know for {model}")
    logger.warning(
        "pretrained tag %r records no weights hash; trusting that %s holds its weights for %s", tag, path, model
    )
    return _load_tag_file(model, ResolvedWeights(tag, path, None, dict(tag_cfg)), device)


def _load_tag_file(model_name: str, weights: ResolvedWeights, device: str | torch.device) -> Backbone:
    """Load a tag's weights from a local file with the tag's preprocessing and activation.

    `load_backbone` resolves a tag on its own (cache or download); this is its creation step for a
    tag whose file the user supplies.
    """
    check_model_name(model_name)
    model, preprocess = create_frozen_model(model_name, weights, device)
    spec = BackboneSpec(model_name, weights.pretrained)
    return Backbone(model, preprocess, open_clip.get_tokenizer(model_name), spec, weights)
