"""The demo dataset: labels exact on the stored pixels, splits disjoint by photo, seeded."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import webdataset as wds
from scipy import ndimage

from rankpipe.pipeline.data.manifest import load_manifest
from rankpipe.pipeline.datasets import demo_data
from rankpipe.pipeline.datasets.demo_data import (
    DemoConfig,
    build_demo_dataset,
    colorfulness,
    decode_rgb,
    generate_demo_images,
    load_photo,
    luma_mean,
    render_background,
)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The default demo (240 images at 96 px), built once, and how long it took."""
    out = tmp_path_factory.mktemp("demo")
    start = time.perf_counter()
    manifest_path = build_demo_dataset(out)
    seconds = time.perf_counter() - start
    manifest = load_manifest(manifest_path)
    samples = list(wds.WebDataset(manifest.shard_urls(), shardshuffle=False))
    return manifest, samples, seconds


def test_manifest_and_tars(demo):
    manifest, samples, seconds = demo
    assert seconds < 30, f"building the demo took {seconds:.1f} s"
    assert manifest.name == "demo"
    assert [(l.name, l.query) for l in manifest.labels] == [
        ("red_discs", "Sort images by the number of red discs."),
        ("brightness", "Sort images by brightness."),
        ("colorfulness", "Sort images by the image quality of colorfulness."),
    ]
    assert len(samples) == 240 and len({s["__key__"] for s in samples}) == 240
    index = json.loads((manifest.path.parent / "index.json").read_text())
    assert index["total"] == 240 and len(index["tars"]) == len(manifest.shard_urls()) == 3


def test_labels_are_exact_on_the_stored_pixels(demo):
    _, samples, _ = demo
    for sample in samples:
        pixels = decode_rgb(sample["jpg"])
        assert pixels.shape == (96, 96, 3)
        labels = json.loads(sample["json"])["labels"]
        assert labels["brightness"] == luma_mean(pixels)
        assert labels["colorfulness"] == colorfulness(pixels)


def test_labels_spread(demo):
    _, samples, _ = demo
    labels = [json.loads(s["json"])["labels"] for s in samples]
    assert {l["red_discs"] for l in labels} == {float(k) for k in range(7)}
    brightness = [l["brightness"] for l in labels]
    assert min(brightness) < 60 and max(brightness) > 150
    assert np.std([l["colorfulness"] for l in labels]) > 5


def _count_pasted_discs(pixels: np.ndarray, background: np.ndarray, color) -> list[tuple[float, float]]:
    """Centres of red blobs that are not in the disc-free background: the discs a viewer sees."""
    pixels, background = pixels.astype(np.float64), background.astype(np.float64)
    changed = np.linalg.norm(pixels - background, axis=-1) > 40
    red = np.linalg.norm(pixels - np.array(color), axis=-1) < 60
    blobs, n = ndimage.label(changed & red)
    sizes = ndimage.sum(np.ones_like(blobs), blobs, range(1, n + 1))
    centres = ndimage.center_of_mass(changed & red, blobs, range(1, n + 1))
    return [c for c, size in zip(centres, sizes) if size >= 10]


def test_red_disc_count_matches_the_pixels(demo):
    _, samples, _ = demo
    config = DemoConfig()
    images = generate_demo_images()
    photos = {name: load_photo(name) for name in config.photos}
    for sample, image in zip(samples, images):
        assert sample["jpg"] == image.jpeg
        label = json.loads(sample["json"])["labels"]["red_discs"]
        background = render_background(photos[image.photo], image.crop, image.factor, 96)
        centres = _count_pasted_discs(decode_rgb(sample["jpg"]), background, config.disc_color)
        assert len(centres) == label == len(image.discs), sample["__key__"]
        for cy, cx, _ in image.discs:
            assert min(np.hypot(cy - y, cx - x) for y, x in centres) < 1.0


def test_splits_are_disjoint_by_photo(demo):
    manifest, samples, _ = demo
    photos_of = {"train": set(), "val": set(), "test": set()}
    for sample in samples:
        meta = json.loads(sample["json"])
        photos_of[meta["split"]].add(meta["source"].split("/")[0])
    assert all(photos_of.values())
    assert not (photos_of["train"] & photos_of["val"] or photos_of["train"] & photos_of["test"]
                or photos_of["val"] & photos_of["test"])
    assert set().union(*photos_of.values()) == set(DemoConfig().photos)
    assert manifest.splits.values("test") == ("test",)


@pytest.mark.parametrize("seed", [0, 3])
def test_deterministic_for_a_seed(seed):
    first = generate_demo_images(20, 48, seed)
    again = generate_demo_images(20, 48, seed)
    other = generate_demo_images(20, 48, seed + 1)
    assert [i.jpeg for i in first] == [i.jpeg for i in again]
    assert [i.jpeg for i in first] != [i.jpeg for i in other]
    assert {i.photo: i.split for i in first} == {i.photo: i.split for i in again}


def test_small_build_and_rebuild(tmp_path):
    config = DemoConfig(samples_per_tar=7)
    path = build_demo_dataset(tmp_path / "d", n_images=30, image_size=64, seed=5, config=config)
    manifest = load_manifest(path)
    assert manifest.shards == "demo-{000000..000004}.tar"
    again = load_manifest(build_demo_dataset(tmp_path / "e", n_images=30, image_size=64, seed=5, config=config))

    def contents(m):
        return [(s["__key__"], s["jpg"], s["json"]) for s in wds.WebDataset(m.shard_urls(), shardshuffle=False)]

    first = contents(manifest)
    assert len(first) == 30 and first == contents(again)
    assert decode_rgb(first[0][1]).shape == (64, 64, 3)


def test_luma_and_colorfulness_by_hand():
    gray = np.full((4, 4, 3), 100, np.uint8)
    assert luma_mean(gray) == pytest.approx(100.0) and colorfulness(gray) == 0.0
    assert luma_mean(np.array([[[255, 0, 0], [0, 255, 0]]], np.uint8)) == pytest.approx((0.299 + 0.587) * 255 / 2)
    # Half pure red, half pure blue: rg = {255, 0}, yb = {127.5, -255}.
    halves = np.array([[[255, 0, 0], [0, 0, 255]]], np.uint8)
    expected = np.hypot(127.5, 191.25) + 0.3 * np.hypot(127.5, 63.75)
    assert colorfulness(halves) == pytest.approx(expected)


def test_photos_load_offline():
    for name in demo_data.PHOTOS:
        photo = load_photo(name)
        assert photo.ndim == 3 and photo.shape[2] == 3 and photo.dtype == np.uint8 and min(photo.shape[:2]) >= 256


def test_bad_config():
    with pytest.raises(ValueError, match="unknown demo photos"):
        DemoConfig(photos=("astronaut", "lena"))
    with pytest.raises(ValueError, match="one per split"):
        DemoConfig(photos=("astronaut", "coffee"))
