"""`rankpipe shards`: tables and folders in, WebDataset tars + index + manifest + skipped report out."""

from __future__ import annotations

import csv
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from click.testing import CliRunner
from PIL import Image

from rankpipe.cli.main import cli
from rankpipe.errors import InputError
from rankpipe.files import atomic_target
from rankpipe.pipeline.data.manifest import LabelSpec, load_manifest
from rankpipe.pipeline.data.shard_writer import AutoSplit, SampleError, parse_label, write_shards
from rankpipe.pipeline.data.shards import ShardsConfig, prepare_shards, split_spec
from rankpipe.pipeline.data.sources import SampleRecord, records_from_folder, sample_key
from rankpipe.pipeline.data.tars import list_tars

N_IMAGES = 7


def _save_image(path: Path, rng: np.random.Generator) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = rng.integers(0, 256, size=(12, 10, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path.read_bytes()


def _write_table(path: Path, rows: list[dict]) -> None:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        return
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]), delimiter="\t" if path.suffix == ".tsv" else ",")
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture
def dataset(tmp_path):
    """N_IMAGES good images (PNG and JPEG, one in a sub-folder) and their table rows."""
    rng = np.random.default_rng(0)
    rows, originals = [], {}
    for i in range(N_IMAGES):
        rel = f"img/{i:02d}.png" if i % 2 else f"img/sub/{i:02d}.jpg"
        originals[rel] = _save_image(tmp_path / rel, rng)
        rows.append({"path": rel, "mos": f"{i * 0.25:.2f}", "age": str(20 + i), "split": ["train", "val", "test"][i % 3]})
    return tmp_path, rows, originals


def _read_tars(manifest_path: Path) -> dict[str, dict]:
    manifest = load_manifest(manifest_path)
    samples = {}
    for sample in wds.WebDataset(manifest.shard_urls(), shardshuffle=False):
        assert sample["__key__"] not in samples
        samples[sample["__key__"]] = sample
    return samples


def _config(table: Path, out: Path, **kw) -> ShardsConfig:
    base = dict(input=table, out_dir=out, labels=("mos", "age"), queries=("Sort by quality.", "Sort by age."),
                split_col="split")
    return ShardsConfig(**(base | kw))


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl"])
@pytest.mark.parametrize("samples_per_tar", [1, 3, 100])
def test_round_trip(dataset, suffix, samples_per_tar):
    root, rows, originals = dataset
    table = root / f"labels{suffix}"
    _write_table(table, rows)
    out = root / "out" / "koniq"
    result = prepare_shards(_config(table, out, samples_per_tar=samples_per_tar)).write()

    n_tars = -(-N_IMAGES // samples_per_tar)
    assert result.total == N_IMAGES and len(result.tars) == n_tars and not result.skipped
    assert sorted(p.name for p in out.glob("*.tar")) == [f"koniq-{i:06d}.tar" for i in range(n_tars)]
    assert not list(out.glob(".*")), "temporary files were left behind"

    index = json.loads((out / "index.json").read_text())
    assert index["total"] == N_IMAGES
    assert [t["name"] for t in index["tars"]] == [f"koniq-{i:06d}.tar" for i in range(n_tars)]
    for entry in index["tars"]:
        assert entry["count"] == sum(1 for _ in wds.WebDataset(str(out / entry["name"]), shardshuffle=False))

    manifest = load_manifest(out / "manifest.yaml")
    assert manifest.name == "koniq"
    assert manifest.shards == f"koniq-{{000000..{n_tars - 1:06d}}}.tar"
    assert [(l.name, l.query, l.metric) for l in manifest.labels] == [
        ("mos", "Sort by quality.", "correlation"), ("age", "Sort by age.", "correlation")]

    samples = _read_tars(out / "manifest.yaml")
    assert len(samples) == N_IMAGES
    by_source = {json.loads(s["json"])["source"]: s for s in samples.values()}
    for row in rows:
        sample = by_source[row["path"]]
        ext = row["path"].rsplit(".", 1)[1]
        assert sample[ext] == originals[row["path"]], "image bytes must be stored exactly as on disk"
        meta = json.loads(sample["json"])
        assert meta["labels"] == {"mos": float(row["mos"]), "age": float(row["age"])}
        assert meta["split"] == row["split"]
        assert "." not in sample["__key__"] and "/" not in sample["__key__"]


@pytest.mark.parametrize("file_name, pil_format, extension", [
    ("a.jpeg", "JPEG", "jpeg"),
    ("a.JPG", "JPEG", "jpg"),
    ("a.webp", "WEBP", "webp"),
    ("png_in_disguise.jpg", "PNG", "png"),
    ("noext", "JPEG", "jpg"),
    ("a.bmp", "BMP", None),
    ("a.gif", "GIF", None),
])
def test_image_formats(tmp_path, file_name, pil_format, extension):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / file_name, format=pil_format)
    record = SampleRecord(row=1, source=file_name, path=tmp_path / file_name, labels={"mos": 1})
    out = tmp_path / "out"
    if extension is None:
        with pytest.raises(InputError, match="1 unsupported image format"):
            write_shards([record], out, "x", [LabelSpec("mos", "q")])
        return
    write_shards([record], out, "x", [LabelSpec("mos", "q")])
    (sample,) = wds.WebDataset(str(out / "x-000000.tar"), shardshuffle=False)
    assert sample[extension] == (tmp_path / file_name).read_bytes()


def test_keys_are_stable_and_unique(dataset):
    root, rows, _ = dataset
    _write_table(root / "labels.csv", rows)
    keys = []
    for run in ("a", "b"):
        prepare_shards(_config(root / "labels.csv", root / run, name="x")).write()
        keys.append(sorted(_read_tars(root / run / "manifest.yaml")))
    assert keys[0] == keys[1] and len(set(keys[0])) == N_IMAGES
    twins = [SampleRecord(row=r, source="a/b.c/d e.jpg", path=None, labels={}) for r in (1, 2)]
    assert sample_key(twins[0]) != sample_key(twins[1])
    assert sample_key(twins[0]) == "0000001_a_b_c_d_e"


def test_bad_rows_are_skipped_and_reported(dataset):
    root, rows, _ = dataset
    (root / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    good = rows[0]["path"]
    rows += [
        {"path": "missing.png", "mos": "1", "age": "3", "split": "train"},
        {"path": "broken.jpg", "mos": "1", "age": "3", "split": "train"},
        {"path": good, "mos": "high", "age": "3", "split": "train"},
        {"path": good, "mos": "inf", "age": "3", "split": "train"},
        {"path": good, "mos": "", "age": " ", "split": "train"},
        {"path": good, "mos": "", "age": "7", "split": "train"},  # one label missing: kept
    ]
    _write_table(root / "labels.csv", rows)
    out = root / "out"
    result = prepare_shards(_config(root / "labels.csv", out)).write()

    assert result.total == N_IMAGES + 1
    assert result.skipped_by_reason() == {
        "missing image file": 1, "unreadable image": 1, "non-numeric label": 1,
        "non-finite label": 1, "no label values": 1,
    }
    with (out / "skipped.csv").open() as f:
        report = list(csv.DictReader(f))
    assert [(int(r["row"]), r["path"], r["reason"]) for r in report] == [
        (N_IMAGES + 1, "missing.png", "missing image file"),
        (N_IMAGES + 2, "broken.jpg", "unreadable image"),
        (N_IMAGES + 3, good, "non-numeric label"),
        (N_IMAGES + 4, good, "non-finite label"),
        (N_IMAGES + 5, good, "no label values"),
    ]
    assert "mos='high'" in report[2]["detail"]
    assert "not an image format" in report[1]["detail"]
    samples = _read_tars(out / "manifest.yaml")
    partial = [json.loads(s["json"]) for k, s in samples.items() if k.startswith(f"{N_IMAGES + 6:07d}")]
    assert partial[0]["labels"] == {"age": 7.0}
    summary = result.summary()
    assert f"Wrote {N_IMAGES + 1} samples in 1 tars" in summary and "skipped 5" in summary
    assert str(out / "skipped.csv") in summary


@pytest.mark.parametrize("column, kw", [
    ("path", {"image_col": "path"}),
    ("filename", {"image_col": "filename"}),
    ("quality", {"labels": ("quality",), "queries": ("q",)}),
    ("fold", {"split_col": "fold"}),
])
def test_missing_column_is_an_input_error(dataset, column, kw):
    root, rows, _ = dataset
    if column == "path":
        rows = [{("file" if k == "path" else k): v for k, v in row.items()} for row in rows]
    _write_table(root / "labels.csv", rows)
    with pytest.raises(InputError) as e:
        prepare_shards(_config(root / "labels.csv", root / "out", **kw))
    assert repr(column) in str(e.value) and "mos, age, split" in str(e.value)
    assert not (root / "out").exists()


def test_failure_while_writing_keeps_previous_outputs(dataset):
    root, rows, _ = dataset
    _write_table(root / "labels.csv", rows)
    out = root / "out"
    plan = prepare_shards(_config(root / "labels.csv", out, samples_per_tar=2))
    plan.write()
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def dies_midway():
        yield from plan.records[:5]
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        write_shards(dies_midway(), out, "out", plan.labels, samples_per_tar=2)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    all_bad = [SampleRecord(row=1, source="gone.png", path=root / "gone.png", labels={"mos": 1})]
    with pytest.raises(InputError, match="no sample could be written .*1 missing image file"):
        write_shards(all_bad, out, "out", plan.labels)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_rerun_with_fewer_tars_removes_stale_tars(dataset):
    root, rows, _ = dataset
    _write_table(root / "labels.csv", rows)
    out = root / "out"
    prepare_shards(_config(root / "labels.csv", out, samples_per_tar=1)).write()
    assert len(list(out.glob("out-*.tar"))) == N_IMAGES
    prepare_shards(_config(root / "labels.csv", out, samples_per_tar=3)).write()
    assert sorted(p.name for p in out.glob("out-*.tar")) == ["out-000000.tar", "out-000001.tar", "out-000002.tar"]
    assert len(_read_tars(out / "manifest.yaml")) == N_IMAGES


@pytest.mark.parametrize("by_split", [False, True])
def test_folder_of_label_subfolders(tmp_path, by_split):
    rng = np.random.default_rng(1)
    root = tmp_path / "photos"
    expected = {}
    for split in (["train", "test"] if by_split else [None]):
        for value in ("3", "4.5"):
            for i in range(2):
                rel = "/".join(p for p in (split, value, f"im{i}.png") if p)
                _save_image(root / rel, rng)
                expected[rel] = (float(value), split)
    labelled = root / "train" if by_split else root
    prefix = "train/" if by_split else ""
    (labelled / "stray.png").write_bytes(b"")  # outside any label folder
    (labelled / "7").mkdir()
    (labelled / "7" / "notes.txt").write_text("not an image")
    (labelled / "7" / ".hidden.png").write_text("ignored")

    out = tmp_path / "out"
    config = ShardsConfig(input=root, out_dir=out, labels=("count",), queries=("Sort by count.",))
    result = prepare_shards(config).write()
    assert result.total == len(expected)
    assert sorted((s.source, s.reason) for s in result.skipped) == [
        (f"{prefix}7/notes.txt", "unreadable image"), (f"{prefix}stray.png", "no label values")]
    metas = {json.loads(s["json"])["source"]: json.loads(s["json"]) for s in _read_tars(out / "manifest.yaml").values()}
    assert set(metas) == set(expected)
    for rel, (value, split) in expected.items():
        assert metas[rel]["labels"] == {"count": value}
        assert metas[rel]["split"] == (split if by_split else AutoSplit().assign(rel))


def test_folder_with_labels_table(dataset):
    root, rows, _ = dataset
    _write_table(root / "labels.jsonl", rows)
    result = prepare_shards(_config(root, root / "out")).write()
    assert result.total == N_IMAGES


def test_folder_needs_exactly_one_label(tmp_path):
    (tmp_path / "3").mkdir()
    with pytest.raises(InputError, match="exactly one --label"):
        records_from_folder(tmp_path, ["a", "b"])


@pytest.mark.parametrize("seed", [0, 1])
def test_auto_split_is_seeded_and_near_the_fractions(seed):
    sources = [f"img/{i}.jpg" for i in range(4000)]
    split = AutoSplit(seed=seed)
    roles = [split.assign(s) for s in sources]
    assert roles == [AutoSplit(seed=seed).assign(s) for s in sources]
    assert roles != [AutoSplit(seed=seed + 7).assign(s) for s in sources]
    for role, fraction in zip(("train", "val", "test"), split.fractions):
        assert abs(roles.count(role) / len(roles) - fraction) < 0.025


@pytest.mark.parametrize("fractions", [(0.5, 0.5, 0.5), (1.2, -0.1, -0.1), (0.5, 0.5)])
def test_auto_split_rejects_bad_fractions(fractions):
    with pytest.raises(InputError):
        AutoSplit(fractions=fractions)


def test_without_split_column_samples_get_hashed_roles(dataset):
    root, rows, _ = dataset
    _write_table(root / "labels.csv", rows)
    result = prepare_shards(_config(root / "labels.csv", root / "out", split_col=None)).write()
    metas = [json.loads(s["json"]) for s in _read_tars(result.manifest_path).values()]
    assert all(m["split"] == AutoSplit().assign(m["source"]) for m in metas)
    manifest = load_manifest(result.manifest_path)
    assert (manifest.splits.train, manifest.splits.val, manifest.splits.test) == (("train",), ("val",), ("test",))


def test_split_spec_maps_aliases_and_extra_values():
    spec = split_spec({"Training", "dev", "validation", "holdout"}, (("test", "holdout"),))
    assert spec.train == ("Training",) and spec.val == ("dev", "validation") and spec.test == ("holdout",)
    with pytest.raises(InputError, match="two roles"):
        split_spec({"train"}, (("val", "train"),))


def test_ordinal_label_takes_classes_from_the_data(dataset):
    root, rows, _ = dataset
    _write_table(root / "labels.csv", rows)
    plan = prepare_shards(_config(root / "labels.csv", root / "out", metrics=("correlation", "ordinal")))
    assert plan.labels[0].classes is None
    assert plan.labels[1].metric == "ordinal" and plan.labels[1].classes == tuple(float(20 + i) for i in range(N_IMAGES))
    plan.write()
    assert load_manifest(root / "out" / "manifest.yaml").label("age").classes == plan.labels[1].classes
    with pytest.raises(InputError, match="distinct values"):
        prepare_shards(_config(root / "labels.csv", root / "out", metrics=("ordinal",), max_ordinal_classes=3))


@pytest.mark.parametrize("kw, message", [
    ({"queries": ("only one",)}, "one --query per --label"),
    ({"metrics": ("ordinal", "ordinal", "ordinal")}, "one --metric"),
    ({"metrics": ("ranking",)}, "unknown metric"),
    ({"split_values": (("holdout", "x"),)}, "unknown split role"),
])
def test_config_validation(tmp_path, kw, message):
    with pytest.raises(InputError, match=message):
        _config(tmp_path / "labels.csv", tmp_path / "out", **kw)


@pytest.mark.parametrize("name", ["bad name", "x/y", "-dash"])
def test_bad_dataset_name(dataset, name):
    root, rows, _ = dataset
    with pytest.raises(InputError, match="dataset name"):
        write_shards([], root / "out", name, [LabelSpec("mos", "q")])


def test_cli_writes_and_summarises(dataset):
    root, rows, _ = dataset
    rows.append({"path": "missing.png", "mos": "1", "age": "2", "split": "train"})
    _write_table(root / "labels.csv", rows)
    out = root / "shards" / "koniq"
    args = ["shards", str(root / "labels.csv"), "--label", "mos", "--query", "Sort images by image quality.",
            "--split-col", "split", "--out", str(out), "--samples-per-tar", "4"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert f"Wrote {N_IMAGES} samples in 2 tars to {out}; skipped 1 (1 missing image file)" in result.output
    assert load_manifest(out / "manifest.yaml").labels[0].query == "Sort images by image quality."


@pytest.mark.parametrize("extra, message", [
    (["--label", "nope", "--query", "q"], "no column 'nope'"),
    (["--label", "mos", "--query", "q", "--query", "r"], "one --query per --label"),
    (["--label", "mos", "--query", "q", "--split-col", "fold"], "no column 'fold'"),
    (["--label", "mos", "--query", "q", "--split-value", "val"], "ROLE=VALUE"),
    (["--label", "mos", "--query", "q", "--samples-per-tar", "0"], "samples-per-tar"),
    (["--label", "mos", "--query", "q", "--label", "mos", "--query", "r"], "'mos' is given twice"),
])
def test_cli_bad_input_exits_2_and_keeps_outputs(dataset, extra, message):
    root, rows, _ = dataset
    _write_table(root / "labels.csv", rows)
    out = root / "out"
    ok = CliRunner().invoke(cli, ["shards", str(root / "labels.csv"), "--label", "mos", "--query", "q", "--out", str(out)])
    assert ok.exit_code == 0, ok.output
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    result = CliRunner().invoke(cli, ["shards", str(root / "labels.csv"), "--out", str(out), *extra])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_cli_missing_input_exits_2(tmp_path):
    result = CliRunner().invoke(cli, ["shards", str(tmp_path / "none.csv"), "--label", "a", "--query", "q",
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_atomic_target_replaces_a_file_only_when_the_write_succeeds(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_target(path) as partial:
            partial.write_text("half")
            raise RuntimeError("disk full")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]  # no temporary left behind
    with atomic_target(path) as partial:
        partial.write_text("new")
    assert path.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_one_image_spelled_two_ways_gets_one_hashed_split():
    split = AutoSplit(seed=0)
    names = [f"img/{i:03d}.jpg" for i in range(60)]
    assert [split.assign(f"./{n}") for n in names] == [split.assign(n) for n in names]
    assert [split.assign(f"img/x/../{n[4:]}") for n in names] == [split.assign(n) for n in names]


def test_repeated_images_and_rows_are_warned_about(dataset, caplog):
    root, rows, _ = dataset
    rows = [*rows, {**rows[0], "path": f"./{rows[0]['path']}"}, dict(rows[1])]
    _write_table(root / "labels.csv", rows)
    with caplog.at_level("WARNING"):
        plan = prepare_shards(_config(root / "labels.csv", root / "out", split_col=None))
    assert len(plan.records) == len(rows)  # every row is still a sample
    assert "2 image(s) are named by more than one row" in caplog.text
    assert "1 row(s) repeat an earlier row exactly" in caplog.text


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_column_named_twice_is_refused(dataset, suffix):
    root, rows, _ = dataset
    table = root / f"labels{suffix}"
    if suffix == ".csv":
        table.write_text("path,mos,mos,split\n" + "".join(f"{r['path']},{r['mos']},1,{r['split']}\n" for r in rows))
    else:
        table.write_text("".join(f'{{"path": "{r["path"]}", "mos": {r["mos"]}, "mos": 1, "split": "{r["split"]}"}}\n'
                                 for r in rows))
    with pytest.raises(InputError, match="names column 'mos' more than once"):
        prepare_shards(_config(table, root / "out", labels=("mos",), queries=("Sort by quality.",)))


def test_index_records_each_tars_digest_which_embed_takes_as_its_identity(dataset):
    root, rows, _ = dataset
    _write_table(root / "labels.csv", rows)
    write = prepare_shards(_config(root / "labels.csv", root / "out", samples_per_tar=3))
    out = root / "out"
    write_shards(list(write.records), out, "x", list(write.labels), samples_per_tar=3)
    index = json.loads((out / "index.json").read_text())
    assert len(index["tars"]) > 1
    for entry in index["tars"]:
        assert entry["sha256"] == hashlib.sha256((out / entry["name"]).read_bytes()).hexdigest()
    tars = list_tars([str(out / entry["name"]) for entry in index["tars"]])
    assert [t.identity for t in tars] == [f"sha256:{e['sha256']}" for e in index["tars"]]


def test_an_integer_label_too_large_for_a_float_is_a_skipped_row():
    with pytest.raises(SampleError, match="non-finite label"):
        parse_label("mos", 10**400)


def test_a_truncated_jpeg_is_skipped_by_shards_not_found_by_embed(tmp_path):
    rng = np.random.default_rng(0)
    good, cut = tmp_path / "good.jpg", tmp_path / "cut.jpg"
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(good, quality=95)
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    records = [SampleRecord(row=i + 1, source=p.name, path=p, labels={"mos": 1.0}) for i, p in enumerate([good, cut])]
    result = write_shards(records, tmp_path / "out", "x", [LabelSpec("mos", "Sort by quality.")])
    assert result.total == 1
    assert [(s.source, s.reason) for s in result.skipped] == [("cut.jpg", "unreadable image")]


def test_a_fifo_listed_as_an_image_is_skipped_not_read_forever(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    good = tmp_path / "good.png"
    Image.new("RGB", (8, 8)).save(good)
    records = [SampleRecord(row=i + 1, source=p.name, path=p, labels={"mos": 1.0}) for i, p in enumerate([fifo, good])]
    result = write_shards(records, tmp_path / "out", "x", [LabelSpec("mos", "Sort by quality.")])
    assert result.total == 1 and [(s.source, s.reason) for s in result.skipped] == [("pipe.jpg", "not a regular file")]
