"""Exports load in their own runtimes and match the eager model; bad requests fail clearly."""

from __future__ import annotations

import copy
import importlib.util
import os
import warnings

import pytest
import torch

import cvt
from cvt.cli.main import main
from cvt.complexity import complexity, count_gmacs
from cvt.export import INPUT_NAME, OUTPUT_NAME, export_model, require_packages, run_exported, verify_export


def _with_batchnorm_statistics(model: cvt.CvT) -> cvt.CvT:
    """Non-trivial BatchNorm running statistics, so that a wrongly exported BatchNorm would show."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture(scope="module")
def tiny() -> cvt.CvT:
    torch.manual_seed(0)
    # depths 1/2/3: transformers' CvT needs at least i + 1 blocks in stage i (its drop-path indexing)
    return _with_batchnorm_statistics(cvt.create_model("cvt_tiny", depth=(1, 2, 3)))


@pytest.fixture(scope="module")
def tiny_pe() -> cvt.CvT:
    torch.manual_seed(1)
    return _with_batchnorm_statistics(cvt.create_model("cvt_tiny", pos_embed=(False, False, True)))


@pytest.fixture(autouse=True)
def _quiet_deprecations():
    with warnings.catch_warnings():  # torch.jit and the legacy ONNX exporter are deprecated upstream
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def test_onnx_matches_eager_with_a_dynamic_batch(tiny, tmp_path) -> None:
    path = export_model(tiny, "onnx", tmp_path / "m.onnx")
    for batch in (1, 5):  # traced with batch 2
        images = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            expected = tiny(images)
        torch.testing.assert_close(run_exported("onnx", path, images), expected, atol=1e-4, rtol=0)


def test_onnx_input_and_output_share_the_dynamic_batch_axis(tiny, tmp_path) -> None:
    """Both the image and the logits have batch axis "batch" in the graph (not the traced 2): runtimes
    that check shapes, or allocate the output from the graph's, take any batch."""
    import onnx

    graph = onnx.load(str(export_model(tiny, "onnx", tmp_path / "m.onnx"))).graph
    assert [v.name for v in graph.input] == [INPUT_NAME] and [v.name for v in graph.output] == [OUTPUT_NAME]
    dims = {v.name: v.type.tensor_type.shape.dim for v in (*graph.input, *graph.output)}
    assert [(d.dim_param, d.dim_value) for d in dims[INPUT_NAME]] == [
        ("batch", 0),
        ("", 3),
        ("", 32),
        ("", 32),
    ]
    # cvt_tiny: 10 classes
    assert [(d.dim_param, d.dim_value) for d in dims[OUTPUT_NAME]] == [("batch", 0), ("", 10)]


@pytest.mark.slow
@pytest.mark.parametrize("img_size", [(48, 40), (32, 32)], ids=["resized", "native"])
def test_onnx_with_position_embedding_exports_without_tracer_warnings(tiny_pe, tmp_path, img_size) -> None:
    # at 48x40 the traced graph resizes the last stage's 4x4 position embedding to 6x5 (bicubic); at the
    # native 32x32 it adds it as is. Either way the comparison of the grids must not warn.
    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)
        path = export_model(tiny_pe, "onnx", tmp_path / "m.onnx", img_size=img_size)
    assert verify_export(tiny_pe, "onnx", path, img_size=img_size) < 1e-4


@pytest.mark.slow
def test_torchscript_loads_without_cvt_and_matches(tiny, tmp_path) -> None:
    path = export_model(tiny, "torchscript", tmp_path / "m.pt")
    loaded = torch.jit.load(str(path))
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), tiny(images), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("fmt", "name"), [("safetensors", "m.safetensors"), ("hf", "hf")])
def test_checkpoint_formats_rebuild_the_model(tiny, tmp_path, fmt, name) -> None:
    # (transformers' own loading of the hf folder is tested with the checkpoint package)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = export_model(tiny, fmt, tmp_path / name, variant="cvt_tiny")
    # an hf folder says that transformers runs GELU where this model runs QuickGELU; safetensors is silent
    assert ["always runs GELU" in str(w.message) for w in caught] == ([True] if fmt == "hf" else [])
    assert verify_export(tiny, fmt, path) < 1e-5


def test_verify_export_reports_the_largest_logit_difference(tmp_path) -> None:
    """Against the eager model as it is now: one logit moved by 1.0 after the export shows as 1.0."""
    torch.manual_seed(0)
    model = cvt.create_model("cvt_tiny").eval()
    path = export_model(model, "torchscript", tmp_path / "m.pt")
    assert verify_export(model, "torchscript", path) < 1e-5
    with torch.no_grad():
        model.head.bias[3] += 1.0
    assert verify_export(model, "torchscript", path) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize(("fmt", "name"), [("torchscript", "m.pt"), ("onnx", "m.onnx")])
def test_a_model_in_training_mode_is_exported_as_it_evaluates(tmp_path, fmt, name) -> None:
    """A traced graph freezes the mode it was traced in: a training-mode trace would normalise with
    each batch's statistics. The export puts the model in eval mode first, and leaves it there."""
    torch.manual_seed(2)
    model = _with_batchnorm_statistics(cvt.create_model("cvt_tiny")).train()
    path = export_model(model, fmt, tmp_path / name)
    assert not model.training
    assert verify_export(model, fmt, path) < 1e-4


def test_refuses_to_overwrite(tiny, tmp_path) -> None:
    target = tmp_path / "m.onnx"
    target.write_bytes(b"user data")
    with pytest.raises(cvt.UsageError, match="refusing to overwrite"):
        export_model(tiny, "onnx", target)
    assert target.read_bytes() == b"user data"


def test_missing_package_is_named(monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "onnxruntime" else real(n, *a)
    )
    require_packages("onnx")  # writing needs only onnx
    with pytest.raises(cvt.UsageError, match="--format onnx needs the package 'onnxruntime'.*--no-verify"):
        require_packages("onnx", verify=True)
    with pytest.raises(cvt.UsageError, match="unknown export format 'tflite'"):
        require_packages("tflite")


def test_cli_export(tmp_path, capsys) -> None:
    out = tmp_path / "tiny.safetensors"
    args = ["export", "cvt_tiny", "--format", "safetensors", "--output", str(out)]
    assert main([*args, "--num-classes", "4"]) == 0
    text = capsys.readouterr().out
    assert f"wrote {out}" in text and "export read by cvt.load_model vs. eager PyTorch" in text
    diff = float(text.rsplit(":", 1)[1])
    assert diff < 1e-4
    # a second export to the same path is refused with exit code 2 and one line on stderr
    assert main(args) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_cli_convert_to_hf_checks_the_folder_as_an_hf_output_before_reading(tmp_path, capsys) -> None:
    """An HF folder holding a config.json is refused as one (not as a folder where a file was to be
    written), before the source is read: here it does not even exist."""
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    assert main(["convert", str(tmp_path / "missing.pth"), "--to", "hf", "--output", str(hf)]) == 2
    assert capsys.readouterr().err == (
        f"cvt convert: error: refusing to overwrite {hf / 'config.json'}: choose another --output or pass "
        f"--overwrite\n"
    )
    assert (hf / "config.json").read_text() == "{}"


def test_cli_convert_builds_the_model_that_model_names(tiny, tmp_path, capsys) -> None:
    """--model is the variant an official state dict is loaded into: one it does not fit is refused
    (naming both architectures), not replaced by the variant its shapes match."""
    torch.save(tiny.state_dict(), tmp_path / "o.pth")
    out = tmp_path / "m.safetensors"
    assert main(["convert", str(tmp_path / "o.pth"), "--output", str(out), "--model", "cvt_13"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"cvt convert: error: checkpoint {tmp_path / 'o.pth'} does not fit the model: ")
    said = (
        "(width, depth) per stage [(32, 1), (64, 2), (128, 3)] vs the model's [(64, 1), (192, 2), (384, 10)]"
    )
    assert said in err and err.count("\n") == 1 and not out.exists()


def test_cli_convert_to_hf_overwrites_with_overwrite_and_says_what_it_wrote(tmp_path, capsys) -> None:
    from cvt.checkpoint import load_model, save_checkpoint

    hf, images = tmp_path / "hf", torch.randn(2, 3, 32, 32)
    for seed in (0, 1):  # the second convert replaces the first one's folder
        torch.manual_seed(seed)
        model = cvt.create_model("cvt_tiny", depth=(1, 2, 3), act="gelu").eval()
        source = save_checkpoint(model, tmp_path / f"seed{seed}.safetensors")
        assert main(["convert", str(source), "--to", "hf", "--output", str(hf), "--overwrite"]) == 0
        assert capsys.readouterr().out == f"wrote {hf}: cvt_tiny, 820,810 parameters, 10 classes, gelu\n"
        with torch.no_grad():
            torch.testing.assert_close(load_model(hf).eval()(images), model(images), rtol=0, atol=1e-5)


def test_cli_export_takes_the_same_model_named_twice_and_its_class_count(tmp_path, capsys) -> None:
    from cvt.checkpoint import load_model

    out = tmp_path / "m.safetensors"
    argv = ["export", "cvt_tiny", "--model", "cvt_tiny", "--num-classes", "4", "--format", "safetensors"]
    assert main([*argv, "--output", str(out), "--no-verify"]) == 0
    assert capsys.readouterr().out == f"wrote {out}\n"
    back = load_model(out)
    assert (back.pretrained_cfg["architecture"], back.num_classes) == ("cvt_tiny", 4)


def test_cli_export_traces_and_checks_at_img_size(tmp_path, capsys, monkeypatch) -> None:
    """--img-size is the traced input size (the ONNX graph's), and the check runs at it; --no-verify
    needs no onnxruntime, and --overwrite replaces the earlier export."""
    import onnx

    def input_size(path):
        (image,) = onnx.load(str(path)).graph.input
        return [d.dim_value for d in image.type.tensor_type.shape.dim][2:]

    out = tmp_path / "m.onnx"
    argv = ["export", "cvt_tiny", "--format", "onnx", "--output", str(out)]
    assert main([*argv, "--img-size", "48"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(
        f"wrote {out}\nmax |logit difference| of the export read by onnxruntime vs. eager PyTorch "
        "on 3 random images: "
    )
    assert float(text.rsplit(":", 1)[1]) < 1e-4 and input_size(out) == [48, 48]

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "onnxruntime" else real(n, *a)
    )
    assert main([*argv, "--img-size", "40", "--no-verify", "--overwrite"]) == 0
    assert capsys.readouterr().out == f"wrote {out}\n" and input_size(out) == [40, 40]


def test_cli_export_of_a_training_checkpoint_needs_no_model_or_class_count(tmp_path, capsys) -> None:
    """`cvt export --checkpoint best.pt` rebuilds the model from the checkpoint's config (4 classes)."""
    from cvt.checkpoint import load_model

    trained = _with_batchnorm_statistics(cvt.create_model("cvt_tiny", num_classes=4, img_size=32))
    ckpt = tmp_path / "best.pt"
    torch.save({"model": trained.state_dict(),
                "config": {"model": "cvt_tiny", "num_classes": 4, "img_size": 32}}, ckpt)  # fmt: skip
    out = tmp_path / "exported.safetensors"
    assert main(["export", "--checkpoint", str(ckpt), "--format", "safetensors", "--output", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    back = load_model(out).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(back(x), trained(x), rtol=0, atol=0)
    # a class count or a second, different model name next to a checkpoint is refused
    assert main(["export", "--checkpoint", str(ckpt), "--num-classes", "7", "--format", "safetensors",
                 "--output", str(tmp_path / "x.safetensors")]) == 2  # fmt: skip
    assert "--num-classes applies to a model built by name" in capsys.readouterr().err
    assert main(["export", "cvt_13", "--model", "cvt_tiny", "--format", "safetensors",
                 "--output", str(tmp_path / "y.safetensors")]) == 2  # fmt: skip
    assert "differ; give one" in capsys.readouterr().err


@pytest.mark.parametrize(("fmt", "name"), [("safetensors", "m.safetensors"), ("hf", "hf")])
def test_cli_export_of_a_training_checkpoint_keeps_classes_and_preprocessing(tmp_path, capsys, fmt, name):
    """Class names and the run's preprocessing (digits: no center crop) travel into the export."""
    from cvt.checkpoint import load_model

    # a small CvT-13 (0.875 center crop by default) that transformers' layout can hold
    model_args = {"embed_dim": [16, 32, 48], "num_heads": [1, 2, 3], "depth": [1, 2, 3], "act": "gelu"}
    trained = _with_batchnorm_statistics(cvt.create_model("cvt_13", num_classes=4, img_size=64, **model_args))
    ckpt = tmp_path / "best.pt"
    torch.save({"model": trained.state_dict(), "classes": ["ant", "bee", "cat", "dog"],
                "config": {"model": "cvt_13", "num_classes": 4, "img_size": 64, "dataset": "digits",
                           "model_args": model_args}}, ckpt)  # fmt: skip
    out = tmp_path / name
    assert main(["export", "--checkpoint", str(ckpt), "--format", fmt, "--output", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    back = load_model(out)
    assert back.pretrained_cfg["label_names"] == ["ant", "bee", "cat", "dog"]
    assert back.pretrained_cfg["crop_pct"] == 1.0 and back.img_size == (64, 64) and back.act == "gelu"


def test_a_failed_export_leaves_the_file_it_would_replace(tiny, tmp_path, monkeypatch) -> None:
    target = tmp_path / "m.pt"
    target.write_bytes(b"the user's earlier export")

    def save_half_then_fail(module, f) -> None:
        f.write(b"half a file")
        raise RuntimeError("disk went away")

    monkeypatch.setattr(torch.jit, "save", save_half_then_fail)
    with pytest.raises(RuntimeError, match="disk went away"):
        export_model(tiny, "torchscript", target, overwrite=True)
    assert target.read_bytes() == b"the user's earlier export"
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temporary file left behind


def test_exports_and_complexity_follow_the_model_dtype(tmp_path) -> None:
    torch.manual_seed(0)
    model = cvt.create_model("cvt_tiny").eval()
    expected = complexity(model)
    double = copy.deepcopy(model).double()
    assert complexity(double) == expected  # probed in the model's dtype, same count
    assert complexity(double, 32) == expected  # an int size is N x N, as create_model takes it
    assert count_gmacs(double, (32, 32)) == pytest.approx(expected.gmacs)
    path = export_model(double, "torchscript", tmp_path / "double.pt", img_size=32)
    assert verify_export(double, "torchscript", path, img_size=32) < 1e-12  # fp64 export, fp64 check
    path = export_model(double, "safetensors", tmp_path / "double.safetensors")  # rebuilds in fp32
    assert verify_export(double, "safetensors", path) < 1e-5  # used to refuse the fp64 images


def test_torchscript_export_is_quiet(tiny, tmp_path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = export_model(tiny, "torchscript", tmp_path / "m.pt")
        verify_export(tiny, "torchscript", path)  # loads it back with torch.jit.load
    assert [str(w.message) for w in caught if issubclass(w.category, FutureWarning)] == []


def test_cli_checks_the_output_before_building_the_model(tmp_path, capsys, monkeypatch) -> None:
    import cvt.cli.export as cli_export

    def no_build(*args, **kwargs):
        raise AssertionError("built a model for an export that cannot be written")

    monkeypatch.setattr(cli_export, "load_model_source", no_build)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    (tmp_path / "file").write_text("keep")
    hf, file = str(tmp_path / "hf"), str(tmp_path / "file")
    cases = [
        (["--format", "hf", "--output", hf], f"refusing to overwrite {hf}{os.sep}config.json"),
        (["--format", "hf", "--output", file], "is a file; hf export writes a folder"),
        (["--format", "onnx", "--output", f"{file}/m.onnx"], f"{file} is a file, not a folder"),
        (["--format", "torchscript", "--output", str(tmp_path)], "is a folder; torchscript export writes"),
    ]
    for argv, fragment in cases:
        assert main(["export", "cvt_tiny", *argv]) == 2
        err = capsys.readouterr().err
        assert fragment in err and err.count("\n") == 1
    assert (tmp_path / "hf" / "config.json").read_text() == "{}" and (tmp_path / "file").read_text() == "keep"


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--num-classes", "-3"], "num_classes must be a whole number >= 0 (0: no classifier), got -3"),
        (["--ema"], "--ema takes the EMA weights of a training checkpoint: give --checkpoint PATH"),
    ],
)
def test_cli_refuses_what_it_would_otherwise_ignore(argv, fragment, tmp_path, capsys) -> None:
    out = tmp_path / "m.onnx"
    assert main(["export", "cvt_tiny", "--format", "onnx", "--output", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert fragment in err and err.count("\n") == 1 and not out.exists()


@pytest.mark.parametrize(("fmt", "name"), [("safetensors", "m.safetensors"), ("hf", "hf")])
def test_cli_refuses_an_img_size_a_checkpoint_format_would_ignore(tmp_path, capsys, fmt, name) -> None:
    out = tmp_path / name
    argv = ["export", "cvt_tiny", "--format", fmt, "--output", str(out), "--img-size", "64"]
    assert main(argv) == 2
    assert capsys.readouterr().err == (
        f"cvt export: error: --img-size is the traced input size of onnx and torchscript; a {fmt} export "
        f"keeps the model's own input size\n"
    )
    assert not out.exists()
