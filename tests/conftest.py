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
import torch
import webdataset as wds
from PIL import Image

from rankpipe.adapter.training.run_config import RunConfig, load_run_config
from rankpipe.pipeline.data.manifest import LabelSpec, Manifest, TargetTransform
from rankpipe.pipeline.data.tars import TarInfo
from rankpipe.pipeline.embed.backbone import TextFeatures
from rankpipe.pipeline.store import BlockMeta, StoreConfig, TokenStore, create_store, plan_store

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


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """best.pt of a tiny adapter trained 10 steps on both labels of tiny_store."""
    from rankpipe.adapter.training.loop import train_from_store

    out = tmp_path_factory.mktemp("tiny_run")
    config = tiny_config("optim.warmup_steps=5", "train.eval_every=5", "train.max_steps=10")
    return train_from_store(TokenStore.open(tiny_store), out, config).best_path


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

# Settings that make a training run stream the synthetic store in windows instead of holding it.
STREAMED = ("train.max_resident_gb=1.2e-5", "train.window_steps=7")


@pytest.fixture
def one_thread():
    """Tiny matrices run fastest on one thread; several threads contend on a small shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Interrupted(Exception):
    """Raised by `stop_at`'s callback: a training run killed the way a crash would kill it."""


def stop_at(step: int):
    """A training progress callback that kills the run right after its validation at `step`, so its
    last.pt holds that step."""

    def crash(event) -> None:
        if event.val_srcc is not None and event.step == step:
            raise Interrupted

    return crash


def interrupted_then_resumed(store, out_dir, config: RunConfig, at: int = 20, **train_kwargs):
    """Train into `out_dir`, kill the run right after its validation at step `at`, then resume it to the
    end; the resumed run's TrainResult."""
    from rankpipe.adapter.training.loop import train_from_store

    with pytest.raises(Interrupted):
        train_from_store(store, out_dir, config, progress=stop_at(at), **train_kwargs)
    return train_from_store(store, out_dir, config, resume=True, **train_kwargs)


def tiny_config(*extra: str) -> RunConfig:
    """The tiny run preset plus `extra` overrides."""
    return load_run_config(None, [*TINY_RUN, *extra])


def weights(path) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint file."""
    return torch.load(path, weights_only=True)["model"]


def write_store_rows(path, provenance: dict, manifest: Manifest, texts: dict, sizes: list[int],
                     columns: dict[str, np.ndarray], labels: dict[str, np.ndarray],
                     tars_made_by: str | None = None) -> TokenStore:
    """A finished token store written with the store API, one tar of `sizes[t]` rows after another.

    `columns` holds [n, P, D] "tokens", and [n] "keys", "valid" and "splits"; `labels` [n] values per label.
    A store whose provenance has a flip view also takes [n, P, D] "flipped" tokens.
    `tars_made_by` names what generated the (imaginary) tars: it makes their recorded identities.
    """
    tokens = columns["tokens"]
    _, P, D = tokens.shape
    tars = [TarInfo(f"x-{t:06d}.tar", size, f"sha256:{tars_made_by}-{t}" if tars_made_by else None)
            for t, size in enumerate(sizes)]
    plan = plan_store(tars, P * D * 2, StoreConfig())
    store = create_store(path, plan, provenance, manifest, texts, StoreConfig())
    starts = np.cumsum([0, *sizes])
    for t, block in enumerate(plan.tars):
        size = block.row_stop - block.row_start
        src = slice(starts[t], starts[t] + block.count)

        def padded(values, fill, size=size, src=src, count=block.count):
            out = np.full((size, *values.shape[1:]), fill, dtype=values.dtype)
            out[:count] = values[src]
            return out

        flipped = None
        if "flipped" in columns:
            flipped = (padded(columns["flipped"].astype(np.float16), 0), np.zeros((size, 8), np.float16))
        store.write_tokens(block.row_start, padded(tokens.astype(np.float16), 0), np.zeros((size, 8), np.float16), flipped)
        store.write_block_meta(t, BlockMeta(
            keys=padded(columns["keys"], ""), valid=padded(columns["valid"], False), errors=np.full(size, ""),
            splits=padded(columns["splits"], ""), labels={name: padded(values, np.nan) for name, values in labels.items()},
        ))
        store.mark_done(t)
    return TokenStore.open(path)


def write_synthetic_store(path, n: int = 120, seed: int = 0, provenance: dict | None = None,
                          distance_ref: float | None = None, held_out: str | None = None,
                          tars: int = 2, val_every: int = 3, nan_row: int | None = None,
                          flip_view: bool = False) -> TokenStore:
    """A learnable token store of `tars` tars written with the store API.

    Label "count" is written into channel 0 of every image token and label "size" into channel 1
    (plus noise), so an adapter can learn both; the other channels are noise. Every `val_every`-th
    row is val, the rest train; one row is invalid and some "size" labels are missing. With
    `flip_view`, the store also holds a flipped view: the tokens in reverse order, with their own noise.
    """
    rng = np.random.default_rng(seed)
    provenance = dict(provenance or SYNTHETIC_PROVENANCE)
    P, D, L, Dt = 4, 16, 6, 12
    labels = {"count": rng.uniform(0, 10, n).astype(np.float32), "size": rng.uniform(-1, 1, n).astype(np.float32)}
    tokens = rng.normal(0, 1, (n, P, D))
    tokens[:, :, 0] = (labels["count"][:, None] - 5) / 3 + rng.normal(0, 0.2, (n, P))
    tokens[:, :, 1] = labels["size"][:, None] * 1.5 + rng.normal(0, 0.2, (n, P))
    labels["size"][::17] = np.nan
    if nan_row is not None:  # what a store embedded before non-finite rows were made invalid can hold
        tokens[nan_row, 0, 0] = np.nan
    valid = np.ones(n, bool)
    valid[5] = False
    splits = np.where(np.arange(n) % val_every == val_every - 1, "val", "train")
    if held_out is not None:  # a query kept out of training: labelled on val rows only
        labels[held_out][splits == "train"] = np.nan
    keys = np.array([f"img{i:04d}" for i in range(n)])
    count_target = TargetTransform("distance", distance_ref) if distance_ref is not None else TargetTransform()
    manifest = Manifest(
        name="synthetic", shards=f"x-{{000000..{tars - 1:06d}}}.tar",
        labels=(LabelSpec("count", "Sort images by the number of dots.", target=count_target),
                LabelSpec("size", "Sort images by size.")),
    )
    texts = {
        label.query: TextFeatures(tokens=rng.normal(0, 1, (L, Dt)).astype(np.float16), length=4 + i, embed=np.zeros(8, np.float16))
        for i, label in enumerate(manifest.labels)
    }
    sizes = [n // tars] * (tars - 1) + [n - (tars - 1) * (n // tars)]
    columns = {"tokens": tokens, "keys": keys, "valid": valid, "splits": splits}
    if flip_view:
        provenance["views"] = ["original", "hflip"]
        columns["flipped"] = tokens[:, ::-1] + rng.normal(0, 0.1, tokens.shape)
    return write_store_rows(path, provenance, manifest, texts, sizes, columns, labels, tars_made_by=f"seed{seed}")


def embedding_scores(loaded, label: str, embed) -> np.ndarray:
    """A baseline checkpoint's [n] scores of [n, E] pooled embeddings, through its ranker."""
    assert loaded.ranker.reads == "embed"
    (scores,) = loaded.ranker.score(torch.as_tensor(np.asarray(embed)), [loaded.query(label)])
    return scores
