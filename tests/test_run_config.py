"""Run config: defaults, YAML files, --set overrides with type conversion, and errors that name the field."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from rankpipe.adapter.model.config import AdapterConfig, LossConfig
from rankpipe.adapter.training.run_config import (
    OptimConfig,
    RunConfig,
    TrainConfig,
    load_run_config,
)
from rankpipe.cli.main import cli
from rankpipe.errors import InputError


def test_defaults_follow_the_released_training_command():
    config = load_run_config()
    assert config == RunConfig()
    assert config.optim.lr == 5e-5 and config.optim.weight_decay == 0.01
    assert config.adapter == AdapterConfig() and config.loss == LossConfig()


@pytest.mark.parametrize(
    "override,section,field,value",
    [
        ("optim.lr=1e-4", "optim", "lr", 1e-4),
        ("optim.lr=3", "optim", "lr", 3.0),
        ("train.max_steps=2000", "train", "max_steps", 2000),
        ("train.max_steps=1e3", "train", "max_steps", 1000),
        ("optim.betas=0.8,0.95", "optim", "betas", (0.8, 0.95)),
        ("optim.betas=[0.8, 0.95]", "optim", "betas", (0.8, 0.95)),
        ("adapter.relational_tokens=9", "adapter", "relational_tokens", 9),
        ("adapter.split_dot_product=false", "adapter", "split_dot_product", False),
        ("adapter.pair_checkpoint=yes", "adapter", "pair_checkpoint", True),
        ("adapter.head_hidden=64", "adapter", "head_hidden", 64),
        ("adapter.head_hidden=none", "adapter", "head_hidden", None),
        ("loss.pairwise=hinge", "loss", "pairwise", "hinge"),
        ("train.max_resident_gb=0.5", "train", "max_resident_gb", 0.5),
        ("train.compile=reduce-overhead", "train", "compile", "reduce-overhead"),
    ],
)
def test_set_converts_to_the_field_type(override, section, field, value):
    got = getattr(getattr(load_run_config(overrides=[override]), section), field)
    assert got == value and type(got) is type(value)


def test_dependent_defaults_follow_the_final_value():
    # LossConfig picks its regression form from the pairwise loss unless the form is set itself.
    assert load_run_config(overrides=["loss.pairwise=hinge"]).loss.regression_form == "plain"
    both = load_run_config(overrides=["loss.pairwise=hinge", "loss.regression_form=log"])
    assert both.loss.regression_form == "log" and both.loss.regression_weight == 0.2


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "adapter:\n  d_model: 64\n  heads: 4\n"
        "optim:\n  lr: 1.0e-4\n  betas: [0.9, 0.98]\n"
        "train:\n  batch_size: 32\n  max_steps: 100\n"
    )
    config = load_run_config(path, ["train.max_steps=50", "adapter.d_model=128"])
    assert config.adapter.d_model == 128 and config.adapter.heads == 4
    assert config.optim == OptimConfig(lr=1e-4, betas=(0.9, 0.98))
    assert config.train == TrainConfig(batch_size=32, max_steps=50)
    assert config.differences(RunConfig()) == [
        "adapter.d_model", "adapter.heads", "optim.betas", "optim.lr", "train.batch_size", "train.max_steps",
    ]


def test_json_round_trip_and_resume_base():
    config = load_run_config(overrides=["loss.pairwise=hinge", "optim.betas=0.5,0.6", "adapter.head_hidden=16"])
    assert RunConfig.from_json(config.to_json()) == config
    resumed = load_run_config(overrides=["train.max_steps=99"], base=config)
    assert resumed.differences(config) == ["train.max_steps"]


@pytest.mark.parametrize(
    "override,match",
    [
        ("adapter.widht=3", "unknown field 'adapter.widht'"),
        ("optimizer.lr=1", "unknown field 'optimizer'"),
        ("train.max_steps=ten", "'train.max_steps' expects an integer"),
        ("train.max_steps=2.5", "'train.max_steps' expects an integer"),
        ("optim.lr=fast", "'optim.lr' expects a number"),
        ("adapter.split_dot_product=maybe", "'adapter.split_dot_product' expects true or false"),
        ("optim.betas=0.9", "'optim.betas' expects 2 values"),
        ("adapter.head_hidden=wide", "'adapter.head_hidden' expects int or none"),
        ("loss.pairwise=softmax", "pairwise must be one of"),
        ("optim.lr=-1", "lr must be positive"),
        ("train.batch_size=1", "batch_size must be >= 2"),
        ("adapter.heads=5", "divisible"),
        ("train.compile=max-autotune", "train: compile must be one of off, default, reduce-overhead, not 'max-autotune'"),
        ("train.max_steps", "section.field=value"),
        ("lr=1", "section.field=value"),
        ("optim=3", "section.field=value"),
        ("optim.lr.x=1", "'optim.lr' expects"),
    ],
)
def test_bad_overrides_name_the_problem(override, match):
    with pytest.raises(InputError, match=match):
        load_run_config(overrides=[override])


@pytest.mark.parametrize("batch_size, share, own", [(2, 0.2, 1), (8, 0.9, 0), (10, 0.85, 1)])
def test_negatives_must_leave_a_pair_of_the_label_s_own_images(batch_size, share, own):
    with pytest.raises(InputError, match=rf"negative_share={share} leaves {own} of batch_size={batch_size} images "
                                         "to the label itself; lower negative_share or raise batch_size"):
        load_run_config(overrides=[f"train.batch_size={batch_size}", f"train.negative_share={share}"])
    # Exactly two of its own are enough (10 · 0.8 = 2, with float rounding as the sampler counts).
    assert load_run_config(overrides=["train.batch_size=10", "train.negative_share=0.8"]).train.negative_share == 0.8


@pytest.mark.parametrize(
    "text,match",
    [
        ("adapter: 3\n", "'adapter' is a section"),
        ("- 1\n- 2\n", "must be a mapping"),
        ("train:\n  epochs: 3\n", "unknown field 'train.epochs'"),
        ("optim: {lr: [1]}\n", "'optim.lr' expects a number"),
        ("train:\n  compile: off\n", "'train.compile' expects a string \\(quote it"),
        ("{unclosed\n", "not valid YAML"),
    ],
)
def test_bad_yaml_names_file_and_field(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(InputError, match=match) as info:
        load_run_config(path)
    assert "bad.yaml" in str(info.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_run_config(tmp_path / "nope.yaml")


def test_empty_yaml_file_means_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_run_config(path) == RunConfig()


@pytest.mark.parametrize("override, message", [
    ("optim.lr=nan", "'optim.lr' expects a finite number"),
    ("optim.weight_decay=nan", "'optim.weight_decay' expects a finite number"),
    ("optim.lr=inf", "'optim.lr' expects a finite number"),
    ("train.seed=-1", "seed must be a non-negative integer"),
])
def test_non_finite_numbers_and_negative_seeds_are_input_errors(override, message):
    with pytest.raises(InputError, match=message):
        load_run_config(None, [override])


def test_cli_seed_minus_one_exits_2_without_a_traceback(tmp_path):
    result = CliRunner().invoke(cli, ["train", "--store", str(tmp_path / "s.zarr"), "--out", str(tmp_path / "r"),
                                      "--seed", "-1"])
    assert result.exit_code == 2 and "seed must be a non-negative integer" in result.output
    assert "Traceback" not in result.output
