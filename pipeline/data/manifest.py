"""Dataset manifests: which shards hold a dataset, which labels it carries and the sentence that ranks by each.

A manifest is a small YAML file (schema in docs/manifest.md). It is parsed into the typed dataclasses
below at the boundary; everything downstream sees only these classes. Every validation error names
the file and the field so the user knows what to fix.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import braceexpand
import yaml

from rankpipe.errors import InputError
from rankpipe.settings import load_yaml
from rankpipe.templates import check_template

METRIC_FAMILIES = ("correlation", "ordinal")
SPLIT_ROLES = ("train", "val", "test")


class ManifestError(InputError):
    """A manifest is missing, unreadable or has a wrong field; the message names the file and field."""


@dataclasses.dataclass(frozen=True)
class TargetTransform:
    """Turns a raw label into the value images are ranked by (the paper's appendix B.1)."""

    # "identity": rank by the label itself; "distance": rank by closeness to `reference`
    # (the target is -|label - reference|, so the closest image ranks highest).
    kind: str = "identity"
    # Reference value for kind "distance", in label units (e.g. 3 for "closest to three dogs").
    reference: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("identity", "distance"):
            raise ValueError(f"kind must be 'identity' or 'distance', not {self.kind!r}")
        if self.kind == "distance" and self.reference is None:
            raise ValueError("kind 'distance' needs a 'reference' value")


@dataclasses.dataclass(frozen=True)
class LabelSpec:
    """One numeric label of the dataset and the sentence that asks to rank by it."""

    # Key of the label inside each sample's json "labels" object.
    name: str
    # The ranking instruction, e.g. "Sort images by the number of cats."
    query: str
    # "correlation" (continuous target: PLCC/SRCC/KRCC) or "ordinal" (ordered classes: accuracy, MAE).
    metric: str = "correlation"
    # For ordinal labels: the class values in order (e.g. decades [1930, 1940, ...]); None otherwise.
    classes: tuple[float, ...] | None = None
    # Optional transform of the raw label into the ranking target.
    target: TargetTransform = TargetTransform()
    # For ordinal labels, optionally: each class's name as words put it, in the order of `classes`
    # (e.g. "1930s", or an age range "25-32"); prompts name the classes by it.
    class_names: tuple[str, ...] | None = None
    # Optionally, the sentence describing an image of one class, with {name} for its class name
    # (e.g. "A photo taken in the {name}."); zero-shot CLIP scores the classes by it.
    class_prompt: str | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("name must not be empty")
        if not self.query.strip():
            raise ValueError("query must not be empty")
        if self.metric not in METRIC_FAMILIES:
            raise ValueError(f"metric must be one of {', '.join(METRIC_FAMILIES)}, not {self.metric!r}")
        if self.metric == "ordinal" and not self.classes:
            raise ValueError("an 'ordinal' label needs its ordered 'classes'")
        if self.class_names is not None:
            if self.classes is None or len(self.class_names) != len(self.classes):
                raise ValueError("'class_names' needs one name per entry of 'classes'")
            if not all(name.strip() for name in self.class_names):
                raise ValueError("'class_names' must not contain an empty name")
        if self.class_prompt is not None:
            if self.class_names is None:
                raise ValueError("'class_prompt' needs the label's 'class_names'")
            check_template("'class_prompt'", self.class_prompt, ("name",))


@dataclasses.dataclass(frozen=True)
class SplitSpec:
    """Maps the split roles (train/val/test) to the values of each sample's json "split" field."""

    train: tuple[str, ...] = ("train",)
    val: tuple[str, ...] = ("val",)
    test: tuple[str, ...] = ("test",)

    def values(self, role: str) -> tuple[str, ...]:
        """The split-field values that make up `role` ("train", "val" or "test")."""
        if role not in SPLIT_ROLES:
            raise ValueError(f"unknown split {role!r}; use one of {', '.join(SPLIT_ROLES)}")
        return getattr(self, role)


@dataclasses.dataclass(frozen=True)
class Manifest:
    """A dataset: its shards, labels with their queries, and split roles."""

    # Short dataset name, used in store attrs and reports.
    name: str
    # WebDataset shard pattern in brace notation; relative paths are relative to the manifest's folder.
    shards: str
    # The labels to rank by, each with its query sentence; empty for an unlabelled collection (images
    # to be ranked by `rankpipe rank --store`, which nothing can be trained or evaluated on).
    labels: tuple[LabelSpec, ...]
    # Which split-field values form train, val and test.
    splits: SplitSpec = SplitSpec()
    # Where the manifest was read from (None when built in code).
    path: Path | None = None

    def __post_init__(self) -> None:
        names = [label.name for label in self.labels]
        if len(set(names)) != len(names):
            raise ValueError(f"label names must be unique, got {names}")

    def shard_urls(self) -> list[str]:
        """The expanded shard list; relative paths are resolved against the manifest's folder."""
        base = self.path.parent if self.path is not None else Path(".")
        urls = []
        for url in braceexpand.braceexpand(self.shards):
            is_remote = "://" in url or url.startswith("pipe:")
            urls.append(url if is_remote or Path(url).is_absolute() else str(base / url))
        return urls

    def label(self, name: str) -> LabelSpec:
        """The label called `name`; a ManifestError lists the known ones otherwise."""
        for label in self.labels:
            if label.name == name:
                return label
        known = ", ".join(label.name for label in self.labels)
        raise ManifestError(f"{self._where()}: no label {name!r}; labels are: {known}")

    def to_dict(self) -> dict[str, Any]:
        """The manifest as plain data (for YAML files and store attrs)."""
        labels = []
        for label in self.labels:
            entry: dict[str, Any] = {"name": label.name, "query": label.query, "metric": label.metric}
            if label.classes is not None:
                entry["classes"] = list(label.classes)
            if label.target != TargetTransform():
                entry["target"] = dataclasses.asdict(label.target)
            if label.class_names is not None:
                entry["class_names"] = list(label.class_names)
            if label.class_prompt is not None:
                entry["class_prompt"] = label.class_prompt
            labels.append(entry)
        splits = {role: list(self.splits.values(role)) for role in SPLIT_ROLES}
        return {"name": self.name, "shards": self.shards, "labels": labels, "splits": splits}

    def to_yaml(self) -> str:
        """The manifest as the text of a YAML file."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        """Write the manifest as YAML."""
        Path(path).write_text(self.to_yaml())

    def _where(self) -> str:
        return str(self.path) if self.path is not None else "manifest"


def load_manifest(path: str | Path) -> Manifest:
    """Read and validate a manifest file.

    Raises:
        ManifestError: the file is missing, not YAML, or a field is wrong (the message names it).
    """
    path = Path(path)
    data = load_yaml(path, "manifest", "pass the path of a manifest YAML file", error=ManifestError)
    return manifest_from_dict(data, path=path)


def manifest_from_dict(data: Any, path: Path | None = None) -> Manifest:
    """Build a Manifest from plain data, naming the file and field of any error."""
    where = str(path) if path is not None else "manifest"
    if not isinstance(data, dict):
        raise ManifestError(f"{where}: expected a mapping with name, shards and labels")
    _reject_unknown(data, {"name", "shards", "labels", "splits"}, where, "")
    for field in ("name", "shards", "labels"):
        if field not in data:
            raise ManifestError(f"{where}: missing field '{field}'")
    if not isinstance(data["shards"], str):
        raise ManifestError(f"{where}: field 'shards' must be a brace pattern string like 'x-{{000000..000009}}.tar'")
    if not isinstance(data["labels"], list):
        raise ManifestError(f"{where}: field 'labels' must be a list of {{name, query}} entries ([] for an unlabelled collection)")
    labels = tuple(_label_from_dict(entry, where, i) for i, entry in enumerate(data["labels"]))
    splits = _splits_from_dict(data.get("splits", {}), where)
    try:
        return Manifest(name=str(data["name"]), shards=data["shards"], labels=labels, splits=splits, path=path)
    except ValueError as e:
        raise ManifestError(f"{where}: {e}") from e


def _label_from_dict(entry: Any, where: str, index: int) -> LabelSpec:
    field = f"labels[{index}]"
    if not isinstance(entry, dict):
        raise ManifestError(f"{where}: field '{field}' must be a mapping with name and query")
    _reject_unknown(entry, {"name", "query", "metric", "classes", "target", "class_names", "class_prompt"}, where, field + ".")
    for key in ("name", "query"):
        if not isinstance(entry.get(key), str):
            raise ManifestError(f"{where}: field '{field}.{key}' must be a string")
    classes = entry.get("classes")
    if classes is not None:
        if not isinstance(classes, list) or not all(isinstance(c, (int, float)) for c in classes):
            raise ManifestError(f"{where}: field '{field}.classes' must be a list of numbers")
        classes = tuple(float(c) for c in classes)
    class_names = entry.get("class_names")
    if class_names is not None:
        if not isinstance(class_names, list) or not all(isinstance(n, (str, int, float)) for n in class_names):
            raise ManifestError(f"{where}: field '{field}.class_names' must be a list of names")
        # YAML reads an unquoted 1930s as a string but 1930 as a number: both are names.
        class_names = tuple(str(n) for n in class_names)
    class_prompt = entry.get("class_prompt")
    if class_prompt is not None and not isinstance(class_prompt, str):
        raise ManifestError(f"{where}: field '{field}.class_prompt' must be a sentence with {{name}}")
    try:
        target = TargetTransform(**entry["target"]) if "target" in entry else TargetTransform()
    except (TypeError, ValueError) as e:
        raise ManifestError(f"{where}: field '{field}.target': {e}") from e
    try:
        return LabelSpec(
            name=entry["name"], query=entry["query"], metric=entry.get("metric", "correlation"),
            classes=classes, target=target, class_names=class_names, class_prompt=class_prompt,
        )
    except ValueError as e:
        raise ManifestError(f"{where}: field '{field}': {e}") from e


def _splits_from_dict(data: Any, where: str) -> SplitSpec:
    if not isinstance(data, dict):
        raise ManifestError(f"{where}: field 'splits' must map train/val/test to split values")
    _reject_unknown(data, set(SPLIT_ROLES), where, "splits.")
    values = {}
    for role, value in data.items():
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ManifestError(f"{where}: field 'splits.{role}' must be a split name or a list of them")
        values[role] = tuple(value)
    return SplitSpec(**values)


def _reject_unknown(data: dict, known: set[str], where: str, prefix: str) -> None:
    unknown = sorted(set(data) - known)
    if unknown:
        raise ManifestError(
            f"{where}: unknown field '{prefix}{unknown[0]}'; allowed fields are {', '.join(sorted(known))}"
        )
