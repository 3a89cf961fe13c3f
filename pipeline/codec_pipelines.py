"""The Zarr codec pipelines that can write a store's token shards.

"zarr" is zarr-python's own pipeline. "zarrs" is the Rust pipeline of the `zarrs` package (the optional
extra `rankpipe[zarrs]`), which encodes a shard's chunks in native threads outside the GIL; where it
cannot handle an array it falls back to zarr-python's pipeline itself. "raw" runs no codec where
there is none to run: an uncompressed shard is written as its rows' bytes plus its index
(`shard_files.py`); a compressed array goes through zarr-python's pipeline.

"raw" writes exactly zarr-python's bytes. zarrs writes the same values, but in a shard of several
inner chunks not the same bytes: it lays the chunks in the order its threads finish them (so its
bytes differ from run to run) and leaves out a chunk of padding rows alone, where zarr-python writes
every chunk in row order; the shard's index says where each chunk is, and a missing chunk reads as
the fill value, zeros (tests/test_codec_pipelines.py). So a store does not record which pipeline
wrote it, and a store begun with one can be finished with another; only "raw" and "zarr" give a
store the same bytes every time.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import zarr

from rankpipe.errors import InputError
from rankpipe.pipeline.shard_files import ShardWrite, raw_shard_writer

CODEC_PIPELINES = ("raw", "zarr", "zarrs")
# What `auto` means: "raw" (which needs nothing installed).
AUTO = "auto"


def codec_pipeline_available(name: str) -> bool:
    """Whether the named pipeline can be used in this environment."""
    return name in ("raw", "zarr") or (name == "zarrs" and importlib.util.find_spec("zarrs") is not None)


def resolve_codec_pipeline(name: str) -> str:
    """The pipeline `name` stands for: "auto" is "raw".

    Raises:
        InputError: an unknown name, or zarrs asked for by name but not installed.
    """
    if name == AUTO:
        return "raw"
    if name not in CODEC_PIPELINES:
        raise InputError(f"unknown codec pipeline {name!r}; choose one of {', '.join((AUTO, *CODEC_PIPELINES))}")
    if not codec_pipeline_available(name):
        raise InputError(f"codec pipeline {name!r} is not installed; pip install 'rankpipe[zarrs]' or choose "
                         f"{AUTO!r} or 'zarr'")
    return name


def whole_shard_writer(array: zarr.Array, name: str) -> ShardWrite:
    """write(first_row, rows) of whole shards of `array` through the named pipeline ("raw", "zarr" or "zarrs")."""
    if name == "raw":
        raw = raw_shard_writer(array)
        if raw is not None:
            return raw
        name = "zarr"
    handle = _whole_chunk_handle(array, name)

    def write(first_row: int, rows: np.ndarray) -> None:
        handle[first_row:first_row + len(rows)] = rows

    return write


def _whole_chunk_handle(array: zarr.Array, name: str) -> zarr.Array:
    """`array` set up for writes of whole shards through the named Zarr pipeline ("zarr" or "zarrs").

    Whole shards are written as they are: skipping the per-chunk "all fill value?" scan makes writes
    about 2.5x faster, and a redone shard still replaces every byte.
    """
    writer = array.with_config({"write_empty_chunks": True})  # a new handle: the store's own stays as it was
    if name == "zarrs":
        from zarrs import ZarrsCodecPipeline

        async_array = writer.async_array
        # zarr-python picks an array's pipeline from its global config when the handle is made; this
        # handle alone gets zarrs instead, so nothing else in the process changes how it reads or writes.
        pipeline = ZarrsCodecPipeline.from_array_metadata_and_store(async_array.metadata, async_array.store_path.store)
        object.__setattr__(async_array, "codec_pipeline", pipeline)
    return writer
