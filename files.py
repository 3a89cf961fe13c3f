"""Writing files so that readers see the old content or the new, never half of it.

Every output rankpipe writes in place of an earlier one (manifests, indexes, exports, checkpoints,
results) goes through `atomic_target`: the bytes go to a hidden temporary file beside the target,
are flushed to disk, and the file is renamed over the target only when the write succeeded.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

# Suffix of files still being written; they are also hidden (leading dot) so globs skip them.
PARTIAL_SUFFIX = ".partial"


@contextlib.contextmanager
def atomic_target(path: str | Path) -> Iterator[Path]:
    """A hidden temporary path beside `path` to write to: renamed onto `path` when the block succeeds.

    The temporary name is unique, so two writers of one target never write into the same file; the
    last rename wins whole. A failed write leaves no temporary behind and the old file as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Unique per writer; created by the writer itself, so it gets the usual permissions.
    partial = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}{PARTIAL_SUFFIX}")
    try:
        yield partial
        with open(partial, "rb+") as f:  # the bytes reach the disk before the name does
            os.fsync(f.fileno())
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `path` through a temporary file, so readers see the old or the new text, never half."""
    with atomic_target(path) as partial:
        partial.write_text(text)
