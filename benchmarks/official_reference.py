"""The official CvT algorithm, re-implemented op for op: the "official" peer of ``cvt bench``.

The Microsoft code (``lib/models/cls_cvt.py``) no longer imports on current PyTorch and cannot be
downloaded here, so this module performs the same sequence of operations, written from its published
description, to measure what the official algorithm costs on today's kernels:

- attention as two ``einsum`` calls around a materialised ``softmax`` (scores scaled after the product);
- q, k and v each through its own projection (depthwise conv + BatchNorm + rearrange, or average
  pooling) and its own Linear layer; the cls token split off and concatenated back for each;
- a rearrange between the token and the map layout in every token embedding, every attention and at
  the end of every stage (``b c h w -> b (h w) c`` and back);
- LayerNorm as the official subclass: input cast to fp32, normalised, cast back;
- QuickGELU ``x * sigmoid(1.702 x)``; the cls token normalised and squeezed for the head.

Module names follow the official checkpoints, so ``load_state_dict(cvt_model.state_dict())`` works
for any model without position embeddings (the official code has none) and the logits match this
package's (``benchmarks/run_targets.py`` and ``cvt bench --compare official`` assert it).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn

from cvt.models.cvt import CvT, StageSpec


class OfficialLayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input dtype, returned in the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.type(torch.float32)).type(x.dtype)


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class MapToTokens(nn.Module):
    """``b c h w -> b (h w) c`` as einops does it: permute, then reshape (a copy)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        return x.permute(0, 2, 3, 1).reshape(b, h * w, c)


def tokens_to_map(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``b (h w) c -> b c h w``."""
    b, _, c = x.shape
    return x.reshape(b, h, w, c).permute(0, 3, 1, 2)


def map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """``b c h w -> b (h w) c``."""
    return MapToTokens()(x)


class OfficialMlp(nn.Module):
    """fc1 → QuickGELU → dropout → fc2 → dropout."""

    def __init__(self, dim: int, hidden: int, drop: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = QuickGELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class OfficialAttention(nn.Module):
    """Convolutional-projection attention with separate q/k/v paths and an einsum softmax."""

    def __init__(self, dim: int, spec: StageSpec) -> None:
        super().__init__()
        self.num_heads = spec.num_heads
        self.scale = dim**-0.5
        self.with_cls_token = spec.cls_token
        q_method = "linear" if spec.method == "avg" else spec.method
        k = spec.kernel_qkv
        self.conv_proj_q = self._projection(q_method, dim, k, spec.stride_q, spec.padding_q)
        self.conv_proj_k = self._projection(spec.method, dim, k, spec.stride_kv, spec.padding_kv)
        self.conv_proj_v = self._projection(spec.method, dim, k, spec.stride_kv, spec.padding_kv)
        self.proj_q = nn.Linear(dim, dim, bias=spec.qkv_bias)
        self.proj_k = nn.Linear(dim, dim, bias=spec.qkv_bias)
        self.proj_v = nn.Linear(dim, dim, bias=spec.qkv_bias)
        self.attn_drop = nn.Dropout(spec.attn_drop_rate)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(spec.drop_rate)

    @staticmethod
    def _projection(method: str, dim: int, kernel: int, stride: int, padding: int) -> nn.Module | None:
        if method == "dw_bn":
            conv = nn.Conv2d(dim, dim, kernel, stride=stride, padding=padding, bias=False, groups=dim)
            layers = [("conv", conv), ("bn", nn.BatchNorm2d(dim)), ("rearrange", MapToTokens())]
            return nn.Sequential(OrderedDict(layers))
        if method == "avg":
            pool = nn.AvgPool2d(kernel, stride=stride, padding=padding, ceil_mode=True)
            return nn.Sequential(OrderedDict([("avg", pool), ("rearrange", MapToTokens())]))
        return None

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """``b t (h d) -> b h t d``."""
        b, t, _ = x.shape
        return x.reshape(b, t, self.num_heads, -1).permute(0, 2, 1, 3)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        if self.with_cls_token:
            cls_token, x = torch.split(x, [1, h * w], 1)
        x = tokens_to_map(x, h, w)
        q, k, v = (
            map_to_tokens(x) if proj is None else proj(x)
            for proj in (self.conv_proj_q, self.conv_proj_k, self.conv_proj_v)
        )
        if self.with_cls_token:
            q, k, v = (torch.cat((cls_token, t), dim=1) for t in (q, k, v))
        q, k, v = self._heads(self.proj_q(q)), self._heads(self.proj_k(k)), self._heads(self.proj_v(v))
        scores = torch.einsum("bhlk,bhtk->bhlt", q, k) * self.scale  # (B, heads, Tq, Tkv) in memory
        attn = self.attn_drop(F.softmax(scores, dim=-1))
        x = torch.einsum("bhlt,bhtv->bhlv", attn, v)
        b, heads, t, d = x.shape
        x = x.permute(0, 2, 1, 3).reshape(b, t, heads * d)  # b h t d -> b t (h d)
        return self.proj_drop(self.proj(x))


class OfficialBlock(nn.Module):
    """Pre-norm block with stochastic depth on both residual branches."""

    def __init__(self, dim: int, spec: StageSpec, drop_path: float, norm_eps: float) -> None:
        super().__init__()
        self.norm1 = OfficialLayerNorm(dim, eps=norm_eps)
        self.attn = OfficialAttention(dim, spec)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = OfficialLayerNorm(dim, eps=norm_eps)
        self.mlp = OfficialMlp(dim, int(dim * spec.mlp_ratio), spec.drop_rate)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), h, w))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class OfficialConvEmbed(nn.Module):
    """Conv → tokens → LayerNorm → map: the official embedding returns a map."""

    def __init__(self, in_chans: int, spec: StageSpec, norm_eps: float) -> None:
        super().__init__()
        self.proj = nn.Conv2d(
            in_chans, spec.embed_dim, spec.patch_size, stride=spec.patch_stride, padding=spec.patch_padding
        )
        self.norm = OfficialLayerNorm(spec.embed_dim, eps=norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        h, w = x.shape[2:]
        return tokens_to_map(self.norm(map_to_tokens(x)), h, w)


class OfficialStage(nn.Module):
    """Embedding, then blocks on tokens; returns the map and the cls token (or None)."""

    def __init__(self, in_chans: int, spec: StageSpec, norm_eps: float) -> None:
        super().__init__()
        self.patch_embed = OfficialConvEmbed(in_chans, spec, norm_eps)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, spec.embed_dim)) if spec.cls_token else None
        self.pos_drop = nn.Dropout(spec.drop_rate)
        rates = torch.linspace(0, spec.drop_path_rate, spec.depth).tolist()
        self.blocks = nn.ModuleList(OfficialBlock(spec.embed_dim, spec, r, norm_eps) for r in rates)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = self.patch_embed(x)
        _, _, h, w = x.shape
        x = map_to_tokens(x)
        cls_tokens = None
        if self.cls_token is not None:
            cls_tokens = self.cls_token.expand(x.shape[0], -1, -1)
            x = torch.cat((cls_tokens, x), dim=1)
        x = self.pos_drop(x)
        for blk in self.blocks:
            x = blk(x, h, w)
        if self.cls_token is not None:
            cls_tokens, x = torch.split(x, [1, h * w], 1)
        return tokens_to_map(x, h, w), cls_tokens


class OfficialCvT(nn.Module):
    """The official ``ConvolutionalVisionTransformer`` algorithm (QuickGELU only, no position embeddings)."""

    def __init__(self, stages: Sequence[StageSpec], num_classes: int, in_chans: int = 3,
                 norm_eps: float = 1e-5) -> None:  # fmt: skip
        super().__init__()
        if any(s.pos_embed for s in stages):
            raise ValueError("the official implementation has no position embeddings")
        self.num_stages = len(stages)
        for i, spec in enumerate(stages):
            self.add_module(f"stage{i}", OfficialStage(in_chans, spec, norm_eps))
            in_chans = spec.embed_dim
        self.has_cls_token = stages[-1].cls_token
        self.norm = OfficialLayerNorm(in_chans, eps=norm_eps)
        self.head = nn.Linear(in_chans, num_classes) if num_classes > 0 else nn.Identity()

    @classmethod
    def from_cvt(cls, model: CvT) -> OfficialCvT:
        """The same network as ``model`` (a QuickGELU CvT), with its weights loaded strictly."""
        if model.act != "quick_gelu":
            raise ValueError(f"the official implementation runs QuickGELU, the model uses {model.act}")
        ref = cls(model.stage_specs, model.num_classes, model.in_chans, model.norm_eps)
        ref.load_state_dict(model.state_dict())
        return ref.to(next(model.parameters()).device).train(model.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls_tokens = None
        for i in range(self.num_stages):
            x, cls_tokens = getattr(self, f"stage{i}")(x)
        if self.has_cls_token:
            x = self.norm(cls_tokens).squeeze(1)  # (B, 1, C) -> (B, C)
        else:
            x = self.norm(map_to_tokens(x)).mean(dim=1)
        return self.head(x)
