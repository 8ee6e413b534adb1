"""Where the classifier looks: the last stage's cls-token attention over its key/value grid, per head.

The maps come from the reference softmax (:meth:`ConvAttention.attention_probs`) of the last block,
recomputed from that block's own input, so they are exact whichever attention kernel the forward
pass used. With a stride-2 key/value projection the key grid is half the token grid (7x7 for
CvT-13 at 224); the maps are upsampled over the image for display.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from cvt.errors import InputShapeError, UsageError
from cvt.figures import new_figure, save_figure
from cvt.fileio import check_folder_path
from cvt.models import CvT
from cvt.models.call_context import evaluating
from cvt.models.cvt import kv_grid


@dataclass(frozen=True)
class AttentionMaps:
    """One image's last-block attention of the cls query (or the mean query without a cls token)."""

    probs: torch.Tensor  # (heads, Tkv): attention over every key, cls key first when present; sums to 1
    grid: tuple[int, int]  # (H_kv, W_kv) of the keys after the key/value projection
    query: str  # "cls token" or "mean of all queries"

    @property
    def maps(self) -> torch.Tensor:
        """``(heads, H_kv, W_kv)`` attention on the grid keys (the cls key's share left out)."""
        return self.probs[:, -self.grid[0] * self.grid[1] :].reshape(-1, *self.grid)

    def upsampled(self, size: tuple[int, int]) -> torch.Tensor:
        """``(heads, H, W)`` maps resized bilinearly to an image of ``size``."""
        return F.interpolate(self.maps[None], size=size, mode="bilinear", align_corners=False)[0]


def last_stage_attention(model: CvT, image: torch.Tensor) -> AttentionMaps:
    """Attention maps of the last block for one ``(1, C, H, W)`` (or ``(C, H, W)``) normalized image."""
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4 or image.shape[0] != 1:
        raise InputShapeError(f"expected one image (1, C, H, W), got shape {tuple(image.shape)}")
    attn = model.stages[-1].blocks[-1].attn
    captured: dict[str, tuple] = {}

    def keep_input(module: torch.nn.Module, args: tuple) -> None:
        captured["args"] = args[:2]  # normed tokens (1, [1+]T, C), token grid (H, W) [, cls_only]

    handle = attn.register_forward_pre_hook(keep_input)
    try:
        with evaluating(model), torch.no_grad():
            model(image)
            tokens, grid = captured["args"]
            q, k, _ = attn.project_qkv(tokens, grid)  # (1, heads, Tq, d), (1, heads, Tkv, d)
            probs = attn.attention_probs(q, k)[0]  # (heads, Tq, Tkv)
    finally:
        handle.remove()
    has_cls = model.stage_specs[-1].cls_token
    row = probs[:, 0] if has_cls else probs.mean(dim=1)  # (heads, Tkv)
    key_grid = kv_grid(model.stage_specs[-1], tuple(grid))
    keys = key_grid[0] * key_grid[1] + int(has_cls)
    if row.shape[-1] != keys:
        # the spec built the layers: only a k/v projection replaced or edited since gives other keys
        raise UsageError(
            f"the last block's attention has {row.shape[-1]} keys where its stage spec gives {keys} (a "
            f"{key_grid[0]}x{key_grid[1]} key grid{' and the cls key' if has_cls else ''}): its k/v "
            f"projection was changed after the model was built, so the keys lie on no known grid"
        )
    return AttentionMaps(row.float().cpu(), key_grid, "cls token" if has_cls else "mean of all queries")


def image_output_path(path: str | Path) -> Path:
    """The file a grid is written to: ``path``, with ``.png`` added when it has no extension.

    Its extension is the format (``.jpg``, ``.pdf``, ``.svg`` … as matplotlib writes them); one
    matplotlib cannot write raises :class:`UsageError` before anything is computed.
    """
    from matplotlib.backend_bases import FigureCanvasBase

    if Path(path).is_dir() or str(path).endswith(("/", os.sep)):
        raise UsageError(f"{path} is a folder: give the image file to write, e.g. {Path(path) / 'maps.png'}")
    path = Path(path)
    check_folder_path(path.parent)
    if not path.suffix:
        return path.with_name(path.name + ".png")
    # pgf is LaTeX source that needs a TeX installation to write
    formats = [f for f in FigureCanvasBase.get_supported_filetypes() if f != "pgf"]
    if path.suffix[1:].lower() not in formats:
        raise UsageError(
            f"cannot write a {path.suffix!r} image ({path}): use .png, or one of {', '.join(formats)}"
        )
    return path


def save_attention_grid(maps: AttentionMaps, image: torch.Tensor, path: str | Path, title: str = "") -> Path:
    """The image, then one panel per head with its upsampled attention over the image, saved to
    :func:`image_output_path` ``(path)`` (a PNG unless its extension names another format); that path.

    ``image``: ``(3, H, W)``, or ``(1, H, W)`` drawn in gray, with values in [0, 1] (what the model saw,
    before normalization).
    """
    path = image_output_path(path)
    pixels = image.permute(1, 2, 0).clamp(0, 1).numpy()  # (H, W, C)
    # one channel: a gray image (imshow would map an (H, W) array through a colour map, scaled to its range)
    shown = {"cmap": "gray", "vmin": 0.0, "vmax": 1.0} if pixels.shape[-1] == 1 else {}
    pixels = pixels[..., 0] if pixels.shape[-1] == 1 else pixels
    heat = maps.upsampled(tuple(image.shape[-2:])).numpy()  # (heads, H, W)
    heads = heat.shape[0]
    cols = min(heads + 1, 4)
    rows = -(-(heads + 1) // cols)
    fig = new_figure(figsize=(3 * cols, 3 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    axes.flat[0].imshow(pixels, **shown)
    axes.flat[0].set_title("input", fontsize=9)
    for h in range(heads):
        ax = axes.flat[h + 1]
        ax.imshow(pixels, **shown)
        ax.imshow(heat[h], cmap="jet", alpha=0.5)
        ax.set_title(f"head {h + 1}", fontsize=9)
    fig.suptitle(title or f"last-stage attention of the {maps.query}, key grid {maps.grid[0]}x{maps.grid[1]}")
    fig.tight_layout()
    save_figure(fig, path, fmt=path.suffix[1:].lower())
    return path


def attention_for_file(
    model: CvT,
    image_path: str | Path,
    output: str | Path,
    title: str = "",
    img_size: tuple[int, int] | None = None,
) -> tuple[AttentionMaps, Path]:
    """Read an image with the model's eval preprocessing (at ``img_size`` if given, else the
    model's), compute its maps and save the grid (:func:`save_attention_grid`); the maps and the file."""
    from cvt.data.transforms import load_input, resolve_data_config

    data_cfg = resolve_data_config(model, img_size=img_size)
    image = load_input(image_path, data_cfg)  # (1, C, H, W), normalized
    maps = last_stage_attention(model, image)
    mean = torch.tensor(data_cfg["mean"]).view(-1, 1, 1)  # (C, 1, 1)
    std = torch.tensor(data_cfg["std"]).view(-1, 1, 1)
    shown = image[0] * std + mean  # back to [0, 1]: the crop the model saw
    return maps, save_attention_grid(maps, shown, output, title)
