"""The CvT model: stages of (convolutional token embedding → transformer blocks), then a head.

Semantics follow the official implementation (microsoft/CvT ``lib/models/cls_cvt.py``) with its
defects fixed: batch size 1 works (no ``squeeze``), ``linear`` projection everywhere works, and a
learned position embedding per stage is available for the paper's ablations.
The model API follows timm: ``forward_features`` → ``forward_head`` → ``forward``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn
from torch.utils.checkpoint import checkpoint

from cvt.errors import InputShapeError, UsageError
from cvt.models.call_context import traced_or_compiled
from cvt.models.layers import ACTIVATIONS, PROJECTION_METHODS, Block, ConvEmbed, conv_out_size, tokens_to_map

# StageSpec's field annotations (strings, under ``from __future__ import annotations``): the values they admit
_FIELD_TYPES: dict[str, type] = {"int": numbers.Integral, "float": numbers.Real, "bool": bool, "str": str}


@dataclass(frozen=True)
class StageSpec:
    """Hyper-parameters of one CvT stage (one column of the official ``MODEL.SPEC``)."""

    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int = 3  # token-embedding conv kernel (7 in stage 1 of the official models)
    patch_stride: int = 2  # token-embedding conv stride: the stage's downsampling
    patch_padding: int = 1
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_rate: float = 0.0  # dropout after the embedding, in the MLP and after the attention output
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0  # stochastic depth: block i of n gets rate * i / (n - 1)
    cls_token: bool = False  # a learned cls token prepended to the stage's tokens
    pos_embed: bool = False  # learned position embedding (off in the paper's final design)
    method: str = "dw_bn"  # q/k/v projection: dw_bn | avg | linear
    kernel_qkv: int = 3
    stride_q: int = 1
    padding_q: int = 1
    stride_kv: int = 2  # stride-2 k/v: 4x fewer keys, the paper's Table 7
    padding_kv: int = 1

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value, expected = getattr(self, f.name), _FIELD_TYPES[f.type]
            if isinstance(value, bool) != (expected is bool) or not isinstance(value, expected):
                raise UsageError(f"stage {f.name} must be {f.type}, got {value!r}")
        sizes = ("depth", "embed_dim", "num_heads", "patch_size", "patch_stride", "kernel_qkv")
        for name in (*sizes, "stride_q", "stride_kv"):
            if getattr(self, name) < 1:
                raise UsageError(f"stage {name} must be >= 1, got {getattr(self, name)}")
        if self.method not in PROJECTION_METHODS:
            raise UsageError(f"projection method must be one of {PROJECTION_METHODS}, got {self.method!r}")
        if self.embed_dim % self.num_heads:
            raise UsageError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        for name in ("patch_padding", "padding_q", "padding_kv"):
            if getattr(self, name) < 0:
                raise UsageError(f"stage {name} must be >= 0, got {getattr(self, name)}")
        if not math.isfinite(self.mlp_ratio) or int(self.embed_dim * self.mlp_ratio) < 1:
            raise UsageError(
                f"stage mlp_ratio must be a finite number that leaves the MLP at least one hidden unit "
                f"(int(embed_dim * mlp_ratio) >= 1), got {self.mlp_ratio!r}"
            )
        for name in ("drop_rate", "attn_drop_rate", "drop_path_rate"):
            # refused here, not by torch at the first training step; rate 1 drops everything (and drop
            # path divides by the keep probability 0), so no rate of 1 or more can train
            if not 0 <= getattr(self, name) < 1:
                raise UsageError(f"stage {name} must be in [0, 1), got {getattr(self, name)}")
        if self.method == "dw_bn" and (self.stride_q != 1 or 2 * self.padding_q != self.kernel_qkv - 1):
            # the residual x + attn(x) needs one query per input token: a stride-1 conv whose padding
            # keeps the grid ("same" padding, so an odd kernel)
            raise UsageError(
                f"the q projection must keep the token grid for the block's residual: stride_q 1 and "
                f"padding_q (kernel_qkv - 1) / 2, got stride_q {self.stride_q}, kernel_qkv "
                f"{self.kernel_qkv}, padding_q {self.padding_q}"
            )
        if self.method == "avg" and 2 * self.padding_kv > self.kernel_qkv:
            raise UsageError(  # PyTorch's pooling rule
                f"avg projection: padding_kv {self.padding_kv} is more than half of kernel_qkv "
                f"{self.kernel_qkv}"
            )

    def identity(self) -> tuple[Any, ...]:
        """The field values that decide the stage this spec builds: equal for specs that build the same
        stage. A ``linear`` projection has no conv, so its kernel, strides and paddings play no part."""
        unused = _CONV_PROJECTION_FIELDS if self.method == "linear" else ()
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in unused)


_CONV_PROJECTION_FIELDS = ("kernel_qkv", "stride_q", "padding_q", "stride_kv", "padding_kv")


STAGE_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(StageSpec))
REQUIRED_STAGE_FIELDS: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(StageSpec) if f.default is dataclasses.MISSING
)
# the stem: the first stage's patch-embedding conv, the only module that reads the image's channels
# (timm's ``first_conv``, which it adapts to ``in_chans`` when loading published weights)
FIRST_CONV = "stage0.patch_embed.proj"


def expand_stages(num_stages: int, **per_stage: Any) -> list[StageSpec]:
    """Build ``num_stages`` specs from keyword lists (one value per stage) or scalars (all stages)."""
    unknown = sorted(set(per_stage) - set(STAGE_FIELDS))
    if unknown:
        raise UsageError(f"unknown stage option(s) {unknown}; known: {list(STAGE_FIELDS)}")
    columns: dict[str, list[Any]] = {}
    for name, value in per_stage.items():
        if isinstance(value, (list, tuple)):
            if len(value) != num_stages:
                raise UsageError(f"{name} has {len(value)} values for {num_stages} stages")
            columns[name] = list(value)
        else:
            columns[name] = [value] * num_stages
    missing = [name for name in REQUIRED_STAGE_FIELDS if name not in per_stage]
    if missing:
        raise UsageError(f"stage option(s) {missing} have no default and were not given")
    return [StageSpec(**{k: v[i] for k, v in columns.items()}) for i in range(num_stages)]


class CvTStage(nn.Module):
    """One stage: ``(B, C_in, H, W)`` map → ``(B, T, C)`` tokens (cls at 0 if any) and grid ``(H', W')``."""

    def __init__(
        self, spec: StageSpec, in_chans: int, grid: tuple[int, int], act: str, norm_eps: float
    ) -> None:
        super().__init__()
        self.spec = spec
        self.grad_checkpointing = False
        self.patch_embed = ConvEmbed(
            in_chans, spec.embed_dim, spec.patch_size, spec.patch_stride, spec.patch_padding, norm_eps
        )
        self.pos_grid = grid  # the grid the position embedding was learned at
        if spec.pos_embed:
            self.pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1], spec.embed_dim))
        self.pos_drop = nn.Dropout(spec.drop_rate)
        if spec.cls_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, spec.embed_dim))
        # per-block stochastic depth within the stage, as the official code (not per stage as HF)
        rates = torch.linspace(0, spec.drop_path_rate, spec.depth, device="cpu").tolist()
        # fmt: off
        self.blocks = nn.ModuleList(
            Block(
                spec.embed_dim, spec.num_heads, spec.mlp_ratio, qkv_bias=spec.qkv_bias,
                drop=spec.drop_rate, attn_drop=spec.attn_drop_rate, drop_path=rate, act=act,
                norm_eps=norm_eps, method=spec.method, kernel_size=spec.kernel_qkv,
                stride_kv=spec.stride_kv, stride_q=spec.stride_q, padding_kv=spec.padding_kv,
                padding_q=spec.padding_q, with_cls_token=spec.cls_token,
            )
            for rate in rates
        )
        # fmt: on

    def position_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        """The position embedding ``(1, H*W, C)``, bicubically resized when ``grid`` differs."""
        # an export traces one image size (cvt.export), so this choice is meant to be frozen; comparing
        # the traced sizes would raise a TracerWarning on every such export
        with _tracer_warnings_off() if torch.jit.is_tracing() else nullcontext():
            native = grid == self.pos_grid
        if native:
            return self.pos_embed
        h0, w0 = self.pos_grid
        pe = self.pos_embed.reshape(1, h0, w0, -1).permute(0, 3, 1, 2)  # (1, C, h0, w0)
        pe = F.interpolate(pe, size=grid, mode="bicubic", align_corners=False)
        return pe.flatten(2).transpose(1, 2)

    def forward(self, x: torch.Tensor, cls_only: bool = False) -> tuple[torch.Tensor, tuple[int, int]]:
        """With ``cls_only`` the last block returns the cls token alone, ``(B, 1, C)``."""
        x, grid = self.patch_embed(x)  # (B, H*W, C)
        if self.spec.pos_embed:
            x = x + self.position_embedding(grid)
        if self.spec.cls_token:
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = self.pos_drop(x)
        last = len(self.blocks) - 1
        for i, blk in enumerate(self.blocks):
            block_cls_only = cls_only and i == last
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = _checkpointed(blk, x, grid, block_cls_only)
            else:
                x = blk(x, grid, block_cls_only)
        return x, grid


def _checkpointed(block: nn.Module, x: torch.Tensor, grid: tuple[int, int], cls_only: bool) -> torch.Tensor:
    """``block(x, grid, cls_only)`` whose activations are recomputed in backward instead of kept.

    Eager recomputation would update BatchNorm running statistics a second time, so it runs with them
    frozen; under ``torch.compile`` the graph's buffer updates run once (and a ``context_fn`` is refused).
    """
    # context_fn gives the contexts of the forward and of its recomputation in backward
    contexts = (
        {}
        if torch.compiler.is_compiling()
        else {"context_fn": lambda: (nullcontext(), _batchnorm_statistics_frozen(block))}
    )
    return checkpoint(block, x, grid, cls_only, use_reentrant=False, **contexts)


@contextmanager
def _tracer_warnings_off() -> Iterator[None]:
    """No ``TracerWarning`` inside: for comparisons whose traced outcome is meant to be frozen."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        yield


@contextmanager
def _batchnorm_statistics_frozen(module: nn.Module) -> Iterator[None]:
    """Inside, BatchNorm layers of ``module`` run as in training (batch statistics, same saved tensors);
    on exit their running statistics and batch counters are put back to what they were."""
    buffers = [b for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
               for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]  # fmt: skip
    saved = [b.clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, value in zip(buffers, saved, strict=True):
                b.copy_(value)


class CvT(nn.Module):
    """Convolutional vision Transformer (Wu et al., 2021), with timm's model API.

    Args:
        stages: one :class:`StageSpec` per stage.
        num_classes: classifier outputs; 0 gives an identity head (features only).
        in_chans: input channels.
        img_size: the training input size ``(H, W)``; sizes the position embeddings. Other sizes
            still work (position embeddings are interpolated). ``pretrained_cfg`` keeps the size the
            variant's weights were published at, as in timm; ``cvt.data.resolve_data_config`` reads
            the model's own.
        act: MLP activation, ``quick_gelu`` (official checkpoints) or ``gelu`` (transformers' port).
        norm_eps: LayerNorm epsilon (1e-5 in the official code).
        init: ``trunc_norm`` (std 0.02) or ``xavier``, as the official ``MODEL.INIT``.
        global_pool: ``token`` (the cls token; default when the last stage has one), ``avg`` (the mean
            of the patch tokens; the default otherwise) or ``''`` (no pooling: the head sees every token).
    """

    def __init__(
        self,
        stages: Sequence[StageSpec],
        num_classes: int = 1000,
        in_chans: int = 3,
        img_size: int | tuple[int, int] = 224,
        act: str = "quick_gelu",
        norm_eps: float = 1e-5,
        init: str = "trunc_norm",
        global_pool: str | None = None,
    ) -> None:
        super().__init__()
        check_act(act)
        if init not in ("trunc_norm", "xavier"):
            raise UsageError(f"init must be 'trunc_norm' or 'xavier', got {init!r}")
        if not stages:
            raise UsageError("a CvT needs at least one stage")
        _check_num_classes(num_classes)
        if not is_whole_number(in_chans) or in_chans < 1:
            raise UsageError(f"in_chans must be a whole number >= 1, got {in_chans!r}")
        if (
            isinstance(norm_eps, bool)
            or not isinstance(norm_eps, numbers.Real)
            or not 0 <= norm_eps < math.inf
        ):
            raise UsageError(f"norm_eps must be a finite number >= 0, got {norm_eps!r}")
        self.stage_specs = tuple(stages)
        self.num_stages = len(stages)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.img_size = _checked_img_size(img_size)
        self.act = act
        self.norm_eps = norm_eps
        self.has_cls_token = stages[-1].cls_token
        self.global_pool = self._checked_pool("token" if self.has_cls_token else "avg", global_pool)
        self.num_features = self.head_hidden_size = stages[-1].embed_dim
        # fast path: forward() runs the last block for the cls token alone, the only token the head reads
        self.cls_only_last_block = True

        min_h, min_w = min_input_size(self.stage_specs)
        if self.img_size[0] < min_h or self.img_size[1] < min_w:
            raise UsageError(
                f"img_size {self.img_size[0]}x{self.img_size[1]} is too small for these stages: "
                f"the minimum size is {min_h}x{min_w}"
            )
        chans, reduction = in_chans, 1
        self.feature_info: list[dict[str, Any]] = []
        for i, (spec, grid) in enumerate(zip(stages, stage_grids(stages, self.img_size), strict=True)):
            reduction *= spec.patch_stride
            # official key layout: stage0.patch_embed…, stage0.blocks.0…, stage2.cls_token
            self.add_module(f"stage{i}", CvTStage(spec, chans, grid, act, norm_eps))
            self.feature_info.append(dict(num_chs=spec.embed_dim, reduction=reduction, module=f"stage{i}"))
            chans = spec.embed_dim
        self.norm = nn.LayerNorm(self.num_features, eps=norm_eps)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.pretrained_cfg: dict[str, Any] = {}
        self._init_weights(init)

    # ----------------------------------------------------------------------------------- init
    def _init_weights(self, init: str) -> None:
        """Official init: Linear by trunc_normal(0.02) or xavier; norms to (1, 0); conv left default."""
        if self.norm.weight.is_meta:
            return  # built on the meta device (shape-only uses: GMACs, key matching): nothing to fill
        for m in self.modules():
            if isinstance(m, nn.Linear):
                if init == "xavier":
                    nn.init.xavier_uniform_(m.weight)
                else:
                    trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for stage in self.stages:
            for name in ("cls_token", "pos_embed"):
                if hasattr(stage, name):
                    trunc_normal_(getattr(stage, name), std=0.02)

    @property
    def stages(self) -> list[CvTStage]:
        """The stages in order (registered as ``stage0``, ``stage1`` … for the official key layout)."""
        return [getattr(self, f"stage{i}") for i in range(self.num_stages)]

    # ------------------------------------------------------------------------------- checks
    def min_input_size(self) -> tuple[int, int]:
        """Smallest ``(H, W)`` for which every stage keeps at least one token and one key."""
        return min_input_size(self.stage_specs)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise :class:`InputShapeError` with the expected and actual shape for unusable input."""
        if x.ndim != 4:
            raise InputShapeError(
                f"expected a (B, {self.in_chans}, H, W) image batch, got shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.in_chans:
            raise InputShapeError(
                f"expected {self.in_chans} input channels, got {x.shape[1]} (input shape {tuple(x.shape)})"
            )
        # the stem's first floating parameter: its conv weight, or an adapter's that replaced the conv
        weight_dtype = next(t.dtype for t in self.stage0.patch_embed.parameters() if t.is_floating_point())
        # autocast accepts other float dtypes but float64, which it leaves as it is (input or weights);
        # the meta device (shape checks) has no autocast to ask
        autocast = x.device.type != "meta" and torch.is_autocast_enabled(x.device.type)
        uncast = not autocast or torch.float64 in (x.dtype, weight_dtype)
        if not x.is_floating_point() or (x.dtype != weight_dtype and uncast):
            note = " (autocast leaves float64 as it is)" if autocast else ""
            raise InputShapeError(
                f"expected a {weight_dtype} input (the model's dtype), got {x.dtype}{note}; convert with "
                f"x.to({weight_dtype}) (integer images: scale to floats and normalize first)"
            )
        if x.shape[0] == 0:
            raise InputShapeError(f"empty batch: input shape {tuple(x.shape)}")
        min_h, min_w = self.min_input_size()
        if x.shape[2] < min_h or x.shape[3] < min_w:
            raise InputShapeError(
                f"input {x.shape[2]}x{x.shape[3]} is too small: every stage needs at least one token, "
                f"the minimum size is {min_h}x{min_w}"
            )
        if x.shape[0] == 1:
            self._check_single_image_batchnorm(x.shape[2], x.shape[3])

    def _check_single_image_batchnorm(self, height: int, width: int) -> None:
        """A BatchNorm in training mode cannot normalise one value per channel: that is a batch of one
        whose query or key/value map (the maps a ``dw_bn`` projection normalises) is 1x1."""
        grids = stage_grids(self.stage_specs, (height, width))
        for i, (spec, grid) in enumerate(zip(self.stage_specs, grids, strict=True)):
            if spec.method != "dw_bn":
                continue
            q_map = tuple(conv_out_size(g, spec.kernel_qkv, spec.stride_q, spec.padding_q) for g in grid)
            one_value = [
                name for name, m in (("query", q_map), ("key/value", kv_grid(spec, grid))) if m == (1, 1)
            ]
            if one_value and any(
                m.training for m in self.stages[i].modules() if isinstance(m, nn.BatchNorm2d)
            ):
                raise InputShapeError(
                    f"a batch of one {height}x{width} image cannot go through stage{i} in training mode: "
                    f"its {' and '.join(one_value)} map is 1x1, so each BatchNorm there would see one "
                    f"value per channel; use batches of 2 or more, a larger input, or put the BatchNorms in "
                    f"eval mode"
                )

    # ------------------------------------------------------------------------------ forward
    def forward_features(self, x: torch.Tensor, cls_only: bool = False) -> torch.Tensor:
        """``(B, C, H, W)`` → last-stage tokens ``(B, [1+]T, C)`` after the final LayerNorm.

        ``cls_only``: the cls token alone ``(B, 1, C)``; the last block then computes its query,
        attention row and MLP for that token only (its keys and values still come from every token).
        """
        if not traced_or_compiled():  # checked where it runs eagerly; a trace or graph would bake it in
            self.check_input(x)
        if cls_only and not self.has_cls_token:
            raise UsageError("cls_only needs a last stage with a cls token")
        last = self.num_stages - 1
        for i, stage in enumerate(self.stages):
            x, grid = stage(x, cls_only=cls_only and i == last)
            if i < last:
                x = tokens_to_map(x, grid, stage.spec.cls_token)  # earlier cls tokens are discarded
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool the tokens ``(B, T, C)`` as ``global_pool`` says and classify (``''``: every token)."""
        if self.global_pool == "token":
            x = x[:, 0]
        elif self.global_pool == "avg":
            patches = x[:, int(self.has_cls_token) :]  # (B, H*W, C)
            if patches.shape[1] == 0:
                raise UsageError("global_pool='avg' averages patch tokens, and these features have none "
                                 "(forward_features(x, cls_only=True) keeps only the cls token)")  # fmt: skip
            x = patches.mean(dim=1)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` images → ``(B, num_classes)`` logits.

        With cls-token pooling the last block computes the cls token alone (``cls_only_last_block``,
        exact: the other tokens' outputs never reach the head); hooks that need every token of the
        last block can call :meth:`forward_features` or switch the path off with ``set_fast_paths``.
        """
        cls_only = self.cls_only_last_block and self.global_pool == "token"
        return self.forward_head(self.forward_features(x, cls_only=cls_only))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Per-stage ``(B, C_i, H_i, W_i)`` maps (cls tokens split off), timm's backbone interface.

        ``indices``: stage indices, or an int n for the last n stages (default all). ``norm``
        applies the final LayerNorm to the last stage's map (the only one of its width). Unless
        ``intermediates_only``, also returns the final normed tokens, or with ``stop_early`` before
        the last stage, the map of the last stage run.
        """
        if output_fmt != "NCHW":
            raise UsageError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take = self._stage_indices(indices)
        if not traced_or_compiled():
            self.check_input(x)
        intermediates: list[torch.Tensor] = []
        last = max(take) if stop_early or intermediates_only else self.num_stages - 1
        for i, stage in enumerate(self.stages[: last + 1]):
            x, grid = stage(x)
            is_final = i == self.num_stages - 1
            if i in take:
                tokens = self.norm(x) if norm and is_final else x
                # NCHW-contiguous, as timm's models give them (the view would be channels-last, or
                # strided past a cls token, where `.view(B, -1)` and NCHW kernels fail or copy)
                intermediates.append(tokens_to_map(tokens, grid, stage.spec.cls_token).contiguous())
            if not is_final:
                x = tokens_to_map(x, grid, stage.spec.cls_token)
        if intermediates_only:
            return intermediates
        # stopped early: x is the map of an earlier, narrower stage, which the final norm does not fit
        return (self.norm(x) if last == self.num_stages - 1 else x), intermediates

    def prune_intermediate_layers(
        self, indices: int | Sequence[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Keep only what the feature maps at ``indices`` need (timm's interface); returns the indices.

        Stages past the last index are removed, so no parameter goes unused (DDP refuses those); the
        final norm, which fits the last stage only, goes with them (or with ``prune_norm``); with
        ``prune_head`` the head becomes an identity with no pooling (``reset_classifier(0, '')``).
        """
        take = self._stage_indices(indices)
        keep = max(take) + 1
        drops_stages = keep < self.num_stages
        if drops_stages and not prune_head:
            raise UsageError(
                f"prune_head=False keeps the head, which reads stage {self.num_stages - 1}; indices "
                f"{indices!r} would remove that stage"
            )
        if prune_head:
            self.reset_classifier(0, "")
        if drops_stages:
            for i in range(keep, self.num_stages):
                delattr(self, f"stage{i}")
            self.stage_specs = self.stage_specs[:keep]
            self.feature_info = self.feature_info[:keep]
            self.num_stages = keep
            self.has_cls_token = self.stage_specs[-1].cls_token
            self.num_features = self.head_hidden_size = self.stage_specs[-1].embed_dim
        if prune_norm or drops_stages:
            self.norm = nn.Identity()
        return take

    def _stage_indices(self, indices: int | Sequence[int] | None) -> list[int]:
        n = self.num_stages
        if indices is None:
            return list(range(n))
        if isinstance(indices, int):
            take = list(range(n - indices, n))
        else:
            take = [n + i if i < 0 else i for i in indices]  # -1 is the last stage; -n-1 is out of range
        if not take:
            raise UsageError("stage indices must name at least one stage, got none")
        bad = [i for i in take if not 0 <= i < n]
        if bad or (isinstance(indices, int) and not 0 < indices <= n):
            raise UsageError(f"stage indices {indices!r} out of range for a {n}-stage model")
        return take

    # ------------------------------------------------------------------------ timm model API
    def get_classifier(self) -> nn.Module:
        """The classification head."""
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head by a fresh one with ``num_classes`` outputs (0: identity); ``global_pool``
        as in the constructor (None: keep the current one)."""
        _check_num_classes(num_classes)
        self.global_pool = self._checked_pool(self.global_pool, global_pool)
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    def _checked_pool(self, current: str, requested: str | None) -> str:
        """``requested`` if it is a pooling this model can do, ``current`` when it is None."""
        if requested is None:
            return current
        if requested not in ("token", "avg", ""):
            raise UsageError(f"global_pool must be 'token', 'avg' or '' (no pooling), got {requested!r}")
        if requested == "token" and not self.has_cls_token:
            raise UsageError("global_pool='token' needs a cls token in the last stage")
        return requested

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameters that AdamW should not decay: cls tokens and position embeddings."""
        return {name for name, _ in self.named_parameters() if name.endswith(("cls_token", "pos_embed"))}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for layer-wise lr decay (timm's ``group_with_matcher`` format)."""
        if coarse:
            return dict(stem=r"^stage0\.patch_embed", blocks=r"^stage(\d+)")
        return dict(
            stem=r"^stage0\.patch_embed",
            blocks=[
                (r"^stage(\d+)\.blocks\.(\d+)", None),
                (r"^stage(\d+)\.(?:patch_embed|cls_token|pos_embed)", (0,)),
                (r"^norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in the backward pass to save memory."""
        for stage in self.stages:
            stage.grad_checkpointing = enable


def is_whole_number(value: object) -> bool:
    """Whether ``value`` is an integer (Python's, NumPy's …) and not a bool, which Python counts as one."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_act(act: str) -> None:
    """:class:`UsageError` for an MLP activation name other than those of :data:`ACTIVATIONS`."""
    if act not in ACTIVATIONS:
        raise UsageError(f"act must be one of {sorted(ACTIVATIONS)}, got {act!r}")


def _check_num_classes(num_classes: int) -> None:
    """:class:`UsageError` for a class count that is not a whole number >= 0 (0: no classifier)."""
    if not is_whole_number(num_classes) or num_classes < 0:
        raise UsageError(f"num_classes must be a whole number >= 0 (0: no classifier), got {num_classes!r}")


def _checked_img_size(img_size: int | Sequence[int]) -> tuple[int, int]:
    """``img_size`` as ``(H, W)``: an int N is N x N; :class:`UsageError` for anything but whole numbers."""
    size = (img_size, img_size) if is_whole_number(img_size) else img_size
    if (
        not isinstance(size, Sequence) or isinstance(size, str) or len(size) != 2
        or not all(is_whole_number(v) for v in size)
    ):  # fmt: skip
        raise UsageError(f"img_size must be a whole number N (N x N) or a pair (H, W), got {img_size!r}")
    return int(size[0]), int(size[1])


def stage_grids(specs: Sequence[StageSpec], img_size: tuple[int, int]) -> list[tuple[int, int]]:
    """The token grid ``(H, W)`` of each stage for an ``img_size`` input (56x56/28x28/14x14 at 224
    for CvT-13): what each stage's token-embedding conv leaves."""
    grids: list[tuple[int, int]] = []
    h, w = img_size
    for spec in specs:
        h, w = (conv_out_size(g, spec.patch_size, spec.patch_stride, spec.patch_padding) for g in (h, w))
        grids.append((h, w))
    return grids


def kv_grid(spec: StageSpec, grid: tuple[int, int]) -> tuple[int, int]:
    """The key/value grid of a stage whose tokens (and queries) lie on ``grid``: what its k/v projection
    leaves (7x7 for CvT-13's last stage at 224). ``linear`` keeps the grid; ``avg`` pools with
    ceil mode (:class:`~cvt.models.layers.ConvProjection`), a ``dw_bn`` conv rounds down."""
    if spec.method == "linear":
        return grid
    ceil = spec.method == "avg"
    h, w = (conv_out_size(g, spec.kernel_qkv, spec.stride_kv, spec.padding_kv, ceil_mode=ceil) for g in grid)
    return h, w


@lru_cache(maxsize=64)
def min_input_size(specs: tuple[StageSpec, ...]) -> tuple[int, int]:
    """Smallest ``(H, W)`` input for which every stage of ``specs`` keeps at least one token and key."""

    def ok(size: int) -> bool:
        grids = stage_grids(specs, (size, size))
        return all(min(*grid, *kv_grid(s, grid)) >= 1 for s, grid in zip(specs, grids, strict=True))

    size = 1
    while not ok(size):
        size += 1
        if size > 1 << 16:
            raise UsageError("this stage configuration gives no valid input size")
    # sizes are monotone here: a larger input never yields fewer tokens
    return size, size


def count_params(model: nn.Module) -> int:
    """Number of parameters (BatchNorm running statistics excluded)."""
    return sum(p.numel() for p in model.parameters())
