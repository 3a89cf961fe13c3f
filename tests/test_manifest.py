"""Manifest files: round trip, the documented example, and errors that name the file and field."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from rankpipe.errors import InputError
from rankpipe.pipeline.data.manifest import (
    LabelSpec,
    Manifest,
    ManifestError,
    SplitSpec,
    TargetTransform,
    load_manifest,
)

DOC = Path(__file__).resolve().parents[1] / "docs" / "manifest.md"

GOOD = {
    "name": "koniq",
    "shards": "koniq-{000000..000002}.tar",
    "labels": [{"name": "mos", "query": "Sort images by image quality."}],
}


def _write(tmp_path: Path, data) -> Path:
    path = tmp_path / "manifest.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_save_and_load_round_trip(tmp_path):
    manifest = Manifest(
        name="ages", shards="s/ages-{000000..000001}.tar",
        labels=(
            LabelSpec("age", "Sort images by age.", metric="ordinal", classes=(1.0, 2.0, 3.0),
                      class_names=("0-2", "3-9", "60+"), class_prompt="A photo of a person aged {name}."),
            LabelSpec("dogs", "Sort images by the number of dogs.", target=TargetTransform("distance", 3.0)),
        ),
        splits=SplitSpec(train=("train",), val=("dev", "val"), test=("test",)),
    )
    path = tmp_path / "m.yaml"
    manifest.save(path)
    loaded = load_manifest(path)
    assert loaded == Manifest(**{**manifest.__dict__, "path": path})
    assert loaded.shard_urls() == [str(tmp_path / "s" / f"ages-{i:06d}.tar") for i in range(2)]


def test_remote_and_absolute_shards_are_kept(tmp_path):
    path = _write(tmp_path, GOOD | {"shards": "https://host/x-{0..1}.tar"})
    assert load_manifest(path).shard_urls() == ["https://host/x-0.tar", "https://host/x-1.tar"]


def test_documented_example_loads(tmp_path):
    block = re.search(r"## Example\s+```yaml\n(.*?)```", DOC.read_text(), re.S).group(1)
    manifest = load_manifest(_write(tmp_path, block))
    assert [label.name for label in manifest.labels] == ["mos", "decade", "dogs"]
    assert manifest.label("decade").classes == (1930.0, 1940.0, 1950.0, 1960.0, 1970.0)
    assert manifest.label("decade").class_names == ("1930s", "1940s", "1950s", "1960s", "1970s")
    assert manifest.label("decade").class_prompt == "A photo taken in the {name}."
    assert manifest.label("dogs").target == TargetTransform("distance", 3.0)
    assert manifest.splits.val == ("val", "validation") and manifest.splits.test == ("test",)


def _with_label(**fields):
    return GOOD | {"labels": [{"name": "mos", "query": "q"} | fields]}


@pytest.mark.parametrize("data, field", [
    (GOOD | {"shard": "x.tar"}, "'shard'"),
    ({k: v for k, v in GOOD.items() if k != "shards"}, "'shards'"),
    ({k: v for k, v in GOOD.items() if k != "labels"}, "'labels'"),
    (GOOD | {"shards": ["a.tar"]}, "'shards'"),
    (GOOD | {"labels": {"name": "mos"}}, "'labels'"),
    (_with_label(metrc="ordinal"), "'labels[0].metrc'"),
    (_with_label(metric="ranking"), "'labels[0]'"),
    (_with_label(metric="ordinal"), "'labels[0]'"),
    (_with_label(metric="ordinal", classes=["a", "b"]), "'labels[0].classes'"),
    (_with_label(metric="ordinal", classes=[1, 2], class_names=["a"]), "'labels[0]'"),
    (_with_label(metric="ordinal", classes=[1, 2], class_names="a b"), "'labels[0].class_names'"),
    (_with_label(metric="ordinal", classes=[1, 2], class_names=["a", " "]), "'labels[0]'"),
    (_with_label(metric="ordinal", classes=[1, 2], class_names=["a", "b"], class_prompt="A photo."), "'labels[0]'"),
    (_with_label(metric="ordinal", classes=[1, 2], class_names=["a", "b"], class_prompt="A {name} in {era}."), "'labels[0]'"),
    (_with_label(metric="ordinal", classes=[1, 2], class_names=["a", "b"], class_prompt=["x"]), "'labels[0].class_prompt'"),
    (_with_label(class_prompt="A photo of {name}."), "'labels[0]'"),
    (_with_label(query=3), "'labels[0].query'"),
    (_with_label(query="  "), "'labels[0]'"),
    (_with_label(target={"kind": "distance"}), "'labels[0].target'"),
    (_with_label(target={"kind": "log"}), "'labels[0].target'"),
    (GOOD | {"labels": GOOD["labels"] * 2}, "unique"),
    (GOOD | {"splits": ["train"]}, "'splits'"),
    (GOOD | {"splits": {"holdout": ["x"]}}, "'splits.holdout'"),
    (GOOD | {"splits": {"val": [1, 2]}}, "'splits.val'"),
    ("labels: [unclosed", "not valid YAML"),
    ("- just\n- a list\n", "mapping"),
])
def test_errors_name_file_and_field(tmp_path, data, field):
    path = _write(tmp_path, data)
    with pytest.raises(ManifestError) as e:
        load_manifest(path)
    assert str(path) in str(e.value)
    assert field in str(e.value)
    assert isinstance(e.value, InputError)


def test_specific_messages(tmp_path):
    with pytest.raises(ManifestError, match="metric must be one of correlation, ordinal, not 'ranking'"):
        load_manifest(_write(tmp_path, _with_label(metric="ranking")))
    with pytest.raises(ManifestError, match="needs its ordered 'classes'"):
        load_manifest(_write(tmp_path, _with_label(metric="ordinal")))
    # A placeholder nothing fills is refused here, not by a KeyError when zero-shot formats the prompt.
    named = {"metric": "ordinal", "classes": [1, 2], "class_names": ["a", "b"]}
    with pytest.raises(ManifestError, match=r"'class_prompt' may use only the placeholder \{name\}, not 'A \{name\} in \{era\}\.'"):
        load_manifest(_write(tmp_path, _with_label(**named, class_prompt="A {name} in {era}.")))
    with pytest.raises(ManifestError, match=r"'class_prompt' must contain \{name\}"):
        load_manifest(_write(tmp_path, _with_label(**named, class_prompt="A photo of {{name}}.")))


def test_class_names_are_optional_and_read_as_text(tmp_path):
    """Manifests without class names read as before; YAML numbers among the names become their text."""
    old = load_manifest(_write(tmp_path, _with_label(metric="ordinal", classes=[1930, 1940])))
    assert old.labels[0].class_names is None and old.labels[0].class_prompt is None
    assert "class_names" not in old.to_dict()["labels"][0]
    named = load_manifest(_write(tmp_path, _with_label(metric="ordinal", classes=[1, 2], class_names=[1930, "1940s"])))
    assert named.labels[0].class_names == ("1930", "1940s")
    with pytest.raises(ManifestError, match="one name per entry"):
        load_manifest(_write(tmp_path, _with_label(metric="ordinal", classes=[1, 2], class_names=["a"])))


def test_missing_file_and_unknown_label(tmp_path):
    with pytest.raises(ManifestError, match="does not exist"):
        load_manifest(tmp_path / "nope.yaml")
    manifest = load_manifest(_write(tmp_path, GOOD))
    with pytest.raises(ManifestError, match="no label 'age'; labels are: mos"):
        manifest.label("age")


def test_split_roles():
    spec = SplitSpec(val=("dev",))
    assert spec.values("val") == ("dev",) and spec.values("train") == ("train",)
    with pytest.raises(ValueError, match="unknown split"):
        spec.values("holdout")


def test_an_unlabelled_collection_has_an_empty_label_list(tmp_path):
    manifest = load_manifest(_write(tmp_path, GOOD | {"labels": []}))
    assert manifest.labels == ()
    assert load_manifest(_write(tmp_path, manifest.to_dict())).to_dict() == manifest.to_dict()
