"""Prompt-learning baselines (CoOp, OrdinalCLIP, L2RCLIP): rank classes, training through the frozen
text tower, checkpoints that `rankpipe eval` reads, and L2RCLIP's losses on hand-computed cases."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from rankpipe.adapter.baselines import get_method
from rankpipe.adapter.baselines.data import load_label_splits
from rankpipe.adapter.baselines.fit import method_config, train_baseline
from rankpipe.adapter.baselines.l2rclip import (
    asymmetric_contrastive,
    ordinal_pairwise,
    ordinal_weights,
)
from rankpipe.adapter.baselines.ordinalclip import interpolation_weights, rank_kl
from rankpipe.adapter.baselines.prompt_learning import (
    FrozenTextTower,
    rank_classes,
    train_prompts,
)
from rankpipe.adapter.baselines.prompts import PromptEncoder
from rankpipe.adapter.evaluation.scoring import load_checkpoint
from rankpipe.cli.main import cli
from rankpipe.errors import InputError
from rankpipe.pipeline.labelled_store import LabelledStore
from rankpipe.pipeline.store import TokenStore

from conftest import assert_rank_matches_store, embedding_scores

METHODS = ["coop", "ordinalclip", "l2rclip"]
# Tiny and short: enough steps to move the prompts, few enough for the CPU.
FAST = ["steps=12", "batch_size=8", "context_tokens=4"]
SQUARE_CLASSES = (0.0, 1.0, 2.0, 3.0, 4.0, 5.0)


@pytest.fixture(scope="module")
def store(tiny_store):
    return TokenStore.open(tiny_store)


@pytest.fixture(scope="module")
def manifest(store):
    """The store's manifest with 'squares' declared ordinal over its classes 0..5 ('brightness' stays continuous)."""
    labels = tuple(
        dataclasses.replace(label, metric="ordinal", classes=SQUARE_CLASSES) if label.name == "squares" else label
        for label in store.manifest.labels
    )
    return dataclasses.replace(store.manifest, labels=labels)


@pytest.fixture(scope="module")
def fitted(store, manifest, tmp_path_factory):
    out = tmp_path_factory.mktemp("prompt_baselines")
    return {m: train_baseline(store, out / m, m, FAST, manifest=manifest) for m in METHODS}


@pytest.fixture(scope="module")
def tower(store):
    return FrozenTextTower(PromptEncoder(store.provenance))


@pytest.mark.parametrize("method", METHODS)
def test_trains_and_predicts_in_label_units(store, manifest, fitted, method):
    loaded = load_checkpoint(fitted[method].path)  # weights_only loading
    assert loaded.method == method
    for split in load_label_splits(LabelledStore.open(store, manifest, ["squares", "brightness"])):
        params = loaded.ranker.baseline.label_params(split.name)
        values = params["values"].numpy()
        assert params["final_loss"] < params["first_loss"]
        pred = embedding_scores(loaded, split.name, split.val_embed)
        assert pred.shape == (len(split.val_targets),) and np.isfinite(pred).all()
        # An expectation over class values lies between the smallest and largest class.
        assert values.min() - 1e-9 <= pred.min() and pred.max() <= values.max() + 1e-9
        probs = loaded.ranker.baseline.class_probabilities(split.name, split.val_embed)
        np.testing.assert_allclose(pred, probs @ values, rtol=1e-12)
        np.testing.assert_array_equal(loaded.ranker.baseline.predict_class(split.name, split.val_embed), values[probs.argmax(1)])
    np.testing.assert_array_equal(loaded.ranker.baseline.label_params("squares")["values"].numpy(), SQUARE_CLASSES)
    assert set(loaded.val_srcc) == {"squares", "brightness"}


@pytest.mark.parametrize("method", METHODS)
def test_rankpipe_eval_reads_the_checkpoint(tiny_store, fitted, method, tmp_path):
    result = CliRunner().invoke(cli, ["eval", "--store", str(tiny_store), "--checkpoint", str(fitted[method].path),
                                      "--split", "test", "--bootstrap", "20", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    queries = json.loads((tmp_path / "results.json").read_text())["queries"]
    assert {q["label"] for q in queries} == {"squares", "brightness"}


@pytest.mark.parametrize("method", METHODS)
def test_rankpipe_rank_scores_like_the_store(store, fitted, method):
    assert_rank_matches_store(fitted[method].path, store, "brightness")


@pytest.mark.parametrize("method", METHODS)
def test_gradient_reaches_the_learned_tokens_not_the_tower(store, manifest, tower, method):
    cls = get_method(method)
    config = method_config(cls, ["steps=3", "batch_size=8", "context_tokens=4", "lr=0.01"])
    split = load_label_splits(LabelledStore.open(store, manifest, ["brightness"]))[0]
    classes = rank_classes(split, config.num_bins)
    learned = cls.build(config, classes, tower, torch.Generator().manual_seed(0))
    before_learned = {k: v.detach().clone() for k, v in learned.named_parameters()}
    before_tower = {k: v.detach().clone() for k, v in tower.model.state_dict().items()}
    train_prompts(learned, tower, split, classes, config, cls.loss_fn(config), method)
    for name, value in learned.named_parameters():
        assert not torch.equal(value, before_learned[name]), name
    for name, value in tower.model.state_dict().items():
        assert torch.equal(value, before_tower[name]), name
    assert all(p.grad is None for p in tower.model.parameters())


@pytest.mark.parametrize("method", METHODS)
def test_class_embeddings_come_from_the_learned_prompts(store, manifest, tower, method):
    """The saved class embeddings are the trained prompts through the tower, so eval needs no backbone."""
    cls = get_method(method)
    config = method_config(cls, FAST)
    split = load_label_splits(LabelledStore.open(store, manifest, ["squares"]))[0]
    fitted = cls.fit(config, [split], PromptEncoder(store.provenance))
    params = fitted.label_params("squares")
    learned = cls.build(config, rank_classes(split, config.num_bins), tower, torch.Generator())
    learned.load_state_dict(params["learned"])
    with torch.no_grad():
        np.testing.assert_allclose(learned(tower).numpy(), params["class_embeds"].numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_learned_blocks_take_the_places_after_sos(store, manifest, tower, method):
    """with_context puts the M context tokens, then each further learned block, after [SOS]; the rest stays."""
    cls = get_method(method)
    config = method_config(cls, FAST)
    split = load_label_splits(LabelledStore.open(store, manifest, ["squares"]))[0]
    learned = cls.build(config, rank_classes(split, config.num_bins), tower, torch.Generator().manual_seed(0))
    k, m = learned.tokens.shape[0], config.context_tokens
    block = torch.randn(k, 1, tower.width, generator=torch.Generator().manual_seed(1))  # [K, 1, D]
    with torch.no_grad():
        tokens = learned.with_context(learned.tokens, block)  # [K, L, D]
    assert tokens.shape == learned.tokens.shape
    assert torch.equal(tokens[:, :1], learned.tokens[:, :1])
    assert torch.equal(tokens[:, 1 : 1 + m], learned.context.detach().expand(k, -1, -1))
    assert torch.equal(tokens[:, 1 + m], block[:, 0])
    assert torch.equal(tokens[:, 2 + m :], learned.tokens[:, 2 + m :])


def test_encode_matches_open_clip_for_plain_tokens(tower):
    """With no learned tokens the tower reproduces open_clip's encode_text (cut sequences included)."""
    texts = ["a photo of 3 squares.", "a bright photo."]
    ids = tower.tokenize(texts)
    with torch.no_grad():
        ours = tower.encode(tower.embed_tokens(ids), ids)
        theirs = tower.model.encode_text(tower.tokenizer(texts))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_bins", [2, 4])
def test_continuous_labels_are_binned_by_frequency(store, manifest, num_bins):
    split = load_label_splits(LabelledStore.open(store, manifest, ["brightness"]))[0]
    split = dataclasses.replace(split, train_targets=np.arange(8.0))
    classes = rank_classes(split, num_bins)
    size = 8 // num_bins
    np.testing.assert_array_equal(classes.train_class, np.arange(8) // size)
    np.testing.assert_allclose(classes.values, [np.arange(k * size, (k + 1) * size).mean() for k in range(num_bins)])


def test_ordinal_classes_and_tied_bins(store, manifest):
    split = load_label_splits(LabelledStore.open(store, manifest, ["squares"]))[0]
    classes = rank_classes(split, 3)  # ordinal: the manifest's classes, whatever the bin count
    np.testing.assert_array_equal(classes.values, SQUARE_CLASSES)
    np.testing.assert_array_equal(classes.values[classes.train_class], split.train_targets)
    tied = dataclasses.replace(split, classes=None, train_targets=np.array([1.0, 1, 1, 1, 1, 1, 2, 3]))
    # Quartile edges 1, 1, 1.25: the three bins at or below 1 hold only the first bin's ties, so two remain.
    classes = rank_classes(tied, 4)
    np.testing.assert_array_equal(classes.values, [1.0, 2.5])
    np.testing.assert_array_equal(classes.train_class, [0, 0, 0, 0, 0, 0, 1, 1])
    with pytest.raises(InputError, match=r"has 1 class on the train split \(of 1\)"):
        rank_classes(dataclasses.replace(tied, train_targets=np.ones(8)), 4)
    # Six classes in the manifest, but every train image in one: nothing to rank between.
    one_class = dataclasses.replace(split, train_targets=np.full(len(split.train_targets), SQUARE_CLASSES[2]))
    with pytest.raises(InputError, match=r"label 'squares' has 1 class on the train split \(of 6\); prompt "
                                         "learning needs train images of at least 2 classes"):
        rank_classes(one_class, 3)


SQUARE_NAMES = ("none", "one", "two", "three", "four", "five")


def test_manifest_class_names_name_the_prompts(store, manifest, tower):
    """CoOp and L2RCLIP write the manifest's class names into their prompts; without them, the values."""
    labels = tuple(dataclasses.replace(label, class_names=SQUARE_NAMES) if label.name == "squares" else label
                   for label in manifest.labels)
    named = dataclasses.replace(manifest, labels=labels)
    split = load_label_splits(LabelledStore.open(store, named, ["squares"]))[0]
    assert rank_classes(split, 3).names == list(SQUARE_NAMES)
    plain = load_label_splits(LabelledStore.open(store, manifest, ["squares"]))[0]
    assert rank_classes(plain, 3).names == ["0", "1", "2", "3", "4", "5"]
    # Classes listed in any order are sorted by value, each keeping its name.
    shuffled = dataclasses.replace(split, classes=SQUARE_CLASSES[::-1], class_names=SQUARE_NAMES[::-1])
    values, names = shuffled.named_classes()
    np.testing.assert_array_equal(values, SQUARE_CLASSES)
    assert names == list(SQUARE_NAMES)
    context = " ".join(["X"] * 4)
    for method, template in (("coop", "{name}."), ("l2rclip", "a photo of {name}.")):
        cls = get_method(method)
        learned = cls.build(method_config(cls, FAST), rank_classes(split, 3), tower, torch.Generator().manual_seed(0))
        expected = tower.tokenize([f"{context} {template.format(name=n)}" for n in SQUARE_NAMES])
        assert torch.equal(learned.ids, expected), method


def test_coop_and_ordinalclip_default_to_their_papers_context_length():
    assert method_config(get_method("coop"), []).context_tokens == 16
    ordinalclip = method_config(get_method("ordinalclip"), [])
    assert (ordinalclip.context_tokens, ordinalclip.base_ranks, ordinalclip.interpolation, ordinalclip.kl_weight) == (10, 3, "linear", 1.0)


@pytest.mark.parametrize("interpolation", ["linear", "inv_prop", "normal"])
@pytest.mark.parametrize("num_ranks, num_base", [(2, 2), (5, 3), (8, 3), (8, 4), (4, 9)])
def test_interpolation_weights_match_the_closed_form(num_ranks, num_base, interpolation):
    """Every base rank weighs in, by its distance from the rank, each row normalised to 1."""
    decay = {"linear": lambda d: 1 - d / (num_ranks - 1), "inv_prop": lambda d: 1 / (d + 1e-5),
             "normal": lambda d: math.exp(-d * d)}[interpolation]
    expected = np.zeros((num_ranks, num_base))
    for k in range(num_ranks):
        for b in range(num_base):
            expected[k, b] = decay(abs(k - b * (num_ranks - 1) / (num_base - 1)))
        expected[k] /= expected[k].sum()
    weights = interpolation_weights(num_ranks, num_base, interpolation).numpy()
    np.testing.assert_allclose(weights, expected, rtol=1e-6)
    assert (weights >= 0).all()


def test_linear_interpolation_reaches_past_the_neighbours():
    # Rank 1 of 5 with base ranks at 0, 2, 4: distances 1, 1, 3 -> 1 - d/4 = 3/4, 3/4, 1/4, normalised.
    weights = interpolation_weights(5, 3).numpy()
    np.testing.assert_allclose(weights[1], [3 / 7, 3 / 7, 1 / 7], rtol=1e-6)
    np.testing.assert_allclose(weights[0], [1 / 1.5, 0.5 / 1.5, 0], rtol=1e-6)  # the far end's weight is 0


def test_rank_kl_by_direct_computation():
    """KL(label || prediction) per rank present in the batch, over the images, averaged over those ranks."""
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 4, generator=generator, dtype=torch.float64) * 3
    target = torch.tensor([0, 2, 2, 0, 3, 2])  # rank 1 absent
    total, present = 0.0, 0
    for k in range(4):
        positives = (target == k).double().numpy()
        if positives.sum() == 0:
            continue
        present += 1
        label = np.exp(10 * positives) / np.exp(10 * positives).sum()
        column = logits[:, k].numpy()
        prediction = np.exp(column - column.max()) / np.exp(column - column.max()).sum()
        total += float((label * (np.log(label) - np.log(prediction))).sum())
    assert present == 3
    assert rank_kl(logits, target).item() == pytest.approx(total / present, rel=1e-10)
    # OrdinalCLIP's loss: the cross-entropy over the rank prompts plus kl_weight times that term.
    cross_entropy = -np.mean([torch.log_softmax(logits[i], 0)[target[i]].item() for i in range(6)])
    for weight in (1.0, 0.5):
        config = method_config(get_method("ordinalclip"), [f"kl_weight={weight}"])
        loss = get_method("ordinalclip").loss_fn(config)(logits, target, torch.arange(4.0))
        assert loss.item() == pytest.approx(cross_entropy + weight * total / present, rel=1e-10)


def test_asymmetric_contrastive_by_hand():
    logits = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, 3.0]], dtype=torch.float64)
    target = torch.tensor([0, 0, 1])
    image_to_text = -(math.log(math.exp(2) / (math.exp(2) + 1)) + math.log(0.5) + math.log(math.exp(3) / (1 + math.exp(3)))) / 3
    col0 = math.exp(2) + math.exp(1) + 1  # rank 0 over the images: positives are images 0 and 1
    rank0 = -(math.log(math.exp(2) / col0) + math.log(math.exp(1) / col0)) / 2
    col1 = 1 + math.exp(1) + math.exp(3)
    rank1 = -math.log(math.exp(3) / col1)
    expected = (image_to_text + (rank0 + rank1) / 2) / 2
    assert asymmetric_contrastive(logits, target).item() == pytest.approx(expected, rel=1e-12)
    # A rank absent from the batch adds nothing to the text->image term.
    wider = torch.cat([logits, torch.zeros(3, 1, dtype=torch.float64)], dim=1)
    i2t = -torch.log_softmax(wider, 1)[torch.arange(3), target].mean().item()
    assert asymmetric_contrastive(wider, target).item() == pytest.approx((i2t + (rank0 + rank1) / 2) / 2, rel=1e-12)


def test_ordinal_pairwise_by_hand():
    values = torch.tensor([0.0, 1.0, 4.0], dtype=torch.float64)
    np.testing.assert_allclose(ordinal_weights(values).numpy(), [[1, 1.25, 2], [1.25, 1, 1.75], [2, 1.75, 1]])
    logits = torch.tensor([[1.0, 0.0, 2.0], [0.5, 0.5, 0.5]], dtype=torch.float64)
    target = torch.tensor([0, 2])
    first = -math.log(math.e / (math.e + 1.25 + 2 * math.exp(2)))
    second = -math.log(1 / (2 + 1.75 + 1))  # equal similarities: only the weights matter
    assert ordinal_pairwise(logits, target, values).item() == pytest.approx((first + second) / 2, rel=1e-12)
    # Distant ranks cost more than near ones at equal similarity.
    near = ordinal_pairwise(torch.tensor([[0.0, 1.0, 0.0]]), torch.tensor([0]), values.float())
    far = ordinal_pairwise(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([0]), values.float())
    assert far > near


@pytest.mark.parametrize("method", METHODS)
def test_settings_come_from_set(method):
    config = method_config(get_method(method), ["context_tokens=2", "num_bins=5", "lr=0.1"])
    assert (config.context_tokens, config.num_bins, config.lr) == (2, 5, 0.1)
    with pytest.raises(InputError):
        method_config(get_method(method), ["num_bins=1"])
