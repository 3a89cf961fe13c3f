"""Scoring images with a trained checkpoint: load it, predict in label units.

An adapter checkpoint scores patch tokens with the regression head only (no pairs), and the scores
are mapped back through the query's training normalisation. A baseline checkpoint (a `method` other
than "adapter", see adapter/baselines) scores the pooled image embeddings and predicts target units
itself. Either way an "identity" target comes out in label units, a "distance" target in target units
(-|label - reference|; higher = closer to the reference).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from rankpipe.adapter.baselines import Baseline, get_method
from rankpipe.adapter.training.checkpoint import ADAPTER_METHOD, checkpoint_method, read_checkpoint
from rankpipe.adapter.training.features import autocast
from rankpipe.adapter.model.adapter import RankingAdapter
from rankpipe.adapter.training.run_config import RunConfig
from rankpipe.adapter.training.targets import TargetScale
from rankpipe.errors import InputError
from rankpipe.pipeline.embed.backbone import TextFeatures, compatibility_problem
from rankpipe.pipeline.data.manifest import SplitSpec

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CheckpointLabel:
    """A query the adapter was trained on."""

    # Label name in the store.
    name: str
    # The sentence that ranks by it.
    query: str
    # [L, Dt] float32 text tokens the adapter was trained with, on the checkpoint's device; None for
    # a baseline, which keeps what it needs of the query in its own parameters.
    text_tokens: torch.Tensor | None
    # Target transform and training normalisation.
    scale: TargetScale


@dataclasses.dataclass
class LoadedCheckpoint:
    """A trained adapter ready to score images."""

    # Where it was read from.
    path: Path
    # The adapter, in eval mode, on `device`; None for a baseline.
    model: RankingAdapter | None
    # The run config it was trained with; None for a baseline.
    run_config: RunConfig | None
    # The token store's provenance it was trained on; stores must match it.
    provenance: dict
    # Its queries by label name.
    labels: dict[str, CheckpointLabel]
    # Optimiser steps it was trained for.
    step: int
    # Validation SRCC per label at `step`.
    val_srcc: dict[str, float]
    # Where the model lives.
    device: torch.device
    # The split roles it was trained with; None when the checkpoint does not record them.
    splits: SplitSpec | None = None
    # "adapter", or the name of the baseline method (adapter/baselines) the checkpoint holds.
    method: str = ADAPTER_METHOD
    # The fitted baseline when `method` is not "adapter"; it scores pooled image embeddings.
    baseline: Baseline | None = None

    @property
    def scales(self) -> dict[str, TargetScale]:
        """Target normalisation per label."""
        return {name: label.scale for name, label in self.labels.items()}


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Rebuild the adapter or baseline of a checkpoint (a .pt file, or a run folder meaning its best.pt).

    Raises:
        InputError: the file is missing or not a rankpipe checkpoint, or holds a method this rankpipe
            does not know.
    """
    device = torch.device(device)
    payload = read_checkpoint(path, map_location="cpu")
    path = Path(path)
    common = dict(
        path=path / "best.pt" if path.is_dir() else path,
        provenance=payload["provenance"],
        step=int(payload["step"]),
        val_srcc=dict(payload.get("val_srcc", {})),
        device=device,
        splits=payload_splits(payload),
    )
    if checkpoint_method(payload) != ADAPTER_METHOD:
        return _load_baseline(payload, common)
    run_config = RunConfig.from_json(payload["run_config"])
    dims = payload["dims"]
    model = RankingAdapter(run_config.adapter, int(dims["image_token_dim"]), int(dims["text_token_dim"]))
    model.load_state_dict(payload["model"])
    model.to(device).eval()
    labels = {
        entry["name"]: CheckpointLabel(
            name=entry["name"],
            query=entry["query"],
            text_tokens=entry["text_tokens"].to(device=device, dtype=torch.float32),
            scale=TargetScale.from_dict(entry["target"]),
        )
        for entry in payload["labels"]
    }
    return LoadedCheckpoint(model=model, run_config=run_config, labels=labels, **common)


def payload_splits(payload: dict) -> SplitSpec | None:
    """The split roles a checkpoint's payload records, or None when it does not record them."""
    splits = payload.get("splits")
    return None if splits is None else SplitSpec(**{role: tuple(values) for role, values in splits.items()})


def _load_baseline(payload: dict, common: dict) -> LoadedCheckpoint:
    """A baseline's checkpoint: its fitted state instead of an adapter, labels without text tokens."""
    method = checkpoint_method(payload)
    try:
        cls = get_method(method)
    except InputError as e:
        raise InputError(f"checkpoint {common['path']} holds method {method!r}, which this rankpipe does not know ({e})") from e
    labels = {
        entry["name"]: CheckpointLabel(entry["name"], entry["query"], None, TargetScale.from_dict(entry["target"]))
        for entry in payload["labels"]
    }
    baseline = cls.from_state(payload["method_config"], payload["model"])
    return LoadedCheckpoint(model=None, run_config=None, labels=labels, method=method, baseline=baseline, **common)


def check_compatible(provenance: dict, store, what: str) -> None:
    """Refuse a store whose backbone differs from the one `provenance` (of `what`) was made with.

    Raises:
        InputError: naming the first differing field.
    """
    problem = compatibility_problem(provenance, store.provenance)
    if problem is not None:
        raise InputError(
            f"store {store.path} was embedded with another backbone than {what} ({problem}); "
            "use a store embedded with the same model, weights and preprocessing"
        )


def predict(
    loaded: LoadedCheckpoint,
    store,
    label: str,
    rows: np.ndarray,
    batch_size: int = 256,
) -> np.ndarray:
    """Scores of the images at `rows` of a TokenStore for the query of `label`.

    The query's text tokens come from the checkpoint, so a store without that label (new images)
    can be scored too.

    Args:
        loaded: from `load_checkpoint`.
        store: a TokenStore embedded with the checkpoint's backbone.
        label: one of the checkpoint's label names.
        rows: [n] store rows to score.
        batch_size: images per forward pass.

    Returns:
        [n] float64 scores in label units (target units for a "distance" target).

    Raises:
        InputError: unknown label, or a store from another backbone.
    """
    return predict_labels(loaded, store, [label], rows, batch_size)[label]


def predict_labels(
    loaded: LoadedCheckpoint,
    store,
    labels: Sequence[str],
    rows: np.ndarray,
    batch_size: int = 256,
) -> dict[str, np.ndarray]:
    """`predict` for several labels at once: each batch of image features is read from the store once
    and scored for every label, instead of once per label.

    Returns:
        label -> [n] float64 scores in label units, in the order of `rows`.
    """
    for label in labels:
        if label not in loaded.labels:
            raise InputError(
                f"checkpoint {loaded.path} was not trained on label {label!r}; its labels are {', '.join(loaded.labels)}"
            )
    check_compatible(loaded.provenance, store, f"checkpoint {loaded.path}")
    if loaded.baseline is not None:

        def score_embeddings(batch_rows: np.ndarray) -> dict[str, np.ndarray]:
            embed = store.image_embed(batch_rows)  # [b, E]
            return {label: loaded.baseline.predict(label, embed) for label in labels}

        # Baselines predict in target units already.
        return _in_store_order(rows, batch_size, labels, score_embeddings)
    texts = {label: loaded.labels[label].text_tokens for label in labels}
    raw = adapter_scores(loaded, store, texts, rows, batch_size)  # normalised units
    return {label: loaded.labels[label].scale.to_target_units(raw[label]) for label in labels}


def adapter_scores(
    loaded: LoadedCheckpoint,
    store,
    texts: dict[str, torch.Tensor],
    rows: np.ndarray,
    batch_size: int = 256,
) -> dict[str, np.ndarray]:
    """The adapter's regression scores (normalised units) of the images at `rows` for several queries;
    each batch of image tokens is read from the store once and scored for every query.

    Args:
        loaded: an adapter checkpoint from `load_checkpoint`.
        store: a TokenStore embedded with the checkpoint's backbone.
        texts: name -> [L, Dt] float32 text tokens of a query, on the checkpoint's device.
        rows: [n] store rows to score.
        batch_size: images per forward pass.

    Returns:
        name -> [n] float64 scores, in the order of `rows`.
    """

    def score_tokens(batch_rows: np.ndarray) -> dict[str, np.ndarray]:
        tokens = torch.from_numpy(np.ascontiguousarray(store.image_tokens(batch_rows), dtype=np.float16))  # [b, P, D]
        return {name: score_batches(loaded.model, text, [tokens], loaded.device) for name, text in texts.items()}

    return _in_store_order(rows, batch_size, list(texts), score_tokens)


def _in_store_order(
    rows: np.ndarray,
    batch_size: int,
    names: Sequence[str],
    score: Callable[[np.ndarray], dict[str, np.ndarray]],
) -> dict[str, np.ndarray]:
    """Run `score` ([b] ascending store rows -> name -> [b] scores) over `rows` in ascending batches, the
    order the store reads, and return each name's [n] float64 scores in the order of `rows`."""
    rows = np.asarray(rows, dtype=np.int64)
    order = np.argsort(rows, kind="stable")
    sorted_rows = rows[order]
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for i in range(0, len(rows), batch_size):
        for name, scores in score(sorted_rows[i : i + batch_size]).items():
            parts[name].append(scores)
    out = {}
    for name in names:
        scores = np.empty(len(rows), dtype=np.float64)
        scores[order] = np.concatenate(parts[name]) if parts[name] else np.zeros(0)
        out[name] = scores
    return out


def predict_embeddings(loaded: LoadedCheckpoint, label: str, embed: np.ndarray) -> np.ndarray:
    """A baseline checkpoint's scores of pooled image embeddings, in label units.

    Args:
        loaded: a baseline checkpoint from `load_checkpoint`.
        label: one of its label names.
        embed: [n, E] CLIP's pooled, projected image embeddings (as the store's image/embed).

    Returns:
        [n] float64 scores in label units (target units for a "distance" target).

    Raises:
        InputError: an adapter checkpoint (it scores patch tokens), or an unknown label.
    """
    if loaded.baseline is None:
        raise InputError(f"checkpoint {loaded.path} is a ranking adapter, which scores patch tokens, not pooled embeddings")
    if label not in loaded.labels:
        raise InputError(
            f"checkpoint {loaded.path} was not trained on label {label!r}; its labels are {', '.join(loaded.labels)}"
        )
    return loaded.baseline.predict(label, embed)


def query_tokens(text: TextFeatures, device: torch.device) -> torch.Tensor:
    """[L, Dt] float32 text tokens of a query up to and including end-of-text (as training uses them), on `device`."""
    return torch.from_numpy(np.asarray(text.tokens[: text.length], dtype=np.float32)).to(device)


@torch.no_grad()
def score_batches(
    model: RankingAdapter,
    text_tokens: torch.Tensor,
    image_batches: Iterable[torch.Tensor],
    device: torch.device,
) -> np.ndarray:
    """Regression scores (normalised units) of image-token batches, concatenated.

    Args:
        model: the adapter; put in eval mode for the call and restored afterwards.
        text_tokens: [L, Dt] the query's text tokens, on `device`.
        image_batches: [n_i, P, D] image tokens per batch (any device, any float dtype).
        device: where the model runs.

    Returns:
        [sum n_i] float64 scores.
    """
    was_training = model.training
    model.eval()
    out = []
    try:
        for tokens in image_batches:
            tokens = tokens.to(device=device, non_blocking=True).float()  # [n, P, D]
            with autocast(device):
                scores = model(tokens, text_tokens, with_pairs=False).scores  # [n]
            out.append(scores.float())
    finally:
        model.train(was_training)
    if not out:
        return np.zeros(0, dtype=np.float64)
    return torch.cat(out).cpu().numpy().astype(np.float64)
