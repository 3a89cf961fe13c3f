"""Cached features on the training device, and the batches drawn from them.

The image tokens of every row that training or validation needs are read from the store once and
kept on the device as one fp16 tensor; a step then gathers its batch with an index tensor, so the
loop does no host work and no host-device copies. Each query (label) keeps its own text tokens,
row indices and normalised targets on the device. (A store too large for the budget is streamed
instead: see rankpipe.adapter.training.streaming, which draws its batches through the same interface.)

Queries are mixed by drawing one query per step with probability proportional to its number of
training images, so every training image is seen about equally often whatever query it belongs to
(`train.sampling=released` draws the query uniformly and weights its images, see BatchSampler).
A store with a flip view keeps its mirror images' tokens resident too, and each image of a batch
trains on one of the two views (adapter/training/views.py).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator

import numpy as np
import torch

from rankpipe.adapter.training.targets import (
    TargetScale,
    fit_target_scale,
    transform_target,
)
from rankpipe.adapter.training.views import gather_views
from rankpipe.errors import InputError
from rankpipe.pipeline.embed.cache_choices import HFLIP, ORIGINAL, cache_choices
from rankpipe.pipeline.labelled_store import LabelledStore, TrainValRows
from rankpipe.pipeline.store import TokenStore

log = logging.getLogger(__name__)

# Steps per block of the precomputed query schedule (one numpy draw per block, cached).
_SCHEDULE_BLOCK = 4096


@dataclasses.dataclass
class QueryFeatures:
    """One query (label): its text tokens and the resident rows of its train and val images."""

    # Label name in the store.
    name: str
    # The sentence that ranks by the label.
    query: str
    # [L, Dt] float32 text tokens up to and including end-of-text, on the device.
    text_tokens: torch.Tensor
    # Target transform and training-split normalisation.
    scale: TargetScale
    # [n_train] int64 indices into ResidentFeatures.image_tokens, on the device.
    train_index: torch.Tensor
    # [n_train] float32 normalised targets, on the device.
    train_targets: torch.Tensor
    # [n_val] int64 indices into ResidentFeatures.image_tokens, on the device.
    val_index: torch.Tensor
    # [n_val] float64 targets in target units, on the host (validation SRCC is computed there).
    val_targets: np.ndarray


@dataclasses.dataclass(frozen=True)
class TrainBatch:
    """One training step's batch: images of a single query."""

    # Index of the query in the features' `queries`.
    query_index: int
    # [B, P, D] float16 image tokens, on the device.
    image_tokens: torch.Tensor
    # [B] float32 normalised targets, on the device.
    targets: torch.Tensor
    # [B] int64 indices into the features' `keys` (to name a bad batch).
    rows: torch.Tensor


@dataclasses.dataclass
class ResidentFeatures:
    """Image tokens of all needed rows on the device, and the queries that index them."""

    # [R, P, D] float16 image tokens, on the device.
    image_tokens: torch.Tensor
    # [R] WebDataset keys of the resident rows (to name a bad batch).
    keys: np.ndarray
    # The queries trained together.
    queries: list[QueryFeatures]
    # Per query index: [m] resident rows that can serve it as zero-count negatives (filled when drawn).
    negative_pools: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict, init=False, repr=False)
    # [R, P, D] float16 tokens of the same rows' mirror images (a store with a flip view), or None.
    flipped_tokens: torch.Tensor | None = None

    @property
    def image_token_dim(self) -> int:
        return int(self.image_tokens.shape[-1])

    @property
    def text_token_dim(self) -> int:
        return int(self.queries[0].text_tokens.shape[-1])

    @property
    def train_sizes(self) -> list[int]:
        """Training images of each query."""
        return [len(q.train_index) for q in self.queries]

    def train_batch(self, step: int, sampler: BatchSampler) -> TrainBatch:
        """The batch of `step` (1-based): the sampler's query, a random subset of its training rows,
        and, with negatives, rows of the other queries' training images with the target of a zero label."""
        query_index = sampler.query_for(step)
        query = self.queries[query_index]
        pool = self._negative_pool(query_index) if sampler.negative_share > 0 else None
        pos, neg = sampler.draw(query.train_targets, 0 if pool is None else len(pool))  # [b], [B - b]
        rows = query.train_index[pos]  # [b] resident rows
        targets = query.train_targets[pos]  # [b]
        if pool is not None:
            zero = float(query.scale.normalise(np.zeros(1))[0])  # a zero count, normalised for this query
            negatives = pool[neg]  # [B - b] resident rows
            rows = torch.cat([rows, negatives])  # [B]
            targets = torch.cat([targets, torch.full_like(negatives, zero, dtype=targets.dtype)])  # [B]
        tokens = gather_views(self.image_tokens, self.flipped_tokens, rows, sampler.seed, step)  # [B, P, D]
        return TrainBatch(query_index, tokens, targets, rows)

    def _negative_pool(self, query_index: int) -> torch.Tensor:
        """[m] resident rows of the other queries' training images that this query has no label for (cached)."""
        if query_index not in self.negative_pools:
            own = self.queries[query_index]
            others = torch.cat([q.train_index for i, q in enumerate(self.queries) if i != query_index]).unique()
            labelled = torch.cat([own.train_index, own.val_index])
            self.negative_pools[query_index] = others[~torch.isin(others, labelled)]  # [m]
        return self.negative_pools[query_index]

    def val_batches(self, query_index: int, batch_size: int) -> Iterator[torch.Tensor]:
        """[b, P, D] image tokens of a query's val rows, `batch_size` at a time, in val_targets order."""
        query = self.queries[query_index]
        return (self.image_tokens[chunk] for chunk in query.val_index.split(batch_size))


def build_features(
    image_tokens: torch.Tensor,
    keys: np.ndarray,
    queries: list[dict],
    device: torch.device | str,
    flipped_tokens: torch.Tensor | None = None,
) -> ResidentFeatures:
    """Resident features from in-memory arrays.

    Args:
        image_tokens: [R, P, D] image tokens of every resident row (any float dtype; kept as fp16).
        flipped_tokens: [R, P, D] tokens of the same rows' mirror images, or None (no flip view).
        keys: [R] row keys.
        queries: one dict per query with name, query, text_tokens [L, Dt], transform (TargetTransform),
            train_rows / val_rows (int indices into the R rows) and train_labels / val_labels (raw labels).
        device: where to keep everything.
    """
    device = torch.device(device)
    out = []
    for q in queries:
        scale, train_targets, val_targets = query_targets(q)
        out.append(
            QueryFeatures(
                name=q["name"],
                query=q["query"],
                text_tokens=torch.as_tensor(np.asarray(q["text_tokens"], dtype=np.float32), device=device),
                scale=scale,
                train_index=torch.as_tensor(np.asarray(q["train_rows"], dtype=np.int64), device=device),
                train_targets=torch.as_tensor(train_targets, device=device),
                val_index=torch.as_tensor(np.asarray(q["val_rows"], dtype=np.int64), device=device),
                val_targets=val_targets,
            )
        )
    tokens = torch.as_tensor(image_tokens).to(device=device, dtype=torch.float16)
    flipped = None if flipped_tokens is None else torch.as_tensor(flipped_tokens).to(device=device, dtype=torch.float16)
    return ResidentFeatures(image_tokens=tokens, keys=np.asarray(keys), queries=out, flipped_tokens=flipped)


def query_targets(q: dict) -> tuple[TargetScale, np.ndarray, np.ndarray]:
    """A query's TargetScale fitted on its train labels, [n_train] float32 normalised train targets and
    [n_val] float64 val targets in target units (q: a query dict of build_features)."""
    scale = fit_target_scale(np.asarray(q["train_labels"]), q["transform"], q["name"])
    train_targets = np.asarray(scale.normalise(q["train_labels"]), dtype=np.float32)
    return scale, train_targets, transform_target(q["val_labels"], q["transform"])


def load_features(data: LabelledStore, device: torch.device | str, max_resident_gb: float) -> ResidentFeatures:
    """Read the train and val rows of the labels of `data` onto the device.

    Raises:
        InputError: a label has fewer than 2 train or val images, or the tokens exceed `max_resident_gb`.
    """
    per_label = data.split_rows()
    rows = needed_rows(per_label)
    gigabytes = token_gigabytes(data.store, len(rows)) * view_count(data.store)
    if gigabytes > max_resident_gb:
        raise InputError(
            f"the {len(rows)} train/val images need {gigabytes:.1f} GB of image tokens, more than "
            f"train.max_resident_gb={max_resident_gb}; raise it with --set train.max_resident_gb=N if the "
            "device has the memory"
        )
    return read_resident(data, per_label, device)


def train_val_gigabytes(data: LabelledStore) -> float:
    """GB of fp16 image tokens that the train and val rows of the labels of `data` take when resident (every view)."""
    return token_gigabytes(data.store, len(needed_rows(data.split_rows()))) * view_count(data.store)


def view_count(store) -> int:
    """Views of every image the store holds (2 with a flip view), each kept on the device for training."""
    return len(cache_choices(store.provenance).views)


def needed_rows(per_label: dict[str, tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """[R] sorted store rows that any label trains or validates on."""
    return np.unique(np.concatenate([np.concatenate(pair) for pair in per_label.values()]))


def token_shape(store: TokenStore) -> tuple[int, int]:
    """(P, D): image tokens per row and their width, from a zero-row read (array metadata, no chunk)."""
    _, num_tokens, dim = store.image_tokens(slice(0, 0)).shape
    return num_tokens, dim


def token_gigabytes(store: TokenStore, num_rows: int) -> float:
    """GB of fp16 image tokens of `num_rows` rows of the store."""
    num_tokens, dim = token_shape(store)
    return num_rows * num_tokens * dim * 2 / 1e9


def query_inputs(data: LabelledStore, name: str, train_rows: np.ndarray, val_rows: np.ndarray) -> dict:
    """A label's query sentence, text tokens, target transform and raw train/val labels (see build_features)."""
    raw = data.store.label(name)
    text = data.store.text(name)
    return {
        "name": name,
        "query": data.store.query(name),
        "text_tokens": np.asarray(text.tokens[: text.length], dtype=np.float32),
        "transform": data.manifest.label(name).target,
        "train_labels": raw[train_rows],
        "val_labels": raw[val_rows],
    }


def read_resident(data: LabelledStore, per_label: dict[str, TrainValRows], device: torch.device | str) -> ResidentFeatures:
    """Resident features of the rows in `per_label` (from `data.split_rows()`), read onto the device."""
    rows = needed_rows(per_label)  # [R] ascending, so a row's position is its searchsorted index
    tokens = read_rows(data.store, rows, device)
    refuse_non_finite(data.store, rows, tokens)
    flipped = None
    if cache_choices(data.store.provenance).flip_view:
        flipped = read_rows(data.store, rows, device, HFLIP)  # [R, P, D]
        refuse_non_finite(data.store, rows, flipped)
    queries = []
    for name, (train_rows, val_rows) in per_label.items():
        queries.append({
            **query_inputs(data, name, train_rows, val_rows),
            "train_rows": np.searchsorted(rows, train_rows),
            "val_rows": np.searchsorted(rows, val_rows),
        })
    _, num_tokens, dim = tokens.shape
    log.info("resident image tokens: %d rows x %d x %d x %d view(s) (%.2f GB)", len(rows), num_tokens, dim,
             view_count(data.store), tokens.numel() * tokens.element_size() * view_count(data.store) / 1e9)
    return build_features(tokens, data.store.keys()[rows], queries, device, flipped)


def read_rows(store: TokenStore, rows: np.ndarray, device: torch.device | str, view: str = ORIGINAL) -> torch.Tensor:
    """[R, P, D] fp16 tokens of sorted `rows` (of one of the store's views), read one row block at a time
    into a device tensor."""
    out = torch.empty((len(rows), *token_shape(store)), dtype=torch.float16, device=device)
    for start, stop in store.row_blocks():
        lo, hi = np.searchsorted(rows, [start, stop])
        if hi > lo:
            tokens = store.image_tokens(rows[lo:hi], view)  # [hi - lo, P, D]
            out[lo:hi] = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.float16)).to(device)
    return out


class BatchSampler:
    """Draws each step's query and a batch of that query's training images.

    The query of step s is a pure function of (seed, s) — drawn in blocks from numpy with probability
    proportional to each query's training images, or uniformly with `sampling="released"` — so it
    needs no state and no device sync. The images are drawn on the device with a seeded generator
    whose state is checkpointed: a uniform subset, or with "released" a subset weighted by the inverse
    frequency of each image's target (its label value), as the released loader's per-class weights.
    With `negative_share` a share of the batch comes from a pool of other images (see `draw`).
    """

    def __init__(self, train_sizes: list[int], batch_size: int, seed: int, device: torch.device | str,
                 sampling: str = "proportional", negative_share: float = 0.0):
        sizes = np.asarray(train_sizes, dtype=np.float64)
        if sampling == "released":
            sizes = (sizes > 0).astype(np.float64)  # every query with training images equally often
        self.weights = sizes / sizes.sum()  # [Q] probability of each query per step
        self.batch_size = batch_size
        self.seed = seed
        self.inverse_frequency = sampling == "released"
        self.negative_share = negative_share
        self.generator = torch.Generator(device=torch.device(device))
        self.generator.manual_seed(seed)
        self._block: tuple[int, np.ndarray] | None = None
        self._image_weights: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def query_for(self, step: int) -> int:
        """Index of the query trained at `step` (1-based)."""
        block = (step - 1) // _SCHEDULE_BLOCK
        if self._block is None or self._block[0] != block:
            rng = np.random.default_rng([self.seed, block])
            self._block = (block, rng.choice(len(self.weights), size=_SCHEDULE_BLOCK, p=self.weights))
        return int(self._block[1][(step - 1) % _SCHEDULE_BLOCK])

    def sample(self, num_train: int, device: torch.device | str) -> torch.Tensor:
        """[B] positions into a query's training rows, without repeats; B = min(batch_size, num_train)."""
        perm = torch.randperm(num_train, generator=self.generator, device=device)  # [num_train]
        return perm[: self.batch_size]

    def draw(self, targets: torch.Tensor, pool_size: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions of one batch: into a query's training rows ([b], without repeats) and into a pool
        of `pool_size` negative rows ([B - b], with repeats, as the released loader).

        Without negatives b = min(batch_size, n). With them, b = min(floor(batch_size · (1 -
        negative_share)), n) and negatives fill the batch to batch_size, as in the released loader.

        Args:
            targets: [n] the query's normalised training targets (equal values = equal labels), on the device.
            pool_size: rows in the negative pool; 0 draws none.
        """
        n = targets.shape[0]
        device = targets.device
        if self.negative_share > 0 and pool_size > 0:
            own = min(int(self.batch_size * (1 - self.negative_share) + 1e-9), n)
            negatives = torch.randint(pool_size, (self.batch_size - own,), generator=self.generator, device=device)
        else:
            own = min(self.batch_size, n)
            negatives = torch.zeros(0, dtype=torch.int64, device=device)
        if not self.inverse_frequency:
            return self.sample(n, device)[:own], negatives
        weights = self._inverse_frequency(targets)  # [n]
        return torch.multinomial(weights, own, replacement=False, generator=self.generator), negatives

    def _inverse_frequency(self, targets: torch.Tensor) -> torch.Tensor:
        """[n] 1 / (how many of `targets` share each value), cached per targets tensor (unique() syncs a GPU)."""
        cached = self._image_weights.get(id(targets))
        if cached is not None and cached[0] is targets:
            return cached[1]
        _, inverse, counts = torch.unique(targets, return_inverse=True, return_counts=True)
        weights = 1.0 / counts[inverse].double()  # [n]
        if len(self._image_weights) > 256:  # a streamed run makes new targets tensors with every window
            self._image_weights.clear()
        self._image_weights[id(targets)] = (targets, weights)
        return weights

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def refuse_non_finite(store: TokenStore, rows: np.ndarray, tokens: torch.Tensor) -> None:
    """Refuse rows whose tokens are not all finite: one would turn every validation SRCC into NaN.

    A store embedded by this rankpipe marks such images invalid; only an older store holds them.

    Args:
        store: where the rows come from (named in the message).
        rows: [R] the store rows of `tokens`.
        tokens: [R, P, D] their image tokens.

    Raises:
        InputError: naming the first such row and what to do.
    """
    bad = (~torch.isfinite(tokens).flatten(1).all(dim=1)).nonzero().flatten()  # [b] positions
    if len(bad):
        first = int(rows[int(bad[0])])
        raise InputError(f"store {store.path} has {len(bad)} row(s) with NaN or infinite image tokens, e.g. "
                         f"{str(store.keys()[first])!r}; embed it again (--mode overwrite) so they become invalid rows")


def read_features(store, rows: np.ndarray, kind: str) -> torch.Tensor:
    """[b, P, D] patch tokens ("tokens") or [b, E] pooled embeddings ("embed") of ascending store `rows`,
    float16 as stored; rows that are not all finite are refused (see refuse_non_finite)."""
    values = store.image_tokens(rows) if kind == "tokens" else store.image_embed(rows)
    features = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float16))
    refuse_non_finite(store, rows, features)
    return features
