"""The CvT model: official sizes, semantics (drop path, cls token, position embedding), timm API, errors."""

from __future__ import annotations

import copy
import re

import pytest
import timm
import torch
from timm.models import group_parameters
from torch import nn

import cvt
import cvt.models.cvt as cvt_module
from cvt.models import CvT, StageSpec, expand_stages, stages_from_official_spec
from cvt.models.cvt import kv_grid, stage_grids
from cvt.models.layers import QuickGELU

OFFICIAL_PARAMS = {"cvt_13": 19_997_480, "cvt_21": 31_622_696, "cvt_w24": 277_196_392}


def tiny(**overrides) -> CvT:
    """A 3-stage CvT small enough for many quick forward passes."""
    per_stage = dict(
        embed_dim=(16, 32, 48), depth=(1, 1, 2), num_heads=(1, 2, 3), patch_size=(7, 3, 3),
        patch_stride=(4, 2, 2), patch_padding=(2, 1, 1), cls_token=(False, False, True),
    )  # fmt: skip
    model_keys = ("act", "img_size", "num_classes", "init", "norm_eps")
    model_args = {k: overrides.pop(k) for k in model_keys if k in overrides}
    per_stage.update(overrides)
    return CvT(expand_stages(3, **per_stage), **{"num_classes": 5, "img_size": 64, **model_args})


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAMS))
def test_official_parameter_counts(name: str) -> None:
    with torch.device("meta"):
        model = cvt.create_model(name)
    assert cvt.count_params(model) == OFFICIAL_PARAMS[name]


# the official experiment files (DIM_EMBED, DEPTH, NUM_HEADS, DROP_PATH_RATE), as in the paper's Table 2
OFFICIAL_SPECS = {
    "cvt_13": ([64, 192, 384], [1, 2, 10], [1, 3, 6], 0.1),
    "cvt_21": ([64, 192, 384], [1, 4, 16], [1, 3, 6], 0.1),
    "cvt_w24": ([192, 768, 1024], [2, 2, 20], [3, 12, 16], 0.3),
}


@pytest.mark.parametrize("name", sorted(OFFICIAL_SPECS))
def test_official_stage_specs(name: str) -> None:
    """Widths, depths and head counts per stage (a wrong head count keeps the parameter count)."""
    with torch.device("meta"):
        model = cvt.create_model(name)
    dims, depths, heads, drop_path = OFFICIAL_SPECS[name]
    specs = model.stage_specs
    assert [s.embed_dim for s in specs] == dims and [s.depth for s in specs] == depths
    assert [s.num_heads for s in specs] == heads
    assert [stage.blocks[0].attn.num_heads for stage in model.stages] == heads  # what the layers got
    assert [s.cls_token for s in specs] == [False, False, True]
    assert [s.drop_path_rate for s in specs] == [0.0, 0.0, drop_path]
    assert [(s.patch_size, s.patch_stride) for s in specs] == [(7, 4), (3, 2), (3, 2)]


def test_official_cvt13_spec() -> None:
    with torch.device("meta"):
        model = cvt.create_model("cvt_13")
    assert model.act == "quick_gelu" and model.norm_eps == 1e-5
    assert isinstance(model.stage2.blocks[0].mlp.act, QuickGELU)
    assert model.stage0.blocks[0].norm1.eps == 1e-5


def test_norm_eps_reaches_every_layer_norm() -> None:
    model = tiny(norm_eps=1e-6)
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 2 * 4 + 3 + 1  # two per block, one per patch embedding, the final norm
    assert all(norm.eps == 1e-6 for norm in norms)


def test_cvt_w24_drop_path_and_default_size() -> None:
    with torch.device("meta"):
        model = cvt.create_model("cvt_w24")
    assert model.stage_specs[-1].drop_path_rate == 0.3
    assert model.pretrained_cfg["input_size"] == (3, 384, 384)
    assert model.pretrained_cfg["crop_pct"] == 1.0


@pytest.mark.parametrize(
    ("name", "size", "crop_pct", "hub_id"),
    [
        ("cvt_13.msft_in1k", 224, 0.875, "microsoft/cvt-13"),
        ("cvt_13.msft_in1k_384", 384, 1.0, "microsoft/cvt-13-384"),
        ("cvt_13.msft_in22k_ft_in1k_384", 384, 1.0, "microsoft/cvt-13-384-22k"),
        ("cvt_21.msft_in1k", 224, 0.875, "microsoft/cvt-21"),
        ("cvt_21.msft_in1k_384", 384, 1.0, "microsoft/cvt-21-384"),
        ("cvt_21.msft_in22k_ft_in1k_384", 384, 1.0, "microsoft/cvt-21-384-22k"),
        ("cvt_w24.msft_in22k_ft_in1k_384", 384, 1.0, "microsoft/cvt-w24-384-22k"),
    ],
)
def test_pretrained_configs(name: str, size: int, crop_pct: float, hub_id: str) -> None:
    """Every published checkpoint: its own hub repository (the in1k and 22k weights of one size are
    different files), input size and crop."""
    assert name in cvt.list_models(pretrained=True)
    with torch.device("meta"):
        model = cvt.create_model(name)
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, size, size) and model.img_size == (size, size)
    assert cfg["crop_pct"] == crop_pct and cfg["interpolation"] == "bicubic"
    assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)
    assert cfg["hf_hub_id"] == hub_id and cfg["num_classes"] == 1000
    assert cfg["first_conv"] == "stage0.patch_embed.proj" and cfg["classifier"] == "head"


def test_list_models_and_tags() -> None:
    names = cvt.list_models()
    assert {"cvt", "cvt_13", "cvt_21", "cvt_w24", "cvt_tiny", "cvt_13_cifar"} <= set(names)
    assert cvt.list_models("cvt_2*") == ["cvt_21", "cvt_21_cifar"]
    tags = cvt.list_models(pretrained=True)
    assert "cvt_w24.msft_in22k_ft_in1k_384" in tags and len(tags) == 7


def test_timm_create_model_builds_the_same_model() -> None:
    torch.manual_seed(0)
    ours = cvt.create_model("cvt_tiny", num_classes=7)
    torch.manual_seed(0)
    theirs = timm.create_model("cvt_tiny", num_classes=7)
    assert type(theirs) is CvT
    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    assert ours_sd.keys() == theirs_sd.keys()
    assert all(torch.equal(ours_sd[k], theirs_sd[k]) for k in ours_sd)


def test_seed_alias_is_cvt13_with_kernel3_stem() -> None:
    with torch.device("meta"):
        alias, base = cvt.create_model("cvt"), cvt.create_model("cvt_13", num_classes=10)
    assert alias.num_classes == 10
    assert alias.stage_specs[0].patch_size == 3
    assert [s.depth for s in alias.stage_specs] == [s.depth for s in base.stage_specs]
    # only the first embedding kernel differs: 64 * 3 * (7*7 - 3*3) fewer weights
    assert cvt.count_params(base) - cvt.count_params(alias) == 64 * 3 * (49 - 9)


def test_cifar_variants_keep_grids_at_32() -> None:
    model = cvt.create_model("cvt_13_cifar").eval()
    maps = model.forward_intermediates(torch.randn(1, 3, 32, 32), intermediates_only=True)
    assert [tuple(m.shape[-2:]) for m in maps] == [(32, 32), (16, 16), (8, 8)]


def test_unknown_model_suggests_close_names() -> None:
    with pytest.raises(cvt.UsageError, match=r"unknown model 'cvt_12'.*cvt_13"):
        cvt.create_model("cvt_12")
    with pytest.raises(cvt.UsageError, match=r"unknown pretrained tag in 'cvt_13.bogus'.*cvt_13.msft_in1k"):
        cvt.create_model("cvt_13.bogus")  # was timm's RuntimeError


def test_unknown_override_is_named() -> None:
    with pytest.raises(cvt.UsageError, match=r"'drop_path'.*did you mean 'drop_path_rate'"):
        cvt.create_model("cvt_tiny", drop_path=0.1)


def test_stage_overrides_scalar_and_per_stage() -> None:
    model = cvt.create_model("cvt_tiny", stride_kv=1, drop_path_rate=(0.0, 0.1, 0.2))
    assert [s.stride_kv for s in model.stage_specs] == [1, 1, 1]
    assert [s.drop_path_rate for s in model.stage_specs] == [0.0, 0.1, 0.2]
    with pytest.raises(cvt.UsageError, match="2 values for 3 stages"):
        cvt.create_model("cvt_tiny", depth=(1, 2))
    # a scalar for the field that used to give the stage count (was a TypeError: len() of an int)
    model = cvt.create_model("cvt_tiny", embed_dim=64)
    assert [s.embed_dim for s in model.stage_specs] == [64, 64, 64]
    with pytest.raises(cvt.UsageError, match="embed_dim 62 is not divisible by num_heads 4"):
        cvt.create_model("cvt_tiny", embed_dim=62)


def test_wrong_channel_count_names_expected_and_got() -> None:
    model = tiny().eval()
    with pytest.raises(cvt.InputShapeError, match="expected 3 input channels, got 1"):
        model(torch.randn(2, 1, 64, 64))


def test_too_small_input_names_minimum() -> None:
    model = cvt.create_model("cvt_13").eval()
    assert model.min_input_size() == (3, 3)
    model(torch.randn(1, 3, 3, 3))  # the minimum works: 1x1 grids everywhere
    with pytest.raises(cvt.InputShapeError, match="minimum size is 3x3"):
        model(torch.randn(1, 3, 2, 16))


def test_a_training_batch_of_one_whose_query_map_is_1x1_is_refused() -> None:
    """padding_kv 2 keeps a 2x2 key/value map over a 1x1 token grid, whose query BatchNorm sees one
    value per channel (torch's "Expected more than 1 value per channel when training")."""
    stage = cvt.StageSpec(embed_dim=8, depth=1, num_heads=1, patch_stride=2, padding_kv=2)
    model = cvt.CvT([stage], num_classes=10, img_size=8).train()
    with pytest.raises(
        cvt.InputShapeError, match=r"one 2x2 image cannot go through stage0 .*its query map is 1x1"
    ):
        model(torch.randn(1, 3, 2, 2))
    assert model(torch.randn(2, 3, 2, 2)).shape == (2, model.num_classes)


def test_a_training_batch_of_one_whose_batchnorm_sees_one_value_is_refused() -> None:
    # 16x16: stage1's key/value map is 1x1 (was torch's "Expected more than 1 value per channel")
    model = cvt.create_model("cvt_13").train()
    with pytest.raises(cvt.InputShapeError, match=r"one 16x16 image cannot go through stage1 .* 1x1"):
        model(torch.randn(1, 3, 16, 16))
    with pytest.raises(cvt.InputShapeError, match=r"one 32x32 image cannot go through stage2"):
        model(torch.randn(1, 3, 32, 32))
    # what can normalise still runs: two images, a 2x2 map, eval mode, frozen BatchNorms
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 1000)
    assert model(torch.randn(1, 3, 48, 48)).shape == (1, 1000)
    model.eval()
    assert model(torch.randn(1, 3, 16, 16)).shape == (1, 1000)
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.eval()
    assert model(torch.randn(1, 3, 16, 16)).shape == (1, 1000)
    # projections without BatchNorm have nothing to refuse
    assert cvt.create_model("cvt_tiny", method="avg").train()(torch.randn(1, 3, 16, 16)).isfinite().all()


def test_img_size_below_the_minimum_is_refused() -> None:
    with pytest.raises(cvt.UsageError, match="img_size 2x2 is too small.*minimum size is 3x3"):
        cvt.create_model("cvt_13", img_size=2)


def test_empty_batch_and_wrong_rank_are_refused() -> None:
    model = tiny().eval()
    with pytest.raises(cvt.InputShapeError, match="empty batch"):
        model(torch.randn(0, 3, 64, 64))
    with pytest.raises(cvt.InputShapeError, match="image batch"):
        model(torch.randn(3, 64, 64))


def test_wrong_dtype_is_refused_but_autocast_works() -> None:
    model = tiny().eval()
    with pytest.raises(cvt.InputShapeError, match="expected a torch.float32 input.*got torch.float64"):
        model(torch.randn(1, 3, 64, 64, dtype=torch.float64))
    with pytest.raises(cvt.InputShapeError, match="got torch.uint8"):
        model(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(x.bfloat16())
    with torch.no_grad():
        ref = model(x)
    assert torch.isfinite(low).all() and (low.float() - ref).abs().max() < 0.1 * ref.abs().max() + 0.05
    # autocast casts neither a float64 input nor float64 weights: a raw dtype error in the first conv
    with (
        torch.autocast("cpu", dtype=torch.bfloat16),
        pytest.raises(cvt.InputShapeError, match=r"got torch.float64 \(autocast leaves float64 as it is\)"),
    ):
        model(x.double())


def test_batch_of_one_equals_row_of_batch() -> None:
    model = tiny().eval()
    x = torch.randn(4, 3, 64, 48)
    with torch.no_grad():
        batch, single = model(x), model(x[2:3])
    assert single.shape == (1, 5)
    torch.testing.assert_close(single[0], batch[2], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["dw_bn", "avg", "linear"])
def test_projection_methods_fused_equals_reference(method: str) -> None:
    model = tiny(method=method).eval()
    x = torch.randn(2, 3, 72, 56)
    with torch.no_grad():
        fused = model(x)
        for m in model.modules():
            if hasattr(m, "fused_attn"):
                m.fused_attn = False
        reference = model(x)
    torch.testing.assert_close(fused, reference, atol=1e-5, rtol=1e-5)


def test_linear_projection_is_plain_vit_attention() -> None:
    """method='linear' everywhere (the official code crashes there): q/k/v are the tokens themselves."""
    model = tiny(method="linear").eval()
    attn = model.stage2.blocks[0].attn
    assert attn.conv_proj_q is None and attn.conv_proj_k is None and attn.conv_proj_v is None
    x = torch.randn(2, 1 + 16, 48)
    with torch.no_grad():
        out = attn(x, (4, 4))
        q = attn.proj_q(x).reshape(2, 17, 3, 16).transpose(1, 2)
        k = attn.proj_k(x).reshape(2, 17, 3, 16).transpose(1, 2)
        v = attn.proj_v(x).reshape(2, 17, 3, 16).transpose(1, 2)
        probs = torch.softmax(q @ k.transpose(-2, -1) * 48**-0.5, dim=-1)  # scale: dim_out, not head_dim
        expected = attn.proj((probs @ v).transpose(1, 2).reshape(2, 17, 48))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_avg_projection_keeps_query_linear() -> None:
    attn = tiny(method="avg").stage0.blocks[0].attn
    assert attn.conv_proj_q is None
    assert isinstance(attn.conv_proj_k.avg, nn.AvgPool2d) and attn.conv_proj_k.avg.ceil_mode


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(stride_q=2), "q projection must keep the token grid"),
        (dict(kernel_qkv=5), "q projection must keep the token grid"),  # padding_q 1 shrinks the grid
        (dict(kernel_qkv=2), "q projection must keep the token grid"),
        (dict(padding_q=0), "q projection must keep the token grid"),
        (dict(method="avg", padding_kv=2), "more than half of kernel_qkv"),
        (dict(stride_kv=0), "stride_kv must be >= 1"),
        (dict(padding_kv=-1), "padding_kv must be >= 0"),
        (dict(drop_path_rate="high"), "drop_path_rate must be float, got 'high'"),  # was a TypeError
        (dict(patch_size=2.5), "patch_size must be int"),
        (dict(cls_token=1), "cls_token must be bool"),
        # torch refused these only at the first training step, after --overwrite had cleared the run
        (dict(drop_path_rate=2.0), r"drop_path_rate must be in \[0, 1\), got 2.0"),
        (dict(drop_path_rate=1.0), r"drop_path_rate must be in \[0, 1\)"),  # the block never trains
        (dict(drop_rate=1.5), r"drop_rate must be in \[0, 1\), got 1.5"),
        (dict(attn_drop_rate=-0.1), r"attn_drop_rate must be in \[0, 1\)"),
        (dict(attn_drop_rate=float("nan")), r"attn_drop_rate must be in \[0, 1\), got nan"),
        # these were a negative-dimension RuntimeError, a NaN-to-int ValueError, an empty MLP
        (dict(mlp_ratio=-1.0), "mlp_ratio must be a finite number that leaves the MLP at least one hidden"),
        (dict(mlp_ratio=float("nan")), "mlp_ratio must be a finite number"),
        (dict(mlp_ratio=0.01), r"int\(embed_dim \* mlp_ratio\) >= 1\), got 0.01"),
    ],
)
def test_stage_options_that_cannot_run_are_refused_when_built(options: dict, message: str) -> None:
    """Each of these used to fail only at the first forward (a size mismatch in the residual, a pooling
    error) or with a ZeroDivisionError; a kernel-5 projection with its 'same' padding is fine."""
    with pytest.raises(cvt.UsageError, match=message):
        StageSpec(embed_dim=16, depth=1, num_heads=1, **options)
    model = tiny(kernel_qkv=5, padding_q=2, padding_kv=2).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 5)


@pytest.mark.parametrize(
    ("options", "message"),
    [  # raw TypeError/ValueError/RuntimeError from deep inside, or a model built with no input channel
        (dict(in_chans=0), "in_chans must be a whole number >= 1, got 0"),
        (dict(in_chans=1.5), "in_chans must be a whole number >= 1, got 1.5"),
        (dict(img_size=(32, 32, 32)), r"img_size must be a whole number N \(N x N\) or a pair \(H, W\)"),
        (dict(img_size="32"), "img_size must be a whole number N"),
        (dict(img_size=32.0), "img_size must be a whole number N"),
        (dict(norm_eps=-1.0), "norm_eps must be a finite number >= 0, got -1.0"),
    ],
)
def test_model_options_that_cannot_build_are_refused(options: dict, message: str) -> None:
    with pytest.raises(cvt.UsageError, match=message):
        cvt.create_model("cvt_tiny", **options)
    assert cvt.create_model("cvt_tiny", img_size=[40, 48], in_chans=1).img_size == (
        40,
        48,
    )  # a list is a pair


def test_drop_path_rates_are_per_block_within_each_stage() -> None:
    model = tiny(depth=(1, 2, 5), drop_path_rate=(0.0, 0.2, 0.4))
    rates = [[getattr(b.drop_path, "drop_prob", 0.0) for b in s.blocks] for s in model.stages]
    assert rates[0] == [0.0]
    assert rates[1] == pytest.approx([0.0, 0.2])
    assert rates[2] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])


def test_drop_path_drops_branches_not_the_residual() -> None:
    """A block with drop-path rate 1 in training passes its input through unchanged (HF drops both)."""
    model = tiny(depth=(1, 1, 2), drop_path_rate=(0.0, 0.0, 0.5)).train()
    block = model.stage2.blocks[1]
    block.drop_path.drop_prob = 1.0  # every branch dropped (a StageSpec refuses rate 1: it cannot train)
    x = torch.randn(2, 1 + 16, 48)
    torch.testing.assert_close(block(x, (4, 4)), x)


def test_cls_token_in_any_stage() -> None:
    model = tiny(cls_token=(True, True, False)).eval()
    assert hasattr(model.stage0, "cls_token") and not hasattr(model.stage2, "cls_token")
    assert model.global_pool == "avg"
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = model.forward_features(x)
        pooled = model.forward_head(tokens, pre_logits=True)
    assert tokens.shape == (2, 16, 48)  # no cls in the last stage: 4x4 tokens
    torch.testing.assert_close(pooled, tokens.mean(dim=1))


def test_forward_head_pools_cls_token() -> None:
    model = tiny().eval()
    with torch.no_grad():
        tokens = model.forward_features(torch.randn(2, 3, 64, 64))
        logits = model.forward_head(tokens)
    assert tokens.shape == (2, 17, 48)
    torch.testing.assert_close(model.forward_head(tokens, pre_logits=True), tokens[:, 0])
    torch.testing.assert_close(logits, model.head(tokens[:, 0]))


def test_position_embedding_learned_and_interpolated() -> None:
    model = tiny(pos_embed=(True, False, True), img_size=64).eval()
    assert model.stage0.pos_embed.shape == (1, 16 * 16, 16)
    assert model.stage2.pos_embed.shape == (1, 4 * 4, 48)
    assert model.no_weight_decay() == {"stage0.pos_embed", "stage2.pos_embed", "stage2.cls_token"}
    stage = model.stage0
    assert stage.position_embedding((16, 16)) is stage.pos_embed
    with torch.no_grad():
        stage.pos_embed.fill_(0.25)  # bicubic resizing of a constant is the same constant
    resized = stage.position_embedding((24, 20))
    assert resized.shape == (1, 24 * 20, 16)
    torch.testing.assert_close(resized, torch.full_like(resized, 0.25))
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 3, 96, 80))).all()


def test_position_embedding_changes_the_output() -> None:
    model = tiny(pos_embed=True).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        model.stage1.pos_embed.add_(1.0)
        after = model(x)
    assert (before - after).abs().max() > 1e-3


def test_forward_intermediates_are_stage_maps() -> None:
    model = tiny().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x, norm=True)
        features = model.forward_features(x)
    assert [tuple(m.shape) for m in maps] == [(2, 16, 16, 16), (2, 32, 8, 8), (2, 48, 4, 4)]
    assert all(m.is_contiguous() for m in maps)  # NCHW as timm's: m.view(2, -1) works
    assert [info["reduction"] for info in model.feature_info] == [4, 8, 16]
    torch.testing.assert_close(final, features)
    # the normed last map is the normed tokens without the cls token
    torch.testing.assert_close(maps[-1].flatten(2).transpose(1, 2), features[:, 1:])
    only_last = model.forward_intermediates(x, indices=1, intermediates_only=True)
    torch.testing.assert_close(only_last[0], model.forward_intermediates(x, intermediates_only=True)[-1])
    for bad in ([3], [-4]):  # -4 used to wrap around to stage 2
        with pytest.raises(cvt.UsageError, match="out of range"):
            model.forward_intermediates(x, indices=bad)
    torch.testing.assert_close(
        model.forward_intermediates(x, indices=[-3], intermediates_only=True)[0], maps[0]
    )


def test_forward_intermediates_stopping_early_returns_the_last_map_run() -> None:
    """timm's stop_early: no stage past the last index runs; the final norm (of the last stage's width)
    is not applied to an earlier stage's map (it used to raise a shape error)."""
    model = tiny().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        maps = model.forward_intermediates(x, intermediates_only=True)
        last, taken = model.forward_intermediates(x, indices=[0], stop_early=True)
    torch.testing.assert_close(taken[0], maps[0])
    torch.testing.assert_close(last, maps[0])


def test_reset_classifier() -> None:
    model = tiny().eval()
    model.reset_classifier(3)
    assert model.get_classifier().out_features == 3 and model.num_classes == 3
    model.reset_classifier(0)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, model.num_features)
    model.reset_classifier(4, global_pool="avg")
    assert model.global_pool == "avg"
    with pytest.raises(cvt.UsageError, match="needs a cls token"):
        tiny(cls_token=False).reset_classifier(4, global_pool="token")
    with pytest.raises(cvt.UsageError, match="global_pool must be"):
        model.reset_classifier(4, global_pool="max")
    # a negative or fractional class count used to give a silent identity head (features as "logits")
    model.reset_classifier(1)  # a valid count first: True must still be refused after it (1 == True)
    model.reset_classifier(4)
    for bad in (-3, 2.5, True, [3]):
        message = f"num_classes must be a whole number >= 0.*got {re.escape(repr(bad))}"
        with pytest.raises(cvt.UsageError, match=message):
            model.reset_classifier(bad)
        with pytest.raises(cvt.UsageError, match="num_classes must be a whole number >= 0"):
            cvt.create_model("cvt_tiny", num_classes=bad)
    assert model.num_classes == 4 and model.get_classifier().out_features == 4


def test_global_pool_options_as_timm() -> None:
    """``global_pool`` at construction (also through timm.create_model), '' for every token's
    outputs, and avg pooling of features that hold the cls token alone refused (it gave NaN)."""
    x = torch.randn(2, 3, 64, 64)
    model = tiny().eval()
    with torch.no_grad():
        tokens = model.forward_features(x)  # (2, 1 + 16, 48)
        model.reset_classifier(0, "")
        torch.testing.assert_close(model(x), tokens)
        avg = cvt.create_model("cvt_tiny", global_pool="avg").eval()
        assert avg.global_pool == "avg" and timm.create_model("cvt_tiny", global_pool="").global_pool == ""
        avg_tokens = avg.forward_features(torch.randn(2, 3, 32, 32))
        torch.testing.assert_close(avg.forward_head(avg_tokens, pre_logits=True), avg_tokens[:, 1:].mean(1))
        with pytest.raises(cvt.UsageError, match="these features have none"):
            avg.forward_head(avg.forward_features(torch.randn(2, 3, 32, 32), cls_only=True))


def test_grad_checkpointing_gives_the_same_gradients() -> None:
    torch.manual_seed(0)
    model = tiny().train()
    x = torch.randn(2, 3, 64, 64)

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad()
        model(x).square().sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.set_grad_checkpointing(True)
    assert all(stage.grad_checkpointing for stage in model.stages)
    checkpointed = grads()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    model.set_grad_checkpointing(False)
    assert not any(stage.grad_checkpointing for stage in model.stages)


def test_group_matcher_covers_every_parameter() -> None:
    model = tiny(pos_embed=True)
    groups = group_parameters(model, model.group_matcher())
    grouped = [name for names in groups.values() for name in names]
    assert sorted(grouped) == sorted(n for n, _ in model.named_parameters())
    first = groups[min(groups)]
    assert all(n.startswith("stage0.patch_embed") for n in first)
    final_norm = {n for names in groups.values() for n in names if n.startswith("norm")}
    assert final_norm == {"norm.weight", "norm.bias"}


@pytest.mark.parametrize("coarse", [False, True])
def test_group_matcher_orders_layers_for_layer_wise_lr_decay(coarse: bool) -> None:
    """timm's layer-wise lr decay scales each group by its depth: the stem first, then one group per
    block (fine) or per stage (coarse), a stage's embedding and tokens with its first block, the final
    norm with the last block (timm's "previous group"), the head last."""
    model = tiny(pos_embed=True)
    groups = group_parameters(model, model.group_matcher(coarse))
    layout = [sorted({".".join(n.split(".")[:2]) for n in names}) for _, names in sorted(groups.items())]
    stage2 = ["stage2.blocks", "stage2.cls_token", "stage2.patch_embed", "stage2.pos_embed"]
    if coarse:
        stage_groups, last = [stage2], ["head.bias", "head.weight", "norm.bias", "norm.weight"]
    else:  # stage 2 has two blocks: its second one a group of its own, with the final norm
        stage_groups = [stage2, ["norm.bias", "norm.weight", "stage2.blocks"]]
        last = ["head.bias", "head.weight"]
    assert layout == [
        ["stage0.patch_embed"],
        ["stage0.blocks", "stage0.pos_embed"],
        ["stage1.blocks", "stage1.patch_embed", "stage1.pos_embed"],
        *stage_groups,
        last,
    ]


def test_official_init() -> None:
    torch.manual_seed(0)
    model = cvt.create_model("cvt_13", num_classes=10)
    fc1 = model.stage2.blocks[0].mlp.fc1
    # timm's trunc_normal_(std=0.02) as the official code: bounds are +-2 absolute, i.e. ~normal(0, 0.02)
    assert abs(fc1.weight.std().item() - 0.02) < 0.001 and abs(fc1.weight.mean().item()) < 0.001
    assert torch.count_nonzero(fc1.bias) == 0
    bn = model.stage1.blocks[0].attn.conv_proj_k.bn
    assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and torch.count_nonzero(bn.bias) == 0
    assert 0.01 < model.stage2.cls_token.std().item() < 0.03
    xavier = tiny(init="xavier").stage2.blocks[0].mlp.fc1.weight
    bound = (6 / (48 + 192)) ** 0.5
    assert xavier.abs().max() <= bound and xavier.std() > 0.08  # xavier-uniform, not std 0.02


def test_gelu_option_and_bad_options() -> None:
    assert isinstance(tiny(act="gelu").stage0.blocks[0].mlp.act, nn.GELU)
    with pytest.raises(cvt.UsageError, match="act must be one of"):
        tiny(act="relu")
    with pytest.raises(cvt.UsageError, match="projection method"):
        tiny(method="conv")
    with pytest.raises(cvt.UsageError, match="not divisible"):
        tiny(num_heads=(3, 2, 3))


def test_out_of_range_dropout_from_create_model_is_refused() -> None:
    """``cvt train --model-args drop_path_rate=2`` reaches the stages through create_model."""
    with pytest.raises(cvt.UsageError, match=r"drop_path_rate must be in \[0, 1\), got 2"):
        cvt.create_model("cvt_tiny", drop_path_rate=2)
    with pytest.raises(cvt.UsageError, match=r"drop_rate must be in \[0, 1\), got 1.5"):
        cvt.create_model("cvt_tiny", drop_rate=(0.0, 0.0, 1.5))


def test_pretrained_without_published_weights_is_refused() -> None:
    with pytest.raises(cvt.UsageError, match="cvt_tiny has no published weights"):
        cvt.create_model("cvt_tiny", pretrained=True)


@pytest.mark.parametrize(
    ("options", "expected"), [(dict(method="avg", padding_kv=0), 19), (dict(padding_kv=0), 35), ({}, 3)]
)
def test_min_input_size_is_the_smallest_size_that_runs(
    monkeypatch: pytest.MonkeyPatch, options: dict, expected: int
) -> None:
    """The avg pooling rounds its output size up (ceil mode), a dw_bn conv down: with padding_kv 0 an
    avg model runs at 19x19 where a dw_bn one needs 35x35. Without the input check, one pixel less
    than the minimum fails or gives no finite logits."""
    model = tiny(**options).eval()
    assert model.min_input_size() == (expected, expected)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 3, expected, expected))).all()
        with pytest.raises(cvt.InputShapeError, match=f"minimum size is {expected}x{expected}"):
            model(torch.randn(1, 3, expected - 1, expected - 1))
        monkeypatch.setattr(model, "check_input", lambda x: None)
        try:
            logits = model(torch.randn(1, 3, expected - 1, expected - 1))
        except RuntimeError:
            return
        assert not torch.isfinite(logits).all()


@pytest.mark.parametrize(
    "options",
    [{}, dict(padding_kv=0), dict(method="avg"), dict(method="avg", padding_kv=0), dict(method="linear")],
)
def test_stage_and_kv_grids_are_those_of_the_layers(options: dict) -> None:
    """``stage_grids`` and ``kv_grid`` (which attention maps, complexity and min_input_size read) give
    the token grid of every stage and the key count of its attention, at an odd non-square size where
    avg pooling (ceil mode) and a dw_bn conv (floor) differ."""
    model = tiny(**options).eval()
    seen: list[tuple[torch.Tensor, tuple[int, int]]] = []
    for stage in model.stages:
        stage.blocks[0].attn.register_forward_pre_hook(lambda m, args: seen.append(args[:2]))
    with torch.no_grad():
        model.forward_features(torch.randn(1, 3, 75, 93))
        grids = stage_grids(model.stage_specs, (75, 93))
        assert [grid for _, grid in seen] == grids
        for stage, (tokens, grid) in zip(model.stages, seen, strict=True):
            _, k, _ = stage.blocks[0].attn.project_qkv(tokens, grid)  # (1, heads, Tkv, d)
            h, w = kv_grid(stage.spec, grid)
            assert k.shape[-2] == h * w + int(stage.spec.cls_token)


def test_reset_classifier_initializes_the_new_head_as_timm() -> None:
    model = tiny()
    model.reset_classifier(50)
    head = model.get_classifier()
    assert torch.equal(head.bias, torch.zeros(50))
    assert head.weight.std().item() == pytest.approx(0.02, rel=0.1)  # nn.Linear's default: 0.083
    model.reset_classifier(4, global_pool="avg")
    assert torch.equal(model.get_classifier().bias, torch.zeros(4))


def test_stage_dropout_after_the_embedding_runs_in_training_only() -> None:
    """``drop_rate`` also drops tokens (and the cls token) right after each stage's patch embedding."""
    model = tiny(drop_rate=0.5)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    for stage in model.stages:
        assert stage.pos_drop.p == 0.5
        stage.pos_drop.register_forward_hook(lambda m, args, out: seen.append((args[0], out)))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        model.train()(x)
        assert len(seen) == 3
        for inp, out in seen:
            dropped = out == 0
            assert 0.3 < dropped.float().mean().item() < 0.7
            torch.testing.assert_close(out[~dropped], inp[~dropped] * 2)  # scaled by 1 / (1 - p)
        assert seen[2][0].shape[1] == 1 + 4 * 4  # the cls token and the 4x4 grid
        seen.clear()
        model.eval()(x)
        assert all(torch.equal(inp, out) for inp, out in seen) and len(seen) == 3


# -------------------------------------------------------------- survivors of a mutation round on cvt.py
def test_per_stage_lists_longer_than_the_stages_are_refused() -> None:
    with pytest.raises(cvt.UsageError, match="depth has 4 values for 3 stages"):
        expand_stages(3, depth=[1, 1, 2, 1])


def test_stage_fields_without_a_default_must_be_given() -> None:
    with pytest.raises(cvt.UsageError, match=r"\['depth', 'num_heads'\] have no default"):
        expand_stages(3, embed_dim=[64, 192, 384])


def test_an_official_spec_with_num_stages_may_give_scalars() -> None:
    """``NUM_STAGES`` sets the count; a scalar applies to every stage, as in ``expand_stages``."""
    specs = stages_from_official_spec({"NUM_STAGES": 2, "DIM_EMBED": 64, "DEPTH": [1, 2], "NUM_HEADS": 2})
    assert [(s.embed_dim, s.depth, s.num_heads) for s in specs] == [(64, 1, 2), (64, 2, 2)]


@pytest.mark.parametrize(
    "spec",
    [{"DIM_EMBED": 64}, {"DIM_EMBED": [64], "NUM_STAGES": "one"}, {"DIM_EMBED": [64], "NUM_STAGES": 0},
     {"DIM_EMBED": [64], "NUM_STAGES": True}],
    ids=["scalar dims alone", "count a string", "count zero", "count a bool"],
)  # fmt: skip
def test_an_official_spec_without_a_stage_count_is_refused(spec: dict) -> None:
    with pytest.raises(cvt.UsageError, match="NUM_STAGES as a positive integer or DIM_EMBED as a per-stage"):
        stages_from_official_spec(spec)


def test_the_cls_token_is_prepended_and_pooled_from_the_front() -> None:
    """The first block of a cls stage sees the learned cls token at position 0, before the patch tokens
    (the official layout, which published checkpoints rely on)."""
    model = tiny().eval()
    with torch.no_grad():
        model.stage2.cls_token.normal_()
    seen: list[torch.Tensor] = []
    model.stage2.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    (tokens,) = seen
    assert tokens.shape == (2, 1 + 16, 48)
    torch.testing.assert_close(tokens[:, 0], model.stage2.cls_token[0].expand(2, -1), rtol=0, atol=0)


def test_grad_checkpointing_recomputes_only_when_enabled_and_a_graph_is_built(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without a graph (no_grad) nothing is recomputed in backward, so the blocks run plainly."""
    calls: list[bool] = []
    checkpoint = cvt_module.checkpoint

    def counted(block: nn.Module, *args: object, **kwargs: object) -> torch.Tensor:
        calls.append(args[-1])  # cls_only
        return checkpoint(block, *args, **kwargs)

    monkeypatch.setattr(cvt_module, "checkpoint", counted)
    model = tiny().train()
    x = torch.randn(2, 3, 64, 64)
    model(x)
    assert calls == []
    model.set_grad_checkpointing(True)
    with torch.no_grad():
        model(x)
    assert calls == []
    model(x)
    assert calls == [False, False, False, True]  # every block; the last one for the cls token alone


def test_a_checkpointed_forward_moves_batchnorm_statistics_once_with_or_without_backward() -> None:
    """The forward updates the running statistics (also when no backward follows: a step given up);
    the recomputation in backward leaves them as the forward left them."""
    torch.manual_seed(0)
    plain = tiny().train()
    recomputing = copy.deepcopy(plain)
    recomputing.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 64, 64)
    outputs = [model(x) for model in (plain, recomputing)]

    def assert_same_buffers() -> None:
        expected = dict(plain.named_buffers())
        for name, buffer in recomputing.named_buffers():
            torch.testing.assert_close(buffer, expected[name], rtol=0, atol=1e-7, msg=name)

    assert plain.stage0.blocks[0].attn.conv_proj_k.bn.num_batches_tracked == 1
    assert_same_buffers()
    for out in outputs:
        out.square().sum().backward()
    assert_same_buffers()


def test_forward_intermediates_runs_no_stage_past_the_last_index_for_maps_only() -> None:
    model = tiny().eval()
    ran: list[int] = []
    for i, stage in enumerate(model.stages):
        stage.register_forward_hook(lambda m, args, out, i=i: ran.append(i))
    with torch.no_grad():
        maps = model.forward_intermediates(torch.randn(2, 3, 64, 64), indices=[0, 1], intermediates_only=True)
    assert ran == [0, 1] and [m.shape[1] for m in maps] == [16, 32]


def test_forward_intermediates_norms_the_last_map_only_when_asked() -> None:
    model = tiny().eval()
    seen: list[torch.Tensor] = []
    model.stage2.register_forward_hook(lambda m, args, out: seen.append(out[0]))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        plain = model.forward_intermediates(x, intermediates_only=True)[-1]
        normed = model.forward_intermediates(x, norm=True, intermediates_only=True)[-1]
    for tokens, got in zip(seen, (plain, normed), strict=True):
        expected = (tokens if got is plain else model.norm(tokens))[:, 1:]  # without the cls token
        torch.testing.assert_close(got, expected.transpose(1, 2).reshape(2, 48, 4, 4), rtol=0, atol=0)


def test_forward_intermediates_takes_the_last_n_stages_up_to_all_and_nchw_only() -> None:
    model = tiny().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        every = model.forward_intermediates(x, intermediates_only=True)
        last_three = model.forward_intermediates(x, indices=3, intermediates_only=True)
        for got, expected in zip(last_three, every, strict=True):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
        with pytest.raises(cvt.UsageError, match="output_fmt must be 'NCHW'"):
            model.forward_intermediates(x, output_fmt="NHWC")


def test_a_one_class_head_is_initialized_as_any_other() -> None:
    """A single logit (binary classification) gets timm's head init too: zero bias, std 0.02."""
    model = tiny()
    model.reset_classifier(1)
    head = model.get_classifier()
    assert head.out_features == 1 and torch.equal(head.bias, torch.zeros(1))


def test_avg_projection_padding_may_be_half_the_kernel() -> None:
    """PyTorch's pooling rule allows padding up to half the kernel: kernel 2, padding 1 builds and runs."""
    model = tiny(method="avg", kernel_qkv=2, padding_kv=1).eval()
    assert kv_grid(model.stage_specs[2], (4, 4)) == (3, 3)  # ceil((4 + 2 - 2) / 2) + 1
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(2, 3, 64, 64))).all()


def test_too_narrow_inputs_and_img_sizes_are_refused_as_too_short_ones_are() -> None:
    """The minimum size applies to each side: a tall, narrow input (or img_size) is refused too."""
    model = tiny().eval()
    min_w = model.min_input_size()[1]
    with pytest.raises(cvt.InputShapeError, match="too small"):
        model(torch.randn(1, 3, 64, min_w - 1))
    with pytest.raises(cvt.UsageError, match=f"img_size 64x{min_w - 1} is too small"):
        tiny(img_size=(64, min_w - 1))


def test_layer_norms_may_have_zero_epsilon() -> None:
    """norm_eps must be finite and >= 0: 0 itself is allowed, as nn.LayerNorm allows it."""
    model = tiny(norm_eps=0.0)
    assert {m.eps for m in model.modules() if isinstance(m, nn.LayerNorm)} == {0.0}


def test_attention_without_qkv_biases_builds_and_initializes_the_other_biases() -> None:
    attn = tiny(qkv_bias=False).stage2.blocks[0].attn
    assert attn.proj_q.bias is None and attn.proj_k.bias is None and attn.proj_v.bias is None
    assert torch.equal(attn.proj.bias, torch.zeros(48))  # the output projection keeps its (zeroed) bias


def test_a_bool_is_refused_for_a_numeric_stage_option() -> None:
    """Python counts True as 1: ``depth=True`` or ``mlp_ratio=False`` is a mistake, not a number."""
    with pytest.raises(cvt.UsageError, match="stage depth must be int, got True"):
        StageSpec(embed_dim=16, depth=True, num_heads=1)
    with pytest.raises(cvt.UsageError, match="stage mlp_ratio must be float, got False"):
        StageSpec(embed_dim=16, depth=1, num_heads=1, mlp_ratio=False)


def test_quick_gelu_is_x_times_sigmoid_of_1_702_x() -> None:
    """The activation the official checkpoints were trained with, where its scale matters (|x| up to 3)."""
    x = torch.tensor([-3.0, -1.0, 0.0, 0.5, 3.0])
    expected = x.double() * torch.sigmoid(1.702 * x.double())
    torch.testing.assert_close(QuickGELU()(x).double(), expected, rtol=1e-6, atol=1e-7)


def test_unknown_projection_method_is_refused_naming_the_three_methods() -> None:
    message = "projection method must be one of ('dw_bn', 'avg', 'linear'), got 'max'"
    with pytest.raises(cvt.UsageError, match=re.escape(message)):
        tiny(method="max")
