"""Hugging Face transformers CvT checkpoints: conversion, export, and ``pretrained=True`` (issue 2)."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers")
from transformers import CvtConfig, CvtForImageClassification  # noqa: E402

from cvt import CheckpointError, UsageError  # noqa: E402
from cvt.checkpoint import export_hf, load_checkpoint, load_model, read_state_dict  # noqa: E402
from cvt.checkpoint.hf import model_kwargs_from_hf_config, native_to_hf  # noqa: E402
from cvt.models import create_model  # noqa: E402
from cvt.models.cvt import CvT  # noqa: E402

# a small CvT in transformers' terms; depth[i] > i because transformers indexes drop-path rates by stage
SMALL = dict(
    embed_dim=[16, 32, 48], num_heads=[1, 2, 3], depth=[1, 2, 3], kernel_qkv=[3, 5, 3],
    padding_kv=[1, 2, 1], padding_q=[1, 2, 1], stride_kv=[2, 1, 2], num_labels=7,
)  # fmt: skip


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Random weights everywhere, BatchNorm running statistics and LayerNorm affine included."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            values = torch.rand(t.shape, generator=gen) + 0.5 if name.endswith("running_var") else None
            t.copy_(values if values is not None else torch.randn(t.shape, generator=gen) * 0.2)


def _hf_model(seed: int = 0, **overrides) -> CvtForImageClassification:
    model = CvtForImageClassification(CvtConfig(**{**SMALL, **overrides}))
    _randomize(model, seed)
    return model.eval()


def _ours_for(hf: CvtForImageClassification) -> CvT:
    return CvT(**model_kwargs_from_hf_config(hf.config.to_dict(), act="gelu")).eval()


def _hf_logits(hf: CvtForImageClassification, x: torch.Tensor) -> torch.Tensor:
    """transformers' logits; without a cls token its classification forward fails (transformers 5:
    ``outputs[1]`` does not exist), so its head (LayerNorm, token mean, classifier) is applied here."""
    if hf.config.cls_token[-1]:
        return hf(pixel_values=x).logits
    feats = hf.cvt(pixel_values=x).last_hidden_state  # (B, C, H, W)
    return hf.classifier(hf.layernorm(feats.flatten(2).transpose(1, 2)).mean(dim=1))


@pytest.mark.parametrize(
    "overrides",
    [{}, {"cls_token": [False, False, False]}, {"stride_kv": [1, 2, 2], "qkv_bias": [False, True, False]}],
    ids=["cls_last", "no_cls", "strides_bias"],
)
def test_hf_logits_reproduced(overrides: dict) -> None:
    hf = _hf_model(**overrides)
    ours = _ours_for(hf)
    result = load_checkpoint(ours, hf.state_dict())  # strict
    assert result.format == "hf" and not result.skipped
    x = torch.randn(2, 3, 64, 56, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = _hf_logits(hf, x)
        got = ours(x)
    assert expected.shape == (2, 7) and expected.std().item() > 1e-2
    assert (got - expected).abs().max().item() < 1e-5


def _write_hf_dir(hf: CvtForImageClassification, folder: Path, weights: str) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(hf.config.to_dict()))
    state_dict = {k: v.contiguous() for k, v in hf.state_dict().items()}
    if weights.endswith(".safetensors"):
        save_file(state_dict, str(folder / weights), metadata={"format": "pt"})
    else:
        torch.save(state_dict, folder / weights)
    return folder


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_hf_directory_and_file_load(tmp_path: Path, weights: str) -> None:
    hf = _hf_model(seed=3)
    folder = _write_hf_dir(hf, tmp_path / "hf", weights)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf(pixel_values=x).logits
    for source in (folder, folder / weights):  # the directory, or the weight file beside config.json
        _, fmt, info = read_state_dict(source)
        assert fmt == "hf" and info["hf_config"]["embed_dim"] == [16, 32, 48]
        model = load_model(source, act="gelu")
        assert model.num_classes == 7 and model.act == "gelu"
        with torch.no_grad():
            assert (model(x) - expected).abs().max().item() < 1e-5
    # without act=, a hub config means the published weights: QuickGELU, what they were trained with
    assert load_model(folder).act == "quick_gelu"
    # the hub's preprocessor_config.json gives the input size and preprocessing
    preprocessor = {
        "size": {"shortest_edge": 384},
        "crop_pct": 0.875,
        "image_mean": [0.5] * 3,
        "image_std": [0.25] * 3,
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    cfg = load_model(folder).pretrained_cfg
    assert cfg["input_size"] == (3, 384, 384) and cfg["crop_pct"] == 1.0 and cfg["std"] == (0.25,) * 3
    assert cfg["crop_mode"] == "squash"  # transformers' ConvNeXt processor warps from 384 px up


def test_a_transformers_cvt_model_without_its_head_is_named(tmp_path: Path) -> None:
    """``CvtModel.save_pretrained`` writes the encoder alone (keys ``encoder.stages...``, no ``cvt.``
    prefix, no final LayerNorm): a CvT checkpoint, not "no CvT weights"."""
    from transformers import CvtModel

    CvtModel(CvtConfig(**SMALL)).save_pretrained(tmp_path / "base")
    with pytest.raises(
        CheckpointError, match=r"weights of a transformers CvtModel .* CvtForImageClassification"
    ):
        load_model(tmp_path / "base")


def test_sharded_hf_checkpoint_loads_and_bad_indexes_are_named(tmp_path: Path) -> None:
    """``save_pretrained`` above ``max_shard_size`` writes shards and ``model.safetensors.index.json``."""
    hf = _hf_model(seed=4)
    folder = tmp_path / "sharded"
    hf.save_pretrained(folder, max_shard_size="100KB")
    index = folder / "model.safetensors.index.json"
    shards = sorted(folder.glob("model-*.safetensors"))
    assert index.is_file() and len(shards) > 2 and not (folder / "model.safetensors").exists()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf(pixel_values=x).logits
        for source in (folder, index):
            assert (load_model(source, act="gelu")(x) - expected).abs().max().item() < 1e-5
    content = json.loads(index.read_text())
    content["weight_map"] = {k: "../elsewhere.safetensors" for k in content["weight_map"]}
    index.write_text(json.dumps(content))
    with pytest.raises(CheckpointError, match="not a file name beside it"):
        read_state_dict(folder)
    content["weight_map"] = {k: index.name for k in content["weight_map"]}  # an index naming itself
    index.write_text(json.dumps(content))
    with pytest.raises(CheckpointError, match="index.json is a JSON file, not a checkpoint"):
        read_state_dict(folder)
    shards[0].unlink()
    hf.save_pretrained(folder, max_shard_size="100KB")  # a whole index again
    shards[0].unlink()
    with pytest.raises(CheckpointError, match=f"shard {shards[0].name} listed in .* does not exist"):
        read_state_dict(folder)


def test_hf_weights_without_num_batches_tracked_load() -> None:
    hf = _hf_model()
    state_dict = {k: v for k, v in hf.state_dict().items() if not k.endswith("num_batches_tracked")}
    ours = _ours_for(hf)
    load_checkpoint(ours, state_dict)
    key = "stage2.blocks.2.attn.conv_proj_v.bn.running_mean"
    hf_key = (
        "cvt.encoder.stages.2.layers.2.attention.attention.convolution_projection_value."
        "convolution_projection.normalization.running_mean"
    )
    assert torch.equal(ours.state_dict()[key], hf.state_dict()[hf_key])


def test_export_round_trip(tmp_path: Path) -> None:
    ours = CvT(**model_kwargs_from_hf_config(CvtConfig(**SMALL).to_dict(), act="gelu"), init="trunc_norm")
    _randomize(ours, seed=5)
    ours.eval().pretrained_cfg = {"label_names": [f"class{i}" for i in range(7)]}
    out = export_hf(ours, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "model.safetensors", "preprocessor_config.json"
    ]  # fmt: skip
    hf = CvtForImageClassification.from_pretrained(out).eval()
    assert hf.config.id2label[3] == "class3"
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = ours(x)
        assert (hf(pixel_values=x).logits - expected).abs().max().item() < 1e-5
        back = load_model(out)  # act and image size read back from config.json
        assert back.act == "gelu" and back.pretrained_cfg["label_names"][3] == "class3"
        assert torch.equal(back(x), expected)
    with pytest.raises(UsageError, match="refusing to overwrite"):  # a usage problem, as every refused output
        export_hf(ours, out)


def test_export_writes_the_preprocessing(tmp_path: Path) -> None:
    """preprocessor_config.json carries mean/std, crop and input size: a round trip predicts the same."""
    from cvt.data import resolve_data_config

    model = create_model("cvt_tiny", act="gelu", depth=(1, 2, 3), img_size=48).eval()  # mean/std 0.5, no crop
    out = export_hf(model, tmp_path / "export")
    back = load_model(out)
    expected, got = resolve_data_config(model), resolve_data_config(back)
    assert expected["mean"] == (0.5, 0.5, 0.5) and expected["crop_pct"] == 1.0
    for key in ("input_size", "mean", "std", "crop_pct", "interpolation"):
        assert got[key] == expected[key], key
    written = json.loads((out / "preprocessor_config.json").read_text())
    assert written["size"] == {"shortest_edge": 48} and written["resample"] == 3  # bicubic
    # transformers reads it as the hub's CvT repositories' ConvNeXt processor
    processor = transformers.AutoImageProcessor.from_pretrained(out)
    assert type(processor).__name__.startswith("ConvNextImageProcessor")
    assert processor.size["shortest_edge"] == 48 and processor.crop_pct == 1.0
    assert list(processor.image_mean) == [0.5] * 3 and list(processor.image_std) == [0.5] * 3
    # the preprocessing file is part of the export: not replaced without overwrite
    (out / "config.json").unlink()
    (out / "model.safetensors").unlink()
    with pytest.raises(UsageError) as refused:
        export_hf(model, out)
    assert str(refused.value) == (
        f"refusing to overwrite {out / 'preprocessor_config.json'}: choose another folder or pass "
        f"overwrite=True (CLI: --overwrite)"
    )
    export_hf(model, out, overwrite=True)
    # from 384 pixels up transformers' processor never crops: a cropping model is warned about
    cropped = create_model("cvt_tiny", act="gelu", depth=(1, 2, 3), img_size=384).eval()
    # (configured at 384: a configuration made for another size follows the official crop rule at 384)
    cropped.pretrained_cfg = {**cropped.pretrained_cfg, "crop_pct": 0.875, "input_size": (3, 384, 384)}
    with pytest.warns(UserWarning, match="never crops from 384 pixels up"):
        export_hf(cropped, tmp_path / "export384")
    # a grayscale model: one mean and std, and a warning that transformers' processor keeps RGB images
    gray = create_model("cvt_tiny", act="gelu", depth=(1, 2, 3), in_chans=1).eval()
    with pytest.warns(UserWarning, match=r"does not convert images to grayscale: .*image\.convert\('L'\)"):
        export_hf(gray, tmp_path / "export_gray")
    written = json.loads((tmp_path / "export_gray" / "preprocessor_config.json").read_text())
    assert written["image_mean"] == pytest.approx([0.5]) and written["image_std"] == pytest.approx([0.5])


def test_half_precision_hf_folder_loads_as_float32(tmp_path: Path) -> None:
    hf = _hf_model(seed=9)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf(pixel_values=x).logits
    folder = _write_hf_dir(hf.half(), tmp_path / "hf", "model.safetensors")
    model = load_model(folder, act="gelu")
    assert {v.dtype for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")} == {
        torch.float32
    }
    with torch.no_grad():
        assert (model(x) - expected).abs().max().item() < 0.05  # half-precision rounding only


def test_hf_folder_prefers_sharded_safetensors_to_an_old_pickle(tmp_path: Path) -> None:
    """transformers' order: model.safetensors, its shard index, pytorch_model.bin, its shard index."""
    new, old = _hf_model(seed=10), _hf_model(seed=11)
    folder = tmp_path / "hf"
    new.save_pretrained(folder, max_shard_size="100KB")
    torch.save(old.state_dict(), folder / "pytorch_model.bin")  # left over from an older save
    _, _, info = read_state_dict(folder)
    assert Path(info["path"]).name == "model.safetensors.index.json"
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (load_model(folder, act="gelu")(x) - new(pixel_values=x).logits).abs().max().item() < 1e-5
    reference = CvtForImageClassification.from_pretrained(folder).eval()
    assert torch.equal(reference.classifier.weight, new.classifier.weight)  # transformers agrees


def test_export_without_head_round_trips(tmp_path: Path) -> None:
    features = CvT(
        **{**model_kwargs_from_hf_config(CvtConfig(**SMALL).to_dict(), act="gelu"), "num_classes": 0}
    )
    out = export_hf(features.eval(), tmp_path / "export")
    hf = CvtForImageClassification.from_pretrained(out).eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        pooled = features(x)  # (1, 48): the normalized cls token
        assert pooled.shape == (1, 48)
        assert (hf(pixel_values=x).logits - pooled).abs().max().item() < 1e-5
        assert torch.equal(load_model(out)(x), pooled)


def test_export_warns_for_quick_gelu(tmp_path: Path) -> None:
    model = CvT(**{**model_kwargs_from_hf_config(CvtConfig(**SMALL).to_dict()), "act": "quick_gelu"})
    with pytest.warns(UserWarning, match="GELU"):
        export_hf(model, tmp_path / "export")
    assert load_model(tmp_path / "export").act == "quick_gelu"


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"pos_embed": True}, "position embedding"),
        ({"cls_token": (True, False, True)}, "cls token"),
        ({"method": "avg"}, "'avg' projection"),
        ({"depth": (1, 1, 2)}, "drop-path rates by stage"),
        ({"norm_eps": 1e-6}, "eps"),
        ({"global_pool": "avg"}, "global_pool is 'avg'"),
    ],
)
def test_export_refuses_what_transformers_cannot_express(
    tmp_path: Path, overrides: dict, reason: str
) -> None:
    model = create_model("cvt_tiny", act="gelu", **overrides)
    with pytest.raises(CheckpointError, match=reason):
        export_hf(model, tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_export_without_a_cls_token_warns_that_transformers_cannot_classify_with_it(tmp_path: Path) -> None:
    model = create_model("cvt_tiny", act="gelu", cls_token=(False, False, False), depth=(1, 2, 3)).eval()
    with pytest.warns(UserWarning, match="no cls token: transformers' CvtForImageClassification cannot"):
        out = export_hf(model, tmp_path / "export")
    hf = CvtForImageClassification.from_pretrained(out).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # transformers' CvtModel with its head applied by hand, and this package
        torch.testing.assert_close(_hf_logits(hf, x), model(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(load_model(out)(x), model(x), rtol=0, atol=0)


def test_export_refuses_a_model_whose_final_norm_was_pruned(tmp_path: Path) -> None:
    """transformers initialised a fresh LayerNorm in its place (logits off by ~0.5), and this package
    refused its own export for two missing keys."""
    model = create_model("cvt_tiny", act="gelu", depth=(1, 2, 3), num_classes=5)
    model.prune_intermediate_layers(indices=3, prune_norm=True, prune_head=False)
    with pytest.raises(CheckpointError, match="the final LayerNorm was pruned"):
        export_hf(model, tmp_path / "export")
    assert not (tmp_path / "export").exists()


@pytest.mark.slow
def test_pretrained_true_downloads_and_converts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import timm.models._hub as timm_hub

    with torch.device("meta"):
        shapes = create_model("cvt_13").state_dict()
    gen = torch.Generator().manual_seed(0)
    native = {
        k: torch.randn(v.shape, generator=gen) if v.is_floating_point() else torch.zeros((), dtype=v.dtype)
        for k, v in shapes.items()
    }
    save_file(native_to_hf(native), str(tmp_path / "model.safetensors"))
    requested = []

    def fake_download(repo_id: str, filename: str, **kwargs) -> str:
        requested.append((repo_id, filename))
        return str(tmp_path / filename)

    monkeypatch.setattr(timm_hub, "hf_hub_download", fake_download)
    model = create_model("cvt_13.msft_in1k", pretrained=True)
    assert requested == [("microsoft/cvt-13", "model.safetensors")]
    assert torch.equal(
        model.stage2.blocks[9].attn.proj_q.weight, native["stage2.blocks.9.attn.proj_q.weight"]
    )
    assert torch.equal(model.head.weight, native["head.weight"])
    assert model.pretrained_cfg["hf_hub_id"] == "microsoft/cvt-13" and model.act == "quick_gelu"


def test_pretrained_weights_that_do_not_fit_name_the_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import timm.models._hub as timm_hub

    save_file(native_to_hf(create_model("cvt_tiny").state_dict()), str(tmp_path / "model.safetensors"))
    monkeypatch.setattr(timm_hub, "hf_hub_download", lambda repo_id, filename, **kw: str(tmp_path / filename))
    with pytest.raises(CheckpointError, match=r"pretrained weights does not fit.*it matches cvt_tiny"):
        create_model("cvt_13", pretrained=True)


@pytest.mark.parametrize("in_chans", [1, 4])
def test_pretrained_weights_adapt_to_other_input_channels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, in_chans: int
) -> None:
    """timm adapts the 3-channel stem to ``in_chans`` (adapt_input_conv) after our filter passed it."""
    import timm.models._hub as timm_hub

    small = dict(embed_dim=(16, 32, 48), num_heads=(1, 2, 3), depth=(1, 1, 2))  # a CvT-13 made small
    torch.manual_seed(0)
    published = create_model("cvt_13", **small)
    save_file({k: v.contiguous() for k, v in native_to_hf(published.state_dict()).items()},
              str(tmp_path / "model.safetensors"))  # fmt: skip
    monkeypatch.setattr(timm_hub, "hf_hub_download", lambda repo_id, filename, **kw: str(tmp_path / filename))
    model = create_model("cvt_13.msft_in1k", pretrained=True, in_chans=in_chans, **small)
    stem, rgb = model.stage0.patch_embed.proj.weight, published.stage0.patch_embed.proj.weight
    assert stem.shape == (16, in_chans, 7, 7)
    if in_chans == 1:  # timm sums the RGB filters for one channel
        torch.testing.assert_close(stem, rgb.sum(dim=1, keepdim=True))
    else:  # and repeats them, scaled by 3 / in_chans, for more
        torch.testing.assert_close(stem[:, :3], rgb * 3 / in_chans)
    assert torch.equal(
        model.stage2.blocks[1].attn.proj_q.weight, published.stage2.blocks[1].attn.proj_q.weight
    )
    with pytest.raises(CheckpointError, match=r"does not fit.*stage0\.patch_embed\.proj\.weight"):
        create_model("cvt_13.msft_in1k", pretrained=True, in_chans=1, patch_size=(5, 3, 3), **small)


def test_pretrained_offline_fails_fast_with_checkpoint_path_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    with warnings.catch_warnings(), pytest.raises(CheckpointError) as err:
        warnings.simplefilter("ignore")
        create_model("cvt_13", pretrained=True, cache_dir=tmp_path)  # empty cache
    message = str(err.value)
    assert "microsoft/cvt-13" in message and "model.safetensors" in message and "checkpoint_path=" in message
    assert "HF_HUB_OFFLINE=1 makes this fail at once" in message


def _failing_download(error: BaseException):
    def download(repo_id: str, filename: str, **kwargs) -> str:
        raise error

    return download


def test_pretrained_fetch_failures_are_checkpoint_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    import timm.models._hub as timm_hub
    from huggingface_hub.utils import EntryNotFoundError, HfHubHTTPError

    network_error = HfHubHTTPError.__bases__[0]  # the HTTP client's own errors (httpx's: no OSError)
    for error in (ConnectionError("unreachable"), EntryNotFoundError("no model.safetensors"),
                  network_error("connection reset")):  # fmt: skip
        monkeypatch.setattr(timm_hub, "hf_hub_download", _failing_download(error))
        with pytest.raises(CheckpointError, match=rf"could not fetch .* {type(error).__name__}"):
            create_model("cvt_13", pretrained=True)


@pytest.mark.parametrize(
    "error",
    [
        MemoryError(),
        torch.OutOfMemoryError("CUDA out of memory."),
        RuntimeError("size mismatch"),
        KeyError("x"),
    ],
)
def test_pretrained_out_of_memory_and_bugs_are_not_called_fetch_failures(
    monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> None:
    """Every failure of pretrained=True was "could not fetch ... from the Hugging Face hub ...
    HF_HUB_OFFLINE": an out-of-memory error or a bug sent the user to their network."""
    import timm.models._hub as timm_hub

    monkeypatch.setattr(timm_hub, "hf_hub_download", _failing_download(error))
    with pytest.raises(type(error)) as raised:
        create_model("cvt_13", pretrained=True)
    assert raised.value is error


def test_cli_convert_hf_to_cvt_and_back(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from cvt.cli.main import main

    hf = _hf_model(seed=7)
    folder = _write_hf_dir(hf, tmp_path / "hf", "model.safetensors")
    native = tmp_path / "cvt.safetensors"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # gelu: nothing to warn about
        assert main(["convert", str(folder), "--output", str(native), "--act", "gelu"]) == 0
        assert main(["convert", str(native), "--output", str(tmp_path / "again"), "--to", "hf"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and f"wrote {native}: a 3-stage CvT (" in out  # a folder names no variant ("model")
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        expected = hf(pixel_values=x).logits
        assert (load_model(native)(x) - expected).abs().max().item() < 1e-5
        again = CvtForImageClassification.from_pretrained(tmp_path / "again").eval()
        assert (again(pixel_values=x).logits - expected).abs().max().item() < 1e-5
    # without --act a hub folder is QuickGELU, which transformers cannot run: converting back warns, on
    # one line as the CLI prints errors (a process of its own: pytest records warnings in this one)
    argv = ["convert", str(folder), "--output", str(tmp_path / "q"), "--to", "hf"]
    done = subprocess.run([sys.executable, "-m", "cvt", *argv], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and (tmp_path / "q" / "config.json").is_file()
    assert done.stderr.startswith("cvt convert: warning: the model uses quick_gelu; transformers'")
    assert done.stderr.count("\n") == 1


def test_cli_convert_refuses_hf_files_written_while_it_reads(tmp_path: Path, capsys, monkeypatch) -> None:
    """Files that another process writes into the output folder after convert's first check are refused
    by export_hf itself: the same usage error (exit 2) as the check before reading, and the files kept."""
    import cvt.checkpoint
    from cvt.checkpoint import save_checkpoint
    from cvt.cli.main import main

    source = save_checkpoint(_ours_for(_hf_model()), tmp_path / "small.safetensors")
    out = tmp_path / "hf"
    real_load_model = cvt.checkpoint.load_model

    def load_while_another_writes(*args, **kwargs) -> CvT:
        out.mkdir()
        (out / "config.json").write_text("{}")
        return real_load_model(*args, **kwargs)

    monkeypatch.setattr(cvt.checkpoint, "load_model", load_while_another_writes)
    assert main(["convert", str(source), "--output", str(out), "--to", "hf"]) == 2
    assert capsys.readouterr().err == (
        f"cvt convert: error: refusing to overwrite {out / 'config.json'}: choose another folder or pass "
        f"overwrite=True (CLI: --overwrite)\n"
    )
    assert [p.name for p in out.iterdir()] == ["config.json"] and (out / "config.json").read_text() == "{}"


def test_hf_label_names_follow_the_integer_index() -> None:
    from cvt.checkpoint.hf import hf_label_names

    names = [f"class_{i}" for i in range(12)]
    config = {"id2label": {str(i): n for i, n in reversed(list(enumerate(names)))}}  # JSON keys
    assert hf_label_names(config) == names  # "10" after "9", not after "1"
    assert hf_label_names({"id2label": {str(i): f"LABEL_{i}" for i in range(12)}}) is None


def test_export_labels_classes_by_name_only_when_there_is_one_name_per_class() -> None:
    """Class names of another count than the head's (a config edited by hand, or the data set's names
    kept after re-heading the model) are transformers' placeholders: ``LABEL_i``."""
    from cvt.checkpoint.hf import hf_config_from_model

    model = create_model("cvt_tiny", act="gelu", depth=(1, 2, 3), num_classes=3)
    placeholders = {"0": "LABEL_0", "1": "LABEL_1", "2": "LABEL_2"}
    for names in (["ant", "bee", "cat", "dog"], ["ant", "bee"]):
        model.pretrained_cfg = {**model.pretrained_cfg, "label_names": names}
        config = hf_config_from_model(model)
        assert config["id2label"] == placeholders
        assert config["label2id"] == {"LABEL_0": 0, "LABEL_1": 1, "LABEL_2": 2}
    model.pretrained_cfg = {**model.pretrained_cfg, "label_names": ["ant", "bee", "cat"]}
    config = hf_config_from_model(model)
    assert config["id2label"] == {"0": "ant", "1": "bee", "2": "cat"}
    assert config["label2id"] == {"ant": 0, "bee": 1, "cat": 2}


def test_hf_config_without_labels_has_transformers_default_two_classes() -> None:
    config = CvtConfig(**{k: v for k, v in SMALL.items() if k != "num_labels"}).to_dict()
    assert CvtForImageClassification(CvtConfig(**config)).config.num_labels == 2
    for key in ("id2label", "label2id", "num_labels"):
        config.pop(key, None)
    assert model_kwargs_from_hf_config(config)["num_classes"] == 2
    assert model_kwargs_from_hf_config({**config, "num_labels": 9})["num_classes"] == 9


@pytest.mark.parametrize(
    ("change", "message"),
    [  # each was a raw TypeError or ValueError
        ({"embed_dim": 64}, r"embed_dim must be a list \(one value per stage\), got 64"),
        ({"id2label": {"zero": "a", "one": "b"}}, r"id2label keys must be the class indices 0..1, .*'zero'"),
        # a gap or an offset put each name on another output than transformers does, silently
        ({"id2label": {"1": "a", "2": "b", "3": "c"}}, r"id2label keys must be the class indices 0..2, one"),
        ({"id2label": {"0": "a", "1": "b", "3": "c"}}, r"0..2, one each, got \['0', '1', '3'\]"),
        ({"id2label": {"0": "a", "²": "b"}}, r"class indices 0..1"),  # "²".isdigit(), int("²") fails
        ({"num_labels": "nine", "id2label": None}, "num_labels must be a whole number, got 'nine'"),
        ({"num_channels": "3"}, "num_channels must be a whole number, got '3'"),
    ],
)
def test_hf_config_values_of_the_wrong_kind_are_named(change: dict, message: str) -> None:
    config = {**CvtConfig(**SMALL).to_dict(), **change}
    with pytest.raises(CheckpointError, match=message):
        model_kwargs_from_hf_config(config)


def test_export_keeps_a_non_square_size_and_one_input_channel(tmp_path: Path) -> None:
    """config.json's image_size is (H, W) and num_channels the stem's: both come back on loading."""
    torch.manual_seed(0)
    model = create_model("cvt_tiny", act="gelu", depth=(1, 2, 3), img_size=(32, 48), in_chans=1).eval()
    with pytest.warns(UserWarning, match="does not convert images to grayscale"):
        out = export_hf(model, tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    assert (config["image_size"], config["num_channels"], config["layer_norm_eps"]) == ([32, 48], 1, 1e-5)
    # transformers' processor has one size, the shorter side's (the longer would upscale every image)
    assert json.loads((out / "preprocessor_config.json").read_text())["size"] == {"shortest_edge": 32}
    back = load_model(out)
    assert (back.img_size, back.in_chans) == ((32, 48), 1)
    x = torch.randn(2, 1, 32, 48)
    with torch.no_grad():
        assert torch.equal(back(x), model(x))


def test_an_explicit_activation_wins_over_the_configs_hidden_act(tmp_path: Path) -> None:
    out = export_hf(create_model("cvt_tiny", act="gelu", depth=(1, 2, 3)), tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    assert model_kwargs_from_hf_config(config)["act"] == "gelu"
    assert model_kwargs_from_hf_config(config, act="quick_gelu")["act"] == "quick_gelu"
