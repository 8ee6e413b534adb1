"""CvT as a backbone: features_only models, feature_info, out_indices errors, the FPN example."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import timm
import torch

import cvt
from cvt.models.layers import tokens_to_map

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "segmentation_backbone.py"


def test_features_only_returns_the_stage_maps() -> None:
    torch.manual_seed(0)
    net = cvt.create_model("cvt_tiny", features_only=True, out_indices=(0, 1, 2)).eval()
    images = torch.randn(2, 3, 32, 24)  # non-square: maps keep the aspect ratio
    with torch.no_grad():
        maps = net(images)
        # the same computation by hand: each stage's tokens reshaped to a map (cls token dropped)
        x, expected = images, []
        for stage in net.model.stages:
            tokens, grid = stage(x)
            x = tokens_to_map(tokens, grid, stage.spec.cls_token)
            expected.append(x)
    assert [tuple(m.shape) for m in maps] == [(2, 32, 16, 12), (2, 64, 8, 6), (2, 128, 4, 3)]
    for got, want in zip(maps, expected, strict=True):
        torch.testing.assert_close(got, want)
        assert got.view(2, -1).shape[1] == want.numel() // 2  # NCHW-contiguous, as timm's feature maps
    assert net.feature_info.channels() == [32, 64, 128]
    assert net.feature_info.reduction() == [2, 4, 8]  # cvt_tiny: stride-2 embeddings everywhere


def test_imagenet_variants_have_strides_4_8_16_through_timm() -> None:
    # one block per stage keeps CvT-13's embeddings (strides, widths) at a fraction of the cost
    net = timm.create_model("cvt_13", features_only=True, out_indices=(1, 2), depth=1).eval()
    assert net.feature_info.reduction() == [8, 16]
    assert net.feature_info.channels() == [192, 384]
    with torch.no_grad():
        maps = net(torch.randn(1, 3, 64, 48))
    assert [tuple(m.shape) for m in maps] == [(1, 192, 8, 6), (1, 384, 4, 3)]  # 64/8, 48/8; 64/16, 48/16
    with torch.device("meta"):
        full = cvt.create_model("cvt_13", features_only=True)
    assert full.feature_info.reduction() == [4, 8, 16]


def test_feature_extractor_drops_the_head() -> None:
    net = cvt.create_model("cvt_tiny", features_only=True, out_indices=(1,))
    assert isinstance(net.model.head, torch.nn.Identity)
    assert net.feature_info.channels() == [64]


def test_feature_extractor_keeps_only_the_stages_it_reads() -> None:
    """timm prunes the stages past the last index: a parameter left unused fails DDP's reduction."""
    torch.manual_seed(0)
    full = cvt.create_model("cvt_tiny", features_only=True, out_indices=(0, 1, 2)).eval()
    torch.manual_seed(0)
    net = cvt.create_model("cvt_tiny", features_only=True, out_indices=(0, 1)).eval()
    assert not any(name.startswith("model.stage2.") for name, _ in net.named_parameters())
    assert net.feature_info.channels() == [32, 64] and net.model.num_features == 64
    images = torch.randn(2, 3, 32, 24)
    maps = net(images)
    with torch.no_grad():  # same seed: the same first stages (without a graph AVX-512 CPUs run oneDNN's
        for got, want in zip(maps, full(images)[:2], strict=True):  # linear, which rounds differently)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    sum(m.square().mean() for m in maps).backward()
    assert all(p.grad is not None for p in net.parameters())  # every kept parameter is used


def test_pruning_a_classifier_to_earlier_stages() -> None:
    model = cvt.create_model("cvt_tiny", num_classes=5)
    with pytest.raises(cvt.UsageError, match="prune_head=False keeps the head, which reads stage 2"):
        model.prune_intermediate_layers((0, 1), prune_head=False)
    assert model.num_stages == 3 and model.num_classes == 5  # nothing changed
    assert model.prune_intermediate_layers(2, prune_head=False) == [1, 2]  # the last stage stays
    assert model.num_classes == 5 and isinstance(model.norm, torch.nn.LayerNorm)
    assert model.prune_intermediate_layers([0]) == [0]
    assert model.num_stages == 1 and not hasattr(model, "stage1") and model.global_pool == ""
    assert isinstance(model.norm, torch.nn.Identity)  # the final norm fitted the removed last stage
    x = torch.randn(1, 3, 32, 32)
    tokens = model.forward_features(x)  # the one stage left, unnormed
    assert tokens.shape == (1, 16 * 16, 32)
    (stage_map,) = model.forward_intermediates(x, indices=[0], intermediates_only=True)
    torch.testing.assert_close(stage_map, tokens.transpose(1, 2).reshape(1, 32, 16, 16))


@pytest.mark.parametrize("out_indices", [(0, 1, 2), (0, 1)])
def test_a_features_only_model_loads_a_whole_model_checkpoint(tmp_path: Path, out_indices: tuple) -> None:
    """The features model has lost its head, final norm and (here) stage 2; the file holds them all."""
    torch.manual_seed(0)
    whole = cvt.create_model("cvt_tiny", num_classes=7).eval()
    path = tmp_path / "tiny.safetensors"
    cvt.save_checkpoint(whole, path)
    net = cvt.create_model("cvt_tiny", features_only=True, out_indices=out_indices, checkpoint_path=path)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = whole.forward_intermediates(images, indices=list(out_indices), intermediates_only=True)
        for got, want in zip(net.eval()(images), expected, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(cvt.CheckpointError, match="does not fit the model"):  # still checked strictly
        cvt.create_model("cvt_13", features_only=True, checkpoint_path=path)


@pytest.mark.parametrize("prune_norm", [True, False])
def test_a_pruned_backbone_saves_and_loads_back_as_itself(tmp_path: Path, prune_norm: bool) -> None:
    """A features_only model saves its pruned CvT (no final norm, two stages here); a model pruned with
    the last stage kept saves whether its norm went too. Both used to fail: raw AttributeError, or
    'missing key(s): norm.weight, norm.bias' when loaded."""
    torch.manual_seed(0)
    net = cvt.create_model("cvt_tiny", features_only=True, out_indices=(0, 1)).eval()
    pruned = cvt.create_model("cvt_tiny").eval()
    pruned.prune_intermediate_layers(3, prune_norm=prune_norm)
    images = torch.randn(2, 3, 32, 32)
    for name, model, inner in (("features", net, net.model), ("pruned", pruned, pruned)):
        loaded = cvt.load_model(cvt.save_checkpoint(model, tmp_path / f"{name}.safetensors"))
        assert type(loaded.norm) is type(inner.norm) and loaded.num_stages == inner.num_stages
        with torch.no_grad():
            torch.testing.assert_close(loaded.forward_features(images), inner.forward_features(images))
    with pytest.raises(cvt.CheckpointError, match="saves a CvT model, got Linear"):
        cvt.save_checkpoint(torch.nn.Linear(2, 2), tmp_path / "linear.safetensors")


def test_empty_stage_indices_are_a_clear_error() -> None:
    model = cvt.create_model("cvt_tiny")
    for call in (
        lambda: model.prune_intermediate_layers([]),
        lambda: model.forward_intermediates(torch.randn(1, 3, 32, 32), indices=[], intermediates_only=True),
    ):
        with pytest.raises(cvt.UsageError, match="must name at least one stage"):
            call()


def test_out_indices_out_of_range_is_a_clear_error() -> None:
    with pytest.raises(cvt.UsageError, match=r"stage indices \(0, 3\) out of range for a 3-stage model"):
        cvt.create_model("cvt_tiny", features_only=True, out_indices=(0, 3))  # refused when built
    with pytest.raises(cvt.UsageError, match="out of range"):
        cvt.create_model("cvt_tiny", features_only=True, out_indices=(-4,))  # used to wrap to stage 2


@pytest.mark.parametrize("feature_cls", ["hook", "dict", "fx"])
def test_feature_extractors_other_than_the_getter_are_refused(feature_cls: str) -> None:
    """timm's hook/dict/fx extractors read module outputs, which are tokens here (the last one the cls
    token alone): they gave token tensors or failed deep inside; the getter gives the stage maps."""
    with pytest.raises(cvt.UsageError, match="feature_cls must be 'getter'"):
        cvt.create_model("cvt_tiny", features_only=True, feature_cls=feature_cls)


@pytest.mark.slow
def test_fpn_example_trains_through_the_backbone() -> None:
    spec = importlib.util.spec_from_file_location("segmentation_backbone", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)

    torch.manual_seed(0)
    model = example.Segmenter("cvt_tiny", num_classes=2, img_size=32)
    images, masks = example.toy_batch(4, 32, torch.Generator().manual_seed(0))
    logits = model(images)
    assert logits.shape == (4, 2, 32, 32)
    torch.nn.functional.cross_entropy(logits, masks).backward()
    for stage in model.backbone.model.stages:  # gradients reach every stage of the backbone
        assert stage.patch_embed.proj.weight.grad.abs().sum() > 0

    losses = example.train("cvt_tiny", img_size=32, steps=4, batch=4)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.8 * losses[0]


def test_pruning_to_stages_without_a_cls_token_updates_what_the_head_reads() -> None:
    """Pruned to the cls-free first stages: token pooling is refused, avg pooling averages every token
    (none is taken for a cls token), and feature_info and stage indices (-1: the last stage) follow."""
    model = cvt.create_model("cvt_tiny", num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        (last,) = model.forward_intermediates(x, indices=[-1], intermediates_only=True)
        torch.testing.assert_close(last, model.forward_intermediates(x, intermediates_only=True)[2])
    assert model.prune_intermediate_layers([0, 1]) == [0, 1]
    assert not model.has_cls_token and [info["module"] for info in model.feature_info] == ["stage0", "stage1"]
    with pytest.raises(cvt.UsageError, match="needs a cls token"):
        model.reset_classifier(3, "token")
    model.reset_classifier(0, "avg")
    with torch.no_grad():
        tokens = model.forward_features(x)
        torch.testing.assert_close(model(x), tokens.mean(dim=1), rtol=0, atol=0)


def test_prune_norm_drops_the_final_norm_even_when_every_stage_stays() -> None:
    model = cvt.create_model("cvt_tiny", num_classes=5).eval()
    seen: list[torch.Tensor] = []
    model.stage2.register_forward_hook(lambda m, args, out: seen.append(out[0]))
    assert model.prune_intermediate_layers(3, prune_norm=True) == [0, 1, 2] and model.num_stages == 3
    assert isinstance(model.norm, torch.nn.Identity)
    with torch.no_grad():
        tokens = model.forward_features(torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(tokens, seen[0], rtol=0, atol=0)  # the last stage's tokens, unnormed
