"""Writing outputs safely: readers see the old content or the new, never half; two jobs never share one.

Every output rankpipe writes in place of an earlier one (manifests, indexes, exports, checkpoints,
results) goes through `atomic_target`: the bytes go to a hidden temporary file beside the target,
are flushed to disk, and the file is renamed over the target only when the write succeeded. Every
job that writes an output folder or store holds `exclusive_output` on it while it runs.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import filelock

from rankpipe.errors import InputError

# Suffix of files still being written; they are also hidden (leading dot) so globs skip them.
PARTIAL_SUFFIX = ".partial"


@contextlib.contextmanager
def atomic_target(path: str | Path, durable: bool = True) -> Iterator[Path]:
    """A hidden temporary path beside `path` to write to: renamed onto `path` when the block succeeds.

    The temporary name is unique, so two writers of one target never write into the same file; the
    last rename wins whole. A failed write leaves no temporary behind and the old file as it was.
    With durable=False the bytes are not flushed to disk before the rename (a killed process still
    leaves the old file or the new one; only a machine that loses power may not): for files that
    something written after them vouches for, such as a store's shards (the tar's done flag).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Unique per writer; created by the writer itself, so it gets the usual permissions.
    partial = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}{PARTIAL_SUFFIX}")
    try:
        yield partial
        if durable:
            with open(partial, "rb+") as f:  # the bytes reach the disk before the name does
                os.fsync(f.fileno())
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `path` as UTF-8 through a temporary file, so readers see the old or the new text, never half."""
    with atomic_target(path) as partial:
        partial.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def exclusive_output(path: str | Path, job: str) -> Iterator[None]:
    """Hold an exclusive lock on output `path` (a folder or a store) for the life of a job.

    The lock is a hidden file beside `path` (`.NAME.lock`), so replacing or deleting the output keeps
    it. A second job pointed at the same output is refused at once, with a sentence that names the
    first (its command, process id, host and start time), instead of both writing into it. The lock
    is the operating system's (filelock): it goes with the process, so a killed job leaves no stale lock.

    Args:
        path: the output the job writes.
        job: what the job is, e.g. "rankpipe embed", named to a second job that is refused.

    Raises:
        InputError: another job holds the lock.
    """
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = path.with_name(f".{path.name}.lock")
    owner_path = path.with_name(f".{path.name}.lock-owner")
    lock = filelock.FileLock(lock_path, timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout:
        holder = owner_path.read_text().strip() if owner_path.is_file() else "another job"
        raise InputError(f"{path} is being written by {holder}; wait for it to finish or choose another output") from None
    try:
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        owner_path.write_text(f"{job} (process {os.getpid()} on {socket.gethostname()}, started {started})\n")
        yield
    finally:
        owner_path.unlink(missing_ok=True)
        lock.release()
