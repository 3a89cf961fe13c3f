"""Dataset preparers on tiny fake trees in each dataset's official layout: labels, splits, protocol files, errors."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from click.testing import CliRunner
from PIL import Image

from rankpipe.cli.main import cli
from rankpipe.errors import InputError
from rankpipe.pipeline.data.manifest import load_manifest
from rankpipe.pipeline.datasets.photo_tasks.attributes import measure_attributes
from rankpipe.pipeline.datasets.preparers import PREPARERS, get_preparer
from rankpipe.pipeline.datasets.preparers.adience import age_group
from rankpipe.pipeline.datasets.preparers.prepare import make_config, prepare_dataset

MANIFESTS = Path(__file__).resolve().parents[1] / "manifests"


def write_image(path: Path, seed: int, fmt: str = "JPEG") -> None:
    """A tiny random image at `path` (parents created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)


def read_out(out: Path, manifest: str = "manifest.yaml") -> dict[str, dict]:
    """Samples of a prepared folder by source path: {"labels", "split", "key", "image"}."""
    samples = {}
    for sample in wds.WebDataset(load_manifest(out / manifest).shard_urls(), shardshuffle=False):
        meta = json.loads(sample["json"])
        image = next(v for k, v in sample.items() if k in ("jpg", "jpeg", "png"))
        samples[meta["source"]] = {"labels": meta["labels"], "split": meta["split"], "key": sample["__key__"],
                                   "image": image}
    return samples


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------- KonIQ-10k

def koniq_tree(root: Path, with_sets: bool = True, resolution: str = "1024x768") -> dict[str, tuple[float, str]]:
    """12 images, their MOS and official set; returns {name: (mos, split)}."""
    sets = ("training", "training", "validation", "test")
    truth, score_rows, set_rows = {}, [], []
    for i in range(12):
        name = f"{1000 + i}.jpg"
        mos, official = round(1 + 4 * i / 11, 4), sets[i % 4]
        write_image(root / resolution / name, i)
        score_rows.append([name, 1, 2, 3, 4, 5, 15, mos, 0.5, mos * 20])
        set_rows.append([name, 1, 2, 3, 4, 5, 15, mos, 0.5, mos * 20, official])
        truth[name] = (mos, {"training": "train", "validation": "val", "test": "test"}[official])
    header = ["image_name", "c1", "c2", "c3", "c4", "c5", "c_total", "MOS", "SD", "MOS_zscore"]
    with (root / "koniq10k_scores_and_distributions.csv").open("w", newline="") as f:
        csv.writer(f).writerows([header, *score_rows])
    if with_sets:
        with (root / "koniq10k_distributions_sets.csv").open("w", newline="") as f:
            csv.writer(f).writerows([header + ["set"], *set_rows])
    return truth


def test_koniq_labels_and_official_split(tmp_path):
    truth = koniq_tree(tmp_path / "src")
    result = prepare_dataset("koniq10k", tmp_path / "src", tmp_path / "out")
    samples = read_out(tmp_path / "out")
    assert result.shards.total == 12 and len(samples) == 12
    for name, (mos, split) in truth.items():
        sample = samples[f"1024x768/{name}"]
        assert sample["labels"]["mos"] == pytest.approx(mos)
        assert sample["split"] == split
    assert sample["image"] == (tmp_path / "src" / "1024x768" / name).read_bytes()
    manifest = load_manifest(tmp_path / "out" / "manifest.yaml")
    assert manifest.label("mos").query == "Sort images by the image quality."
    record = json.loads((tmp_path / "out" / "prepare.json").read_text())
    assert "official" in record["protocol"]["split"] and record["split_counts"] == {"train": 6, "val": 3, "test": 3}


def test_koniq_without_sets_file_uses_a_seeded_split_and_half_size_images(tmp_path):
    koniq_tree(tmp_path / "src", with_sets=False, resolution="512x384")
    config = make_config("koniq10k", {"resolution": "512x384"}, seed=3)
    prepare_dataset("koniq10k", tmp_path / "src", tmp_path / "a", config)
    prepare_dataset("koniq10k", tmp_path / "src", tmp_path / "b", config)
    a, b = read_out(tmp_path / "a"), read_out(tmp_path / "b")
    assert {s: v["split"] for s, v in a.items()} == {s: v["split"] for s, v in b.items()}
    assert all(source.startswith("512x384/") for source in a)
    assert "seeded random" in json.loads((tmp_path / "a" / "prepare.json").read_text())["protocol"]["split"]


def test_koniq_missing_image_folder_and_bad_set_value(tmp_path):
    koniq_tree(tmp_path / "src")
    with pytest.raises(InputError, match="512x384 image folder"):
        prepare_dataset("koniq10k", tmp_path / "src", tmp_path / "out", make_config("koniq10k", resolution="512x384"))
    sets = tmp_path / "src" / "koniq10k_distributions_sets.csv"
    sets.write_text(sets.read_text().replace(",test", ",holdout"))
    with pytest.raises(InputError, match="'holdout'"):
        prepare_dataset("koniq10k", tmp_path / "src", tmp_path / "out")


# ---------------------------------------------------------------- AVA

def ava_tree(root: Path) -> dict[str, tuple[float, bool]]:
    """10 images with vote counts, 3 of them on the official test list, one image file missing."""
    rng = np.random.default_rng(0)
    truth, lines = {}, []
    for i in range(10):
        image_id = str(953000 + i)
        votes = rng.integers(0, 30, size=10)
        votes[i % 10] += 1  # never all zero
        lines.append(" ".join(map(str, [i + 1, image_id, *votes, 0, 0, 1396])))
        truth[image_id] = (float(np.dot(np.arange(1, 11), votes) / votes.sum()), i < 3)
        if i != 9:
            write_image(root / "images" / f"{image_id}.jpg", i)
    (root / "AVA.txt").write_text("\n".join(lines) + "\n")
    (root / "aesthetics_image_lists").mkdir()
    (root / "aesthetics_image_lists" / "generic_test.jpgl").write_text("953000\n953001\n953002\n")
    return truth


def test_ava_mean_votes_test_list_and_attributes(tmp_path):
    truth = ava_tree(tmp_path / "src")
    result = prepare_dataset("ava", tmp_path / "src", tmp_path / "out")
    samples = read_out(tmp_path / "out")
    assert len(samples) == 9
    assert [s.source for s in result.shards.skipped] == ["images/953009.jpg"]
    for image_id, (mean, is_test) in truth.items():
        sample = samples.get(f"images/{image_id}.jpg")
        if sample is None:
            continue
        assert sample["labels"]["mos"] == pytest.approx(mean)
        assert (sample["split"] == "test") == is_test and sample["split"] in ("train", "val", "test")
        pixels = np.asarray(Image.open(io.BytesIO(sample["image"])).convert("RGB"))
        for name, value in measure_attributes(pixels).items():
            assert sample["labels"][name] == pytest.approx(value)
    manifest = load_manifest(tmp_path / "out" / "manifest.yaml")
    assert [label.name for label in manifest.labels] == ["mos", "colorfulness", "contrast", "brightness"]


def test_ava_without_attributes_and_bad_line(tmp_path):
    ava_tree(tmp_path / "src")
    prepare_dataset("ava", tmp_path / "src", tmp_path / "out", make_config("ava", attributes=False))
    assert all(set(s["labels"]) == {"mos"} for s in read_out(tmp_path / "out").values())
    with (tmp_path / "src" / "AVA.txt").open("a") as f:
        f.write("11 953011 1 2 3\n")
    with pytest.raises(InputError, match="line 11"):
        prepare_dataset("ava", tmp_path / "src", tmp_path / "out2")


# ---------------------------------------------------------------- Adience

ADIENCE_AGES = ["(0, 2)", "(25, 32)", "29", "None", "(38, 48)", "(60, 100)", "35", "(8, 23)"]
ADIENCE_GROUPS = [0, 4, 4, None, None, 7, None, None]


@pytest.mark.parametrize("age, group", zip(ADIENCE_AGES + ["(38, 42)", "2", "(15, 20)"],
                                           ADIENCE_GROUPS + [5, 0, 3]))
def test_adience_age_groups(age, group):
    assert age_group(age) == group


def adience_tree(root: Path, folder: str = "aligned") -> None:
    """5 folds, 2 users each, one face per age of ADIENCE_AGES per fold."""
    prefix = {"aligned": "landmark_aligned_face", "faces": "coarse_tilt_aligned_face"}[folder]
    header = "user_id\toriginal_image\tface_id\tage\tgender\tx\ty\tdx\tdy\ttilt_ang\tfiducial_yaw_angle\tfiducial_score"
    for k in range(5):
        lines = [header]
        for j, age in enumerate(ADIENCE_AGES):
            user = f"user{k}_{j % 2}"
            original = f"{k}{j}_abc_o.jpg"
            lines.append(f"{user}\t{original}\t{j}\t{age}\tf\t0\t0\t10\t10\t0\t0\t50")
            write_image(root / folder / user / f"{prefix}.{j}.{original}", k * 10 + j)
        (root / f"fold_{k}_data.txt").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("folder", ["aligned", "faces"])
def test_adience_folds_groups_and_exclusions(tmp_path, folder):
    adience_tree(tmp_path / "src", folder)
    result = prepare_dataset("adience", tmp_path / "src", tmp_path / "out")
    samples = read_out(tmp_path / "out")
    kept = sum(g is not None for g in ADIENCE_GROUPS)
    assert len(samples) == 5 * kept and len(result.excluded) == 5 * (len(ADIENCE_AGES) - kept)
    users_by_split: dict[str, set[str]] = {}
    for source, sample in samples.items():
        assert source.startswith(f"{folder}/")
        user, name = source.split("/")[1:]
        k, j = int(name.split(".")[-2][0]), int(name.split(".")[1])
        assert sample["split"] == f"fold{k}" and sample["labels"]["age_group"] == ADIENCE_GROUPS[j]
        users_by_split.setdefault(sample["split"], set()).add(user)
    splits = sorted(users_by_split)
    assert splits == [f"fold{k}" for k in range(5)]
    assert all(not (users_by_split[a] & users_by_split[b]) for a in splits for b in splits if a < b)
    excluded = read_csv(tmp_path / "out" / "excluded.csv")
    assert {row["detail"].split(" in ")[0] for row in excluded} == {"age 'None'", "age '(38, 48)'", "age '35'",
                                                                    "age '(8, 23)'"}
    for k in range(5):
        manifest = load_manifest(tmp_path / "out" / f"manifest-fold{k}.yaml")
        roles = {role: set(manifest.splits.values(role)) for role in ("train", "val", "test")}
        assert roles["test"] == {f"fold{k}"} and roles["val"] == {f"fold{(k + 1) % 5}"}
        assert roles["train"] | roles["val"] | roles["test"] == set(splits) and len(roles["train"]) == 3
        assert manifest.label("age_group").metric == "ordinal" and manifest.shards == \
            load_manifest(tmp_path / "out" / "manifest.yaml").shards
        assert manifest.label("age_group").class_names == ("0-2", "4-6", "8-13", "15-20", "25-32", "38-43", "48-53", "60+")


# ---------------------------------------------------------------- HCI

def hci_tree(root: Path, per_decade: int = 6) -> None:
    for d, decade in enumerate((1930, 1940, 1950, 1960, 1970)):
        for i in range(per_decade):
            write_image(root / "data" / "imgs" / "decade_database" / f"{decade}s" / f"{i:03d}.jpg", d * 100 + i)


@pytest.mark.parametrize("seed", [0, 1])
def test_hci_decades_and_per_decade_split(tmp_path, seed):
    hci_tree(tmp_path / "src")
    config = make_config("hci", {"test_per_decade": "2", "val_per_decade": "1"}, seed=seed)
    prepare_dataset("hci", tmp_path / "src", tmp_path / "out", config)
    samples = read_out(tmp_path / "out")
    assert len(samples) == 30
    for decade in (1930, 1940, 1950, 1960, 1970):
        mine = [s for src, s in samples.items() if f"/{decade}s/" in src]
        assert all(s["labels"]["decade"] == decade for s in mine)
        assert sorted(s["split"] for s in mine) == ["test", "test", "train", "train", "train", "val"]
    manifest = load_manifest(tmp_path / "out" / "manifest.yaml")
    assert manifest.label("decade").classes == (1930.0, 1940.0, 1950.0, 1960.0, 1970.0)
    assert manifest.label("decade").class_names == ("1930s", "1940s", "1950s", "1960s", "1970s")
    again = tmp_path / "again"
    prepare_dataset("hci", tmp_path / "src", again, config)
    assert {k: v["split"] for k, v in read_out(again).items()} == {k: v["split"] for k, v in samples.items()}


def test_hci_seeds_differ_and_small_decade_is_refused(tmp_path):
    hci_tree(tmp_path / "src", per_decade=12)
    splits = []
    for seed in (0, 1):
        config = make_config("hci", {"test_per_decade": "4", "val_per_decade": "1"}, seed=seed)
        prepare_dataset("hci", tmp_path / "src", tmp_path / f"out{seed}", config)
        splits.append({k: v["split"] for k, v in read_out(tmp_path / f"out{seed}").items()})
    assert splits[0] != splits[1]
    with pytest.raises(InputError, match="has 12 images"):
        prepare_dataset("hci", tmp_path / "src", tmp_path / "x")  # the protocol's 50 + 5 per decade


# ---------------------------------------------------------------- COCO-REM

def coco_file(path: Path, images: list[tuple[int, str]], annotations: list[tuple[int, int, int]]) -> None:
    """A COCO instances file: images (id, file_name), annotations (image_id, category_id, iscrowd)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "images": [{"id": i, "file_name": name, "width": 8, "height": 6} for i, name in images],
        "annotations": [{"id": n, "image_id": i, "category_id": c, "iscrowd": crowd, "bbox": [0, 0, 1, 1]}
                        for n, (i, c, crowd) in enumerate(annotations)],
        "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}, {"id": 10, "name": "traffic light"}],
    }
    path.write_text(json.dumps(data))


def coco_tree(root: Path) -> None:
    train = [(1, "000000000001.jpg"), (2, "000000000002.jpg"), (3, "000000000003.jpg"), (4, "000000000004.jpg")]
    val = [(10, "000000000010.jpg"), (11, "000000000011.jpg")]
    for i, name in train:
        write_image(root / "train2017" / name, i)
    for i, name in val:
        write_image(root / "val2017" / name, i)
    coco_file(root / "annotations" / "instances_trainrem.json", train, [
        (1, 1, 0), (1, 1, 0), (1, 1, 0), (1, 18, 0),   # image 1: 3 persons, 1 dog
        (2, 1, 0), (2, 1, 1),                          # image 2: 1 person and a crowd of persons
        (3, 18, 1),                                    # image 3: only a crowd of dogs
    ])                                                 # image 4: nothing
    coco_file(root / "annotations" / "instances_valrem.json", val, [(10, 10, 0), (10, 10, 0), (11, 18, 0)])
    # Original COCO annotations beside COCO-REM's: the revised ones must win.
    coco_file(root / "annotations" / "instances_train2017.json", train, [(1, 1, 0)])


@pytest.mark.parametrize("crowd, include_zero", [("keep", False), ("drop", False), ("keep", True)])
def test_coco_rem_counts_crowd_and_splits(tmp_path, crowd, include_zero):
    coco_tree(tmp_path / "src")
    config = make_config("coco-rem", {"crowd": crowd, "include_zero": str(include_zero), "val_fraction": "0"})
    result = prepare_dataset("coco-rem", tmp_path / "src", tmp_path / "out", config)
    samples = read_out(tmp_path / "out")
    zero = {"count_person": 0, "count_dog": 0, "count_traffic_light": 0} if include_zero else {}
    expected = {
        "train2017/000000000001.jpg": {"count_person": 3, "count_dog": 1},
        "train2017/000000000002.jpg": {"count_person": 1} if crowd == "keep" else {},
        "train2017/000000000003.jpg": {},
        "train2017/000000000004.jpg": {},
        "val2017/000000000010.jpg": {"count_traffic_light": 2},
        "val2017/000000000011.jpg": {"count_dog": 1},
    }
    for source, counts in expected.items():
        want = zero | counts
        if source == "train2017/000000000003.jpg":
            want.pop("count_dog", None)  # a crowd with no outlined dog: unknown, never zero
        if source == "train2017/000000000002.jpg" and crowd == "drop":
            want.pop("count_person", None)
        if want:
            assert samples[source]["labels"] == want
            assert samples[source]["split"] == ("train" if source.startswith("train") else "test")
        else:
            assert source not in samples and source in {s.source for s in result.shards.skipped}
    manifest = load_manifest(tmp_path / "out" / "manifest.yaml")
    assert manifest.label("count_traffic_light").query == "Sort images by the number of traffic light."
    sidecar = [json.loads(line) for line in (tmp_path / "out" / "coco_counts.jsonl").read_text().splitlines()]
    by_image = {line["image_id"]: line for line in sidecar}
    assert by_image[2]["crowd"] == ["person"] and by_image[2]["counts"] == {"person": 1}
    assert by_image[3]["crowd"] == ["dog"] and by_image[1]["annotations"] == "instances_trainrem.json"
    assert by_image[1]["key"] == samples["train2017/000000000001.jpg"]["key"]


def test_coco_validation_holdout_and_missing_images(tmp_path):
    coco_tree(tmp_path / "src")
    config = make_config("coco-rem", {"include_zero": "true", "val_fraction": "0.5"}, seed=0)
    prepare_dataset("coco-rem", tmp_path / "src", tmp_path / "out", config)
    splits = [s["split"] for src, s in read_out(tmp_path / "out").items() if src.startswith("train2017/")]
    assert set(splits) == {"train", "val"}
    (tmp_path / "src" / "val2017").rename(tmp_path / "src" / "elsewhere")
    with pytest.raises(InputError, match="instances_valrem.json"):
        prepare_dataset("coco-rem", tmp_path / "src", tmp_path / "out2")


# ---------------------------------------------------------------- UTKFace

UTK_FILES = {
    "25_0_1_20170116174525125.jpg.chip.jpg": 25,
    "60_1_0_20170109142408075.jpg.chip.jpg": 60,
    "33_1_4_20170103222907122.jpg.chip.jpg": 33,
    "21_0_2_20170104020603190.jpg.chip.jpg": 21,
    "8_0_0_20170110220255346.jpg.chip.jpg": None,      # outside 21..60
    "39_1_20170116174525125.jpg.chip.jpg": None,       # the release's names without a race field
}


def test_utkface_ages_range_and_bad_names(tmp_path):
    for i, name in enumerate(UTK_FILES):
        write_image(tmp_path / "src" / "UTKFace" / name, i)
    config = make_config("utkface", {"test_fraction": "0.5", "val_fraction": "0.25"})
    result = prepare_dataset("utkface", tmp_path / "src", tmp_path / "out", config)
    samples = read_out(tmp_path / "out")
    assert {src: s["labels"]["age"] for src, s in samples.items()} == \
        {f"UTKFace/{n}": age for n, age in UTK_FILES.items() if age is not None}
    assert {s.reason for s in result.excluded} == {"age outside the range",
                                                   "name not [age]_[gender]_[race]_[date&time].jpg"}
    assert {s["split"] for s in samples.values()} <= {"train", "val", "test"}
    prepare_dataset("utkface", tmp_path / "src", tmp_path / "wide", make_config("utkface", min_age=1, max_age=116))
    assert len(read_out(tmp_path / "wide")) == 5


# ---------------------------------------------------------------- CLEVR

def clevr_tree(root: Path) -> list[dict]:
    scenes = {
        "train": [[("red", "metal", "cube"), ("red", "rubber", "sphere"), ("blue", "metal", "cylinder")],
                  [("gray", "rubber", "cube")] * 4,
                  [("yellow", "metal", "sphere"), ("cyan", "metal", "sphere"), ("purple", "rubber", "cube")]],
        "val": [[("green", "rubber", "cylinder"), ("brown", "metal", "cube")]],
    }
    for set_name, objects_per_scene in scenes.items():
        listed = []
        for i, objects in enumerate(objects_per_scene):
            name = f"CLEVR_{set_name}_{i:06d}.png"
            write_image(root / "images" / set_name / name, i, fmt="PNG")
            listed.append({"image_index": i, "image_filename": name, "split": set_name, "objects": [
                {"color": c, "material": m, "shape": s, "size": "large"} for c, m, s in objects]})
        (root / "scenes").mkdir(parents=True, exist_ok=True)
        (root / "scenes" / f"CLEVR_{set_name}_scenes.json").write_text(json.dumps({"info": {}, "scenes": listed}))
    return scenes


def test_clevr_counts_every_attribute(tmp_path):
    scenes = clevr_tree(tmp_path / "src")
    prepare_dataset("clevr", tmp_path / "src", tmp_path / "out", make_config("clevr", val_fraction=0.0))
    samples = read_out(tmp_path / "out")
    assert len(samples) == 4
    first = samples["images/train/CLEVR_train_000000.png"]["labels"]
    assert first["color_red"] == 2 and first["color_blue"] == 1 and first["color_gray"] == 0
    assert first["material_metal"] == 2 and first["material_rubber"] == 1
    assert (first["shape_cube"], first["shape_sphere"], first["shape_cylinder"]) == (1, 1, 1)
    assert samples["images/train/CLEVR_train_000001.png"]["labels"]["shape_cube"] == 4
    for source, sample in samples.items():
        assert len(sample["labels"]) == 13
        assert sum(v for k, v in sample["labels"].items() if k.startswith("color_")) == \
            sum(v for k, v in sample["labels"].items() if k.startswith("shape_"))
        assert sample["split"] == ("test" if "/val/" in source else "train")
    manifest = load_manifest(tmp_path / "out" / "manifest.yaml")
    assert manifest.label("color_red").query == "Sort images by the number of objects in red."
    assert manifest.label("shape_cylinder").query == "Sort images by the number of cylinders."
    assert len(scenes["train"]) == 3


def test_clevr_unknown_colour_is_refused(tmp_path):
    clevr_tree(tmp_path / "src")
    path = tmp_path / "src" / "scenes" / "CLEVR_val_scenes.json"
    path.write_text(path.read_text().replace('"green"', '"pink"'))
    with pytest.raises(InputError, match="'pink'"):
        prepare_dataset("clevr", tmp_path / "src", tmp_path / "out")


# ---------------------------------------------------------------- every preparer

@pytest.mark.parametrize("name, expected", [
    ("koniq10k", "koniq10k_scores_and_distributions.csv"), ("ava", "AVA.txt"), ("adience", "fold_0_data.txt"),
    ("hci", "1930s"), ("coco-rem", "instances_"), ("utkface", "[age]_[gender]"), ("clevr", "CLEVR_train_scenes.json"),
])
def test_empty_source_names_the_expected_file(tmp_path, name, expected):
    (tmp_path / "src").mkdir()
    with pytest.raises(InputError) as error:
        prepare_dataset(name, tmp_path / "src", tmp_path / "out")
    assert expected in str(error.value) and str(tmp_path / "src") in str(error.value)


# Each preparer's fake tree and the options it needs to fit in it (splits and labels do not depend on them).
TREES = {
    "koniq10k": (koniq_tree, {}), "ava": (ava_tree, {}), "adience": (adience_tree, {}),
    "hci": (hci_tree, {"test_per_decade": "1", "val_per_decade": "1"}), "coco-rem": (coco_tree, {}),
    "utkface": (lambda root: [write_image(root / "UTKFace" / n, i) for i, n in enumerate(UTK_FILES)], {}),
    "clevr": (clevr_tree, {}),
}


@pytest.mark.parametrize("name", sorted(PREPARERS))
def test_reference_manifest_matches_the_preparer(tmp_path, name):
    """manifests/<name>.yaml carries the labels, queries and splits the preparer writes by default."""
    tree, overrides = TREES[name]
    tree(tmp_path / "src")
    prepare_dataset(name, tmp_path / "src", tmp_path / "out", make_config(name, overrides))
    written = load_manifest(tmp_path / "out" / "manifest.yaml")
    reference = load_manifest(MANIFESTS / f"{name}.yaml")
    assert reference.name == written.name == name and reference.splits == written.splits
    assert reference.shards.startswith(f"{name}-{{000000..") and written.shards.startswith(f"{name}-{{000000..")
    references = {label.name: label for label in reference.labels}
    # The fake COCO tree has 3 of the 80 categories; every other tree has all the labels.
    if name != "coco-rem":
        assert set(references) == {label.name for label in written.labels}
    for label in written.labels:
        assert references[label.name] == label


def test_unknown_preparer_and_option(tmp_path):
    with pytest.raises(InputError, match="known: koniq10k, ava"):
        get_preparer("imagenet")
    with pytest.raises(InputError, match="no option 'crowds'"):
        make_config("coco-rem", {"crowds": "keep"})
    with pytest.raises(InputError, match="crowd must be one of"):
        make_config("coco-rem", {"crowd": "ignore"})
    with pytest.raises(InputError, match="expects an integer"):
        make_config("hci", {"test_per_decade": "many"})


def test_cli_prepare(tmp_path):
    hci_tree(tmp_path / "src")
    runner = CliRunner()
    args = ["datasets", "prepare", "hci", "--src", str(tmp_path / "src"), "--out", str(tmp_path / "out"),
            "--set", "test_per_decade=1", "--set", "val_per_decade=1", "--samples-per-tar", "7"]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "Wrote 30 samples in 5 tars" in result.output
    assert load_manifest(tmp_path / "out" / "manifest.yaml").shards == "hci-{000000..000004}.tar"
    result = runner.invoke(cli, args[:-4] + ["--set", "test_per_decade=lots"])
    assert result.exit_code == 2 and "expects an integer" in result.output
    result = runner.invoke(cli, ["datasets", "prepare", "hci", "--src", str(tmp_path / "nowhere"), "--out", "x"])
    assert result.exit_code == 2 and "does not exist" in result.output
    result = runner.invoke(cli, ["datasets", "prepare", "imagenet", "--src", ".", "--out", "x"])
    assert result.exit_code == 2 and "koniq10k" in result.output
