"""Ranking a collection from its store: `rank --store` against the adapter alone and against `rank --images`.

Generates an unlabelled collection of JPEG tars (crops of scikit-image photographs), embeds it, and
trains an adapter checkpoint for a few steps on a small labelled set embedded with the same backbone
(its quality does not matter, only its size). Then, in one run and after a warm-up of each:

    rank --store img/s    the whole `rank_store` call over the collection's store, no ranking file
                          (checkpoint, text tower, reading and scoring, merging the block scores)
      scoring img/s       its scoring part alone: the store read in the background while the blocks
                          are scored and their scores written (StoreRanking.score_rate)
    adapter-only img/s    the same ranker scoring the same tokens already on the device, same batches
                          and queries: what the adapter alone allows
    rank --images img/s   the whole `rank_images` call on the same images (decode, backbone, adapter)

and prints two ratios: scoring / adapter-only (reading the store should not bound ranking: target
>= 0.8) and whole store call / images (the speed-up the cache buys, fixed costs included).

    python -m rankpipe.benchmarks.rank_store                                  # CPU, tiny model, about a minute
    python -m rankpipe.benchmarks.rank_store --model ViT-B-16 --device cuda --images 100000 --tars 100 \\
        --batch-size 256 --images-subset 10000 --decode-workers 14        # GPU row, see BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from rankpipe.adapter.evaluation.rank import RankConfig, query_texts, rank_images
from rankpipe.adapter.evaluation.scoring import load_checkpoint
from rankpipe.adapter.evaluation.store_rank import StoreRanking, StoreReadConfig, rank_store
from rankpipe.adapter.training.loop import train_from_store
from rankpipe.adapter.training.run_config import load_run_config
from rankpipe.benchmarks.embed_throughput import make_photos
from rankpipe.devices import torch_device_for
from rankpipe.pipeline.data.manifest import LabelSpec, Manifest
from rankpipe.pipeline.embed.backbone import TINY_VIT, BackboneSpec
from rankpipe.pipeline.embed.job import embed, manifest_for_pattern
from rankpipe.pipeline.embed.text_tower import load_recorded_text_tower
from rankpipe.pipeline.store import TokenStore

# The trained query, and a sentence the checkpoint never saw (scored through the text tower's tokens).
TRAINED = "Sort images by score."
UNSEEN = "Sort images by how blue they are."
# Images of the small labelled set the checkpoint is trained on, and its training steps.
TRAIN_IMAGES = 64
TRAIN_STEPS = 2
# Run-config overrides of each adapter size: the paper's default, and a small one whose forward pass is
# cheap enough on a CPU that reading the store and the backbone weigh in the comparison.
ADAPTERS = {
    "default": (),
    "small": ("adapter.d_model=64", "adapter.heads=4", "adapter.text_extra_tokens=4", "adapter.blocks=1",
              "adapter.plain_layers=0", "adapter.relational_tokens=4", "adapter.pair_layers=1",
              "adapter.regression_layers=1"),
}


@dataclasses.dataclass(frozen=True)
class Setup:
    """A generated collection, its store, and a checkpoint of the same backbone."""

    # The folder of the collection's tars (collection-000000.tar ...) and of everything else.
    folder: Path
    tars: int
    # The collection's store, and the small labelled store the checkpoint was trained on.
    store: Path
    train_store: Path
    checkpoint: Path

    def pattern(self, tars: int | None = None) -> str:
        """The first `tars` (default: all) of the collection's tars."""
        last = (tars or self.tars) - 1
        return str(self.folder / (f"collection-{{000000..{last:06d}}}.tar" if last else "collection-000000.tar"))


def build(folder: Path, images: int, tars: int, size: tuple[int, int], spec: BackboneSpec, device: str,
          batch_size: int, workers: int, adapter: str = "default") -> Setup:
    """Write the collection's tars and a labelled set, embed both, train the checkpoint."""
    photos = make_photos(size)
    per_tar = -(-images // tars)
    for t in range(tars):
        with wds.TarWriter(str(folder / f"collection-{t:06d}.tar")) as sink:
            for i in range(t * per_tar, min((t + 1) * per_tar, images)):
                sink.write({"__key__": f"{i:08d}", "jpg": photos[i % len(photos)]})
    pattern = str(folder / f"collection-{{000000..{tars - 1:06d}}}.tar")
    embed(manifest_for_pattern(pattern, []), folder / "collection.zarr", spec, device=device, batch_size=batch_size,
          workers=workers, progress=False)
    # A small labelled set of the same backbone: the checkpoint must match the collection's store.
    with wds.TarWriter(str(folder / "train-000000.tar")) as sink:
        for i in range(TRAIN_IMAGES):
            meta = {"labels": {"score": float(i % 7)}, "split": "train" if i % 2 else "val"}
            sink.write({"__key__": f"t{i:04d}", "jpg": photos[(i * 5) % len(photos)], "json": json.dumps(meta).encode()})
    manifest = Manifest("train", str(folder / "train-000000.tar"), (LabelSpec("score", TRAINED),))
    embed(manifest, folder / "train.zarr", spec, device=device, batch_size=batch_size, workers=0, progress=False)
    config = load_run_config(None, [*ADAPTERS[adapter], f"train.max_steps={TRAIN_STEPS}", f"train.eval_every={TRAIN_STEPS}",
                                    "train.batch_size=16", "optim.warmup_steps=1"])
    result = train_from_store(TokenStore.open(folder / "train.zarr"), folder / "run", config, device=device)
    return Setup(folder, tars, folder / "collection.zarr", folder / "train.zarr", result.best_path)


class AdapterOnly:
    """The ranker alone on the first `images` valid tokens of the store, held on the device."""

    def __init__(self, setup: Setup, config: RankConfig, device: str, images: int) -> None:
        self.device = torch_device_for(device)
        self.loaded = load_checkpoint(setup.checkpoint, self.device)
        store = TokenStore.open(setup.store)
        tower = load_recorded_text_tower(store.provenance)
        self.queries = query_texts(self.loaded, tower.encode_text, config.queries)
        tokens = torch.from_numpy(store.image_tokens(store.rows()[:images])).to(self.device)  # [n, P, D] float16
        self.batches = [tokens[i:i + config.batch_size] for i in range(0, len(tokens), config.batch_size)]
        self.images = len(tokens)
        self.rate()  # warm-up

    def rate(self) -> float:
        """Img/s of one pass over the held tokens, every query scored as `rank_store` scores it."""
        _synchronize(self.device)
        start = time.perf_counter()
        with torch.inference_mode():
            for batch in self.batches:
                self.loaded.ranker.score(batch, self.queries)  # per query; scores come back to the host
        _synchronize(self.device)
        return self.images / (time.perf_counter() - start)


def store_rate(setup: Setup, config: RankConfig, device: str, memory_mb: float) -> tuple[float, StoreRanking]:
    """Img/s of a whole `rank_store` call (no ranking file: only both ends of the order are kept)."""
    start = time.perf_counter()
    result = rank_store(setup.checkpoint, setup.store, config, StoreReadConfig(memory_mb=memory_mb), device=device)
    return result.ranked / (time.perf_counter() - start), result


def images_rate(setup: Setup, config: RankConfig, device: str, tars: int) -> tuple[float, int]:
    """Img/s of a whole `rank_images` call on the first `tars` of the collection's tars."""
    rank_images(setup.checkpoint, setup.pattern(1), config, device=device)  # warm-up
    start = time.perf_counter()
    ranking = rank_images(setup.checkpoint, setup.pattern(tars), config, device=device)
    return len(ranking.keys) / (time.perf_counter() - start), len(ranking.keys)


def _spread(values, fmt: str | None = None) -> str:
    """The median of repeated measurements and their range."""
    values = np.asarray(values, dtype=np.float64)
    show = (lambda v: f"{v:{fmt}}") if fmt else _rate
    return f"{show(np.median(values))} [{show(values.min())}, {show(values.max())}]"


def _rate(value: float) -> str:
    """A rate with three significant digits at least (a slow CPU row stays readable)."""
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=TINY_VIT, help="open_clip model name")
    parser.add_argument("--pretrained", default="none", help="pretrained tag, checkpoint file, or none (speed does not depend on it)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=2000, help="images in the collection")
    parser.add_argument("--tars", type=int, default=8, help="tars of the collection (the blocks of rank --store)")
    parser.add_argument("--image-source-size", default="320x240", help="WxH of the generated JPEGs")
    parser.add_argument("--adapter", choices=sorted(ADAPTERS), default="default", help="adapter size of the checkpoint")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass, in every measurement")
    parser.add_argument("--memory-mb", type=float, default=1024.0, help="rank --store's memory budget")
    parser.add_argument("--decode-workers", type=int, default=2, help="decoding processes of embed and rank --images")
    parser.add_argument("--forward-images", type=int, default=20000, help="images of the adapter-only run (on the device)")
    parser.add_argument("--repeats", type=int, default=3, help="alternated timed runs of rank --store and the adapter alone")
    parser.add_argument("--images-subset", type=int, default=0,
                        help="rank --images on only this many images (whole tars; 0: all), to keep a large run short")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    rows = measure(args)
    key_width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{key_width}}  {value}")


def measure(args: argparse.Namespace) -> list[tuple[str, str]]:
    """Build the collection, time the three ways of ranking it, and return the table's rows."""
    width, height = (int(v) for v in args.image_source_size.lower().split("x"))
    config = RankConfig((TRAINED, UNSEEN), batch_size=args.batch_size, workers=args.decode_workers)
    with tempfile.TemporaryDirectory() as tmp:
        setup = build(Path(tmp), args.images, args.tars, (width, height), BackboneSpec(args.model, args.pretrained),
                      args.device, args.batch_size, args.decode_workers, args.adapter)
        store = TokenStore.open(setup.store)
        store_mb = store.num_rows * store.image_tokens(slice(0, 1)).nbytes / 2**20
        alone = AdapterOnly(setup, config, args.device, args.forward_images)
        rank_store(setup.checkpoint, setup.train_store, config, device=args.device)  # warm-up, on the small store
        # Alternated, so that whatever else runs on the machine weighs on both alike; medians are reported.
        adapters, rankings, scorings = [], [], []
        for _ in range(args.repeats):
            adapters.append(alone.rate())
            ranked, result = store_rate(setup, config, args.device, args.memory_mb)
            rankings.append(ranked)
            scorings.append(result.score_rate)
        per_tar = -(-args.images // args.tars)
        subset_tars = args.tars if not args.images_subset else max(1, -(-args.images_subset // per_tar))
        from_images, image_count = images_rate(setup, config, args.device, min(subset_tars, args.tars))
    dtype = "tokens fp16, bf16 autocast" if args.device.startswith("cuda") else "tokens fp16, fp32 compute"
    rows = [
        ("model", f"{args.model} ({store.provenance['token_grid'][0]}x{store.provenance['token_grid'][1]}x"
                  f"{store.provenance['token_dim']} tokens)"),
        ("device, dtype", f"{args.device}, {dtype}"), ("adapter", args.adapter), ("batch size", args.batch_size),
        ("queries", "2 (one trained, one unseen), combined"),
        ("collection", f"{args.images} JPEG {width}x{height} in {args.tars} tars; store {store_mb:,.0f} MiB of tokens"),
        ("repeats", f"{args.repeats} (median, [min, max])"),
        ("rank --store img/s", f"{_spread(rankings)} ({result.ranked} images, memory {args.memory_mb:g} MB)"),
        ("  scoring img/s", _spread(scorings)),
        ("adapter-only img/s", f"{_spread(adapters)} ({alone.images} images on the device)"),
        ("rank --images img/s", f"{_rate(from_images)} ({image_count} images, {args.decode_workers} decode workers)"),
        ("scoring / adapter-only", f"{_spread(np.divide(scorings, adapters), '.2f')}  (target >= 0.8)"),
        ("store / images", f"{np.median(rankings) / from_images:.1f}x"),
    ]
    if not np.isfinite(result.ranking.combined).all():
        raise SystemExit("rank --store gave non-finite scores")
    return rows


if __name__ == "__main__":
    main()
