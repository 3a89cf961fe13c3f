"""Embed with several dask workers: one process against a LocalCluster of W workers, on the same tars.

Generates JPEG tars as benchmarks/embed_throughput.py does, embeds them once with the single-process
`embed` (rankpipe embed) and once per W with `embed_distributed` on a LocalCluster of W workers
(rankpipe embed --cluster local:W), and prints one row per run:

    mode, workers, images, start s, wall s, img/s, vs single, features equal

What is timed:
    wall s (single)  the whole `embed()` call: backbone load, store creation, then reading, decoding,
                     the forward pass and the writes of every tar. Decoding runs in the same process
                     (--decode-workers 0), as it does inside a dask task.
    wall s (cluster) the whole `embed_distributed()` call on a running cluster: the task that loads the
                     backbone on one worker and creates the store, then one task per tar; every worker
                     loads the backbone for its first tar, as a fresh `rankpipe embed --cluster` run does.
    start s          LocalCluster start until all W workers are connected; not part of wall s.
Untimed warm-up: the single process embeds the first tar into a scratch store; on each cluster, a task
pinned to every worker loads the backbone and runs one batch (imports, CUDA start-up, first kernels).
img/s and "vs single" are computed from wall s. "features equal" compares the files of image/tokens
and image/embed with the single-process store byte for byte; the script exits with status 1 if any
store differs.

With --device cuda every worker is pinned to a visible GPU (round robin), so on a one-GPU machine the
workers share it. dask starts its workers with OMP_NUM_THREADS=1; the header prints the torch thread
count of this process and of the workers, since on the CPU that decides most of the difference.

    python -m rankpipe.benchmarks.embed_workers                                      # CPU, tiny model, well under a minute
    python -m rankpipe.benchmarks.embed_workers --model ViT-B-16 --device cuda --batch-size 256 --images 20000 --tars 16
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from rankpipe.benchmarks.embed_throughput import manifest_subset, write_tars
from rankpipe.devices import torch_device_for
from rankpipe.pipeline.cluster import ClusterSpec, open_client
from rankpipe.pipeline.data.manifest import Manifest
from rankpipe.pipeline.embed.backbone import TINY_VIT, BackboneSpec, load_backbone
from rankpipe.pipeline.embed.distributed import embed_distributed
from rankpipe.pipeline.embed.job import embed

# The arrays holding the backbone's output; the rest of a store is bookkeeping.
FEATURE_ARRAYS = ("image/tokens", "image/embed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=TINY_VIT, help="open_clip model name")
    parser.add_argument("--pretrained", default="none", help="pretrained tag, checkpoint file, or none")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--images", type=int, default=384, help="images in the generated tars")
    parser.add_argument("--tars", type=int, default=4, help="number of tars (the unit of work of a dask task)")
    parser.add_argument("--image-source-size", default="320x240", help="WxH of the generated JPEGs")
    parser.add_argument("--workers-list", type=worker_counts, default=(1, 2), help="comma-separated W values")
    parser.add_argument("--decode-workers", type=int, default=0, help="decoding processes of the single-process run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    width, height = (int(v) for v in args.image_source_size.lower().split("x"))
    spec = BackboneSpec(args.model, args.pretrained)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        manifest = write_tars(folder, args.images, args.tars, (width, height))
        single_store = folder / "single.zarr"
        rows = [time_single(manifest, manifest_subset(folder, manifest), single_store, spec, args.device,
                            args.batch_size, args.decode_workers)]
        worker_threads = set()
        for workers in args.workers_list:
            store = folder / f"cluster-{workers}.zarr"
            row, threads = time_cluster(manifest, store, spec, workers, args.device, args.batch_size)
            row.features_equal = same_features(single_store, store)
            shutil.rmtree(store)  # a large backbone's stores fill the disk otherwise
            worker_threads |= threads
            rows.append(row)

    print(f"# {args.model} ({args.pretrained}) on {args.device}; batch {args.batch_size}; {args.images} "
          f"JPEG {width}x{height} in {args.tars} tars; decode workers of the single run: {args.decode_workers}")
    print(f"# torch threads: this process {torch.get_num_threads()}, each dask worker "
          f"{','.join(str(n) for n in sorted(worker_threads))}")
    print_table(rows)
    if not all(row.features_equal for row in rows):
        sys.exit("a distributed store's features differ from the single-process store")


@dataclasses.dataclass
class Row:
    """One timed embed run."""

    # "single" (one process) or "cluster" (a LocalCluster).
    mode: str
    # Worker processes of the cluster (1 for the single process).
    workers: int
    # Images embedded.
    images: int
    # Seconds to start the cluster; None for the single process.
    start_s: float | None
    # Seconds of the timed embed call.
    wall_s: float
    # Whether the store's features equal the single-process store's, byte for byte.
    features_equal: bool


def worker_counts(text: str) -> tuple[int, ...]:
    """ "1,2" -> (1, 2); every count at least 1."""
    try:
        counts = tuple(int(part) for part in text.split(","))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of worker counts") from e
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"worker counts must be >= 1, got {text!r}")
    return counts


def time_single(manifest: Manifest, warm_up: Manifest, store: Path, spec: BackboneSpec, device: str,
                batch_size: int, decode_workers: int) -> Row:
    """Embed `warm_up` untimed, then time one single-process `embed` of `manifest` into `store`."""
    embed(warm_up, store.with_name("warm-up.zarr"), spec, device=device, batch_size=batch_size,
          workers=decode_workers, mode="overwrite", progress=False)
    start = time.perf_counter()
    summary = embed(manifest, store, spec, device=device, batch_size=batch_size, workers=decode_workers,
                    mode="overwrite", progress=False)
    return Row("single", 1, summary.images_embedded, None, time.perf_counter() - start, True)


def time_cluster(manifest: Manifest, store: Path, spec: BackboneSpec, workers: int, device: str,
                 batch_size: int) -> tuple[Row, set[int]]:
    """Start a LocalCluster of `workers`, warm every worker, then time one `embed_distributed` call.

    Returns the row and the torch thread counts the workers reported.
    """
    start = time.perf_counter()
    with open_client(ClusterSpec(local_workers=workers), device) as client:
        client.wait_for_workers(workers)
        start_s = time.perf_counter() - start
        threads = warm_every_worker(client, spec, device, batch_size)
        start = time.perf_counter()
        summary = embed_distributed(manifest, store, spec, client, device=device, batch_size=batch_size,
                                    mode="overwrite")
        wall_s = time.perf_counter() - start
    return Row("cluster", workers, summary.images_embedded, start_s, wall_s, False), threads


def warm_every_worker(client, spec: BackboneSpec, device: str, batch_size: int) -> set[int]:
    """Run `warm_up` once on each worker (a task pinned to it); returns their torch thread counts."""
    futures = [client.submit(warm_up, spec, device, batch_size, workers=[address], allow_other_workers=False,
                             pure=False)
               for address in client.scheduler_info()["workers"]]
    return set(client.gather(futures))


def warm_up(spec: BackboneSpec, device: str, batch_size: int) -> int:
    """Load the backbone and run one batch as `embed` does (bf16 autocast on CUDA); returns torch's thread count."""
    backbone = load_backbone(spec, torch_device_for(device))
    on_gpu = backbone.device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu else contextlib.nullcontext()
    images = torch.randn(batch_size, 3, *backbone.image_size, device=backbone.device)  # [B, 3, H, W]
    with torch.inference_mode(), autocast:
        backbone.encode_images(images)
    if on_gpu:
        torch.cuda.synchronize()
    return torch.get_num_threads()


def same_features(reference: Path, store: Path) -> bool:
    """Whether the feature arrays of the two stores consist of the same files with the same bytes."""
    for name in FEATURE_ARRAYS:
        ours, theirs = array_files(reference / name), array_files(store / name)
        # One file in memory at a time: a large backbone's token arrays are many GB.
        if ours != theirs or any((reference / name / f).read_bytes() != (store / name / f).read_bytes() for f in ours):
            return False
    return True


def array_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def print_table(rows: list[Row]) -> None:
    single = rows[0]
    print(f"{'mode':<7} {'workers':>7} {'images':>7} {'start s':>8} {'wall s':>8} {'img/s':>8} {'vs single':>10} "
          f"{'features equal':>15}")
    for row in rows:
        start = "-" if row.start_s is None else f"{row.start_s:.1f}"
        rate = row.images / row.wall_s
        ratio = rate / (single.images / single.wall_s)
        print(f"{row.mode:<7} {row.workers:>7} {row.images:>7} {start:>8} {row.wall_s:>8.2f} {rate:>8,.0f} "
              f"{ratio:>9.2f}x {'yes' if row.features_equal else 'NO':>15}")


if __name__ == "__main__":
    main()
