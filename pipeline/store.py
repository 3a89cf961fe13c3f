"""The Zarr v3 token store (layout and contract in docs/store.md): allocation, per-tar writes, reading.

Every input tar owns the rows `row_start:row_stop`, a whole number of Zarr shards, so writers of
different tars never touch the same file. A tar's rows are written first and its `done` flag last,
which makes `done` the resume point of an interrupted run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from rankpipe.errors import InputError
from rankpipe.pipeline.codec_pipelines import whole_shard_writer
from rankpipe.pipeline.data.manifest import Manifest, ManifestError, manifest_from_dict
from rankpipe.pipeline.data.tars import TarInfo
from rankpipe.pipeline.embed.backbone import TextFeatures
from rankpipe.pipeline.embed.cache_choices import HFLIP, ORIGINAL, cache_choices
from rankpipe.pipeline.shard_files import ShardWrite

__all__ = ["StoreConfig", "StorePlan", "TarBlock", "BlockMeta", "TokenStore", "TextFeatures", "plan_store",
           "create_store", "prompt_id"]

STORE_FORMAT = 1
# The attribute a store carries from the start of its creation (the format marker comes last).
CREATING_MARK = "rankpipe_store_creating"
TOKEN_DTYPE = np.float16
# The arrays of each view: the original image's, and (stores embedded with --flip-view) its mirror image's.
VIEW_ARRAYS = {ORIGINAL: ("image/tokens", "image/embed"), HFLIP: ("image/hflip/tokens", "image/hflip/embed")}


@dataclasses.dataclass(frozen=True)
class StoreConfig:
    """How the store's arrays are cut into files."""

    # Target bytes of image tokens per Zarr chunk; reads are fastest from chunks of 1 MB or more.
    chunk_bytes: int = 1 << 20
    # Target bytes of image tokens per Zarr shard (one file); each tar owns a whole number of them.
    shard_bytes: int = 64 << 20
    # zstd-compress every array; off by default because fp16 CLIP features barely compress.
    compress: bool = False

    def __post_init__(self) -> None:
        if self.chunk_bytes <= 0 or self.shard_bytes < self.chunk_bytes:
            raise ValueError(f"need 0 < chunk_bytes <= shard_bytes, got {self.chunk_bytes}, {self.shard_bytes}")


@dataclasses.dataclass(frozen=True)
class TarBlock:
    """A tar and the rows it owns."""

    # Where the tar is read from.
    url: str
    # Samples in the tar; rows count..row_stop-row_start are padding.
    count: int
    # First row of the block.
    row_start: int
    # One past the last row; row_stop - row_start is a multiple of the shard rows.
    row_stop: int
    # The tar's identity when it was planned (see rankpipe.pipeline.data.tars.TarInfo.identity); None
    # in stores made before identities were recorded, and for remote tars without a digest.
    identity: str | None = None


@dataclasses.dataclass(frozen=True)
class StorePlan:
    """Row allocation of a store."""

    # One block per input tar, in input order.
    tars: tuple[TarBlock, ...]
    # Rows per Zarr chunk of image/tokens.
    chunk_rows: int
    # Rows per Zarr shard of image/tokens (a multiple of chunk_rows); also the chunk of the per-row arrays.
    shard_rows: int

    @property
    def num_rows(self) -> int:
        return self.tars[-1].row_stop if self.tars else 0


@dataclasses.dataclass
class BlockMeta:
    """The per-row arrays of one tar's block, each of length row_stop - row_start."""

    # WebDataset __key__ ("" on padding rows).
    keys: np.ndarray
    # True where the row holds an embedded image.
    valid: np.ndarray
    # Why a row is invalid ("" when valid).
    errors: np.ndarray
    # The sample's split value ("" when it has none).
    splits: np.ndarray
    # Raw label values by label name, NaN when missing.
    labels: dict[str, np.ndarray]
    # The image's original path as `rankpipe shards` recorded it in the sample's json ("" when none).
    sources: np.ndarray | None = None


def plan_store(tars: Sequence[TarInfo], bytes_per_row: int, config: StoreConfig) -> StorePlan:
    """Allocate rows: chunks of about config.chunk_bytes, shards that split the largest tar evenly.

    Args:
        tars: the input tars with their sample counts.
        bytes_per_row: bytes of image tokens per image (P * D * 2).
        config: target chunk and shard sizes.
    """
    largest = max([tar.count for tar in tars] + [1])
    chunk_rows = max(1, min(math.ceil(config.chunk_bytes / bytes_per_row), largest))
    shards_per_tar = max(1, math.ceil(largest * bytes_per_row / config.shard_bytes))
    shard_rows = _round_up(math.ceil(largest / shards_per_tar), chunk_rows)
    blocks, row = [], 0
    for tar in tars:
        rows = _round_up(tar.count, shard_rows)
        blocks.append(TarBlock(tar.url, tar.count, row, row + rows, tar.identity))
        row += rows
    return StorePlan(tuple(blocks), chunk_rows, shard_rows)


def prompt_id(prompt: str) -> str:
    """A stable, path-safe id for a prompt (the name of its text/ group)."""
    return "p" + hashlib.sha256(prompt.encode()).hexdigest()[:12]


def create_store(path: str | Path, plan: StorePlan, provenance: dict[str, Any], manifest: Manifest,
                 texts: dict[str, TextFeatures], config: StoreConfig) -> TokenStore:
    """Create an empty store with every array allocated, the text features written and no tar done.

    Args:
        path: the store folder (replaced if it exists).
        plan: row allocation from plan_store.
        provenance: the backbone's provenance record.
        manifest: the dataset; its labels name the label arrays and their queries (none for an
            unlabelled collection: no label arrays, no text features).
        texts: text features by query sentence, one per unique query of the manifest.
        config: chunking and compression.
    """
    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    root = zarr.open_group(path, mode="w")
    # Marks the folder as a store being created: if the creation is killed, the next run recreates it.
    root.attrs.update({CREATING_MARK: STORE_FORMAT})
    compressors = (ZstdCodec(level=3),) if config.compress else None
    N, S = plan.num_rows, plan.shard_rows
    P = provenance["token_grid"][0] * provenance["token_grid"][1]
    D, E = provenance["token_dim"], provenance["embed_dim"]

    def rows_array(name: str, dtype: Any, fill: Any) -> None:
        # Per-row arrays: one chunk per shard of rows, so a tar's block is whole files here too.
        root.create_array(name, shape=(N,), chunks=(S,), dtype=dtype, fill_value=fill, compressors=compressors)

    for view in cache_choices(provenance).views:
        tokens, embed = VIEW_ARRAYS[view]
        root.create_array(tokens, shape=(N, P, D), chunks=(plan.chunk_rows, P, D), shards=(S, P, D),
                          dtype=TOKEN_DTYPE, fill_value=0, compressors=compressors)
        root.create_array(embed, shape=(N, E), chunks=(S, E), dtype=TOKEN_DTYPE, fill_value=0, compressors=compressors)
    rows_array("image/key", str, "")
    rows_array("image/valid", bool, False)
    rows_array("image/error", str, "")
    rows_array("image/tar", np.int32, -1)
    rows_array("image/split", str, "")
    rows_array("image/source", str, "")
    for label in manifest.labels:
        rows_array(f"label/{label.name}", np.float32, np.nan)
    # One chunk per tar: parallel writers of different tars never share a done file.
    T = len(plan.tars)
    root.create_array("done", shape=(T,), chunks=(1,), dtype=bool, fill_value=False, compressors=compressors)
    for prompt, features in texts.items():
        group = root.create_group(f"text/{prompt_id(prompt)}")
        group.attrs.update({"prompt": prompt, "length": int(features.length)})
        group.create_array("tokens", data=features.tokens.astype(TOKEN_DTYPE), compressors=compressors)
        group.create_array("embed", data=features.embed.astype(TOKEN_DTYPE), compressors=compressors)
    # The format marker goes last: a folder without it is an interrupted creation, not a store.
    root.attrs.update({
        "provenance": provenance,
        "manifest": manifest.to_dict(),
        "tars": [dataclasses.asdict(block) for block in plan.tars],
        "labels": {label.name: {"query": label.query, "prompt_id": prompt_id(label.query)} for label in manifest.labels},
        "chunk_rows": plan.chunk_rows,
        "shard_rows": plan.shard_rows,
        "rankpipe_store": STORE_FORMAT,
    })
    return TokenStore.open(path, allow_incomplete=True, writable=True)


def interrupted_creation(path: str | Path) -> bool:
    """Whether `path` is a store whose creation was killed before it was complete (nothing to keep)."""
    path = Path(path)
    if not (path / "zarr.json").is_file():
        return False
    try:
        attrs = zarr.open_group(path, mode="r").attrs
    except Exception:  # an unreadable group is not ours to delete
        return False
    return CREATING_MARK in attrs and "rankpipe_store" not in attrs


class TokenStore:
    """A rankpipe token store: the read API used by training and evaluation, and the per-tar writer side."""

    def __init__(self, path: Path, root: zarr.Group) -> None:
        self.path = path
        self._root = root
        self._shard_writers: dict[tuple[str, str], ShardWrite] = {}
        attrs = dict(root.attrs)
        self.provenance: dict[str, Any] = attrs["provenance"]
        self._manifest_dict: dict[str, Any] = attrs["manifest"]
        self._labels: dict[str, dict[str, str]] = attrs["labels"]
        self.blocks: tuple[TarBlock, ...] = tuple(TarBlock(**block) for block in attrs["tars"])
        self.chunk_rows: int = attrs["chunk_rows"]
        self.shard_rows: int = attrs["shard_rows"]
        self.label_names: list[str] = list(self._labels)
        self.num_rows: int = self._read("image/valid", lambda a: a.shape[0])
        try:
            self.manifest: Manifest = manifest_from_dict(self._manifest_dict)
        except ManifestError as e:
            raise InputError(f"store {path} carries a malformed manifest ({e}); embed it again with --mode overwrite") from e

    @classmethod
    def open(cls, path: str | Path, *, allow_incomplete: bool = False, writable: bool = False) -> TokenStore:
        """Open a finished store.

        Args:
            path: the store folder.
            allow_incomplete: also open a store whose tars are not all embedded (the embed job does).
            writable: open for writing (the embed job only).

        Raises:
            InputError: missing, not a rankpipe store, or unfinished (the message lists the missing tars).
        """
        path = Path(path)
        if not (path / "zarr.json").is_file():
            if path.exists():
                raise InputError(f"{path} is not a token store (it has no zarr.json); pass a store written by "
                                 "`rankpipe embed`, or choose another --store path")
            raise InputError(f"store {path} does not exist; create it with rankpipe embed")
        try:
            root = zarr.open_group(path, mode="r+" if writable else "r")
        except Exception as e:  # zarr raises several types for an unreadable group
            raise InputError(f"{path} is not a readable Zarr store ({e}); embed it again with --mode overwrite") from e
        fmt = root.attrs.get("rankpipe_store")
        if fmt is None:
            raise InputError(f"{path} is not a rankpipe store (or its creation was interrupted); "
                             f"embed it again with --mode overwrite or choose another --store path")
        if fmt != STORE_FORMAT:
            raise InputError(f"store {path} has format {fmt}, this rankpipe reads format {STORE_FORMAT}; embed it again")
        store = cls(path, root)
        if not allow_incomplete and not store.is_complete:
            missing = store.missing_tars()
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise InputError(f"store {path} is unfinished: {len(missing)} tar(s) not embedded yet ({shown}); "
                             f"rerun rankpipe embed with the same arguments to finish it")
        return store

    # --- completion -----------------------------------------------------------------------------------

    def done(self) -> np.ndarray:
        """[T] bool: which tars are finished."""
        return np.asarray(self._read("done", lambda a: a[:]), dtype=bool)

    @property
    def is_complete(self) -> bool:
        return bool(self.done().all())

    def missing_tars(self) -> list[str]:
        """URLs of the tars not yet embedded."""
        return [block.url for block, done in zip(self.blocks, self.done()) if not done]

    @property
    def views(self) -> tuple[str, ...]:
        """The embedded views of every image: ("original",), or ("original", "hflip") with --flip-view."""
        return cache_choices(self.provenance).views

    @property
    def compressed(self) -> bool:
        """Whether the arrays were created with a compressor (--compress)."""
        return bool(self._root["image/embed"].compressors)

    # --- read API -------------------------------------------------------------------------------------

    def keys(self, rows: slice = slice(None)) -> np.ndarray:
        """[n] str: WebDataset keys of `rows` (all by default; "" on padding rows)."""
        return self._strings("image/key", rows)

    def valid(self, rows: slice = slice(None)) -> np.ndarray:
        """[n] bool: which of `rows` (all by default) hold an embedded image."""
        return np.asarray(self._read("image/valid", lambda a: a[rows]), dtype=bool)

    def errors(self, rows: slice = slice(None)) -> np.ndarray:
        """[n] str: why each of `rows` (all by default) is invalid ("" when valid)."""
        return self._strings("image/error", rows)

    def invalid_note(self) -> str | None:
        """A sentence on the images that are invalid rows (left out of training and evaluation), or None."""
        # Counted from the tars' sample counts and the cheap valid column; the error strings (the
        # slowest array) are read only when some image is invalid.
        count = sum(block.count for block in self.blocks) - int(self.valid().sum())
        if count <= 0:
            return None
        note = f"{count} image(s) of store {self.path} are invalid rows and left out"
        errors = self.errors()  # [N]; padding rows have no image and no error
        reasons = np.flatnonzero(errors != "")
        if not len(reasons):
            return note
        first = int(reasons[0])
        return f"{note}, e.g. {self.keys()[first] or 'row ' + str(first)}: {errors[first]}"

    def splits(self) -> np.ndarray:
        """[N] str: each row's split value."""
        return self._strings("image/split")

    def tar_index(self) -> np.ndarray:
        """[N] int32: index of each row's tar in tar_urls() (-1 on padding rows)."""
        return np.asarray(self._read("image/tar", lambda a: a[:]))

    def sources(self, rows: slice = slice(None)) -> np.ndarray:
        """[n] str: each row's original image path as `rankpipe shards` recorded it ("" when unknown).

        Stores written before rows recorded their source have no such array: every source is "".
        """
        if "image/source" not in self._root:
            return np.full(len(range(*rows.indices(self.num_rows))), "", dtype=str)
        return self._strings("image/source", rows)

    def label(self, name: str) -> np.ndarray:
        """[N] float32 raw label values, NaN where missing."""
        self._check_label(name)
        return np.asarray(self._read(f"label/{name}", lambda a: a[:]), dtype=np.float32)

    def query(self, name: str) -> str:
        """The ranking sentence of a label."""
        self._check_label(name)
        return self._labels[name]["query"]

    def text(self, name: str) -> TextFeatures:
        """Text-tower features of a label's query."""
        self._check_label(name)
        group = f"text/{self._labels[name]['prompt_id']}"
        return TextFeatures(tokens=np.asarray(self._read(f"{group}/tokens", lambda a: a[:])),
                            length=int(self._read(group, lambda g: g.attrs["length"])),
                            embed=np.asarray(self._read(f"{group}/embed", lambda a: a[:])))

    def image_tokens(self, rows: slice | np.ndarray, view: str = ORIGINAL) -> np.ndarray:
        """[n, P, D] float16 patch tokens of a slice or sorted row indices, of one of `views`."""
        return self._select(self._view_arrays(view)[0], rows)

    def image_embed(self, rows: slice | np.ndarray, view: str = ORIGINAL) -> np.ndarray:
        """[n, E] float16 pooled image embeddings of a slice or sorted row indices, of one of `views`."""
        return self._select(self._view_arrays(view)[1], rows)

    def rows(self, split_values: Sequence[str] | None = None, label: str | None = None) -> np.ndarray:
        """Valid rows (int64, ascending), optionally only those in `split_values` and with a finite `label`."""
        keep = self.valid()
        if split_values is not None:
            keep &= np.isin(self.splits(), np.asarray(list(split_values), dtype=str))
        if label is not None:
            keep &= np.isfinite(self.label(label))
        return np.flatnonzero(keep).astype(np.int64)

    @property
    def identity(self) -> str:
        """A digest of what the store's rows were made from: backbone, manifest, and each tar with its identity.

        Two stores of the same backbone and labels but other images have different identities, so a
        run records it and refuses to resume on another store. A copied store keeps its identity.
        """
        made_from = {
            "provenance": self.provenance,
            "manifest": self._manifest_dict,
            "tars": [(block.url, block.count, block.identity) for block in self.blocks],
        }
        return hashlib.sha256(json.dumps(made_from, sort_keys=True, default=str).encode()).hexdigest()

    def tar_urls(self) -> list[str]:
        """The input tars, in row order."""
        return [block.url for block in self.blocks]

    def row_blocks(self) -> list[tuple[int, int]]:
        """(row_start, row_stop) of each tar, for streaming shard by shard."""
        return [(block.row_start, block.row_stop) for block in self.blocks]

    # --- writer side ----------------------------------------------------------------------------------

    def write_tokens(self, row_start: int, tokens: np.ndarray, embed: np.ndarray,
                     flipped: tuple[np.ndarray, np.ndarray] | None = None, codec_pipeline: str = "zarr") -> None:
        """Write whole shards of rows: tokens [n, P, D] and embed [n, E], n a multiple of shard_rows, and
        in a store with a flip view, `flipped`: the same of the mirror images.

        Safe to call from several threads at once for different shards.

        Args:
            codec_pipeline: "raw", "zarr" or "zarrs" (see rankpipe.pipeline.codec_pipelines); the same values any
                way, and the same bytes with "raw" or "zarr".
        """
        n = tokens.shape[0]
        if row_start % self.shard_rows or n % self.shard_rows:
            raise ValueError(f"rows {row_start}:{row_start + n} are not whole shards of {self.shard_rows} rows")
        if (flipped is not None) != (HFLIP in self.views):
            raise ValueError(f"store {self.path} has views {self.views}; write exactly those")
        arrays = [(VIEW_ARRAYS[ORIGINAL][0], tokens), (VIEW_ARRAYS[ORIGINAL][1], embed)]
        if flipped is not None:
            arrays += list(zip(VIEW_ARRAYS[HFLIP], flipped))
        for name, values in arrays:
            self._shard_writer(name, codec_pipeline)(row_start, values)

    def _shard_writer(self, name: str, codec_pipeline: str) -> ShardWrite:
        # One writer per array and pipeline, made on first use (two threads making it at once make equal ones).
        key = (name, codec_pipeline)
        if key not in self._shard_writers:
            self._shard_writers[key] = whole_shard_writer(self._root[name], codec_pipeline)
        return self._shard_writers[key]

    def write_block_meta(self, t: int, meta: BlockMeta) -> None:
        """Write the per-row arrays of tar t's block."""
        block = self.blocks[t]
        rows = slice(block.row_start, block.row_stop)
        n = block.row_stop - block.row_start
        tar = np.full(n, -1, dtype=np.int32)
        tar[:block.count] = t
        self._root["image/key"][rows] = np.asarray(meta.keys, dtype=str)
        self._root["image/valid"][rows] = np.asarray(meta.valid, dtype=bool)
        self._root["image/error"][rows] = np.asarray(meta.errors, dtype=str)
        self._root["image/tar"][rows] = tar
        self._root["image/split"][rows] = np.asarray(meta.splits, dtype=str)
        if meta.sources is not None and "image/source" in self._root:  # older stores have no source array
            self._root["image/source"][rows] = np.asarray(meta.sources, dtype=str)
        for name in self.label_names:
            self._root[f"label/{name}"][rows] = meta.labels[name]

    def mark_done(self, t: int) -> None:
        """Record tar t as finished; called after all its rows are written."""
        self._root["done"][t] = True

    # --- helpers --------------------------------------------------------------------------------------

    def _view_arrays(self, view: str) -> tuple[str, str]:
        if view not in self.views:
            raise InputError(f"store {self.path} holds no {view!r} view (its views: {', '.join(self.views)}); "
                             "embed it with --flip-view for flipped views")
        return VIEW_ARRAYS[view]

    def _check_label(self, name: str) -> None:
        if name not in self._labels:
            raise InputError(f"store {self.path} has no label {name!r}; its labels are: {', '.join(self.label_names)}")

    def _strings(self, name: str, rows: slice = slice(None)) -> np.ndarray:
        # zarr returns numpy's variable-width StringDType; fixed-width str is what numpy code expects.
        return np.array(self._read(name, lambda a: a[rows]).tolist(), dtype=str)

    def _select(self, name: str, rows: slice | np.ndarray) -> np.ndarray:
        if isinstance(rows, slice):
            return np.asarray(self._read(name, lambda a: a[rows]))
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and np.any(np.diff(rows) < 0):
            raise ValueError("row indices must be sorted ascending")
        return np.asarray(self._read(name, lambda a: a.oindex[rows]))

    def _read(self, name: str, select: Callable[[Any], Any]) -> Any:
        """`select` applied to array (or group) `name`; a store that cannot give it is damaged, and says so.

        Raises:
            InputError: the array is missing, or a chunk of it cannot be decoded (a truncated file).
        """
        try:
            node = self._root[name]
        except KeyError as e:
            raise InputError(f"store {self.path} is damaged: it has no {name!r}; embed it again with --mode overwrite "
                             "(or into a new --store)") from e
        try:
            return select(node)
        except Exception as e:  # zarr and its codecs raise many types for a truncated or corrupt chunk file
            raise InputError(f"store {self.path} is damaged: {name!r} cannot be read ({type(e).__name__}: "
                             f"{str(e)[:160]}); embed it again with --mode overwrite (or into a new --store)") from e


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
