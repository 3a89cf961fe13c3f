"""Store writes against the disk: the embed job's writer beside a plain sequential write of the same bytes.

Creates a token store of ViT-B-16's shape (196 x 768 image tokens and a 512-wide embedding per image,
float16 as every store keeps them) in a folder on the disk under test, feeds the embed job's
`WriterThread` ready-made batches as the forward pass would, and times it until every file is on
disk. In the same run and on the same disk it writes the same number of bytes to one file in large
sequential writes. Both timings end with an fsync of every file written (so neither counts bytes
still in the page cache). Each variant of the writer runs between two plain writes and is compared
with their mean, which evens out a machine whose load changes during the run.

Every timed write starts just after the previous one's files were deleted (the first after an
untimed plain write of the same size, written and deleted). Page cache freed a moment ago is cheap
to write into again, while pages the kernel must find elsewhere cost several times more kernel
time, on a virtual machine above all (there, 0.3 against 2-3 CPU s/GB for the same plain write):
a write that follows a deletion and one that does not are not timing the same thing.

    plain MB/s        one file, 64 MiB writes, then fsync (mean of the writes before and after)
    writer MB/s       WriterThread with N shard-write threads, through a codec pipeline ("raw": an
                      uncompressed shard's rows written as they lie, no codec run), then fsync
    ratio             writer MB/s / plain MB/s
    CPU s/GB          CPU time of this process (all threads) per GB, writer and plain: what the write
                      costs when the cores are shared, where wall-clock rates mostly say how busy they were

    python -m rankpipe.benchmarks.store_write                                     # ~1 GB, seconds to a minute
    python -m rankpipe.benchmarks.store_write --write-threads 1,4,8 --codec-pipelines raw,zarr,zarrs --compress
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

from rankpipe.benchmarks.synthetic_store import feed_writer, make_store, random_features
from rankpipe.pipeline.codec_pipelines import CODEC_PIPELINES, codec_pipeline_available
from rankpipe.pipeline.store import TOKEN_DTYPE

# Bytes per call of the plain sequential write.
PLAIN_WRITE_BYTES = 64 << 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=3200, help="images written (3200 of ViT-B-16 are ~1 GB)")
    parser.add_argument("--tars", type=int, default=4, help="tars the images are split into (each owns whole shards)")
    parser.add_argument("--tokens", type=int, default=196, help="image tokens per image (ViT-B-16: 14x14)")
    parser.add_argument("--token-dim", type=int, default=768)
    parser.add_argument("--embed-dim", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=256, help="images per batch handed to the writer")
    parser.add_argument("--write-threads", default="1,4", help="comma-separated shard-write thread counts to time")
    parser.add_argument("--codec-pipelines", default="raw,zarr,zarrs",
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
        plain_path, store_path = folder / "plain.bin", folder / "bench.zarr"
        for variant, (pipeline, threads, compress) in enumerate(variants):
            store = make_store(store_path, args.images, args.tars, args.tokens, args.token_dim, args.embed_dim,
                               compress)
            # Rows of whole shards, padding included, as the writer writes them.
            nbytes = store.num_rows * (args.tokens * args.token_dim + args.embed_dim) * np.dtype(TOKEN_DTYPE).itemsize
            if variant == 0:  # untimed: the first timed write, too, follows a deletion of its size
                timed(lambda: plain_write(plain_path, nbytes), plain_path)
                plain_path.unlink()
            before = timed(lambda: plain_write(plain_path, nbytes), plain_path)
            plain_path.unlink()
            writer = timed(lambda: feed_writer(store, tokens, embed, threads, pipeline), store_path)
            on_disk = sum(p.stat().st_size for p in store_path.rglob("*") if p.is_file())
            shutil.rmtree(store_path)
            after = timed(lambda: plain_write(plain_path, nbytes), plain_path)
            plain_path.unlink()
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
