"""The stage timings of benchmarks/embed_throughput.py process every image they claim to."""


import numpy as np
import pytest

from rankpipe.benchmarks import embed_throughput as bench
from rankpipe.pipeline.data.tars import list_tars
from rankpipe.pipeline.embed.backbone import TINY_VIT, BackboneSpec, load_backbone
from rankpipe.pipeline.embed.decode import TarTask
from rankpipe.pipeline.store import TokenStore


@pytest.fixture(scope="module")
def backbone():
    return load_backbone(BackboneSpec(TINY_VIT, "none"), "cpu")


def test_read_stage_reads_every_image_of_every_tar(backbone, tmp_path):
    manifest = bench.write_tars(tmp_path, 40, 2, (64, 48))
    tars = list_tars(manifest.shard_urls())
    tasks = [TarTask(t, tar.url, tar.count) for t, tar in enumerate(tars)]
    rate, kept = bench.read_throughput(tasks, backbone, batch_size=16, workers=0, jpeg_on_gpu=False)
    assert rate > 0
    assert sum(batch.num_images for batch in kept) == 40
    assert all(batch.images.shape[1:] == (3, *backbone.image_size) for batch in kept)


def test_write_stage_fills_and_finishes_the_store(backbone, tmp_path):
    manifest = bench.write_tars(tmp_path, 37, 2, (64, 48))
    tars = list_tars(manifest.shard_urls())
    rate, megabytes = bench.write_throughput(tmp_path / "w.zarr", manifest, tars, backbone, batch_size=8)
    store = TokenStore.open(tmp_path / "w.zarr")
    assert store.is_complete and rate > 0 and megabytes > 0
    assert int(store.valid().sum()) == 37
    rows = store.rows()
    tokens = store.image_tokens(rows)  # [37, P, D]
    assert tokens.shape == (37, backbone.num_tokens, backbone.token_dim)
    assert np.all(np.abs(tokens).reshape(37, -1).max(axis=1) > 0)  # every row was written, none left at fill
