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


def test_list_flags_read_their_items_as_the_option_declares(capsys: pytest.CaptureFixture[str]) -> None:
    """``scale: list[float]`` takes fractions; ``decay_milestones: list[int]`` refuses them."""
    milestones = flags_from_args(parse(["--decay-milestones", "30", "60"]))["decay_milestones"]
    assert milestones == [30, 60] and all(type(m) is int for m in milestones)
    with pytest.raises(SystemExit) as exit_info:
        parse(["--decay-milestones", "1.5"])
    assert exit_info.value.code == 2
    assert "--decay-milestones: invalid int value: '1.5'" in capsys.readouterr().err


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
        # NaN passed every range check (an internal ValueError, or an AssertionError in mixup after the
        # run folder was made); inf every lower bound
        ({"lr": float("nan")}, r"'lr' must be a finite number, got nan"),
        ({"mixup": float("nan")}, r"'mixup' must be a finite number, got nan"),
        ({"weight_decay": float("inf")}, r"'weight_decay' must be a finite number, got inf"),
        ({"clip_grad": float("nan")}, r"'clip_grad' must be a finite number"),
        ({"scale": [0.5, float("nan")]}, r"'scale' must be a finite number, got \[0.5, nan\]"),
        # schedules: a ZeroDivisionError after a whole epoch, a negative lr, a floor above the peak
        ({"sched": "step", "decay_epochs": 0.0}, r"'decay_epochs' must be > 0 for sched step, got 0.0"),
        (
            {"sched": "multistep", "decay_milestones": [60, 30]},
            r"'decay_milestones' must be epochs > 0 in increasing order",
        ),
        ({"sched": "multistep", "decay_milestones": [0, 30]}, r"'decay_milestones' must be epochs > 0"),
        ({"decay_rate": -1.0}, r"'decay_rate' .* must be in \(0, 1\] \(1: no decay\), got -1.0"),
        ({"decay_rate": 0.0}, r"'decay_rate' .* must be in \(0, 1\]"),
        ({"decay_rate": 2.0}, r"'decay_rate' .* must be in \(0, 1\]"),
        ({"min_lr": 1.0, "lr": 2e-3}, r"'min_lr' is the floor .* must be <= lr 0.002, got 1.0"),
        ({"warmup_lr": -1e-5}, r"'warmup_lr' must be >= 0"),
        # silently accepted: an EMA or momentum that grows without bound
        ({"ema_decay": 2.0}, r"'ema_decay' .* must be in \[0, 1\] .*got 2.0"),
        ({"ema_decay": -0.5}, r"'ema_decay' .* must be in \[0, 1\]"),
        ({"momentum": 2.0}, r"'momentum' must be in \[0, 1\), got 2.0"),
        ({"momentum": 1.0}, r"'momentum' must be in \[0, 1\)"),
        # an 'internal error' from torch's SGD (the shipped transfer recipes use Nesterov)
        ({"optimizer": "sgd", "nesterov": True, "momentum": 0.0}, r"'nesterov' needs a momentum > 0"),
        # augmentation: an internal ValueError from torchvision's ColorJitter
        ({"color_jitter": -1.0}, r"'color_jitter' must be >= 0 when given, got -1.0"),
        ({"scale": [0.9, 0.5]}, r"'scale' must be two numbers 0 < lo <= hi <= 1"),
        ({"label_smoothing": 1.0}, r"'label_smoothing' must be in \[0, 1\)"),
        # a ZeroDivisionError in the sampler; a negative count would make every step a gradient ascent
        ({"accum_steps": 0}, r"'accum_steps' must be > 0, got 0"),
        ({"accum_steps": -1}, r"'accum_steps' must be > 0, got -1"),
        # an internal "Overflow when unpacking long long" from torch's generators, after the run folder
        # was made; numpy takes seeds below 2**32
        ({"seed": 2**63 - 1}, r"'seed' must be in \[0, 4294967295\], got 9223372036854775807"),
        ({"seed": 2**64 - 1}, r"'seed' must be in \[0, 4294967295\]"),
        ({"seed": 99999999999999999999}, r"'seed' must be in \[0, 4294967295\]"),
        ({"seed": 2**32}, r"'seed' must be in \[0, 4294967295\], got 4294967296"),
        ({"seed": -1}, r"'seed' must be in \[0, 4294967295\], got -1"),
        # timm's Mixup asserts an even batch: refused once the data sets and the model were built
        ({"batch_size": 15, "mixup": 0.8}, r"^mixup/cutmix need an even batch size, got 15$"),
        ({"batch_size": 7, "cutmix": 1.0}, r"^mixup/cutmix need an even batch size, got 7$"),
        # logits per token: an internal "Expected target size [4, 10], got [4]" in the loss
        (
            {"model_args": {"global_pool": ""}},
            r"the model of model_args gives logits per token \(global_pool ''\), not per image: training",
        ),
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


def test_finetune_is_a_recipe_option_and_is_recorded(tmp_path):
    """Unlike overwrite/resume, --finetune describes the run: a recipe may set it, config.yaml keeps it."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("finetune: runs/x/best.pt\n")
    assert resolve_config(str(recipe), {}).finetune == "runs/x/best.pt"
    assert TrainConfig(finetune="a.pt").recorded()["finetune"] == "a.pt"


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


def test_a_config_file_that_is_not_utf8_yaml_is_one_usage_error_line(tmp_path, capsys):
    """``cvt train --config <a binary file>`` was "internal error: UnicodeDecodeError"."""
    from cvt.cli.main import main

    binary = tmp_path / "weights.pt"
    binary.write_bytes(b"PK\x03\x04\x14\x00\x00\x08\x08\x00\xff\xfe")
    assert main(["train", "--config", str(binary)]) == 2
    err = capsys.readouterr().err
    expected = f"config {str(binary)!r} is not a YAML file: byte 10 is not UTF-8 text (a binary file?)"
    assert err == f"cvt train: error: {expected}\n"
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1\n")
    with pytest.raises(
        UsageError, match=r"config .* is not valid YAML: expected ',' or '\]'.* at line 2"
    ) as info:
        read_yaml(str(bad))
    assert "\n" not in str(info.value)  # PyYAML's own text spans lines


def test_the_augmentation_options_are_those_of_augment_config():
    """validate() checks them through the AugmentConfig the run builds (one set of checks)."""
    from cvt.data import AugmentConfig
    from cvt.engine.config import augment_config

    cfg = resolve_config(None, {"hflip": 0.5, "re_prob": 0.25, "scale": [0.5, 1.0], "mixup": 0.8,
                                "cutmix": 1.0, "label_smoothing": 0.1, "precrop": 32, "color_jitter": 0.4,
                                "auto_augment": "rand-m9-mstd0.5-inc1", "random_crop": False})  # fmt: skip
    assert augment_config(cfg) == AugmentConfig(
        auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25, hflip=0.5, random_crop=False, precrop=32,
        scale=(0.5, 1.0), color_jitter=0.4, mixup=0.8, cutmix=1.0, label_smoothing=0.1,
    )  # fmt: skip
    with pytest.raises(UsageError, match=r"^option 'precrop' must be >= 0, got -1$"):
        resolve_config(None, {"precrop": -1})
    with pytest.raises(UsageError, match=r"^option 'scale' must be two numbers 0 < lo <= hi <= 1"):
        resolve_config(None, {"scale": [0.5]})


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
    for name in ("cvt13_in1k_384_ft", "cvtw24_384_ft"):  # the warm-up climbs even on one GPU
        ft = resolve_config(name, {})
        assert ft.warmup_lr < ft.lr * ft.batch_size / ft.lr_base_batch
    # the official fine-tuning: Nesterov SGD, lr 0.003 for 512 images a step, resize to 416 + random crop
    for name in ("cifar10_transfer", "cifar100_transfer"):
        transfer = resolve_config(name, {})
        assert (transfer.optimizer, transfer.nesterov, transfer.lr, transfer.lr_base_batch) == (
            "sgd",
            True,
            0.003,
            512,
        )
        assert (transfer.random_crop, transfer.precrop, transfer.img_size) == (True, 32, 384)


@pytest.mark.parametrize("key", ["num_classes", "img_size", "features_only", "pretrained"])
def test_model_args_the_run_sets_itself_are_refused(key):
    """They clashed with the run's own options inside create_model (an internal TypeError) or built
    something that is not a classifier."""
    with pytest.raises(UsageError, match=f"model_args {key}: set by the run itself"):
        resolve_config(None, {"model_args": {key: 5}})


@pytest.mark.parametrize(
    "overrides",
    [
        {"ema_decay": 1.0},  # keeps the EMA at its starting weights (the engine tests use it so)
        {"ema_decay": 0.0, "momentum": 0.0, "decay_rate": 1.0, "color_jitter": 0.0},
        {"sched": "step", "decay_epochs": 0.5},
        {"sched": "cosine", "min_lr": 2e-3, "lr": 2e-3},  # a floor at the peak: constant after warm-up
        {"sched": "step", "min_lr": 1.0, "lr": 2e-3},  # min_lr is the cosine's alone
        {"sched": "cosine", "decay_epochs": 0.0, "decay_milestones": [5, 1]},  # step/multistep's alone
        # with lr_base_batch the peak depends on the process count, known when training starts
        {"min_lr": 1e-3, "lr": 2.5e-4, "lr_base_batch": 256},
        {"seed": 2**32 - 1},  # the largest seed
        {"model_args": {"global_pool": "avg"}},
        {"batch_size": 15, "mixup": 0.0, "cutmix": 0.0},  # an odd batch, unmixed
    ],
)
def test_edge_values_that_can_train_are_accepted(overrides):
    cfg = resolve_config(None, overrides)
    assert {k: getattr(cfg, k) for k in overrides} == overrides


def test_list_items_of_the_wrong_type_name_the_option(tmp_path):
    """``scale: [0.5, abc]`` in a YAML file was an internal TypeError from the range check."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("scale: [0.5, abc]\n")
    with pytest.raises(
        UsageError, match=r"'scale' must be a list of float, got \[0.5, 'abc'\] \('abc' is str\)"
    ):
        resolve_config(str(recipe), {})
    recipe.write_text("decay_milestones: [30, 60.5]\n")
    with pytest.raises(UsageError, match=r"'decay_milestones' must be a list of int.*\(60.5 is float\)"):
        resolve_config(str(recipe), {})
    recipe.write_text("scale: [true, 1]\n")
    with pytest.raises(UsageError, match=r"'scale' must be a list of float.*\(True is bool\)"):
        resolve_config(str(recipe), {})
    # ints stand for floats, as for a float option, and come back as floats
    recipe.write_text("scale: [0.5, 1]\n")
    scale = resolve_config(str(recipe), {}).scale
    assert scale == [0.5, 1.0] and all(isinstance(v, float) for v in scale)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        # sizes and counts that are optional: None means "the default", zero or below none can use
        ({"eval_batch_size": 0}, r"^option 'eval_batch_size' must be > 0 when given, got 0$"),
        ({"num_classes": 0}, r"^option 'num_classes' must be > 0 when given, got 0$"),
        ({"img_size": 0}, r"^option 'img_size' must be > 0 when given, got 0$"),
        ({"train_subset": 0}, r"^option 'train_subset' must be > 0 when given, got 0$"),
        ({"lr_base_batch": -256}, r"^option 'lr_base_batch' must be > 0 when given, got -256$"),
        ({"clip_grad": 0.0}, r"^option 'clip_grad' must be > 0 when given, got 0.0$"),
        # zero is fine, below it is not
        ({"workers": -1}, r"^option 'workers' must be >= 0, got -1$"),
        ({"save_every_steps": -1}, r"^option 'save_every_steps' must be >= 0, got -1$"),
        ({"warmup_epochs": -0.5}, r"^option 'warmup_epochs' must be >= 0, got -0.5$"),
        ({"min_lr": -1e-05}, r"^option 'min_lr' must be >= 0, got -1e-05$"),
        ({"weight_decay": -0.01}, r"^option 'weight_decay' must be >= 0, got -0.01$"),
        (
            {"sched": "linear"},
            r"^option 'sched' must be one of cosine, step, multistep, constant, got 'linear'$",
        ),
        # a repeated milestone is not "increasing" (timm would decay twice at that epoch)
        (
            {"sched": "multistep", "decay_milestones": [30, 30]},
            r"'decay_milestones' must be epochs > 0 in incr",
        ),
        # a resume path, not only 'auto', conflicts with --overwrite
        ({"overwrite": True, "resume": "runs/x/last.pt"}, r"^options 'overwrite' and 'resume' conflict"),
    ],
)
def test_optional_sizes_counts_and_schedule_names_out_of_range_are_refused(overrides, message):
    with pytest.raises(UsageError, match=message):
        resolve_config(None, overrides)


def test_an_empty_yaml_value_is_refused_for_a_required_option_only(tmp_path):
    """``epochs:`` with no value reads as None: an option that needs a value names itself (it was a
    TypeError from the range checks); an optional one (``num_classes``) takes None as its default."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("epochs:\n")
    with pytest.raises(UsageError, match=r"^option 'epochs' must be of type int, got None \(NoneType\)$"):
        resolve_config(str(recipe), {})
    recipe.write_text("num_classes:\nimg_size:\n")
    cfg = resolve_config(str(recipe), {})
    assert (cfg.num_classes, cfg.img_size) == (None, None)


def test_unknown_option_errors_say_where_the_option_came_from(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("batchsize: 32\n")
    with pytest.raises(UsageError) as info:
        resolve_config(str(recipe), {})
    assert (
        str(info.value)
        == f"unknown option(s) in config {str(recipe)!r}: 'batchsize' (did you mean 'batch_size'?)"
    )
    with pytest.raises(UsageError) as info:
        resolve_config(None, {"epochz": 3, "zzz": 1})
    assert (
        str(info.value) == "unknown option(s) in the command line: 'epochz' (did you mean 'epochs'?), 'zzz'"
    )


def test_a_shipped_recipe_may_be_named_with_its_yaml_suffix(tmp_path, monkeypatch):
    """``cvt train --config cvt13_in1k.yaml`` outside the source tree is the shipped recipe, as without
    the suffix."""
    monkeypatch.chdir(tmp_path)  # no file of that name here
    assert read_yaml("cvt13_in1k.yaml") == read_yaml("cvt13_in1k")
    assert resolve_config("seed_cifar10.yaml", {}) == resolve_config("seed_cifar10", {})
    assert resolve_config("seed_cifar10.yaml", {}).optimizer == "sgd"


def test_list_options_take_tuples_and_record_lists():
    cfg = resolve_config(None, {"scale": (0.5, 1), "decay_milestones": (10, 20)})
    assert cfg.scale == [0.5, 1.0] and all(type(v) is float for v in cfg.scale)
    assert cfg.decay_milestones == [10, 20] and type(cfg.decay_milestones) is list


def test_nesterov_without_momentum_is_refused_for_sgd_only():
    """AdamW has no momentum buffer: ``--nesterov`` with momentum 0 is no error there."""
    cfg = resolve_config(None, {"optimizer": "adamw", "nesterov": True, "momentum": 0.0})
    assert (cfg.optimizer, cfg.nesterov, cfg.momentum) == ("adamw", True, 0.0)
    with pytest.raises(UsageError, match="'nesterov' needs a momentum > 0"):
        resolve_config(None, {"optimizer": "sgd", "nesterov": True, "momentum": 0.0})


def test_model_args_flag_keeps_every_pair_with_yaml_values():
    flags = flags_from_args(parse(["--model-args", "method=avg", "depth=[1,1,1]", "drop_path_rate=0"]))
    assert flags == {"model_args": {"method": "avg", "depth": [1, 1, 1], "drop_path_rate": 0}}


def test_repeated_model_args_flags_add_their_pairs_and_replace_the_recipes(tmp_path):
    """``--model-args a=1 --model-args b=2`` keeps both pairs (argparse alone keeps the last flag's); a
    later key wins; the flags' pairs replace a recipe's ``model_args`` as a whole, as any flag does."""
    argv = [
        "--model-args",
        "depth=[1,1,1]",
        "method=avg",
        "--model-args",
        "drop_path_rate=0.2",
        "method=linear",
    ]
    flags = flags_from_args(parse(argv))
    assert flags == {"model_args": {"depth": [1, 1, 1], "method": "linear", "drop_path_rate": 0.2}}
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model_args: {act: gelu_tanh, method: avg}\n")
    assert resolve_config(str(recipe), {}).model_args == {"act": "gelu_tanh", "method": "avg"}
    assert resolve_config(str(recipe), flags).model_args == flags["model_args"]


def test_commands_sharing_the_train_flags_hide_reword_and_default_them_their_own_way():
    """``cvt ablate`` reuses the flags with options hidden from --help (still parsed, to be refused
    with a reason), its own defaults shown, and help texts of its own."""
    parser = argparse.ArgumentParser()
    add_train_arguments(parser, hidden={"compile"}, defaults=TrainConfig(epochs=3), helps={"lr": "own words"})
    helps = {a.dest: a.help for a in parser._actions}
    assert helps["compile"] == argparse.SUPPRESS and "--compile" not in parser.format_help()
    assert helps["epochs"].endswith("(default: 3)") and helps["lr"] == "own words"
    assert flags_from_args(parser.parse_args(["--compile"])) == {"compile": True}
