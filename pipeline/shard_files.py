"""Whole uncompressed shards written as their own bytes, with no codec to run.

A token array's shard is a run of whole rows, cut into inner chunks along the rows only, and the
only codec is the byte order (little-endian, the machine's own). Such a shard's file is the shard's
rows exactly as they lie in memory, followed by the index (each inner chunk's byte offset and length,
as little-endian uint64) and the index's CRC32C: the layout zarr's sharding codec writes. A Zarr
codec pipeline builds it by copying every inner chunk out of the shard, then joining the copies and
the index into one more buffer; writing the rows straight from the shard buffer skips both copies
and the per-chunk Python of the pipeline. An uncompressed array that is not sharded is written the
same way: its chunk file is the rows' bytes.

`raw_shard_writer` recognises exactly that layout (on a local store) and otherwise says None, so a
caller hands anything else to a codec pipeline. tests/test_codec_pipelines.py checks the files are
byte-identical to zarr-python's.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import google_crc32c
import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec, ShardingCodecIndexLocation
from zarr.core.chunk_grids import RegularChunkGrid
from zarr.storage import LocalStore

from rankpipe.files import PARTIAL_SUFFIX, atomic_target

# write(first_row, rows): rows [n, ...] of whole shards starting at first_row.
ShardWrite = Callable[[int, np.ndarray], None]


def raw_shard_writer(array: zarr.Array) -> ShardWrite | None:
    """A writer of whole shards of `array` as their bytes; None where its layout needs a codec pipeline.

    The layout written: a regular grid whose chunks (shards) span every axis but the first; either
    no sharding, or one sharding codec whose inner chunks also span every axis but the first, with the
    index at the end (little-endian bytes and CRC32C); the only array codec little-endian bytes.
    """
    metadata = array.metadata
    store = array.store_path.store
    if metadata.zarr_format != 3 or not isinstance(store, LocalStore) or not isinstance(metadata.chunk_grid, RegularChunkGrid):
        return None
    shard_shape = metadata.chunk_grid.chunk_shape
    if tuple(shard_shape[1:]) != tuple(array.shape[1:]):
        return None
    codecs = metadata.codecs
    if len(codecs) != 1:
        return None
    inner_rows = None  # rows per inner chunk; None: the array is not sharded
    if isinstance(codecs[0], ShardingCodec):
        sharding = codecs[0]
        if (len(sharding.codecs) != 1 or not _little_endian_bytes(sharding.codecs[0])
                or tuple(sharding.chunk_shape[1:]) != tuple(array.shape[1:]) or shard_shape[0] % sharding.chunk_shape[0]
                or sharding.index_location != ShardingCodecIndexLocation.end
                or len(sharding.index_codecs) != 2 or not _little_endian_bytes(sharding.index_codecs[0])
                or not isinstance(sharding.index_codecs[1], Crc32cCodec)):
            return None
        inner_rows = sharding.chunk_shape[0]
    elif not _little_endian_bytes(codecs[0]):
        return None
    dtype = np.dtype(array.dtype).newbyteorder("<")
    folder = Path(store.root) / array.path
    rows_per_file = shard_shape[0]
    row_bytes = int(np.prod(array.shape[1:], dtype=np.int64)) * dtype.itemsize

    def write(first_row: int, rows: np.ndarray) -> None:
        if first_row % rows_per_file or len(rows) % rows_per_file or tuple(rows.shape[1:]) != tuple(array.shape[1:]):
            raise ValueError(f"rows {first_row}:{first_row + len(rows)} of shape {rows.shape} are not whole shards "
                             f"of {array.path}")
        rows = np.ascontiguousarray(rows, dtype=dtype)  # no copy for the float16 rows the writer hands
        for start in range(0, len(rows), rows_per_file):
            shard = rows[start:start + rows_per_file]
            key = metadata.encode_chunk_key(((first_row + start) // rows_per_file,) + (0,) * (rows.ndim - 1))
            trailer = b"" if inner_rows is None else _shard_index(rows_per_file // inner_rows, inner_rows * row_bytes)
            target = folder / key
            _remove_stale_partials(target)
            # Like zarr's own writes: a whole new file renamed into place, not flushed to disk one by
            # one (the tar's done flag, written after every shard of the tar, is what resume trusts).
            with atomic_target(target, durable=False) as partial, open(partial, "wb") as file:
                file.write(memoryview(shard).cast("B"))
                file.write(trailer)

    return write


def _remove_stale_partials(target: Path) -> None:
    """Delete what killed writes of `target` left: their temporary files (".NAME.*.partial" from
    `atomic_target`, "NAME.*.partial" from zarr-python's own writes).

    Only the job holding the store's lock writes it, and it writes each shard from one thread, so a
    temporary file of this shard found now is a killed run's: a resumed store ends with the files of
    an uninterrupted one.
    """
    if target.parent.is_dir():
        for pattern in (f".{target.name}.*{PARTIAL_SUFFIX}", f"{target.name}.*{PARTIAL_SUFFIX}"):
            for stale in target.parent.glob(pattern):
                stale.unlink(missing_ok=True)


def _little_endian_bytes(codec: object) -> bool:
    return isinstance(codec, BytesCodec) and (codec.endian is None or codec.endian.value == "little")


def _shard_index(chunks: int, chunk_bytes: int) -> bytes:
    """The index of a shard of `chunks` inner chunks of `chunk_bytes` each, laid one after another
    in row order: (offset, length) per chunk as little-endian uint64, then its CRC32C."""
    index = np.empty((chunks, 2), dtype="<u8")  # [chunks, (offset, length)]
    index[:, 0] = np.arange(chunks, dtype=np.uint64) * chunk_bytes
    index[:, 1] = chunk_bytes
    data = index.tobytes()
    return data + np.uint32(google_crc32c.value(data)).astype("<u4").tobytes()
