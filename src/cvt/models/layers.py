"""CvT building blocks: convolutional token embedding, convolutional projection attention, block.

Module and parameter names follow the official Microsoft implementation (``patch_embed.proj``,
``attn.conv_proj_k.conv``, ``attn.proj_q`` …) so that its checkpoints load without renaming.
Tokens travel as ``(B, T, C)`` together with their grid size ``(H, W)``; a cls token, when the
stage has one, sits at position 0 and is never convolved.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from torch import nn

ProjectionMethod = Literal["dw_bn", "avg", "linear"]
PROJECTION_METHODS: tuple[str, ...] = ("dw_bn", "avg", "linear")


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``: the activation the official CvT checkpoints were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, type[nn.Module]] = {"quick_gelu": QuickGELU, "gelu": nn.GELU}


def conv_out_size(size: int, kernel: int, stride: int, padding: int, ceil_mode: bool = False) -> int:
    """Spatial output size of a convolution or pooling along one axis (PyTorch's formula)."""
    span = size + 2 * padding - kernel
    if ceil_mode:
        out = -(-span // stride) + 1
        # PyTorch drops a last window that would start inside the right padding only
        if (out - 1) * stride >= size + padding:
            out -= 1
        return out
    return span // stride + 1


class ConvEmbed(nn.Module):
    """Convolutional token embedding: overlapping strided Conv2d, then LayerNorm over channels.

    ``(B, C_in, H, W) -> (B, H'*W', C_out)`` tokens and their grid ``(H', W')``.
    """

    def __init__(
        self, in_chans: int, embed_dim: int, patch_size: int, stride: int, padding: int, norm_eps: float
    ) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride, padding=padding)
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(x)  # (B, C, H, W)
        grid = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)  # (B, H*W, C)
        return self.norm(x), grid


class ConvProjection(nn.Module):
    """One convolutional projection of the paper's Fig. 3: a ``(B, C, H, W)`` map to ``(B, T, C)`` tokens.

    ``dw_bn``: depthwise conv (no bias) + BatchNorm (submodules ``conv``, ``bn`` as in the official
    checkpoints); ``avg``: average pooling with ceil mode (no parameters).
    """

    def __init__(self, method: str, dim: int, kernel_size: int, stride: int, padding: int) -> None:
        super().__init__()
        self.method = method
        if method == "dw_bn":
            self.conv = nn.Conv2d(
                dim, dim, kernel_size, stride=stride, padding=padding, bias=False, groups=dim
            )
            self.bn = nn.BatchNorm2d(dim)
        elif method == "avg":
            self.avg = nn.AvgPool2d(kernel_size, stride=stride, padding=padding, ceil_mode=True)
        else:
            raise ValueError(f"ConvProjection method must be 'dw_bn' or 'avg', got {method!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x)) if self.method == "dw_bn" else self.avg(x)
        return x.flatten(2).transpose(1, 2)  # (B, H'*W', C)


class ConvAttention(nn.Module):
    """Multi-head self-attention whose q/k/v are computed by convolutional projections.

    The scale is ``dim_out ** -0.5`` as in the official code (not per head). With ``method='avg'``
    the query stays linear (official behaviour). With ``method='linear'`` the block is a plain ViT
    attention (the official code crashes there: q is never assigned).
    """

    def __init__(
        self,
        dim_in: int,
        dim_out: int,
        num_heads: int,
        qkv_bias: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        method: str = "dw_bn",
        kernel_size: int = 3,
        stride_kv: int = 1,
        stride_q: int = 1,
        padding_kv: int = 1,
        padding_q: int = 1,
        with_cls_token: bool = True,
    ) -> None:
        super().__init__()
        if method not in PROJECTION_METHODS:
            raise ValueError(f"unknown projection method {method!r}; expected one of {PROJECTION_METHODS}")
        if dim_out % num_heads:
            raise ValueError(f"dim_out {dim_out} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.dim_out = dim_out
        self.scale = dim_out**-0.5
        self.with_cls_token = with_cls_token
        self.attn_drop_rate = attn_drop
        self.fused_attn = True  # F.scaled_dot_product_attention; False: explicit softmax (reference path)

        q_method = "linear" if method == "avg" else method
        self.conv_proj_q = self._projection(q_method, dim_in, kernel_size, stride_q, padding_q)
        self.conv_proj_k = self._projection(method, dim_in, kernel_size, stride_kv, padding_kv)
        self.conv_proj_v = self._projection(method, dim_in, kernel_size, stride_kv, padding_kv)

        self.proj_q = nn.Linear(dim_in, dim_out, bias=qkv_bias)
        self.proj_k = nn.Linear(dim_in, dim_out, bias=qkv_bias)
        self.proj_v = nn.Linear(dim_in, dim_out, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim_out, dim_out)
        self.proj_drop = nn.Dropout(proj_drop)

    @staticmethod
    def _projection(method: str, dim: int, kernel: int, stride: int, padding: int) -> ConvProjection | None:
        return None if method == "linear" else ConvProjection(method, dim, kernel, stride, padding)

    def _project_inputs(
        self, x: torch.Tensor, grid: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tokens ``(B, [1+]H*W, C)`` to the q, k, v inputs of the linear projections."""
        h, w = grid
        cls_tok = None
        if self.with_cls_token:
            cls_tok, x = x[:, :1], x[:, 1:]  # cls is never convolved
        # (B, H*W, C) -> (B, C, H, W), built only when a convolutional projection needs it
        x_map = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)

        def project(proj: ConvProjection | None) -> torch.Tensor:
            t = x if proj is None else proj(x_map)
            return t if cls_tok is None else torch.cat((cls_tok, t), dim=1)

        return project(self.conv_proj_q), project(self.conv_proj_k), project(self.conv_proj_v)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.reshape(b, t, self.num_heads, -1).transpose(1, 2)  # (B, heads, T, head_dim)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        q_in, k_in, v_in = self._project_inputs(x, grid)
        q = self._split_heads(self.proj_q(q_in))  # (B, heads, Tq, d)
        k = self._split_heads(self.proj_k(k_in))  # (B, heads, Tkv, d); stride-2 kv: 4x fewer keys
        v = self._split_heads(self.proj_v(v_in))
        if self.fused_attn:
            drop = self.attn_drop_rate if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, scale=self.scale)
        else:
            out = self.attn_drop(self.attention_probs(q, k)) @ v
        out = out.transpose(1, 2).flatten(2)  # (B, Tq, dim_out)
        return self.proj_drop(self.proj(out))

    def attention_probs(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Softmax attention weights ``(B, heads, Tq, Tkv)``: the reference path, also used for maps."""
        return ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


class Block(nn.Module):
    """Pre-norm transformer block: ``x + DropPath(Attn(LN(x)))``, then ``x + DropPath(MLP(LN(x)))``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        act: str = "quick_gelu",
        norm_eps: float = 1e-5,
        method: str = "dw_bn",
        kernel_size: int = 3,
        stride_kv: int = 1,
        stride_q: int = 1,
        padding_kv: int = 1,
        padding_q: int = 1,
        with_cls_token: bool = True,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = ConvAttention(
            dim, dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop, method=method,
            kernel_size=kernel_size, stride_kv=stride_kv, stride_q=stride_q, padding_kv=padding_kv,
            padding_q=padding_q, with_cls_token=with_cls_token,
        )  # fmt: skip
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=ACTIVATIONS[act], drop=drop)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), grid))
        return x + self.drop_path(self.mlp(self.norm2(x)))
