"""Scoring a store's blocks from their cached features, here or as dask tasks; each block's scores go to its file.

The same function scores blocks in the calling process (`score_blocks`) and in a dask task
(`score_block_task`, one block per task): the pieces of a block and the batches within a piece are
the same either way, so a block's scores are the same bytes whichever process computed them (on
the CPU), and a ranking merged from them equals a single-process one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from rankpipe.adapter.evaluation.rankers import Query, Ranker
from rankpipe.adapter.evaluation.score_folder import ScoreFolder
from rankpipe.adapter.evaluation.scoring import LoadedCheckpoint, load_checkpoint
from rankpipe.adapter.evaluation.store_blocks import plan_pieces, read_pieces
from rankpipe.devices import torch_device_for
from rankpipe.pipeline.store import TokenStore


@torch.inference_mode()
def score_blocks(store: TokenStore, ranker: Ranker, queries: Sequence[Query], blocks: Sequence[int], piece_rows: int,
                 batch_size: int, device: torch.device, folder: ScoreFolder,
                 progress: Callable[[int], None] | None = None) -> int:
    """Score every valid row of `blocks` for every query and write each block's scores to `folder`.

    Args:
        store: the store, embedded with the ranker's backbone.
        ranker: from `load_checkpoint`, on `device`.
        queries: the queries, in order (the columns of each block's scores).
        blocks: block (tar) indices, in order.
        piece_rows: rows per read (see store_blocks.piece_rows).
        batch_size: images per forward pass.
        device: where the ranker runs; each batch is moved there once for all queries.
        folder: where each finished block's scores go.
        progress: called with the number of images of each scored piece.

    Returns:
        The number of images scored.
    """
    rows: list[np.ndarray] = []
    scores: list[np.ndarray] = []
    total = 0
    # closing(): an error here stops the reader thread at once, not when the generator is collected.
    with contextlib.closing(read_pieces(store, plan_pieces(store, blocks, piece_rows), ranker.reads)) as pieces:
        for item in pieces:
            rows.append(item.rows)
            scores.append(_score(ranker, queries, item.features, batch_size, device))  # [k, Q]
            total += len(item.rows)
            if progress is not None:
                progress(len(item.rows))
            if item.piece.last:
                folder.write(item.piece.block, np.concatenate(rows), np.concatenate(scores))
                rows, scores = [], []
    return total


def _score(ranker: Ranker, queries: Sequence[Query], features: torch.Tensor, batch_size: int,
           device: torch.device) -> np.ndarray:
    """[k, Q] float64 scores of a piece's [k, ...] features, batch by batch."""
    out = [np.zeros((0, len(queries)))]
    for i in range(0, len(features), batch_size):
        batch = features[i:i + batch_size].to(device, non_blocking=True)  # [b, P, D] or [b, E]
        out.append(np.stack(ranker.score(batch, queries), axis=1))  # [b, Q]
    return np.concatenate(out)


@dataclasses.dataclass(frozen=True)
class QuerySpec:
    """A query as plain data, for a worker to rebuild against its own copy of the checkpoint."""

    # The ranking sentence.
    sentence: str
    # The checkpoint label it was trained as; None for an unseen sentence.
    label: str | None
    # [L, Dt] float32 text tokens of an unseen sentence (None for a trained one: the checkpoint has them).
    tokens: np.ndarray | None

    @classmethod
    def of(cls, query: Query) -> QuerySpec:
        tokens = None if query.label is not None else query.text_tokens.float().cpu().numpy()
        return cls(query.sentence, query.label, tokens)

    def query(self, loaded: LoadedCheckpoint) -> Query:
        """The query as `loaded`'s ranker scores it, on its device."""
        if self.label is not None:
            return loaded.query(self.label)
        return loaded.ranker.unseen_query(self.sentence, torch.from_numpy(self.tokens).to(loaded.device))


@dataclasses.dataclass(frozen=True)
class BlockJob:
    """What a worker needs to score a block: everything but the block's index."""

    # The store and the checkpoint (the same paths on every worker).
    store: Path
    checkpoint: Path
    # "cpu" or "cuda" (a worker's own, pinned GPU).
    device: str
    # The queries, in order.
    queries: tuple[QuerySpec, ...]
    # Rows per read and images per forward pass: the same as a local run's for the same bytes.
    piece_rows: int
    batch_size: int
    # The run's score folder.
    folder: Path


def score_block_task(job: BlockJob, block: int) -> int:
    """Score one block into the run's folder (a dask task); returns its images, 0 when already written."""
    folder = ScoreFolder(job.folder)
    if folder.has(block):  # a retried task whose first try finished after all
        return 0
    loaded = _worker_checkpoint(job.checkpoint, job.device)
    queries = [spec.query(loaded) for spec in job.queries]
    store = TokenStore.open(job.store)
    return score_blocks(store, loaded.ranker, queries, [block], job.piece_rows, job.batch_size, loaded.device, folder)


# The checkpoint a worker process loaded, kept for its next blocks: (path, its mtime, device) -> checkpoint.
_CHECKPOINT: dict[tuple[Path, int, str], LoadedCheckpoint] = {}
_CHECKPOINT_LOCK = threading.Lock()


def _worker_checkpoint(path: Path, device: str) -> LoadedCheckpoint:
    # The file's mtime is in the key: a worker that outlives a run must not keep a replaced checkpoint.
    key = (path, path.stat().st_mtime_ns, device)
    with _CHECKPOINT_LOCK:
        if key not in _CHECKPOINT:
            _CHECKPOINT.clear()
            _CHECKPOINT[key] = load_checkpoint(path, torch_device_for(device))
        return _CHECKPOINT[key]
