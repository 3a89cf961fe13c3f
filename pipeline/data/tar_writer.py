"""Numbered tars written under temporary names and renamed into place only when all are complete.

A killed run therefore never leaves a half-written tar under a final name, and the previous run's
outputs stay readable until the new ones replace them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import time
from pathlib import Path

import webdataset as wds

from rankpipe.files import PARTIAL_SUFFIX

logger = logging.getLogger(__name__)



@dataclasses.dataclass(frozen=True)
class TarEntry:
    """One written tar."""

    # File name inside the output folder, e.g. "koniq-000000.tar".
    name: str
    # Number of samples in it.
    count: int
    # SHA-256 of the tar's bytes (hex): its identity in index.json, which embed records and checks.
    sha256: str


class TarSequence:
    """Tars name-000000.tar, name-000001.tar, ... written under temporary names until `commit`."""

    def __init__(self, out_dir: Path, name: str, samples_per_tar: int) -> None:
        self.out_dir = out_dir
        self.name = name
        self.samples_per_tar = samples_per_tar
        self.entries: list[TarEntry] = []
        self.partials: list[Path] = []
        self.mtime = time.time()  # one timestamp for every member of this run
        self._writer: wds.TarWriter | None = None
        self._count = 0

    def write(self, sample: dict) -> None:
        """Append a sample (all values already bytes), starting a new tar when the current one is full."""
        if self._writer is None:
            partial = self.out_dir / f".{tar_name(self.name, len(self.partials))}{PARTIAL_SUFFIX}"
            self.partials.append(partial)
            # encoder=False: the bytes go in exactly as read, nothing is re-encoded.
            self._writer = wds.TarWriter(str(partial), encoder=False, mtime=self.mtime)
        self._writer.write(sample)
        self._count += 1
        if self._count == self.samples_per_tar:
            self._finish_tar()

    def close(self) -> None:
        """Finish the tar being written, if any."""
        if self._writer is not None:
            self._finish_tar()

    def commit(self) -> None:
        """Rename every finished tar to its final name."""
        for index, partial in enumerate(self.partials):
            os.replace(partial, self.out_dir / tar_name(self.name, index))
        self.partials = []

    def discard(self) -> None:
        """Remove temporary tars left by a failure (a no-op after `commit`)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        for partial in self.partials:
            partial.unlink(missing_ok=True)

    def _finish_tar(self) -> None:
        assert self._writer is not None
        self._writer.close()
        self._writer = None
        with self.partials[-1].open("rb") as f:  # just written: read back from the page cache
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        self.entries.append(TarEntry(tar_name(self.name, len(self.entries)), self._count, digest))
        self._count = 0


def tar_name(name: str, index: int) -> str:
    """The file name of tar `index` of dataset `name`, e.g. "koniq-000003.tar"."""
    return f"{name}-{index:06d}.tar"


def remove_stale_tars(out_dir: Path, name: str, n_tars: int) -> None:
    """Delete tars of an earlier, larger run that the new manifest no longer names."""
    pattern = re.compile(rf"^{re.escape(name)}-(\d{{6}})\.tar$")
    for path in out_dir.iterdir():
        match = pattern.match(path.name)
        if match and int(match.group(1)) >= n_tars:
            logger.info("removing %s, left from an earlier run with more tars", path)
            path.unlink()
