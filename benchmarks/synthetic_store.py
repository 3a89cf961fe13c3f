"""Synthetic token stores for the write benchmarks and the tests of the store writer.

An empty store of a chosen token shape, laid out as `rankpipe embed` lays it out, and ready-made
features fed through the embed job's `WriterThread` as the forward pass hands them, so a write can be
timed or checked without a backbone. Helpers only: the benchmarks that use them are `store_write`
and `embed_throughput`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from rankpipe.pipeline.data.manifest import LabelSpec, Manifest
from rankpipe.pipeline.data.tars import TarInfo
from rankpipe.pipeline.embed.backbone import TextFeatures
from rankpipe.pipeline.embed.decode import DecodedBatch
from rankpipe.pipeline.embed.store_writer import EmbeddedBatch, WriterThread
from rankpipe.pipeline.store import TOKEN_DTYPE, StoreConfig, TokenStore, create_store, plan_store

# Batches between the producer and the writer thread, as in the embed job.
WRITE_QUEUE_BATCHES = 8


def random_features(batch_size: int, tokens: int, token_dim: int, embed_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, P, D] and [B, E] float16 features of random normal values (they barely compress, like CLIP's)."""
    rng = np.random.default_rng(0)
    return (torch.from_numpy(rng.standard_normal((batch_size, tokens, token_dim), dtype=np.float32).astype(TOKEN_DTYPE)),
            torch.from_numpy(rng.standard_normal((batch_size, embed_dim), dtype=np.float32).astype(TOKEN_DTYPE)))


def make_store(path: Path, images: int, tars: int, tokens: int, token_dim: int, embed_dim: int,
               compress: bool, chunk_bytes: int = StoreConfig.chunk_bytes,
               shard_bytes: int = StoreConfig.shard_bytes) -> TokenStore:
    """An empty store of `images` rows of this token shape, laid out as `rankpipe embed` lays it out
    (`chunk_bytes`, `shard_bytes`: target bytes of an inner chunk and a shard, smaller to test shards
    of several chunks and tars of several shards)."""
    manifest = Manifest(name="write-bench", shards=f"x-{{000000..{tars - 1:06d}}}.tar",
                        labels=(LabelSpec("score", "Sort images by score."),))
    text = TextFeatures(tokens=np.zeros((4, 8), TOKEN_DTYPE), length=4, embed=np.zeros(embed_dim, TOKEN_DTYPE))
    provenance = {"model": "synthetic", "pretrained": "none", "checkpoint_sha256": None, "seed": 0,
                  "image_size": [1, 1], "preprocess": {}, "token_grid": [tokens, 1], "token_dim": token_dim,
                  "embed_dim": embed_dim, "text_token_dim": 8, "context_length": 4}
    per_tar = [images // tars + (t < images % tars) for t in range(tars)]
    config = StoreConfig(chunk_bytes=chunk_bytes, shard_bytes=shard_bytes, compress=compress)
    plan = plan_store([TarInfo(f"x-{t:06d}.tar", n) for t, n in enumerate(per_tar)],
                      tokens * token_dim * np.dtype(TOKEN_DTYPE).itemsize, config)
    return create_store(path, plan, provenance, manifest, {manifest.labels[0].query: text}, config)


def feed_writer(store: TokenStore, tokens: torch.Tensor, embed: torch.Tensor, write_threads: int,
                codec_pipeline: str = "zarr") -> None:
    """Every tar of the store through a WriterThread, in batches of the features' size, as the embed job hands them.

    Args:
        store: an allocated store, opened for writing.
        tokens: [B, P, D] and embed: [B, E] features reused for every batch.
        write_threads: shard files written in parallel.
        codec_pipeline: the Zarr codec pipeline that encodes and writes the shards.
    """
    batch_size = tokens.shape[0]
    writer = WriterThread(store, lambda t, meta: None, max_queue=WRITE_QUEUE_BATCHES, write_threads=write_threads,
                          codec_pipeline=codec_pipeline)
    for t, block in enumerate(store.blocks):
        for first in range(0, block.count, batch_size):
            n = min(batch_size, block.count - first)
            batch = feature_batch(t, first, n, last=first + n >= block.count)
            writer.put(EmbeddedBatch(batch, np.arange(first, first + n), tokens[:n], embed[:n]))
    writer.close()


def feature_batch(tar: int, start: int, n: int, last: bool) -> DecodedBatch:
    """The decoded side of `n` samples whose features are ready-made: keys "tar-position", train split,
    label 0, no images to encode."""
    return DecodedBatch(tar=tar, start=start, keys=[f"{tar}-{start + i}" for i in range(n)], splits=["train"] * n,
                        sources=[""] * n, errors=[""] * n, labels=np.zeros((n, 1), np.float32), images=None,
                        image_positions=np.zeros(0, np.int64), jpeg_bytes=torch.zeros(0, dtype=torch.uint8),
                        jpeg_spans=np.zeros((0, 2), np.int64), jpeg_positions=np.zeros(0, np.int64), last=last)
