"""The store's shard writes: the raw shard files write the bytes zarr-python's pipeline writes, the
zarrs pipeline the same values, and the writer's finiteness check agrees with numpy's."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from rankpipe.benchmarks.synthetic_store import feature_batch, feed_writer, make_store
from rankpipe.errors import InputError
from rankpipe.pipeline.codec_pipelines import resolve_codec_pipeline
from rankpipe.pipeline.embed.store_writer import NON_FINITE_REASON, BlockAccumulator, EmbeddedBatch, finite_rows
from rankpipe.pipeline.shard_files import raw_shard_writer
from rankpipe.pipeline.store import TokenStore


def store_files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def features(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    return (torch.from_numpy(rng.standard_normal((5, 6, 8), dtype=np.float32).astype(np.float16)),  # [B, P, D]
            torch.from_numpy(rng.standard_normal((5, 4), dtype=np.float32).astype(np.float16)))  # [B, E]


@pytest.mark.parametrize("compress", [False, True])
# Inner chunks of a whole shard (one per shard), of 1 row (the last tar's padding row is a whole
# chunk of fill values) and of 3 rows (9-row shards, the last chunk part padding).
@pytest.mark.parametrize("chunk_bytes", [1 << 20, 96, 288])
@pytest.mark.parametrize("pipeline", ["zarrs", "raw"])
def test_every_pipeline_writes_the_store_zarr_python_writes(tmp_path, compress, chunk_bytes, pipeline):
    """raw: the same bytes. zarrs: the same values; in a shard of several inner chunks it lays them in
    the order its threads finish them and leaves out a chunk of padding rows alone (the index says
    where each chunk is, and a missing one reads as the fill value), so only those files may differ."""
    if pipeline == "zarrs":
        pytest.importorskip("zarrs")
    tokens, embed = features(0)
    written = {}
    for name in ("zarr", pipeline):
        # 23 images in 3 tars: the last batch of each tar is short and the last shard has padding rows.
        store = make_store(tmp_path / name, 23, 3, 6, 8, 4, compress, chunk_bytes=chunk_bytes)
        feed_writer(store, tokens, embed, write_threads=2, codec_pipeline=name)
        written[name] = store_files(tmp_path / name)
    assert store.chunk_rows == {1 << 20: 8, 96: 1, 288: 3}[chunk_bytes]
    assert written["zarr"].keys() == written[pipeline].keys()
    assert any(name.startswith("image/tokens/c") for name in written["zarr"])  # shard files were written
    different = [name for name in written["zarr"] if written["zarr"][name] != written[pipeline][name]]
    if pipeline == "raw" or chunk_bytes == 1 << 20:  # one inner chunk per shard: nothing to reorder
        assert not different
    else:
        assert all(name.startswith("image/tokens/c/") for name in different)
    reference, store = TokenStore.open(tmp_path / "zarr"), TokenStore.open(tmp_path / pipeline)
    np.testing.assert_array_equal(store.image_tokens(slice(None)), reference.image_tokens(slice(None)))
    rows = store.rows()
    assert len(rows) == 23 and store.is_complete
    # Rows hold the batch rows in order: row i of a tar is batch row i % 5.
    first = store.blocks[0]
    np.testing.assert_array_equal(store.image_tokens(slice(first.row_start, first.row_start + 5)), tokens.numpy())
    np.testing.assert_array_equal(store.image_embed(slice(first.row_start + 5, first.row_start + 8)), embed.numpy()[:3])


def test_raw_shard_files_leave_layouts_they_do_not_know_to_a_codec_pipeline(tmp_path):
    store = make_store(tmp_path / "plain", 8, 1, 6, 8, 4, compress=False)
    assert raw_shard_writer(store._root["image/tokens"]) is not None  # sharded, uncompressed
    assert raw_shard_writer(store._root["image/embed"]) is not None  # plain chunks, uncompressed
    assert raw_shard_writer(store._root["image/valid"]) is not None  # one byte per row: no byte order
    compressed = make_store(tmp_path / "zstd", 8, 1, 6, 8, 4, compress=True)
    assert raw_shard_writer(compressed._root["image/tokens"]) is None
    assert raw_shard_writer(compressed._root["image/embed"]) is None
    # Chunks that split a row: the shard is not its rows' bytes in order.
    split_rows = zarr.create_array(tmp_path / "split.zarr", shape=(8, 6, 8), chunks=(2, 3, 8), shards=(4, 6, 8),
                                   dtype=np.float16, compressors=None)
    assert raw_shard_writer(split_rows) is None
    big_endian = zarr.create_array(tmp_path / "big.zarr", shape=(8, 4), chunks=(4, 4), dtype=">f2", compressors=None,
                                   serializer=zarr.codecs.BytesCodec(endian="big"))
    assert raw_shard_writer(big_endian) is None
    in_memory = zarr.create_array(zarr.storage.MemoryStore(), shape=(8, 4), chunks=(4, 4), dtype=np.float16,
                                  compressors=None)
    assert raw_shard_writer(in_memory) is None


def test_a_raw_shard_write_removes_what_a_killed_write_of_that_shard_left(tmp_path):
    store = make_store(tmp_path / "s", 16, 2, 6, 8, 4, compress=False)
    folder = tmp_path / "s" / "image" / "tokens" / "c"
    (folder / "0" / "0").mkdir(parents=True)
    (folder / "1" / "0").mkdir(parents=True)
    left = [folder / "0" / "0" / ".0.123-abcd1234.partial", folder / "0" / "0" / "0.0f1e2d.partial"]
    other_shard = folder / "1" / "0" / ".0.123-abcd1234.partial"
    for path in [*left, other_shard]:
        path.write_bytes(b"")
    raw_shard_writer(store._root["image/tokens"])(0, np.ones((8, 6, 8), np.float16))
    assert not any(path.exists() for path in left)
    assert other_shard.exists()  # another shard's: its own write removes it
    assert sorted(p.name for p in (folder / "0" / "0").iterdir()) == ["0"]


def test_raw_shard_files_refuse_rows_that_are_not_whole_shards(tmp_path):
    store = make_store(tmp_path / "s", 8, 1, 6, 8, 4, compress=False)
    write = raw_shard_writer(store._root["image/tokens"])
    with pytest.raises(ValueError, match="not whole shards"):
        write(0, np.zeros((3, 6, 8), np.float16))
    with pytest.raises(ValueError, match="not whole shards"):
        write(1, np.zeros((8, 6, 8), np.float16))


# Rows checked all at once, and 1 or 2 rows (30 or 60 bytes) at a time.
@pytest.mark.parametrize("check_bytes", [1 << 20, 30, 60])
def test_finite_rows_agrees_with_numpy_on_every_kind_of_value(monkeypatch, check_bytes):
    monkeypatch.setattr("rankpipe.pipeline.embed.store_writer.FINITE_CHECK_BYTES", check_bytes)
    rng = np.random.default_rng(0)
    tokens = rng.standard_normal((9, 3, 5), dtype=np.float32).astype(np.float16)
    embed = rng.standard_normal((9, 4), dtype=np.float32).astype(np.float16)
    tokens[1, 2, 4] = np.inf
    tokens[2, 0, 0] = -np.inf
    tokens[3, 1, 1] = np.nan
    embed[4, 3] = np.nan
    tokens[5, 0, 0] = np.finfo(np.float16).max  # the largest finite values stay finite
    tokens[6, 0, 0] = -np.finfo(np.float16).max
    tokens[7, 0, 0] = np.finfo(np.float16).smallest_subnormal
    expected = np.isfinite(tokens).all(axis=(1, 2)) & np.isfinite(embed).all(axis=1)
    np.testing.assert_array_equal(finite_rows(tokens, embed), expected)
    assert expected.tolist() == [True, False, False, False, False, True, True, True, True]


def test_a_finiteness_mask_given_with_the_batch_decides_which_rows_are_invalid(tmp_path):
    store = make_store(tmp_path / "s.zarr", 5, 1, 6, 8, 4, False)
    tokens, embed = features(1)
    batch = feature_batch(0, 0, 5, last=True)
    finite = torch.tensor([True, False, True, True, True])  # as the GPU found it
    block = BlockAccumulator(store, 0)
    block.add(EmbeddedBatch(batch, np.arange(5), tokens, embed, finite=finite))
    block.finish("")
    store = TokenStore.open(tmp_path / "s.zarr")
    assert store.valid()[:5].tolist() == [True, False, True, True, True]
    assert store.errors()[1] == NON_FINITE_REASON
    assert not store.image_tokens(np.array([1])).any()  # zeros, like every invalid row
    np.testing.assert_array_equal(store.image_tokens(np.array([0, 2, 3, 4])), tokens.numpy()[[0, 2, 3, 4]])


def run_now(fn, *args, **kwargs) -> Future:
    """A pool's `submit` that writes at once: every buffer is free again before the next shard starts."""
    future = Future()
    future.set_result(fn(*args, **kwargs))
    return future


@pytest.mark.parametrize("threads", [0, 1, 2, "now"])
def test_a_shard_buffer_used_again_keeps_no_rows_of_the_shard_before(tmp_path, threads):
    # 4-row shards: 12 rows in 3 shards, so every buffer after the first ones held another shard's rows.
    store = make_store(tmp_path / "s.zarr", 11, 1, 6, 8, 4, False, chunk_bytes=96, shard_bytes=4 * 96)
    assert store.shard_rows == 4
    tokens, embed = (torch.cat([f, f + 1]) for f in features(2))  # [10, 6, 8], [10, 4]
    tokens[6, 0, 0] = np.inf  # row 6: invalid, in the last buffer
    pool = ThreadPoolExecutor(threads) if isinstance(threads, int) and threads else None
    submit = run_now if threads == "now" else pool.submit if pool else None
    block = BlockAccumulator(store, 0, submit, "raw")
    # Rows 0-3 and 4-7 in one batch each, then row 9 alone (row 8 unread: its sample has no image).
    block.add(EmbeddedBatch(feature_batch(0, 0, 4, last=False), np.arange(4), tokens[:4], embed[:4]))
    block.add(EmbeddedBatch(feature_batch(0, 4, 4, last=False), np.arange(4, 8), tokens[4:8], embed[4:8]))
    block.add(EmbeddedBatch(feature_batch(0, 8, 3, last=True), np.array([9]), tokens[9:10], embed[9:10]))
    block.finish("")
    if pool:
        pool.shutdown()
    store = TokenStore.open(tmp_path / "s.zarr")
    expected_valid = [True] * 6 + [False, True, False, True, False, False]
    assert store.valid().tolist() == expected_valid
    expected = np.zeros((12, 6, 8), np.float16)
    for row in np.flatnonzero(expected_valid):
        expected[row] = tokens[row].numpy()
    np.testing.assert_array_equal(store.image_tokens(slice(None)), expected)
    expected_embed = np.where(np.array(expected_valid)[:, None], embed.numpy()[np.minimum(np.arange(12), 9)], 0)
    np.testing.assert_array_equal(store.image_embed(slice(None)), expected_embed)


def test_codec_pipeline_names_resolve_or_say_what_to_do(monkeypatch):
    assert resolve_codec_pipeline("zarr") == "zarr"
    assert resolve_codec_pipeline("raw") == "raw"
    assert resolve_codec_pipeline("auto") == "raw"
    with pytest.raises(InputError, match="unknown codec pipeline 'rust'"):
        resolve_codec_pipeline("rust")
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)  # as where zarrs is not installed
    assert resolve_codec_pipeline("auto") == "raw"
    with pytest.raises(InputError, match=r"pip install 'rankpipe\[zarrs\]'"):
        resolve_codec_pipeline("zarrs")
