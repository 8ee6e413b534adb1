"""Tests of the evaluation loop (exact metrics on a model with known outputs) and of ``cvt eval``."""

from __future__ import annotations

import json
import math
import re
import sys
import warnings
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import cvt
from cvt.cli import evaluate as evaluate_cli
from cvt.cli.main import main
from cvt.cli.model_source import ModelSource
from cvt.engine.evaluate import evaluate, save_confusion_png
from cvt.errors import DataError


@pytest.fixture
def shown_warnings() -> Iterator[list[str]]:
    """Warnings printed on stderr as outside pytest (which records them instead), through the
    ``warnings.formatwarning`` that ``cvt`` sets; yields the messages of those shown."""
    shown: list[str] = []

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        shown.append(str(message))
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = show
        yield shown


class _TableModel(nn.Module):
    """Returns row ``i`` of a fixed logit table for an image whose first pixel holds ``i``."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("table", table)
        self.scale = nn.Parameter(torch.ones(()))  # lets autocast and .train()/.eval() see a module
        self.calls: list[tuple[bool, torch.dtype | None]] = []  # (training, CPU autocast dtype) per call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        autocast = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
        self.calls.append((self.training, autocast))
        return self.table[x[:, 0, 0, 0].long()] * self.scale


def _logits_with_rank(target: int, rank: int, num_classes: int) -> torch.Tensor:
    """Logits whose ``rank``-th largest value (0 = best) is at ``target``; the best class is the
    first class other than ``target`` when rank > 0."""
    order = [c for c in range(num_classes) if c != target]
    order.insert(rank, target)  # order[j] gets the j-th largest logit
    logits = torch.empty(num_classes)
    for j, c in enumerate(order):
        logits[c] = float(num_classes - j)
    return logits


def _case():
    """10 samples, 7 classes; the target's rank per sample fixes every metric."""
    targets = [0, 1, 2, 3, 4, 5, 6, 0, 1, 2]
    ranks = [0, 0, 0, 1, 2, 4, 5, 6, 0, 3]  # top-1: 4 of 10; top-5 (rank < 5): 8 of 10
    table = torch.stack([_logits_with_rank(t, r, 7) for t, r in zip(targets, ranks, strict=True)])
    images = torch.zeros(10, 3, 2, 2)
    images[:, 0, 0, 0] = torch.arange(10, dtype=torch.float32)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(images, torch.tensor(targets)), batch_size=3
    )
    return _TableModel(table), loader, table, torch.tensor(targets)


def test_evaluate_metrics_are_exact():
    model, loader, table, targets = _case()
    model.train()
    result = evaluate(model, loader, "cpu")
    assert model.calls and set(model.calls) == {(False, None)}  # eval mode, no autocast without amp_dtype
    assert model.training  # mode restored
    assert result.num_samples == 10 and result.topk == 5
    assert result.top1 == pytest.approx(40.0)
    assert result.top5 == pytest.approx(80.0)
    expected_loss = (
        sum(float(torch.logsumexp(table[i], 0) - table[i, t]) for i, t in enumerate(targets.tolist())) / 10
    )
    assert result.loss == pytest.approx(expected_loss, rel=1e-6)
    # predicted class: the target when rank 0, else the first other class (0, or 1 when target is 0)
    preds = [0, 1, 2, 0, 0, 0, 0, 1, 1, 0]
    expected = torch.zeros(7, 7, dtype=torch.int64)
    for t, p in zip(targets.tolist(), preds, strict=True):
        expected[t, p] += 1
    assert torch.equal(result.confusion, expected)
    # class 0: samples 0 (right) and 7 (wrong) → 50%; class 1: samples 1, 8 right → 100%
    assert result.per_class_acc == pytest.approx([50.0, 100.0, 50.0, 0.0, 0.0, 0.0, 0.0])


def test_evaluate_per_class_accuracy_is_exact_in_float64():
    """3 right of 35: 8.571428571428571, as top-1 is computed (float32 gave 8.571428298950195)."""
    table = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # image i answers class i
    images = torch.zeros(35, 3, 2, 2)
    images[:3, 0, 0, 0] = 0.0  # three answer class 0 (right), the others class 1
    images[3:, 0, 0, 0] = 1.0
    result = evaluate(_TableModel(table), [(images, torch.zeros(35, dtype=torch.long))], "cpu")
    assert result.per_class_acc[0] == 100 * 3 / 35 == result.top1


def test_evaluate_bf16_autocast_and_fewer_than_five_classes():
    table = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0], [0.0, 2.0, 1.0], [1.0, 0.0, 2.0]])
    images = torch.zeros(4, 3, 2, 2)
    images[:, 0, 0, 0] = torch.arange(4, dtype=torch.float32)
    loader = [(images, torch.tensor([0, 2, 1, 0]))]
    model = _TableModel(table)
    result = evaluate(model, loader, "cpu", amp_dtype=torch.bfloat16)
    assert model.calls == [(False, torch.bfloat16)]  # the forward ran in eval mode under bf16 autocast
    assert result.topk == 3 and result.top5 == 100.0  # top-k with k = the 3 classes
    assert result.top1 == 75.0 and result.per_class_acc == [50.0, 100.0, 100.0]


def test_evaluate_absent_class_is_nan_and_json_null():
    table = torch.eye(3)
    images = torch.zeros(2, 3, 2, 2)
    images[1, 0, 0, 0] = 1.0
    result = evaluate(_TableModel(table), [(images, torch.tensor([0, 1]))], "cpu")
    assert math.isnan(result.per_class_acc[2])
    as_dict = result.as_dict(["a", "b", "c"])
    assert as_dict["per_class_acc"] == {"a": 100.0, "b": 100.0, "c": None}
    json.dumps(as_dict, allow_nan=False)
    with_bar = evaluate(_TableModel(table), [(images, torch.tensor([0, 1]))], "cpu", progress=True)
    assert torch.equal(with_bar.confusion, result.confusion)


def test_evaluate_counts_samples_with_non_finite_logits_as_wrong():
    """A row with a NaN or Inf logit predicts nothing: wrong for top-1 and top-k (topk ranked NaN first, so
    a NaN at the target counted as right), in no confusion cell, counted per class; the loss is NaN."""
    nan, inf = float("nan"), float("inf")
    table = torch.tensor([[nan, 1.0, 2.0], [0.0, inf, 1.0], [0.0, 1.0, 5.0], [1.0, 3.0, 2.0]])
    images = torch.zeros(4, 3, 2, 2)
    images[:, 0, 0, 0] = torch.arange(4, dtype=torch.float32)
    result = evaluate(_TableModel(table), [(images, torch.tensor([0, 1, 2, 0]))], "cpu")
    assert result.num_samples == 4 and result.topk == 3
    assert result.top1 == 25.0 and result.top5 == 50.0  # only the two finite rows can be right
    assert result.non_finite == [1, 1, 0] and result.class_counts == [2, 1, 1]
    assert result.confusion.tolist() == [[0, 1, 0], [0, 0, 0], [0, 0, 1]]
    assert result.per_class_acc == [0.0, 0.0, 100.0] and math.isnan(result.loss)
    as_dict = result.as_dict(["a", "b", "c"])
    assert as_dict["loss"] is None and as_dict["non_finite_logits"] == 2
    json.dumps(as_dict, allow_nan=False)


def _strict_json(text):
    """``json.loads`` that refuses the NaN/Infinity tokens Python writes but JSON does not allow."""
    return json.loads(text, parse_constant=lambda token: pytest.fail(f"invalid JSON token {token}"))


def test_cli_eval_with_non_finite_logits_writes_valid_json(tmp_path, capsys):
    """A model whose logits hold NaN: the loss is null in the JSON printed and written (it was the
    invalid token NaN), the images count as wrong (those of class 0, where the NaN is, counted as right)."""
    ckpt = _training_checkpoint(tmp_path)
    saved = torch.load(ckpt, weights_only=True)
    saved["model"]["head.bias"][0] = float("nan")
    torch.save(saved, ckpt)
    data = _cifar10_archive(tmp_path / "data")  # labels 3, 3, 1, 0, 9, 3
    args = ["eval", "--checkpoint", str(ckpt), "--dataset", "cifar10", "--data-dir", str(data)]
    assert main([*args, "--json", "--output", str(tmp_path / "out")]) == 0
    report = _strict_json(capsys.readouterr().out)
    assert report["loss"] is None and report["top1"] == 0.0 and report["top5"] == 0.0
    assert report["num_samples"] == 6 and report["non_finite_logits"] == 6
    assert report["per_class_acc"]["0"] == 0.0 and report["per_class_acc"]["3"] == 0.0
    assert _strict_json((tmp_path / "out" / "eval.json").read_text()) == report
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "loss nan" in text and "6 image(s) gave non-finite (NaN/Inf) logits: counted as wrong" in text
    assert "| 3     | 3      | 0.00%    |" in text


def test_evaluate_errors():
    model = _TableModel(torch.eye(3))
    with pytest.raises(DataError, match="yielded no images"):
        evaluate(model, [], "cpu")
    with pytest.raises(DataError, match=r"class indices must be in \[0, 3\), found 0\.\.7"):
        evaluate(model, [(torch.zeros(2, 3, 2, 2), torch.tensor([0, 7]))], "cpu")


def test_confusion_png(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    shown, written = [], []  # the matrix drawn, and the count written in each cell
    real_imshow, real_text = Axes.imshow, Axes.text
    monkeypatch.setattr(
        Axes, "imshow", lambda ax, data, **kw: shown.append(data) or real_imshow(ax, data, **kw)
    )
    monkeypatch.setattr(
        Axes, "text", lambda ax, x, y, s, **kw: written.append((y, x, s)) or real_text(ax, x, y, s, **kw)
    )
    confusion = torch.tensor([[3, 1], [2, 4]])  # rows: true class, columns: predicted
    path = save_confusion_png(confusion, ["cat", "dog"], tmp_path / "sub" / "c.png", "title")
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[0] >= 300
    # normalized per true class: each row sums to 1
    np.testing.assert_allclose(shown[0], [[0.75, 0.25], [1 / 3, 2 / 3]])
    assert sorted(written) == [(0, 0, 3), (0, 1, 1), (1, 0, 2), (1, 1, 4)]


def test_a_failed_plot_write_keeps_the_earlier_plot(tmp_path, monkeypatch):
    """Confusion matrices and attention grids are written atomically: a full disk keeps the old file."""
    import os

    from cvt.attention_maps import AttentionMaps, save_attention_grid

    confusion = torch.tensor([[3, 0], [2, 0]])
    png = save_confusion_png(confusion, ["cat", "dog"], tmp_path / "c.png")
    grid = save_attention_grid(AttentionMaps(torch.rand(2, 4), (2, 2), "cls token"), torch.rand(3, 8, 8),
                               tmp_path / "a.png")  # fmt: skip
    before = {path: path.read_bytes() for path in (png, grid)}

    def full_disk(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        save_confusion_png(confusion.flip(0), ["cat", "dog"], png, "another title")
    with pytest.raises(OSError, match="No space left"):
        save_attention_grid(AttentionMaps(torch.rand(2, 4), (2, 2), "cls token"), torch.rand(3, 8, 8), grid)
    assert {path: path.read_bytes() for path in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "c.png"]


# ------------------------------------------------------------------------------------- CLI
def _training_checkpoint(tmp_path, num_classes=10, with_ema=False, answer=3):
    """A `cvt train`-style checkpoint of cvt_tiny whose head always answers class ``answer`` (bias 10)."""
    from cvt import create_model

    torch.manual_seed(0)
    model = create_model("cvt_tiny", num_classes=num_classes)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
        model.head.bias[answer] = 10.0
    ckpt = {
        "model": model.state_dict(),
        "config": {"model": "cvt_tiny", "num_classes": num_classes, "img_size": 32, "dataset": "digits",
                   "data_dir": "data", "model_args": {}},
        "classes": [str(i) for i in range(num_classes)],
    }  # fmt: skip
    if with_ema:
        ema = {k: v.clone() for k, v in model.state_dict().items()}
        ema["head.bias"] = torch.zeros(num_classes)
        ema["head.bias"][5] = 10.0
        ckpt["ema"] = ema
    path = tmp_path / "best.pt"
    torch.save(ckpt, path)
    return path


@pytest.mark.slow
def test_cli_eval_json_and_files(tmp_path, capsys):
    ckpt = _training_checkpoint(tmp_path, with_ema=True)
    out = tmp_path / "eval"
    args = ["eval", "--checkpoint", str(ckpt), "--batch-size", "128"]
    assert main([*args, "--output", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    # the digits val split has 37 images of class 3 among 360, and the model always answers 3
    assert report["dataset"] == "digits" and report["num_samples"] == 360
    assert report["top1"] == pytest.approx(100 * 37 / 360)
    assert report["per_class_acc"]["3"] == 100.0 and report["per_class_acc"]["0"] == 0.0
    assert report["confusion"][0][3] == 36 and sum(map(sum, report["confusion"])) == 360
    assert (out / "confusion.png").is_file()
    assert json.loads((out / "eval.json").read_text())["top1"] == report["top1"]
    # a second run does not overwrite the first without --overwrite
    assert main([*args, "--output", str(out)]) == 2
    assert f"refusing to overwrite {out / 'confusion.png'}, {out / 'eval.json'}: " in capsys.readouterr().err


def test_cli_eval_refuses_an_earlier_evals_files_before_loading_the_model(tmp_path, capsys, monkeypatch):
    def no_load(args):
        raise AssertionError("loaded a model for an evaluation whose files cannot be written")

    monkeypatch.setattr(evaluate_cli, "load_model_source", no_load)
    out = tmp_path / "eval"
    out.mkdir()
    (out / "eval.json").write_text("{}")
    argv = ["eval", "--model", "cvt_tiny", "--dataset", "digits", "--output", str(out)]
    assert main(argv) == 2
    assert capsys.readouterr().err == (
        f"cvt eval: error: refusing to overwrite {out / 'eval.json'}: choose another --output or pass "
        f"--overwrite\n"
    )
    assert (out / "eval.json").read_text() == "{}"


def test_cli_eval_on_the_cpu_pins_no_memory_where_a_gpu_exists(tmp_path, capsys, monkeypatch):
    """Page-locked batches serve copies to a GPU: the loader pinned them whenever torch saw one, even for
    an evaluation on the CPU."""
    import cvt.data

    real_build_loader, pinned = cvt.data.build_loader, []

    def build_loader(*args, **kwargs):
        loader = real_build_loader(*args, **kwargs)
        pinned.append(loader.pin_memory)
        return loader

    monkeypatch.setattr(cvt.data, "build_loader", build_loader)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    ckpt = _training_checkpoint(tmp_path)
    assert main(["eval", "--checkpoint", str(ckpt), "--device", "cpu", "--batch-size", "360", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_samples"] == 360
    assert pinned == [False]


def test_cli_eval_ema_on_imagefolder_text(tmp_path, capsys):
    ckpt = _training_checkpoint(tmp_path, with_ema=True)
    for c in range(10):
        for i in range(c % 3 + 1):  # 1, 2 or 3 images per class; class 5 has 3
            path = tmp_path / "data" / "val" / str(c) / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (40, 36), (25 * c, 0, 10 * i)).save(path)
    data = str(tmp_path / "data")
    args = ["eval", "--checkpoint", str(ckpt), "--dataset", "imagefolder", "--data-dir", data]
    # --ema evaluates the EMA weights, which always answer class 5
    assert main([*args, "--ema"]) == 0
    text = capsys.readouterr().out
    assert "on imagefolder val: 19 images at 32x32" in text
    assert f"top-1 {100 * 3 / 19:.2f}%" in text
    assert "| 5     | 3      | 100.00%  |" in text and "| 3     | 1      | 0.00%    |" in text
    assert main(args) == 0  # the main weights answer class 3
    assert "| 3     | 1      | 100.00%  |" in capsys.readouterr().out


def test_cli_eval_class_count_mismatch(tmp_path, capsys):
    ckpt = _training_checkpoint(tmp_path, num_classes=4)
    assert main(["eval", "--checkpoint", str(ckpt), "--dataset", "digits"]) == 1
    err = capsys.readouterr().err
    assert "has 4 classes but digits has 10" in err and "--finetune" in err
    assert err.count("\n") == 1  # one line
    # a head wider than this data set, trained on another: refused (wider is fine on its own data only)
    ckpt = _training_checkpoint(tmp_path, num_classes=12)
    saved = torch.load(ckpt, weights_only=True)
    saved["classes"] = [str(i) for i in range(10)]  # trained on digits with --num-classes 12
    torch.save(saved, ckpt)
    for c in range(10):
        path = tmp_path / "folder" / "val" / str(c) / "0.png"
        path.parent.mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(path)
    data = ["--dataset", "imagefolder", "--data-dir", str(tmp_path / "folder")]
    assert main(["eval", "--checkpoint", str(ckpt), *data]) == 1
    assert "has 12 classes but imagefolder has 10" in capsys.readouterr().err


def _image_folder_checkpoint(tmp_path, classes, num_classes):
    """A `cvt train`-style checkpoint trained on an image folder of ``classes`` (head of ``num_classes``)."""
    ckpt = _training_checkpoint(tmp_path, num_classes=num_classes, answer=1)
    saved = torch.load(ckpt, weights_only=True)
    saved["config"]["dataset"], saved["classes"] = "imagefolder", list(classes)
    torch.save(saved, ckpt)
    return ckpt


def _val_folder(root, classes):
    for c in classes:
        for i in range(2):
            path = root / "val" / c / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (32, 32)).save(path)
    return ["--dataset", "imagefolder", "--data-dir", str(root)]


def test_cli_eval_refuses_another_image_folder_of_fewer_classes(tmp_path, capsys):
    """A 3-class image-folder checkpoint on a folder of 2 other classes: it was scored (folder 'a' as
    'cat', top-1 100 %, exit 0), as if that folder were the data set a wider head was trained on."""
    ckpt = _image_folder_checkpoint(tmp_path, ["cat", "dog", "zebra"], 3)
    assert main(["eval", "--checkpoint", str(ckpt), *_val_folder(tmp_path / "ab", ["a", "b"])]) == 1
    assert "has 3 classes but imagefolder has 2" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(ckpt), *_val_folder(tmp_path / "horse", ["horse"])]) == 1
    assert "has 3 classes but imagefolder has 1" in capsys.readouterr().err


def test_cli_eval_names_the_outputs_of_a_wider_head_apart_from_the_classes(tmp_path, capsys):
    """Classes '1' and '3' with 4 outputs: the extra outputs were named '2' and '3', so the JSON's class
    '3' (both its images right) was overwritten by the empty output 3."""
    ckpt = _image_folder_checkpoint(tmp_path, ["1", "3"], 4)
    data = _val_folder(tmp_path / "numbers", ["1", "3"])
    assert main(["eval", "--checkpoint", str(ckpt), *data, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["per_class_acc"] == {"1": 0.0, "3": 100.0, "2": None, "output 3": None}
    assert report["ema"] is False  # which weights were scored


def test_cli_eval_of_a_per_token_model_says_why_it_cannot_be_scored(tmp_path, capsys):
    """global_pool '': logits per token. The message counted the tokens as logits per image."""
    path = cvt.save_checkpoint(
        cvt.create_model("cvt_tiny", num_classes=10, global_pool=""), tmp_path / "tok.safetensors"
    )
    assert main(["eval", "--checkpoint", str(path), "--dataset", "digits"]) == 2
    err = capsys.readouterr().err
    assert "gives logits per token (global_pool ''), not per image: eval needs a model pooled" in err


def test_cli_eval_on_an_image_folder_of_other_classes(tmp_path, capsys, monkeypatch, shown_warnings):
    """A folder whose classes the checkpoint does not know is read as it is: another class count gets the
    --finetune hint, other names of the same count a warning (both used to be a DataError about the
    training split)."""
    ckpt = _training_checkpoint(tmp_path)  # digits: classes "0".."9"

    def image_folder(name, classes):
        for c in classes:
            path = tmp_path / name / "val" / c / "0.png"
            path.parent.mkdir(parents=True)
            Image.new("RGB", (32, 32)).save(path)
        data = ["--dataset", "imagefolder", "--data-dir", str(tmp_path / name)]
        return ["eval", "--checkpoint", str(ckpt), *data]

    assert main(image_folder("three", ["ant", "bee", "cat"])) == 1
    err = capsys.readouterr().err
    assert "has 10 classes but imagefolder has 3" in err and f"cvt train --finetune {ckpt} " in err
    assert err.count("\n") == 1
    # published weights by name: the hint names them with --model (--finetune takes a checkpoint file)
    published = ModelSource(cvt.create_model("cvt_tiny").eval(), "cvt_tiny (pretrained)", None)
    monkeypatch.setattr(evaluate_cli, "load_model_source", lambda args: published)  # no download
    data = ["--dataset", "imagefolder", "--data-dir", str(tmp_path / "three")]
    assert main(["eval", "--model", "cvt_tiny", "--pretrained", *data]) == 1
    assert "(cvt train --model cvt_tiny --pretrained --dataset imagefolder)" in capsys.readouterr().err
    monkeypatch.undo()
    assert main(image_folder("renamed", [f"c{i}" for i in range(10)])) == 0
    captured = capsys.readouterr()
    assert captured.err == (
        "cvt eval: warning: the checkpoint's class names differ from imagefolder's (e.g. '0' vs 'c0'); "
        "indices are compared as they are\n"
    )
    assert "on imagefolder val: 10 images" in captured.out
    # a folder with some of the checkpoint's classes keeps the checkpoint's indices: "3" is index 3
    assert main([*image_folder("some", ["3", "7"]), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_samples"] == 2 and report["per_class_acc"]["3"] == 100.0 and report["top1"] == 50.0


def test_cli_eval_refuses_an_image_folder_mixing_known_and_unknown_classes(tmp_path, capsys):
    """val/ with cat, eel and fox for a checkpoint of cat, dog, eel: fox has no output of the model, and
    reading the folder as it is gave eel the index of dog (it scored 0 %): refused, naming fox. Without
    fox, eel keeps the checkpoint's index."""
    ckpt = _training_checkpoint(tmp_path, num_classes=3, answer=2)  # always answers eel
    saved = torch.load(ckpt, weights_only=True)
    saved["classes"] = ["cat", "dog", "eel"]
    torch.save(saved, ckpt)
    for name, color in [("cat", (200, 30, 30)), ("eel", (30, 30, 200)), ("fox", (200, 120, 30))]:
        (tmp_path / "data" / "val" / name).mkdir(parents=True)
        Image.new("RGB", (40, 36), color).save(tmp_path / "data" / "val" / name / "0.png")
    data = ["--dataset", "imagefolder", "--data-dir", str(tmp_path / "data")]
    args = ["eval", "--checkpoint", str(ckpt), *data]
    assert main([*args, "--json"]) == 1
    err = capsys.readouterr().err
    assert "class folder(s) fox that" in err and "does not know (its classes: cat, dog, eel)" in err
    assert err.startswith("cvt eval: error: ") and err.count("\n") == 1
    (tmp_path / "data" / "val" / "fox" / "0.png").unlink()
    (tmp_path / "data" / "val" / "fox").rmdir()
    assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["per_class_acc"] == {"cat": 0.0, "dog": None, "eel": 100.0} and report["top1"] == 50.0


def test_cli_eval_reads_an_image_folder_from_data_by_default(tmp_path, capsys, monkeypatch):
    """--help promised ./data without --data-dir (cvt train's default); an image folder said it needed
    --data-dir."""
    ckpt = _training_checkpoint(tmp_path, num_classes=3, answer=2)  # its run's data set is digits
    saved = torch.load(ckpt, weights_only=True)
    saved["classes"] = ["cat", "dog", "eel"]
    torch.save(saved, ckpt)
    for name in ("cat", "eel"):
        (tmp_path / "data" / "val" / name).mkdir(parents=True)
        Image.new("RGB", (40, 36), (30, 30, 200)).save(tmp_path / "data" / "val" / name / "0.png")
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "--checkpoint", str(ckpt), "--dataset", "imagefolder", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_samples"] == 2


@pytest.mark.parametrize("batch_size", [64, 1])  # one batch; a batch holding only the unreadable file
def test_cli_eval_skip_bad_images_leaves_unreadable_files_out_and_counts_them(tmp_path, capsys, batch_size):
    """With --skip-bad-images, a file that fails when decoded is left out, not replaced by the next
    image with that image's label (eel/0.png was counted twice: 5 samples of 4 readable images)."""
    ckpt = _training_checkpoint(tmp_path, num_classes=3, answer=2)  # always answers eel
    saved = torch.load(ckpt, weights_only=True)
    saved["classes"] = ["cat", "dog", "eel"]
    torch.save(saved, ckpt)
    val = tmp_path / "data" / "val"
    for name, count in [("cat", 3), ("eel", 2)]:
        (val / name).mkdir(parents=True)
        for i in range(count):
            Image.effect_noise((40, 36), 40).convert("RGB").save(val / name / f"{i}.png")
    truncated = val / "cat" / "2.png"  # the last cat: eel/0.png comes next
    truncated.write_bytes(truncated.read_bytes()[:-300])  # its header reads, its pixels do not
    (val / "cat" / "3.png").write_bytes(b"")  # dropped when the headers are scanned
    data = ["--dataset", "imagefolder", "--data-dir", str(tmp_path / "data")]
    args = ["eval", "--checkpoint", str(ckpt), *data, "--skip-bad-images", "--batch-size", str(batch_size)]
    with pytest.warns(UserWarning) as warned:
        assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_samples"] == 4 and report.get("skipped_images") == 2
    assert [sum(row) for row in report["confusion"]] == [2, 0, 2]  # per true class: cat, dog, eel
    assert report["per_class_acc"] == {"cat": 0.0, "dog": None, "eel": 100.0} and report["top1"] == 50.0
    assert any(re.search(r"cat/2\.png: .*truncated; left out", str(w.message)) for w in warned)
    with pytest.warns(UserWarning):  # the same two warnings
        assert main(args) == 0
    text = capsys.readouterr().out
    assert "on imagefolder val: 4 images at 32x32 (2 unreadable file(s) skipped)" in text
    assert "| cat   | 2      | 0.00%    |" in text and "| eel   | 2      | 100.00%  |" in text


def test_cli_eval_warning_quotes_the_first_class_names_that_differ(tmp_path, capsys, shown_warnings):
    """The warning about other class names quotes a pair that differs (it quoted the first names, which
    may be equal: "'0' vs '0'"). It is a Python warning (filters apply: ``-W error`` stops the run) that
    the CLI shows on one line."""
    ckpt = _training_checkpoint(tmp_path)
    saved = torch.load(ckpt, weights_only=True)
    saved["classes"] = [*(str(i) for i in range(9)), "nine"]
    torch.save(saved, ckpt)
    data = _cifar10_archive(tmp_path / "data")
    assert main(["eval", "--checkpoint", str(ckpt), "--dataset", "cifar10", "--data-dir", str(data)]) == 0
    message = (
        "the checkpoint's class names differ from cifar10's (e.g. 'nine' vs '9'); indices are compared as "
        "they are"
    )
    assert shown_warnings == [message]
    assert capsys.readouterr().err == f"cvt eval: warning: {message}\n"


def test_cli_eval_and_predict_with_a_head_wider_than_the_classes(tmp_path, capsys):
    """cvt train accepts --num-classes above the data set's class count; eval on that data set works
    (the extra outputs are named by their index) and predict keeps the class names."""
    ckpt = _training_checkpoint(tmp_path, num_classes=12)
    saved = torch.load(ckpt, weights_only=True)
    saved["classes"] = [f"digit{i}" for i in range(10)]  # what training on digits stores
    torch.save(saved, ckpt)
    with pytest.warns(UserWarning, match=r"class names differ from digits's \(e\.g\. 'digit0' vs '0'\)"):
        assert main(["eval", "--checkpoint", str(ckpt), "--dataset", "digits", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["top1"] == pytest.approx(100 * 37 / 360)  # always answers class 3
    assert list(report["per_class_acc"])[-3:] == ["9", "10", "11"]  # digits names its classes 0..9
    assert len(report["confusion"]) == 12
    image = tmp_path / "x.png"
    Image.new("RGB", (32, 32), (10, 20, 30)).save(image)
    assert main(["predict", str(image), "--checkpoint", str(ckpt), "--top-k", "1"]) == 0
    assert "digit3" in capsys.readouterr().out


def test_cli_eval_needs_a_model_source(tmp_path, capsys):
    assert main(["eval", "--dataset", "digits"]) == 2
    assert "give --checkpoint PATH, or --model NAME --pretrained" in capsys.readouterr().err
    bad = tmp_path / "random.pt"
    bad.write_bytes(b"\x00\x01not a checkpoint" * 10)
    assert main(["eval", "--checkpoint", str(bad), "--dataset", "digits"]) == 1
    assert "random.pt" in capsys.readouterr().err


def _cifar10_archive(root):
    """A small CIFAR-10 python archive under ``root``: 6 test images labelled 3, 3, 1, 0, 9, 3."""
    import pickle

    import numpy as np

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = [3, 3, 1, 0, 9, 3] if name == "test_batch" else [0] * 4
        entry = {"data": rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8), "labels": labels}
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [str(i) for i in range(10)]}))
    return root


def test_cli_eval_cifar_from_the_pickle_archive(tmp_path, capsys):
    ckpt = _training_checkpoint(tmp_path)
    data = _cifar10_archive(tmp_path / "data")
    args = ["eval", "--checkpoint", str(ckpt), "--dataset", "cifar10", "--data-dir", str(data)]
    assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_samples"] == 6 and report["top1"] == 50.0  # the model always answers 3
    assert main([*args[:-1], str(tmp_path / "nothing")]) == 1
    err = capsys.readouterr().err
    assert "cifar-10-batches-py" in err and "--download" in err


def watch_model_inputs(monkeypatch, cli_module) -> list[tuple[torch.Tensor, torch.dtype | None]]:
    """Patch ``cli_module``'s model loading so that each batch its model reads is recorded with the CPU
    autocast dtype in force (None without autocast)."""
    from cvt.cli import model_source

    seen = []

    def record(module, inputs):
        amp = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
        seen.append((inputs[0].clone(), amp))

    def load_and_watch(*args, **kwargs):
        source = model_source.load_model_source(*args, **kwargs)
        source.model.register_forward_pre_hook(record)
        return source

    monkeypatch.setattr(cli_module, "load_model_source", load_and_watch)
    return seen


@pytest.mark.parametrize("amp", [None, "bf16"])
def test_cli_eval_preprocesses_digits_whole_and_runs_under_the_asked_autocast(
    micro_cvt13, tmp_path, capsys, monkeypatch, amp
):
    """A model published with ImageNet preprocessing (a 0.875 center crop) is evaluated on whole digits,
    as training on digits validates, and ``--amp bf16`` runs it under autocast."""
    from cvt.checkpoint import save_checkpoint
    from cvt.cli import evaluate as cli_evaluate
    from cvt.data import build_dataset, build_transform, resolve_data_config

    path = save_checkpoint(micro_cvt13, tmp_path / "micro.safetensors", variant="cvt_13")
    seen = watch_model_inputs(monkeypatch, cli_evaluate)
    amp_args = ["--amp", amp] if amp else []
    args = ["eval", "--checkpoint", str(path), "--dataset", "digits", "--batch-size", "360", "--json"]
    assert main([*args, *amp_args]) == 0
    assert json.loads(capsys.readouterr().out)["num_samples"] == 360
    [(images, autocast)] = seen
    assert autocast == (torch.bfloat16 if amp else None)
    assert resolve_data_config(micro_cvt13)["crop_pct"] == 0.875  # what a lost data set name would give
    transform = build_transform(resolve_data_config(micro_cvt13, "digits"), train=False)
    expected = torch.stack([transform(image) for image, _ in build_dataset("digits", None, "val")])
    assert torch.equal(images, expected)


def test_evaluate_refuses_class_indices_outside_the_logits():
    """Index C (one past the last class) and negative indices are the data set's fault, said as such (not
    an internal error of the loss)."""
    model, images = _TableModel(torch.eye(3)), torch.zeros(2, 3, 2, 2)
    with pytest.raises(DataError, match=r"^class indices must be in \[0, 3\), found 0\.\.3$"):
        evaluate(model, [(images, torch.tensor([0, 3]))], "cpu")
    with pytest.raises(DataError, match=r"^class indices must be in \[0, 3\), found -1\.\.2$"):
        evaluate(model, [(images, torch.tensor([-1, 2]))], "cpu")


def test_evaluate_refuses_logits_of_another_width_than_the_classes():
    from cvt.errors import UsageError

    images = torch.zeros(2, 3, 2, 2)
    with pytest.raises(UsageError, match=r"^the model gives 3 logits per image, expected 4 classes$"):
        evaluate(_TableModel(torch.eye(3)), [(images, torch.tensor([0, 1]))], "cpu", num_classes=4)
    # without num_classes, the logits' width is the class count
    assert evaluate(_TableModel(torch.eye(3)), [(images, torch.tensor([0, 1]))], "cpu").confusion.shape == (
        3,
        3,
    )


def test_eval_result_as_dict_without_names_uses_indices_and_says_its_k():
    table = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0], [0.0, 2.0, 1.0]])
    images = torch.zeros(3, 3, 2, 2)
    images[:, 0, 0, 0] = torch.arange(3, dtype=torch.float32)
    result = evaluate(_TableModel(table), [(images, torch.tensor([0, 1, 1]))], "cpu")
    as_dict = result.as_dict()
    assert as_dict["topk"] == 3 and as_dict["top5"] == 100.0  # top-3 of 3 classes
    assert as_dict["per_class_acc"] == {"0": 100.0, "1": 50.0, "2": None}
    assert as_dict["num_samples"] == 3 and as_dict["confusion"] == [[1, 0, 0], [0, 1, 1], [0, 0, 0]]


def _three_class_checkpoint(tmp_path):
    """A checkpoint of classes cat, dog, eel that always answers eel."""
    ckpt = _training_checkpoint(tmp_path, num_classes=3, answer=2)
    saved = torch.load(ckpt, weights_only=True)
    saved["classes"] = ["cat", "dog", "eel"]
    torch.save(saved, ckpt)
    return ckpt


def test_cli_eval_text_names_the_k_of_top_k_and_marks_an_absent_class(tmp_path, capsys):
    """With 3 classes the line says top-3 (not top-5), and a class without images has "-" for its
    accuracy (not nan%)."""
    ckpt = _three_class_checkpoint(tmp_path)
    for name in ("cat", "eel"):
        (tmp_path / "data" / "val" / name).mkdir(parents=True)
        Image.new("RGB", (40, 36), (30, 30, 200)).save(tmp_path / "data" / "val" / name / "0.png")
    args = [
        "eval",
        "--checkpoint",
        str(ckpt),
        "--dataset",
        "imagefolder",
        "--data-dir",
        str(tmp_path / "data"),
    ]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "top-1 50.00%  top-3 100.00%  loss " in text and "top-5" not in text
    assert "| dog   | 0      | -        |" in text and "nan" not in text
    assert main([*args, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["topk"] == 3


def test_cli_eval_reads_a_checkpoints_data_folder_for_its_own_data_set_only(tmp_path, capsys, monkeypatch):
    """Without --data-dir, the data set the checkpoint was trained on is read from its run's data folder;
    another data set from ./data, as cvt train's default (not from the checkpoint's folder)."""
    ckpt = _training_checkpoint(tmp_path)  # always answers 3
    saved = torch.load(ckpt, weights_only=True)
    cifar = _cifar10_archive(tmp_path / "cifar")  # labels 3, 3, 1, 0, 9, 3
    saved["config"].update(dataset="cifar10", data_dir=str(cifar))
    torch.save(saved, ckpt)
    work = tmp_path / "work"
    for name in ("3", "7"):
        (work / "data" / "val" / name).mkdir(parents=True)
        Image.new("RGB", (32, 32), (30, 30, 200)).save(work / "data" / "val" / name / "0.png")
    monkeypatch.chdir(work)
    assert main(["eval", "--checkpoint", str(ckpt), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["dataset"], report["num_samples"], report["top1"]) == ("cifar10", 6, 50.0)
    assert main(["eval", "--checkpoint", str(ckpt), "--dataset", "imagefolder", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["dataset"], report["num_samples"], report["top1"]) == ("imagefolder", 2, 50.0)


def test_cli_eval_split_size_and_output_files_are_reported(tmp_path, capsys, monkeypatch):
    """--split train and --img-size reach the data, the model and the report; --output's plot is named in
    the JSON and in the text, its title names the model, data and top-1."""
    import cvt.engine.evaluate as engine_evaluate

    ckpt = _training_checkpoint(tmp_path)  # always answers 3
    data = _cifar10_archive(tmp_path / "data")  # train split: 20 images of class 0
    seen = watch_model_inputs(monkeypatch, evaluate_cli)
    titles = []
    real_figure = engine_evaluate.confusion_figure
    monkeypatch.setattr(
        engine_evaluate,
        "confusion_figure",
        lambda confusion, classes, title="": titles.append(title) or real_figure(confusion, classes, title),
    )
    out = tmp_path / "out"
    args = ["eval", "--checkpoint", str(ckpt), "--dataset", "cifar10", "--data-dir", str(data),
            "--split", "train", "--img-size", "48", "--output", str(out)]  # fmt: skip
    assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["split"], report["num_samples"], report["top1"]) == ("train", 20, 0.0)
    assert report["input_size"] == [3, 48, 48] and report["confusion_png"] == str(out / "confusion.png")
    assert json.loads((out / "eval.json").read_text()) == report
    assert seen and all(images.shape[-2:] == (48, 48) for images, _ in seen)
    assert titles == [f"cvt_tiny from {ckpt} — cifar10 train, top-1 0.00%"]
    assert main([*args, "--overwrite"]) == 0
    text = capsys.readouterr().out
    assert f"cvt_tiny from {ckpt} on cifar10 train: 20 images at 48x48\n" in text
    assert f"confusion matrix: {out / 'confusion.png'}; metrics: {out / 'eval.json'}\n" in text


def test_cli_eval_output_writes_its_plot_and_report_as_one(tmp_path, capsys, monkeypatch):
    """A report that cannot be written (a full disk) leaves the earlier plot as it was: the new
    confusion.png was written first, beside the earlier eval.json."""
    import errno

    import cvt.fileio

    real_write = cvt.fileio._write_temporary

    def full_disk_for_the_report(path, data):
        if path.name == "eval.json":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_write(path, data)

    monkeypatch.setattr(cvt.fileio, "_write_temporary", full_disk_for_the_report)
    ckpt = _training_checkpoint(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "confusion.png").write_bytes(b"the earlier plot")
    (out / "eval.json").write_text("the earlier report")
    args = ["eval", "--checkpoint", str(ckpt), "--dataset", "digits", "--output", str(out), "--overwrite"]
    assert main(args) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert (out / "confusion.png").read_bytes() == b"the earlier plot"
    assert sorted(p.name for p in out.iterdir()) == ["confusion.png", "eval.json"]  # no temporary file left


def test_cli_eval_passes_download_and_reads_64_images_a_batch_by_default(tmp_path, capsys, monkeypatch):
    """--download reaches the data set (CIFAR's download), and --help's default batch of 64 is the one
    used."""
    import cvt.data

    real_build_dataset, real_build_loader = cvt.data.build_dataset, cvt.data.build_loader
    downloads, batch_sizes = [], []

    def build_dataset(*args, **kwargs):
        downloads.append(kwargs["download"])
        return real_build_dataset(*args, **{**kwargs, "download": False})  # no network in the tests

    def build_loader(dataset, batch_size, *args, **kwargs):
        batch_sizes.append(batch_size)
        return real_build_loader(dataset, batch_size, *args, **kwargs)

    monkeypatch.setattr(cvt.data, "build_dataset", build_dataset)
    monkeypatch.setattr(cvt.data, "build_loader", build_loader)
    ckpt = _training_checkpoint(tmp_path)
    data = _cifar10_archive(tmp_path / "data")
    args = ["eval", "--checkpoint", str(ckpt), "--dataset", "cifar10", "--data-dir", str(data), "--json"]
    assert main([*args, "--download"]) == 0
    assert json.loads(capsys.readouterr().out)["num_samples"] == 6
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["num_samples"] == 6
    assert downloads == [True, False] and batch_sizes == [64, 64]
