"""The released optimiser and sampling: AdamW groups, uniform queries, inverse-frequency images,
zero-count negatives, resume, and old checkpoints that predate these settings."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rankpipe.adapter.evaluation.scoring import load_checkpoint, predict
from rankpipe.adapter.model.adapter import RankingAdapter
from rankpipe.adapter.model.config import AdapterConfig
from rankpipe.adapter.model.encoder import PaperFusionBlock
from rankpipe.adapter.training.checkpoint import saved_run_config
from rankpipe.adapter.training.features import BatchSampler, build_features
from rankpipe.adapter.training.loop import train_from_store
from rankpipe.adapter.training.optimizer import make_optimizer
from rankpipe.adapter.training.run_config import OptimConfig, RunConfig
from rankpipe.errors import InputError
from rankpipe.pipeline.data.manifest import LabelSpec, Manifest, TargetTransform
from rankpipe.pipeline.store import TextFeatures

from conftest import (
    STREAMED,
    SYNTHETIC_PROVENANCE,
    Interrupted,
    interrupted_then_resumed,
    stop_at,
    tiny_config,
    weights,
    write_store_rows,
    write_synthetic_store,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def write_count_store(path, n: int = 120, seed: int = 0):
    """Two count labels on disjoint images ("cats" on even rows, "dogs" on odd), counts 1..6 written
    into token channel 0 (cats) or 1 (dogs); every third row is val."""
    rng = np.random.default_rng(seed)
    P, D, L, Dt = 4, 16, 6, 12
    counts = rng.integers(1, 7, n).astype(np.float32)
    cats = np.where(np.arange(n) % 2 == 0, counts, np.nan).astype(np.float32)
    dogs = np.where(np.arange(n) % 2 == 1, counts, np.nan).astype(np.float32)
    tokens = rng.normal(0, 1, (n, P, D))
    tokens[:, :, 0] += np.nan_to_num(cats)[:, None] / 3
    tokens[:, :, 1] += np.nan_to_num(dogs)[:, None] / 3
    manifest = Manifest(name="counts", shards="x-{000000..000001}.tar",
                        labels=(LabelSpec("cats", "Sort images by the number of cats."),
                                LabelSpec("dogs", "Sort images by the number of dogs.")))
    texts = {label.query: TextFeatures(tokens=rng.normal(0, 1, (L, Dt)).astype(np.float16), length=4,
                                       embed=np.zeros(8, np.float16)) for label in manifest.labels}
    columns = {"tokens": tokens, "keys": np.array([f"img{i:04d}" for i in range(n)]), "valid": np.ones(n, bool),
               "splits": np.where(np.arange(n) % 3 == 2, "val", "train")}
    return write_store_rows(path, SYNTHETIC_PROVENANCE, manifest, texts, [n // 2, n - n // 2], columns,
                            {"cats": cats, "dogs": dogs}, tars_made_by=f"counts{seed}")


def test_optimizer_leaves_biases_and_norm_gains_undecayed_and_uses_amsgrad():
    model = RankingAdapter(AdapterConfig(d_model=16, heads=2), 8, 8)
    optimizer = make_optimizer(model, OptimConfig(weight_decay=0.05))
    undecayed, decayed = optimizer.param_groups
    assert undecayed["weight_decay"] == 0.0 and decayed["weight_decay"] == 0.05
    assert {id(p) for p in undecayed["params"]} == {id(p) for p in model.parameters() if p.ndim == 1}
    assert {id(p) for p in decayed["params"]} == {id(p) for p in model.parameters() if p.ndim >= 2}
    assert all(group["amsgrad"] for group in optimizer.param_groups)
    every = make_optimizer(model, OptimConfig(decay_norms_and_biases=True, amsgrad=False)).param_groups
    assert len(every) == 1 and len(every[0]["params"]) == len(list(model.parameters())) and not every[0]["amsgrad"]


def test_released_sampler_draws_queries_uniformly_and_rare_labels_as_often_as_common():
    released = BatchSampler([300, 100], batch_size=1, seed=3, device="cpu", sampling="released")
    choices = np.array([released.query_for(s) for s in range(1, 4001)])
    assert abs((choices == 0).mean() - 0.5) < 0.03
    targets = torch.tensor([0.0] * 90 + [1.0] * 10)  # a rare label value on 10 of 100 images
    rare = np.mean([int(released.draw(targets)[0][0]) >= 90 for _ in range(4000)])
    assert abs(rare - 0.5) < 0.03  # each value's images together as likely as the other's
    proportional = BatchSampler([300, 100], batch_size=1, seed=3, device="cpu")
    assert abs(np.mean([int(proportional.draw(targets)[0][0]) >= 90 for _ in range(4000)]) - 0.1) < 0.03
    own, _ = BatchSampler([100], 8, 0, "cpu", sampling="released").draw(targets)
    assert own.shape == (8,) and len(set(own.tolist())) == 8


def test_negatives_fill_the_released_share_of_the_batch():
    sampler = BatchSampler([50], batch_size=10, seed=0, device="cpu", negative_share=0.2)
    own, negatives = sampler.draw(torch.arange(50.0), pool_size=30)
    assert own.shape == (8,) and len(set(own.tolist())) == 8 and negatives.shape == (2,) and negatives.max() < 30
    own, negatives = sampler.draw(torch.arange(5.0), pool_size=30)  # few own images: negatives fill the batch
    assert own.shape == (5,) and negatives.shape == (5,)
    own, negatives = sampler.draw(torch.arange(50.0), pool_size=0)
    assert own.shape == (10,) and negatives.shape == (0,)


def test_a_batchs_negatives_are_other_labels_images_with_the_normalised_zero_count():
    transform = TargetTransform()
    features = build_features(
        torch.arange(12.0).reshape(12, 1, 1), np.array([f"k{i}" for i in range(12)]),
        [dict(name="cats", query="q", text_tokens=np.zeros((2, 3)), transform=transform, train_rows=[0, 1, 2, 3],
              val_rows=[4, 5], train_labels=np.array([1.0, 2, 3, 4]), val_labels=np.array([1.0, 2])),
         dict(name="dogs", query="q", text_tokens=np.zeros((2, 3)), transform=transform, train_rows=[3, 6, 7, 8],
              val_rows=[9, 10], train_labels=np.array([1.0, 1, 2, 5]), val_labels=np.array([1.0, 2]))],
        "cpu",
    )
    sampler = BatchSampler(features.train_sizes, batch_size=8, seed=0, device="cpu", negative_share=0.5)
    for step in range(1, 30):
        batch = features.train_batch(step, sampler)
        query = features.queries[batch.query_index]
        own = set(query.train_index.tolist())
        rows, targets = batch.rows.tolist(), batch.targets.tolist()
        negatives = [(r, t) for r, t in zip(rows, targets) if r not in own]
        other = {1: {0, 1, 2}, 0: {6, 7, 8}}[batch.query_index]  # row 3 carries both labels: never a negative
        zero = (0 - query.scale.mean) / query.scale.std
        assert len(rows) == 8 and len(negatives) == 4
        assert all(r in other and t == pytest.approx(zero) for r, t in negatives)
        assert torch.equal(batch.image_tokens[:, 0, 0], batch.rows.float())


@pytest.mark.parametrize("budget", [(), STREAMED], ids=["resident", "streamed"])
def test_released_sampling_resumes_like_an_uninterrupted_run(tmp_path, budget):
    store = write_count_store(tmp_path / "counts.zarr")
    share = () if budget else ("train.negative_share=0.2",)
    config = tiny_config("train.max_steps=40", "train.sampling=released", "optim.grad_clip=0", *share, *budget)
    full = train_from_store(store, tmp_path / "full", config)

    resumed = interrupted_then_resumed(store, tmp_path / "cut", config)
    a, b = weights(full.last_path), weights(resumed.last_path)
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = train_from_store(store, tmp_path / "proportional", tiny_config("train.max_steps=40", *budget))
    assert not torch.equal(weights(other.last_path)["regression_head.mlp.out.weight"], a["regression_head.mlp.out.weight"])


def test_negatives_are_refused_for_non_counts_a_single_label_and_a_streamed_store(tmp_path):
    synthetic = write_synthetic_store(tmp_path / "synthetic.zarr")  # "count" is uniform in [0, 10): not integers
    with pytest.raises(InputError, match="not a non-negative integer"):
        train_from_store(synthetic, tmp_path / "a", tiny_config("train.negative_share=0.2"))
    counts = write_count_store(tmp_path / "counts.zarr")
    with pytest.raises(InputError, match="only one label"):
        train_from_store(counts, tmp_path / "b", tiny_config("train.negative_share=0.2"), labels=["cats"])
    with pytest.raises(InputError, match="resident"):
        train_from_store(counts, tmp_path / "c", tiny_config("train.negative_share=0.2", *STREAMED))
    assert not any((tmp_path / name).exists() for name in "abc")


def old_form(config_json: str, dropout: float) -> str:
    """A run config as saved before fusion_block, the two dropouts and the optimiser switches existed."""
    data = json.loads(config_json)
    for name in ("fusion_block", "fusion_dropout", "plain_dropout"):
        del data["adapter"][name]
    data["adapter"]["dropout"] = dropout
    for name in ("amsgrad", "decay_norms_and_biases"):
        del data["optim"][name]
    return json.dumps(data)


def test_a_config_saved_before_the_switches_keeps_what_it_was_trained_with():
    config = RunConfig.from_json(old_form(RunConfig().to_json(), dropout=0.1))
    assert config.adapter.fusion_block == "paper"
    assert config.adapter.fusion_dropout == config.adapter.plain_dropout == 0.1
    assert not config.optim.amsgrad and config.optim.decay_norms_and_biases
    assert RunConfig.from_json(RunConfig().to_json()) == RunConfig()  # a current one is read as it is


def test_an_old_checkpoint_loads_as_the_paper_blocks_and_scores_as_before(tmp_path):
    store = write_synthetic_store(tmp_path / "synthetic.zarr")
    config = tiny_config("train.max_steps=20", "adapter.fusion_block=paper", "adapter.plain_dropout=0",
                         "optim.amsgrad=false", "optim.decay_norms_and_biases=true")
    result = train_from_store(store, tmp_path / "run", config)
    payload = torch.load(result.best_path, weights_only=True)
    payload["run_config"] = old_form(payload["run_config"], dropout=0.0)
    torch.save(payload, tmp_path / "old.pt")
    old, new = load_checkpoint(tmp_path / "old.pt"), load_checkpoint(result.best_path)
    assert old.run_config == new.run_config
    assert all(isinstance(b, PaperFusionBlock) for b in old.ranker.model.encoder.blocks)
    rows = np.arange(10)
    np.testing.assert_array_equal(predict(old, store, "count", rows), predict(new, store, "count", rows))


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_an_old_run_resumes_with_the_optimiser_it_was_trained_with(tmp_path, dropout):
    """With dropout too: the process generator state an old last.pt holds is restored, and the run
    continues with the keyed masks of its seed and steps."""
    store = write_synthetic_store(tmp_path / "synthetic.zarr")
    config = tiny_config("train.max_steps=40", "adapter.fusion_block=paper", "adapter.plain_layers=1",
                         f"adapter.plain_dropout={dropout}", f"adapter.fusion_dropout={dropout}",
                         "optim.amsgrad=false", "optim.decay_norms_and_biases=true")
    full = train_from_store(store, tmp_path / "full", config)

    with pytest.raises(Interrupted):
        train_from_store(store, tmp_path / "cut", config, progress=stop_at(20))
    last = tmp_path / "cut" / "last.pt"
    payload = torch.load(last, weights_only=True)
    payload["run_config"] = old_form(payload["run_config"], dropout=dropout)
    payload["rng"] = {"torch": torch.Generator().manual_seed(99).get_state()}  # where old dropout draws left it
    torch.save(payload, last)
    resumed = train_from_store(store, tmp_path / "cut", saved_run_config(last), resume=True)
    a, b = weights(full.last_path), weights(resumed.last_path)
    assert all(torch.equal(a[k], b[k]) for k in a)
