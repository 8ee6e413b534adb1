"""Attention maps: probability distributions over the key grid, per head, and the PNG grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cvt
from cvt.attention_maps import attention_for_file, last_stage_attention, save_attention_grid
from cvt.cli.main import main
from cvt.models.layers import ConvProjection


@pytest.fixture(scope="module")
def tiny() -> cvt.CvT:
    torch.manual_seed(0)
    return cvt.create_model("cvt_tiny").eval()  # last stage: 4 heads, 4x4 tokens, stride-2 kv: 2x2 keys


def _reference_probs(model: cvt.CvT, image: torch.Tensor) -> torch.Tensor:
    """The last block's attention probabilities ``(heads, queries, keys)`` for one image, recorded from
    the explicit (non-fused) attention path of a forward pass."""
    attn = model.stages[-1].blocks[-1].attn
    recorded = []
    original = attn.attention_probs
    attn.attention_probs = lambda q, k, **kwargs: recorded.append(original(q, k, **kwargs)) or recorded[-1]
    attn.fused_attn = False
    try:
        with torch.no_grad():
            model(image.reshape(1, *image.shape[-3:]))
    finally:
        del attn.attention_probs
        attn.fused_attn = True
    return recorded[-1][0]


def test_maps_are_the_cls_rows_of_the_reference_softmax(tiny) -> None:
    image = torch.randn(1, 3, 32, 32)
    maps = last_stage_attention(tiny, image)
    assert maps.query == "cls token" and maps.grid == (2, 2)
    assert maps.probs.shape == (4, 1 + 4) and maps.maps.shape == (4, 2, 2)
    torch.testing.assert_close(maps.probs.sum(-1), torch.ones(4))  # a distribution over keys, per head
    assert (maps.probs >= 0).all()
    torch.testing.assert_close(maps.maps.sum((-2, -1)), 1 - maps.probs[:, 0])  # all but the cls key
    # the same numbers from the explicit (non-fused) attention path, recorded inside the forward pass
    torch.testing.assert_close(_reference_probs(tiny, image)[:, 0], maps.probs)
    assert maps.upsampled((32, 32)).shape == (4, 32, 32)


def test_a_non_square_key_grid_keeps_rows_and_columns_in_place(tiny) -> None:
    """A 32x48 image gives 4x6 last-stage tokens and a 2x3 key grid: map cell (r, c) is key
    ``r * 3 + c`` after the cls key (keys are flattened row by row), not a transposed 3x2 reading."""
    image = torch.randn(1, 3, 32, 48)
    maps = last_stage_attention(tiny, image)
    assert maps.grid == (2, 3)
    cls_row = _reference_probs(tiny, image)[:, 0]  # (heads, 1 + 6)
    expected = torch.empty(4, 2, 3)
    for h, r, c in np.ndindex(4, 2, 3):
        expected[h, r, c] = cls_row[h, 1 + r * 3 + c]
    torch.testing.assert_close(maps.maps, expected)


def test_upsampled_maps_are_a_bilinear_resize_without_corner_alignment(tiny) -> None:
    """What the panels show: each head's map resized bilinearly (align_corners=False, as documented),
    not blocky nearest-neighbour cells."""
    maps = last_stage_attention(tiny, torch.randn(1, 3, 32, 48))
    expected = torch.nn.functional.interpolate(
        maps.maps[None], size=(32, 48), mode="bilinear", align_corners=False
    )[0]
    torch.testing.assert_close(maps.upsampled((32, 48)), expected)
    # bilinear between cell centres: inside the image the values vary within a cell's 16x16 block
    assert not torch.equal(expected[:, 0, 0], expected[:, 15, 15])


def test_each_head_panel_shows_that_heads_map(tiny, tmp_path, monkeypatch) -> None:
    """The h-th heat overlay of the PNG grid is head h's upsampled map (the heads differ, so a grid
    that repeated one head's map would fail)."""
    from matplotlib.axes import Axes

    maps = last_stage_attention(tiny, torch.randn(1, 3, 32, 48))
    heat = maps.upsampled((32, 48)).numpy()
    assert not np.allclose(heat[0], heat[1])
    shows = []
    real_imshow = Axes.imshow
    monkeypatch.setattr(Axes, "imshow", lambda ax, x, **kw: shows.append((x, kw)) or real_imshow(ax, x, **kw))
    save_attention_grid(maps, torch.rand(3, 32, 48), tmp_path / "grid.png")
    panels = [np.asarray(x) for x, kw in shows if kw.get("cmap") == "jet"]
    assert len(panels) == 4
    for h, panel in enumerate(panels):
        np.testing.assert_allclose(panel, heat[h], rtol=0, atol=1e-7, err_msg=f"panel of head {h + 1}")


def test_mean_query_without_cls_token_and_avg_keys() -> None:
    torch.manual_seed(0)
    model = cvt.create_model("cvt_tiny", cls_token=False, method="avg").eval()
    image = torch.randn(3, 32, 40)
    maps = last_stage_attention(model, image)
    assert maps.query == "mean of all queries"
    assert maps.grid == (3, 3)  # 4x5 tokens, 3x3 average pooling, stride 2, padding 1, ceil mode
    torch.testing.assert_close(maps.maps.sum((-2, -1)), torch.ones(4))
    # each head's map is its probabilities averaged over every query
    torch.testing.assert_close(maps.probs, _reference_probs(model, image).mean(dim=1))


def test_keys_off_the_spec_grid_are_refused() -> None:
    """A k/v projection replaced after the model was built (stride 1 where the spec says 2) gives keys
    that lie on no grid the spec knows: a UsageError that says so (it was an assert, gone under -O)."""
    torch.manual_seed(0)
    model = cvt.create_model("cvt_tiny").eval()
    attn = model.stages[-1].blocks[-1].attn
    dim = attn.proj_k.in_features
    attn.conv_proj_k = ConvProjection("dw_bn", dim, kernel_size=3, stride=1, padding=1)
    attn.conv_proj_v = ConvProjection("dw_bn", dim, kernel_size=3, stride=1, padding=1)
    with pytest.raises(cvt.UsageError, match="has 17 keys where its stage spec gives 5 .a 2x2 key grid and"):
        last_stage_attention(model, torch.randn(1, 3, 32, 32))


def test_png_grid_and_cli(tiny, tmp_path, capsys) -> None:
    maps = last_stage_attention(tiny, torch.randn(1, 3, 32, 32))
    png = save_attention_grid(maps, torch.rand(3, 32, 32), tmp_path / "grid.png")
    with Image.open(png) as img:
        assert img.format == "PNG" and img.size[0] > 3 * img.size[1] / 2  # 5 panels: 4 columns, 2 rows

    pixels = np.zeros((40, 50, 3), np.uint8)
    pixels[10:30, 20:40] = 255
    Image.fromarray(pixels).save(tmp_path / "square.png")
    out = tmp_path / "maps.png"
    args = ["attention", str(tmp_path / "square.png"), "--model", "cvt_tiny", "--output", str(out)]
    assert main(args) == 0
    assert "4 head(s), attention of the cls token over a 2x2 key grid" in capsys.readouterr().out
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(args) == 2  # refuses to overwrite
    assert "refusing to overwrite" in capsys.readouterr().err


def record_drawn_images(monkeypatch) -> list[torch.Tensor]:
    """Patch ``attention_for_file``'s grid saver so that every image it draws is appended to the
    returned list (and still saved)."""
    from cvt import attention_maps

    drawn: list[torch.Tensor] = []
    real_save = attention_maps.save_attention_grid
    monkeypatch.setattr(
        attention_maps,
        "save_attention_grid",
        lambda maps, image, *a: drawn.append(image) or real_save(maps, image, *a),
    )
    return drawn


def test_the_grid_shows_the_crop_in_its_own_colours(tiny, tmp_path, monkeypatch) -> None:
    """The panels draw the image the model read, un-normalised back to [0, 1] RGB, not the normalised
    tensor (which would show ImageNet-normalised values clipped by imshow)."""
    drawn = record_drawn_images(monkeypatch)
    Image.new("RGB", (40, 50), (200, 30, 90)).save(tmp_path / "plain.png")
    attention_for_file(tiny, tmp_path / "plain.png", tmp_path / "maps.png")
    [shown] = drawn
    assert shown.shape == (3, 32, 32)
    colour = torch.tensor([200, 30, 90]).view(3, 1, 1) / 255
    torch.testing.assert_close(shown, colour.expand_as(shown), atol=1e-5, rtol=0)


def test_a_grayscale_model_is_shown_its_luma_in_gray(tmp_path, monkeypatch) -> None:
    """``in_chans=1``: the maps are of the luma the model read, drawn as a gray image (imshow would
    otherwise colour a one-channel array through its default colour map, scaled to the image's range)."""
    torch.manual_seed(0)
    model = cvt.create_model("cvt_tiny", in_chans=1).eval()
    drawn, shows = record_drawn_images(monkeypatch), []
    Image.new("RGB", (40, 50), (200, 30, 90)).save(tmp_path / "plain.png")
    from matplotlib.axes import Axes

    real_imshow = Axes.imshow
    monkeypatch.setattr(Axes, "imshow", lambda ax, x, **kw: shows.append((x, kw)) or real_imshow(ax, x, **kw))
    maps, _ = attention_for_file(model, tmp_path / "plain.png", tmp_path / "maps.png")
    [shown] = drawn
    luma = (0.299 * 200 + 0.587 * 30 + 0.114 * 90) / 255
    torch.testing.assert_close(shown, torch.full((1, 32, 32), luma), atol=1e-5, rtol=0)
    image_draws = [(x, kw) for x, kw in shows if kw.get("cmap") != "jet"]  # the image, under each head too
    assert len(image_draws) == 1 + maps.maps.shape[0]
    for x, kw in image_draws:
        assert x.shape == (32, 32) and kw == {"cmap": "gray", "vmin": 0.0, "vmax": 1.0}
        assert np.allclose(x, luma, atol=1e-5)


def test_cli_reads_a_checkpoint_that_describes_itself(tmp_path, capsys) -> None:
    """A cvt safetensors file of a 3-class cvt_tiny: no --model or class count needed, and
    --img-size sets the preprocessing size (48x48 -> 24/12/6 tokens, kv stride 2 -> 3x3 keys)."""
    from cvt import create_model, save_checkpoint

    path = save_checkpoint(create_model("cvt_tiny", num_classes=3), tmp_path / "tiny3.safetensors")
    Image.fromarray(np.full((40, 50, 3), 128, np.uint8)).save(tmp_path / "gray.png")
    out = tmp_path / "maps.png"
    argv = ["attention", str(tmp_path / "gray.png"), "--checkpoint", str(path), "--img-size", "48",
            "--output", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert "attention of the cls token over a 3x3 key grid" in capsys.readouterr().out
    assert main(["attention", str(tmp_path / "gray.png"), "--output", str(tmp_path / "x.png")]) == 2
    assert "or --model NAME alone for random weights" in capsys.readouterr().err


def test_output_path_is_the_file_written(tmp_path, capsys) -> None:
    """``--output NAME`` writes NAME.png, so NAME.png is the file protected from overwrites; other
    extensions set the format, and one matplotlib cannot write is a usage error before any work."""
    from cvt.attention_maps import image_output_path

    assert image_output_path(tmp_path / "maps") == tmp_path / "maps.png"
    assert image_output_path("maps.JPG") == Path("maps.JPG")
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(tmp_path / "gray.png")
    argv = ["attention", str(tmp_path / "gray.png"), "--model", "cvt_tiny", "--output"]

    assert main([*argv, str(tmp_path / "maps")]) == 0
    assert f"wrote {tmp_path / 'maps.png'}:" in capsys.readouterr().out
    assert (tmp_path / "maps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not (
        tmp_path / "maps"
    ).exists()
    (tmp_path / "maps.png").write_bytes(b"precious")
    assert main([*argv, str(tmp_path / "maps")]) == 2
    assert f"refusing to overwrite {tmp_path / 'maps.png'}" in capsys.readouterr().err
    assert (tmp_path / "maps.png").read_bytes() == b"precious"

    assert main([*argv, str(tmp_path / "maps.txt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cvt attention: error: cannot write a '.txt' image") and len(err.splitlines()) == 1
    assert not (tmp_path / "maps.txt").exists()

    assert main([*argv, str(tmp_path / "maps.jpg")]) == 0
    assert (tmp_path / "maps.jpg").read_bytes()[:3] == b"\xff\xd8\xff"  # a JPEG, as its name says

    (tmp_path / "out").mkdir()  # a folder is not a file name: it used to become out.png beside it
    assert main([*argv, str(tmp_path / "out")]) == 2
    assert "is a folder: give the image file to write" in capsys.readouterr().err
    assert not (tmp_path / "out.png").exists()


def test_cli_overwrite_replaces_the_file_and_titles_it_with_the_model_and_image(
    tmp_path, capsys, monkeypatch
):
    """``--overwrite`` replaces an existing output; the grid's title names the model and the image; a
    non-square --img-size (H,W 32,48) gives a 2x3 key grid, said as rows x columns."""
    import matplotlib.figure

    titles = []
    real_suptitle = matplotlib.figure.Figure.suptitle
    monkeypatch.setattr(
        matplotlib.figure.Figure,
        "suptitle",
        lambda fig, t, *a, **k: titles.append(t) or real_suptitle(fig, t, *a, **k),
    )
    Image.fromarray(np.full((40, 50, 3), 128, np.uint8)).save(tmp_path / "gray.png")
    out = tmp_path / "maps.png"
    out.write_bytes(b"an earlier grid")
    argv = ["attention", str(tmp_path / "gray.png"), "--model", "cvt_tiny", "--img-size", "32,48"]
    assert main([*argv, "--output", str(out), "--overwrite"]) == 0
    assert "4 head(s), attention of the cls token over a 2x3 key grid" in capsys.readouterr().out
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert titles == ["cvt_tiny (random weights): gray.png"]


def test_a_batch_of_images_is_refused(tiny) -> None:
    """Two images in a batch would silently give the first one's maps."""
    with pytest.raises(
        cvt.InputShapeError, match=r"expected one image \(1, C, H, W\), got shape \(2, 3, 32, 32\)"
    ):
        last_stage_attention(tiny, torch.randn(2, 3, 32, 32))


def test_pgf_output_is_refused_before_any_work(tmp_path) -> None:
    """pgf is LaTeX source matplotlib writes only with a TeX installation: refused up front."""
    from cvt.attention_maps import image_output_path

    with pytest.raises(cvt.UsageError, match=r"cannot write a '\.pgf' image .*: use \.png, or one of"):
        image_output_path(tmp_path / "maps.pgf")
    assert image_output_path(tmp_path / "maps.svg") == tmp_path / "maps.svg"
