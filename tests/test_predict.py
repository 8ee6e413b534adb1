"""Tests of ``cvt predict`` and the image → model input path it shares (formats, EXIF, huge images)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import MICRO_MODEL_ARGS
from cvt.cli.main import main
from cvt.data import load_input

CLASSES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A `cvt train`-style cvt_tiny checkpoint whose head always answers class 3 ("three")."""
    from cvt import create_model

    torch.manual_seed(0)
    model = create_model("cvt_tiny", num_classes=10)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(torch.arange(10.0) * 0.1)
        model.head.bias[3] = 10.0
    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    torch.save({"model": model.state_dict(), "classes": CLASSES,
                "config": {"model": "cvt_tiny", "num_classes": 10, "img_size": 32, "dataset": "digits"}},
               path)  # fmt: skip
    return path


def _images(folder):
    """One image of each kind predict must accept."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        "png": folder / "rgb.png", "jpeg": folder / "photo.jpg", "gray": folder / "gray.png",
        "rgba": folder / "alpha.png", "deep": folder / "deep16.png",
    }  # fmt: skip
    Image.new("RGB", (48, 40), (200, 30, 30)).save(paths["png"])
    Image.effect_noise((64, 80), 50).convert("RGB").save(paths["jpeg"], quality=90)
    Image.new("L", (30, 30), 90).save(paths["gray"])
    Image.new("RGBA", (33, 35), (0, 255, 0, 128)).save(paths["rgba"])
    Image.fromarray(np.full((20, 24), 40000, dtype=np.uint16)).save(paths["deep"])
    (folder / "notes.txt").write_text("ignored: not an image")
    return paths


def test_predict_json_all_image_kinds(tmp_path, checkpoint, capsys):
    paths = _images(tmp_path / "imgs")
    args = ["predict", str(tmp_path / "imgs"), "--checkpoint", str(checkpoint), "--json", "--top-k", "3"]
    assert main(args) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in results] == sorted(str(p) for p in paths.values())
    # logits: 10 for "three", 0.1 * i for the others (the features are multiplied by a zero weight)
    others = [0.1 * i for i in range(10) if i != 3]
    p_three = 1 / (1 + sum(math.exp(v - 10.0) for v in others))
    for entry in results:
        preds = entry["predictions"]
        assert [p["label"] for p in preds] == ["three", "nine", "eight"]
        assert [p["index"] for p in preds] == [3, 9, 8]
        assert preds[0]["prob"] == pytest.approx(p_three, rel=1e-5)
        assert preds[1]["prob"] == pytest.approx(math.exp(0.9 - 10.0) * p_three, rel=1e-4)


def test_predict_gives_each_image_its_own_probabilities(tmp_path, capsys):
    """A head that reads the features: each image's probabilities are the model's on that image."""
    from cvt import create_model
    from cvt.data import resolve_data_config

    torch.manual_seed(1)
    model = create_model("cvt_tiny", num_classes=10).eval()
    with torch.no_grad():
        model.head.weight.mul_(50.0)  # spread the probabilities so that the images' top-1 differ
    ckpt = tmp_path / "best.pt"
    torch.save({"model": model.state_dict(), "classes": CLASSES,
                "config": {"model": "cvt_tiny", "num_classes": 10, "img_size": 32, "dataset": "digits"}},
               ckpt)  # fmt: skip
    paths = _images(tmp_path / "imgs")
    assert (
        main(["predict", str(tmp_path / "imgs"), "--checkpoint", str(ckpt), "--json", "--top-k", "10"]) == 0
    )
    results = json.loads(capsys.readouterr().out)
    data_cfg = resolve_data_config(model, "digits", None)
    top1 = set()
    for entry, path in zip(results, sorted(paths.values()), strict=True):
        with torch.no_grad():
            want = model(load_input(path, data_cfg)).softmax(-1)[0]
        got = torch.zeros(10)
        for p in entry["predictions"]:
            got[p["index"]] = p["prob"]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        top1.add(entry["predictions"][0]["index"])
    assert len(top1) > 1  # the images are told apart


def test_predict_feeds_a_grayscale_model_the_luma_of_each_image(tmp_path, capsys):
    """A checkpoint trained with ``model_args: {in_chans: 1}``: each image reaches the model as the
    luma-weighted sum of what a 3-channel cvt_tiny reads (its mean and std are the same in R, G and B)."""
    from cvt import create_model
    from cvt.data import resolve_data_config

    torch.manual_seed(2)
    model = create_model("cvt_tiny", num_classes=10, in_chans=1).eval()
    with torch.no_grad():
        model.head.weight.mul_(50.0)
    ckpt = tmp_path / "best.pt"
    torch.save({"model": model.state_dict(), "classes": CLASSES,
                "config": {"model": "cvt_tiny", "model_args": {"in_chans": 1}, "num_classes": 10,
                           "img_size": 32, "dataset": "digits"}}, ckpt)  # fmt: skip
    paths = _images(tmp_path / "imgs")
    args = ["predict", str(tmp_path / "imgs"), "--checkpoint", str(ckpt), "--json", "--top-k", "10"]
    assert main(args) == 0
    results = json.loads(capsys.readouterr().out)
    rgb_cfg = resolve_data_config(create_model("cvt_tiny", num_classes=10), "digits", None)
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    for entry, path in zip(results, sorted(paths.values()), strict=True):
        x = (load_input(path, rgb_cfg) * luma).sum(1, keepdim=True)  # (1, 1, 32, 32)
        with torch.no_grad():
            want = model(x).softmax(-1)[0]
        got = torch.zeros(10)
        for p in entry["predictions"]:
            got[p["index"]] = p["prob"]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_predict_text_output_and_top_k_clamped(tmp_path, checkpoint, capsys):
    paths = _images(tmp_path)
    assert main(["predict", str(paths["gray"]), "--checkpoint", str(checkpoint), "--top-k", "50"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(paths["gray"]) and len(lines) == 11  # 10 classes at most
    assert lines[1].startswith("  1. three  99.9")


def _checkpoint_answering(path, num_classes: int, answer: int):
    """A cvt_tiny checkpoint at ``path``, without class names, whose head always ranks ``answer`` first
    (every other output ties at 0, so the lowest index comes second)."""
    from cvt import create_model

    model = create_model("cvt_tiny", num_classes=num_classes)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
        model.head.bias[answer] = 20.0
    config = {"model": "cvt_tiny", "num_classes": num_classes}
    torch.save({"model": model.state_dict(), "config": config}, path)
    return path


def test_predict_imagenet_names_for_1000_classes(tmp_path, capsys):
    ckpt = _checkpoint_answering(tmp_path / "in1k.pt", 1000, answer=1)
    Image.new("RGB", (32, 32)).save(tmp_path / "x.png")
    assert main(["predict", str(tmp_path / "x.png"), "--checkpoint", str(ckpt), "--json", "--top-k=1"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["predictions"][0]["label"] == "goldfish, Carassius auratus"


@pytest.mark.parametrize(
    ("content", "reason"), [(b"", "empty"), (b"GIF89a\x00garbage", "UnidentifiedImageError")]
)
def test_predict_bad_file_is_named(tmp_path, checkpoint, capsys, content, reason):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(content)
    assert main(["predict", str(bad), "--checkpoint", str(checkpoint)]) == 1
    err = capsys.readouterr().err
    assert str(bad) in err and reason in err and err.count("\n") == 1


def test_predict_truncated_png_is_named(tmp_path, checkpoint, capsys):
    path = tmp_path / "cut.png"
    Image.effect_noise((64, 64), 60).convert("RGB").save(path)
    path.write_bytes(path.read_bytes()[:-200])
    assert main(["predict", str(path), "--checkpoint", str(checkpoint)]) == 1
    assert f"cannot read image {path}" in capsys.readouterr().err


def test_predict_json_with_non_finite_logits_is_valid_json(tmp_path, checkpoint, capsys):
    """A model whose outputs are NaN: each probability is null (it printed the invalid token NaN)."""
    saved = torch.load(checkpoint, weights_only=True)
    saved["model"]["head.bias"][5] = float("nan")
    torch.save(saved, tmp_path / "nan.pt")
    Image.new("RGB", (40, 40), (10, 200, 30)).save(tmp_path / "a.png")
    args = ["predict", str(tmp_path / "a.png"), "--checkpoint", str(tmp_path / "nan.pt"), "--top-k", "2"]
    assert main([*args, "--json"]) == 0
    out = capsys.readouterr().out
    (entry,) = json.loads(out, parse_constant=lambda token: pytest.fail(f"invalid JSON token {token}"))
    assert [p["prob"] for p in entry["predictions"]] == [None, None]
    assert main(args) == 0
    assert "nan%" in capsys.readouterr().out  # visible in the text output too


def test_predict_missing_input_and_bad_top_k(tmp_path, checkpoint, capsys):
    assert main(["predict", str(tmp_path / "nope.png"), "--checkpoint", str(checkpoint)]) == 1
    assert "nope.png does not exist" in capsys.readouterr().err
    os.mkfifo(tmp_path / "pipe.png")  # exists, but opening it would wait for a writer
    assert main(["predict", str(tmp_path / "pipe.png"), "--checkpoint", str(checkpoint)]) == 1
    assert "pipe.png is not a regular file (expected an image file" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["predict", str(tmp_path / "empty"), "--checkpoint", str(checkpoint)]) == 1
    assert "holds no image files" in capsys.readouterr().err
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    assert main(["predict", str(tmp_path / "a.png"), "--checkpoint", str(checkpoint), "--top-k", "0"]) == 2


def test_predict_runs_on_the_device_asked(tmp_path, checkpoint, capsys):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    args = ["predict", str(tmp_path / "a.png"), "--checkpoint", str(checkpoint), "--json", "--top-k=1"]
    assert main([*args, "--device", "meta"]) == 2  # --device reaches the one parser of devices
    assert "option 'device' must be auto, cpu, cuda or cuda:N, got 'meta'" in capsys.readouterr().err
    assert main([*args, "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["predictions"][0]["label"] == "three"


@pytest.mark.parametrize(
    ("options", "message"),
    [  # an 'internal error' (per-token logits), and an empty list of predictions with exit 0
        ({"global_pool": ""}, r"gives logits per token \(global_pool ''\), not per image"),
        ({"num_classes": 0}, r"has no classifier \(num_classes 0\): no class to predict"),
    ],
)
def test_predict_refuses_a_model_without_one_score_per_class(tmp_path, capsys, options, message):
    from cvt import create_model, save_checkpoint

    path = save_checkpoint(create_model("cvt_tiny", **options), tmp_path / "m.safetensors")
    Image.new("RGB", (40, 40), (20, 200, 20)).save(tmp_path / "a.png")
    assert main(["predict", str(tmp_path / "a.png"), "--checkpoint", str(path)]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and err.startswith("cvt predict: error: ") and err.count("\n") == 1


@pytest.mark.parametrize(
    ("edit", "message"),
    [  # internal errors, and a hint naming --num-classes, which predict does not have
        ({"classes": 5}, "has malformed class names: 'classes' must be a list of strings, got 5 (int)"),
        ({"config": {"model_args": "x=1"}}, "malformed config: option 'model_args' must be of type dict"),
        ({"config": {"num_classes": "three"}}, "malformed config: option 'num_classes' must be of type int"),
        ({"config": {"num_classes": 3}}, "has a 10-class head but its config's num_classes is 3"),
    ],
)
def test_predict_names_the_malformed_entry_of_a_hand_edited_checkpoint(
    tmp_path, checkpoint, capsys, edit, message
):
    ckpt = torch.load(checkpoint, weights_only=True)
    edited = {**ckpt, **edit, "config": {**ckpt["config"], **edit.get("config", {})}}
    torch.save(edited, tmp_path / "c.pt")
    Image.new("RGB", (40, 40), (20, 200, 20)).save(tmp_path / "a.png")
    assert main(["predict", str(tmp_path / "a.png"), "--checkpoint", str(tmp_path / "c.pt")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("cvt predict: error: ") and err.count("\n") == 1 and message in err, err
    assert "--num-classes" not in err


def test_load_input_exif_rotated_equals_upright(tmp_path):
    # the same picture stored upright, and stored rotated with an EXIF tag saying how to turn it
    upright = Image.new("RGB", (40, 64), (0, 0, 0))
    upright.paste((255, 255, 255), (0, 0, 40, 20))  # white band on top
    upright.save(tmp_path / "upright.png")
    exif = Image.Exif()
    exif[0x0112] = 8  # "rotate 90° counter-clockwise... " — viewers turn the stored image back upright
    upright.transpose(Image.Transpose.ROTATE_270).save(tmp_path / "tagged.jpg", exif=exif, quality=100)
    cfg = {"input_size": (3, 32, 32), "interpolation": "bicubic", "crop_pct": 1.0,
           "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}  # fmt: skip
    a, b = load_input(tmp_path / "upright.png", cfg), load_input(tmp_path / "tagged.jpg", cfg)
    assert a.shape == b.shape == (1, 3, 32, 32)
    assert (a - b).abs().max() < 0.08  # equal up to JPEG loss


def test_predict_folder_follows_linked_folders_and_skips_hidden_files(tmp_path, checkpoint, capsys):
    (tmp_path / "if" / "val" / "dog").mkdir(parents=True)
    for name in ("a.png", "b.png"):
        Image.new("RGB", (16, 16)).save(tmp_path / "if" / "val" / "dog" / name)
    loop = tmp_path / "loop"
    (loop / "sub").mkdir(parents=True)
    (loop / ".cache").mkdir()
    Image.new("RGB", (16, 16)).save(loop / "own.png")
    Image.new("RGB", (16, 16)).save(loop / ".hidden.png")
    Image.new("RGB", (16, 16)).save(loop / ".cache" / "thumb.png")
    (loop / "._own.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble metadata, not an image")
    (loop / "dogs").symlink_to("../if/val/dog")  # a linked folder is searched like a real one
    (loop / "sub" / "back").symlink_to("..")  # a loop: sub/back/sub/back/… must end
    assert main(["predict", str(loop), "--checkpoint", str(checkpoint), "--json", "--top-k=1"]) == 0
    images = [entry["image"] for entry in json.loads(capsys.readouterr().out)]
    assert images == [str(loop / "dogs" / "a.png"), str(loop / "dogs" / "b.png"), str(loop / "own.png")]


@pytest.mark.parametrize(("fmt", "size"), [("jpeg", (1602, 1200)), ("png", (1400, 1100))])
def test_predict_input_of_a_photo_equals_the_evaluation_input(tmp_path, micro_cvt13, fmt, size) -> None:
    """Below 4096² pixels `cvt predict` decodes in full, as `cvt eval`'s data sets do: a reduced decode
    moved these images' inputs by up to 0.09 (normalized) and CvT-13's logits by ~3 % of their spread."""
    from cvt.data import build_transform, load_image
    from cvt.data.transforms import resolve_data_config

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    path = tmp_path / f"photo.{fmt}"
    Image.fromarray(pixels).resize(size, Image.BICUBIC).save(path)  # smooth, like a photo
    data_cfg = resolve_data_config(micro_cvt13)
    evaluated = build_transform(data_cfg, train=False)(load_image(path)).unsqueeze(0)
    assert torch.equal(load_input(path, data_cfg), evaluated)


@pytest.mark.parametrize("fmt", ["png", "jpeg"])  # box reduce; JPEG draft (DCT scaling), then box reduce
@pytest.mark.parametrize("crop_pct", [0.875, 1.0])
@pytest.mark.parametrize("input_hw", [(64, 48), (48, 64)])
@pytest.mark.parametrize("image_wh", [(1500, 1000), (1000, 1500)])  # landscape, portrait
def test_load_input_never_decodes_below_what_the_resize_needs(
    tmp_path, monkeypatch, fmt, crop_pct, input_hw, image_wh, reduced_decode
):
    from cvt.data import build_transform, load_image
    from cvt.data import transforms as transforms_module

    path = tmp_path / f"big.{fmt}"
    Image.effect_noise(image_wh, 40).convert("RGB").save(path)
    cfg = {"input_size": (3, *input_hw), "interpolation": "bicubic", "crop_pct": crop_pct,
           "mean": (0.5,) * 3, "std": (0.5,) * 3}  # fmt: skip
    decoded = []

    def recording_load_image(*args, **kwargs):
        decoded.append(load_image(*args, **kwargs))
        return decoded[-1]

    monkeypatch.setattr(transforms_module, "load_image", recording_load_image)
    assert load_input(path, cfg).shape == (1, 3, *input_hw)
    # the eval resize (the first step) applied to the full image gives the size the model input comes from
    resize = build_transform(cfg, train=False).transforms[0]
    needed_w, needed_h = resize(Image.open(path)).size
    (got,) = decoded
    assert got.size[0] >= needed_w and got.size[1] >= needed_h, (got.size, (needed_w, needed_h))
    assert max(got.size) <= max(image_wh) // 4  # still decoded at reduced size, not in full


@pytest.mark.slow
def test_huge_jpeg_is_decoded_small(tmp_path):
    """A 10,000x10,000 JPEG: decoding for a 224 model adds less than 100 MB of resident memory."""
    path = tmp_path / "huge.jpg"
    Image.new("L", (10_000, 10_000), 128).save(path, quality=50)
    script = (
        "import json, resource, sys; from cvt.data import load_image, load_input\n"
        "cfg = dict(input_size=(3, 224, 224), interpolation='bicubic', crop_pct=0.875, "
        "mean=(0.5,) * 3, std=(0.5,) * 3)\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "x = load_input(sys.argv[1], cfg)\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "size = load_image(sys.argv[1], min_side=256).size\n"
        "print(json.dumps([list(x.shape), list(size), (after - before) // 1024]))\n"
    )
    run = subprocess.run([sys.executable, "-c", script, path], capture_output=True, text=True, check=True)
    shape, decoded, grown_mb = json.loads(run.stdout)
    assert shape == [1, 3, 224, 224]
    assert decoded == [625, 625]  # DCT scale 1/8 (1250 px), then a 2x box reduce: shorter side >= 2 * 256
    assert grown_mb < 100, run.stdout  # a full RGB decode alone would be 300 MB


# the eval preprocessing of a 64-pixel model with ImageNet statistics: decoded for a shorter side of 73
_CFG_64 = {"input_size": (3, 64, 64), "interpolation": "bicubic", "crop_pct": 0.875,
           "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}  # fmt: skip


def _eval_path_and_predict_path(path, cfg):
    """The model input of ``path`` as ``cvt eval`` reads it (full decode, as the ImageFolder data set)
    and as ``cvt predict`` does (reduced decode), both back in [0, 1] pixel units."""
    from cvt.data import build_transform, load_image

    transform = build_transform(cfg, train=False)
    std, mean = torch.tensor(cfg["std"]).view(3, 1, 1), torch.tensor(cfg["mean"]).view(3, 1, 1)
    full = transform(load_image(path))
    reduced = load_input(path, cfg, transform)[0]
    return full * std + mean, reduced * std + mean


def _pink_noise(height, width, seed=0):
    """A (height, width, 3) uint8 image with a 1/f spectrum, like photographs: detail at every scale."""
    rng = np.random.default_rng(seed)
    fy, fx = np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None, :]
    f = np.hypot(fx, fy)
    f[0, 0] = 1.0
    spectrum = (rng.normal(size=(3, *f.shape)) + 1j * rng.normal(size=(3, *f.shape))) / f
    img = np.fft.irfft2(spectrum, s=(height, width))
    img = (img - img.mean()) / img.std() * 50 + 128
    return np.clip(img, 0, 255).astype(np.uint8).transpose(1, 2, 0)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_load_input_keeps_the_colour_of_transparent_pixels(tmp_path, mode):
    """Alpha is dropped, keeping the colour of transparent pixels, on the reduced decode of predict
    too (reducing an alpha image first premultiplied it: transparent pixels became black)."""
    pixels = np.zeros((800, 1000, 4), dtype=np.uint8)
    pixels[...] = (200, 30, 30, 0)  # transparent, but red (as PNG logos and product shots often are)
    pixels[200:600, 300:700] = (30, 200, 30, 255)  # an opaque green square
    image = Image.fromarray(pixels, mode="RGBA")
    path = tmp_path / "logo.png"
    (image if mode == "RGBA" else image.convert("LA")).save(path)
    full, reduced = _eval_path_and_predict_path(path, _CFG_64)
    red = 200 / 255 if mode == "RGBA" else round(0.299 * 200 + 0.587 * 30 + 0.114 * 30) / 255
    assert full[0, 0, 0].item() == pytest.approx(red, abs=1e-3)
    assert (reduced[:, :4, :4] - full[:, :4, :4]).abs().max() < 1e-3  # the corner keeps its colour
    assert (reduced - full).abs().mean() < 0.5 / 255


@pytest.mark.parametrize("fmt", ["png", "jpg"])
@pytest.mark.parametrize("size", [(900, 700), (874, 657)])  # 4x reduced; sides no factor divides
def test_load_input_of_a_large_image_matches_its_full_decode(tmp_path, fmt, size):
    """The reduced decode of predict gives the model input of a full decode within 1.5/255 on average:
    it keeps twice the size the resize needs and reduces by factors dividing both sides (reducing to
    that size, or with a partial last pixel, was 4 to 19 levels off)."""
    width, height = size
    path = tmp_path / f"noise.{fmt}"
    Image.fromarray(_pink_noise(height, width)).save(path, **({"quality": 95} if fmt == "jpg" else {}))
    full, reduced = _eval_path_and_predict_path(path, _CFG_64)
    assert reduced.shape == full.shape == (3, 64, 64)
    assert (reduced - full).abs().mean() < 1.5 / 255


@pytest.mark.parametrize("command", ["eval", "predict", "attention"])
@pytest.mark.parametrize(("built", "asked", "crop_pct"), [(224, 384, 1.0), (384, 224, 0.875)])
def test_img_size_preprocesses_as_the_official_evaluation_at_that_size(
    tmp_path, monkeypatch, command, built, asked, crop_pct
):
    """``--img-size`` sets the crop with the size, as a model built at that size gets it: 0.875 up to
    224 pixels, none above (it kept the crop of the size the model was built at)."""
    import cvt.data
    from cvt import create_model, save_checkpoint
    from cvt.checkpoint.native import inference_cfg

    model = create_model("cvt_tiny", num_classes=2, img_size=built)
    model.pretrained_cfg = inference_cfg(3, (built, built), 2)  # ImageNet-style: crop 0.875 at 224 only
    path = save_checkpoint(model, tmp_path / f"tiny{built}.safetensors")
    for name in ("a", "b"):
        (tmp_path / "data" / "val" / name).mkdir(parents=True)
        Image.new("RGB", (60, 50), (90, 20, 200)).save(tmp_path / "data" / "val" / name / "0.png")
    used = []

    def recording_build_transform(data_cfg, *args, **kwargs):
        used.append((tuple(data_cfg["input_size"]), data_cfg["crop_pct"]))
        return build_transform(data_cfg, *args, **kwargs)

    build_transform = cvt.data.transforms.build_transform
    monkeypatch.setattr(cvt.data, "build_transform", recording_build_transform)
    monkeypatch.setattr(cvt.data.transforms, "build_transform", recording_build_transform)
    image = str(tmp_path / "data" / "val" / "a" / "0.png")
    argv = {
        "eval": ["eval", "--dataset", "imagefolder", "--data-dir", str(tmp_path / "data")],
        "predict": ["predict", image],
        "attention": ["attention", image, "--output", str(tmp_path / "maps.png")],
    }[command]
    assert main([*argv, "--checkpoint", str(path), "--img-size", str(asked)]) == 0
    assert used and set(used) == {((3, asked, asked), crop_pct)}


def test_model_sources_official_state_dict_and_native_file(tmp_path, checkpoint, capsys):
    from cvt import create_model
    from cvt.checkpoint import save_checkpoint

    Image.new("RGB", (32, 32), (9, 9, 9)).save(tmp_path / "x.png")
    model = create_model("cvt_tiny", num_classes=10)
    model.load_state_dict(torch.load(checkpoint, weights_only=True)["model"])
    # an official-style bare state dict: --model names the variant, else the one whose shapes match
    torch.save(model.state_dict(), tmp_path / "bare.pth")
    args = ["predict", str(tmp_path / "x.png"), "--json", "--top-k=1", "--checkpoint"]
    assert main([*args, str(tmp_path / "bare.pth"), "--model", "cvt_tiny"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["predictions"][0] == {
        "index": 3, "label": "3", "prob": pytest.approx(0.99932, abs=1e-5)
    }  # fmt: skip
    assert main([*args, str(tmp_path / "bare.pth")]) == 0
    assert json.loads(capsys.readouterr().out)[0]["predictions"][0]["index"] == 3
    assert main([*args, str(tmp_path / "bare.pth"), "--model", "cvt_13"]) == 1  # another architecture
    assert "does not fit the model" in capsys.readouterr().err
    # this project's safetensors file rebuilds the model alone
    save_checkpoint(model, tmp_path / "tiny.safetensors", variant="cvt_tiny")
    assert main([*args, str(tmp_path / "tiny.safetensors")]) == 0
    assert json.loads(capsys.readouterr().out)[0]["predictions"][0]["index"] == 3


def test_model_source_conflicting_options(tmp_path, checkpoint, capsys):
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    image = str(tmp_path / "x.png")
    assert main(["predict", image, "--checkpoint", str(checkpoint), "--pretrained", "--model", "cvt_13"]) == 2
    assert "--pretrained and --checkpoint exclude each other" in capsys.readouterr().err
    assert main(["predict", image, "--model", "cvt_tiny"]) == 2
    assert "give --checkpoint PATH, or --model NAME --pretrained" in capsys.readouterr().err
    torch.save(torch.load(checkpoint, weights_only=True)["model"], tmp_path / "bare.pth")
    assert main(["predict", image, "--checkpoint", str(tmp_path / "bare.pth"), "--ema"]) == 1
    err = capsys.readouterr().err
    assert (
        "bare.pth has no EMA weights: it holds one set of weights (a weight file or bare state dict)" in err
    )
    assert err.count("\n") == 1
    # a training checkpoint names its model: --model may repeat it, not name another
    assert main(["predict", image, "--checkpoint", str(checkpoint), "--model", "cvt_13"]) == 2
    assert "is a cvt_tiny training checkpoint; model_name= (CLI: --model) 'cvt_13' names another" in (
        capsys.readouterr().err
    )
    assert main(["predict", image, "--checkpoint", str(checkpoint), "--model", "cvt_tiny"]) == 0


@pytest.mark.parametrize("kind", ["legacy_pickle", "safetensors_named_pt"])
def test_predict_reads_any_checkpoint_file_whatever_its_name(tmp_path, checkpoint, capsys, kind):
    """The format comes from the bytes: an old (non-zip) torch.save pickle, a safetensors file named .pt."""
    from cvt import create_model
    from cvt.checkpoint import save_checkpoint

    Image.new("RGB", (32, 32), (9, 9, 9)).save(tmp_path / "x.png")
    ckpt = torch.load(checkpoint, weights_only=True)
    path = tmp_path / "weights.pt"
    if kind == "legacy_pickle":  # the whole training checkpoint: classes and config come along
        torch.save(ckpt, path, _use_new_zipfile_serialization=False)
    else:
        model = create_model("cvt_tiny", num_classes=10)
        model.load_state_dict(ckpt["model"])
        model.pretrained_cfg["label_names"] = CLASSES
        save_checkpoint(model, path)
    assert main(["predict", str(tmp_path / "x.png"), "--checkpoint", str(path), "--json", "--top-k=1"]) == 0
    top = json.loads(capsys.readouterr().out)[0]["predictions"][0]
    assert top["index"] == 3 and top["label"] == "three"


def test_predict_shows_five_classes_by_default(tmp_path, checkpoint, capsys):
    paths = _images(tmp_path)
    args = ["predict", str(paths["png"]), str(paths["gray"]), "--checkpoint", str(checkpoint), "--json"]
    assert main(args) == 0
    results = json.loads(capsys.readouterr().out)
    assert len(results) == 2
    for entry in results:
        assert [p["index"] for p in entry["predictions"]] == [3, 9, 8, 7, 6]
    assert main(["predict", str(paths["png"]), "--checkpoint", str(checkpoint)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(paths["png"]) and len(lines) == 6
    assert [line.split()[:2] for line in lines[1:]] == [["1.", "three"], ["2.", "nine"], ["3.", "eight"],
                                                        ["4.", "seven"], ["5.", "six"]]  # fmt: skip


def _predict_a_digits_run(tmp_path, monkeypatch, model, model_name, image_size) -> tuple[Path, torch.Tensor]:
    """``cvt predict`` of a noise image of ``image_size`` with the training checkpoint of a ``model_name``
    run on digits at 32 px holding ``model``'s weights: the image's path and the input the model saw."""
    from cvt.cli import predict as cli_predict
    from test_evaluate import watch_model_inputs

    config = {"model": model_name, "num_classes": 10, "img_size": 32, "dataset": "digits",
              "model_args": MICRO_MODEL_ARGS}  # fmt: skip
    checkpoint = tmp_path / "best.pt"
    torch.save({"model": model.state_dict(), "classes": CLASSES, "config": config}, checkpoint)
    seen = watch_model_inputs(monkeypatch, cli_predict)
    path = tmp_path / "noise.png"
    Image.effect_noise(image_size, 60).convert("RGB").save(path)
    assert main(["predict", str(path), "--checkpoint", str(checkpoint), "--json"]) == 0
    return path, seen[0][0]


def test_predict_preprocesses_as_the_checkpoint_s_training_data(tmp_path, micro_cvt13, monkeypatch):
    """A variant published with a 0.875 center crop, trained on digits: predict reads the whole image,
    as training validated it."""
    from cvt.data import resolve_data_config

    path, seen = _predict_a_digits_run(tmp_path, monkeypatch, micro_cvt13, "cvt_13", (40, 40))
    whole = load_input(path, resolve_data_config(micro_cvt13, "digits"))
    assert not torch.equal(whole, load_input(path, resolve_data_config(micro_cvt13)))  # the crop shows
    assert torch.equal(seen, whole)


def test_predict_crops_as_the_training_of_a_model_fine_tuned_from_384_weights(
    tmp_path, micro_cvt13, monkeypatch
):
    """cvt_13.msft_in1k_384 is published to squash the whole image to its input size; fine-tuned on
    digits, its training validated on a center crop of the shorter side (all of it), and predict reads
    a non-square image so, not squashed."""
    from cvt.data import resolve_data_config

    path, seen = _predict_a_digits_run(tmp_path, monkeypatch, micro_cvt13, "cvt_13.msft_in1k_384", (48, 32))
    trained = resolve_data_config(micro_cvt13, "digits")
    assert (trained["crop_pct"], trained["crop_mode"]) == (1.0, "center")
    centered = load_input(path, trained)
    squashed = load_input(path, {**trained, "crop_mode": "squash"})
    assert not torch.equal(centered, squashed)  # the two ways differ on this image
    assert torch.equal(seen, centered)


def test_predict_lists_the_images_in_the_order_given(tmp_path, checkpoint, capsys):
    """Files and folders mixed: each file where it was given, each folder's images (sorted) in its place."""
    for name in ("b.png", "folder/y.png", "folder/x.png", "a.png"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        Image.new("RGB", (16, 16)).save(tmp_path / name)
    inputs = [str(tmp_path / "b.png"), str(tmp_path / "folder"), str(tmp_path / "a.png")]
    assert main(["predict", *inputs, "--checkpoint", str(checkpoint), "--json", "--top-k=1"]) == 0
    images = [entry["image"] for entry in json.loads(capsys.readouterr().out)]
    assert images == [str(tmp_path / name) for name in ("b.png", "folder/x.png", "folder/y.png", "a.png")]


def test_predict_reads_every_image_extension_in_any_case(tmp_path, checkpoint, capsys):
    """The extensions torchvision's ImageFolder reads, lower or upper case."""
    extensions = [".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"]
    names = sorted(f"img{i}{ext.upper() if i % 2 else ext}" for i, ext in enumerate(extensions))
    for name in names:
        Image.new("RGB", (16, 16), (40, 90, 200)).save(tmp_path / name)
    assert main(["predict", str(tmp_path), "--checkpoint", str(checkpoint), "--json", "--top-k=1"]) == 0
    assert [entry["image"] for entry in json.loads(capsys.readouterr().out)] == [
        str(tmp_path / name) for name in names
    ]


def test_predict_names_outputs_beyond_the_checkpoint_s_classes_by_index(tmp_path, capsys):
    """A head trained wider than the data's classes (cvt train --num-classes 5 on 3 classes): the class
    names for the first outputs, the index for the others."""
    from cvt import create_model

    model = create_model("cvt_tiny", num_classes=5)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(torch.tensor([0.0, 2.0, 1.0, 0.5, 3.0]))
    ckpt = tmp_path / "best.pt"
    torch.save({"model": model.state_dict(), "classes": ["cat", "dog", "fox"],
                "config": {"model": "cvt_tiny", "num_classes": 5}}, ckpt)  # fmt: skip
    Image.new("RGB", (32, 32)).save(tmp_path / "x.png")
    assert main(["predict", str(tmp_path / "x.png"), "--checkpoint", str(ckpt), "--json"]) == 0
    (entry,) = json.loads(capsys.readouterr().out)
    assert [(p["index"], p["label"]) for p in entry["predictions"]] == [
        (4, "4"), (1, "dog"), (2, "fox"), (3, "3"), (0, "cat")
    ]  # fmt: skip


def test_predict_pretrained_uses_the_published_weights_and_their_class_names(tmp_path, monkeypatch, capsys):
    """``--model NAME --pretrained`` asks create_model for the published weights (stood in for here: no
    download) and labels the outputs with the names published with them."""
    import cvt.models

    calls = []

    def published(name, **kwargs):
        calls.append((name, kwargs))
        model = create_model(name, num_classes=kwargs.get("num_classes") or 3)
        with torch.no_grad():
            model.head.weight.zero_()
            model.head.bias.copy_(torch.tensor([0.0, 5.0, 1.0]))
        model.pretrained_cfg["label_names"] = ["ant", "bee", "wasp"]
        return model

    create_model = cvt.models.create_model
    monkeypatch.setattr(cvt.models, "create_model", published)
    Image.new("RGB", (32, 32)).save(tmp_path / "x.png")
    assert main(["predict", str(tmp_path / "x.png"), "--model", "cvt_tiny", "--pretrained", "--json"]) == 0
    assert calls == [("cvt_tiny", {"pretrained": True, "num_classes": None})]
    (entry,) = json.loads(capsys.readouterr().out)
    assert [p["label"] for p in entry["predictions"]] == ["bee", "wasp", "ant"]


def test_predict_model_source_errors_name_the_model_and_the_way_out(tmp_path, monkeypatch, capsys):
    """The exact line of each: the model described as the user gave it (name and weights, or the file),
    and a hint that fits predict (no random weights, which only cvt attention accepts)."""
    import cvt.models
    from cvt import create_model, save_checkpoint

    Image.new("RGB", (32, 32)).save(tmp_path / "x.png")
    image = str(tmp_path / "x.png")
    headless = save_checkpoint(create_model("cvt_tiny", num_classes=0), tmp_path / "m.safetensors")
    monkeypatch.setattr(cvt.models, "create_model", lambda name, **kwargs: create_model(name, num_classes=0))
    cases = [
        (["--checkpoint", str(headless)],
         f"cvt_tiny from {headless} has no classifier (num_classes 0): no class to predict"),
        (["--model", "cvt_tiny"],
         "give --checkpoint PATH, or --model NAME --pretrained for the published weights"),
        (["--model", "cvt_tiny", "--pretrained", "--ema"],
         "--ema takes the EMA weights of a training checkpoint: give --checkpoint PATH"),
        (["--model", "cvt_tiny", "--pretrained"],
         "cvt_tiny (pretrained) has no classifier (num_classes 0): no class to predict"),
    ]  # fmt: skip
    for options, message in cases:
        assert main(["predict", image, *options]) == 2
        assert capsys.readouterr().err == f"cvt predict: error: {message}\n"


@pytest.mark.parametrize("min_side", [None, 25])  # full decode; reduced 4x (I;16 cannot be box-reduced)
def test_load_image_keeps_the_top_8_bits_of_a_16_bit_grayscale_png(tmp_path, min_side, reduced_decode):
    """40000 of 65535 is 156 of 255: PIL's own conversion clips at 255 (a white image)."""
    from cvt.data import load_image

    path = tmp_path / "deep16.png"
    Image.fromarray(np.full((200, 240), 40000, dtype=np.uint16)).save(path)
    assert Image.open(path).mode in ("I;16", "I")  # Pillow 10.0 opens 16-bit grayscale PNGs as I
    img = load_image(path, min_side=min_side)
    assert img.mode == "RGB" and img.size == ((240, 200) if min_side is None else (60, 50))
    assert np.unique(np.asarray(img)).tolist() == [156]


def test_load_image_of_a_missing_file_says_so(tmp_path):
    from cvt.data import load_image
    from cvt.errors import DataError

    with pytest.raises(DataError) as err:
        load_image(tmp_path / "gone.png")
    assert str(err.value) == f"cannot read image {tmp_path / 'gone.png'}: no such file"


def test_model_source_by_name_builds_the_head_asked():
    """``cvt export --model NAME --num-classes N`` (random weights): N outputs, named by their index."""
    import argparse

    from cvt.cli.model_source import label_names, load_model_source

    args = argparse.Namespace(checkpoint=None, model="cvt_tiny", pretrained=False, ema=False, img_size=None)
    source = load_model_source(args, random_weights=True, num_classes=7)
    assert source.model.head.out_features == source.model.num_classes == 7
    assert source.description == "cvt_tiny (random weights)" and not source.model.training
    assert label_names(source) == ["0", "1", "2", "3", "4", "5", "6"]


def test_predict_names_the_outputs_of_a_head_wider_than_imagenet_by_index(tmp_path, capsys):
    """ImageNet's names are for exactly 1000 outputs; a 1001-output head without class names gets indices."""
    ckpt = _checkpoint_answering(tmp_path / "wide.pt", 1001, answer=1000)
    Image.new("RGB", (32, 32)).save(tmp_path / "x.png")
    assert main(["predict", str(tmp_path / "x.png"), "--checkpoint", str(ckpt), "--json", "--top-k=2"]) == 0
    assert [p["label"] for p in json.loads(capsys.readouterr().out)[0]["predictions"]] == ["1000", "0"]


def test_load_image_reduces_by_2_when_only_2_keeps_twice_the_size(tmp_path, reduced_decode):
    """300x292 for a shorter side of 73: halved (150x146 still holds 2 x 73), not decoded in full."""
    from cvt.data import load_image

    Image.effect_noise((300, 292), 40).save(tmp_path / "a.png")
    assert load_image(tmp_path / "a.png", min_side=73).size == (150, 146)


def test_load_image_decodes_a_jpeg_at_the_smallest_dct_scale_that_keeps_twice_the_size(
    tmp_path, monkeypatch, reduced_decode
):
    """2048x2048 for a shorter side of 64: the decoder is asked for 1/8 (256x256), the least memory."""
    from PIL import JpegImagePlugin

    from cvt.data import load_image

    Image.new("L", (2048, 2048), 90).save(tmp_path / "a.jpg")
    asked = []
    real_draft = JpegImagePlugin.JpegImageFile.draft

    def recording_draft(self, mode, size):
        asked.append(size)
        return real_draft(self, mode, size)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", recording_draft)
    assert load_image(tmp_path / "a.jpg", min_side=64).size == (128, 128)
    assert asked == [(256, 256)]


def test_load_image_scales_a_huge_jpeg_no_dct_scale_divides(tmp_path):
    """Over 4096x4096 pixels, with an odd side: decoded at 1/8 anyway (memory first), not in full."""
    from cvt.data import load_image

    Image.new("L", (4100, 4099), 90).save(tmp_path / "huge.jpg", quality=50)
    img = load_image(tmp_path / "huge.jpg", min_side=256)
    assert img.size == (513, 513) and img.getpixel((100, 100)) == (90, 90, 90)


def test_load_image_names_a_png_whose_text_chunk_is_a_zip_bomb(tmp_path):
    """A compressed text chunk inflating past Pillow's limit: Pillow's ValueError, naming the file."""
    from PIL import PngImagePlugin

    from cvt.data import load_image
    from cvt.errors import DataError

    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "a" * (2 * PngImagePlugin.MAX_TEXT_CHUNK), zip=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "bomb.png", pnginfo=info)
    with pytest.raises(DataError) as err:
        load_image(tmp_path / "bomb.png")
    assert str(err.value).startswith(f"cannot read image {tmp_path / 'bomb.png'}: ValueError: ")


def test_predict_ignores_more_class_names_than_outputs(tmp_path, checkpoint, capsys):
    """12 names for a 10-output head fit no output for sure: the outputs are named by index."""
    ckpt = torch.load(checkpoint, weights_only=True)
    torch.save({**ckpt, "classes": [*CLASSES, "ten", "eleven"]}, tmp_path / "c.pt")
    Image.new("RGB", (32, 32)).save(tmp_path / "x.png")
    args = ["predict", str(tmp_path / "x.png"), "--checkpoint", str(tmp_path / "c.pt"), "--json"]
    assert main([*args, "--top-k=20"]) == 0
    labels = [p["label"] for p in json.loads(capsys.readouterr().out)[0]["predictions"]]
    assert labels == ["3", "9", "8", "7", "6", "5", "4", "2", "1", "0"]


def test_predict_moves_the_model_to_the_device_asked(tmp_path, checkpoint, monkeypatch, capsys):
    """The model goes to the device ``--device`` names before any image reaches it."""
    from cvt.cli import model_source
    from cvt.cli import predict as cli_predict

    moved = []

    def load_and_watch(*args, **kwargs):
        source = model_source.load_model_source(*args, **kwargs)
        to = source.model.to

        def recording_to(*to_args, **to_kwargs):
            moved.append(to_kwargs.get("device", to_args[0] if to_args else None))
            return to(*to_args, **to_kwargs)

        source.model.to = recording_to
        return source

    monkeypatch.setattr(cli_predict, "load_model_source", load_and_watch)
    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    args = ["predict", str(tmp_path / "a.png"), "--checkpoint", str(checkpoint), "--json", "--top-k=1"]
    assert main([*args, "--device", "cpu"]) == 0
    assert [torch.device(d) for d in moved] == [torch.device("cpu")]
    assert json.loads(capsys.readouterr().out)[0]["predictions"][0]["label"] == "three"
