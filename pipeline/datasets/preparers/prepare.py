"""Run a preparer: read the dataset, write tars and manifests, and record how they were made.

Output folder, beside what `write_shards` writes (tars, index.json, manifest.yaml, skipped.csv):

    OUT/prepare.json      dataset, source folder, options, protocol and counts per split
    OUT/excluded.csv      samples the protocol leaves out (row, path, reason, detail)
    OUT/<extra manifests> e.g. Adience's manifest-fold0.yaml … manifest-fold4.yaml
    OUT/<sidecars>        e.g. COCO's coco_counts.jsonl
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

from rankpipe.errors import InputError
from rankpipe.files import write_text_atomic
from rankpipe.pipeline.data.manifest import LabelSpec, Manifest
from rankpipe.pipeline.data.shard_writer import (
    ShardsResult,
    SkippedSample,
    shard_pattern,
    skipped_csv,
    write_shards,
)
from rankpipe.pipeline.data.sources import SampleRecord
from rankpipe.pipeline.datasets.preparers import get_preparer
from rankpipe.pipeline.datasets.preparers.common import PrepareConfig
from rankpipe.settings import field_names, instantiate_config, merge_settings

logger = logging.getLogger(__name__)

RECORD_FILE = "prepare.json"
EXCLUDED_FILE = "excluded.csv"


@dataclasses.dataclass(frozen=True)
class PrepareResult:
    """What `prepare_dataset` wrote."""

    # The tars, manifest and skipped report.
    shards: ShardsResult
    # Samples the protocol left out.
    excluded: tuple[SkippedSample, ...]
    # Further manifests written beside manifest.yaml.
    extra_manifests: tuple[Path, ...]

    def summary(self) -> str:
        """One line for the user: the shards summary, exclusions and extra manifests."""
        line = self.shards.summary()
        if self.excluded:
            line += f" Excluded by the protocol: {len(self.excluded)}, listed in {self.shards.out_dir / EXCLUDED_FILE}."
        if self.extra_manifests:
            line += f" Also wrote {', '.join(p.name for p in self.extra_manifests)}."
        return line


def make_config(name: str, overrides: Mapping[str, str] | None = None, **values: object) -> PrepareConfig:
    """The options of preparer `name`: defaults, then `values`, then KEY=VALUE text `overrides`.

    Text values are converted to the type of the field's default (true/false for booleans).

    Raises:
        InputError: an unknown field or a value of the wrong type.
    """
    config_type = get_preparer(name).config_type
    fields = field_names(config_type)
    for key in overrides or {}:
        if key not in fields:
            raise InputError(f"{name} has no option {key!r}; options are: {', '.join(fields)}")
    data = merge_settings(config_type, {}, {k: v for k, v in values.items() if v is not None}, f"{name} options")
    data = merge_settings(config_type, data, dict(overrides or {}), f"{name} options")
    return instantiate_config(config_type, data, f"{name} options")


def prepare_dataset(name: str, src: str | Path, out_dir: str | Path, config: PrepareConfig | None = None,
                    progress: Callable[[int], None] | None = None) -> PrepareResult:
    """Read dataset `name` from its official layout in `src` and write tars, manifests and records to `out_dir`.

    Args:
        name: A registered preparer (see `preparer_names()`).
        src: The folder where the dataset was unpacked.
        out_dir: Output folder (created if needed).
        config: The preparer's options (its config type); None for the paper's protocol.
        progress: Called with 1 after each sample is packed.

    Raises:
        InputError: unknown name, missing files or an unexpected layout (the message names the file).
    """
    preparer = get_preparer(name)
    config = config if config is not None else preparer.config_type()
    if not isinstance(config, preparer.config_type):
        raise TypeError(f"{name} takes a {preparer.config_type.__name__}, got {type(config).__name__}")
    src, out_dir = Path(src), Path(out_dir)
    if not src.is_dir():
        raise InputError(f"source folder {src} does not exist; pass --src the folder where {name} was unpacked")
    prepared = preparer.read(src, config)
    labels: tuple[LabelSpec, ...] = prepared.labels
    records: Iterable[SampleRecord] = prepared.records
    if config.attributes:
        from rankpipe.pipeline.datasets.photo_tasks.attributes import ATTRIBUTES

        labels += tuple(LabelSpec(name=a.name, query=a.query) for a in ATTRIBUTES)
        records = _with_attributes(records)
    shards = write_shards(records, out_dir, name, labels, samples_per_tar=config.samples_per_tar,
                          splits=prepared.splits, progress=progress)
    pattern = shard_pattern(name, len(shards.tars))
    extra = []
    for file_name, splits in prepared.extra_manifests.items():
        Manifest(name=name, shards=pattern, labels=labels, splits=splits).save(out_dir / file_name)
        extra.append(out_dir / file_name)
    for file_name, text in prepared.sidecars.items():
        write_text_atomic(out_dir / file_name, text)
    write_text_atomic(out_dir / EXCLUDED_FILE, skipped_csv(prepared.excluded))
    record = {
        "dataset": name, "source": str(src.resolve()), "config": dataclasses.asdict(config),
        "protocol": prepared.protocol, "written": shards.total, "split_counts": shards.split_counts,
        "skipped": len(shards.skipped), "excluded": len(prepared.excluded),
    }
    write_text_atomic(out_dir / RECORD_FILE, json.dumps(record, indent=1, default=list) + "\n")
    result = PrepareResult(shards, tuple(prepared.excluded), tuple(extra))
    logger.info("%s", result.summary())
    return result


def _with_attributes(records: Iterable[SampleRecord]) -> Iterator[SampleRecord]:
    """Each record with colourfulness, contrast and brightness measured on its decoded image.

    An image that cannot be read passes unchanged; the writer then skips and reports it.
    """
    from rankpipe.pipeline.datasets.demo_data import decode_rgb
    from rankpipe.pipeline.datasets.photo_tasks.attributes import measure_attributes

    for record in records:
        try:
            data = record.data if record.data is not None else record.path.read_bytes()
            pixels = decode_rgb(data)  # [H, W, 3] uint8
        except Exception:  # missing or corrupt: the writer reports it with its own reason
            yield record
            continue
        # The bytes travel with the record so the writer does not read the file a second time.
        yield dataclasses.replace(record, labels=record.labels | measure_attributes(pixels), data=data)
