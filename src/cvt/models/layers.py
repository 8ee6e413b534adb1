"""CvT building blocks: convolutional token embedding, convolutional projection attention, block.

Module and parameter names follow the official Microsoft implementation (``patch_embed.proj``,
``attn.conv_proj_k.conv``, ``attn.proj_q`` …) so that its checkpoints load without renaming.
Tokens travel as ``(B, T, C)`` together with their grid size ``(H, W)``; a cls token, when the
stage has one, sits at position 0 and is never convolved.

Fast paths (all on by default, each behind a flag that :func:`set_fast_paths` switches, so tests can
compare every one against the plain reference computation):

- ``fused_attn``: ``F.scaled_dot_product_attention`` with the official scale, no materialised softmax;
- ``explicit_few_keys``: on CPU, attention over at most ``FEW_KEYS`` keys in fp32 (stage 3 of CvT-13:
  50), ``FEW_KEYS_BF16`` in bf16 (stage 2: 196) is computed as two matrix products around a softmax
  instead: CPU SDPA's blocked kernel costs more than the small score matrix there (4x in a bf16
  training step at 50 keys, docs/performance-decisions.md); bf16 only where oneDNN has bf16 kernels, with bf16
  probabilities (the softmax accumulates in fp32);
- ``chunked_attn``: bf16 CPU inference where oneDNN has bf16 kernels runs attention as
  :func:`~cvt.models.cpu_kernels.chunked_attention` at every key count (faster than CPU SDPA there);
- ``recompute_attn``: bf16 CPU training (where oneDNN has bf16 kernels) over more than
  ``FEW_KEYS_BF16`` keys (stage 1 of CvT-13: 784) runs
  :class:`~cvt.models.cpu_kernels.RecomputedAttention` instead of SDPA: 2-D products per image and
  head, the probabilities recomputed in backward;
- ``fuse_proj``: projections that read the same input share one matrix product (q/k/v with
  ``linear``, k/v with ``avg``); ``dw_bn`` k/v keep two depthwise convs (a grouped conv with two
  outputs per channel runs ~10x slower than two depthwise ones in oneDNN on CPU, see
  docs/performance-decisions.md);
  after a cls split, or for a batch of one, the conv projections' input map is made densely
  channels-last once (each conv would otherwise copy it to NCHW and run its slower NCHW kernel, or for
  one image run a slower depthwise kernel on the token view's batch stride: :func:`dense_channels_last`);
- ``fold_bn``: in eval mode the ``dw_bn`` BatchNorm is folded into the depthwise conv's weight and bias;
- ``fold_act``: QuickGELU's 1.702 moves into the MLP weights, leaving a single SiLU pass:
  ``fc2(h * sigmoid(1.702 h)) == (fc2.w / 1.702) @ silu(1.702 fc1(x)) + fc2.b``; in training
  :class:`SiluLinear` keeps one hidden activation for backward instead of three.
- ``onednn_linear``: CPU inference on AVX-512 (bf16; fp32 too on CPUs other than Intel's) runs the
  attention and MLP Linear layers whose product is large enough (``ONEDNN_MIN_WEIGHT`` /
  ``ONEDNN_MIN_MACS``) as oneDNN's linear on weights packed once (fc1 with its SiLU fused in),
  :mod:`cvt.models.cpu_kernels`; fp32 training on AVX-512 CPUs other than Intel's runs them (forward
  and input gradient) as oneDNN's linear on the plain weights, :class:`~cvt.models.cpu_kernels.OnednnLinear`;
- ``dw_fp32``: under CPU autocast the ``dw_bn`` depthwise conv (and its BatchNorm) stays in fp32 when
  a graph is built (oneDNN's bf16 depthwise backward is ~9x slower) or oneDNN has no bf16 kernels
  for the CPU (AVX2: reference code, 20-40x slower); inference on an AVX-512 CPU runs it in bf16.
- ``cls_only_last_block`` (on the model): when only the logits are needed, the last block computes
  the cls token's query, attention row and MLP alone (``Block.forward(..., cls_only=True)``).

Whatever the flags, the conv projections' input map is cast once to the dtype they compute in (so
autocast, or ``dw_fp32``, does not cast it per projection), and the cls token joins the projected tokens
in their dtype (under autocast an fp32 cls would promote the concatenation to fp32, which the Linear
casts back).

Weights derived from parameters (folded, concatenated, scaled; :mod:`cvt.models.derived_weights`) are
cached only while no autograd graph is built and are recomputed as soon as a source tensor changes
(in-place update, new tensor, BatchNorm statistics moved by a train-mode forward, any ``torch.optim``
step, fused ones included);
``train()`` and ``eval()`` drop them too, for edits through ``param.data`` that no version counter
sees. A fast path that reads a submodule's parameters instead of calling it steps aside when that
submodule has hooks or is not the plain layer it expects (pruned, parametrized, quantized, wrapped,
or swapped for another kind: :func:`is_plain`):
the module then runs as itself.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from torch import nn

from cvt.errors import UsageError
from cvt.models import cpu_kernels
from cvt.models.call_context import builds_no_graph, runs_plain_ops_only, traced_or_compiled
from cvt.models.cpu_kernels import RecomputedAttention, chunked_attention
from cvt.models.derived_weights import (
    CachesDerivedWeights,
    CastCachedLinear,
    DerivedWeights,
)
from cvt.precision import active_autocast_dtype, autocast_casts

PROJECTION_METHODS: tuple[str, ...] = ("dw_bn", "avg", "linear")
QUICK_GELU_SCALE = 1.702
# keys up to which CPU attention is explicit (``explicit_few_keys``): in fp32 measured faster at 50 keys,
# slower at 196 (training and inference); in bf16, with bf16 probabilities, faster at 50 and 196 keys
# (a training step's attention at batch 16: 5 vs 21 ms and 31 vs 51 ms), slower at 784
# (docs/performance-decisions.md)
FEW_KEYS = 64
FEW_KEYS_BF16 = 256


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``: the activation the official CvT checkpoints were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(QUICK_GELU_SCALE * x)


ACTIVATIONS: dict[str, type[nn.Module]] = {"quick_gelu": QuickGELU, "gelu": nn.GELU}


# what a fast path accepts in place of a dropout (an identity drops nothing) and of a Linear layer
DROPOUTS: tuple[type[nn.Module], ...] = (nn.Dropout, nn.Identity)
LINEARS: tuple[type[nn.Module], ...] = (nn.Linear, CastCachedLinear)


def is_plain(module: nn.Module, *types: type[nn.Module]) -> bool:
    """Whether a fast path may read ``module``'s parameters instead of calling it: it is exactly one of
    ``types``, the layers that path was written for in that place, and has no hooks.

    Otherwise the caller runs the module: a pruned layer computes its weight in a pre-hook, a
    parametrized, quantized or adapter-wrapped (LoRA) layer is another class, a layer swapped for
    another kind (a GELU for the QuickGELU whose scale is folded, an identity for a fused BatchNorm)
    computes something else, and a hook must see its module run.
    """
    return type(module) in types and not has_hooks(module)


def dropout_rate(dropout: nn.Module) -> float:
    """The rate a plain dropout (one of ``DROPOUTS``) applies in this call: its ``p`` in its own training
    mode, else 0 (a dropout's own mode decides: Monte Carlo dropout trains the dropouts of an eval
    model); an identity's is 0."""
    return dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0


def has_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has forward or backward hooks of its own (global hooks are not counted);
    backward hooks count too: they are set up when the module is called."""
    forward = module._forward_hooks or module._forward_pre_hooks
    return bool(forward or module._backward_hooks or module._backward_pre_hooks)


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


def dense_channels_last(x: torch.Tensor) -> bool:
    """Whether the map ``x (B, C, H, W)`` lies in memory exactly as a fresh channels-last tensor, batch
    stride included.

    ``is_contiguous(memory_format=torch.channels_last)`` ignores the stride of a size-1 dim, so a batch
    of one whose map is a view of tokens (``(1, H*W, C)`` transposed: batch stride ``C``) passes it; but
    oneDNN's depthwise convolution runs 2.4x slower on that stride (CvT-13's stage-3 one, bf16 or fp32:
    0.15-0.20 against 0.07-0.08 ms on the Zen 4 VM, docs/performance-decisions.md; full convolutions do
    not mind).
    """
    if torch.jit.is_tracing():  # a trace records no layout, and comparing traced sizes would warn
        return x.is_contiguous(memory_format=torch.channels_last)
    _, c, h, w = x.shape
    return x.stride() == (c * h * w, 1, w * c, c)


def map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` map → ``(B, H*W, C)`` tokens: a free view when the map is channels-last."""
    return x.flatten(2).transpose(1, 2)


def tokens_to_map(x: torch.Tensor, grid: tuple[int, int], has_cls: bool = False) -> torch.Tensor:
    """``(B, [1+]H*W, C)`` tokens → ``(B, C, H, W)`` map, dropping a leading cls token: a channels-last
    view of contiguous tokens (without a cls token), which a conv reads without a copy."""
    if has_cls:
        x = x[:, 1:]
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], grid[0], grid[1])


class DenseGradient(torch.autograd.Function):
    """Identity whose backward makes the gradient dense in the input's layout.

    A projection's tokens are concatenated after a cls token, and the backward of that ``cat`` hands
    back a strided slice (batch stride ``(1+H*W)*C``); BatchNorm's CPU backward runs ~3x slower on it
    than on a dense channels-last map (13.2 vs 4.7 ms on ``16x384x14x14``, the copy 0.2 ms).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.channels_last = x.is_contiguous(memory_format=torch.channels_last)
        # the same strides, not marked as a view: a forward hook may edit the projection's output in place
        return torch.ops.aten._unsafe_view(x, x.shape)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        layout = torch.channels_last if ctx.channels_last else torch.contiguous_format
        return grad.contiguous(memory_format=layout)


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
        x = self.proj(x)  # (B, C, H, W); channels-last in, channels-last out
        grid = (x.shape[2], x.shape[3])
        return self.norm(map_to_tokens(x)), grid  # (B, H*W, C)


class ConvProjection(CachesDerivedWeights):
    """One convolutional projection of the paper's Fig. 3: a ``(B, C, H, W)`` map to ``(B, T, C)`` tokens.

    ``dw_bn``: depthwise conv (no bias) + BatchNorm (submodules ``conv``, ``bn`` as in the official
    checkpoints), the BatchNorm folded into the conv in eval mode when ``fold_bn``; ``avg``: average
    pooling with ceil mode (no parameters).
    """

    def __init__(self, method: str, dim: int, kernel_size: int, stride: int, padding: int) -> None:
        super().__init__()
        self.method = method
        self.fold_bn = True
        # under CPU autocast the depthwise conv and BatchNorm run in fp32 while a graph is built or where
        # oneDNN has no kernels for the autocast dtype (computes_in_fp32)
        self.dw_fp32 = True
        if method == "dw_bn":
            self.conv = nn.Conv2d(
                dim, dim, kernel_size, stride=stride, padding=padding, bias=False, groups=dim
            )
            self.bn = nn.BatchNorm2d(dim)
            self._folded = DerivedWeights()
        elif method == "avg":
            self.avg = nn.AvgPool2d(kernel_size, stride=stride, padding=padding, ceil_mode=True)
        else:
            raise UsageError(f"ConvProjection method must be 'dw_bn' or 'avg', got {method!r}")

    def folded_conv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Depthwise weight ``(C, 1, k, k)`` and bias ``(C,)`` equal to conv followed by eval BatchNorm
        (a conv with a bias, which the official one has not, gets it folded in too)."""
        bn, conv = self.bn, self.conv
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)  # (C,): gamma / sqrt(var + eps)
        mean = bn.running_mean if conv.bias is None else bn.running_mean - conv.bias
        return conv.weight * scale[:, None, None, None], bn.bias - mean * scale

    def _folds_bn(self) -> bool:
        """``fold_bn``: a plain zero-padded conv and a plain affine BatchNorm with running statistics, in
        eval mode (the BatchNorm's own mode: test-time adaptation trains the BatchNorms of an eval
        model). Anything else, a BatchNorm already fused into the conv for one, runs as itself."""
        conv, bn = self.conv, self.bn
        if not (self.fold_bn and is_plain(conv, nn.Conv2d) and is_plain(bn, nn.BatchNorm2d)):
            return False
        return conv.padding_mode == "zeros" and bn.affine and not bn.training and bn.running_mean is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.method == "avg":
            return map_to_tokens(self.avg(x))
        if self.computes_in_fp32(x):
            with torch.autocast("cpu", enabled=False):
                return self._depthwise(x.float())  # no copy when the caller already cast the shared map
        return self._depthwise(x)

    def input_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype this projection computes ``x`` in: fp32 under ``dw_fp32``, the autocast dtype for
        a ``dw_bn`` conv under autocast (autocast would cast ``x`` to it unless it is float64), else
        ``x.dtype`` (pooling runs in its input dtype)."""
        if self.computes_in_fp32(x):
            return torch.float32
        casts = self.method == "dw_bn" and autocast_casts(x)
        cast_to = active_autocast_dtype(x.device.type) if casts else None
        return x.dtype if cast_to is None else cast_to

    def computes_in_fp32(self, x: torch.Tensor) -> bool:
        """Whether this ``dw_bn`` projection leaves CPU autocast for fp32 (``dw_fp32``): when a graph is
        built (oneDNN's bf16 depthwise backward is ~9x slower than fp32) or when oneDNN has no bf16
        kernels for the CPU (then even the forward is far slower); on an AVX512-BF16 Xeon the bf16
        forward is ~2x faster (docs/performance-decisions.md). A model whose weights are not fp32
        (``model.bfloat16()``) computes as autocast would: an fp32 map would not match its weights."""
        if not (self.method == "dw_bn" and self.dw_fp32 and x.device.type == "cpu"):
            return False
        if self.conv.weight.dtype != torch.float32:
            return False
        cast_to = active_autocast_dtype("cpu")
        return cast_to is not None and (torch.is_grad_enabled() or not cpu_kernels.has_kernels_for(cast_to))

    def _depthwise(self, x: torch.Tensor) -> torch.Tensor:
        """Depthwise conv + BatchNorm (folded in eval), ``(B, C, H, W)`` map to ``(B, H'*W', C)`` tokens."""
        if self._folds_bn():
            bn = self.bn
            # BatchNorm updates its running statistics in place without moving their version counters;
            # the batch counter it increments beside them does move
            sources = (self.conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var)
            sources += tuple(t for t in (self.conv.bias, bn.num_batches_tracked) if t is not None)
            weight, bias = self._folded.get(sources, self.folded_conv, settings=(bn.eps,))
            c = self.conv
            x = F.conv2d(x, weight, bias, c.stride, c.padding, c.dilation, c.groups)
        else:
            x = self.bn(self.conv(x))
            if x.requires_grad and not (torch.compiler.is_compiling() or runs_plain_ops_only(x)):
                x = DenseGradient.apply(x)
        return map_to_tokens(x)  # (B, H'*W', C): a view, the conv keeps the channels-last layout


def _pooling_settings(pool: nn.AvgPool2d) -> tuple:
    """Everything that decides what an ``AvgPool2d`` computes."""
    settings = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
    return tuple(getattr(pool, name) for name in settings)


def _any_training(module: nn.Module) -> bool:
    """Whether ``module`` or one of its submodules is in training mode."""
    return any(m.training for m in module.modules())


class ConvAttention(CachesDerivedWeights):
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
            raise UsageError(f"unknown projection method {method!r}; expected one of {PROJECTION_METHODS}")
        if dim_out % num_heads:
            raise UsageError(f"dim_out {dim_out} is not divisible by num_heads {num_heads}")
        self.method = method
        self.num_heads = num_heads
        self.dim_out = dim_out
        self.scale = dim_out**-0.5
        self.with_cls_token = with_cls_token
        self.fused_attn = True  # F.scaled_dot_product_attention; False: explicit softmax (reference path)
        self.explicit_few_keys = True  # CPU: explicit softmax over <= FEW_KEYS (bf16: FEW_KEYS_BF16) keys
        self.chunked_attn = True  # bf16 CPU inference: chunked_attention (faster than SDPA there)
        self.recompute_attn = True  # bf16 CPU training over many keys: RecomputedAttention (idem)
        self.fuse_proj = True  # one matrix product for projections that share their input
        self._fused_weights = DerivedWeights()
        self._packed_weights = DerivedWeights()  # the same, packed for oneDNN (``onednn_linear``)

        q_method = "linear" if method == "avg" else method
        self.conv_proj_q = self._projection(q_method, dim_in, kernel_size, stride_q, padding_q)
        self.conv_proj_k = self._projection(method, dim_in, kernel_size, stride_kv, padding_kv)
        self.conv_proj_v = self._projection(method, dim_in, kernel_size, stride_kv, padding_kv)

        self.proj_q = CastCachedLinear(dim_in, dim_out, bias=qkv_bias)
        self.proj_k = CastCachedLinear(dim_in, dim_out, bias=qkv_bias)
        self.proj_v = CastCachedLinear(dim_in, dim_out, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = CastCachedLinear(dim_out, dim_out)
        self.proj_drop = nn.Dropout(proj_drop)

    @staticmethod
    def _projection(method: str, dim: int, kernel: int, stride: int, padding: int) -> ConvProjection | None:
        return None if method == "linear" else ConvProjection(method, dim, kernel, stride, padding)

    def _split_heads(self, x: torch.Tensor, parts: int = 1) -> torch.Tensor:
        """``(B, T, parts * dim_out)`` → ``(parts, B, heads, T, head_dim)`` views (no copy)."""
        b, t, _ = x.shape
        return x.reshape(b, t, parts, self.num_heads, -1).permute(2, 0, 3, 1, 4)

    def _pools_once(self) -> bool:
        """Whether the k pooling may stand in for the v pooling: both plain, neither hooked, the same
        pooling."""
        k_proj, v_proj = self.conv_proj_k, self.conv_proj_v
        if not (is_plain(k_proj, ConvProjection) and is_plain(v_proj, ConvProjection)):
            return False
        if not (is_plain(k_proj.avg, nn.AvgPool2d) and is_plain(v_proj.avg, nn.AvgPool2d)):
            return False
        return _pooling_settings(k_proj.avg) == _pooling_settings(v_proj.avg)

    def _fuses_linears(self, parts: int) -> bool:
        """Whether the last ``parts`` of ``proj_q, proj_k, proj_v`` can run as one matrix product: plain
        Linear layers, all with a bias or none."""
        linears = (self.proj_q, self.proj_k, self.proj_v)[-parts:]
        same_bias = len({lin.bias is None for lin in linears}) == 1
        return same_bias and all(is_plain(lin, *LINEARS) for lin in linears)

    def _stacked_linear(self, x: torch.Tensor, linears: tuple[nn.Linear, ...]) -> torch.Tensor:
        """``x`` through several Linear layers at once: one matmul with their weights concatenated."""
        sources = tuple(t for lin in linears for t in (lin.weight, lin.bias) if t is not None)

        def concat() -> tuple[torch.Tensor, torch.Tensor | None]:
            weight = torch.cat([lin.weight for lin in linears])  # (parts * dim_out, dim_in)
            biases = [lin.bias for lin in linears]
            return weight, None if biases[0] is None else torch.cat(biases)

        onednn = all(getattr(lin, "onednn_linear", False) for lin in linears)
        dtype = cpu_kernels.linear_dtype(x, linears[0].weight) if onednn else None
        if dtype is not None and DerivedWeights.keeps(sources):
            weight, bias = self._packed_weights.get(
                sources, lambda: cpu_kernels.pack_linear(*concat(), dtype)
            )
            return cpu_kernels.linear(x.to(dtype), weight, bias)
        weight, bias = self._fused_weights.get(sources, concat)
        return cpu_kernels.graph_linear(onednn, x, weight, bias)

    def _project_inputs(
        self, x: torch.Tensor, grid: tuple[int, int], cls_only: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tokens ``(B, [1+]H*W, C)`` to the q, k, v inputs of the linear projections.

        With ``cls_only`` the q input is the cls token alone ``(B, 1, C)`` (it is never convolved).
        """
        cls_tok, patches = None, x
        if self.with_cls_token:  # cls is never convolved; one split, whose backward writes one gradient
            # (two slices would each zero-fill a gradient of x's size, then add them)
            cls_tok, patches = x.split((1, x.shape[1] - 1), dim=1)
        if self.method == "linear":
            return (cls_tok if cls_only else x), x, x
        x_map = self._conv_input(patches, grid)

        def project(proj: ConvProjection) -> torch.Tensor:
            t = proj(x_map)  # (B, H'*W', C)
            # cls in t's dtype: under autocast an fp32 cls would promote the cat to fp32, which the
            # Linear then casts back (the same values, two more passes)
            return t if cls_tok is None else torch.cat((cls_tok.to(t.dtype), t), dim=1)

        if not cls_only:
            q_in = x if self.conv_proj_q is None else project(self.conv_proj_q)
        elif self.conv_proj_q is not None and (
            self.training or torch.is_grad_enabled() or _any_training(self.conv_proj_q)
        ):
            # the q conv still runs in training, while a graph is built (an eval model fine-tuned with
            # frozen BatchNorms) or while its BatchNorm adapts in an eval model: its BatchNorm statistics
            # move and its parameters get their (zero) gradients as in the full block (DDP expects a
            # gradient for every parameter, and AdamW decays only the parameters that have one)
            q_in = project(self.conv_proj_q)[:, :1]
        else:
            q_in = cls_tok
        if self.method == "avg" and self.fuse_proj and self._pools_once():
            k_in = v_in = project(self.conv_proj_k)  # k and v pool the same map: pool once
        else:
            k_in, v_in = project(self.conv_proj_k), project(self.conv_proj_v)
        return q_in, k_in, v_in

    def _conv_input(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Patch tokens ``(B, H*W, C)`` → the channels-last ``(B, C, H, W)`` map the conv projections read."""
        x_map = tokens_to_map(x, grid)
        # one cast for the three projections, instead of one by autocast (or dw_fp32) in each
        k_proj = self.conv_proj_k  # another class (an adapter) computes in the map's dtype as far as we know
        dtype = k_proj.input_dtype(x_map) if isinstance(k_proj, ConvProjection) else x_map.dtype
        if runs_plain_ops_only(x_map):  # vmap cannot query a channels-last layout
            return x_map.to(dtype)
        if self.fuse_proj and not dense_channels_last(x_map):
            # after the cls split the batch stride is (1+H*W)*C: each conv would copy to NCHW and run
            # its slower NCHW kernel; for a batch of one the batch stride is C, on which oneDNN's conv
            # is slower too; one channels-last copy here serves all three projections
            # (copy=True: `to` would return the strided view itself, its stride order being channels-last)
            return x_map.to(dtype, memory_format=torch.channels_last, copy=True)
        return x_map.to(dtype)

    def project_qkv(
        self, x: torch.Tensor, grid: tuple[int, int], cls_only: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q ``(B, heads, Tq, d)``, k and v ``(B, heads, Tkv, d)`` from the block's normed tokens.

        ``cls_only``: the query of the cls token alone (``Tq == 1``); keys and values of all tokens.
        """
        if cls_only and not self.with_cls_token:
            raise UsageError("cls_only needs a block with a cls token")
        if self.fuse_proj and self.method == "linear" and not cls_only and self._fuses_linears(3):
            q, k, v = self._split_heads(self._stacked_linear(x, (self.proj_q, self.proj_k, self.proj_v)), 3)
            return q, k, v
        q_in, k_in, v_in = self._project_inputs(x, grid, cls_only)
        q = self._split_heads(self.proj_q(q_in))[0]
        if self.fuse_proj and k_in is v_in and self._fuses_linears(2):  # k and v read the same tokens
            k, v = self._split_heads(self._stacked_linear(k_in, (self.proj_k, self.proj_v)), 2)
        else:
            # stride-2 kv: 4x fewer keys (the paper's Table 7)
            k, v = self._split_heads(self.proj_k(k_in))[0], self._split_heads(self.proj_v(v_in))[0]
        return q, k, v

    def forward(self, x: torch.Tensor, grid: tuple[int, int], cls_only: bool = False) -> torch.Tensor:
        """Normed tokens ``(B, T, C)`` → ``(B, T, dim_out)``, or ``(B, 1, dim_out)`` with ``cls_only``."""
        q, k, v = self.project_qkv(x, grid, cls_only)
        dropout = self._kernel_dropout()
        if dropout == 0.0 and self._chunks_attention(q):
            out = chunked_attention(q, k, v, self.scale)
        elif dropout == 0.0 and self._recomputes_attention(q, k, v):
            out = RecomputedAttention.apply(q, k, v, self.scale)
        elif (
            dropout is not None
            and self.fused_attn
            and not self._explicit_is_faster(k)
            and self._sdpa_fits(q, k, v)
        ):
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=self.scale)
        else:  # explicit: the fast path over few keys keeps bf16 probabilities, the reference path fp32
            probs = self.attention_probs(q, k, in_fp32=not self.fused_attn)
            out = self.attn_drop(probs).to(v.dtype) @ v
        out = out.transpose(1, 2).flatten(2)  # (B, Tq, dim_out)
        return self.proj_drop(self.proj(out))

    def _kernel_dropout(self) -> float | None:
        """The attention dropout of this call for the kernels that never materialise the probabilities
        (SDPA applies it; the chunked and recomputed kernels run only without it): ``attn_drop``'s rate
        while it trains, else 0. None when ``attn_drop`` has hooks or is another class: then it runs as
        itself, on explicit probabilities."""
        return dropout_rate(self.attn_drop) if is_plain(self.attn_drop, *DROPOUTS) else None

    def _chunks_attention(self, q: torch.Tensor) -> bool:
        """``chunked_attn``: bf16 CPU inference (no graph, not traced or compiled, no ``torch.func``
        transform: its ``out=`` products have no batching rule) runs
        :func:`~cvt.models.cpu_kernels.chunked_attention` where :meth:`_own_bf16_kernel_fits`."""
        fits = self._own_bf16_kernel_fits(self.chunked_attn, q) and builds_no_graph()
        return fits and not runs_plain_ops_only(q)

    def _recomputes_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
        """``recompute_attn``: bf16 CPU attention over more than FEW_KEYS_BF16 keys while grad is enabled
        (not traced or compiled, no ``torch.func`` transform or forward-mode tangent) runs
        :class:`~cvt.models.cpu_kernels.RecomputedAttention` instead of SDPA where
        :meth:`_own_bf16_kernel_fits`: a CvT-13 bf16 training step at batch 16 ran 0.1-3.9 % faster on
        the Zen 4 VM."""
        if not (self._own_bf16_kernel_fits(self.recompute_attn, q) and torch.is_grad_enabled()):
            return False
        if traced_or_compiled() or runs_plain_ops_only(q, k, v):
            return False
        return k.shape[-2] > FEW_KEYS_BF16  # read only outside traces: a traced size would become a bool

    def _own_bf16_kernel_fits(self, enabled: bool, q: torch.Tensor) -> bool:
        """What the package's own CPU attention kernels (chunked, recomputed) need, besides no attention
        dropout in the call (they have none): their flag ``enabled`` and bf16 queries on a CPU where
        oneDNN has bf16 kernels."""
        on_cpu_bf16 = q.device.type == "cpu" and q.dtype == torch.bfloat16
        return enabled and on_cpu_bf16 and cpu_kernels.CPU_HAS_BF16_KERNELS

    @staticmethod
    def _sdpa_fits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
        """SDPA unless a forward-mode tangent or a ``torch.func`` transform is in the call: CPU SDPA's
        flash kernel has no forward-mode derivative (``jvp`` raised NotImplementedError over more than
        FEW_KEYS keys), so the explicit products run there, as in the reference path."""
        return traced_or_compiled() or not runs_plain_ops_only(q, k, v)

    def _explicit_is_faster(self, k: torch.Tensor) -> bool:
        """``explicit_few_keys``: CPU attention over at most FEW_KEYS keys in fp32, FEW_KEYS_BF16 in bf16
        where oneDNN has bf16 kernels (elsewhere a bf16 matmul is reference code: 3-9x slower than SDPA).
        Never while tracing (ONNX, TorchScript): the trace would freeze the choice made for the example
        input's key count, and exported graphs run on other runtimes anyway."""
        if torch.jit.is_tracing():
            return False
        limit = FEW_KEYS_BF16 if k.dtype == torch.bfloat16 else FEW_KEYS
        few_keys = k.device.type == "cpu" and k.shape[-2] <= limit
        return self.explicit_few_keys and few_keys and cpu_kernels.has_kernels_for(k.dtype)

    def attention_probs(self, q: torch.Tensor, k: torch.Tensor, in_fp32: bool = True) -> torch.Tensor:
        """Softmax attention weights ``(B, heads, Tq, Tkv)``, in fp32 even under autocast (fp64 stays fp64):
        the reference path, also used for attention maps. With ``in_fp32=False`` in the scores' dtype
        (the softmax still accumulates in fp32): the explicit fast path, whose bf16 probabilities are
        what the product with v reads anyway, and half the size to keep for backward.
        """
        # scale after the product, as the official code: no scaled copy of q is kept for backward
        scores = (q @ k.transpose(-2, -1)).mul_(self.scale)
        dtype = torch.promote_types(scores.dtype, torch.float32) if in_fp32 else scores.dtype
        return scores.softmax(dim=-1, dtype=dtype)


class SiluLinear(torch.autograd.Function):
    """``F.linear(silu(h), weight, bias)`` that keeps only ``h`` for backward and recomputes the SiLU.

    Autograd would keep both ``h`` and ``silu(h)`` (4 x dim per token each): this halves the MLP's
    saved activations for one extra elementwise pass in backward. ``weight`` and ``bias`` must already
    be in ``h``'s dtype (the caller casts them, so under autocast the cast stays differentiable).
    ``onednn``: the product and its input gradient by oneDNN's linear (where
    :func:`~cvt.models.cpu_kernels.trains_on_onednn` allows; the caller decides, as grad mode is off here).
    """

    @staticmethod
    def forward(
        ctx: Any, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, onednn: bool = False
    ) -> torch.Tensor:
        ctx.save_for_backward(h, weight)
        ctx.has_bias = bias is not None
        ctx.onednn = onednn
        silu_rows = F.silu(h).flatten(0, -2)  # (N, hidden)
        out = cpu_kernels.linear(silu_rows, weight, bias) if onednn else F.linear(silu_rows, weight, bias)
        # not a view: an autograd Function's output that is one may not be edited in place (a hook's mul_)
        return torch.ops.aten._unsafe_view(out, (*h.shape[:-1], out.shape[-1]))

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        h, weight = ctx.saved_tensors
        grad_out_2d = grad_out.flatten(0, -2)  # (N, out)
        grad_h = grad_w = grad_b = None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out_2d.sum(0)
        silu_h = F.silu(h) if ctx.needs_input_grad[1] else None  # (..., hidden)
        if silu_h is not None:
            grad_w = grad_out_2d.T @ silu_h.flatten(0, -2)  # (out, hidden)
        if not ctx.needs_input_grad[0]:
            return grad_h, grad_w, grad_b, None
        if torch.is_grad_enabled():  # create_graph=True: differentiable ops only (as autograd's own SiLU)
            sig = torch.sigmoid(h)
            return (grad_out @ weight) * sig * (1 + h * (1 - sig)), grad_w, grad_b, None
        if torch.compiler.is_compiling():  # functional ops: the compiler fuses them (and torch 2.5's AOT
            # autograd refuses the out= buffer below in a traced backward)
            return torch.ops.aten.silu_backward(grad_out @ weight, h), grad_w, grad_b, None
        if ctx.onednn:  # grad_out @ weight as a linear on weight.t(), in a fresh (N, hidden) tensor
            silu_h = None  # freed first: one hidden-size tensor at a time, as with the buffer below
            grad_silu = cpu_kernels.linear(grad_out_2d, weight.t(), None)
        else:
            # one hidden-size buffer serves silu(h), then grad_out @ weight, then grad_h (in place): on CPU
            # a fresh tensor of this size is often page-faulted anew (docs/performance.md)
            buffer = torch.empty_like(h, memory_format=torch.contiguous_format) if silu_h is None else silu_h
            grad_silu = buffer.contiguous().view(-1, h.shape[-1])
            torch.mm(grad_out_2d, weight, out=grad_silu)
        grad_h = torch.ops.aten.silu_backward.grad_input(
            grad_silu, h.reshape(grad_silu.shape), grad_input=grad_silu
        )
        return grad_h.view(h.shape), grad_w, grad_b, None


class QuickGeluMlp(CachesDerivedWeights, Mlp):
    """timm's ``Mlp`` (fc1 → act → fc2, same keys) whose QuickGELU is folded into the weights (``fold_act``).

    ``h * sigmoid(1.702 h) = silu(1.702 h) / 1.702``: fc1 is scaled by 1.702 and fc2 by 1 / 1.702, so
    one SiLU pass replaces three elementwise passes (mul, sigmoid, mul). In training, fc2 and the SiLU
    run as :class:`SiluLinear`, which saves one hidden activation instead of three.
    """

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0) -> None:
        super().__init__(in_features, hidden_features, act_layer=QuickGELU, drop=drop)
        self.fold_act = True
        # CPU inference on AVX-512 (bf16; fp32 off Intel): fc1 + SiLU and fc2 by oneDNN on packed weights;
        # fp32 training off Intel: fc1 and fc2 (in SiluLinear) by oneDNN on the plain weights
        self.onednn_linear = True
        self._scaled = DerivedWeights()
        self._packed = DerivedWeights()

    def scaled_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """fc1 weight and bias times 1.702, fc2 weight divided by 1.702."""
        s = QUICK_GELU_SCALE
        return self.fc1.weight * s, self.fc1.bias * s, self.fc2.weight * (1.0 / s)

    def packed_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor | None, ...]:
        """:meth:`scaled_weights` and fc2's bias, packed in ``dtype`` for oneDNN's linear."""
        w1, b1, w2 = self.scaled_weights()
        return (*cpu_kernels.pack_linear(w1, b1, dtype), *cpu_kernels.pack_linear(w2, self.fc2.bias, dtype))

    def _reads_directly(self) -> bool:
        """Whether ``fold_act`` may read the layers instead of calling them: plain Linear layers with
        biases around a plain QuickGELU (the activation whose scale it folds), no norm, plain dropouts."""
        linears = (self.fc1, self.fc2)
        if not all(is_plain(lin, *LINEARS) and lin.bias is not None for lin in linears):
            return False
        plain_rest = is_plain(self.act, QuickGELU) and is_plain(self.norm, nn.Identity)
        return plain_rest and is_plain(self.drop1, *DROPOUTS) and is_plain(self.drop2, *DROPOUTS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.fold_act and self._reads_directly()):
            return super().forward(x)
        hidden_drops = dropout_rate(self.drop1) > 0
        drops = hidden_drops or dropout_rate(self.drop2) > 0
        sources = (self.fc1.weight, self.fc1.bias, self.fc2.weight)
        packs = self.onednn_linear and not (self.training or drops)
        dtype = cpu_kernels.linear_dtype(x, self.fc1.weight) if packs else None
        if dtype is not None and DerivedWeights.keeps(sources):
            w1, b1, w2, b2 = self._packed.get((*sources, self.fc2.bias), lambda: self.packed_weights(dtype))
            h = cpu_kernels.linear(x.to(dtype), w1, b1, silu=True)  # (B, T, hidden): silu(1.702 fc1(x))
            return cpu_kernels.linear(h, w2, b2)
        w1, b1, w2 = self._scaled.get(sources, self.scaled_weights)
        h = cpu_kernels.graph_linear(self.onednn_linear, x, w1, b1)  # (B, T, hidden): 1.702 * fc1(x)
        if torch.is_grad_enabled() and h.requires_grad:
            # dropout between SiLU and fc2, torch.func transforms or forward-mode AD: plain autograd
            if hidden_drops or runs_plain_ops_only(h):
                return self.drop2(
                    cpu_kernels.graph_linear(self.onednn_linear, self.drop1(F.silu(h)), w2, self.fc2.bias)
                )
            w2, b2 = w2.to(h.dtype), self.fc2.bias.to(h.dtype)
            onednn = self.onednn_linear and cpu_kernels.trains_on_onednn(h, w2)
            return self.drop2(SiluLinear.apply(h, w2, b2, onednn))
        # no graph: SiLU in place, saving an allocation of the largest activation
        return self.drop2(F.linear(self.drop1(F.silu(h, inplace=True)), w2, self.fc2.bias))


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
        hidden = int(dim * mlp_ratio)
        if act == "quick_gelu":
            self.mlp: Mlp = QuickGeluMlp(dim, hidden, drop=drop)
        else:
            self.mlp = Mlp(dim, hidden, act_layer=ACTIVATIONS[act], drop=drop)

    def forward(self, x: torch.Tensor, grid: tuple[int, int], cls_only: bool = False) -> torch.Tensor:
        """Tokens ``(B, T, C)`` → ``(B, T, C)``; with ``cls_only`` the cls token's output ``(B, 1, C)``
        alone (keys and values still come from every token): what the classifier of a last block reads."""
        out = x[:, :1] if cls_only else x
        out = out + self.drop_path(self.attn(self.norm1(x), grid, cls_only))
        return out + self.drop_path(self.mlp(self.norm2(out)))


FAST_PATH_FLAGS: tuple[str, ...] = (
    "fused_attn", "explicit_few_keys", "chunked_attn", "recompute_attn", "fuse_proj", "fold_bn", "fold_act",
    "onednn_linear", "dw_fp32", "cls_only_last_block",
)  # fmt: skip


def set_fast_paths(model: nn.Module, enabled: bool = True, **flags: bool) -> nn.Module:
    """Switch the fast paths of every submodule: all to ``enabled``, then any named flag to its value.

    ``set_fast_paths(model, False)`` gives the plain reference computation; ``set_fast_paths(model,
    fold_bn=False)`` turns one path off. Flags: :data:`FAST_PATH_FLAGS` (``cls_only_last_block`` is set
    on the :class:`~cvt.models.CvT` itself), each described in this module's docstring.
    """
    unknown = sorted(set(flags) - set(FAST_PATH_FLAGS))
    if unknown:
        raise UsageError(f"unknown fast-path flag(s) {unknown}; known: {list(FAST_PATH_FLAGS)}")
    values = {name: flags.get(name, enabled) for name in FAST_PATH_FLAGS}
    for module in model.modules():
        for name, value in values.items():
            if hasattr(module, name):
                setattr(module, name, value)
        if isinstance(module, CachesDerivedWeights):  # a path switched off no longer needs its copies
            module.clear_derived()
    return model
