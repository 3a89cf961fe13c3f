"""Embed throughput: JPEG tars -> finished store, against the backbone's forward pass alone.

Generates its own JPEG tars (crops of a scikit-image photograph, re-encoded at the source size, so
decoding costs what real photos cost) in a temporary folder, then prints a table:

    pipeline img/s   (decode + preprocess + forward + store writes, the streaming part of `embed`)
    backbone img/s   (forward on random tensors already on the device, same model and batch)
    ratio

    python bench/embed_throughput.py                                   # CPU, tiny model, seconds
    python bench/embed_throughput.py --model ViT-B-16 --device cuda --batch-size 256 --images 20000 --workers 16
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

from rankpipe.pipeline.backbone import TINY_VIT, BackboneSpec, load_backbone
from rankpipe.pipeline.embed import embed
from rankpipe.pipeline.manifest import LabelSpec, Manifest

# Distinct encoded images; the tars repeat them (decoding cost does not depend on repetition).
UNIQUE_IMAGES = 64


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

    rows = [
        ("model", args.model), ("device", args.device), ("batch size", args.batch_size),
        ("images", f"{args.images} ({width}x{height} JPEG) in {n_tars} tars"), ("workers", args.workers),
        ("store size", f"{store_bytes / 2**20:.1f} MiB"),
        ("pipeline img/s", f"{pipeline_rate:,.0f}"), ("backbone-only img/s", f"{backbone_rate:,.0f}"),
        ("ratio", f"{pipeline_rate / backbone_rate:.2f}"),
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
