"""`rankpipe rank --store`: a whole token store ranked from its cached tokens.

The checkpoint is conftest's tiny adapter (rankpipe-tiny-vit, random weights, seed 0). An unlabelled
collection is made the way a user makes one (the tiny shards' images as files, `rankpipe shards`
without --label, `rankpipe embed`), and ranking it from the store must give what `rank --images`
gives on the same files, and what `eval` predicts on a labelled store.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from click.testing import CliRunner
from scipy import stats

from rankpipe.adapter.evaluation import score_folder
from rankpipe.adapter.evaluation.evaluate import EvalConfig, evaluate
from rankpipe.adapter.evaluation.exports import read_table
from rankpipe.adapter.evaluation.rank import RankConfig, rank_images
from rankpipe.adapter.evaluation.rank_outputs import KIND, write_ranking
from rankpipe.adapter.evaluation.ranking import ScoreStats
from rankpipe.adapter.evaluation.scoring import load_checkpoint
from rankpipe.adapter.evaluation.store_blocks import PIECES_HELD, feature_bytes, piece_rows
from rankpipe.adapter.evaluation.store_rank import StoreReadConfig, rank_store
from rankpipe.cli.main import cli
from rankpipe.errors import InputError
from rankpipe.pipeline.cluster import ClusterSpec, open_client
from rankpipe.pipeline.data.manifest import load_manifest
from rankpipe.pipeline.data.shards import ShardsConfig, prepare_shards
from rankpipe.pipeline.embed.backbone import TINY_VIT, BackboneSpec
from rankpipe.pipeline.embed.job import embed, manifest_for_pattern
from rankpipe.pipeline.store import TokenStore

from conftest import TINY_LABELS, encode, read_tar_samples, tiny_image

QUERY = {label.name: label.query for label in TINY_LABELS}
UNSEEN = "Sort images by the number of circles."
BOTH = RankConfig((QUERY["squares"], UNSEEN), weights=(0.7, 0.3))

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def photos(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny shards' 36 images as files, one folder per tar."""
    root = tmp_path_factory.mktemp("photos")
    for t in range(3):
        (root / f"roll{t}").mkdir()
        for sample in read_tar_samples(str(tiny_shards.parent / f"tiny-{t:06d}.tar")):
            ext = "png" if "png" in sample else "jpg"
            (root / f"roll{t}" / f"{sample['__key__']}.{ext}").write_bytes(sample[ext])
    return root


@pytest.fixture(scope="module")
def archive(photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The photos as an unlabelled collection: `rankpipe shards` without --label (3 tars), then embedded."""
    root = tmp_path_factory.mktemp("archive")
    prepare_shards(ShardsConfig(input=photos, out_dir=root / "shards", labels=(), queries=(), samples_per_tar=12)).write()
    store = root / "archive.zarr"
    embed(load_manifest(root / "shards" / "manifest.yaml"), store, BackboneSpec(TINY_VIT, "none", seed=0),
          batch_size=8, workers=0, progress=False)
    return store


@pytest.fixture(scope="module")
def damaged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An unlabelled store of json-less tars with two samples that hold no decodable image."""
    root = tmp_path_factory.mktemp("damaged")
    rng = np.random.default_rng(7)
    for t in range(2):
        with wds.TarWriter(str(root / f"crawl-{t:06d}.tar")) as sink:
            for i in range(6):
                image = b"\xff\xd8\xff not a jpeg" if (t, i) in ((0, 2), (1, 5)) else encode(tiny_image(rng, i % 4))
                sink.write({"__key__": f"c{t}-{i}", "jpg": image})
    store = root / "crawl.zarr"
    embed(manifest_for_pattern(str(root / "crawl-{000000..000001}.tar"), []), store, BackboneSpec(TINY_VIT, "none", seed=0),
          batch_size=4, workers=0, progress=False)
    return store


def by(ranking, keys, values) -> dict[str, float]:
    return {str(k): float(v) for k, v in zip(keys, values)}


def test_a_collection_ranks_from_its_store_as_its_images_rank(tiny_checkpoint, archive, photos):
    from_store = rank_store(tiny_checkpoint, archive, BOTH, StoreReadConfig(full=True), device="cpu")
    from_images = rank_images(tiny_checkpoint, str(photos), BOTH)
    ranking = from_store.ranking
    assert from_store.ranked == 36 and from_store.invalid == 0 and ranking.skipped == []
    # The store names each image by the path `rankpipe shards` packed it from; `rank --images` by its path in the folder.
    assert sorted(ranking.sources.tolist()) == sorted(from_images.keys.tolist())
    for q_store, q_images in zip(ranking.queries, from_images.queries):
        assert (q_store.label, q_store.query) == (q_images.label, q_images.query)
        got, expected = by(ranking, ranking.sources, q_store.scores), by(from_images, from_images.keys, q_images.scores)
        np.testing.assert_allclose([got[k] for k in expected], list(expected.values()), rtol=1e-5, atol=1e-6)
        assert np.std(q_store.scores) > 0
    got, expected = by(ranking, ranking.sources, ranking.combined), by(from_images, from_images.keys, from_images.combined)
    np.testing.assert_allclose([got[k] for k in expected], list(expected.values()), rtol=1e-5, atol=1e-6)
    assert ranking.sources[ranking.order()].tolist() == from_images.keys[from_images.order()].tolist()
    assert all(path.endswith(".tar") and Path(path).is_file() for path in ranking.paths)


def test_a_labelled_store_ranks_as_eval_predicts(tiny_checkpoint, tiny_store):
    loaded = load_checkpoint(tiny_checkpoint)
    results = evaluate(loaded, TokenStore.open(tiny_store), EvalConfig(split="test", batch_size=256))
    ranking = rank_store(tiny_checkpoint, tiny_store, RankConfig((QUERY["squares"], QUERY["brightness"])),
                         StoreReadConfig(full=True), device="cpu").ranking
    assert len(ranking.keys) == 36
    for q, result in zip(ranking.queries, results.queries):
        got, expected = by(ranking, ranking.keys, q.scores), by(None, result.ranking.keys, result.ranking.scores)
        assert len(expected) == 9
        np.testing.assert_allclose([got[k] for k in expected], list(expected.values()), rtol=1e-5, atol=1e-6)


def test_a_store_larger_than_the_memory_budget_streams(tiny_checkpoint, archive, monkeypatch):
    store = TokenStore.open(archive)
    per_row = feature_bytes(store, "tokens")
    budget_mb = 4 * PIECES_HELD * per_row / 2**20  # pieces of 4 rows
    assert store.num_rows * per_row > 2 * budget_mb * 2**20  # the store does not fit the budget
    reads: list[int] = []
    real = TokenStore.image_tokens

    def counted(self, rows):
        values = real(self, rows)
        reads.append(len(values))
        return values

    config = RankConfig(BOTH.queries, BOTH.weights, batch_size=4)
    whole = rank_store(tiny_checkpoint, archive, config, StoreReadConfig(full=True), device="cpu").ranking
    monkeypatch.setattr(TokenStore, "image_tokens", counted)
    streamed = rank_store(tiny_checkpoint, archive, config, StoreReadConfig(memory_mb=budget_mb, full=True),
                          device="cpu").ranking
    assert piece_rows(store, "tokens", budget_mb) == 4
    assert reads == [4] * 9  # three tars of 12 samples, read 4 rows at a time, each once
    np.testing.assert_array_equal(streamed.keys, whole.keys)
    np.testing.assert_array_equal(streamed.combined, whole.combined)
    with pytest.raises(InputError, match="cannot hold 3 images"):
        rank_store(tiny_checkpoint, archive, config, StoreReadConfig(memory_mb=budget_mb / 8), device="cpu")


@pytest.mark.parametrize("keep", [1, 5, 18, 40])
def test_without_a_file_only_both_ends_are_kept_with_their_ranks(tiny_checkpoint, archive, keep):
    whole = rank_store(tiny_checkpoint, archive, BOTH, StoreReadConfig(full=True), device="cpu").ranking
    ends = rank_store(tiny_checkpoint, archive, BOTH, StoreReadConfig(keep=keep, memory_mb=0.05), device="cpu")
    order = whole.order()
    kept = order if 2 * keep >= 36 else np.concatenate([order[:keep], order[-keep:]])
    assert ends.ranked == 36 and len(ends.ranking.keys) == len(kept)
    assert ends.ranking.keys[ends.ranking.order()].tolist() == whole.keys[kept].tolist()
    assert ends.ranking.ranks()[ends.ranking.order()].tolist() == whole.ranks()[kept].tolist()
    np.testing.assert_allclose(ends.ranking.combined[ends.ranking.order()], whole.combined[kept], rtol=1e-6)


def test_invalid_rows_are_counted_and_listed(tiny_checkpoint, damaged):
    result = rank_store(tiny_checkpoint, damaged, RankConfig((UNSEEN,)), StoreReadConfig(full=True), device="cpu")
    assert (result.ranked, result.invalid) == (10, 2)
    assert [(s.key, "unreadable image" in s.reason) for s in result.ranking.skipped] == [("c0-2", True), ("c1-5", True)]
    assert all(s.path.endswith(".tar") for s in result.ranking.skipped)
    ends = rank_store(tiny_checkpoint, damaged, RankConfig((UNSEEN,)), StoreReadConfig(keep=2), device="cpu")
    assert (ends.ranked, ends.invalid, ends.ranking.skipped) == (10, 2, [])


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".jsonl"])
def test_the_store_ranking_round_trips_through_every_format(tiny_checkpoint, damaged, tmp_path, suffix):
    ranking = rank_store(tiny_checkpoint, damaged, BOTH, StoreReadConfig(full=True), device="cpu").ranking
    back = read_table(write_ranking(tmp_path / f"r{suffix}", ranking), KIND)
    order = ranking.order()
    if suffix == ".jsonl":  # per-query scores come back as one object per record
        objects = back.pop("scores")
        for q in BOTH.queries:
            back[f"score[{q}]"] = [None if s is None else s[q] for s in objects]
    assert [None if r in (None, "") else int(r) for r in back["rank"]] == list(range(1, 11)) + [None, None]
    assert [str(k) for k in back["key"]] == ranking.keys[order].tolist() + ["c0-2", "c1-5"]
    assert [str(p) for p in back["path"]] == [*ranking.paths[order].tolist(), *(s.path for s in ranking.skipped)]
    assert [str(s or "") for s in back["source"]] == [""] * 12
    assert [float(v) for v in back["score"][:10]] == ranking.combined[order].tolist()
    for i, q in enumerate(BOTH.queries):
        assert [float(v) for v in back[f"score[{q}]"][:10]] == ranking.queries[i].scores[order].tolist()
        assert all(v in (None, "") for v in back[f"score[{q}]"][10:])
    assert all("unreadable image" in str(e) for e in back["error"][10:]) and all(e in ("", None) for e in back["error"][:10])


def test_a_checkpoint_of_another_backbone_is_refused(tiny_checkpoint, archive, tmp_path):
    payload = torch.load(tiny_checkpoint, weights_only=True)
    payload["provenance"] = {**payload["provenance"], "seed": 1}
    other = tmp_path / "seed1.pt"
    torch.save(payload, other)
    with pytest.raises(InputError, match="embedded with another backbone than checkpoint .* 'seed' differs"):
        rank_store(other, archive, BOTH, device="cpu")
    result = CliRunner().invoke(cli, ["rank", "--store", str(archive), "--checkpoint", str(other), "--query", UNSEEN])
    assert result.exit_code == 2 and "another backbone" in result.output
    assert not list(archive.parent.glob("*.rank-*"))


def test_a_killed_run_resumes_and_workers_rank_as_one_process(tiny_checkpoint, archive, tmp_path, monkeypatch):
    work = tmp_path / "work"
    read = StoreReadConfig(full=True, work_dir=work)
    reference = rank_store(tiny_checkpoint, archive, BOTH, StoreReadConfig(full=True), device="cpu").ranking
    assert not work.exists()
    real_write = score_folder.ScoreFolder.write

    def killed_after_one_block(self, block, rows, scores):
        real_write(self, block, rows, scores)
        raise KeyboardInterrupt  # the run dies after its first tar's scores are on disk

    monkeypatch.setattr(score_folder.ScoreFolder, "write", killed_after_one_block)
    with pytest.raises(KeyboardInterrupt):
        rank_store(tiny_checkpoint, archive, BOTH, read, device="cpu")
    monkeypatch.undo()
    assert sorted(p.name for p in work.iterdir()) == ["block-000000.npz", "run.json"]
    with open_client(ClusterSpec(local_workers=2)) as client:
        resumed = rank_store(tiny_checkpoint, archive, BOTH, read, device="cpu", client=client)
        fresh = rank_store(tiny_checkpoint, archive, BOTH, StoreReadConfig(full=True), device="cpu", client=client)
    assert (resumed.blocks_reused, resumed.blocks_scored) == (1, 2)
    assert (fresh.blocks_reused, fresh.blocks_scored) == (0, 3)
    assert not work.exists()  # removed once the ranking is merged
    for result in (resumed.ranking, fresh.ranking):
        assert result.keys[result.order()].tolist() == reference.keys[reference.order()].tolist()
        np.testing.assert_array_equal(result.combined, reference.combined)
        for q, ref in zip(result.queries, reference.queries):
            np.testing.assert_array_equal(q.scores, ref.scores)


def test_a_work_folder_of_another_run_is_refused(tiny_checkpoint, archive, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "run.json").write_text(json.dumps({"queries": ["another"]}))
    with pytest.raises(InputError, match="holds the block scores of another ranking"):
        rank_store(tiny_checkpoint, archive, BOTH, StoreReadConfig(work_dir=work), device="cpu")
    (work / "run.json").unlink()
    (work / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="does not hold rankpipe rank scores"):
        rank_store(tiny_checkpoint, archive, BOTH, StoreReadConfig(work_dir=work), device="cpu")
    assert sorted(p.name for p in work.iterdir()) == ["notes.txt"]
    with pytest.raises(InputError, match="is a file"):
        rank_store(tiny_checkpoint, archive, BOTH, StoreReadConfig(work_dir=work / "notes.txt"), device="cpu")


def test_a_score_folder_that_cannot_be_written_is_an_input_error(tiny_checkpoint, archive, tmp_path, monkeypatch):
    def read_only(path, text):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(score_folder, "write_text_atomic", read_only)
    with pytest.raises(InputError, match="pass --work-dir on a writable filesystem"):
        rank_store(tiny_checkpoint, archive, BOTH, StoreReadConfig(work_dir=tmp_path / "scores"), device="cpu")


def test_cli_ranks_a_store_into_parquet_and_contact_sheets(tiny_checkpoint, archive, tmp_path):
    import pyarrow.parquet as pq

    out, report = tmp_path / "archive-squares.parquet", tmp_path / "report"
    args = ["rank", "--store", str(archive), "--checkpoint", str(tiny_checkpoint), "--query", QUERY["squares"],
            "--query", UNSEEN, "--weight", "0.7", "--weight", "0.3", "--top", "4", "--out", str(out),
            "--report", str(report), "--device", "cpu", "--memory-mb", "0.1"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert f"ranked 36 images of store {archive}; 0 samples hold no image" in result.output
    table = pq.read_table(out)
    assert table.num_rows == 36 and table.column("rank").to_pylist() == list(range(1, 37))
    lines = result.output.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split() == ["rank", "score", "key", "image"])
    shown = [line.split() for line in lines[header + 1: header + 5]]
    assert [row[2] for row in shown] == table.column("key").to_pylist()[:4]
    assert [row[3] for row in shown] == table.column("source").to_pylist()[:4]  # roll0/t0-0003.jpg ...
    for name in ("top.png", "bottom.png"):
        assert (report / name).stat().st_size > 1000  # thumbnails read back from the tars the store records
    assert "image not found" not in result.output


@pytest.mark.parametrize("extra, message", [
    (["--images", "x"], "either --images (new images) or --store"),
    (["--workers", "2"], "--workers does not apply to --store"),
    (["--memory-mb", "0"], "need --memory-mb > 0"),
    (["--cluster", "remote:3"], "not of the form local:N"),
    (["--out", "r.xlsx"], "use a file name ending in"),
    (["--query", QUERY["squares"]], "a --query is repeated"),
])
def test_bad_store_options_exit_2(tiny_checkpoint, archive, tmp_path, extra, message):
    args = ["rank", "--store", str(archive), "--checkpoint", str(tiny_checkpoint), "--query", QUERY["squares"], *extra]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_store_options_are_refused_with_images(tiny_checkpoint, photos):
    for extra in (["--cluster", "local:2"], ["--memory-mb", "10"], ["--work-dir", "w"]):
        args = ["rank", "--images", str(photos), "--checkpoint", str(tiny_checkpoint), "--query", UNSEEN, *extra]
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 2 and "does not apply to --images" in result.output, result.output
    result = CliRunner().invoke(cli, ["rank", "--checkpoint", str(tiny_checkpoint), "--query", UNSEEN])
    assert result.exit_code == 2 and "not both or neither" in result.output


def test_score_stats_accumulated_by_blocks_equal_the_whole():
    rng = np.random.default_rng(0)
    scores = np.stack([rng.normal(1e3, 0.5, 1000), rng.uniform(-5, 5, 1000)])  # [2, 1000]
    accumulated = ScoreStats(2)
    for start in range(0, 1000, 137):
        accumulated.add(scores[:, start:start + 137])
    accumulated.add(scores[:, :0])
    assert accumulated.count == 1000
    np.testing.assert_allclose(accumulated.mean, scores.mean(axis=1), rtol=1e-14)
    np.testing.assert_allclose(accumulated.std, scores.std(axis=1), rtol=1e-11)
    np.testing.assert_allclose(stats.zscore(scores[1])[:3], (scores[1, :3] - accumulated.mean[1]) / accumulated.std[1])


def test_a_baseline_ranks_a_store_from_its_pooled_embeddings(tiny_store, tmp_path):
    from rankpipe.adapter.baselines.fit import train_baseline
    from rankpipe.adapter.evaluation.scoring import predict

    fitted = train_baseline(TokenStore.open(tiny_store), tmp_path / "zero-shot", "zero-shot")
    ranking = rank_store(fitted.path, tiny_store, RankConfig((QUERY["squares"],)), StoreReadConfig(full=True),
                         device="cpu").ranking
    store = TokenStore.open(tiny_store)
    rows = store.rows()
    expected = by(None, store.keys()[rows], predict(load_checkpoint(fitted.path), store, "squares", rows))
    got = by(ranking, ranking.keys, ranking.queries[0].scores)
    np.testing.assert_allclose([got[k] for k in expected], list(expected.values()), rtol=1e-6)
    with pytest.raises(InputError, match="scores only the queries it was fitted on"):
        rank_store(fitted.path, tiny_store, RankConfig((UNSEEN,)), device="cpu")
