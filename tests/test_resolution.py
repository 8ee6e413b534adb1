"""Changing the input resolution: CvT-13 at 224/288/384 and non-square, position-embedding resizing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import cvt


@pytest.mark.slow
def test_cvt13_evaluates_at_other_and_non_square_sizes() -> None:
    torch.manual_seed(0)
    model = cvt.create_model("cvt_13").eval()  # built for 224
    non_square = cvt.create_model("cvt_13", img_size=(256, 192)).eval()
    non_square.load_state_dict(model.state_dict())  # no position embedding: same weights at any size
    for h, w in [(224, 224), (288, 288), (384, 384), (256, 192)]:
        images = torch.randn(1, 3, h, w)
        with torch.no_grad():
            final, maps = model.forward_intermediates(images)
            logits = model.forward_head(final)
        assert [tuple(m.shape[-2:]) for m in maps] == [(h // 4, w // 4), (h // 8, w // 8), (h // 16, w // 16)]
        assert logits.shape == (1, 1000) and torch.isfinite(logits).all()
        if (h, w) == (256, 192):
            with torch.no_grad():
                torch.testing.assert_close(non_square(images), logits)


@pytest.fixture
def with_pe() -> cvt.CvT:
    torch.manual_seed(0)
    return cvt.create_model("cvt_tiny", pos_embed=True).eval()  # learned at 32x32: grids 16/8/4


def test_position_embedding_is_used_unchanged_at_the_training_size(with_pe) -> None:
    for stage in with_pe.stages:
        assert torch.equal(stage.position_embedding(stage.pos_grid), stage.pos_embed)
    x32, x48 = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        before = with_pe(x32)
        with_pe(x48)  # running at another size leaves nothing behind
        torch.testing.assert_close(with_pe(x32), before, rtol=0, atol=0)


def test_position_embedding_is_interpolated_at_other_sizes(with_pe) -> None:
    stage = with_pe.stage2  # 4x4 grid at 32x32
    with torch.no_grad():
        stage.pos_embed.copy_(torch.linspace(-1, 1, stage.pos_embed.shape[-1]).expand_as(stage.pos_embed))
    resized = stage.position_embedding((6, 5))  # a 48x40 input
    assert resized.shape == (1, 30, 128)
    # a per-channel constant embedding stays that constant: bicubic weights sum to one
    torch.testing.assert_close(resized, stage.pos_embed[:, :1].expand(1, 30, 128))
    # a general one is the bicubic resize of the (H, W) grid
    with torch.no_grad():
        stage.pos_embed.normal_()
    grid = stage.pos_embed.reshape(1, 4, 4, 128).permute(0, 3, 1, 2)  # (1, C, 4, 4)
    expected = F.interpolate(grid, size=(6, 5), mode="bicubic", align_corners=False)
    expected = expected.flatten(2).transpose(1, 2)  # (1, 30, C)
    torch.testing.assert_close(stage.position_embedding((6, 5)), expected)
    with torch.no_grad():
        logits = with_pe(torch.randn(2, 3, 48, 40))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()


def test_a_non_square_learned_grid_is_resized_as_rows_by_columns() -> None:
    """Learned at 32x48 (stage-0 grid 16 x 24), an embedding that varies down the rows only stays
    constant along each row when resized: the tokens are read as (H, W), not (W, H)."""
    model = cvt.create_model("cvt_tiny", img_size=(32, 48), pos_embed=True).eval()
    stage = model.stage0
    h0, w0 = stage.pos_grid
    assert (h0, w0) == (16, 24)
    rows = torch.arange(h0, dtype=torch.float32).repeat_interleave(w0)  # token r * w0 + c holds r
    with torch.no_grad():
        stage.pos_embed.copy_(rows[None, :, None].expand_as(stage.pos_embed))
        resized = stage.position_embedding((32, 24))  # (1, 32 * 24, C)
    grid = stage.pos_embed.detach().reshape(1, h0, w0, -1).permute(0, 3, 1, 2)  # (1, C, H, W)
    expected = F.interpolate(grid, size=(32, 24), mode="bicubic", align_corners=False)
    torch.testing.assert_close(resized, expected.flatten(2).transpose(1, 2))
    by_row = resized.reshape(32, 24, -1)
    torch.testing.assert_close(by_row, by_row[:, :1].expand_as(by_row))


def test_fine_tuning_at_a_new_size_updates_the_learned_embedding(with_pe) -> None:
    with_pe.train()
    optimizer = torch.optim.SGD(with_pe.parameters(), lr=0.1)
    x32 = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = with_pe.eval()(x32)
    with_pe.train()
    loss = F.cross_entropy(with_pe(torch.randn(4, 3, 48, 48)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    grads = [stage.pos_embed.grad for stage in with_pe.stages]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    optimizer.step()
    with torch.no_grad():  # the same parameter serves both sizes
        assert not torch.allclose(with_pe.eval()(x32), before)


@pytest.mark.parametrize(
    ("name", "size", "crop_pct"),
    [
        ("cvt_13", None, 0.875),  # published 224 configuration: 0.875 center crop
        (
            "cvt_13",
            384,
            1.0,
        ),  # fine-tuned at 384 (cvt13_in1k_384_ft): no crop, as the official test
        ("cvt_13.msft_in1k_384", None, 1.0),
        ("cvt_13.msft_in1k_384", 224, 0.875),
        ("cvt_tiny", 64, 1.0),  # a small-image configuration keeps its own crop (none)
    ],
)
def test_evaluation_crop_follows_the_size_the_model_is_built_for(name, size, crop_pct) -> None:
    from cvt.data import resolve_data_config

    with torch.device("meta"):
        model = cvt.create_model(name, **({"img_size": size} if size else {}))
    data_cfg = resolve_data_config(model, "imagefolder")
    assert data_cfg["crop_pct"] == crop_pct and data_cfg["input_size"][-1] == (size or model.img_size[1])
