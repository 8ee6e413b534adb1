"""TrainConfig: precedence of defaults, YAML and flags; errors for unknown keys, wrong types and values."""

from __future__ import annotations

import argparse

import pytest

from cvt.cli.train import add_train_arguments, flags_from_args
from cvt.engine.config import FIELDS, TrainConfig, read_yaml, recipe_names, resolve_config
from cvt.errors import UsageError


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    return parser.parse_args(argv)


def test_defaults_train_tiny_on_digits_into_runs_name():
    cfg = resolve_config(None, {})
    assert (cfg.model, cfg.dataset) == ("cvt_tiny", "digits")
    assert str(cfg.run_dir) == "runs/cvt_tiny-digits"
    assert str(resolve_config(None, {"name": "exp"}).run_dir) == "runs/exp"
    assert str(resolve_config(None, {"name": "exp", "output": "/tmp/x"}).run_dir) == "/tmp/x"


def test_yaml_overrides_defaults_and_flags_override_yaml(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("epochs: 7\nbatch_size: 32\nlr: 1\nmodel_args: {method: avg}\n")
    args = parse(["--config", str(recipe), "--batch-size", "8", "--no-ema", "--model-args", "depth=[1,1,1]"])
    cfg = resolve_config(args.config, flags_from_args(args))
    assert cfg.epochs == 7  # from the YAML
    assert cfg.batch_size == 8  # the flag wins
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)  # YAML int accepted for a float option
    assert cfg.model_args == {"depth": [1, 1, 1]}  # the flag replaces the YAML mapping
    assert cfg.ema is False
    assert cfg.weight_decay == TrainConfig().weight_decay  # untouched default


def test_flags_not_given_do_not_override():
    assert flags_from_args(parse([])) == {}
    assert flags_from_args(parse(["--lr", "0.5", "--scale", "0.5", "1"])) == {"lr": 0.5, "scale": [0.5, 1.0]}


def test_every_option_has_a_flag_of_the_same_name():
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    flags = {a.dest: a.option_strings for a in parser._actions}
    for name in FIELDS:
        assert "--" + name.replace("_", "-") in flags[name]
        assert FIELDS[name].metadata["help"]


def test_help_shows_each_default_that_the_text_does_not_explain():
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    helps = {a.dest: a.help for a in parser._actions}
    defaults = TrainConfig()
    assert helps["epochs"].endswith(f"(default: {defaults.epochs})") and defaults.epochs == 30
    assert helps["lr"].endswith("(default: 0.002)") and helps["scale"].endswith("(default: [0.08, 1.0])")
    assert helps["ema"].endswith("(default: False)")
    # None / empty defaults are described in words ("default: the data set's class count")
    assert "(default:" not in helps["num_classes"] and "default: the data set's" in helps["num_classes"]
    assert "(default:" not in helps["model_args"] and "(default:" not in helps["finetune"]


def test_unknown_yaml_key_suggests_the_close_option(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("batchsize: 32\n")
    with pytest.raises(UsageError, match=r"'batchsize' \(did you mean 'batch_size'\?\)"):
        resolve_config(str(recipe), {})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"epochs": "ten"}, r"'epochs' must be of type int, got 'ten'"),
        ({"epochs": 2.5}, r"'epochs' must be of type int"),
        ({"ema": 1}, r"'ema' must be of type bool"),
        ({"epochs": 0}, r"'epochs' must be > 0, got 0"),
        ({"batch_size": -4}, r"'batch_size' must be > 0, got -4"),
        ({"lr": 0.0}, r"'lr' must be > 0"),
        ({"lr": -1e-3}, r"'lr' must be > 0"),
        ({"optimizer": "adam"}, r"'optimizer' must be one of adamw, sgd, got 'adam'"),
        ({"amp": "fp8"}, r"'amp' must be one of none, bf16, fp16"),
        ({"hflip": 1.5}, r"'hflip' is a probability"),
        ({"overwrite": True, "resume": "auto"}, r"'overwrite' and 'resume' conflict"),
    ],
)
def test_bad_values_raise_usage_errors(overrides, message):
    with pytest.raises(UsageError, match=message):
        resolve_config(None, overrides)


def test_run_control_options_come_from_the_command_line_only(tmp_path):
    """A config.yaml written before overwrite/resume were left out of it neither replaces a run nor
    clashes with an --overwrite given now."""
    old = tmp_path / "config.yaml"
    old.write_text("epochs: 3\noverwrite: true\nresume: auto\n")
    cfg = resolve_config(str(old), {})
    assert (cfg.epochs, cfg.overwrite, cfg.resume) == (3, False, "")
    assert resolve_config(str(old), {"overwrite": True}).overwrite is True
    assert resolve_config(str(old), {"resume": "auto"}).resume == "auto"
    assert not {"overwrite", "resume"} & set(resolve_config(None, {"overwrite": True}).recorded())


def test_yaml_that_is_not_a_mapping_or_not_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(UsageError, match="must be a mapping"):
        read_yaml(str(bad))
    bad.write_text("epochs: [1\n")
    with pytest.raises(UsageError, match="not valid YAML"):
        read_yaml(str(bad))
    with pytest.raises(UsageError, match="neither a file nor a shipped recipe; recipes: .*digits"):
        read_yaml("no_such_recipe")


def test_every_shipped_recipe_is_valid():
    names = recipe_names()
    assert {"digits", "seed_cifar10", "cvt13_in1k", "cvt21_in1k", "cvt13_in1k_384_ft", "cvtw24_384_ft",
            "cifar10_transfer", "cifar10_scratch"} <= set(names)  # fmt: skip
    for name in names:
        resolve_config(name, {})
    # the digits recipe is the defaults written out
    assert resolve_config("digits", {}) == TrainConfig()
    seed = resolve_config("seed_cifar10", {})
    assert (seed.model, seed.dataset, seed.batch_size, seed.optimizer, seed.momentum, seed.weight_decay) == (
        "cvt", "cifar10", 128, "sgd", 0.9, 5e-4,
    )  # fmt: skip
    paper = resolve_config("cvt13_in1k", {})
    assert (paper.lr, paper.lr_base_batch, paper.epochs) == (2.5e-4, 256, 300)
    assert (paper.mixup, paper.cutmix, paper.label_smoothing, paper.weight_decay) == (0.8, 1.0, 0.1, 0.05)


@pytest.mark.parametrize("key", ["num_classes", "img_size", "features_only", "pretrained"])
def test_model_args_the_run_sets_itself_are_refused(key):
    """They clashed with the run's own options inside create_model (an internal TypeError) or built
    something that is not a classifier."""
    with pytest.raises(UsageError, match=f"model_args {key}: set by the run itself"):
        resolve_config(None, {"model_args": {key: 5}})
