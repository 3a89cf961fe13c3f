"""Rebuild the frozen backbone a checkpoint's features came from, from its recorded provenance.

Ranking new images means running them through exactly the CLIP whose tokens the adapter was trained
on. The provenance says which: random weights are recreated from the recorded seed; a local weights
file must be passed again (`--backbone-weights`) and must have the recorded SHA-256; an open_clip
pretrained tag is loaded from the local cache or downloaded, or taken from a file given with
`--backbone-weights` (tags record no hash, so such a file is trusted and a warning says so). Images
are resized and tokens normalised as the recorded store's were (its `resize` and `token_norm`). The
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
    TOWER_NORM,
    Backbone,
    BackboneSpec,
    compatibility_problem,
    create_frozen_model,
)
from rankpipe.pipeline.embed.cache_choices import NO_NORM, cache_choices
from rankpipe.pipeline.embed.resize import RESIZE_MODES
from rankpipe.pipeline.embed.weights import (
    FILE_WEIGHTS,
    RANDOM_WEIGHTS,
    ResolvedWeights,
    check_model_name,
    file_sha256,
    resolve_weights,
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
    check_model_name(model)
    weights = recorded_weights(provenance, backbone_weights, what)
    seed = int(provenance["seed"]) if weights.pretrained == RANDOM_WEIGHTS else 0
    if weights.path is None:
        torch.manual_seed(seed)
    choices = cache_choices(provenance)
    if choices.resize not in RESIZE_MODES:
        raise InputError(f"{what} was trained on features of open_clip's {choices.resize!r} resize, which this rankpipe "
                         f"does not make; embed its images with --resize squash or crop and train on that store")
    clip = create_frozen_model(model, weights, device)
    # The images are prepared and the tokens normalised as in the store the features came from.
    spec = BackboneSpec(model, str(weights.path) if weights.pretrained == FILE_WEIGHTS else weights.pretrained, seed,
                        resize=choices.resize, token_norm=NO_NORM if choices.token_norm == NO_NORM else TOWER_NORM)
    backbone = Backbone(clip, open_clip.get_tokenizer(model), spec, weights)
    problem = compatibility_problem(provenance, backbone.provenance, COMPATIBILITY_FIELDS + _SHAPE_FIELDS)
    if problem is not None:
        raise InputError(
            f"the backbone rebuilt for {what} differs from the one it was trained on ({problem}); "
            "pass the backbone weights it was trained with"
        )
    return backbone


def recorded_weights(provenance: dict[str, Any], backbone_weights: str | Path | None = None,
                     what: str = "the checkpoint") -> ResolvedWeights:
    """The weights `provenance` records, found on this machine and checked against the record.

    Random weights need nothing (they are recreated from the recorded seed); a `file` needs the file,
    with the recorded SHA-256; a tag is taken from `backbone_weights` when given (trusted, with a
    warning: tags record no hash), else from the local cache or a download.

    Raises:
        InputError: a missing or mismatching file, a file given for random weights, an unknown tag, or
            a tag that cannot be found or downloaded.
    """
    model = str(provenance["model"])
    pretrained = str(provenance["pretrained"])
    path = Path(backbone_weights) if backbone_weights is not None else None
    if path is not None and not path.is_file():
        raise InputError(f"--backbone-weights {path} does not exist; pass the weights file of {what}'s backbone")
    if pretrained == RANDOM_WEIGHTS:
        if path is not None:
            raise InputError(
                f"{what} records a backbone with random weights (model {model}, seed {provenance['seed']}); "
                "they are recreated from the seed, leave out --backbone-weights"
            )
        return ResolvedWeights(RANDOM_WEIGHTS, None, None, {})
    if pretrained == FILE_WEIGHTS:
        return _recorded_file(provenance, path, what)
    if path is None:
        try:
            return resolve_weights(model, pretrained)
        except InputError as e:
            raise InputError(
                f"cannot load the backbone weights of {what} (open_clip model {model}, pretrained {pretrained!r}): {e}; "
                f"pass the tag's weights file with --backbone-weights PATH"
            ) from e
    tag_cfg = open_clip.get_pretrained_cfg(model, pretrained)
    if not tag_cfg:
        raise InputError(f"{what} names pretrained tag {pretrained!r}, which open_clip {open_clip.__version__} does not know for {model}")
    logger.warning(
        "pretrained tag %r records no weights hash; trusting that %s holds its weights for %s", pretrained, path, model
    )
    return ResolvedWeights(pretrained, path, None, dict(tag_cfg))


def _recorded_file(provenance: dict[str, Any], path: Path | None, what: str) -> ResolvedWeights:
    recorded = provenance.get("checkpoint_sha256")
    if path is None:
        raise InputError(
            f"{what} records features of {provenance['model']} with weights from a local file "
            f"(SHA-256 {recorded}); pass that file with --backbone-weights PATH"
        )
    actual = file_sha256(path)
    if actual != recorded:
        raise InputError(
            f"--backbone-weights {path} has SHA-256 {actual}, but {what} records weights of SHA-256 "
            f"{recorded}; pass the file the features were embedded with"
        )
    return ResolvedWeights(FILE_WEIGHTS, path, actual, {})
