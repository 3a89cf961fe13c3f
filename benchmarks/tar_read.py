"""Tar reading against the disk: the embed job's tar reader beside a plain sequential read of the same files.

Generates JPEG tars (the photo crops of `embed_throughput`) in a folder on the disk under test, then
in one run times, over the same files:

    plain MB/s     each tar read start to end in 8 MiB reads, one after another, in this process
    reader MB/s    the embed job's reader (`TarBatches`: local tars read by member offset,
                   `pipeline/data/tar_reader.py`; each sample's json and label parsing, the nvJPEG
                   check of each JPEG's header, each batch's raw JPEG bytes brought into this
                   process as for GPU decoding, no pixel decoding) in this process, and again in a
                   DataLoader with --workers processes as `rankpipe embed` runs it
    ratio          reader MB/s / plain MB/s (of the same pass)

Two page-cache states, each timed --repeats times, alternating plain and reader:

    cold           every tar is dropped from the page cache (fsync, then posix_fadvise DONTNEED)
                   before each timed pass, so both sides read from the disk: the reader against the
                   disk's speed
    warm           every tar is read once before timing and the machine's memory holds them all, so
                   both sides read cached files: what the reader's own work costs per byte (the
                   plain pass is then a memory copy)

    python -m rankpipe.benchmarks.tar_read                                        # ~0.5 GB of tars
    python -m rankpipe.benchmarks.tar_read --images 20000 --tars 16 --workers 14  # ~1.5 GB, a larger machine
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from rankpipe.benchmarks.embed_throughput import write_tars
from rankpipe.pipeline.embed.decode import TarBatches, TarTask
from rankpipe.pipeline.embed.job import input_tars

# Bytes per call of the plain sequential read.
PLAIN_READ_BYTES = 8 << 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=6000, help="JPEGs in the generated tars (~63 KB each at 640x480)")
    parser.add_argument("--tars", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader processes of the second reader pass")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-source-size", default="640x480", help="WxH of the generated JPEGs")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes of each reader, per page-cache state")
    parser.add_argument("--cache", default="cold,warm",
                        help="comma-separated page-cache states to time: cold (tars dropped from the page cache "
                             "before each pass; needs posix_fadvise, so Linux) and warm")
    parser.add_argument("--dir", default=None, help="folder on the disk to test (default: the temporary folder)")
    args = parser.parse_args()
    width, height = (int(v) for v in args.image_source_size.lower().split("x"))
    caches = [cache for cache in args.cache.split(",") if cache]
    if not caches or set(caches) - {"cold", "warm"}:
        parser.error(f"--cache takes cold, warm or both, not {args.cache!r}")
    skipped = ""
    if "cold" in caches and not hasattr(os, "posix_fadvise"):
        caches.remove("cold")
        skipped = "cold passes skipped: this platform cannot drop a file from the page cache (no posix_fadvise)"

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        tars = input_tars(write_tars(folder, args.images, args.tars, (width, height)))
        tasks = [TarTask(t, tar.url, tar.count) for t, tar in enumerate(tars)]
        nbytes = sum(Path(tar.url).stat().st_size for tar in tars)
        rows = []
        for cache in caches:
            if cache == "warm":
                plain_read(tasks)  # the untimed pass that brings every tar into the page cache
            for repeat in range(args.repeats):
                for workers in (0, args.workers):
                    plain = timed(lambda: plain_read(tasks), cache, tasks)
                    images, reader = timed_reader(tasks, args.batch_size, workers, cache)
                    if images != args.images:
                        raise SystemExit(f"the reader gave {images} images of {args.images}")
                    rows.append((cache, repeat + 1, workers, plain, reader))

    print(f"{args.images} JPEGs {width}x{height} in {args.tars} tars, {nbytes / 1e6:,.0f} MB; cold: read from the "
          f"disk (dropped from the page cache before each pass), warm: every tar in the page cache")
    if skipped:
        print(skipped)
    print(" | ".join(("page cache", "pass", "reader processes", "plain MB/s", "reader MB/s", "reader img/s", "ratio")))
    for cache, repeat, workers, plain, reader in rows:
        processes = "in this process" if workers == 0 else f"{workers} DataLoader worker{'s' * (workers > 1)}"
        print(" | ".join((cache, str(repeat), processes, f"{nbytes / plain / 1e6:,.0f}", f"{nbytes / reader / 1e6:,.0f}",
                          f"{args.images / reader:,.0f}", f"{plain / reader:.2f}")))


def plain_read(tasks: list[TarTask]) -> None:
    """Every tar read start to end in large reads, discarding the bytes."""
    buffer = bytearray(PLAIN_READ_BYTES)
    for task in tasks:
        with open(task.url, "rb", buffering=0) as file:
            while file.readinto(buffer):
                pass


def drop_from_page_cache(tasks: list[TarTask]) -> None:
    """Every tar's pages out of the page cache, so the next read comes from the disk (dirty pages
    are written first: the kernel drops only clean ones)."""
    for task in tasks:
        fd = os.open(task.url, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(read, cache: str, tasks: list[TarTask]) -> float:
    """Seconds of `read`, the tars first dropped from the page cache for a cold pass."""
    if cache == "cold":
        drop_from_page_cache(tasks)
    start = time.perf_counter()
    read()
    return time.perf_counter() - start


def timed_reader(tasks: list[TarTask], batch_size: int, workers: int, cache: str) -> tuple[int, float]:
    """Images read and seconds of the embed job's reader, JPEGs left undecoded (as for GPU decoding),
    the tars first dropped from the page cache for a cold pass."""
    dataset = TarBatches(tasks, ["score"], batch_size, preprocess=None, jpeg_on_gpu=True)
    workers = min(workers, len(tasks))
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers,
                                         prefetch_factor=4 if workers else None)
    if cache == "cold":
        drop_from_page_cache(tasks)
    start = time.perf_counter()
    images = 0
    for batch in loader:
        batch.load_jpegs()  # their bytes in this process, as the GPU decoder takes them
        images += batch.num_images
    return images, time.perf_counter() - start


if __name__ == "__main__":
    main()
