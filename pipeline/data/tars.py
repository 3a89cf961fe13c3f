"""The input tars of an embed run and how many samples each holds.

The store allocates every tar's rows before any image is decoded, so the sample counts are needed
up front. A shard folder's `index.json` ({"tars": [{"name", "count", "sha256"}], "total"}) gives them
for free; otherwise they are counted from tar member headers, which reads no image data.

Each tar also has an identity the store records, so a tar rebuilt under the same name is noticed: the
content digest `rankpipe shards` wrote into the index, or else the file's size and modification time
(reading every tar in full on each run to digest it would cost as much as the decoding).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path

from webdataset.tariterators import base_plus_ext

from rankpipe.errors import InputError

logger = logging.getLogger(__name__)

INDEX_FILE = "index.json"
# webdataset skips members named like "__key__" or "__meta__/..." when it groups samples.
WDS_META = re.compile(r"__[^/]*__($|/)")


@dataclasses.dataclass(frozen=True)
class TarInfo:
    """One input tar."""

    # Where webdataset reads it from (a local path for counted tars).
    url: str
    # Samples in the tar (consecutive members sharing a key).
    count: int
    # "sha256:<hex>" from index.json, else "stat:<bytes>:<mtime ns>" of a local file; None for a
    # remote tar without a digest (its identity cannot be checked).
    identity: str | None = None


def list_tars(urls: list[str]) -> list[TarInfo]:
    """Sample counts for the tars, from index.json where present, else by reading member headers.

    Raises:
        InputError: a tar is missing, unreadable, or remote without an index.json.
    """
    if not urls:
        raise InputError("the shard pattern expands to no tars; check the manifest's 'shards' field")
    indexes: dict[Path, dict[str, tuple[int, str | None]]] = {}
    tars = []
    for url in urls:
        path = Path(url)
        if path.parent not in indexes:
            indexes[path.parent] = _read_index(path.parent)  # once per folder, not once per tar
        index = indexes[path.parent]
        if path.name in index:
            count, digest = index[path.name]
            identity = f"sha256:{digest}" if digest else None if is_remote(url) else stat_identity(path)
            tars.append(TarInfo(url, count, identity))
        elif is_remote(url):
            raise InputError(f"cannot count the samples of remote tar {url}; put an {INDEX_FILE} beside it")
        else:
            tars.append(TarInfo(url, count_samples(path), stat_identity(path)))
    return tars


def stat_identity(path: Path) -> str | None:
    """The size and modification time of a local tar, as its identity when no digest is known."""
    try:
        stat = path.stat()
    except OSError:
        return None  # a missing tar is reported when it is read
    return f"stat:{stat.st_size}:{stat.st_mtime_ns}"


def is_remote(url: str) -> bool:
    """Whether webdataset reads the tar from a URL or a pipe command rather than a local path."""
    return "://" in url or url.startswith("pipe:")


def count_samples(path: Path) -> int:
    """Samples in a local tar, grouped the way webdataset groups them; a truncated tar counts its readable part."""
    return sum(1 for _ in tar_samples(path))


def tar_samples(path: Path) -> Iterator[tuple[str, dict[str, tarfile.TarInfo]]]:
    """(key, {extension: member}) of each sample of a local tar, grouped as webdataset groups them.

    Reads member headers only (a member's bytes are at `member.offset_data`, `member.size` long).
    Extensions are lower case, as webdataset's. A truncated tar yields its readable samples and logs
    a warning.

    Raises:
        InputError: the tar is missing, or not a tar at all.
    """
    if not path.is_file():
        raise InputError(f"tar {path} does not exist; check the shard pattern")
    count, key, members = 0, None, {}
    try:
        with tarfile.open(path, "r:") as archive:
            for member in archive:
                if not member.isreg() or WDS_META.match(member.name):
                    continue
                name, ext = base_plus_ext(member.name)
                if name is None:
                    continue
                if name != key and key is not None:
                    count += 1
                    yield key, members
                    members = {}
                key = name
                members[ext.lower()] = member
    except tarfile.ReadError as e:
        if count == 0 and key is None:
            raise InputError(f"{path} is not a readable tar ({e}); rebuild it with rankpipe shards") from e
        logger.warning("%s is truncated after %d samples (%s); its readable samples are used", path, count, e)
    if key is not None:
        yield key, members


def _read_index(folder: Path) -> dict[str, tuple[int, str | None]]:
    """Name -> (sample count, sha256 hex or None) of the tars an index.json lists."""
    index_path = folder / INDEX_FILE
    if not index_path.is_file():
        return {}
    try:
        data = json.loads(index_path.read_text())
        return {str(e["name"]): (int(e["count"]), str(e["sha256"]) if e.get("sha256") else None) for e in data["tars"]}
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"{index_path} is malformed ({e}); expected {{\"tars\": [{{\"name\", \"count\"}}], \"total\"}}") from e
