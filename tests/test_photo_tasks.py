"""The photo-tasks dataset: every label exact on the stored pixels, splits disjoint by photo, seeded.

The scikit-image / synthetic-shape fallback is the path tested everywhere (an empty root folder hides
any installed Debian packages); the Debian path is tested only where its folders exist.
"""

from __future__ import annotations

import dataclasses
import io
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from click.testing import CliRunner
from PIL import Image

from rankpipe.cli.main import cli
from rankpipe.errors import InputError
from rankpipe.pipeline.data.manifest import load_manifest
from rankpipe.pipeline.datasets.demo_data import render_background
from rankpipe.pipeline.datasets.photo_tasks import (
    PhotoTasksConfig,
    build_photo_tasks,
    config_for_size,
)
from rankpipe.pipeline.datasets.photo_tasks.build import RECORD_FILE, count_label
from rankpipe.pipeline.datasets.photo_tasks.counting import composite, scaled_cutout
from rankpipe.pipeline.datasets.photo_tasks.distortions import (
    DISTORTIONS,
    get_distortion,
)
from rankpipe.pipeline.datasets.photo_tasks.recipes import read_recipes, render
from rankpipe.pipeline.datasets.photo_tasks.sources import (
    SCIKIT_IMAGE,
    SYNTHETIC_SHAPES,
    SourcesConfig,
    find_sources,
)

SIZE = 64
DEBIAN_FOLDERS = (Path("/usr/share/backgrounds/mate/nature"), Path("/usr/share/wallpapers"),
                  Path("/usr/share/tuxpaint/stamps"))


def tiny_config(root: Path, seed: int = 0, **images: int) -> PhotoTasksConfig:
    counts = {"quality": 40, "attributes": 12, "counting": 36} | images
    return PhotoTasksConfig(images=counts, image_size=SIZE, seed=seed, sources=SourcesConfig(root=root),
                            samples_per_tar=40)


def read_build(out: Path) -> tuple[dict[str, dict], dict]:
    """Samples by key ({"pixels", "labels", "split"}) and the build record."""
    manifest = load_manifest(out / "manifest.yaml")
    samples = {}
    for sample in wds.WebDataset(manifest.shard_urls(), shardshuffle=False):
        meta = json.loads(sample["json"])
        with Image.open(io.BytesIO(sample["png"])) as image:
            pixels = np.asarray(image.convert("RGB"))
        samples[sample["__key__"]] = {"pixels": pixels, "labels": meta["labels"], "split": meta["split"]}
    return samples, json.loads((out / RECORD_FILE).read_text())


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A tiny fallback build (the empty root hides any Debian packages), with its sources and recipes."""
    empty_root = tmp_path_factory.mktemp("no-packages")
    out = tmp_path_factory.mktemp("photo-tasks")
    config = tiny_config(empty_root)
    result = build_photo_tasks(out, config)
    samples, record = read_build(out)
    sources = find_sources(config.sources)
    photos = {p.name: p.loader() for p in sources.photos}
    cutouts = {(c.category, c.name): c for items in sources.cutouts.values() for c in items}
    return {"out": out, "config": config, "result": result, "samples": samples, "record": record,
            "recipes": read_recipes(out), "photos": photos, "cutouts": cutouts, "root": empty_root}


def test_fallback_sources_are_recorded(built):
    result, record = built["result"], built["record"]
    assert list(result.sources.photo_sources) == [SCIKIT_IMAGE]
    assert result.sources.cutout_sources == {SYNTHETIC_SHAPES: None}
    assert record["sources"]["photos"].keys() == {SCIKIT_IMAGE}
    assert record["sources"]["cutouts"] == {SYNTHETIC_SHAPES: None}
    assert "scikit-image" in result.summary() and "synthetic-shapes" in result.summary()


def test_manifest_lists_one_query_per_label(built):
    manifest = load_manifest(built["out"] / "manifest.yaml")
    names = [label.name for label in manifest.labels]
    categories = sorted(built["record"]["counting"]["categories"])
    assert names == [*DISTORTIONS, "quality", "colorfulness", "contrast", "brightness",
                     *(count_label(c) for c in categories)]
    queries = {label.name: label.query for label in manifest.labels}
    assert queries["blur"] == "Sort images by the amount of blur."
    assert queries["quality"] == "Sort images by the image quality."
    assert queries["contrast"] == "Sort images by the image quality of contrast."
    assert queries["count_stars"] == "Sort images by the number of stars."
    assert len(set(queries.values())) == len(queries)
    assert len(built["samples"]) == sum(built["config"].images.values()) == len(built["recipes"])


def test_attribute_labels_are_exact_on_the_stored_pixels(built):
    for key, sample in built["samples"].items():
        rgb = sample["pixels"].astype(np.float64)
        assert rgb.shape == (SIZE, SIZE, 3)
        luma = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
        rg = rgb[..., 0] - rgb[..., 1]
        yb = (rgb[..., 0] + rgb[..., 1]) / 2 - rgb[..., 2]
        colorful = np.sqrt(rg.var() + yb.var()) + 0.3 * np.sqrt(rg.mean() ** 2 + yb.mean() ** 2)
        labels = sample["labels"]
        assert labels["brightness"] == pytest.approx(luma.mean(), rel=1e-12), key
        assert labels["contrast"] == pytest.approx((luma / 255).std(), rel=1e-12), key
        assert labels["colorfulness"] == pytest.approx(colorful, rel=1e-12), key


def test_every_image_renders_again_from_its_recipe(built):
    for key, recipe in built["recipes"].items():
        pixels = render(recipe, built["photos"][recipe.photo], built["cutouts"], SIZE)
        np.testing.assert_array_equal(pixels, built["samples"][key]["pixels"], err_msg=key)


def test_distortion_labels_reapply_to_the_clean_crop(built):
    kinds = Counter()
    for key, recipe in built["recipes"].items():
        labels = built["samples"][key]["labels"]
        if recipe.group != "quality":
            assert not set(DISTORTIONS) & set(labels) and "quality" not in labels
            continue
        kind = get_distortion(recipe.distortion)
        kinds[kind.name] += 1
        clean = render_background(built["photos"][recipe.photo], recipe.crop, 1.0, SIZE)
        degraded = kind.apply(clean, recipe.parameter, recipe.noise_seed)
        np.testing.assert_array_equal(degraded, built["samples"][key]["pixels"], err_msg=key)
        # Exactly one kind-specific label; the others are missing (NaN in the store).
        assert set(DISTORTIONS) & set(labels) == {kind.name}
        assert labels[kind.name] == kind.label(recipe.parameter)
        assert labels["quality"] == -kind.severity(recipe.parameter)
        assert 0.0 <= kind.severity(recipe.parameter) <= 1.0
    assert set(kinds) == set(DISTORTIONS), kinds


@pytest.mark.parametrize("name", list(DISTORTIONS))
def test_distortions_grow_with_strength(name, built):
    distortion = DISTORTIONS[name]
    photo = built["photos"]["scikit-image/astronaut"]
    clean = render_background(photo, (0, 0, min(photo.shape[:2])), 1.0, SIZE)
    parameters = [distortion.parameter(t, SIZE) for t in (0.0, 0.3, 0.6, 1.0)]
    errors = [np.abs(distortion.apply(clean, p, 7).astype(float) - clean).mean() for p in parameters]
    assert errors == sorted(errors) and errors[-1] > errors[1] > 0, errors
    labels = [distortion.label(p) for p in parameters]
    assert labels == sorted(labels) and labels[0] < labels[-1]
    assert distortion.severity(parameters[0]) == pytest.approx(0.0)
    # Pixelation realises only whole reduced sides, so at 64 px its strongest factor is 64/6, not 12.
    assert 0.85 < distortion.severity(parameters[-1]) <= 1.0


def test_counts_match_the_recorded_placements(built):
    held_out = set(built["record"]["counting"]["held_out"])
    categories = set(built["record"]["counting"]["categories"])
    assert held_out and held_out < categories
    targets = Counter()
    for key, recipe in built["recipes"].items():
        labels = built["samples"][key]["labels"]
        if recipe.group != "counting":
            assert not any(name.startswith("count_") for name in labels)
            continue
        pasted = Counter(p.category for p in recipe.placements)
        assert 0 <= pasted[recipe.target] <= built["config"].max_count
        assert sum(pasted.values()) - pasted[recipe.target] <= built["config"].max_distractors
        labelled = categories - held_out if recipe.split == "train" else categories
        assert {name for name in labels if name.startswith("count_")} == {count_label(c) for c in labelled}
        for category in labelled:
            assert labels[count_label(category)] == pasted[category]
        if recipe.split == "train":
            assert not held_out & set(pasted), f"{key} pastes a held-out category in training"
        targets[recipe.target in held_out] += 1
        # The background is the recorded crop, and no two cut-outs share a pixel.
        background = render_background(built["photos"][recipe.photo], recipe.crop, 1.0, SIZE)
        np.testing.assert_array_equal(composite(background, recipe.placements, built["cutouts"]),
                                      built["samples"][key]["pixels"])
        cover = np.zeros((SIZE, SIZE), dtype=int)
        for p in recipe.placements:
            opaque = scaled_cutout(built["cutouts"][p.category, p.cutout], p)[..., 3] > 0  # [height, width]
            cover[p.top:p.top + p.height, p.left:p.left + p.width] += opaque
        assert cover.max() <= 1, key
    assert targets[True] > 0 and targets[False] > 0, "held-out categories must be counted in val/test"


def test_splits_are_disjoint_by_photo(built):
    split_of_photo: dict[str, set[str]] = {}
    for key, recipe in built["recipes"].items():
        assert built["samples"][key]["split"] == recipe.split
        split_of_photo.setdefault(recipe.photo, set()).add(recipe.split)
    assert all(len(splits) == 1 for splits in split_of_photo.values()), split_of_photo
    assert {s for splits in split_of_photo.values() for s in splits} == {"train", "val", "test"}
    listed = built["record"]["photo_splits"]
    assert sum(len(v) for v in listed.values()) == len(set().union(*map(set, listed.values())))
    for photo, (split,) in split_of_photo.items():
        assert photo in listed[split]
    assert set(built["record"]["train_labels"]) == (
        {label.name for label in load_manifest(built["out"] / "manifest.yaml").labels}
        - set(built["record"]["counting"]["held_out_labels"])
    )


def test_same_seed_same_dataset_other_seed_differs(built, tmp_path):
    build_photo_tasks(tmp_path / "again", built["config"])
    again, _ = read_build(tmp_path / "again")
    assert again.keys() == built["samples"].keys()
    for key, sample in again.items():
        assert sample["labels"] == built["samples"][key]["labels"]
        np.testing.assert_array_equal(sample["pixels"], built["samples"][key]["pixels"])
    assert (tmp_path / "again" / "recipes.jsonl").read_text() == (built["out"] / "recipes.jsonl").read_text()
    build_photo_tasks(tmp_path / "other", dataclasses.replace(built["config"], seed=1))
    other, _ = read_build(tmp_path / "other")
    assert [s["labels"] for s in other.values()] != [s["labels"] for s in again.values()]


def test_bad_configurations_are_input_errors(built, tmp_path):
    with pytest.raises(InputError, match="unknown size"):
        config_for_size("huge")
    config = dataclasses.replace(built["config"], held_out_categories=5)
    with pytest.raises(InputError, match="hold out"):
        build_photo_tasks(tmp_path, config)


def test_cli_help_and_bad_size():
    runner = CliRunner()
    for args in (["datasets", "--help"], ["datasets", "build", "--help"], ["datasets", "build", "photo-tasks", "--help"]):
        result = runner.invoke(cli, args)
        assert result.exit_code == 0, result.output
    assert "photo-tasks" in runner.invoke(cli, ["datasets", "build", "--help"]).output
    result = runner.invoke(cli, ["datasets", "build", "photo-tasks", "--out", "x", "--size", "huge"])
    assert result.exit_code == 2 and "huge" in result.output


def test_cli_small_build_is_quick(tmp_path):
    start = time.perf_counter()
    result = CliRunner().invoke(cli, ["datasets", "build", "photo-tasks", "--out", str(tmp_path), "--sources", "builtin"])
    seconds = time.perf_counter() - start
    assert result.exit_code == 0, result.output
    assert "Wrote 400 samples" in result.output and "scikit-image" in result.output
    assert seconds < 60, f"--size small took {seconds:.0f} s"
    assert load_manifest(tmp_path / "manifest.yaml").name == "photo-tasks"


@pytest.mark.skipif(not all(folder.is_dir() for folder in DEBIAN_FOLDERS),
                    reason="Debian wallpaper and tuxpaint packages not installed")
def test_debian_sources_render_exactly(tmp_path):
    config = tiny_config(Path("/"), quality=8, attributes=4, counting=12)
    result = build_photo_tasks(tmp_path, config)
    assert "tuxpaint-stamps-default" in result.sources.cutout_sources
    assert SCIKIT_IMAGE not in result.sources.photo_sources
    samples, record = read_build(tmp_path)
    assert "birds" in record["counting"]["categories"]
    sources = find_sources(config.sources)
    photos = {p.name: p for p in sources.photos}
    cutouts = {(c.category, c.name): c for items in sources.cutouts.values() for c in items}
    for key, recipe in read_recipes(tmp_path).items():
        pixels = render(recipe, photos[recipe.photo].loader(), cutouts, SIZE)
        np.testing.assert_array_equal(pixels, samples[key]["pixels"], err_msg=key)
        if recipe.group == "counting":
            assert photos[recipe.photo].counting
            pasted = Counter(p.category for p in recipe.placements)
            assert samples[key]["labels"][count_label(recipe.target)] == pasted[recipe.target]


def test_mixed_images_carry_a_count_a_blur_and_the_attributes_at_once(built, tmp_path):
    """Mixed images: cut-outs pasted, then the jitter and the blur over the whole picture; every label exact."""
    config = dataclasses.replace(built["config"], images={"mixed": 30})
    build_photo_tasks(tmp_path / "mixed", config)
    samples, record = read_build(tmp_path / "mixed")
    recipes = read_recipes(tmp_path / "mixed")
    held_out = set(record["counting"]["held_out"])
    blur = get_distortion("blur")
    assert len(samples) == 30
    for key, recipe in recipes.items():
        labels = samples[key]["labels"]
        assert recipe.group == "mixed" and recipe.distortion == "blur" and recipe.jitter is not None
        background = render_background(built["photos"][recipe.photo], recipe.crop, 1.0, SIZE)
        pasted_image = recipe.jitter.apply(composite(background, recipe.placements, built["cutouts"]))
        np.testing.assert_array_equal(blur.apply(pasted_image, recipe.parameter, recipe.noise_seed),
                                      samples[key]["pixels"], err_msg=key)
        assert labels["blur"] == blur.label(recipe.parameter)
        assert not {"jpeg", "noise", "pixelation", "quality"} & set(labels)
        pasted = Counter(p.category for p in recipe.placements)
        labelled = [c for c in record["counting"]["categories"] if recipe.split != "train" or c not in held_out]
        assert all(labels[count_label(c)] == pasted[c] for c in labelled)
        assert {"colorfulness", "contrast", "brightness"} <= set(labels)


def test_bench_sizes_give_test_a_larger_share():
    assert config_for_size("bench").split_fractions == (0.5, 0.2, 0.3)
    assert set(config_for_size("steering").images) == {"mixed"}
    assert config_for_size("full").split_fractions == PhotoTasksConfig.split_fractions
