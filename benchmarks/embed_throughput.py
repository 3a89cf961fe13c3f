"""Embed throughput: JPEG tars -> finished store, against the backbone's forward pass alone.

Generates its own JPEG tars (crops of a scikit-image photograph, re-encoded at the source size, so
decoding costs what real photos cost) in a temporary folder, then prints a table:

    pipeline img/s   (decode + preprocess + forward + store writes, the streaming part of `embed`)
    backbone img/s   (forward on random tensors already on the device, same model and batch)
    ratio

With --stages it also times each part of the pipeline alone, in the same run, so the slowest one
shows what bounds the pipeline:

    read img/s       tar reading in the DataLoader workers (with PIL decoding + preprocessing on
                     the CPU path; raw JPEG bytes only where the GPU decodes)
    GPU decode img/s nvJPEG decoding + resize + normalise of batches already in host memory (CUDA)
    write img/s      the store writer alone (WriterThread, shard writes), fed ready-made fp16 token
                     batches of the model's shape; also given in MB/s

    python -m rankpipe.benchmarks.embed_throughput                                   # CPU, tiny model, seconds
    python -m rankpipe.benchmarks.embed_throughput --model ViT-B-16 --device cuda --batch-size 256 --images 20000 --workers 16 --stages
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from skimage import data as skdata

from rankpipe.benchmarks.synthetic_store import feed_writer, random_features
from rankpipe.pipeline.codec_pipelines import resolve_codec_pipeline
from rankpipe.pipeline.data.manifest import LabelSpec, Manifest
from rankpipe.pipeline.embed.backbone import (
    TINY_VIT,
    Backbone,
    BackboneSpec,
    load_backbone,
)
from rankpipe.pipeline.embed.decode import DecodedBatch, TarBatches, TarTask
from rankpipe.pipeline.embed.gpu_decode import GpuPreprocess
from rankpipe.pipeline.embed.job import (
    WRITE_CODEC_PIPELINE,
    WRITE_THREADS,
    embed,
    input_tars,
    open_or_create_store,
    plan_for_backbone,
)
from rankpipe.pipeline.store import StoreConfig

# Distinct encoded images; the tars repeat them (decoding cost does not depend on repetition).
UNIQUE_IMAGES = 64
# Batches kept in host memory for the GPU-decode stage.
DECODE_BATCHES = 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=TINY_VIT, help="open_clip model name")
    parser.add_argument("--pretrained", default="none", help="pretrained tag, checkpoint file, or none")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--images", type=int, default=512, help="images in the generated tars")
    parser.add_argument("--tars", type=int, default=0, help="number of tars (default: one per worker, at least 1)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--image-source-size", default="640x480", help="WxH of the generated JPEGs")
    parser.add_argument("--backbone-batches", type=int, default=20, help="timed batches of the forward-only run")
    parser.add_argument("--stages", action="store_true", help="also time tar reading, GPU decoding and store "
                                                              "writing alone")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    width, height = (int(v) for v in args.image_source_size.lower().split("x"))
    n_tars = args.tars or max(1, args.workers)
    spec = BackboneSpec(args.model, args.pretrained)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        manifest = write_tars(folder, args.images, n_tars, (width, height))
        backbone_rate = backbone_throughput(spec, args.device, args.batch_size, args.backbone_batches)
        # A small run first so CUDA kernels, worker start-up code paths and caches are warm.
        embed(manifest_subset(folder, manifest), folder / "warm.zarr", spec, device=args.device,
              batch_size=args.batch_size, workers=min(args.workers, 1), mode="overwrite", progress=False)
        summary = embed(manifest, folder / "bench.zarr", spec, device=args.device, batch_size=args.batch_size,
                        workers=args.workers, mode="overwrite", progress=False)
        pipeline_rate = summary.images_embedded / summary.embed_seconds
        store_bytes = sum(p.stat().st_size for p in (folder / "bench.zarr").rglob("*") if p.is_file())
        stages = stage_rates(folder, manifest, spec, args) if args.stages else []

    rows = [
        ("model", args.model), ("device", args.device), ("batch size", args.batch_size),
        ("images", f"{args.images} ({width}x{height} JPEG) in {n_tars} tars"), ("workers", args.workers),
        ("store size", f"{store_bytes / 2**20:.1f} MiB"),
        ("pipeline img/s", f"{pipeline_rate:,.0f}"), ("backbone-only img/s", f"{backbone_rate:,.0f}"),
        ("ratio", f"{pipeline_rate / backbone_rate:.2f}"),
        *stages,
    ]
    key_width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{key_width}}  {value}")


def write_tars(folder: Path, n_images: int, n_tars: int, size: tuple[int, int]) -> Manifest:
    """JPEG tars of photo crops with a dummy label; returns their manifest."""
    photos = make_photos(size)
    per_tar = -(-n_images // n_tars)
    written = 0
    for t in range(n_tars):
        with wds.TarWriter(str(folder / f"bench-{t:06d}.tar")) as sink:
            for i in range(min(per_tar, n_images - written)):
                meta = {"labels": {"score": float(written % 10)}, "split": "train"}
                sink.write({"__key__": f"{t:06d}-{i:06d}", "jpg": photos[written % len(photos)],
                            "json": json.dumps(meta).encode()})
                written += 1
    manifest = Manifest(name="bench", shards=str(folder / f"bench-{{000000..{n_tars - 1:06d}}}.tar"),
                        labels=(LabelSpec("score", "Sort images by score."),))
    return manifest


def manifest_subset(folder: Path, manifest: Manifest) -> Manifest:
    return Manifest(name="warm", shards=str(folder / "bench-000000.tar"), labels=manifest.labels)


def make_photos(size: tuple[int, int]) -> list[bytes]:
    """Random crops of scikit-image's photographs, resized to `size`, JPEG-encoded at quality 90."""
    rng = np.random.default_rng(0)
    sources = [skdata.astronaut(), skdata.coffee(), skdata.chelsea(), skdata.rocket()]
    photos = []
    for i in range(UNIQUE_IMAGES):
        photo = sources[i % len(sources)]  # [h, w, 3] uint8
        h, w = photo.shape[:2]
        ch, cw = int(h * rng.uniform(0.5, 1.0)), int(w * rng.uniform(0.5, 1.0))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = Image.fromarray(photo[y:y + ch, x:x + cw]).resize(size, Image.BICUBIC)
        buffer = io.BytesIO()
        crop.save(buffer, format="JPEG", quality=90)
        photos.append(buffer.getvalue())
    return photos


def stage_rates(folder: Path, manifest: Manifest, spec: BackboneSpec, args: argparse.Namespace) -> list[tuple[str, str]]:
    """Table rows for each pipeline stage timed alone: tar reading, GPU decoding (CUDA), store writing."""
    backbone = load_backbone(spec, args.device)
    on_gpu = backbone.device.type == "cuda"
    gpu_pre = GpuPreprocess(backbone.preprocess, backbone.device) if on_gpu else None
    tars = input_tars(manifest)
    tasks = [TarTask(t, tar.url, tar.count) for t, tar in enumerate(tars)]
    read_rate, kept = read_throughput(tasks, backbone, args.batch_size, args.workers, gpu_pre is not None)
    rows = [("read img/s (alone)", f"{read_rate:,.0f}")]
    if gpu_pre is not None:
        rows.append(("GPU decode img/s (alone)", f"{gpu_decode_throughput(kept, gpu_pre):,.0f}"))
    write_rate, write_mb = write_throughput(folder / "write-only.zarr", manifest, tars, backbone, args.batch_size)
    rows.append(("write img/s (alone)", f"{write_rate:,.0f} ({write_mb:,.0f} MB/s)"))
    return rows


def read_throughput(tasks: list[TarTask], backbone: Backbone, batch_size: int, workers: int,
                    jpeg_on_gpu: bool) -> tuple[float, list[DecodedBatch]]:
    """Img/s of the DataLoader alone, set up as `embed` sets it up; also returns the first batches read."""
    dataset = TarBatches(tasks, ["score"], batch_size, backbone.preprocess, jpeg_on_gpu=jpeg_on_gpu)
    num_workers = min(workers, len(tasks))
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=jpeg_on_gpu,
                                         prefetch_factor=4 if num_workers else None)
    kept, images = [], 0
    start = time.perf_counter()
    for batch in loader:
        batch.load_jpegs()  # their bytes in this process, as the GPU decoder takes them
        images += batch.num_images
        if len(kept) < DECODE_BATCHES:
            kept.append(batch)
    return images / (time.perf_counter() - start), kept


def gpu_decode_throughput(batches: list[DecodedBatch], gpu_pre: GpuPreprocess) -> float:
    """Img/s of nvJPEG decoding + preprocessing of batches already in host memory."""
    def run() -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        for batch in batches:
            gpu_pre(batch.jpegs())
        torch.cuda.synchronize()
        return time.perf_counter() - start

    run()  # warm-up
    return sum(len(batch.jpeg_positions) for batch in batches) / run()


def write_throughput(path: Path, manifest: Manifest, tars: list, backbone: Backbone,
                     batch_size: int) -> tuple[float, float]:
    """Img/s and MB/s of the store writer alone, fed ready-made batches of the model's token shape."""
    config = StoreConfig()
    plan = plan_for_backbone(tars, backbone, config)
    store = open_or_create_store(path, "overwrite", backbone, manifest, plan, config)
    tokens, embed_ = random_features(batch_size, backbone.num_tokens, backbone.token_dim, backbone.embed_dim)
    start = time.perf_counter()
    feed_writer(store, tokens, embed_, WRITE_THREADS, resolve_codec_pipeline(WRITE_CODEC_PIPELINE))
    seconds = time.perf_counter() - start
    images = sum(block.count for block in store.blocks)
    return images / seconds, images * (tokens[0].nbytes + embed_[0].nbytes) / seconds / 1e6


@torch.inference_mode()
def backbone_throughput(spec: BackboneSpec, device: str, batch_size: int, batches: int) -> float:
    """Forward-only img/s on random images already on the device (bf16 autocast on CUDA)."""
    backbone = load_backbone(spec, device)
    x = torch.randn(batch_size, 3, *backbone.image_size, device=device)  # [B, 3, H, W]
    on_gpu = torch.device(device).type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu else contextlib.nullcontext()

    def run(n: int) -> float:
        if on_gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast:
            for _ in range(n):
                tokens, embed_ = backbone.encode_images(x)
                tokens.to(torch.float16), embed_.to(torch.float16)
        if on_gpu:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    run(3)  # warm-up
    return batches * batch_size / run(batches)


if __name__ == "__main__":
    main()
