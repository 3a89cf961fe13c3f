"""Embedding on a dask LocalCluster: equal bytes to a single-process run, resume, a worker killed mid-run."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from rankpipe.cli.main import cli
from rankpipe.errors import InputError
from rankpipe.pipeline.cluster import ClusterSpec, parse_cluster
from rankpipe.pipeline.data.manifest import load_manifest
from rankpipe.pipeline.embed.backbone import TINY_VIT, BackboneSpec
from rankpipe.pipeline.embed.distributed import embed_distributed
from rankpipe.pipeline.embed.job import embed
from rankpipe.pipeline.store import TokenStore

from conftest import write_tiny_shards

distributed = pytest.importorskip("distributed")

TINY = BackboneSpec(TINY_VIT, "none", seed=0)
BATCH = 4


@pytest.fixture(scope="module")
def cluster_client():
    """One LocalCluster of 2 single-threaded worker processes for the whole module."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with distributed.Client(cluster) as client:
            yield client


def store_files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def reference_store(manifest_path: Path, path: Path) -> Path:
    embed(load_manifest(manifest_path), path, TINY, device="cpu", batch_size=BATCH, workers=0, progress=False)
    return path


def test_two_workers_write_the_same_bytes_as_one_process(tmp_path, tiny_shards, cluster_client):
    manifest = load_manifest(tiny_shards)
    summary = embed_distributed(manifest, tmp_path / "dist.zarr", TINY, cluster_client, batch_size=BATCH)
    assert summary.tars_embedded == 3 and summary.tars_skipped == 0
    assert summary.images_embedded + summary.invalid == 36
    reference = reference_store(tiny_shards, tmp_path / "one.zarr")
    assert store_files(tmp_path / "dist.zarr") == store_files(reference)
    assert TokenStore.open(tmp_path / "dist.zarr").is_complete

    again = embed_distributed(manifest, tmp_path / "dist.zarr", TINY, cluster_client, batch_size=BATCH)
    assert again.tars_embedded == 0 and again.tars_skipped == 3
    assert "nothing to do" in again.line()


def test_unfinished_tar_is_redone_whole(tmp_path, tiny_shards, cluster_client):
    path = reference_store(tiny_shards, tmp_path / "partial.zarr")
    expected = store_files(path)
    store = TokenStore.open(path, writable=True)
    # Tar 1 as a killed writer leaves it: garbage rows, no done flag.
    block = store.blocks[1]
    store.write_tokens(block.row_start, np.ones((block.row_stop - block.row_start, *store.image_tokens(slice(0, 1)).shape[1:]),
                                                np.float16), np.ones((block.row_stop - block.row_start, store.image_embed(slice(0, 1)).shape[1]), np.float16))
    store._root["done"][1] = False
    summary = embed_distributed(load_manifest(tiny_shards), path, TINY, cluster_client, batch_size=BATCH)
    assert summary.tars_embedded == 1 and summary.tars_skipped == 2
    assert store_files(path) == expected


def test_killing_a_worker_mid_embed_still_completes_the_store(tmp_path, cluster_client):
    manifest_path = write_tiny_shards(tmp_path / "shards", n_tars=8, per_tar=12, seed=5)
    path = tmp_path / "killed.zarr"
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["summary"] = embed_distributed(load_manifest(manifest_path), path, TINY, cluster_client, batch_size=1)
        except BaseException as e:  # re-raised in the test thread
            outcome["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    pids = cluster_client.run(os.getpid)
    deadline = time.monotonic() + 120
    victim = None
    while victim is None and thread.is_alive():
        assert time.monotonic() < deadline, "no worker ever ran a tar task"
        busy = [addr for addr, keys in cluster_client.processing().items()
                if any("rankpipe-embed-tar" in str(k) for k in keys)]
        done_files = list((path / "done" / "c").glob("*")) if (path / "done" / "c").exists() else []
        if busy and done_files:  # the store exists and a tar is being written right now
            victim = busy[0]
        time.sleep(0.01)
    if victim is not None:
        os.kill(pids[victim], signal.SIGKILL)
    thread.join(timeout=300)
    assert not thread.is_alive()
    if "error" in outcome:
        raise outcome["error"]
    assert victim is not None, "the run ended before a worker could be killed"
    assert TokenStore.open(path).is_complete
    # The nanny replaced the killed worker process.
    cluster_client.wait_for_workers(2, timeout=60)
    assert pids[victim] not in cluster_client.run(os.getpid).values()
    reference = tmp_path / "reference.zarr"
    embed(load_manifest(manifest_path), reference, TINY, device="cpu", batch_size=1, workers=0, progress=False)
    assert store_files(path) == store_files(reference)


@pytest.mark.parametrize("cluster, scheduler, expected", [
    (None, None, None),
    ("local:3", None, ClusterSpec(local_workers=3)),
    (None, "tcp://head:8786", ClusterSpec(scheduler="tcp://head:8786")),
])
def test_parse_cluster(cluster, scheduler, expected):
    assert parse_cluster(cluster, scheduler) == expected


@pytest.mark.parametrize("cluster, scheduler, message", [
    ("local:0", None, "N >= 1"),
    ("local", None, "not of the form local:N"),
    ("ssh:2", None, "not of the form local:N"),
    ("local:2", "tcp://head:8786", "not both"),
])
def test_parse_cluster_user_errors(cluster, scheduler, message):
    with pytest.raises(InputError, match=message):
        parse_cluster(cluster, scheduler)


def test_cli_embed_on_a_local_cluster(tmp_path, tiny_shards):
    store = tmp_path / "cli.zarr"
    result = CliRunner().invoke(cli, ["embed", str(tiny_shards), "--store", str(store), "--model", TINY_VIT,
                                      "--batch-size", str(BATCH), "--cluster", "local:1", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "embedded" in result.output and "from 3 tars" in result.output
    assert store_files(store) == store_files(reference_store(tiny_shards, tmp_path / "one.zarr"))


def test_cli_unreachable_scheduler_exits_2(tmp_path, tiny_shards, monkeypatch):
    monkeypatch.setattr("rankpipe.pipeline.cluster.CONNECT_TIMEOUT_S", 1)
    result = CliRunner().invoke(cli, ["embed", str(tiny_shards), "--store", str(tmp_path / "x.zarr"), "--model", TINY_VIT,
                                      "--scheduler", "tcp://127.0.0.1:9", "--no-progress"])
    assert result.exit_code == 2, result.output
    assert "could not reach the dask scheduler" in result.output
