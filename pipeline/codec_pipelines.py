"""The Zarr codec pipelines that can write a store's token shards.

"zarr" is zarr-python's own pipeline. "zarrs" is the Rust pipeline of the `zarrs` package (the optional
extra `rankpipe[zarrs]`), which encodes a shard's chunks in native threads outside the GIL; where it
cannot handle an array it falls back to zarr-python's pipeline itself. Both write the same bytes
(tests/test_codec_pipelines.py), so a store does not record which one wrote it, and a store begun
with one can be finished with the other.
"""

from __future__ import annotations

import importlib.util

import zarr

from rankpipe.errors import InputError

CODEC_PIPELINES = ("zarr", "zarrs")
# What `auto` means: zarrs where it is installed, else zarr-python's own.
AUTO = "auto"


def codec_pipeline_available(name: str) -> bool:
    """Whether the named pipeline can be used in this environment."""
    return name == "zarr" or (name == "zarrs" and importlib.util.find_spec("zarrs") is not None)


def resolve_codec_pipeline(name: str) -> str:
    """The pipeline `name` stands for: "auto" picks zarrs when installed.

    Raises:
        InputError: an unknown name, or zarrs asked for by name but not installed.
    """
    if name == AUTO:
        return "zarrs" if codec_pipeline_available("zarrs") else "zarr"
    if name not in CODEC_PIPELINES:
        raise InputError(f"unknown codec pipeline {name!r}; choose one of {', '.join((AUTO, *CODEC_PIPELINES))}")
    if not codec_pipeline_available(name):
        raise InputError(f"codec pipeline {name!r} is not installed; pip install 'rankpipe[zarrs]' or choose "
                         f"{AUTO!r} or 'zarr'")
    return name


def whole_chunk_writer(array: zarr.Array, name: str) -> zarr.Array:
    """`array` set up for writes of whole shards through the named pipeline ("zarr" or "zarrs").

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
