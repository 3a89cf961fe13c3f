"""A store's rows as blocks and pieces, and pieces read ahead in a background thread.

A block is one tar's rows (without the padding rows the store adds after them): what `rankpipe embed`
wrote in one go, and the unit `rankpipe rank --store` resumes and spreads over workers. A block is
read in pieces sized from a memory budget: a reader thread reads the next piece while the current
one is scored, so reading the store overlaps the adapter, and at most `PIECES_HELD` pieces of
features are in memory at once (one being scored, one waiting, one being read), however large the
store.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from rankpipe.adapter.evaluation.rankers import FeatureKind
from rankpipe.errors import InputError
from rankpipe.pipeline.store import TOKEN_DTYPE, TokenStore

# Pieces of features in memory at once: scored, queued, and being read.
PIECES_HELD = 3


@dataclasses.dataclass(frozen=True)
class Piece:
    """A run of rows of one block, read at once."""

    # The block (tar) index in the store.
    block: int
    # Store rows start:stop.
    start: int
    stop: int
    # Whether it is the block's last piece (the block's scores are complete after it).
    last: bool


@dataclasses.dataclass(frozen=True)
class PieceFeatures:
    """The valid rows of a piece and their features."""

    piece: Piece
    # [k] store rows that hold an image, ascending.
    rows: np.ndarray
    # [k, P, D] patch tokens or [k, E] pooled embeddings, float16 as stored.
    features: torch.Tensor


def feature_bytes(store: TokenStore, kind: FeatureKind) -> int:
    """Bytes of one row's features of `kind` (float16)."""
    provenance = store.provenance
    if kind == "tokens":
        values = provenance["token_grid"][0] * provenance["token_grid"][1] * provenance["token_dim"]
    else:
        values = provenance["embed_dim"]
    return int(values) * np.dtype(TOKEN_DTYPE).itemsize


def piece_rows(store: TokenStore, kind: FeatureKind, memory_mb: float) -> int:
    """Rows per piece so that `PIECES_HELD` pieces of features fit in `memory_mb`, in whole Zarr chunks
    where the budget allows.

    Raises:
        InputError: the budget does not hold `PIECES_HELD` rows.
    """
    per_row = feature_bytes(store, kind)
    rows = int(memory_mb * 2**20) // (PIECES_HELD * per_row)
    if rows < 1:
        need = PIECES_HELD * per_row / 2**20
        raise InputError(f"--memory-mb {memory_mb:g} cannot hold {PIECES_HELD} images' features of store {store.path} "
                         f"({per_row} bytes each); give at least {need:.3g}")
    # Whole chunks of image/tokens: a piece then never reads a chunk that the next piece reads again.
    return rows - rows % store.chunk_rows if rows >= store.chunk_rows else rows


def plan_pieces(store: TokenStore, blocks: Sequence[int], rows: int) -> list[Piece]:
    """The pieces of `blocks`, in order, each at most `rows` rows of one block's samples."""
    pieces = []
    for b in blocks:
        block = store.blocks[b]
        stop = block.row_start + block.count
        starts = list(range(block.row_start, stop, rows)) or [block.row_start]
        for start in starts:
            end = min(start + rows, stop)
            pieces.append(Piece(b, start, end, last=end >= stop))
    return pieces


def read_pieces(store: TokenStore, pieces: Sequence[Piece], kind: FeatureKind) -> Iterator[PieceFeatures]:
    """The pieces' valid rows and features, in order, each read while the one before it is used.

    Errors of the reader thread are raised here; leaving the loop early stops the reader.
    """
    waiting: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()
    done = object()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                waiting.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:
        try:
            for piece in pieces:
                if not put(read_piece(store, piece, kind)):
                    return
            put(done)
        except BaseException as e:  # re-raised in the consuming thread
            put(e)

    thread = threading.Thread(target=read, name="rank-store-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = waiting.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def read_piece(store: TokenStore, piece: Piece, kind: FeatureKind) -> PieceFeatures:
    """One piece's valid rows and their features, read as one slice of the store."""
    rows = slice(piece.start, piece.stop)
    valid = store.valid(rows)  # [n]
    values = store.image_tokens(rows) if kind == "tokens" else store.image_embed(rows)  # [n, P, D] or [n, E]
    if not valid.all():
        values = values[valid]
    return PieceFeatures(piece, piece.start + np.flatnonzero(valid).astype(np.int64),
                         torch.from_numpy(np.ascontiguousarray(values, dtype=np.float16)))
