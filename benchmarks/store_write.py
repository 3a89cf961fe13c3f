"""Store writes against the disk: the embed job's writer beside a plain sequential write of the same bytes.

Creates a token store of ViT-B-16's shape (196 x 768 image tokens and a 512-wide embedding per image,
float16 as every store keeps them) in a folder on the disk under test, feeds the embed job's
`WriterThread` ready-made batches as the forward pass would, and times it until every file is on
disk. In the same run and on the same disk it writes the same number of bytes to one file in large
sequential writes. Both timings end with an fsync of every file written (so neither counts bytes
still in the page cache). Each variant of the writer runs between two plain writes and is compared
with their mean, which evens out a machine whose load changes during the run:

    plain MB/s        one file, 64 MiB writes, then fsync (mean of the writes before and after)
    writer MB/s       WriterThread with N shard-write threads, through a Zarr codec pipeline, then fsync
    ratio             writer MB/s / plain MB/s
    CPU s/GB          CPU time of this process (all threads) per GB, writer and plain: what the write
                      costs when the cores are shared, where wall-clock rates mostly say how busy they were

    python -m rankpipe.benchmarks.store_write                                     # ~1 GB, seconds to a minute
    python -m rankpipe.benchmarks.store_write --write-threads 1,4,8 --codec-pipelines zarr,zarrs --compress
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from rankpipe.pipeline.codec_pipelines import CODEC_PIPELINES, codec_pipeline_available
from rankpipe.pipeline.data.manifest import LabelSpec, Manifest
from rankpipe.pipeline.data.tars import TarInfo
from rankpipe.pipeline.embed.backbone import TextFeatures
from rankpipe.pipeline.embed.decode import DecodedBatch
from rankpipe.pipeline.embed.store_writer import EmbeddedBatch, WriterThread
from rankpipe.pipeline.store import TOKEN_DTYPE, StoreConfig, TokenStore, create_store, plan_store

# Bytes per call of the plain sequential write.
PLAIN_WRITE_BYTES = 64 << 20
# Batches between the producer and the writer thread, as in the embed job.
WRITE_QUEUE_BATCHES = 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=3200, help="images written (3200 of ViT-B-16 are ~1 GB)")
    parser.add_argument("--tars", type=int, default=4, help="tars the images are split into (each owns whole shards)")
    parser.add_argument("--tokens", type=int, default=196, help="image tokens per image (ViT-B-16: 14x14)")
    parser.add_argument("--token-dim", type=int, default=768)
    parser.add_argument("--embed-dim", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=256, help="images per batch handed to the writer")
    parser.add_argument("--write-threads", default="1,4", help="comma-separated shard-write thread counts to time")
    parser.add_argument("--codec-pipelines", default="zarr,zarrs",
                        help=f"comma-separated codec pipelines to time ({', '.join(CODEC_PIPELINES)}); "
                             "ones not installed are skipped")
    parser.add_argument("--compress", action="store_true", help="also time a zstd-compressed store")
    parser.add_argument("--dir", default=None, help="folder on the disk to test (default: the temporary folder)")
    args = parser.parse_args()

    pipelines = [name for name in args.codec_pipelines.split(",") if name]
    skipped = [name for name in pipelines if not codec_pipeline_available(name)]
    variants = [(pipeline, int(threads), compress)
                for compress in ([False, True] if args.compress else [False])
                for pipeline in pipelines if pipeline not in skipped
                for threads in args.write_threads.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        tokens, embed = random_features(args.batch_size, args.tokens, args.token_dim, args.embed_dim)
        for pipeline, threads, compress in variants:
            store = make_store(folder / "bench.zarr", args.images, args.tars, args.tokens, args.token_dim,
                               args.embed_dim, compress)
            nbytes = store.num_rows * (args.tokens * args.token_dim + args.embed_dim) * np.dtype(TOKEN_DTYPE).itemsize
            before = timed(lambda: plain_write(folder / "plain.bin", nbytes), folder / "plain.bin")
            writer = timed(lambda: feed_writer(store, tokens, embed, threads, pipeline), folder / "bench.zarr")
            on_disk = sum(p.stat().st_size for p in (folder / "bench.zarr").rglob("*") if p.is_file())
            shutil.rmtree(folder / "bench.zarr")
            after = timed(lambda: plain_write(folder / "plain.bin", nbytes), folder / "plain.bin")
            (folder / "plain.bin").unlink()
            plain = Timing((before.wall + after.wall) / 2, (before.cpu + after.cpu) / 2)
            rows.append((pipeline, threads, "zstd" if compress else "none", nbytes, on_disk, plain, writer))

    print(f"store: {args.images} images of {args.tokens}x{args.token_dim} + {args.embed_dim} float16 in {args.tars} tars; "
          f"batches of {args.batch_size}; both writes end with fsync of every file")
    if skipped:
        print(f"skipped (not installed): {', '.join(skipped)}")
    header = ("codec pipeline", "threads", "compressor", "MB written", "MB on disk", "plain MB/s", "writer MB/s",
              "ratio", "plain CPU s/GB", "writer CPU s/GB")
    print(" | ".join(header))
    for pipeline, threads, compressor, nbytes, on_disk, plain, writer in rows:
        print(" | ".join((pipeline, str(threads), compressor, f"{nbytes / 1e6:,.0f}", f"{on_disk / 1e6:,.0f}",
                          f"{nbytes / plain.wall / 1e6:,.0f}", f"{nbytes / writer.wall / 1e6:,.0f}",
                          f"{plain.wall / writer.wall:.2f}", f"{plain.cpu / nbytes * 1e9:.2f}",
                          f"{writer.cpu / nbytes * 1e9:.2f}")))


def random_features(batch_size: int, tokens: int, token_dim: int, embed_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, P, D] and [B, E] float16 features of random normal values (they barely compress, like CLIP's)."""
    rng = np.random.default_rng(0)
    return (torch.from_numpy(rng.standard_normal((batch_size, tokens, token_dim), dtype=np.float32).astype(TOKEN_DTYPE)),
            torch.from_numpy(rng.standard_normal((batch_size, embed_dim), dtype=np.float32).astype(TOKEN_DTYPE)))


def make_store(path: Path, images: int, tars: int, tokens: int, token_dim: int, embed_dim: int,
               compress: bool) -> TokenStore:
    """An empty store of `images` rows of this token shape, laid out as `rankpipe embed` lays it out."""
    manifest = Manifest(name="write-bench", shards=f"x-{{000000..{tars - 1:06d}}}.tar",
                        labels=(LabelSpec("score", "Sort images by score."),))
    text = TextFeatures(tokens=np.zeros((4, 8), TOKEN_DTYPE), length=4, embed=np.zeros(embed_dim, TOKEN_DTYPE))
    provenance = {"model": "synthetic", "pretrained": "none", "checkpoint_sha256": None, "seed": 0,
                  "image_size": [1, 1], "preprocess": {}, "token_grid": [tokens, 1], "token_dim": token_dim,
                  "embed_dim": embed_dim, "text_token_dim": 8, "context_length": 4}
    per_tar = [images // tars + (t < images % tars) for t in range(tars)]
    config = StoreConfig(compress=compress)
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
            batch = DecodedBatch(tar=t, start=first, keys=[f"{t}-{first + i}" for i in range(n)], splits=["train"] * n,
                                 sources=[""] * n, errors=[""] * n, labels=np.zeros((n, 1), np.float32), images=None,
                                 image_positions=np.zeros(0, np.int64), jpeg_bytes=torch.zeros(0, dtype=torch.uint8),
                                 jpeg_offsets=np.zeros(1, np.int64), jpeg_positions=np.zeros(0, np.int64),
                                 last=first + n >= block.count)
            writer.put(EmbeddedBatch(batch, np.arange(first, first + n), tokens[:n], embed[:n]))
    writer.close()


@dataclasses.dataclass(frozen=True)
class Timing:
    # Wall-clock seconds, and CPU seconds of this process (all its threads).
    wall: float
    cpu: float


def timed(write: Callable[[], None], written: Path) -> Timing:
    """`write`, then an fsync of `written` (a file, or every file under a folder), timed together."""
    start, cpu = time.perf_counter(), time.process_time()
    write()
    for path in [written] if written.is_file() else written.rglob("*"):
        if path.is_file():
            fsync(path)
    return Timing(time.perf_counter() - start, time.process_time() - cpu)


def plain_write(path: Path, nbytes: int) -> None:
    """`nbytes` of random bytes into one new file in large sequential writes."""
    piece = np.random.default_rng(1).integers(0, 256, PLAIN_WRITE_BYTES, dtype=np.uint8)
    with open(path, "wb") as file:
        for first in range(0, nbytes, PLAIN_WRITE_BYTES):
            file.write(memoryview(piece)[:min(PLAIN_WRITE_BYTES, nbytes - first)])


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


if __name__ == "__main__":
    main()
