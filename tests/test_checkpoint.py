"""Checkpoint reading, strict loading, the project's own format and official YAML files (issue 2)."""

from __future__ import annotations

import argparse
import json
import os
import re
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from cvt import CheckpointError, UsageError
from cvt.checkpoint import (
    create_model_from_official_yaml,
    export_hf,
    load_checkpoint,
    load_model,
    matching_variants,
    read_state_dict,
    rebuild_model,
    save_checkpoint,
)
from cvt.checkpoint.read import unwrap_state_dict
from cvt.data.transforms import resolve_data_config
from cvt.models import count_params, create_model
from cvt.models.cvt import CvT


@pytest.fixture(scope="module")
def tiny() -> CvT:
    torch.manual_seed(0)
    return create_model("cvt_tiny").eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _fresh(**kwargs) -> CvT:
    torch.manual_seed(123)  # other weights than the fixture's
    return create_model("cvt_tiny", **kwargs).eval()


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------ official layouts
def _containers(sd: dict[str, torch.Tensor]) -> dict[str, object]:
    module_sd = {f"module.{k}": v for k, v in sd.items()}
    return {
        "plain": sd,
        "state_dict": {"state_dict": sd, "epoch": 3},
        "model": {"model": module_sd, "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}, "epoch": 3},
        "compiled": {f"_orig_mod.{k}": v for k, v in module_sd.items()},
        "ema_only": {"model_ema": sd},
    }


@pytest.mark.parametrize("layout", ["plain", "state_dict", "model", "compiled", "ema_only"])
def test_official_layouts_load(tmp_path: Path, tiny: CvT, layout: str) -> None:
    path = tmp_path / "ckpt.pth"
    torch.save(_containers(tiny.state_dict())[layout], path)
    model = _fresh()
    assert not _same_weights(model, tiny)
    result = load_checkpoint(model, path)
    assert result.format == "official" and result.path == str(path) and not result.skipped
    assert _same_weights(model, tiny)


def test_a_plain_safetensors_file_of_official_keys_is_official(
    tmp_path: Path, tiny: CvT, images: torch.Tensor
) -> None:
    """safetensors.torch.save_file from plain torch code records only ``{"format": "pt"}``: without the
    project's ``cvt_format`` entry the file is an official state dict, not a broken cvt file."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = tmp_path / "official.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.state_dict().items()}, str(path), metadata={"format": "pt"})
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    sd, fmt, info = read_state_dict(path)
    assert fmt == "official" and "arch" not in info and sd.keys() == tiny.state_dict().keys()
    model = _fresh()
    assert load_checkpoint(model, path).format == "official" and _same_weights(model, tiny)
    rebuilt = load_model(path)  # the one variant with these shapes
    assert rebuilt.pretrained_cfg["architecture"] == "cvt_tiny" and rebuilt.num_classes == 10
    with torch.no_grad():
        assert torch.equal(rebuilt(images), tiny(images))


def test_training_checkpoint_prefers_model_or_ema(tmp_path: Path, tiny: CvT) -> None:
    other = _fresh().state_dict()
    path = tmp_path / "last.pt"
    # the layout of `cvt train` checkpoints: weights, EMA weights, plain config values
    torch.save({"model": tiny.state_dict(), "ema": other, "epoch": 7, "config": {"model": "cvt_tiny"}}, path)
    sd, fmt, info = read_state_dict(path)
    assert fmt == "official" and info["nested_key"] == "model"
    assert torch.equal(sd["head.weight"], tiny.head.weight)
    model = _fresh()
    load_checkpoint(model, path, use_ema=True)
    assert torch.equal(model.head.weight, other["head.weight"])
    with pytest.raises(CheckpointError, match="no EMA weights"):
        torch.save({"model": tiny.state_dict(), "ema": {}}, tmp_path / "no_ema.pt")  # trained without EMA
        read_state_dict(tmp_path / "no_ema.pt", use_ema=True)


def test_ema_of_a_bare_state_dict_is_refused(tmp_path: Path, tiny: CvT) -> None:
    torch.save(tiny.state_dict(), tmp_path / "bare.pth")
    with pytest.raises(CheckpointError, match=r"bare\.pth has no EMA weights: it holds one set of weights"):
        read_state_dict(tmp_path / "bare.pth", use_ema=True)
    with pytest.raises(CheckpointError, match="has no EMA weights: it holds one set of weights"):
        load_checkpoint(_fresh(), tiny.state_dict(), use_ema=True)
    # `cvt train` without --ema saves an empty "ema": the message says that none holds weights
    torch.save({"model": tiny.state_dict(), "ema": {}, "epoch": 1}, tmp_path / "no_ema.pt")
    with pytest.raises(CheckpointError, match=r"none of \['ema', .*\] holds a state dict.*cvt train --ema"):
        load_model(tmp_path / "no_ema.pt", use_ema=True)


def test_timm_checkpoint_saver_output_loads(tmp_path: Path, tiny: CvT) -> None:
    """timm's CheckpointSaver pickles its `args` (an argparse.Namespace) beside the weights."""
    from timm.utils import CheckpointSaver, ModelEmaV3

    ema = ModelEmaV3(_fresh())  # other weights than the model's
    optimizer = torch.optim.SGD(tiny.parameters(), lr=0.1)
    args = argparse.Namespace(model="cvt_tiny", lr=0.1)
    saver = CheckpointSaver(tiny, optimizer, args=args, model_ema=ema, checkpoint_dir=str(tmp_path))
    saver.save_checkpoint(epoch=0, metric=1.0)
    path = tmp_path / "last.pth.tar"
    sd, fmt, info = read_state_dict(path)
    assert fmt == "official" and info["nested_key"] == "state_dict" and "train_config" not in info
    assert torch.equal(sd["head.weight"], tiny.head.weight)
    model = load_model(path)  # the one variant with these shapes
    assert _same_weights(model, tiny)
    assert _same_weights(load_model(path, use_ema=True), ema.module)


# ------------------------------------------------------------------------------ cvt train checkpoints
# a small CvT-13 (its configuration: 0.875 center crop) as `cvt train --model cvt_13 --model-args` builds it
SMALL_13 = {"embed_dim": [16, 32, 32], "num_heads": [1, 1, 2], "depth": [1, 1, 1], "act": "gelu"}


def _train_checkpoint(path: Path, dataset: str, ema: bool = True) -> tuple[Path, CvT, CvT]:
    """A `cvt train`-style checkpoint of a 4-class CvT-13 at 64x64: weights, EMA, config, classes."""
    torch.manual_seed(5)
    model = create_model("cvt_13", num_classes=4, img_size=64, **SMALL_13).eval()
    averaged = create_model("cvt_13", num_classes=4, img_size=64, **SMALL_13).eval()
    config = {"model": "cvt_13", "num_classes": 4, "img_size": 64, "dataset": dataset,
              "data_dir": "data", "model_args": SMALL_13, "epochs": 3}  # fmt: skip
    torch.save({"model": model.state_dict(), "ema": averaged.state_dict() if ema else {},
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}, "epoch": 3, "config": config,
                "classes": ["ant", "bee", "cat", "dog"]}, path)  # fmt: skip
    return path, model, averaged


@pytest.mark.parametrize(("dataset", "crop_pct"), [("cifar10", 1.0), ("imagefolder", 0.875)])
def test_load_model_of_a_training_checkpoint_keeps_its_config(
    tmp_path: Path, dataset: str, crop_pct: float
) -> None:
    path, trained, averaged = _train_checkpoint(tmp_path / "last.pt", dataset)
    model, info = rebuild_model(path)
    assert info["train_config"]["dataset"] == dataset and info["classes"] == ["ant", "bee", "cat", "dog"]
    # model_args (act, widths) and the trained input size, not a variant guessed from shapes
    assert model.act == "gelu" and model.img_size == (64, 64) and model.num_classes == 4
    assert model.stage_specs == trained.stage_specs and not model.training
    assert model.pretrained_cfg["label_names"] == ["ant", "bee", "cat", "dog"]
    assert model.pretrained_cfg["crop_pct"] == crop_pct  # small-image data sets: no center crop
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(model(x), trained(x))
        assert torch.equal(load_model(path, use_ema=True)(x), averaged(x))
    with pytest.raises(UsageError, match="is a cvt_13 training checkpoint; .* 'cvt_tiny' names another"):
        load_model(path, model_name="cvt_tiny")
    assert load_model(path, model_name="cvt_13.msft_in1k").act == "gelu"  # the recorded variant is fine
    with pytest.raises(UsageError, match="records its activation"):
        load_model(path, act="quick_gelu")


def test_another_projects_model_and_config_dict_loads_as_a_state_dict(tmp_path: Path) -> None:
    """``{"model": ..., "config": vars(args)}`` is a common layout elsewhere: without the model name and
    class count of a cvt train config it is a plain state dict (variant matched by shapes, or named)."""
    foreign = create_model("cvt_tiny", num_classes=7).eval()
    path = tmp_path / "foreign.pth"
    torch.save({"model": foreign.state_dict(), "config": {"arch": "cls_cvt", "lr": 0.1}}, path)
    for model in (load_model(path), load_model(path, model_name="cvt_tiny")):
        assert model.num_classes == 7
        for key, value in foreign.state_dict().items():
            assert torch.equal(model.state_dict()[key], value), key


@pytest.mark.parametrize(
    ("edit", "message"),
    [  # internal TypeErrors and ValueErrors; a string of class names was read letter by letter
        ({"classes": 5}, r"malformed class names: 'classes' must be a list of strings, got 5 \(int\)"),
        (
            {"classes": "abcd"},
            r"malformed class names: 'classes' must be a list of strings, got 'abcd' \(str\)",
        ),
        (
            {"config": {"model_args": "x=1"}},
            r"a malformed config: option 'model_args' must be of type dict, got 'x=1'",
        ),
        (
            {"config": {"num_classes": "three"}},
            r"a malformed config: option 'num_classes' must be of type int, got 'three'",
        ),
        (
            {"config": {"num_classes": None}},
            r"a malformed config: it must name its 'model' and a 'num_classes' >= 0",
        ),
        ({"config": {"img_size": [64, 64]}}, r"a malformed config: option 'img_size' must be of type int"),
        (
            {"config": {"num_classes": -1}},
            r"a malformed config: it must name its 'model' and a 'num_classes' >= 0, got 'cvt_13' and -1",
        ),
    ],
)
def test_a_hand_edited_training_checkpoint_names_its_malformed_entry(
    tmp_path: Path, edit: dict, message: str
) -> None:
    path, _, _ = _train_checkpoint(tmp_path / "last.pt", "cifar10")
    ckpt = torch.load(path, weights_only=True)
    torch.save({**ckpt, **edit, "config": {**ckpt["config"], **edit.get("config", {})}}, path)
    with pytest.raises(CheckpointError, match=re.escape(f"training checkpoint {path} has ") + message):
        load_model(path)


def test_a_headless_training_checkpoint_loads_as_a_feature_extractor(tmp_path: Path) -> None:
    """``num_classes`` 0 (a run without a classifier head) is a valid record: the model is rebuilt headless,
    its output the pooled features."""
    path, trained, _ = _train_checkpoint(tmp_path / "last.pt", "imagefolder")
    ckpt = torch.load(path, weights_only=True)
    headless = {k: v for k, v in ckpt["model"].items() if not k.startswith("head.")}
    assert len(headless) == len(ckpt["model"]) - 2
    config = {**ckpt["config"], "num_classes": 0}
    torch.save({**ckpt, "model": headless, "ema": {}, "config": config, "classes": []}, path)
    model, info = rebuild_model(path)
    assert info["train_config"]["num_classes"] == 0 and info["classes"] is None
    assert model.num_classes == 0 and isinstance(model.head, torch.nn.Identity)
    assert model.stage_specs == trained.stage_specs and model.img_size == (64, 64)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        features = model(x)
        assert features.shape == (2, 32)
        pooled = trained.forward_head(trained.forward_features(x, cls_only=True), pre_logits=True)
        assert torch.equal(features, pooled)  # the trained model's cls token, before its head


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"model": "cvt_99"}, "unknown model 'cvt_99'"),
        ({"model_args": {"method": "conv"}}, "projection method must be one of"),
        ({"model_args": {"depth": [1, 2]}}, "depth has 2 values for 3 stages"),
    ],
)
def test_a_recorded_architecture_that_cannot_be_built_is_the_files_error(
    tmp_path: Path, edit: dict, message: str
) -> None:
    """Was a UsageError (a bad option, exit 2) that did not name the file."""
    path, _, _ = _train_checkpoint(tmp_path / "last.pt", "cifar10")
    ckpt = torch.load(path, weights_only=True)
    torch.save({**ckpt, "config": {**ckpt["config"], **edit}}, path)
    expected = re.escape(f"{path}: its config describes a model that cannot be built: ") + message
    with pytest.raises(CheckpointError, match=expected):
        load_model(path)


def test_an_hf_config_that_cannot_be_built_is_the_files_error_and_a_bad_act_the_callers(
    tmp_path: Path,
) -> None:
    out = export_hf(create_model("cvt_13", num_classes=3, act="gelu"), tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "qkv_projection_method": ["conv"] * 3}))
    with pytest.raises(CheckpointError, match=r"config.json describes a model that cannot be built"):
        load_model(out)
    with pytest.raises(UsageError, match=r"act must be one of \['gelu', 'quick_gelu'\], got 'foo'"):
        load_model(out, act="foo")


def test_a_file_whose_head_contradicts_its_recorded_class_count_says_so(tmp_path: Path, tiny: CvT) -> None:
    """The model is built from the file's own record, so the hint of a model built by the caller
    (num_classes=, the CLI's --num-classes) cannot help: no command that reads a file has that option."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path, _, _ = _train_checkpoint(tmp_path / "last.pt", "cifar10")
    ckpt = torch.load(path, weights_only=True)
    ckpt["config"]["num_classes"] = 3
    torch.save(ckpt, path)
    with pytest.raises(
        CheckpointError, match=r"has a 4-class head but its config's num_classes is 3: the"
    ) as e:
        load_model(path)
    assert "num-classes" not in str(e.value) and "ignore_head" not in str(e.value)
    native = save_checkpoint(tiny, tmp_path / "tiny.safetensors")
    with safe_open(str(native), "pt") as f:
        metadata = f.metadata()
    arch = json.loads(metadata["cvt_arch"])
    edited = {**metadata, "cvt_arch": json.dumps({**arch, "num_classes": 3})}
    save_file(load_file(str(native)), str(tmp_path / "bad.safetensors"), metadata=edited)
    with pytest.raises(CheckpointError, match=r"10-class head but its cvt_arch metadata's num_classes is 3"):
        load_model(tmp_path / "bad.safetensors")


def test_cli_convert_keeps_a_training_checkpoints_config(tmp_path: Path, capsys) -> None:
    from cvt.cli.main import main

    path, trained, averaged = _train_checkpoint(tmp_path / "best.pt", "cifar10")
    out = tmp_path / "model.safetensors"
    assert main(["convert", str(path), "--output", str(out)]) == 0
    assert "4 classes, gelu" in capsys.readouterr().out
    model = load_model(out)
    assert model.act == "gelu" and model.img_size == (64, 64) and model.stage_specs == trained.stage_specs
    assert model.pretrained_cfg["label_names"][3] == "dog" and model.pretrained_cfg["crop_pct"] == 1.0
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    assert main(["convert", str(path), "--output", str(tmp_path / "ema.safetensors"), "--ema"]) == 0
    with torch.no_grad():  # (kernels may round differently with the tensors' memory alignment)
        torch.testing.assert_close(model(x), trained(x), rtol=0, atol=1e-6)
        torch.testing.assert_close(
            load_model(tmp_path / "ema.safetensors")(x), averaged(x), rtol=0, atol=1e-6
        )
    no_ema, _, _ = _train_checkpoint(tmp_path / "no_ema.pt", "cifar10", ema=False)
    capsys.readouterr()
    assert main(["convert", str(no_ema), "--output", str(tmp_path / "x.safetensors"), "--ema"]) == 1
    err = capsys.readouterr().err
    assert "no_ema.pt has no EMA weights" in err and err.count("\n") == 1


# ------------------------------------------------------------------------------ half precision
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_files_load_as_float32(tmp_path: Path, tiny: CvT, images: torch.Tensor, dtype) -> None:
    half = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tiny.state_dict().items()}
    torch.save(half, tmp_path / "half.pth")
    model = load_model(tmp_path / "half.pth")
    dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    assert dtypes == {k: v.dtype for k, v in tiny.state_dict().items()}  # float32, int64 counters
    assert dtypes["stage0.patch_embed.proj.weight"] == torch.float32
    assert torch.equal(model.head.weight, half["head.weight"].float())
    with torch.no_grad():
        assert (model(images) - tiny(images)).abs().max().item() < 0.05  # half-precision rounding only
    half_model = _fresh().to(dtype)
    save_checkpoint(half_model, tmp_path / "half.safetensors")
    assert load_model(tmp_path / "half.safetensors").head.weight.dtype == torch.float32


def test_model_from_architecture_builds_on_the_callers_device(tmp_path: Path, tiny: CvT) -> None:
    from cvt.checkpoint.native import model_from_architecture

    arch = read_state_dict(save_checkpoint(tiny, tmp_path / "tiny.safetensors"))[2]["arch"]
    with torch.device("meta"):  # what load_model does: no random init of tensors the file replaces
        assert model_from_architecture(arch).head.weight.is_meta
    assert model_from_architecture(arch).head.weight.device.type == "cpu"


# ------------------------------------------------------------------------------ bad files
def _write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"nope\.pth does not exist"):
        read_state_dict(tmp_path / "nope.pth")


@pytest.mark.parametrize("kind", ["empty", "random", "text", "truncated_pickle", "truncated_safetensors"])
def test_unreadable_files(tmp_path: Path, tiny: CvT, kind: str) -> None:
    if kind.startswith("truncated"):
        whole = tmp_path / "whole"
        if kind == "truncated_pickle":
            torch.save(tiny.state_dict(), whole)
        else:
            save_checkpoint(tiny, whole)
        data = whole.read_bytes()[: whole.stat().st_size // 2]
    else:
        data = {"empty": b"", "random": os.urandom(4096), "text": b"hello, not a checkpoint\n"}[kind]
    path = _write_bytes(tmp_path / f"{kind}.bin", data)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(_fresh(), path)
    message = str(err.value)
    assert str(path) in message and "\n" not in message
    assert ("empty" in message) if kind == "empty" else ("not a readable" in message)


@pytest.mark.parametrize("fmt", ["pickle", "safetensors"])
@pytest.mark.parametrize("error", [MemoryError(), torch.OutOfMemoryError("CUDA out of memory.")])
def test_out_of_memory_while_reading_is_not_called_a_damaged_file(
    tmp_path: Path, tiny: CvT, monkeypatch: pytest.MonkeyPatch, fmt: str, error: Exception
) -> None:
    """A checkpoint this machine cannot hold was "not a readable ... file (truncated or not a
    checkpoint?)"; the out-of-memory error goes through (the CLI words it)."""
    import safetensors

    def out_of_memory(*args, **kwargs):
        raise error

    if fmt == "pickle":
        path = tmp_path / "w.pth"
        torch.save(tiny.state_dict(), path)
        monkeypatch.setattr(torch, "load", out_of_memory)
    else:
        path = save_checkpoint(tiny, tmp_path / "w.safetensors")
        monkeypatch.setattr(safetensors, "safe_open", out_of_memory)
    with pytest.raises(type(error)):
        read_state_dict(path)


def test_no_state_dict_and_no_cvt_keys(tmp_path: Path) -> None:
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "meta.pt")
    with pytest.raises(CheckpointError, match=r"holds no state dict.*'epoch', 'lr'"):
        read_state_dict(tmp_path / "meta.pt")
    torch.save({"conv1.weight": torch.zeros(3)}, tmp_path / "resnet.pt")
    with pytest.raises(CheckpointError, match=r"holds no CvT weights.*'conv1\.weight'"):
        read_state_dict(tmp_path / "resnet.pt")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="holds a list, not a state dict"):
        read_state_dict(tmp_path / "list.pt")


def test_directory_without_config_or_weights(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"not a Hugging Face checkpoint.*no config\.json"):
        read_state_dict(tmp_path)
    run = tmp_path / "run"  # a `cvt train` run folder given where its checkpoint file was meant
    run.mkdir()
    (run / "best.pt").write_bytes(b"")
    (run / "last.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"run folder, not a checkpoint: pass .*best\.pt or .*last\.pt"):
        read_state_dict(run)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(
        CheckpointError, match=r"no weights: expected model\.safetensors or pytorch_model\.bin"
    ):
        read_state_dict(tmp_path)


class _Payload:
    """Unpickling this object would create a file: the attack ``weights_only`` must stop."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


def test_code_running_pickle_is_refused(tmp_path: Path, tiny: CvT) -> None:
    target = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": tiny.state_dict(), "extra": _Payload(target)}, path)
    with pytest.raises(CheckpointError, match=r"refused to load .*evil\.pth.*could run code"):
        load_checkpoint(_fresh(), path)
    assert not target.exists()


# ------------------------------------------------------------------------------ mismatches
def test_other_architecture_names_keys_and_variant(tmp_path: Path) -> None:
    with torch.device("meta"):  # shapes of CvT-13 with a 3x3 stem, zero weights: no init cost
        shapes = create_model("cvt_13_cifar", num_classes=10).state_dict()
    torch.save({k: torch.zeros(v.shape, dtype=v.dtype) for k, v in shapes.items()}, tmp_path / "c13.pth")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(_fresh(), tmp_path / "c13.pth")
    message = str(err.value)
    assert "unexpected key(s): stage1.blocks.1." in message  # CvT-13 has 2 blocks in stage 1, tiny 1
    assert "stage0.patch_embed.proj.weight (model [32, 3, 3, 3], checkpoint [64, 3, 3, 3])" in message
    assert "[(64, 1), (192, 2), (384, 10)] vs the model's [(32, 1), (64, 1), (128, 2)]" in message
    assert "it matches cvt or cvt_13_cifar" in message  # same shapes, other strides


def test_position_embeddings_of_another_size_say_to_build_at_the_checkpoints_img_size(tiny: CvT) -> None:
    hint = ". Position embeddings differ in size: build the model with the checkpoint's img_size"
    torch.manual_seed(0)
    at_48 = create_model("cvt_tiny", pos_embed=True, img_size=48).state_dict()
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(_fresh(pos_embed=True), at_48)
    assert str(err.value) == (
        "checkpoint state dict does not fit the model: 3 shape mismatch(es): stage0.pos_embed (model "
        "[1, 256, 32], checkpoint [1, 576, 32]), stage1.pos_embed (model [1, 64, 64], checkpoint "
        "[1, 144, 64]), stage2.pos_embed (model [1, 16, 128], checkpoint [1, 36, 128])" + hint
    )
    with pytest.raises(CheckpointError) as err:  # beside other mismatches (here the head)
        load_checkpoint(_fresh(pos_embed=True, num_classes=3), at_48)
    assert "head.weight (model [3, 128], checkpoint [10, 128])" in str(err.value)
    assert str(err.value).endswith(hint)
    with pytest.raises(CheckpointError) as err:  # missing, not of another size: no img_size to change
        load_checkpoint(_fresh(pos_embed=True), tiny.state_dict())
    assert str(err.value) == (
        "checkpoint state dict does not fit the model: 3 missing key(s): stage0.pos_embed, stage1.pos_embed, "
        "stage2.pos_embed"
    )


def test_a_prefix_is_stripped_only_when_every_key_has_it() -> None:
    t = torch.zeros(1)
    assert set(unwrap_state_dict({"module.stage0.x": t, "module.stage0.y": t})[0]) == {"stage0.x", "stage0.y"}
    assert set(unwrap_state_dict({"module.stage0.x": t, "stage0.y": t})[0]) == {"module.stage0.x", "stage0.y"}


def test_a_safetensors_file_named_pt_loads_by_its_bytes(tmp_path: Path, tiny: CvT) -> None:
    path = save_checkpoint(tiny, tmp_path / "weights.pt")
    assert _same_weights(load_model(path), tiny)


def test_strict_loading_names_unexpected_keys_and_non_strict_skips_them(tiny: CvT) -> None:
    state_dict = {**tiny.state_dict(), "extra.weight": torch.zeros(2)}
    with pytest.raises(CheckpointError, match=r"1 unexpected key\(s\): extra\.weight"):
        load_checkpoint(_fresh(), state_dict)
    model = _fresh()
    assert load_checkpoint(model, state_dict, strict=False).skipped == ("extra.weight",)
    assert _same_weights(model, tiny)


def test_a_batchnorm_layer_missing_from_the_checkpoint_is_missing_whole(tiny: CvT) -> None:
    """``num_batches_tracked`` is filled in for checkpoints that dropped the counters only, never for a
    layer the checkpoint lacks."""
    layer = "stage0.blocks.0.attn.conv_proj_q.bn."
    state_dict = {k: v for k, v in tiny.state_dict().items() if not k.startswith(layer)}
    missing = load_checkpoint(_fresh(), state_dict, strict=False).missing
    assert sorted(missing) == sorted(k for k in tiny.state_dict() if k.startswith(layer))


def test_a_shard_holding_a_tensor_its_index_does_not_list_is_refused(tmp_path: Path, tiny: CvT) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().clone().contiguous() for k, v in tiny.state_dict().items()}
    keys = list(tensors)
    parts = {"w-1.safetensors": keys[: len(keys) // 2], "w-2.safetensors": keys[len(keys) // 2 :]}
    for name, names in parts.items():
        save_file({k: tensors[k] for k in names}, str(tmp_path / name))
    index = tmp_path / "w.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {k: name for name, names in parts.items() for k in names}}))
    assert set(read_state_dict(index)[0]) == set(keys)
    stale = {**{k: tensors[k] for k in parts["w-2.safetensors"]}, keys[0]: torch.zeros_like(tensors[keys[0]])}
    save_file(stale, str(tmp_path / "w-2.safetensors"))  # a stale copy of a tensor shard 1 holds
    unlisted = rf"w-2\.safetensors does not match .* unlisted \['{keys[0]}'\]"
    with pytest.raises(CheckpointError, match=unlisted):
        read_state_dict(index)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda sd: sd.update({"head.weight": sd["head.weight"][:, :32]}), r"head.weight \(model \[10, 128"),
        (lambda sd: sd.pop("head.bias"), r"1 missing key\(s\): head.bias"),
    ],
    ids=["another input width", "no bias"],
)
def test_a_head_of_the_same_class_count_that_does_not_fit_names_the_key(
    tmp_path: Path, tiny: CvT, edit: object, message: str
) -> None:
    """Only a whole head for another class count gets the num_classes advice (it read "has a 10-class
    head, the model has 10 classes: build the model with num_classes=10")."""
    state_dict = dict(tiny.state_dict())
    edit(state_dict)
    torch.save(state_dict, tmp_path / "edited.pth")
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(_fresh(), tmp_path / "edited.pth")
    assert "num_classes=" not in str(info.value)


def test_head_mismatch_says_how_to_fix(tmp_path: Path, tiny: CvT) -> None:
    path = save_checkpoint(tiny, tmp_path / "tiny.safetensors")
    model = _fresh(num_classes=3)
    with pytest.raises(CheckpointError, match=r"10-class head.*3 classes.*num_classes=10.*ignore_head=True"):
        load_checkpoint(model, path)
    head_before = model.head.weight.clone()
    result = load_checkpoint(model, path, ignore_head=True)
    assert set(result.skipped) == {"head.weight", "head.bias"}
    assert torch.equal(model.head.weight, head_before)
    assert torch.equal(model.stage2.blocks[1].mlp.fc2.weight, tiny.stage2.blocks[1].mlp.fc2.weight)


def test_non_strict_loads_what_fits(tiny: CvT) -> None:
    model = _fresh(depth=(1, 1, 3))  # one more block in the last stage
    result = load_checkpoint(model, tiny.state_dict(), strict=False)
    assert result.format == "official" and result.skipped == ()
    assert result.missing and all(k.startswith("stage2.blocks.2.") for k in result.missing)
    assert torch.equal(model.stage2.blocks[1].attn.proj.weight, tiny.stage2.blocks[1].attn.proj.weight)


def test_matching_variants(tiny: CvT) -> None:
    assert matching_variants(tiny.state_dict()) == ["cvt_tiny"]
    assert matching_variants(_fresh(embed_dim=(16, 64, 128)).state_dict()) == []
    assert matching_variants(_fresh(in_chans=1).state_dict()) == ["cvt_tiny"]  # a grayscale cvt_tiny


def test_a_grayscale_state_dict_without_its_architecture_loads_with_its_channel_count(
    tmp_path: Path, images: torch.Tensor
) -> None:
    """A bare state dict of an ``in_chans=1`` model (``torch.save(model.state_dict())``): the variant is
    found and rebuilt with the stem's channel count, as the class count is taken from the head."""
    torch.manual_seed(0)
    gray = create_model("cvt_tiny", in_chans=1, num_classes=4).eval()
    torch.save({"model": gray.state_dict()}, tmp_path / "gray.pth")
    x = images[:, :1]  # (B, 1, H, W)
    for kwargs in ({}, {"model_name": "cvt_tiny"}):
        model = load_model(tmp_path / "gray.pth", **kwargs)
        assert model.in_chans == 1 and model.num_classes == 4
        with torch.no_grad():
            assert torch.equal(model(x), gray(x))


def test_a_state_dict_without_batchnorm_counters_is_recognised(
    tmp_path: Path, tiny: CvT, images: torch.Tensor
) -> None:
    """Some exports drop ``num_batches_tracked``; loading fills it in, so detection must not need it."""
    from cvt.checkpoint.hf import native_to_hf

    sd = {k: v for k, v in tiny.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert matching_variants(sd) == ["cvt_tiny"]
    torch.save(sd, tmp_path / "official.pth")
    torch.save(native_to_hf(sd), tmp_path / "pytorch_model.bin")  # a weight file without config.json
    for name in ("official.pth", "pytorch_model.bin"):
        model = load_model(tmp_path / name)
        with torch.no_grad():
            torch.testing.assert_close(model(images), tiny(images), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------ own format
def _without_crop_marker(path: Path) -> None:
    """Rewrite the cvt file at ``path`` as versions before ``crop_as_recorded`` wrote it."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    arch = json.loads(metadata["cvt_arch"])
    del arch["crop_as_recorded"]
    save_file(tensors, str(path), metadata={**metadata, "cvt_arch": json.dumps(arch)})


def test_a_384_file_written_before_squashing_is_evaluated_as_the_official_384_models(tmp_path: Path) -> None:
    """Files saved before 384 evaluation squashed the image recorded the official rule as crop 1.0, center."""
    with torch.device("meta"):
        model = create_model("cvt_13.msft_in1k_384")
    model.pretrained_cfg = {**model.pretrained_cfg, "crop_pct": 1.0, "crop_mode": "center"}  # an old file
    path = save_checkpoint(model.to_empty(device="cpu"), tmp_path / "old384.safetensors")
    _without_crop_marker(path)
    cfg = load_model(path).pretrained_cfg
    assert (cfg["crop_pct"], cfg["crop_mode"]) == (1.0, "squash")


def test_a_new_file_keeps_a_whole_image_center_crop_above_224(tmp_path: Path) -> None:
    """A model evaluated at 256 with crop 1.0, center (a transformers folder whose preprocessor says so)
    saved now reads back as it was: the rewrite for old files turned it into squash, so `cvt convert`
    changed how `cvt predict` treats non-square images."""
    model = create_model("cvt_13", img_size=256)
    model.pretrained_cfg = {
        **model.pretrained_cfg,
        "input_size": (3, 256, 256),
        "crop_pct": 1.0,
        "crop_mode": "center",
    }
    cfg = load_model(save_checkpoint(model, tmp_path / "center256.safetensors")).pretrained_cfg
    assert (cfg["crop_pct"], cfg["crop_mode"]) == (1.0, "center")


def test_a_whole_image_config_built_above_224_keeps_its_crop_through_a_save(tmp_path: Path) -> None:
    """cvt_tiny crops nothing (crop 1.0, center, recorded at 32 px): built at 256 and saved, it must not
    read back as an old 384 file and start squashing."""
    model = create_model("cvt_tiny", img_size=256)
    before = resolve_data_config(model)
    path = save_checkpoint(model, tmp_path / "tiny256.safetensors")
    after = resolve_data_config(load_model(path))
    assert (
        (after["crop_pct"], after["crop_mode"])
        == (before["crop_pct"], before["crop_mode"])
        == (1.0, "center")
    )


def test_loading_into_a_model_of_another_architecture_than_the_file_records_is_warned(tmp_path: Path) -> None:
    """The shapes fit but the strides, heads, activation, LayerNorm eps or pooling differ: the weights
    loaded without a word and the logits moved by up to 0.93 (cvt_13_cifar's file into `cvt`)."""
    source = create_model("cvt_13_cifar")
    path = save_checkpoint(source, tmp_path / "cifar.safetensors")
    with pytest.warns(
        UserWarning, match=r"records another architecture .*stage0 patch_stride 1 \(the model: 4\)"
    ):
        create_model("cvt", checkpoint_path=path)
    tiny = create_model("cvt_tiny", act="gelu", global_pool="avg", norm_eps=1e-6)
    path = save_checkpoint(tiny, tmp_path / "tiny.safetensors")
    expected = "act 'gelu' (the model: 'quick_gelu'), norm_eps 1e-06 (the model: 1e-05), global_pool 'avg'"
    with pytest.warns(UserWarning, match=re.escape(expected)):
        load_checkpoint(create_model("cvt_tiny"), path)
    # transformers' folder records the activation as hidden_act (its stage i needs i + 1 blocks)
    export_hf(create_model("cvt_tiny", depth=[1, 2, 3], act="gelu"), tmp_path / "hf")
    with pytest.warns(UserWarning, match=re.escape("act 'gelu' (the model: 'quick_gelu')")):
        load_checkpoint(create_model("cvt_tiny", depth=[1, 2, 3]), tmp_path / "hf")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the file's own architecture: no warning
        load_checkpoint(create_model("cvt_tiny", act="gelu", global_pool="avg", norm_eps=1e-6), path)


def test_unusable_architecture_metadata_is_a_checkpoint_error(tmp_path: Path, tiny: CvT) -> None:
    """A ``cvt_arch`` of null or a list was a raw AttributeError; a global_pool no CvT has was taken
    (``max``: logits per token); a Path in the pretrained_cfg made saving a TypeError."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    tiny.pretrained_cfg = {**tiny.pretrained_cfg, "file": tmp_path / "weights.pth"}  # timm's overlay
    path = save_checkpoint(tiny, tmp_path / "tiny.safetensors")
    assert load_model(path).pretrained_cfg["file"] == str(tmp_path / "weights.pth")
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    arch = json.loads(metadata["cvt_arch"])
    for bad, message in (
        ("null", "holds a JSON NoneType, expected an object"),
        ("[]", "holds a JSON list, expected an object"),
        (
            json.dumps({**arch, "global_pool": "max"}),
            "architecture metadata is incomplete or invalid.*global_pool",
        ),
    ):
        save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={**metadata, "cvt_arch": bad})
        with pytest.raises(CheckpointError, match=message):
            load_model(tmp_path / "bad.safetensors")


def test_architecture_metadata_without_final_norm_keeps_the_final_norm(
    tmp_path: Path, tiny: CvT, images: torch.Tensor
) -> None:
    """``final_norm`` was added to ``cvt_arch`` later: a file that does not record it has its LayerNorm."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from cvt.checkpoint.native import model_from_architecture

    path = save_checkpoint(tiny, tmp_path / "tiny.safetensors")
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    arch = json.loads(metadata["cvt_arch"])
    assert arch.pop("final_norm") is True
    assert isinstance(model_from_architecture(arch).norm, torch.nn.LayerNorm)
    assert isinstance(model_from_architecture({**arch, "final_norm": False}).norm, torch.nn.Identity)
    old = tmp_path / "old.safetensors"
    save_file(load_file(str(path)), str(old), metadata={**metadata, "cvt_arch": json.dumps(arch)})
    model = load_model(old)  # strict: the file's norm.weight and norm.bias need the LayerNorm
    assert isinstance(model.norm, torch.nn.LayerNorm) and torch.equal(model.norm.weight, tiny.norm.weight)
    with torch.no_grad():
        assert torch.equal(model(images), tiny(images))


def test_native_round_trip(tmp_path: Path, tiny: CvT, images: torch.Tensor) -> None:
    tiny.pretrained_cfg["label_names"] = [str(d) for d in range(10)]
    path = save_checkpoint(tiny, tmp_path / "sub" / "tiny.safetensors")
    _, fmt, info = read_state_dict(path)
    assert fmt == "cvt" and info["arch"]["variant"] == "cvt_tiny"
    assert info["arch"]["stages"][2]["depth"] == 2 and info["arch"]["img_size"] == [32, 32]
    model = load_model(path)
    assert not model.training and model.stage_specs == tiny.stage_specs and model.act == tiny.act
    assert model.pretrained_cfg["input_size"] == (3, 32, 32) and model.pretrained_cfg["label_names"][9] == "9"
    with torch.no_grad():
        assert torch.equal(model(images), tiny(images))
    assert _same_weights(create_model("cvt_tiny", checkpoint_path=path), tiny)  # via create_model too


def test_native_keeps_custom_architecture(tmp_path: Path, images: torch.Tensor) -> None:
    custom = _fresh(pos_embed=True, method=("avg", "dw_bn", "linear"), act="gelu", num_classes=4)
    path = save_checkpoint(custom, tmp_path / "custom.safetensors", variant="my_cvt")
    model = load_model(path)
    assert model.stage_specs == custom.stage_specs and model.act == "gelu" and model.num_classes == 4
    with torch.no_grad():
        assert torch.equal(model(images), custom(images))


def test_save_unwraps_wrapped_models(tmp_path: Path, tiny: CvT) -> None:
    from timm.utils import ModelEmaV3

    for i, wrapped in enumerate((torch.nn.DataParallel(tiny), ModelEmaV3(tiny))):
        sd, _, info = read_state_dict(save_checkpoint(wrapped, tmp_path / f"w{i}.safetensors"))
        assert info["nested_key"] is None and sd.keys() == tiny.state_dict().keys()
        assert info["arch"]["variant"] == "cvt_tiny"


def test_save_refuses_to_overwrite(tmp_path: Path, tiny: CvT) -> None:
    path = tmp_path / "user.safetensors"
    path.write_bytes(b"precious")
    with pytest.raises(UsageError) as refused:  # a usage problem like every refused output (CLI exit 2)
        save_checkpoint(tiny, path)
    assert str(refused.value) == (
        f"refusing to overwrite {path}: choose another path or pass overwrite=True (CLI: --overwrite)"
    )
    assert path.read_bytes() == b"precious"
    save_checkpoint(tiny, path, overwrite=True)
    assert read_state_dict(path)[1] == "cvt"
    assert [p.name for p in tmp_path.iterdir()] == ["user.safetensors"]  # no temporary file left


def test_a_torchscript_export_is_named_as_such(tmp_path: Path, tiny: CvT) -> None:
    from cvt.export import export_model

    path = export_model(tiny, "torchscript", tmp_path / "model.pt")
    for load in (read_state_dict, load_model):
        with pytest.raises(CheckpointError, match=r"model\.pt is a TorchScript export .* not a checkpoint"):
            load(path)


def test_an_onnx_export_or_a_config_json_is_named_as_such(tmp_path: Path) -> None:
    """They read as a damaged pickle ("UnpicklingError: Unsupported operand 123" for a config.json)."""
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "cvt", "embed_dim": [64, 192, 384]}')
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"\x08\x07\x12\x07pytorch")  # an ONNX protobuf's first bytes
    for load in (read_state_dict, load_model):
        with pytest.raises(
            CheckpointError, match=r"config\.json is a JSON file, not a checkpoint: .*pass the folder"
        ):
            load(tmp_path / "hf" / "config.json")
        with pytest.raises(CheckpointError, match=r"model\.onnx is an ONNX export, not a checkpoint"):
            load(onnx)


def test_pytorchs_own_averaged_model_loads_as_the_ema(tmp_path: Path, tiny: CvT) -> None:
    """``torch.optim.swa_utils.AveragedModel`` saves ``n_averaged`` beside ``module.*``: it read as
    "holds no CvT weights"."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    ema = AveragedModel(tiny, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    with torch.no_grad():
        for p in ema.module.parameters():
            p.add_(1.0)  # the EMA's weights differ from the model's
    torch.save({"model": tiny.state_dict(), "ema": ema.state_dict()}, tmp_path / "train.pth")
    model = create_model("cvt_tiny")
    load_checkpoint(model, tmp_path / "train.pth", use_ema=True)
    for name, value in ema.module.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=0, atol=0, msg=name)


def test_load_model_of_official_state_dict(tmp_path: Path, tiny: CvT, images: torch.Tensor) -> None:
    torch.save({"model": tiny.state_dict()}, tmp_path / "official.pth")
    model = load_model(tmp_path / "official.pth")  # the only variant with these shapes
    assert model.pretrained_cfg["architecture"] == "cvt_tiny" and model.num_classes == 10
    with torch.no_grad():
        assert torch.equal(model(images), tiny(images))
    with torch.device("meta"):  # shapes of CvT-13 with a 3x3 stem, zero weights: no init cost
        shapes = create_model("cvt_13_cifar", num_classes=4).state_dict()
    torch.save({k: torch.zeros(v.shape, dtype=v.dtype) for k, v in shapes.items()}, tmp_path / "c13.pth")
    with pytest.raises(CheckpointError, match=r"matches cvt and cvt_13_cifar: pass model_name="):
        load_model(tmp_path / "c13.pth")
    model = load_model(tmp_path / "c13.pth", model_name="cvt_13_cifar", act="gelu")
    assert model.num_classes == 4 and model.act == "gelu" and model.stage_specs[0].patch_stride == 1
    native = save_checkpoint(tiny, tmp_path / "tiny.safetensors")
    with pytest.raises(UsageError, match=r"is a cvt_tiny file; .* 'cvt_13' names another"):
        load_model(native, model_name="cvt_13")
    assert load_model(native, model_name="cvt_tiny").num_classes == 10  # its own name is accepted
    # transformers' config names no variant (depths 1/2/3: the least transformers' CvT can hold)
    hf = export_hf(create_model("cvt_tiny", depth=(1, 2, 3), act="gelu"), tmp_path / "hf")
    with pytest.raises(UsageError, match=r"its architecture, no variant name; .* cannot be checked"):
        load_model(hf, model_name="cvt_tiny")


def test_a_failed_hf_export_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Everything is computed before the first write, and the three files are written together: a
    failure (here while making preprocessor_config.json, then a full disk on the second file) left
    model.safetensors and config.json behind, or replaced an earlier export's files with half of a new one."""
    import errno

    import cvt.checkpoint.hf as hf

    model = create_model("cvt_tiny", depth=(1, 2, 3), act="gelu")

    def broken(model):
        raise RuntimeError("injected")

    with monkeypatch.context() as patch:
        patch.setattr(hf, "hf_preprocessor_from_model", broken)
        with pytest.raises(RuntimeError, match="injected"):
            export_hf(model, tmp_path / "new")
    assert not (tmp_path / "new").exists()

    out = export_hf(model, tmp_path / "hf")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    torch.manual_seed(7)
    other = create_model("cvt_tiny", depth=(1, 2, 3), act="gelu", img_size=48)
    with monkeypatch.context() as patch:
        patch.setattr(hf, "hf_preprocessor_from_model", broken)
        with pytest.raises(RuntimeError, match="injected"):
            export_hf(other, out, overwrite=True)
    real_fsync, calls = os.fsync, []

    def full_disk_on_second_file(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", full_disk_on_second_file)
        with pytest.raises(OSError, match="No space left"):
            export_hf(other, out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no temporary file either
    export_hf(other, out, overwrite=True)
    assert load_model(out).img_size == (48, 48)


# ------------------------------------------------------------------------------ official YAML
CVT_13_YAML = """\
OUTPUT_DIR: 'OUTPUT/'
MODEL:
  NAME: cls_cvt
  SPEC:
    INIT: 'trunc_norm'
    NUM_STAGES: 3
    PATCH_SIZE: [7, 3, 3]
    PATCH_STRIDE: [4, 2, 2]
    PATCH_PADDING: [2, 1, 1]
    DIM_EMBED: [64, 192, 384]
    NUM_HEADS: [1, 3, 6]
    DEPTH: [1, 2, 10]
    MLP_RATIO: [4.0, 4.0, 4.0]
    ATTN_DROP_RATE: [0.0, 0.0, 0.0]
    DROP_RATE: [0.0, 0.0, 0.0]
    DROP_PATH_RATE: [0.0, 0.0, 0.1]
    QKV_BIAS: [True, True, True]
    CLS_TOKEN: [False, False, True]
    POS_EMBED: [False, False, False]
    QKV_PROJ_METHOD: ['dw_bn', 'dw_bn', 'dw_bn']
    KERNEL_QKV: [3, 3, 3]
    PADDING_KV: [1, 1, 1]
    STRIDE_KV: [2, 2, 2]
    PADDING_Q: [1, 1, 1]
    STRIDE_Q: [1, 1, 1]
TRAIN:
  BATCH_SIZE_PER_GPU: 256
  IMAGE_SIZE: [384, 384]
TEST:
  IMAGE_SIZE: [384, 384]
  CENTER_CROP: False
"""


def test_official_yaml_builds_cvt_13(tmp_path: Path) -> None:
    path = tmp_path / "cvt-13-384x384.yaml"
    path.write_text(CVT_13_YAML)
    with torch.device("meta"):
        model = create_model_from_official_yaml(path)
        reference = create_model("cvt_13")
    assert count_params(model) == 19_997_480 == count_params(reference)
    assert model.stage_specs == reference.stage_specs and model.num_classes == 1000
    assert model.img_size == (384, 384) and model.pretrained_cfg["crop_pct"] == 1.0
    assert model.pretrained_cfg["crop_mode"] == "squash"  # CENTER_CROP False: T.Resize((384, 384))
    with torch.device("meta"):
        assert create_model_from_official_yaml(path, num_classes=5).num_classes == 5


def test_official_yaml_sizes_the_model_by_training_and_preprocesses_by_test() -> None:
    """TRAIN.IMAGE_SIZE sizes the model (its grids, position embeddings); TEST.IMAGE_SIZE is the
    evaluation input of its preprocessing."""
    doc = yaml.safe_load(CVT_13_YAML)
    doc["TRAIN"]["IMAGE_SIZE"] = [224, 224]
    with torch.device("meta"):
        model = create_model_from_official_yaml(doc)
        test_only = create_model_from_official_yaml({**doc, "TRAIN": {}})
    assert model.img_size == (224, 224) and model.pretrained_cfg["input_size"] == (3, 384, 384)
    assert test_only.img_size == (384, 384)


def test_official_yaml_image_sizes_are_width_then_height() -> None:
    """The official config: ``IMAGE_SIZE = [224, 224]  # width * height``; its evaluation resizes to
    ``(IMAGE_SIZE[1], IMAGE_SIZE[0])``. A non-square [256, 192] is 192 pixels high."""
    doc = yaml.safe_load(CVT_13_YAML)
    doc["TRAIN"]["IMAGE_SIZE"] = doc["TEST"]["IMAGE_SIZE"] = [256, 192]
    with torch.device("meta"):
        model = create_model_from_official_yaml(doc)
    assert model.img_size == (192, 256) and model.pretrained_cfg["input_size"] == (3, 192, 256)


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [  # each was a raw ValueError or TypeError
        ("TRAIN", "IMAGE_SIZE", [224, "wide"], r"IMAGE_SIZE must be N or \[W, H\] in whole numbers"),
        ("TEST", "IMAGE_SIZE", 224.5, r"IMAGE_SIZE must be N or \[W, H\]"),
        ("MODEL", "NUM_CLASSES", "ten", "num_classes must be a whole number >= 0"),
        ("INPUT", "MEAN", 0.5, "INPUT.MEAN must be a list of numbers, one per channel, got 0.5"),
        ("INPUT", "STD", ["x"], r"INPUT\.STD must be a list of numbers, one per channel, got \['x'\]"),
    ],
)
def test_official_yaml_values_of_the_wrong_kind_are_named(
    section: str, key: str, value, message: str
) -> None:
    doc = yaml.safe_load(CVT_13_YAML)
    doc.setdefault(section, {})[key] = value
    with pytest.raises(UsageError, match=message), torch.device("meta"):
        create_model_from_official_yaml(doc)


def test_official_yaml_input_mean_and_std_are_the_preprocessing(tmp_path: Path) -> None:
    doc = yaml.safe_load(CVT_13_YAML)
    doc["INPUT"] = {"MEAN": [0.1, 0.2, 0.3], "STD": [0.25, 0.5, 0.75]}
    path = tmp_path / "cvt-13-stats.yaml"
    path.write_text(yaml.safe_dump(doc))
    with torch.device("meta"):
        model = create_model_from_official_yaml(path)
        default = create_model_from_official_yaml({**doc, "INPUT": {}})
    assert model.pretrained_cfg["mean"] == (0.1, 0.2, 0.3)
    assert model.pretrained_cfg["std"] == (0.25, 0.5, 0.75)
    data_config = resolve_data_config(model)
    assert (data_config["mean"], data_config["std"]) == ((0.1, 0.2, 0.3), (0.25, 0.5, 0.75))
    # without INPUT: the official default, ImageNet's statistics
    assert default.pretrained_cfg["mean"] == (0.485, 0.456, 0.406)
    assert default.pretrained_cfg["std"] == (0.229, 0.224, 0.225)


def test_official_yaml_without_center_crop_gets_the_official_default() -> None:
    """The official code center-crops at 0.875 unless ``TEST.CENTER_CROP`` is false."""
    doc = yaml.safe_load(CVT_13_YAML)
    del doc["TEST"]["CENTER_CROP"]
    with torch.device("meta"):
        cfg = create_model_from_official_yaml(doc).pretrained_cfg
    assert (cfg["crop_pct"], cfg["crop_mode"]) == (0.875, "center")


def test_official_yaml_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        create_model_from_official_yaml(tmp_path / "missing.yaml")
    (tmp_path / "model.pth").write_bytes(b"PK\x03\x04\xff\xfe")
    with pytest.raises(UsageError, match=r"model\.pth is not a YAML file: byte 4 is not UTF-8 text"):
        create_model_from_official_yaml(tmp_path / "model.pth")
    (tmp_path / "list.yaml").write_text("- MODEL\n")
    with pytest.raises(
        UsageError, match=r"list\.yaml must be a mapping of experiment sections .* got a YAML list"
    ):
        create_model_from_official_yaml(tmp_path / "list.yaml")
    (tmp_path / "bad.yaml").write_text("TRAIN:\n  LR: 0.1\n")
    with pytest.raises(UsageError, match=r"no MODEL\.SPEC"):
        create_model_from_official_yaml(tmp_path / "bad.yaml")
    with pytest.raises(UsageError, match=r"unknown MODEL\.SPEC key"):
        create_model_from_official_yaml({"MODEL": {"SPEC": {"DIM_EMBED": [8], "DEPTHS": [1]}}})


# ------------------------------------------------------------------------------ cvt convert
def test_cli_convert(tmp_path: Path, tiny: CvT, images: torch.Tensor, capsys: pytest.CaptureFixture) -> None:
    from cvt.cli.main import main

    torch.save({"state_dict": {f"module.{k}": v for k, v in tiny.state_dict().items()}}, tmp_path / "o.pth")
    out = tmp_path / "tiny.safetensors"
    assert main(["convert", str(tmp_path / "o.pth"), "--output", str(out)]) == 0
    assert "cvt_tiny" in capsys.readouterr().out
    with torch.no_grad():
        assert torch.equal(load_model(out)(images), tiny(images))
    # exists: refused before reading the source, with the exit code of every other command's refusal
    assert main(["convert", str(tmp_path / "missing.pth"), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err == f"cvt convert: error: refusing to overwrite {out}: choose another --output or pass --overwrite"
    )
    # --overwrite (as in cvt train/eval/ablate) replaces it; --force is the same flag
    for seed, flag in enumerate(("--overwrite", "--force"), start=1):
        torch.manual_seed(seed)
        other = create_model("cvt_tiny").eval()
        torch.save(other.state_dict(), tmp_path / "other.pth")
        assert main(["convert", str(tmp_path / "other.pth"), "--output", str(out), flag]) == 0
        with torch.no_grad():
            assert torch.equal(load_model(out)(images), other(images))
    capsys.readouterr()
    # cvt_tiny has one block in stage 1: transformers' CvT cannot hold it
    assert main(["convert", str(out), "--output", str(tmp_path / "hf"), "--to", "hf"]) == 1
    assert "drop-path rates by stage" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def test_cli_convert_refuses_an_output_written_while_it_reads(
    tmp_path: Path, tiny: CvT, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An output that another process writes after convert's first check is refused by save_checkpoint
    itself: the same usage error (exit 2) as the check before reading, and the file is kept."""
    import cvt.checkpoint
    from cvt.cli.main import main

    source = save_checkpoint(tiny, tmp_path / "tiny.safetensors")
    out = tmp_path / "out.safetensors"
    real_load_model = cvt.checkpoint.load_model

    def load_while_another_writes(*args, **kwargs) -> CvT:
        out.write_bytes(b"precious")
        return real_load_model(*args, **kwargs)

    monkeypatch.setattr(cvt.checkpoint, "load_model", load_while_another_writes)
    assert main(["convert", str(source), "--output", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"cvt convert: error: refusing to overwrite {out}: choose another path or pass overwrite=True "
        f"(CLI: --overwrite)\n"
    )
    assert out.read_bytes() == b"precious"


def test_save_checkpoint_keeps_the_previous_file_when_the_disk_is_full(tmp_path: Path, monkeypatch) -> None:
    """The native save goes through the fsync'd atomic write: a failure leaves the old file whole."""
    import os

    from cvt.checkpoint import load_model, save_checkpoint
    from cvt.models import create_model

    path = save_checkpoint(create_model("cvt_tiny", num_classes=3), tmp_path / "m.safetensors")
    before = path.read_bytes()

    def full_disk(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(create_model("cvt_tiny", num_classes=3), path, overwrite=True)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]
    monkeypatch.undo()
    assert load_model(path).num_classes == 3


def test_official_yaml_dropout_rates_land_in_their_fields() -> None:
    spec = {"DIM_EMBED": [8, 16], "DEPTH": [1, 1], "NUM_HEADS": [1, 2], "DROP_RATE": [0.1, 0.2]}
    spec |= {"ATTN_DROP_RATE": [0.3, 0.4], "DROP_PATH_RATE": [0.0, 0.05]}
    with torch.device("meta"):
        model = create_model_from_official_yaml({"MODEL": {"SPEC": spec}})
    assert [s.drop_rate for s in model.stage_specs] == [0.1, 0.2]
    assert [s.attn_drop_rate for s in model.stage_specs] == [0.3, 0.4]
    assert [s.drop_path_rate for s in model.stage_specs] == [0.0, 0.05]
    block = model.stage1.blocks[0]
    assert block.attn.attn_drop.p == 0.4 and block.mlp.drop1.p == 0.2
    assert block.attn.proj_drop.p == 0.2 and block.mlp.drop2.p == 0.2  # DROP_RATE: outputs of both


def test_native_keeps_the_global_pool(tmp_path: Path, images: torch.Tensor) -> None:
    custom = _fresh(global_pool="avg")
    assert custom.has_cls_token  # its default pooling would be the cls token
    path = save_checkpoint(custom, tmp_path / "avg.safetensors")
    model = load_model(path)
    assert model.global_pool == "avg"
    with torch.no_grad():
        assert torch.equal(model(images), custom(images))
        assert not torch.allclose(_fresh()(images), custom(images))
