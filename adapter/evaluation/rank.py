"""Ranking new images with a trained checkpoint: images -> frozen CLIP -> adapter scores -> one order.

Images go through the backbone recorded in the checkpoint's provenance, batch by batch, and each
batch is scored for every query at once, so memory stays bounded whatever the number of images.
The image tokens are rounded to float16 exactly as the token store keeps them, so an image scores
the same here as through `rankpipe eval` on a store embedded from it.

Queries. A query the checkpoint was trained on uses its training text tokens and normalisation, and
its scores come out in label units (target units for a "distance" target). Any other sentence is
run through the backbone's text tower; the adapter can score it (the paper ranks unseen categories)
but no normalisation was ever fitted for it, so its scores are raw adapter outputs.

Several queries combine as in the paper's appendix E — one score per query, each normalised, then
combined with a weight per query — with a weighted sum of z-scores (`rankpipe.adapter.evaluation.ranking`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from rankpipe.adapter.evaluation.rankers import FeatureKind, Query
from rankpipe.adapter.evaluation.ranking import (
    COMBINE_RULES,
    QueryScores,
    Ranking,
    combine_scores,
)
from rankpipe.adapter.evaluation.scoring import LoadedCheckpoint, load_checkpoint, query_tokens
from rankpipe.devices import autocast, torch_device_for
from rankpipe.errors import InputError
from rankpipe.pipeline.data.image_inputs import ImageBatches, ImageSource, open_images
from rankpipe.pipeline.embed.backbone import Backbone, TextFeatures
from rankpipe.pipeline.embed.recorded_backbone import load_recorded_backbone

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RankConfig:
    """What to rank by and how to combine several queries."""

    # The ranking sentences, in order; at least one.
    queries: tuple[str, ...]
    # One weight per query for the combined score; empty means equal weights 1/Q.
    weights: tuple[float, ...] = ()
    # How several queries combine: "product" (the paper's) or "sum"; see combine_scores.
    combine: str = "product"
    # Images per backbone and adapter forward pass.
    batch_size: int = 64
    # Decoding processes (0 decodes in the main process).
    workers: int = 0

    def __post_init__(self) -> None:
        if not self.queries or any(not q.strip() for q in self.queries):
            raise InputError("pass at least one non-empty --query \"Sort images by ...\"")
        if len(set(self.queries)) != len(self.queries):
            raise InputError(f"a --query is repeated ({list(self.queries)}); pass each query once and weight it with --weight")
        if self.weights and len(self.weights) != len(self.queries):
            raise InputError(
                f"{len(self.weights)} --weight value(s) for {len(self.queries)} --query value(s); "
                "pass one weight per query, in the same order, or none for equal weights"
            )
        if not all(np.isfinite(w) for w in self.weights):
            raise InputError(f"--weight values must be finite numbers, got {list(self.weights)}")
        if self.weights and not any(self.weights):
            raise InputError("every --weight is 0, which ranks nothing; give at least one query a non-zero weight")
        if self.combine not in COMBINE_RULES:
            raise InputError(f"--combine must be one of {', '.join(COMBINE_RULES)}, not {self.combine!r}")
        if self.batch_size < 1 or self.workers < 0:
            raise InputError(f"need batch size >= 1 and workers >= 0, got {self.batch_size} and {self.workers}")

    @property
    def query_weights(self) -> np.ndarray:
        """[Q] float64 weights, equal weights 1/Q when none were given."""
        if self.weights:
            return np.asarray(self.weights, dtype=np.float64)
        return np.full(len(self.queries), 1.0 / len(self.queries))


def query_texts(loaded: LoadedCheckpoint, encode_text: Callable[[str], TextFeatures], queries: tuple[str, ...]) -> list[Query]:
    """Each query as the ranker scores it: the checkpoint's own for its trained queries, else the text tower's tokens.

    Args:
        loaded: the checkpoint.
        encode_text: the text tower of the checkpoint's backbone; called only for sentences the
            checkpoint was not trained on.
        queries: the sentences, in order.

    Raises:
        InputError: an untrained sentence for a ranker that scores only its own queries (a baseline).
    """
    known = {label.query: name for name, label in loaded.labels.items()}
    out = []
    for sentence in queries:
        if sentence in known:
            out.append(loaded.query(known[sentence]))
            continue
        trained = ", ".join(repr(label.query) for label in loaded.labels.values())
        tokens = query_tokens(encode_text(sentence), loaded.device)  # [L, Dt]
        try:
            query = loaded.ranker.unseen_query(sentence, tokens)
        except InputError as e:
            raise InputError(f"checkpoint {loaded.path}: {e}; rank by one of them ({trained})") from e
        log.info("query %r is not one of the checkpoint's; its scores are raw adapter outputs", sentence)
        out.append(query)
    return out


def rank_images(
    checkpoint: str | Path,
    images: str,
    config: RankConfig,
    device: str = "cpu",
    backbone_weights: str | Path | None = None,
    progress: bool = False,
) -> Ranking:
    """Rank a folder of images or a set of tars by one or more queries with a trained checkpoint.

    Args:
        checkpoint: a checkpoint .pt written by `rankpipe train`, or its run folder (best.pt).
        images: a folder (searched recursively for jpg/jpeg/png/webp) or a brace pattern of tars.
        config: queries, weights and batch sizes.
        device: "cpu" or "cuda[:i]"; the backbone and the adapter both run there.
        backbone_weights: the backbone's weights file when the checkpoint's provenance needs one.
        progress: show a progress bar.

    Returns:
        The ranking of every readable image, and the skipped ones.

    Raises:
        InputError: bad inputs (no images, unknown checkpoint, weights that cannot be loaded...), or
            no image could be read.
    """
    torch_device = torch_device_for(device)
    source = open_images(images)
    loaded = load_checkpoint(checkpoint, torch_device)
    backbone = load_recorded_backbone(loaded.provenance, torch_device, backbone_weights, f"checkpoint {loaded.path}")
    texts = query_texts(loaded, backbone.encode_text, config.queries)
    keys, paths, sources, skipped = [], [], [], []
    parts: list[list[np.ndarray]] = [[] for _ in texts]
    for batch in _batches(source, backbone, config, progress):
        skipped.extend(batch.skipped)
        if batch.images is None:
            continue
        features = encode_features(backbone, batch.images)  # [b, P, D] tokens, [b, E] embed, float16
        for part, scores in zip(parts, loaded.ranker.score(features[loaded.ranker.reads], texts)):
            part.append(scores)
        keys.extend(batch.keys)
        paths.extend(batch.paths)
        sources.extend(batch.sources)
    if not keys:
        reason = skipped[0].reason if skipped else "no samples found"
        raise InputError(f"none of the images in {images} could be read ({len(skipped)} skipped; first reason: {reason})")
    if skipped:
        log.warning("skipped %d unreadable image(s) of %s", len(skipped), images)
    query_scores = []
    for text, chunks in zip(texts, parts):
        query_scores.append(QueryScores(text.sentence, text.label, np.concatenate(chunks)))  # [n]
    weights = config.query_weights
    combined = combine_scores(np.stack([q.scores for q in query_scores]), weights, config.combine)  # [n]
    return Ranking(np.asarray(keys, dtype=str), np.asarray(paths, dtype=str), query_scores, weights, combined, skipped,
                   config.combine, sources=np.asarray(sources, dtype=str))


@torch.inference_mode()
def encode_features(backbone: Backbone, images: torch.Tensor) -> dict[FeatureKind, torch.Tensor]:
    """[b, 3, H, W] preprocessed images -> {"tokens": [b, P, D] patch tokens, "embed": [b, E] pooled
    embeddings}, float16, as `rankpipe embed` stores them."""
    images = images.to(backbone.device, non_blocking=True)
    # The same compute dtype as the embed job: bf16 autocast on CUDA, float32 on the CPU.
    with autocast(backbone.device):
        tokens, embed = backbone.encode_images(images)  # [b, P, D], [b, E]
    return {"tokens": tokens.to(torch.float16), "embed": embed.to(torch.float16)}


def _batches(source: ImageSource, backbone: Backbone, config: RankConfig, progress: bool):
    dataset = ImageBatches(source, backbone.preprocess, config.batch_size)
    workers = min(config.workers, len(source.items))
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers,
                                         pin_memory=backbone.device.type == "cuda",
                                         prefetch_factor=4 if workers else None)
    total = len(source.items) if source.kind == "folder" else None
    with tqdm(total=total, unit="img", disable=not progress, desc="rank", dynamic_ncols=True) as bar:
        for batch in loader:
            bar.update(len(batch.keys) + len(batch.skipped))
            yield batch
