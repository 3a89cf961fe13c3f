"""Shared fixtures: tiny WebDataset tars of generated images with labels, and a finished token store.

The images carry their labels: `squares` bright squares on a smooth background whose mean level is
`brightness`, so a model trained on the store has something real to learn.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from rankpipe.pipeline.data.manifest import LabelSpec, Manifest

TINY_LABELS = (
    LabelSpec(name="squares", query="Sort images by the number of squares."),
    LabelSpec(name="brightness", query="Sort images by brightness."),
)
SPLIT_CYCLE = ("train", "train", "val", "test")


def tiny_image(rng: np.random.Generator, squares: int, size: tuple[int, int] = (80, 60)) -> Image.Image:
    """A smooth gradient with `squares` bright squares; [h, w, 3] uint8."""
    w, h = size
    level = rng.uniform(40, 180)
    ramp = np.linspace(-30, 30, w)[None, :, None] + np.linspace(-20, 20, h)[:, None, None]  # [h, w, 1]
    tint = rng.uniform(-20, 20, size=3)[None, None, :]  # [1, 1, 3]
    pixels = np.clip(level + ramp + tint, 0, 255)  # [h, w, 3]
    for _ in range(squares):
        x, y = rng.integers(0, w - 10), rng.integers(0, h - 10)
        pixels[y:y + 10, x:x + 10] = 250
    return Image.fromarray(pixels.astype(np.uint8))


def encode(image: Image.Image, fmt: str = "jpg") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG" if fmt == "jpg" else fmt.upper(), quality=90)
    return buffer.getvalue()


def write_tiny_shards(folder: Path, n_tars: int = 3, per_tar: int = 12, seed: int = 0,
                      with_index: bool = False, name: str = "tiny") -> Path:
    """Write `n_tars` tars of `per_tar` samples and a manifest; returns the manifest path.

    Sample i of tar t has key f"t{t}-{i:04d}", a JPEG under "jpg" (every 5th a PNG under "png") and
    json {"labels": {"squares", "brightness"}, "split"}.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    index = []
    for t in range(n_tars):
        tar_name = f"{name}-{t:06d}.tar"
        with wds.TarWriter(str(folder / tar_name)) as sink:
            for i in range(per_tar):
                squares = int(rng.integers(0, 6))
                image = tiny_image(rng, squares)
                fmt = "png" if i % 5 == 4 else "jpg"
                labels = {"squares": squares, "brightness": float(np.asarray(image, dtype=np.float32).mean() / 255.0)}
                sink.write({"__key__": f"t{t}-{i:04d}", fmt: encode(image, fmt),
                            "json": json.dumps({"labels": labels, "split": SPLIT_CYCLE[i % 4]}).encode()})
        index.append({"name": tar_name, "count": per_tar})
    if with_index:
        (folder / "index.json").write_text(json.dumps({"tars": index, "total": n_tars * per_tar}))
    manifest = Manifest(name=name, shards=f"{name}-{{000000..{n_tars - 1:06d}}}.tar", labels=TINY_LABELS)
    path = folder / "manifest.yaml"
    manifest.save(path)
    return path


def read_tar_samples(url: str) -> list[dict]:
    """All samples of a tar as webdataset dicts (for checking a store against its input)."""
    return list(wds.WebDataset(url, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False))


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Manifest path of 3 tars x 12 generated images with labels 'squares' and 'brightness'."""
    return write_tiny_shards(tmp_path_factory.mktemp("tiny_shards"))


@pytest.fixture(scope="session")
def tiny_store(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished store of tiny_shards embedded with rankpipe-tiny-vit, random weights (seed 0), on CPU."""
    from rankpipe.pipeline.data.manifest import load_manifest
    from rankpipe.pipeline.embed.backbone import TINY_VIT, BackboneSpec
    from rankpipe.pipeline.embed.job import embed

    path = tmp_path_factory.mktemp("tiny_store") / "tiny.zarr"
    embed(load_manifest(tiny_shards), path, BackboneSpec(TINY_VIT, "none", seed=0), device="cpu",
          batch_size=8, workers=0, progress=False)
    return path


# A tiny adapter run for tests that train: seconds on a CPU.
TINY_RUN = [
    "adapter.d_model=32", "adapter.heads=4", "adapter.text_extra_tokens=4", "adapter.blocks=1",
    "adapter.plain_layers=0", "adapter.relational_tokens=4", "adapter.pair_layers=1", "adapter.regression_layers=1",
    "optim.lr=2e-3", "optim.warmup_steps=10", "train.batch_size=16", "train.eval_every=20", "train.log_every=5",
]
# Provenance of stores written directly with the store API (no backbone behind them).
SYNTHETIC_PROVENANCE = {
    "model": "synthetic", "pretrained": "none", "checkpoint_sha256": None, "seed": 0, "image_size": [32, 32],
    "preprocess": {"mean": [0.5], "std": [0.5], "interpolation": "bicubic", "resize_mode": "squash"},
    "token_grid": [2, 2], "token_dim": 16, "embed_dim": 8, "text_token_dim": 12, "context_length": 6,
}


def assert_rank_matches_store(checkpoint, store, label: str) -> None:
    """`rank_images` on the store's own tars gives, per key, the scores `predict` gives through the store."""
    from rankpipe.adapter.evaluation.rank import RankConfig, rank_images
    from rankpipe.adapter.evaluation.scoring import load_checkpoint, predict

    loaded = load_checkpoint(checkpoint)
    urls = store.tar_urls()
    pattern = urls[0] if len(urls) == 1 else "{" + ",".join(urls) + "}"
    ranking = rank_images(checkpoint, pattern, RankConfig((loaded.labels[label].query,)))
    rows = store.rows()
    expected = dict(zip(store.keys()[rows], predict(loaded, store, label, rows)))
    got = dict(zip(ranking.keys, ranking.queries[0].scores))
    assert set(got) == set(expected)
    np.testing.assert_allclose([got[k] for k in expected], list(expected.values()), rtol=1e-5, atol=1e-6)
