"""The scores of a store ranking, one file per block: what lets a killed run resume and workers share it.

A run's folder holds `run.json` (everything that decides the scores: store, checkpoint file hash,
queries, batch and piece sizes, device kind) and one `block-NNNNNN.npz` per finished block with
its valid rows and their per-query scores. A block file is written under a temporary name and
renamed (rankpipe.files), so a file that exists is complete: a rerun with the same arguments finds
the same folder, skips those blocks, and merges the same bytes an uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from rankpipe.errors import InputError
from rankpipe.files import atomic_target, write_text_atomic

RUN_FILE = "run.json"
_BLOCK_FILE = re.compile(r"^block-(\d{6})\.npz$")


def run_id(run: dict[str, Any]) -> str:
    """A short stable id of a run record (its JSON, keys sorted, hashed)."""
    return hashlib.sha256(json.dumps(run, sort_keys=True).encode()).hexdigest()[:12]


@dataclasses.dataclass(frozen=True)
class ScoreFolder:
    """One ranking run's per-block scores."""

    # The folder (the same path on every worker).
    path: Path

    def block_path(self, block: int) -> Path:
        return self.path / f"block-{block:06d}.npz"

    def has(self, block: int) -> bool:
        """Whether the block's scores are written."""
        return self.block_path(block).is_file()

    def finished(self) -> set[int]:
        """The blocks whose scores are written."""
        found = (_BLOCK_FILE.match(p.name) for p in self.path.iterdir())
        return {int(m.group(1)) for m in found if m}

    def write(self, block: int, rows: np.ndarray, scores: np.ndarray) -> None:
        """Record a finished block: its [n] int64 valid rows and their [n, Q] float64 scores."""
        with atomic_target(self.block_path(block)) as partial, partial.open("wb") as f:
            np.savez(f, rows=np.asarray(rows, dtype=np.int64), scores=np.asarray(scores, dtype=np.float64))

    def read(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        """A finished block's [n] rows and [n, Q] scores."""
        with np.load(self.block_path(block)) as data:
            return data["rows"], data["scores"]


def open_score_folder(path: Path, run: dict[str, Any]) -> ScoreFolder:
    """The folder of `run`: created with its run.json, or found holding the same run.

    Raises:
        InputError: the folder exists but holds another run's scores, or is not a score folder, or
            cannot be written.
    """
    record = path / RUN_FILE
    if path.exists() and not path.is_dir():
        raise InputError(f"{path} is a file, not a folder for rank scores; choose another --work-dir")
    if path.exists() and any(path.iterdir()):
        try:
            theirs = json.loads(record.read_text())
        except (OSError, ValueError):
            raise InputError(f"{path} exists and does not hold rankpipe rank scores; choose another --work-dir") from None
        if theirs != json.loads(json.dumps(run)):
            raise InputError(f"{path} holds the block scores of another ranking (other store, checkpoint, queries "
                             "or settings); remove it or choose another --work-dir")
        return ScoreFolder(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        write_text_atomic(record, json.dumps(run, indent=1, sort_keys=True) + "\n")
    except OSError as e:
        raise InputError(f"cannot write the score folder {path} ({e}); pass --work-dir on a writable filesystem") from e
    return ScoreFolder(path)
