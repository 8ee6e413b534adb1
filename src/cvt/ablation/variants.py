"""The paper's ablation families as model overrides, with the paper's CvT-13 figures.

Each variant is a set of ``create_model(base, **overrides)`` keyword arguments: :class:`StageSpec`
fields given as a scalar (every stage) or one value per stage. Families are built from the base
model's stages, so they apply to any depth of model (the paper's tables use CvT-13, 3 stages).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cvt.errors import UsageError
from cvt.models.cvt import StageSpec


@dataclass(frozen=True)
class PaperFigures:
    """What the paper reports for a variant of CvT-13 (ImageNet-1k, 224x224); None where it doesn't."""

    params_m: float | None = None  # millions of parameters
    gflops: float | None = None  # the paper's "FLOPs" are multiply-accumulates
    top1: float | None = None  # ImageNet-1k top-1 accuracy, %


@dataclass(frozen=True)
class Variant:
    """One row of an ablation: its family, a readable name and the model overrides that build it."""

    family: str
    name: str
    overrides: dict[str, Any] = field(default_factory=dict)
    paper: PaperFigures = PaperFigures()

    @property
    def label(self) -> str:
        """``family / name``, as messages and the report name a variant."""
        return f"{self.family} / {self.name}"


def _first_stages(flag_on: Any, flag_off: Any, count: int, num_stages: int) -> tuple[Any, ...]:
    """``flag_on`` for the first ``count`` stages, ``flag_off`` for the others."""
    return tuple(flag_on if i < count else flag_off for i in range(num_stages))


def position_embedding_family(stages: Sequence[StageSpec]) -> list[Variant]:
    """Table 5: a learned position embedding in no stage, the first, the last, or every stage."""
    n = len(stages)
    first = _first_stages(True, False, 1, n)
    last = _first_stages(False, True, n - 1, n)
    return [
        Variant("pos_embed", "none", {"pos_embed": False}, PaperFigures(top1=81.6)),
        Variant("pos_embed", "first stage", {"pos_embed": first}, PaperFigures(top1=81.4)),
        Variant("pos_embed", "last stage", {"pos_embed": last}, PaperFigures(top1=81.4)),
        Variant("pos_embed", "every stage", {"pos_embed": True}, PaperFigures(top1=81.5)),
    ]


def token_embedding_family(stages: Sequence[StageSpec]) -> list[Variant]:
    """Table 6: convolutional (overlapping) vs. linear (non-overlapping patch) token embedding, ± PE.

    A linear patch embedding is a convolution whose kernel equals its stride, without padding: each
    output token sees one disjoint patch, as in ViT. The strides stay the base model's, and so do the
    token grids when every stage's input side is a multiple of its stride (56/28/14 at 224 for CvT-13):
    then only the embedding's receptive field changes. Otherwise the linear embedding drops the last
    partial patch and a grid can be one token smaller (cvt_tiny at 28: 14/7/3 against 14/7/4).
    """
    linear = {"patch_size": tuple(s.patch_stride for s in stages), "patch_padding": 0}
    fam = "token_embed"
    return [
        Variant(fam, "linear, no PE", {**linear, "pos_embed": False}, PaperFigures(params_m=19.5, top1=80.7)),
        Variant(fam, "linear + PE", {**linear, "pos_embed": True}, PaperFigures(params_m=19.9, top1=81.1)),
        Variant(fam, "conv + PE", {"pos_embed": True}, PaperFigures(params_m=20.3, top1=81.4)),
        Variant(fam, "conv, no PE", {"pos_embed": False}, PaperFigures(params_m=20.0, top1=81.6)),
    ]


def kv_stride_family(stages: Sequence[StageSpec]) -> list[Variant]:
    """Table 7: convolutional projection of keys/values with stride 1 vs. the squeezed stride 2."""
    return [
        Variant("kv_stride", "stride 1", {"stride_kv": 1}, PaperFigures(gflops=6.55, top1=82.3)),
        Variant("kv_stride", "stride 2", {"stride_kv": 2}, PaperFigures(gflops=4.53, top1=81.6)),
    ]


def conv_projection_family(stages: Sequence[StageSpec]) -> list[Variant]:
    """Table 8: depthwise-conv projection (dw_bn) in the first k stages, plain linear in the others."""
    n = len(stages)
    paper_top1 = {0: 80.6, 1: 80.8, 2: 81.0, 3: 81.6} if n == 3 else {}

    def name(k: int) -> str:
        return "none" if k == 0 else "all stages" if k == n else "stage 1" if k == 1 else f"stages 1-{k}"

    methods = {k: _first_stages("dw_bn", "linear", k, n) for k in range(n + 1)}
    return [
        Variant("conv_proj", name(k), {"method": methods[k]}, PaperFigures(top1=paper_top1.get(k)))
        for k in range(n + 1)
    ]


def projection_method_family(stages: Sequence[StageSpec]) -> list[Variant]:
    """The projection itself: depthwise conv + BatchNorm, average pooling (linear query), or linear."""
    return [Variant("proj_method", method, {"method": method}) for method in ("dw_bn", "avg", "linear")]


FAMILIES: dict[str, Callable[[Sequence[StageSpec]], list[Variant]]] = {
    "pos_embed": position_embedding_family,
    "token_embed": token_embedding_family,
    "kv_stride": kv_stride_family,
    "conv_proj": conv_projection_family,
    "proj_method": projection_method_family,
}


def ablation_variants(stages: Sequence[StageSpec], families: Sequence[str] | None = None) -> list[Variant]:
    """The variants of ``families`` (None: all, in the paper's order) for a base with ``stages``.

    An empty ``families`` is a :class:`UsageError`, as an unknown family name is.
    """
    if families is not None and not families:
        raise UsageError(f"no ablation family given; choose from {', '.join(FAMILIES)}, or None for all")
    chosen = list(FAMILIES) if families is None else list(families)
    for name in chosen:
        if name not in FAMILIES:
            close = difflib.get_close_matches(name, FAMILIES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UsageError(f"unknown ablation family {name!r}{hint}; known: {', '.join(FAMILIES)}")
    return [variant for name in dict.fromkeys(chosen) for variant in FAMILIES[name](stages)]
