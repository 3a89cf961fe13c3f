"""The `rankpipe shards` job: validate everything about the input first, then write.

`prepare_shards` reads the table or folder, checks the columns, turns label names, queries and
metrics into `LabelSpec`s and works out the manifest's split roles. Only then does
`ShardsPlan.write` touch the output folder, so a mistake never costs the user existing shards.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from pathlib import Path

from rankpipe.errors import InputError
from rankpipe.pipeline.data.manifest import (
    METRIC_FAMILIES,
    SPLIT_ROLES,
    LabelSpec,
    SplitSpec,
)
from rankpipe.pipeline.data.shard_writer import (
    AutoSplit,
    SampleError,
    ShardsResult,
    parse_label,
    write_shards,
)
from rankpipe.pipeline.data.sources import SampleRecord, read_input

logger = logging.getLogger(__name__)

# Split values recognised as each role without the user saying so (compared case-insensitively).
SPLIT_ALIASES = {
    "train": ("train", "training"),
    "val": ("val", "valid", "validation", "dev"),
    "test": ("test", "testing"),
}


@dataclasses.dataclass(frozen=True)
class ShardsConfig:
    """Everything `rankpipe shards` needs; validated on construction."""

    # A .csv/.tsv/.jsonl label table, or a folder (labels table inside, or label sub-folders).
    input: Path
    # Output folder for the tars, index.json, manifest.yaml and skipped.csv.
    out_dir: Path
    # Label names: table columns, or the one name given to label sub-folder values; none packs an
    # unlabelled collection (images only, to be ranked by `rankpipe rank --store`).
    labels: tuple[str, ...]
    # The query sentence of each label, in the same order.
    queries: tuple[str, ...]
    # Metric family ("correlation" or "ordinal"): one for every label, or one per label; none means
    # "correlation" for every label.
    metrics: tuple[str, ...] = ()
    # Table column holding the image paths.
    image_col: str = "path"
    # Table column holding split values; None assigns a seeded split by hashing image paths.
    split_col: str | None = None
    # Dataset name and tar prefix; None takes the output folder's name.
    name: str | None = None
    # Samples per tar.
    samples_per_tar: int = 1000
    # Seed of the hashed split used when there is no split column.
    split_seed: int = 0
    # Train/val/test fractions of the hashed split.
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    # Extra (role, value) pairs naming split values that are not standard, e.g. ("val", "holdout").
    split_values: tuple[tuple[str, str], ...] = ()
    # An ordinal label takes its classes from the distinct values found; more than this is refused.
    max_ordinal_classes: int = 100

    def __post_init__(self) -> None:
        if not self.labels:
            self._check_unlabelled()
        repeated = sorted({name for name in self.labels if self.labels.count(name) > 1})
        if repeated:
            raise InputError(f"--label {repeated[0]!r} is given twice; give each label once")
        if len(self.queries) != len(self.labels):
            raise InputError(
                f"give one --query per --label, in the same order "
                f"({len(self.labels)} labels, {len(self.queries)} queries)"
            )
        if len(self.metrics) not in (0, 1, len(self.labels)):
            raise InputError(f"give one --metric for all labels or one per label, not {len(self.metrics)}")
        for metric in self.metrics:
            if metric not in METRIC_FAMILIES:
                raise InputError(f"unknown metric {metric!r}; use one of {', '.join(METRIC_FAMILIES)}")
        for role, _ in self.split_values:
            if role not in SPLIT_ROLES:
                raise InputError(f"unknown split role {role!r}; use one of {', '.join(SPLIT_ROLES)}")

    def _check_unlabelled(self) -> None:
        """Refuse the options that only mean something for labels."""
        if self.queries:
            raise InputError("a --query names the sentence of a --label; give one --label per --query, "
                             "or leave out both to pack an unlabelled collection")
        if self.metrics:
            raise InputError("--metric describes a --label; leave it out for an unlabelled collection")
        if self.split_col is not None or self.split_values:
            raise InputError("an unlabelled collection (no --label) has no splits, it is ranked whole; "
                             "leave out --split-col and --split-value")

    @property
    def labelled(self) -> bool:
        """Whether the job packs labels (else an unlabelled collection)."""
        return bool(self.labels)

    @property
    def dataset_name(self) -> str:
        """The dataset name: `name`, or the output folder's name."""
        return self.name or Path(self.out_dir).resolve().name


@dataclasses.dataclass(frozen=True)
class ShardsPlan:
    """A validated shards job, ready to write."""

    # The job's settings.
    config: ShardsConfig
    # The samples read from the input, not yet checked.
    records: tuple[SampleRecord, ...]
    # Labels with their queries, metrics and (ordinal) classes.
    labels: tuple[LabelSpec, ...]
    # Split roles for the manifest.
    splits: SplitSpec

    def write(self, progress: Callable[[int], None] | None = None) -> ShardsResult:
        """Write the tars, index, manifest and skipped report (see `write_shards`)."""
        config = self.config
        return write_shards(
            self.records, config.out_dir, config.dataset_name, self.labels,
            samples_per_tar=config.samples_per_tar, splits=self.splits,
            auto_split=AutoSplit(config.split_fractions, config.split_seed), progress=progress,
        )


def prepare_shards(config: ShardsConfig) -> ShardsPlan:
    """Read and validate the input of a shards job without writing anything.

    Raises:
        InputError: missing input or column, bad label settings, or an ordinal label with too many values.
    """
    records = tuple(read_input(config.input, config.image_col, list(config.labels), config.split_col))
    _warn_repeated_images(records)
    metrics = config.metrics or ("correlation",)
    metrics = metrics * len(config.labels) if len(metrics) == 1 else metrics
    labels = []
    for name, query, metric in zip(config.labels, config.queries, metrics):
        classes = ordinal_classes(records, name, config.max_ordinal_classes) if metric == "ordinal" else None
        try:
            labels.append(LabelSpec(name=name, query=query, metric=metric, classes=classes))
        except ValueError as e:
            raise InputError(f"label {name!r}: {e}") from e
    if not config.labelled:
        return ShardsPlan(config, records, (), SplitSpec())
    seen = {r.split for r in records if r.split is not None}
    if any(r.split is None for r in records):
        seen |= set(SPLIT_ROLES)  # the hashed split hands out exactly the role names
    return ShardsPlan(config, records, tuple(labels), split_spec(seen, config.split_values))


def _warn_repeated_images(records: tuple[SampleRecord, ...]) -> None:
    """Log images that more than one row names (however the path is spelled), and rows repeated whole.

    Each row still becomes a sample: a repeated image may carry other labels on purpose. Without a
    split column, all rows of one image get one split (the path is normalised before it is hashed).
    """
    rows_of: dict[Path, list[int]] = {}
    for record in records:
        if record.path is not None:
            rows_of.setdefault(record.path.resolve(), []).append(record.row)
    repeated = {path: rows for path, rows in rows_of.items() if len(rows) > 1}
    if repeated:
        path, rows = next(iter(repeated.items()))
        logger.warning("%d image(s) are named by more than one row, e.g. %s by rows %s; each row becomes a sample",
                       len(repeated), path, ", ".join(map(str, rows)))
    whole = [(r.source, tuple(sorted(r.labels.items(), key=lambda kv: kv[0])), r.split) for r in records]
    duplicates = len(whole) - len(set(map(repr, whole)))
    if duplicates:
        logger.warning("%d row(s) repeat an earlier row exactly (image, labels and split)", duplicates)


def ordinal_classes(records: tuple[SampleRecord, ...], name: str, limit: int) -> tuple[float, ...]:
    """The sorted distinct numeric values of label `name` (bad values are left to the writer to report).

    Raises:
        InputError: no numeric value at all, or more than `limit` distinct values.
    """
    values = set()
    for record in records:
        try:
            value = parse_label(name, record.labels.get(name))
        except SampleError:
            continue
        if value is not None and math.isfinite(value):
            values.add(value)
    if not values:
        raise InputError(f"ordinal label {name!r} has no numeric values; check the column")
    if len(values) > limit:
        raise InputError(
            f"ordinal label {name!r} has {len(values)} distinct values (at most {limit}); "
            "use --metric correlation for a continuous label"
        )
    return tuple(sorted(values))


def split_spec(values: set[str], extra: tuple[tuple[str, str], ...] = ()) -> SplitSpec:
    """Split roles from the split values present: standard names by alias, others from `extra`.

    A role with no value present keeps its own name, so the manifest stays complete. Values that
    no role claims are logged: those samples are packed but train/val/test will not use them.
    """
    roles: dict[str, list[str]] = {role: [] for role in SPLIT_ROLES}
    for value in sorted(values):
        for role, aliases in SPLIT_ALIASES.items():
            if value.lower() in aliases:
                roles[role].append(value)
    for role, value in extra:
        if value not in roles[role]:
            roles[role].append(value)
    claimed: set[str] = set()
    for role, vs in roles.items():
        twice = claimed & set(vs)
        if twice:
            raise InputError(f"split value {sorted(twice)[0]!r} is given to two roles; give each value one role")
        claimed |= set(vs)
    unclaimed = sorted(values - claimed)
    if unclaimed:
        logger.warning(
            "split values %s belong to no role; name them with --split-value ROLE=VALUE to use them", unclaimed
        )
    return SplitSpec(**{role: tuple(vs) if vs else (role,) for role, vs in roles.items()})
