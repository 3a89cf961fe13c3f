"""benchmarks/rank_store.py at its smallest: each timing covers the images it claims, and the table says so."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rankpipe.adapter.evaluation.rank import RankConfig
from rankpipe.benchmarks import rank_store as bench
from rankpipe.pipeline.embed.backbone import TINY_VIT, BackboneSpec
from rankpipe.pipeline.store import TokenStore


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> bench.Setup:
    folder = tmp_path_factory.mktemp("rank_bench")
    return bench.build(folder, 50, 3, (64, 48), BackboneSpec(TINY_VIT, "none"), "cpu", 16, 0, "small")


def test_the_collection_is_unlabelled_and_the_checkpoint_fits_it(setup):
    store = TokenStore.open(setup.store)
    assert store.label_names == [] and int(store.valid().sum()) == 50 and len(store.blocks) == 3
    assert TokenStore.open(setup.train_store).provenance == store.provenance
    assert setup.pattern(1).endswith("collection-000000.tar") and setup.pattern().endswith("{000000..000002}.tar")


def test_each_timing_covers_the_images_it_claims(setup, monkeypatch):
    config = RankConfig((bench.TRAINED, bench.UNSEEN), batch_size=16)
    alone = bench.AdapterOnly(setup, config, "cpu", images=40)
    assert alone.images == 40 and [len(b) for b in alone.batches] == [16, 16, 8]
    scored = []
    real = type(alone.loaded.ranker).score
    monkeypatch.setattr(type(alone.loaded.ranker), "score", lambda self, f, q: scored.append(len(f)) or real(self, f, q))
    assert alone.rate() > 0 and sum(scored) == 40
    rate, result = bench.store_rate(setup, config, "cpu", memory_mb=64)
    assert rate > 0 and result.ranked == result.images_scored == 50 and result.score_rate > 0
    assert result.blocks_scored == 3 and result.blocks_reused == 0
    assert np.isfinite(result.ranking.combined).all() and [q.label for q in result.ranking.queries] == ["score", None]
    rate, count = bench.images_rate(setup, config, "cpu", tars=2)
    assert rate > 0 and count == 34  # tars of 17, 17 and 16 images


def test_main_prints_the_table(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(bench.tempfile, "TemporaryDirectory", lambda: _Folder(tmp_path))
    bench.main(["--images", "30", "--tars", "2", "--image-source-size", "64x48", "--adapter", "small",
                "--batch-size", "8", "--decode-workers", "0", "--repeats", "2", "--images-subset", "10"])
    lines = capsys.readouterr().out.splitlines()
    rows = {line.strip().split("  ")[0]: line for line in lines}
    for key in ("rank --store img/s", "scoring img/s", "adapter-only img/s", "rank --images img/s",
                "scoring / adapter-only", "store / images"):
        assert key in rows, lines
    assert "(30 images, memory 1024 MB)" in rows["rank --store img/s"]
    assert "(15 images, 0 decode workers)" in rows["rank --images img/s"]  # whole tars: one of two tars of 15
    assert "cpu, tokens fp16, fp32 compute" in rows["device, dtype"] and "(target >= 0.8)" in rows["scoring / adapter-only"]


class _Folder:
    """A TemporaryDirectory stand-in that leaves its folder for the test to look at."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> str:
        return str(self.path)

    def __exit__(self, *exc) -> None:
        return None
