"""Model complexity: parameter count and multiply–accumulates (GMACs) of one forward pass.

MACs are counted with ``torch.utils.flop_counter`` (FLOPs / 2), which covers convolutions and
matrix products. Two kernels the model runs on CPU have no formula there, so theirs are registered
here: ``F.scaled_dot_product_attention``'s (two batched products, ``q @ k^T`` and ``attn @ v``) and
oneDNN's packed linear of inference on AVX-512 CPUs (:mod:`cvt.models.cpu_kernels`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from timm.layers import to_2tuple
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cvt.models.call_context import evaluating
from cvt.models.cvt import CvT, count_params, stage_grids


def _cpu_sdpa_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
    """FLOPs of attention: (B, h, Tq, d) x (B, h, d, Tk) then (B, h, Tq, Tk) x (B, h, Tk, dv)."""
    b, h, tq, d = query_shape
    tk, dv = key_shape[-2], value_shape[-1]
    return 2 * b * h * tq * tk * (d + dv)


def _onednn_linear_flops(input_shape: Any, weight_shape: Any, *args: Any, **kwargs: Any) -> int:
    """FLOPs of ``mkldnn::_linear_pointwise``: ``(N, in) x (in, out)``, the weight stored as ``(out, in)``."""
    rows, features_in = input_shape
    return 2 * rows * features_in * weight_shape[0]


_EXTRA_FLOP_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
    torch.ops.mkldnn._linear_pointwise: _onednn_linear_flops,
}


@dataclass(frozen=True)
class Complexity:
    """Size and cost of a model at one input size."""

    params: int
    gmacs: float  # multiply-accumulates of one image, in billions
    img_size: tuple[int, int]
    token_grids: list[tuple[int, int]]  # (H, W) of each stage's tokens

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def count_gmacs(model: nn.Module, img_size: tuple[int, int], in_chans: int = 3) -> float:
    """Multiply–accumulates (billions) of one forward pass for a single ``img_size`` image (a zero
    image in the model's dtype, on its device)."""
    weight = next(model.parameters())
    x = torch.zeros(1, in_chans, *img_size, device=weight.device, dtype=weight.dtype)
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS)
    with evaluating(model), torch.no_grad(), counter:
        # the whole network, as the paper counts it (CvT.forward skips the last block's unused tokens)
        model.forward_head(model.forward_features(x)) if isinstance(model, CvT) else model(x)
    return counter.get_total_flops() / 2e9


def complexity(model: CvT, img_size: int | tuple[int, int] | None = None) -> Complexity:
    """Parameters, GMACs and token grids of ``model`` at ``img_size`` (default: its own)."""
    size = to_2tuple(img_size or model.img_size)  # an int N is N x N
    dtype = next(model.parameters()).dtype
    model.check_input(torch.zeros(1, model.in_chans, *size, device="meta", dtype=dtype))
    grids = stage_grids(model.stage_specs, size)
    return Complexity(count_params(model), count_gmacs(model, size, model.in_chans), size, grids)
