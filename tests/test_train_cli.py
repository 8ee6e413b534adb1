"""``cvt train`` and the seed's ``python train.py``: flags, exit codes and one-line errors."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
import yaml

from cvt.cli.main import main

REPO = Path(__file__).resolve().parents[1]
SEED_COMMAND = ["--model", "cvt", "--name", "cvt", "--sched", "cosine", "--epochs", "200", "--lr", "0.01"]


def test_bad_option_values_exit_2_with_one_line(capsys, tmp_path):
    assert main(["train", "--epochs", "0", "--output", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "cvt train: error: option 'epochs' must be > 0, got 0"
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    ("recipe", "argv", "message"),
    [  # internal errors, some after the run folder was made
        (
            'model_args:\n  global_pool: ""\n',
            [],
            "the model of model_args gives logits per token (global_pool ''), not per image",
        ),
        (
            "seed: 18446744073709551615\n",
            [],
            "option 'seed' must be in [0, 4294967295], got 18446744073709551615",
        ),
        ("", ["--seed", "99999999999999999999"], "option 'seed' must be in [0, 4294967295]"),
        ("", ["--seed", str(2**63 - 1)], "option 'seed' must be in [0, 4294967295]"),
        # a fresh run, silently
        ("", ["--resume", ""], "option 'resume' was given an empty value (an unset shell variable?)"),
        ("", ["--finetune", ""], "option 'finetune' was given an empty value"),  # trained from scratch
        ("", ["--output", ""], "option 'output' was given an empty value"),  # wrote to runs/<name>
        ("", ["--name", ""], "option 'name' was given an empty value"),
    ],
)
def test_values_no_run_can_use_exit_2_before_the_run_folder(capsys, tmp_path, recipe, argv, message):
    config = tmp_path / "r.yaml"
    config.write_text(recipe or "epochs: 1\n")
    run = tmp_path / "run"
    common = ["--epochs", "1", "--train-subset", "8", "--batch-size", "4", "--output", str(run)]
    assert main(["train", "--config", str(config), *common, *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cvt train: error: ") and err.count("\n") == 1 and message in err, err
    assert not run.exists()


@pytest.mark.parametrize("mixing", [["--mixup", "0.8"], ["--cutmix", "1.0"]])
def test_mixing_an_odd_batch_exits_2_before_any_data_or_model_is_built(capsys, tmp_path, monkeypatch, mixing):
    """The even-batch check of mixup/cutmix ran once the data sets and the model were built: after
    CIFAR's download into --data-dir and the pretrained weights', which fail here if asked for."""
    import cvt.data
    import cvt.models

    def built(*args: object, **kwargs: object) -> None:
        raise AssertionError("data or model built before the options were checked")

    monkeypatch.setattr(cvt.data, "build_dataset", built)
    monkeypatch.setattr(cvt.models, "create_model", built)
    run, data = tmp_path / "run", tmp_path / "cifar"
    argv = ["--dataset", "cifar10", "--data-dir", str(data), "--download", "--pretrained", "--model",
            "cvt_13.msft_in1k", "--batch-size", "15", *mixing, "--output", str(run)]  # fmt: skip
    assert main(["train", *argv]) == 2
    assert capsys.readouterr().err == "cvt train: error: mixup/cutmix need an even batch size, got 15\n"
    assert not run.exists() and not data.exists()


def test_unknown_yaml_key_message_names_the_suggestion(capsys, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("epochz: 3\n")
    assert main(["train", "--config", str(recipe)]) == 2
    assert capsys.readouterr().err.strip().endswith("'epochz' (did you mean 'epochs'?)")


def test_flag_parse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--batch-size", "many"])
    assert exit_info.value.code == 2
    assert "--batch-size: invalid int value: 'many'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--model-args", "method"])
    assert "expected KEY=VALUE, got 'method'" in capsys.readouterr().err


def test_unknown_model_is_a_usage_error(capsys, tmp_path):
    assert main(["train", "--model", "cvt_99", "--output", str(tmp_path / "r")]) == 2
    assert "unknown model 'cvt_99'" in capsys.readouterr().err


def test_seed_command_without_cifar_says_where_to_put_it(capsys, tmp_path, monkeypatch):
    """``python train.py --model cvt ...`` in a folder without ./data: one line, exit 1, no download."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["train.py", *SEED_COMMAND])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO / "train.py"), run_name="__main__")
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("cvt train: error: cifar10: no folder data/cifar-10-batches-py")
    assert "--download" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "data").exists() and not (tmp_path / "runs").exists()


def test_seed_command_help_says_the_recipe_replaces_the_defaults(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO / "train.py"), run_name="__main__")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    # the script's own docstring (CIFAR-10, 200 epochs at lr 0.01) comes before cvt train's option list
    assert out.index("seed_cifar10.yaml") < out.index("200 epochs at lr 0.01") < out.index("--epochs EPOCHS")
    assert "replaced by the seed recipe" in out


def test_seed_command_maps_onto_the_seed_defaults(tmp_path, monkeypatch):
    """The seed's flags on top of the seed recipe; a cvt train flag (--output) is accepted too."""
    from cvt.engine import resolve_run
    from cvt.engine.config import read_yaml

    recipe = read_yaml("seed_cifar10")
    cfg, ckpt = resolve_run("seed_cifar10", {"model": "cvt", "name": "cvt", "sched": "cosine", "epochs": 200})
    assert ckpt is None and str(cfg.run_dir) == "runs/cvt"
    expected = dict(dataset="cifar10", data_dir="data", batch_size=128, optimizer="sgd", momentum=0.9,
                    weight_decay=5e-4, lr=0.01, download=False, auto_augment=None, mixup=0.0)  # fmt: skip
    assert {k: getattr(cfg, k) for k in expected} == expected
    assert set(recipe) <= set(yaml.safe_load(yaml.safe_dump(cfg.to_dict())))


def _seed_script() -> dict:
    """train.py's functions, without running it."""
    return runpy.run_path(str(REPO / "train.py"), run_name="seed_script")


def _run_seed_script(monkeypatch, argv: list[str]) -> tuple:
    """``python train.py ARGV`` up to the training itself: the config and checkpoint it would train."""
    started = []
    monkeypatch.setattr("cvt.engine.trainer.train", lambda cfg, ckpt=None: started.append((cfg, ckpt)) or {})
    monkeypatch.setattr(sys, "argv", ["train.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO / "train.py"), run_name="__main__")
    assert exit_info.value.code == 0 and len(started) == 1
    return started[0]


def test_seed_script_resumes_under_the_checkpoints_config(tmp_path, monkeypatch):
    """``python train.py --name t --resume auto`` continues runs/t with the config it was trained with
    (its model, data, lr, weight decay), not the seed recipe's; flags still apply."""
    monkeypatch.chdir(tmp_path)
    micro = ["--img-size", "16", "--train-subset", "32", "--batch-size", "16", "--epochs", "1",
             "--model-args", "embed_dim=[8,16,32]", "depth=[1,1,1]", "num_heads=[1,1,2]"]  # fmt: skip
    assert main(["train", *micro, "--name", "t", "--lr", "0.005", "--weight-decay", "0.01"]) == 0
    for resume in ("auto", "runs/t/last.pt"):
        cfg, ckpt = _run_seed_script(monkeypatch, ["--name", "t", "--resume", resume, "--epochs", "2"])
        assert ckpt is not None and ckpt["epoch"] == 1 and str(cfg.run_dir) == "runs/t"
        got = {k: getattr(cfg, k) for k in ("model", "dataset", "lr", "weight_decay", "optimizer", "epochs")}
        assert got == dict(model="cvt_tiny", dataset="digits", lr=0.005, weight_decay=0.01, optimizer="adamw",
                           epochs=2)  # fmt: skip
    # killed between the two saves that end its first epoch: best.pt alone holds its state, and
    # cvt train --resume auto takes it; the script applied the seed recipe (cvt / cifar10 / sgd) instead
    for name in ("last.pt", "metrics.csv", "summary.json"):
        (tmp_path / "runs" / "t" / name).unlink()
    cfg, ckpt = _run_seed_script(monkeypatch, ["--name", "t", "--resume", "auto", "--epochs", "2"])
    assert ckpt is not None and (cfg.model, cfg.dataset, cfg.lr) == ("cvt_tiny", "digits", 0.005)


def test_seed_script_keeps_the_recipe_without_a_checkpoint(tmp_path, monkeypatch):
    """``--resume auto`` with nothing to resume starts the seed run; ``--config`` replaces the recipe."""
    monkeypatch.chdir(tmp_path)
    cfg, ckpt = _run_seed_script(monkeypatch, [*SEED_COMMAND, "--resume", "auto"])
    assert ckpt is None and (cfg.model, cfg.dataset, cfg.optimizer, str(cfg.run_dir)) == (
        "cvt", "cifar10", "sgd", "runs/cvt",
    )  # fmt: skip
    train_argv = _seed_script()["train_argv"]
    assert train_argv(["--epochs", "3"]) == ["train", "--config", "seed_cifar10", "--epochs", "3"]
    assert train_argv(["--config", "digits"]) == ["train", "--config", "digits"]


@pytest.mark.parametrize(
    ("pair", "message"),
    [
        ("=5", "argument --model-args: expected KEY=VALUE, got '=5'"),  # no key: create_model's TypeError
        ("depth=[1,1", "argument --model-args: cannot read the value of 'depth=[1,1'"),  # not YAML
    ],
)
def test_model_args_without_a_key_or_with_a_value_that_is_not_yaml_exit_2(capsys, tmp_path, pair, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--model-args", pair, "--output", str(tmp_path / "r")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_train_help_explains_what_overwrite_removes(capsys):
    """``cvt train --help`` gives --overwrite the text of what it removes, not the option's short help."""
    from cvt.cli.train import OVERWRITE_HELP

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    squeezed = "".join(capsys.readouterr().out.split())  # argparse wraps the text at any space or hyphen
    assert "".join(OVERWRITE_HELP.split()) in squeezed
    assert "removesits" in squeezed and "(commandlineonly)" in squeezed
