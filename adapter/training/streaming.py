"""Training from a store larger than the memory budget: a window of row blocks on the device at a time.

When the train and val rows' image tokens exceed `train.max_resident_gb`, training keeps a *window*
of whole row blocks (each tar's rows, a whole number of Zarr shards: the store's natural read unit)
on the device and draws its batches there exactly as from resident features: one query per step, a
random subset of that query's training images in the window. Each epoch visits every block that has
training rows once, in a seeded permutation packed greedily into windows of at most half of what
validation leaves of the budget; while one window trains, the next is read in a background thread,
so the two never exceed the budget together. A window trains for a number of steps in proportion to
its training images (`train.window_steps` on average), so every image is seen about equally often.

Which window and which query train at a step are a function of (seed, step) alone, so a resumed run
reads the same windows and — with the sampler's checkpointed generator — draws the same batches.

Validation rows stay resident when they take at most a quarter of the budget; otherwise they are read
from the store at every validation. A store with a flip view puts both views of a window's training
rows on the device (a window then holds half the rows) and draws one per image as resident training
does; validation reads the original view only.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
from collections.abc import Iterator

import numpy as np
import torch

from rankpipe.adapter.training.features import (
    BatchSampler,
    ResidentFeatures,
    TrainBatch,
    needed_rows,
    query_inputs,
    query_targets,
    read_features,
    read_resident,
    read_rows,
    refuse_non_finite,
    token_gigabytes,
    token_shape,
    view_count,
)
from rankpipe.adapter.training.run_config import TrainConfig
from rankpipe.adapter.training.targets import TargetScale
from rankpipe.adapter.training.views import gather_views
from rankpipe.adapter.training.windows import WindowSchedule
from rankpipe.errors import InputError
from rankpipe.pipeline.embed.cache_choices import HFLIP, cache_choices
from rankpipe.pipeline.labelled_store import LabelledStore
from rankpipe.pipeline.store import TokenStore

log = logging.getLogger(__name__)

# Share of the budget that resident validation rows may take; the windows split what is left.
_VAL_SHARE = 0.25


@dataclasses.dataclass
class StreamedQuery:
    """One query (label): its text tokens, and its train and val rows in the store."""

    # Label name in the store.
    name: str
    # The sentence that ranks by the label.
    query: str
    # [L, Dt] float32 text tokens up to and including end-of-text, on the device.
    text_tokens: torch.Tensor
    # Target transform and training-split normalisation.
    scale: TargetScale
    # [n_train] int64 store rows of its training images, ascending.
    train_rows: np.ndarray
    # [n_train] float32 normalised targets of those rows.
    train_targets: np.ndarray
    # [n_val] int64 store rows of its val images, ascending.
    val_rows: np.ndarray
    # [n_val] float64 targets in target units, on the host (validation SRCC is computed there).
    val_targets: np.ndarray


@dataclasses.dataclass
class _Window:
    """The device-side tokens of a window's blocks and each query's rows in it."""

    # Indices into the schedule's blocks that the window holds.
    blocks: tuple[int, ...]
    # [W, P, D] float16 image tokens of the window's training rows, on the device.
    tokens: torch.Tensor
    # Per query: [n_q] int64 indices into `tokens` of its training rows in the window.
    local_index: list[torch.Tensor]
    # Per query: [n_q] int64 indices of the same rows into StreamingFeatures.keys.
    key_index: list[torch.Tensor]
    # Per query: [n_q] float32 normalised targets of the same rows.
    targets: list[torch.Tensor]
    # [W, P, D] float16 tokens of the same rows' mirror images (a store with a flip view), or None.
    flipped: torch.Tensor | None = None


class StreamingFeatures:
    """Training features read from the store a window at a time (the interface of ResidentFeatures)."""

    def __init__(
        self,
        store: TokenStore,
        queries: list[StreamedQuery],
        blocks: list[tuple[int, int]],
        schedule: WindowSchedule,
        val_rows: np.ndarray | None,
        device: torch.device,
    ):
        """
        Args:
            store: the open TokenStore the rows are read from.
            queries: the queries trained together.
            blocks: (row_start, row_stop) of each block the schedule indexes.
            schedule: the windows and queries of every step.
            val_rows: [V] ascending store rows of every query's val images to keep on the device, or
                None to read them from the store at every validation.
            device: where windows live and training runs.
        """
        self.store = store
        self.queries = queries
        self.blocks = blocks
        self.schedule = schedule
        self.device = device
        self.rows = needed_rows({q.name: (q.train_rows, q.val_rows) for q in queries})  # [R] store rows
        self.keys = store.keys()[self.rows]  # [R] keys of `rows`, what TrainBatch.rows index
        self.image_token_dim = token_shape(store)[1]
        self.val_tokens: torch.Tensor | None = None  # [V, P, D] float16 resident val rows, or None
        self.val_index: list[torch.Tensor] = []  # per query: [n_val] int64 indices into val_tokens
        if val_rows is not None:
            self.val_tokens = read_rows(store, val_rows, device)
            refuse_non_finite(store, val_rows, self.val_tokens)
            self.val_index = [torch.as_tensor(np.searchsorted(val_rows, q.val_rows), device=device) for q in queries]
        self._train_rows = np.unique(np.concatenate([q.train_rows for q in queries]))  # [N] ascending
        self._current: _Window | None = None
        self._pending: tuple[tuple[int, ...], concurrent.futures.Future] | None = None

    @property
    def text_token_dim(self) -> int:
        return int(self.queries[0].text_tokens.shape[-1])

    @property
    def train_sizes(self) -> list[int]:
        """Training images of each query in the whole store."""
        return [len(q.train_rows) for q in self.queries]

    def train_batch(self, step: int, sampler: BatchSampler) -> TrainBatch:
        """The batch of `step` (1-based): the schedule's query, a random subset of its rows in the window."""
        window = self._window_for(step)
        query_index = self.schedule.query_for(step)
        local = window.local_index[query_index]  # [n_q]
        pos, _ = sampler.draw(window.targets[query_index])  # [B] positions in the query's rows of the window
        tokens = gather_views(window.tokens, window.flipped, local[pos], sampler.seed, step)  # [B, P, D]
        return TrainBatch(query_index, tokens, window.targets[query_index][pos], window.key_index[query_index][pos])

    def val_batches(self, query_index: int, batch_size: int) -> Iterator[torch.Tensor]:
        """[b, P, D] image tokens of a query's val rows, `batch_size` at a time, in val_targets order."""
        if self.val_tokens is not None:
            return (self.val_tokens[chunk] for chunk in self.val_index[query_index].split(batch_size))
        rows = self.queries[query_index].val_rows
        return (read_features(self.store, rows[i : i + batch_size], "tokens") for i in range(0, len(rows), batch_size))

    def _window_for(self, step: int) -> _Window:
        """The window of `step`, switching to (and prefetching after) a new one when the schedule moves on."""
        plan = self.schedule.window_at(step)
        if self._current is not None and self._current.blocks == plan.blocks:
            return self._current
        self._current = None  # frees the old window before a synchronous read needs its memory
        if self._pending is not None and self._pending[0] == plan.blocks:
            window = self._pending[1].result()
        else:
            window = self._load(plan.blocks)  # the first step, or a resume: nothing was prefetched
        self._pending = None
        if self.device.type == "cuda":
            # Read on a side stream; tie its memory to the training stream before it is ever freed.
            stream = torch.cuda.current_stream(self.device)
            flipped = [] if window.flipped is None else [window.flipped]
            for tensor in [window.tokens, *flipped, *window.local_index, *window.key_index, *window.targets]:
                tensor.record_stream(stream)
        self._current = window
        following = self.schedule.window_at(plan.first_step + plan.steps)
        if following.blocks != plan.blocks:
            executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="rankpipe-window")
            self._pending = (following.blocks, executor.submit(self._load, following.blocks))
            executor.shutdown(wait=False)  # the thread ends when the read does
        return window

    def _load(self, blocks: tuple[int, ...]) -> _Window:
        """Read the training rows of `blocks` and put them on the device (runs in the background thread)."""
        in_window = np.zeros(len(self._train_rows), dtype=bool)
        for block in blocks:
            start, stop = self.blocks[block]
            lo, hi = np.searchsorted(self._train_rows, [start, stop])
            in_window[lo:hi] = True
        rows = self._train_rows[in_window]  # [W] ascending store rows
        host: list[torch.Tensor] = [read_rows(self.store, rows, "cpu")]  # [W, P, D] fp16
        refuse_non_finite(self.store, rows, host[0])
        for query in self.queries:
            keep = np.isin(query.train_rows, rows)
            host.append(torch.from_numpy(np.searchsorted(rows, query.train_rows[keep])))
            host.append(torch.from_numpy(np.searchsorted(self.rows, query.train_rows[keep])))
            host.append(torch.from_numpy(query.train_targets[keep]))
        flip_view = cache_choices(self.store.provenance).flip_view
        if flip_view:
            host.append(read_rows(self.store, rows, "cpu", HFLIP))  # [W, P, D] fp16, last
            refuse_non_finite(self.store, rows, host[-1])
        moved = _to_device(host, self.device)
        flipped = moved.pop() if flip_view else None
        return _Window(blocks, moved[0], moved[1::3], moved[2::3], moved[3::3], flipped)


def _to_device(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Copies of host tensors on `device`; on CUDA through pinned memory on a side stream, waited for here."""
    if device.type != "cuda":
        return [t.to(device) for t in tensors]
    stream = torch.cuda.Stream(device)
    with torch.cuda.stream(stream):
        out = [t.pin_memory().to(device, non_blocking=True) for t in tensors]
    stream.synchronize()
    return out


TrainingFeatures = ResidentFeatures | StreamingFeatures


def open_features(data: LabelledStore, device: torch.device | str, train: TrainConfig) -> TrainingFeatures:
    """The train and val rows of the labels of `data`: resident when they fit `train.max_resident_gb`, else streamed.

    Raises:
        InputError: a label has fewer than 2 train or val images, a block's training rows alone exceed
            a window's share of the budget, or no window can hold a pair of one label.
    """
    device = torch.device(device)
    store = data.store
    per_label = data.split_rows()
    budget = train.max_resident_gb
    views = view_count(store)  # training rows are held in every view, validation rows in the original only
    if token_gigabytes(store, len(needed_rows(per_label))) * views <= budget:
        return read_resident(data, per_label, device)

    # Before the window checks: no tar size or budget split would let a streamed store take negatives.
    if train.negative_share > 0:
        raise InputError(
            f"train.negative_share needs the train/val image tokens resident, but they exceed "
            f"train.max_resident_gb={budget}; raise it with --set train.max_resident_gb=N or set train.negative_share=0"
        )
    all_val_rows = np.unique(np.concatenate([val for _, val in per_label.values()]))  # [V] ascending
    val_gb = token_gigabytes(store, len(all_val_rows))
    val_resident = val_gb <= _VAL_SHARE * budget
    window_gb = (budget - (val_gb if val_resident else 0.0)) / 2
    capacity = int(window_gb / (token_gigabytes(store, 1) * views))

    queries = []
    for name, (train_rows, val_rows) in per_label.items():
        inputs = query_inputs(data, name, train_rows, val_rows)
        scale, train_targets, val_targets = query_targets(inputs)
        queries.append(StreamedQuery(
            name=name, query=inputs["query"],
            text_tokens=torch.as_tensor(inputs["text_tokens"], device=device),
            scale=scale, train_rows=train_rows, train_targets=train_targets,
            val_rows=val_rows, val_targets=val_targets,
        ))

    all_blocks = store.row_blocks()
    starts = np.array([start for start, _ in all_blocks])
    train_rows = np.unique(np.concatenate([q.train_rows for q in queries]))
    block_rows = np.bincount(np.searchsorted(starts, train_rows, side="right") - 1, minlength=len(all_blocks))
    block_query_rows = np.stack([
        np.bincount(np.searchsorted(starts, q.train_rows, side="right") - 1, minlength=len(all_blocks)) for q in queries
    ], axis=1)  # [T, Q]
    used = np.flatnonzero(block_rows)  # blocks with training rows
    largest = int(used[np.argmax(block_rows[used])])
    if block_rows[largest] > capacity:
        raise InputError(
            f"tar {store.tar_urls()[largest]} has {block_rows[largest]} training images "
            f"({token_gigabytes(store, int(block_rows[largest])) * views:.2g} GB of image tokens), more than a training window "
            f"of train.max_resident_gb={budget} holds ({window_gb:.2g} GB: half of what validation leaves, as the next "
            "window is read while one trains); raise it with --set train.max_resident_gb=N or write smaller tars"
        )
    schedule = WindowSchedule(block_rows[used], block_query_rows[used], capacity, train.window_steps, train.seed,
                              uniform_queries=train.sampling == "released")
    log.info(
        "streaming image tokens: %d training rows in %d blocks, windows of up to %d rows (%.2f GB); val rows %s",
        len(train_rows), len(used), capacity, window_gb, "resident" if val_resident else "read at every validation",
    )
    return StreamingFeatures(store, queries, [all_blocks[b] for b in used], schedule,
                             all_val_rows if val_resident else None, device)
