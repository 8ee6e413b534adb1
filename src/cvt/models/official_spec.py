"""The official CvT experiment YAML's ``MODEL.SPEC`` → :class:`~cvt.models.cvt.StageSpec`.

The official repository describes every model by per-stage lists under ``MODEL.SPEC``
(``DIM_EMBED: [64, 192, 384]``, ``QKV_PROJ_METHOD: [dw_bn, dw_bn, dw_bn]`` …). This module maps
those names onto this project's stage fields, so any official experiment file builds the same model;
:mod:`cvt.checkpoint.official_yaml` reads the file itself (class count, image size, preprocessing).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cvt.errors import UsageError
from cvt.models.cvt import StageSpec, expand_stages

# official MODEL.SPEC key -> StageSpec field
OFFICIAL_SPEC_KEYS: dict[str, str] = {
    "DIM_EMBED": "embed_dim",
    "DEPTH": "depth",
    "NUM_HEADS": "num_heads",
    "PATCH_SIZE": "patch_size",
    "PATCH_STRIDE": "patch_stride",
    "PATCH_PADDING": "patch_padding",
    "MLP_RATIO": "mlp_ratio",
    "QKV_BIAS": "qkv_bias",
    "DROP_RATE": "drop_rate",
    "ATTN_DROP_RATE": "attn_drop_rate",
    "DROP_PATH_RATE": "drop_path_rate",
    "CLS_TOKEN": "cls_token",
    "POS_EMBED": "pos_embed",
    "QKV_PROJ_METHOD": "method",
    "KERNEL_QKV": "kernel_qkv",
    "STRIDE_Q": "stride_q",
    "PADDING_Q": "padding_q",
    "STRIDE_KV": "stride_kv",
    "PADDING_KV": "padding_kv",
}
# keys of MODEL.SPEC that carry no per-stage architecture
_IGNORED_KEYS = {"NUM_STAGES", "INIT", "NORM", "ACT"}


def stages_from_official_spec(spec: Mapping[str, Any]) -> list[StageSpec]:
    """Stage specs from an official ``MODEL.SPEC`` mapping (the YAML's per-stage lists)."""
    unknown = sorted(set(spec) - set(OFFICIAL_SPEC_KEYS) - _IGNORED_KEYS)
    if unknown:
        raise UsageError(f"unknown MODEL.SPEC key(s) {unknown}; known: {sorted(OFFICIAL_SPEC_KEYS)}")
    if "DIM_EMBED" not in spec:
        raise UsageError("MODEL.SPEC has no DIM_EMBED: cannot tell the number of stages")
    dims = spec["DIM_EMBED"]
    num_stages = spec.get("NUM_STAGES", len(dims) if isinstance(dims, (list, tuple)) else None)
    if type(num_stages) is not int or num_stages < 1:  # type(): a YAML `true` is not a stage count
        raise UsageError(
            f"MODEL.SPEC needs NUM_STAGES as a positive integer or DIM_EMBED as a per-stage list; got "
            f"NUM_STAGES={spec.get('NUM_STAGES')!r}, DIM_EMBED={dims!r}"
        )
    fields = {OFFICIAL_SPEC_KEYS[k]: v for k, v in spec.items() if k in OFFICIAL_SPEC_KEYS}
    return expand_stages(num_stages, **fields)
