"""The embed job: run the frozen CLIP over every input tar once and cache its tokens in the store.

Tars are the unit of work. Decoding runs in DataLoader workers (one tar per worker at a time), the
forward pass in the main thread, and store writes in a writer thread. A tar's rows are written,
then its `done` flag; a rerun skips finished tars and redoes unfinished ones whole, so a killed
run resumes to the same bytes an uninterrupted run writes. With a flip view (`flip_view`), every
image also goes through the backbone mirrored left to right, in a forward pass of its own, so the
original view's features are those of a store without a flip view, byte for byte.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from rankpipe.devices import autocast, torch_device_for
from rankpipe.errors import InputError
from rankpipe.files import exclusive_output
from rankpipe.pipeline.codec_pipelines import AUTO, resolve_codec_pipeline
from rankpipe.pipeline.data.manifest import LabelSpec, Manifest
from rankpipe.pipeline.data.tars import TarInfo, is_remote, list_tars
from rankpipe.pipeline.embed.backbone import (
    BACKBONE_FIELDS,
    Backbone,
    BackboneSpec,
    compatibility_problem,
    load_backbone,
)
from rankpipe.pipeline.embed.cache_choices import (
    HEAD_NORM,
    LN_POST,
    NO_NORM,
    ORIGINAL_ONLY,
    TRAINING_FIELDS,
    WITH_FLIP,
    cache_choices,
    describe,
    first_difference,
)
from rankpipe.pipeline.embed.decode import DecodedBatch, TarBatches, TarTask
from rankpipe.pipeline.embed.gpu_decode import GpuPreprocess
from rankpipe.pipeline.embed.store_writer import EmbeddedBatch, WriterThread
from rankpipe.pipeline.embed.weights import RANDOM_WEIGHTS, file_sha256
from rankpipe.pipeline.store import (
    TOKEN_DTYPE,
    BlockMeta,
    StoreConfig,
    StorePlan,
    TarBlock,
    TokenStore,
    create_store,
    interrupted_creation,
    plan_store,
)

logger = logging.getLogger(__name__)

MODES = ("incremental", "overwrite")
# Batches between the compute loop and the writer thread; bounds host memory held by pending writes.
WRITE_QUEUE_BATCHES = 8
# Shard files written in parallel (each is its own file; one thread writes a few hundred MB/s).
WRITE_THREADS = 4
# The codec pipeline of the shard writes: "raw" (an uncompressed shard written as its rows' bytes and
# index, a compressed one through zarr-python's pipeline: zarr-python's bytes either way); "zarrs"
# writes the same values, not always the same bytes (rankpipe.pipeline.codec_pipelines).
WRITE_CODEC_PIPELINE = AUTO
# Batches decoded ahead of the forward pass on the GPU path.
STAGED_BATCHES = 2


@dataclasses.dataclass
class EmbedSummary:
    """What an embed run did."""

    # The store written.
    store: Path
    # Images run through the backbone in this run.
    images_embedded: int = 0
    # Samples of the tars embedded in this run that could not be used (each row keeps its reason).
    invalid: int = 0
    # Tars embedded in this run, and tars skipped because an earlier run finished them.
    tars_embedded: int = 0
    tars_skipped: int = 0
    # Wall-clock seconds of the run, and of its streaming part (decode, forward, write) alone.
    seconds: float = 0.0
    embed_seconds: float = 0.0
    # Invalid samples by reason.
    errors: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def line(self) -> str:
        """One-line summary for the end of a run."""
        if self.tars_embedded == 0:
            return f"store {self.store} is complete ({self.tars_skipped} tars): nothing to do"
        rate = self.images_embedded / self.embed_seconds if self.embed_seconds > 0 else 0.0
        text = (f"embedded {self.images_embedded} images from {self.tars_embedded} tars "
                f"({self.invalid} invalid, {self.tars_skipped} tars already done) into {self.store} "
                f"in {self.seconds:.1f}s ({rate:.0f} img/s)")
        if self.errors:
            reason, count = self.errors.most_common(1)[0]
            text += f"; most common problem: {reason} ({count}x)"
        return text

    def add_tar(self, meta: BlockMeta, count: int) -> None:
        valid = int(meta.valid.sum())
        self.images_embedded += valid
        self.invalid += count - valid
        self.tars_embedded += 1
        for reason in meta.errors[:count][~meta.valid[:count]]:
            self.errors[str(reason)] += 1


def manifest_for_pattern(pattern: str, labels: Sequence[tuple[str, str]]) -> Manifest:
    """A manifest for a bare shard pattern with (label name, query) pairs given on the command line;
    without pairs, an unlabelled collection (its samples need an image and nothing else)."""
    try:
        specs = tuple(LabelSpec(name=name, query=query) for name, query in labels)
        return Manifest(name=Path(pattern.split("{")[0]).name or "shards", shards=pattern, labels=specs)
    except ValueError as e:
        raise InputError(f"bad --label/--query: {e}") from e


def embed(manifest: Manifest, store_path: str | Path, backbone_spec: BackboneSpec, device: str = "cpu",
          batch_size: int = 256, workers: int = 4, mode: str = "incremental", compress: bool = False,
          progress: bool = True, store_config: StoreConfig | None = None, flip_view: bool = False) -> EmbedSummary:
    """Embed every tar of the manifest into the store, resuming an unfinished store.

    Args:
        manifest: the dataset (tars, labels and their queries).
        store_path: the Zarr store folder.
        backbone_spec: which frozen CLIP to run.
        device: "cpu" or "cuda" (or "cuda:N").
        batch_size: images per forward pass.
        workers: decoding processes (0 decodes in the main process).
        mode: "incremental" resumes a compatible store; "overwrite" replaces it (after the inputs check out).
        compress: zstd-compress the arrays of a new store.
        progress: show a progress bar.
        store_config: chunk and shard sizes (defaults to StoreConfig(compress=compress)).
        flip_view: also embed every image mirrored left to right (a new store's `views`; a resumed
            store must have been made with the same choice).

    Returns:
        What was embedded; `summary.line()` is the one-line report.

    Raises:
        InputError: bad arguments, unreadable inputs, or a store made from other inputs (incremental).
    """
    start = time.perf_counter()
    if mode not in MODES:
        raise InputError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if batch_size < 1 or workers < 0:
        raise InputError(f"need batch size >= 1 and workers >= 0, got {batch_size} and {workers}")
    torch_device = torch_device_for(device)
    config = store_config or StoreConfig(compress=compress)
    # One job at a time per store: a second embed into it is refused (distributed runs hold it in the coordinator).
    with exclusive_output(store_path, "rankpipe embed"):
        tars = input_tars(manifest)
        if mode == "incremental" and finished_with(Path(store_path), manifest, backbone_spec, tars, config.compress,
                                                   flip_view):
            # Nothing to embed: skip loading the backbone, which may need weights that are not at hand.
            summary = EmbedSummary(store=Path(store_path), tars_skipped=len(tars))
            summary.seconds = time.perf_counter() - start
            return summary
        backbone = load_backbone(backbone_spec, torch_device)
        plan = plan_for_backbone(tars, backbone, config)
        store = open_or_create_store(Path(store_path), mode, backbone, manifest, plan, config, flip_view)
        pending = [t for t, done in enumerate(store.done()) if not done]
        summary = EmbedSummary(store=store.path, tars_skipped=len(plan.tars) - len(pending))
        if pending:
            streaming = time.perf_counter()
            _embed_tars(store, pending, backbone, batch_size, workers, progress, summary)
            summary.embed_seconds = time.perf_counter() - streaming
            refuse_unusable(store)
        summary.seconds = time.perf_counter() - start
        logger.info(summary.line())
        return summary


def refuse_unusable(store: TokenStore) -> None:
    """Refuse a finished store that no later command could use: no valid row, or one key on two rows.

    The store stays on disk (its rows say why each image is invalid), but the run ends with exit 2.

    Raises:
        InputError: naming the most common reason, or a repeated key.
    """
    valid = store.valid()  # [N]
    if not valid.any():
        reasons = collections.Counter(str(e) for e in store.errors() if e)
        common = f"; most rows say: {reasons.most_common(1)[0][0]}" if reasons else ""
        raise InputError(f"no image of store {store.path} became a valid row{common}; check the tars' images "
                         "and that their json carries the manifest's labels")
    keys, counts = np.unique(store.keys()[valid], return_counts=True)
    if (counts > 1).any():
        repeated = keys[counts > 1]
        raise InputError(f"store {store.path}: key {str(repeated[0])!r} names {int(counts.max())} images "
                         f"({len(repeated)} repeated key(s) in all); keys must be unique, so rebuild the tars "
                         "with rankpipe shards")


def input_tars(manifest: Manifest) -> list[TarInfo]:
    """The manifest's tars (local ones by absolute path) with their sample counts.

    Raises:
        InputError: a tar cannot be listed, or the tars hold no samples at all.
    """
    tars = list_tars([absolute_url(url) for url in manifest.shard_urls()])
    if sum(tar.count for tar in tars) == 0:
        raise InputError(f"the tars of {manifest.shards} hold no samples; check the shard pattern")
    return tars


def plan_for_backbone(tars: Sequence[TarInfo], backbone: Backbone, config: StoreConfig) -> StorePlan:
    """The store's row allocation for these tars and this backbone's token size."""
    bytes_per_row = backbone.num_tokens * backbone.token_dim * np.dtype(TOKEN_DTYPE).itemsize
    return plan_store(tars, bytes_per_row, config)


def embed_tar(store: TokenStore, t: int, backbone: Backbone, batch_size: int = 256, workers: int = 1,
              progress: bool = False) -> EmbedSummary:
    """Embed one tar of an allocated store (the unit of work a distributed runner calls per tar).

    Args:
        store: a store opened for writing (create_store or TokenStore.open(..., writable=True)).
        t: index of the tar in store.blocks.
        backbone: the loaded backbone, matching the store's provenance.
        batch_size: images per forward pass.
        workers: decoding processes for this tar (0 or 1; a tar is read sequentially).
        progress: show a progress bar.
    """
    problem = compatibility_problem(store.provenance, backbone.provenance) or decoder_problem(store.provenance, backbone)
    if problem:
        raise InputError(f"store {store.path} was made with another backbone: {problem}")
    summary = EmbedSummary(store=store.path)
    start = time.perf_counter()
    _embed_tars(store, [t], backbone, batch_size, min(workers, 1), progress, summary)
    summary.seconds = summary.embed_seconds = time.perf_counter() - start
    return summary


def _embed_tars(store: TokenStore, tars: list[int], backbone: Backbone, batch_size: int, workers: int,
                progress: bool, summary: EmbedSummary) -> None:
    device = backbone.device
    on_gpu = device.type == "cuda"
    gpu_pre = GpuPreprocess(backbone.preprocess, device) if on_gpu else None
    flip_view = cache_choices(store.provenance).flip_view
    tasks = [TarTask(t, store.blocks[t].url, store.blocks[t].count) for t in tars]
    dataset = TarBatches(tasks, store.label_names, batch_size, backbone.preprocess, jpeg_on_gpu=gpu_pre is not None)
    num_workers = min(workers, len(tasks))
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=on_gpu,
                                         prefetch_factor=4 if num_workers else None)
    counts = {t: store.blocks[t].count for t in tars}
    writer = WriterThread(store, lambda t, meta: summary.add_tar(meta, counts[t]), WRITE_QUEUE_BATCHES,
                          WRITE_THREADS, resolve_codec_pipeline(WRITE_CODEC_PIPELINE))
    bar = tqdm(total=sum(counts.values()), unit="img", disable=not progress, desc="embed", dynamic_ncols=True)
    staged = _staged_on_side_stream(loader, gpu_pre, device) if on_gpu else (_stage(b, gpu_pre, device) for b in loader)
    try:
        with torch.inference_mode():
            for batch, images, positions in staged:
                writer.put(_encode(batch, images, positions, backbone, flip_view))
                bar.update(len(batch.keys))
    except InputError as e:
        raise InputError(worker_message(e)) from None  # the sentence, without the worker's traceback
    except RuntimeError as e:
        if "DataLoader worker" not in str(e):
            raise
        raise InputError(f"a decoding worker of store {store.path} stopped ({str(e).splitlines()[0]}), usually for "
                         "lack of memory; rerun with fewer --workers or a smaller --batch-size: finished tars are "
                         "kept") from e
    finally:
        bar.close()
        writer.close()


def worker_message(error: InputError) -> str:
    """The one-sentence message of an InputError, also when a DataLoader worker raised it (torch then
    re-raises it in this process with the worker's whole traceback as its message)."""
    text = str(error)
    marker = "InputError: "
    if "Original Traceback" in text and marker in text:
        return text.rsplit(marker, 1)[1].strip()
    return text


def _stage(batch: DecodedBatch, gpu_pre: GpuPreprocess | None,
           device: torch.device) -> tuple[DecodedBatch, torch.Tensor | None, np.ndarray]:
    """A batch's usable images on the device, [k, 3, H, W] in tar order, and their tar positions [k].

    JPEGs that fail to decode on the GPU get their reason written into batch.errors.
    """
    parts, positions = [], []
    if batch.images is not None:
        parts.append(batch.images.to(device, non_blocking=True))  # [k1, 3, H, W]
        positions.append(batch.image_positions)
    if len(batch.jpeg_positions):
        images, ok, failures = gpu_pre(batch.jpegs())
        failed = sorted(set(range(len(batch.jpeg_positions))) - set(ok))
        for i, reason in zip(failed, failures):
            batch.errors[batch.jpeg_positions[i] - batch.start] = reason
        if images is not None:
            parts.append(images)  # [k2, 3, H, W]
            positions.append(batch.jpeg_positions[ok])
    if not parts:
        return batch, None, np.zeros(0, dtype=np.int64)
    x = torch.cat(parts)  # [k, 3, H, W]
    position = np.concatenate(positions)  # [k]
    order = np.argsort(position, kind="stable")
    if len(parts) > 1:
        x = x[torch.from_numpy(order).to(device)]
    return batch, x, position[order]


def _staged_on_side_stream(loader: Iterable[DecodedBatch], gpu_pre: GpuPreprocess | None,
                           device: torch.device) -> Iterator[tuple[DecodedBatch, torch.Tensor | None, np.ndarray]]:
    """_stage in a background thread on its own CUDA stream, so decoding overlaps the forward pass.

    nvjpeg does part of its work (Huffman decoding) on the CPU; in a second thread that part runs
    while the main thread's forward pass keeps the GPU busy.
    """
    staged: queue.Queue = queue.Queue(STAGED_BATCHES)
    stream = torch.cuda.Stream(device)
    done = object()

    def produce() -> None:
        try:
            with torch.inference_mode(), torch.cuda.stream(stream):
                for batch in loader:
                    item = _stage(batch, gpu_pre, device)
                    ready = torch.cuda.Event()
                    ready.record(stream)
                    staged.put((item, ready))
            staged.put((done, None))
        except BaseException as e:  # re-raised in the consuming thread
            staged.put((e, None))

    thread = threading.Thread(target=produce, name="gpu-decode", daemon=True)
    thread.start()
    while True:
        item, ready = staged.get()
        if item is done:
            break
        if isinstance(item, BaseException):
            raise item
        torch.cuda.current_stream(device).wait_event(ready)
        batch, images, positions = item
        if images is not None:
            # Made on the side stream, used on the main one: keep the allocator from recycling it early.
            images.record_stream(torch.cuda.current_stream(device))
        yield batch, images, positions
    thread.join()


def _encode(batch: DecodedBatch, x: torch.Tensor | None, positions: np.ndarray, backbone: Backbone,
            flip_view: bool = False) -> EmbeddedBatch:
    """Run staged images (and, with `flip_view`, their mirror images) through the backbone; device-to-host
    copies are left in flight for the writer."""
    if x is None:
        return EmbeddedBatch(batch, positions, None, None)
    device = backbone.device
    views = [x, x.flip(-1)] if flip_view else [x]  # [k, 3, H, W] each; mirrored along the width
    features = []
    for view in views:
        with autocast(device):
            tokens, embed = backbone.encode_images(view)  # [k, P, D], [k, E]
        features += [tokens.to(torch.float16), embed.to(torch.float16)]
    if device.type != "cuda":
        host = [f.contiguous() for f in features]
        return EmbeddedBatch(batch, positions, *host[:2], flipped=tuple(host[2:]) or None)
    # Checked after the cast to float16 (which can overflow), here where it costs the GPU next to
    # nothing, instead of by the writer thread reading every byte again; either view non-finite
    # makes the row invalid.
    finite = torch.stack([torch.isfinite(f).flatten(1).all(1) for f in features]).all(0)  # [k]
    host = [torch.empty(f.shape, dtype=torch.float16, pin_memory=True) for f in features]
    host_finite = torch.empty(finite.shape, dtype=torch.bool, pin_memory=True)
    for target, source in zip(host + [host_finite], features + [finite]):
        target.copy_(source, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return EmbeddedBatch(batch, positions, *host[:2], ready, host_finite, flipped=tuple(host[2:]) or None)


def open_or_create_store(path: Path, mode: str, backbone: Backbone, manifest: Manifest, plan: StorePlan,
                         config: StoreConfig, flip_view: bool = False) -> TokenStore:
    exists = path.exists() and (not path.is_dir() or any(path.iterdir()))
    if exists and interrupted_creation(path):
        logger.info("store %s was being created when a run stopped; creating it again", path)
        exists = False  # create_store replaces the folder
    if mode == "incremental" and exists:
        store = TokenStore.open(path, allow_incomplete=True, writable=True)
        provenance = {**backbone.provenance, "views": list(WITH_FLIP if flip_view else ORIGINAL_ONLY)}
        problem = store_mismatch(store, provenance, manifest, plan, config) or decoder_problem(store.provenance, backbone)
        if problem:
            raise InputError(f"store {path} was made from other inputs: {problem}; "
                             f"pass --mode overwrite to replace it, or choose another --store path")
        return store
    if mode == "overwrite" and path.exists() and not (path / "zarr.json").is_file() and path.is_dir():
        raise InputError(f"{path} exists and is not a Zarr store; refusing to delete it, choose another --store path")
    texts = {label.query: backbone.encode_text(label.query) for label in manifest.labels}
    provenance = {**backbone.provenance, "image_decoder": image_decoder(backbone),
                  "views": list(WITH_FLIP if flip_view else ORIGINAL_ONLY)}
    return create_store(path, plan, provenance, manifest, texts, config)


def finished_with(path: Path, manifest: Manifest, spec: BackboneSpec, tars: Sequence[TarInfo], compress: bool,
                  flip_view: bool = False) -> bool:
    """Whether the store at `path` is complete and was made from these tars, manifest, weights, cache
    choices and compression.

    Decided from the store's records alone, without loading the backbone. Anything short of a sure
    match answers False, and the full check (which loads the backbone) then runs and explains.
    """
    if not (path / "zarr.json").is_file():
        return False
    try:
        store = TokenStore.open(path, allow_incomplete=True)
    except InputError:
        return False
    recorded = store.provenance
    if spec.pretrained.lower() == RANDOM_WEIGHTS:
        same_weights = recorded.get("pretrained") == RANDOM_WEIGHTS and recorded.get("seed") == spec.seed
    elif Path(spec.pretrained).is_file():
        same_weights = recorded.get("checkpoint_sha256") == file_sha256(Path(spec.pretrained))
    else:
        same_weights = recorded.get("pretrained") == spec.pretrained
    choices = cache_choices(recorded)
    same_cache = (choices.resize == spec.resize and choices.flip_view == flip_view
                  and surely_same_token_norm(spec, choices.token_norm))
    return (store.is_complete and recorded.get("model") == spec.model and same_weights and same_cache
            and store.compressed == compress
            and [(b.url, b.count) for b in store.blocks] == [(t.url, t.count) for t in tars]
            and changed_tar(store.blocks, tars) is None and store.manifest.to_dict() == manifest.to_dict())


def surely_same_token_norm(spec: BackboneSpec, recorded: str) -> bool:
    """Whether `spec` gives tokens normalised as a store recording `recorded` (same model), without loading it.

    A spec asking for raw trunk maps gives "none"; one asking for the tower's own norm gives "ln_post"
    (ViT) or "head_norm" (a timm tower with a head norm), and "none" only for a timm tower without one,
    which only loading it tells: that case answers False and the full check decides.
    """
    if spec.token_norm == NO_NORM:
        return recorded == NO_NORM
    return recorded in (LN_POST, HEAD_NORM)


def changed_tar(recorded: Sequence[TarBlock], current: Sequence[TarInfo | TarBlock]) -> str | None:
    """Why a tar the store was made from is no longer the same file, or None.

    A tar with no recorded identity (a store made before identities were recorded, a remote tar
    without a digest) cannot be checked and passes.
    """
    for block, tar in zip(recorded, current):
        if block.identity is None or tar.identity is None:
            continue
        # An identity of another kind (a digest now, the file's stat then) cannot be compared.
        if block.identity.split(":")[0] == tar.identity.split(":")[0] and block.identity != tar.identity:
            kind = "content digest" if block.identity.startswith("sha256:") else "size or modification time"
            return (f"tar {block.url} changed since it was embedded (its {kind} differs), so the store would "
                    "mix old and new images")
    return None


def image_decoder(backbone: Backbone) -> str:
    """How this run turns image bytes into pixels: "gpu" (nvJPEG + GPU resize, on CUDA) or "pil".

    The two agree closely but not bit for bit, so a store records which one made its rows and is only
    resumed with the same one: every row of a store then comes from one decoder.
    """
    return "gpu" if backbone.device.type == "cuda" else "pil"


def decoder_problem(recorded: dict, backbone: Backbone) -> str | None:
    """Why this run's image decoder differs from the one that made the store's rows, or None."""
    theirs, ours = recorded.get("image_decoder", "pil"), image_decoder(backbone)
    if theirs == ours:
        return None
    return (f"its images were decoded by {theirs!r} and this run would decode by {ours!r} "
            f"(embed on {'a CUDA device' if theirs == 'gpu' else 'the CPU'} to resume it)")


def store_mismatch(store: TokenStore, provenance: dict, manifest: Manifest, plan: StorePlan,
                   config: StoreConfig) -> str | None:
    """Why an existing store cannot be resumed with these inputs, or None."""
    problem = compatibility_problem(store.provenance, provenance, BACKBONE_FIELDS)
    if problem:
        return problem
    difference = first_difference(store.provenance, provenance, TRAINING_FIELDS)
    if difference is not None:
        field, theirs, ours = difference
        return f"it was embedded with {describe(field, theirs)} and this run asks for {describe(field, ours)}"
    problem = compatibility_problem(store.provenance, provenance)
    if problem:
        return problem
    ours = [(block.url, block.count) for block in plan.tars]
    theirs = [(block.url, block.count) for block in store.blocks]
    if ours != theirs:
        return f"its tars differ ({len(theirs)} tars, first {theirs[:1]}) from the inputs ({len(ours)} tars, first {ours[:1]})"
    changed = changed_tar(store.blocks, plan.tars)
    if changed:
        return changed
    if store.manifest.to_dict() != manifest.to_dict():
        return "its manifest (name, labels, queries or splits) differs from the given one"
    if (store.chunk_rows, store.shard_rows) != (plan.chunk_rows, plan.shard_rows):
        return f"its chunking ({store.chunk_rows}/{store.shard_rows} rows) differs from ({plan.chunk_rows}/{plan.shard_rows})"
    if store.compressed != config.compress:
        return f"it was created with compression {'on' if store.compressed else 'off'}"
    return None


def absolute_url(url: str) -> str:
    # Local tars are recorded by absolute path so the store can be used from any folder.
    return url if is_remote(url) else str(Path(url).resolve())
