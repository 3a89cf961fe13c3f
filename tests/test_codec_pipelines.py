"""The store's shard writes: the zarrs codec pipeline writes the bytes zarr-python's writes, and the
writer's finiteness check agrees with numpy's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from rankpipe.benchmarks.synthetic_store import feature_batch, feed_writer, make_store
from rankpipe.errors import InputError
from rankpipe.pipeline.codec_pipelines import codec_pipeline_available, resolve_codec_pipeline
from rankpipe.pipeline.embed.store_writer import NON_FINITE_REASON, BlockAccumulator, EmbeddedBatch, finite_rows
from rankpipe.pipeline.store import TokenStore


def store_files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def features(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    return (torch.from_numpy(rng.standard_normal((5, 6, 8), dtype=np.float32).astype(np.float16)),  # [B, P, D]
            torch.from_numpy(rng.standard_normal((5, 4), dtype=np.float32).astype(np.float16)))  # [B, E]


@pytest.mark.parametrize("compress", [False, True])
def test_zarrs_writes_the_same_store_bytes_as_zarr_python(tmp_path, compress):
    pytest.importorskip("zarrs")
    tokens, embed = features(0)
    written = {}
    for pipeline in ("zarr", "zarrs"):
        # 23 images in 3 tars: the last batch of each tar is short and the last shard has padding rows.
        store = make_store(tmp_path / pipeline, 23, 3, 6, 8, 4, compress)
        feed_writer(store, tokens, embed, write_threads=2, codec_pipeline=pipeline)
        written[pipeline] = store_files(tmp_path / pipeline)
    assert written["zarr"].keys() == written["zarrs"].keys()
    assert any(name.startswith("image/tokens/c") for name in written["zarr"])  # shard files were written
    different = [name for name in written["zarr"] if written["zarr"][name] != written["zarrs"][name]]
    assert not different
    store = TokenStore.open(tmp_path / "zarrs")
    rows = store.rows()
    assert len(rows) == 23 and store.is_complete
    # Rows hold the batch rows in order: row i of a tar is batch row i % 5.
    first = store.blocks[0]
    np.testing.assert_array_equal(store.image_tokens(slice(first.row_start, first.row_start + 5)), tokens.numpy())
    np.testing.assert_array_equal(store.image_embed(slice(first.row_start + 5, first.row_start + 8)), embed.numpy()[:3])


def test_finite_rows_agrees_with_numpy_on_every_kind_of_value():
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


def test_codec_pipeline_names_resolve_or_say_what_to_do(monkeypatch):
    assert resolve_codec_pipeline("zarr") == "zarr"
    assert resolve_codec_pipeline("auto") == ("zarrs" if codec_pipeline_available("zarrs") else "zarr")
    with pytest.raises(InputError, match="unknown codec pipeline 'rust'"):
        resolve_codec_pipeline("rust")
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)  # as where zarrs is not installed
    assert resolve_codec_pipeline("auto") == "zarr"
    with pytest.raises(InputError, match=r"pip install 'rankpipe\[zarrs\]'"):
        resolve_codec_pipeline("zarrs")
