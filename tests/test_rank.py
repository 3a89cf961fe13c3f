"""`rankpipe rank`: new images through the recorded backbone and a tiny trained adapter.

The checkpoint is trained for a few steps on the tiny store of conftest (rankpipe-tiny-vit, random
weights, seed 0); ranking the store's own images through `rank` must give the scores `predict` gives
on the store.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from click.testing import CliRunner
from scipy import special, stats

from rankpipe.adapter.evaluation.rank import RankConfig, rank_images
from rankpipe.adapter.evaluation.rank_outputs import query_lines, write_ranking
from rankpipe.adapter.evaluation.ranking import QueryScores, Ranking, combine_scores
from rankpipe.adapter.evaluation.scoring import load_checkpoint, predict
from rankpipe.cli.main import cli
from rankpipe.errors import InputError
from rankpipe.pipeline.data.image_inputs import open_images
from rankpipe.pipeline.embed import weights as weights_module
from rankpipe.pipeline.embed.backbone import TINY_VIT, BackboneSpec, load_backbone
from rankpipe.pipeline.store import TokenStore

from conftest import TINY_LABELS, read_tar_samples

QUERY = {label.name: label.query for label in TINY_LABELS}
UNSEEN = "Sort images by the number of circles."


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint: Path) -> Path:
    """best.pt of a tiny adapter trained 10 steps on both labels of the tiny store."""
    return tiny_checkpoint


@pytest.fixture(scope="module")
def shard_pattern(tiny_shards: Path) -> str:
    return str(tiny_shards.parent / "tiny-{000000..000002}.tar")


@pytest.fixture(scope="module")
def image_folder(shard_pattern: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny shards' images as files in one sub-folder per tar, plus a damaged JPEG and a text file."""
    root = tmp_path_factory.mktemp("rank_images")
    for t, url in enumerate(open_images(shard_pattern).items):
        (root / f"tar{t}").mkdir()
        for sample in read_tar_samples(url):
            ext = "png" if "png" in sample else "jpg"
            (root / f"tar{t}" / f"{sample['__key__']}.{ext}").write_bytes(sample[ext])
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def seed0_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A weights file holding exactly the random seed-0 weights of rankpipe-tiny-vit."""
    path = tmp_path_factory.mktemp("weights") / "tiny-seed0.pt"
    torch.save(load_backbone(BackboneSpec(TINY_VIT, "none", seed=0)).model.state_dict(), path)
    return path


def by_key(ranking, query_index: int = 0, key=lambda k: k) -> dict[str, float]:
    return {key(k): float(s) for k, s in zip(ranking.keys, ranking.queries[query_index].scores)}


def store_scores(checkpoint: Path, store_path: Path, label: str) -> dict[str, float]:
    store = TokenStore.open(store_path)
    rows = store.rows()
    scores = predict(load_checkpoint(checkpoint), store, label, rows)
    return dict(zip(store.keys()[rows].tolist(), scores.tolist()))


def with_provenance(checkpoint: Path, out: Path, **changes) -> Path:
    """A copy of the checkpoint whose recorded backbone provenance has `changes`."""
    payload = torch.load(checkpoint, weights_only=True)
    payload["provenance"] = {**payload["provenance"], **changes}
    torch.save(payload, out)
    return out


@pytest.mark.parametrize("label", ["squares", "brightness"])
@pytest.mark.parametrize("batch_size", [5, 64])
def test_rank_on_shards_matches_predict_on_the_store(checkpoint, tiny_store, shard_pattern, label, batch_size):
    ranking = rank_images(checkpoint, shard_pattern, RankConfig((QUERY[label],), batch_size=batch_size))
    expected = store_scores(checkpoint, tiny_store, label)
    got = by_key(ranking)
    assert sorted(got) == sorted(expected) and len(got) == 36
    assert ranking.queries[0].label == label and ranking.queries[0].in_label_units
    np.testing.assert_allclose([got[k] for k in expected], list(expected.values()), rtol=1e-5, atol=1e-6)
    # One query: the combined score is that query's score, and ranks follow it.
    np.testing.assert_array_equal(ranking.combined, ranking.queries[0].scores)
    ordered = ranking.combined[ranking.order()]
    assert np.all(np.diff(ordered) <= 0)
    assert sorted(ranking.ranks().tolist()) == list(range(1, 37))
    assert ranking.skipped == []


@pytest.mark.parametrize("workers", [0, 2])
def test_rank_on_a_folder_skips_unreadable_images(checkpoint, tiny_store, image_folder, workers):
    ranking = rank_images(checkpoint, str(image_folder), RankConfig((QUERY["squares"],), batch_size=8, workers=workers))
    assert len(ranking.keys) == 36
    assert all(k.startswith("tar") and k.endswith((".jpg", ".png")) for k in ranking.keys)
    assert all(Path(p).is_file() for p in ranking.paths)
    assert [(s.key, "unreadable image" in s.reason) for s in ranking.skipped] == [("broken.jpg", True)]
    expected = store_scores(checkpoint, tiny_store, "squares")
    got = by_key(ranking, key=lambda k: Path(k).stem)
    np.testing.assert_allclose([got[k] for k in expected], list(expected.values()), rtol=1e-5, atol=1e-6)


def test_an_unseen_query_scores_raw_through_the_text_tower(checkpoint, shard_pattern):
    loaded = load_checkpoint(checkpoint)
    backbone = load_backbone(BackboneSpec(TINY_VIT, "none", seed=0))
    # The rebuilt text tower reproduces the tokens the adapter was trained with, bit for bit.
    for label in loaded.labels.values():
        text = backbone.encode_text(label.query)
        torch.testing.assert_close(torch.from_numpy(text.tokens[: text.length]).float(), label.text_tokens, rtol=0, atol=0)
    ranking = rank_images(checkpoint, shard_pattern, RankConfig((UNSEEN, QUERY["squares"])))
    unseen, known = ranking.queries
    assert unseen.label is None and not unseen.in_label_units and known.in_label_units
    assert np.isfinite(unseen.scores).all() and unseen.scores.std() > 0
    assert not np.allclose(unseen.scores, known.scores)


@pytest.mark.parametrize("weights", [(0.5, 0.5), (0.7, 0.3), (1.0, -2.0)])
def test_combine_sum_is_a_weighted_sum_of_z_scores(weights):
    rng = np.random.default_rng(0)
    scores = np.stack([rng.normal(3, 2, 50), rng.uniform(-100, 100, 50)])  # [2, 50] in different units
    combined = combine_scores(scores, np.asarray(weights), "sum")
    expected = weights[0] * stats.zscore(scores[0]) + weights[1] * stats.zscore(scores[1])
    np.testing.assert_allclose(combined, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("weights", [(0.5, 0.5), (0.7, 0.3), (1.0, -2.0)])
def test_combine_product_is_a_weighted_product_of_squashed_z_scores(weights):
    rng = np.random.default_rng(1)
    scores = np.stack([rng.normal(3, 2, 50), rng.uniform(-100, 100, 50)])  # [2, 50]
    combined = combine_scores(scores, np.asarray(weights))
    product = special.expit(stats.zscore(scores[0])) ** weights[0] * special.expit(stats.zscore(scores[1])) ** weights[1]
    np.testing.assert_allclose(np.exp(combined), product, rtol=1e-12)


def test_product_does_not_reward_two_below_average_scores():
    # Image 0 is below average on both queries; image 1 is the best on A and average on B.
    scores = np.array([[-1.0, 2.0, 0.0, -1.0], [-1.0, 0.0, 2.0, -1.0]])
    z = stats.zscore(scores, axis=1)
    assert z[0, 0] < 0 and z[1, 0] < 0
    assert (z[0, 0] * z[1, 0]) > (z[0, 1] * z[1, 1])  # multiplying raw z-scores would get this wrong
    combined = combine_scores(scores, np.array([0.5, 0.5]))
    assert combined[1] > combined[0] and combined[2] > combined[0]


def test_combine_edge_cases():
    scores = np.array([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])
    # A constant query contributes nothing; z of [1, 2, 3] is [-1.2247, 0, 1.2247].
    np.testing.assert_allclose(combine_scores(scores, np.array([2.0, 10.0]), "sum"), 2 * stats.zscore(scores[0]))
    # One query keeps its own units.
    np.testing.assert_array_equal(combine_scores(scores[:1] * 7, np.array([1.0])), [7.0, 14.0, 21.0])
    # A constructed case where the weights decide the winner: image 0 is best by query A, image 1 by B.
    ab = np.array([[10.0, 0.0, 5.0], [0.0, 10.0, 5.0]])
    assert np.argmax(combine_scores(ab, np.array([0.7, 0.3]))) == 0
    assert np.argmax(combine_scores(ab, np.array([0.3, 0.7]))) == 1
    with pytest.raises(ValueError, match="one weight per query"):
        combine_scores(ab, np.array([1.0]))


def test_two_queries_combine_by_the_documented_rule(checkpoint, shard_pattern):
    config = RankConfig((QUERY["squares"], QUERY["brightness"]), weights=(0.7, 0.3))
    ranking = rank_images(checkpoint, shard_pattern, config)
    squares, brightness = (q.scores for q in ranking.queries)
    expected = 0.7 * np.log(special.expit(stats.zscore(squares))) + 0.3 * np.log(special.expit(stats.zscore(brightness)))
    np.testing.assert_allclose(ranking.combined, expected, rtol=1e-10)
    # Each query's own scores are unchanged by the combination (the same as a one-query ranking).
    alone = rank_images(checkpoint, shard_pattern, RankConfig((QUERY["brightness"],)))
    np.testing.assert_allclose([by_key(alone)[k] for k in ranking.keys], brightness, rtol=1e-6)
    equal = rank_images(checkpoint, shard_pattern, RankConfig((QUERY["squares"], QUERY["brightness"])))
    np.testing.assert_allclose(equal.weights, [0.5, 0.5])


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_ranking_files_list_every_image(checkpoint, image_folder, tmp_path, suffix):
    queries = (QUERY["squares"], UNSEEN)
    ranking = rank_images(checkpoint, str(image_folder), RankConfig(queries, weights=(2.0, 1.0)))
    path = write_ranking(tmp_path / f"r{suffix}", ranking)
    if suffix == ".csv":
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
        assert list(rows[0]) == ["rank", "key", "path", "source", "score", *(f"score[{q}]" for q in queries), "error"]
        ranks = [int(r["rank"]) if r["rank"] else None for r in rows]
        per_query = [[float(r[f"score[{q}]"]) for r in rows[:36]] for q in queries]
        scores = [float(r["score"]) for r in rows[:36]]
    else:
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        ranks = [r["rank"] for r in rows]
        per_query = [[r["scores"][q] for r in rows[:36]] for q in queries]
        scores = [r["score"] for r in rows[:36]]
    assert ranks == list(range(1, 37)) + [None]
    assert rows[-1]["key"] == "broken.jpg" and "unreadable image" in rows[-1]["error"]
    order = ranking.order()
    assert [r["key"] for r in rows[:36]] == ranking.keys[order].tolist()
    np.testing.assert_array_equal(scores, ranking.combined[order])
    for q, values in enumerate(per_query):
        np.testing.assert_array_equal(values, ranking.queries[q].scores[order])


def test_cli_ranks_a_folder_and_writes_a_report(checkpoint, image_folder, tmp_path):
    out, report = tmp_path / "rankings.csv", tmp_path / "report"
    args = ["rank", "--checkpoint", str(checkpoint), "--images", str(image_folder), "--query", QUERY["squares"],
            "--query", UNSEEN, "--weight", "0.7", "--weight", "0.3", "--top", "4", "--out", str(out), "--report", str(report)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "label units of 'squares'" in result.output and "raw adapter scores" in result.output
    assert "weight x log sigmoid(z-score)" in result.output  # the default rule, product, is the one described
    assert "ranked 36 images" in result.output and "skipped 1 unreadable" in result.output
    assert "broken.jpg" in result.output
    with out.open(newline="") as f:
        rows = list(csv.DictReader(f))
    lines = result.output.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split() == ["rank", "score", "key", "image"])
    table = lines[header + 1: header + 5]
    assert [line.split()[0] for line in table] == ["1", "2", "3", "4"]
    assert [line.split()[2] for line in table] == [r["key"] for r in rows[:4]]
    for name in ("top.png", "bottom.png"):
        assert (report / name).stat().st_size > 1000


@pytest.mark.parametrize("rule, line", [("product", "weight x log sigmoid(z-score)"), ("sum", "weight x z-score (")])
def test_terminal_names_the_rule_that_combined_the_queries(rule, line):
    queries = [QueryScores("q1", None, np.array([1.0, 2.0])), QueryScores("q2", None, np.array([2.0, 1.0]))]
    ranking = Ranking(np.array(["a", "b"]), np.array(["a", "b"]), queries, np.array([0.5, 0.5]), np.zeros(2), [], rule)
    assert line in query_lines(ranking)[-1]


def test_cli_help_states_the_combination_rule():
    result = CliRunner().invoke(cli, ["rank", "--help"])
    assert result.exit_code == 0
    assert "--backbone-weights" in result.output and "sum_q w_q * log sigmoid(z_q)" in result.output and "--combine" in result.output


@pytest.mark.parametrize(
    "case, message",
    [
        ("empty folder", "holds no"),
        ("missing checkpoint", "does not exist"),
        ("weight count", "1 --weight value(s) for 2 --query"),
        ("zero weights", "every --weight is 0"),
        ("bad out suffix", "use a file name ending in .csv, .jsonl"),
        ("missing tar", "do not exist"),
        ("not images", "neither an existing folder nor a tar pattern"),
        ("nothing readable", "none of the images"),
        ("weights for random backbone", "leave out --backbone-weights"),
    ],
)
def test_bad_inputs_exit_2_with_a_clear_message(checkpoint, image_folder, seed0_weights, tmp_path, case, message):
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"no png")
    args = {"--checkpoint": str(checkpoint), "--images": str(image_folder), "--query": QUERY["squares"]}
    extra: list[str] = []
    if case == "empty folder":
        args["--images"] = str(empty)
    elif case == "missing checkpoint":
        args["--checkpoint"] = str(tmp_path / "nope.pt")
    elif case == "weight count":
        extra = ["--query", QUERY["brightness"], "--weight", "1"]
    elif case == "zero weights":
        extra = ["--query", QUERY["brightness"], "--weight", "0", "--weight", "0"]
    elif case == "bad out suffix":
        extra = ["--out", str(tmp_path / "r.xlsx")]
    elif case == "missing tar":
        args["--images"] = str(tmp_path / "x-{000000..000001}.tar")
    elif case == "not images":
        args["--images"] = str(tmp_path / "photo.jpg")
    elif case == "nothing readable":
        args["--images"] = str(broken)
    elif case == "weights for random backbone":
        extra = ["--backbone-weights", str(seed0_weights)]
    result = CliRunner().invoke(cli, ["rank", *[x for kv in args.items() for x in kv], *extra])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_a_local_weights_file_must_be_passed_and_match_its_hash(checkpoint, shard_pattern, seed0_weights, tmp_path):
    recorded = weights_module.file_sha256(seed0_weights)
    ckpt = with_provenance(checkpoint, tmp_path / "file.pt", pretrained="file", checkpoint_sha256=recorded, seed=None)
    config = RankConfig((QUERY["squares"],))
    with pytest.raises(InputError, match=rf"SHA-256 {recorded}\); pass that file with --backbone-weights PATH"):
        rank_images(ckpt, shard_pattern, config)
    other = tmp_path / "tiny-seed1.pt"
    torch.save(load_backbone(BackboneSpec(TINY_VIT, "none", seed=1)).model.state_dict(), other)
    with pytest.raises(InputError, match="has SHA-256 .* but .* records weights of SHA-256"):
        rank_images(ckpt, shard_pattern, config, backbone_weights=other)
    with pytest.raises(InputError, match="does not exist"):
        rank_images(ckpt, shard_pattern, config, backbone_weights=tmp_path / "missing.pt")
    from_file = rank_images(ckpt, shard_pattern, config, backbone_weights=seed0_weights)
    from_seed = rank_images(checkpoint, shard_pattern, config)
    np.testing.assert_array_equal(from_file.combined, from_seed.combined)


def test_an_offline_pretrained_tag_asks_for_the_weights_file(checkpoint, shard_pattern, seed0_weights, tmp_path, monkeypatch):
    tag = "tiny-tag"
    real = open_clip.get_pretrained_cfg
    monkeypatch.setattr(open_clip, "get_pretrained_cfg",
                        lambda model, t: {"hf_hub": "nobody/rankpipe-tiny/"} if t == tag else real(model, t))
    monkeypatch.setattr(weights_module, "_reachable", lambda host: False)
    ckpt = with_provenance(checkpoint, tmp_path / "tag.pt", pretrained=tag, seed=None)
    config = RankConfig((QUERY["squares"],))
    result = CliRunner().invoke(cli, ["rank", "--checkpoint", str(ckpt), "--images", shard_pattern, "--query", QUERY["squares"]])
    assert result.exit_code == 2, result.output
    assert "could not download" in result.output and "--backbone-weights PATH" in result.output
    # Given the file, the tag's backbone is rebuilt (its preprocessing from the tag) and ranks as the seed did.
    from_file = rank_images(ckpt, shard_pattern, config, backbone_weights=seed0_weights)
    np.testing.assert_array_equal(from_file.combined, rank_images(checkpoint, shard_pattern, config).combined)


def test_rank_config_refuses_bad_values():
    with pytest.raises(InputError, match="at least one"):
        RankConfig(())
    with pytest.raises(InputError, match="repeated"):
        RankConfig(("a", "a"))
    with pytest.raises(InputError, match="finite"):
        RankConfig(("a", "b"), weights=(1.0, float("nan")))
