"""Scoring a store's images with a trained checkpoint: load it as a ranker, predict in label units.

The checkpoint becomes a `Ranker` (adapter/evaluation/rankers.py): an adapter scores patch tokens
with its regression head and maps them back through the query's training normalisation; a baseline
(a `method` other than "adapter", see adapter/baselines) scores the pooled image embeddings and
predicts target units itself. Either way an "identity" target comes out in label units, a "distance"
target in target units (-|label - reference|; higher = closer to the reference).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from rankpipe.adapter import ADAPTER_METHOD
from rankpipe.adapter.baselines import get_method
from rankpipe.adapter.evaluation.rankers import AdapterRanker, BaselineRanker, Query, Ranker
from rankpipe.adapter.model.adapter import RankingAdapter
from rankpipe.adapter.training.checkpoint import checkpoint_method, read_checkpoint
from rankpipe.adapter.training.features import read_features
from rankpipe.adapter.training.run_config import RunConfig
from rankpipe.adapter.training.targets import TargetScale
from rankpipe.errors import InputError
from rankpipe.pipeline.data.manifest import SplitSpec
from rankpipe.pipeline.embed.backbone import BACKBONE_FIELDS, TextFeatures, compatibility_problem
from rankpipe.pipeline.embed.cache_choices import checkpoint_store_problem

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
    """A trained ranker and what it was trained on."""

    # Where it was read from.
    path: Path
    # What scores images: the adapter, in eval mode on `device`, or a fitted baseline.
    ranker: Ranker
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
    # Where the ranker runs.
    device: torch.device
    # The split roles it was trained with; None when the checkpoint does not record them.
    splits: SplitSpec | None = None

    @property
    def method(self) -> str:
        """"adapter", or the name of the baseline method (adapter/baselines) the checkpoint holds."""
        return self.ranker.method

    @property
    def scales(self) -> dict[str, TargetScale]:
        """Target normalisation per label."""
        return {name: label.scale for name, label in self.labels.items()}

    def query(self, label: str) -> Query:
        """The ranker's query for one of its labels.

        Raises:
            InputError: the checkpoint was not trained on `label`.
        """
        if label not in self.labels:
            raise InputError(
                f"checkpoint {self.path} was not trained on label {label!r}; its labels are {', '.join(self.labels)}"
            )
        entry = self.labels[label]
        return self.ranker.query(entry.query, label, entry.text_tokens, entry.scale)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Rebuild the adapter or baseline of a checkpoint (a .pt file, or a run folder meaning its best.pt).

    Raises:
        InputError: the file is missing or not a rankpipe checkpoint, or holds a method this rankpipe
            does not know.
    """
    device = torch.device(device)
    payload = read_checkpoint(path, map_location="cpu")
    path = Path(path)
    path = path / "best.pt" if path.is_dir() else path
    try:
        return _load(payload, path, device)
    except KeyError as e:
        raise InputError(f"checkpoint {path} lacks its {e} field; it was not written by `rankpipe train` as it is "
                         "now: train it again") from e
    except (TypeError, ValueError) as e:  # a field of the wrong type or value
        if isinstance(e, InputError):
            raise
        raise InputError(f"checkpoint {path} holds a field of the wrong type or value ({type(e).__name__}: {e}); "
                         "it was not written by `rankpipe train` as it is now: train it again") from e


def _load(payload: dict, path: Path, device: torch.device) -> LoadedCheckpoint:
    common = dict(
        path=path,
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
    image_dim, text_dim = int(dims["image_token_dim"]), int(dims["text_token_dim"])
    _check_shapes(path, payload["model"], run_config, image_dim, text_dim)
    # Built on the meta device and given the checkpoint's tensors: initialising real weights would draw
    # from the process-wide generator, which a run training in another thread (a sweep trial) has just
    # seeded for its own initial weights.
    with torch.device("meta"):
        model = RankingAdapter(run_config.adapter, image_dim, text_dim)
    model.load_state_dict(payload["model"], assign=True)
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
    return LoadedCheckpoint(ranker=AdapterRanker(model, device), run_config=run_config, labels=labels, **common)


def _check_shapes(path: Path, state: dict, run_config: RunConfig, image_dim: int, text_dim: int) -> None:
    """Refuse weights whose names or shapes differ from the adapter the checkpoint's config describes.

    The adapter is built on the meta device (shapes, no memory), so a tampered config that claims a
    huge model costs nothing before it is refused.
    """
    with torch.device("meta"):
        skeleton = RankingAdapter(run_config.adapter, image_dim, text_dim)
    expected = {name: tuple(value.shape) for name, value in skeleton.state_dict().items()}
    if not isinstance(state, dict):
        raise InputError(f"checkpoint {path} holds no adapter weights; train it again")
    got = {name: tuple(value.shape) for name, value in state.items() if isinstance(value, torch.Tensor)}
    for name in sorted(set(expected) | set(got)):
        if expected.get(name) != got.get(name):
            raise InputError(f"checkpoint {path}: weight {name!r} has shape {got.get(name)} where its run config "
                             f"gives {expected.get(name)}; the file was altered or is damaged, train it again")


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
    ranker = BaselineRanker(method, cls.from_state(payload["method_config"], payload["model"]))
    return LoadedCheckpoint(ranker=ranker, run_config=None, labels=labels, **common)


def check_compatible(provenance: dict, store, what: str) -> None:
    """Refuse a store whose backbone or cache choices differ from those `provenance` (of `what`) records.

    The resize mode and token normalisation must agree; the views need not: scoring reads the original
    view, which a store with a flip view holds as one without does.

    Raises:
        InputError: naming the first differing choice or field.
    """
    problem = compatibility_problem(provenance, store.provenance, BACKBONE_FIELDS)
    sentence = checkpoint_store_problem(provenance, store.provenance, what, str(store.path))
    if problem is None and sentence is not None:
        raise InputError(sentence)
    problem = problem or compatibility_problem(provenance, store.provenance)
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
    queries = [loaded.query(label) for label in labels]
    check_compatible(loaded.provenance, store, f"checkpoint {loaded.path}")
    return store_scores(loaded.ranker, store, queries, rows, batch_size)


def store_scores(
    ranker: Ranker,
    store,
    queries: Sequence[Query],
    rows: np.ndarray,
    batch_size: int = 256,
) -> dict[str, np.ndarray]:
    """A ranker's scores of the images at `rows` of a store for several queries; each batch of features
    is read from the store once, in ascending row order (the order the store reads), and scored for
    every query.

    Args:
        ranker: from `load_checkpoint`, of the store's backbone.
        store: a TokenStore.
        queries: the queries, each named by its label (or its sentence for an unseen query).
        rows: [n] store rows to score.
        batch_size: images per forward pass.

    Returns:
        query name -> [n] float64 scores, in the order of `rows`.
    """
    names = [q.label or q.sentence for q in queries]
    rows = np.asarray(rows, dtype=np.int64)
    order = np.argsort(rows, kind="stable")
    sorted_rows = rows[order]
    parts: list[list[np.ndarray]] = [[] for _ in queries]
    for i in range(0, len(rows), batch_size):
        features = read_features(store, sorted_rows[i : i + batch_size], ranker.reads)
        for part, scores in zip(parts, ranker.score(features, queries)):
            part.append(scores)
    out = {}
    for name, part in zip(names, parts):
        scores = np.empty(len(rows), dtype=np.float64)
        scores[order] = np.concatenate(part) if part else np.zeros(0)
        out[name] = scores
    return out


def query_tokens(text: TextFeatures, device: torch.device) -> torch.Tensor:
    """[L, Dt] float32 text tokens of a query up to and including end-of-text (as training uses them), on `device`."""
    return torch.from_numpy(np.asarray(text.tokens[: text.length], dtype=np.float32)).to(device)
