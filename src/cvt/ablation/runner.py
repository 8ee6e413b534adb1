"""Build, measure and (optionally) train every variant of the chosen ablation families.

A dry run measures parameters and GMACs only (models built on the ``meta`` device: no weights, a
second per model). A training run gives every variant the same budget through a ``train_fn``
(:func:`cvt.ablation.training.train_variant` by default). A variant's model is the base with the
budget's ``model_args`` and then the variant's overrides, in both: sizes, costs and the check for
variants that build the same model (the baseline appears in several families, measured and trained
once) describe the model that is trained. A variant whose token grids differ from the base model's at
that image size (a linear token embedding where a stage's input side is not a multiple of its
stride) is warned about.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from cvt.ablation.variants import FAMILIES, PaperFigures, Variant, ablation_variants
from cvt.complexity import count_gmacs
from cvt.errors import UsageError
from cvt.models import CvT, count_params, create_model
from cvt.models.cvt import stage_grids


@dataclass(frozen=True)
class AblationRow:
    """One measured variant: size and cost, the paper's figures, and (after training) its results."""

    family: str
    variant: str
    params: int
    gmacs: float
    paper: PaperFigures
    top1: float | None = None  # validation top-1 accuracy, %; None when not trained or diverged
    train_seconds: float | None = None
    diverged_step: int | None = None  # the step whose loss was NaN/Inf when its training diverged
    trained_as: str | None = None  # "family / variant" whose run trained this model, when another's

    @property
    def label(self) -> str:
        """``family / variant``, as :attr:`Variant.label`."""
        return f"{self.family} / {self.variant}"

    def as_dict(self) -> dict[str, Any]:
        """Flat JSON/CSV-ready dict; the paper's figures become ``paper_params_m``, ``paper_gflops``…"""
        row = {k: v for k, v in asdict(self).items() if k != "paper"}
        row.update({f"paper_{k}": v for k, v in asdict(self.paper).items()})
        return row


def build_variant(
    base: str,
    variant: Variant,
    num_classes: int | None = None,
    img_size: int | tuple[int, int] | None = None,
    model_args: Mapping[str, Any] | None = None,
) -> CvT:
    """The model a variant trains: ``create_model(base, **model_args, **variant.overrides)`` at
    ``img_size`` (default: the base's own). ``model_args`` (the budget's) apply to every variant; a
    variant's overrides win over them, as in training."""
    size = {} if img_size is None else {"img_size": img_size}
    return create_model(base, num_classes=num_classes, **{**(model_args or {}), **size, **variant.overrides})


def _grid_text(grids: Sequence[tuple[int, int]]) -> str:
    return "/".join(f"{h}x{w}" for h, w in grids)


FAMILY_ORDER: list[str] = list(FAMILIES)  # the paper's order
ModelKey = tuple[tuple[Any, ...], ...]  # StageSpec.identity() of every stage: equal keys, the same model


def model_key(model: CvT) -> ModelKey:
    """What decides the model a variant builds: its stages' :meth:`~cvt.models.StageSpec.identity`
    (``kv_stride``'s variants under ``method=linear`` build one model)."""
    return tuple(spec.identity() for spec in model.stage_specs)


_BASE = Variant("base", "base")  # no overrides: the base model with the budget's model_args


def _meta_model(
    base: str,
    variant: Variant,
    num_classes: int | None,
    img_size: int | tuple[int, int] | None,
    model_args: Mapping[str, Any] | None,
) -> CvT:
    """:func:`build_variant` on the meta device, in eval mode: shapes and stage specs, no weights."""
    with torch.device("meta"):
        return build_variant(base, variant, num_classes, img_size, model_args).eval()


def _measure(
    base: str,
    families: Sequence[str] | None,
    img_size: int | tuple[int, int] | None,
    num_classes: int | None,
    model_args: Mapping[str, Any] | None,
) -> list[tuple[Variant, AblationRow, ModelKey]]:
    """Each variant with its row and its model's :func:`model_key` (equal keys: the same model)."""
    # the families start from the base with model_args, at img_size
    base_model = _meta_model(base, _BASE, num_classes, img_size, model_args)
    variants = ablation_variants(base_model.stage_specs, families)
    base_grids = stage_grids(base_model.stage_specs, base_model.img_size)
    measured: dict[ModelKey, tuple[int, float]] = {}
    out = []
    for variant in variants:
        model = _meta_model(base, variant, num_classes, img_size, model_args)
        key = model_key(model)
        grids = stage_grids(model.stage_specs, model.img_size)
        if grids != base_grids:
            warnings.warn(
                f"{variant.label}: token grids {_grid_text(grids)} differ from "
                f"the base model's {_grid_text(base_grids)} at img_size "
                f"{model.img_size[0]}x{model.img_size[1]} (a stage's input side is not a multiple of its "
                f"stride): its size, cost and accuracy are not those of the base's grids",
                stacklevel=2,
            )
        if key not in measured:
            measured[key] = (count_params(model), count_gmacs(model, model.img_size, model.in_chans))
        params, gmacs = measured[key]
        out.append((variant, AblationRow(variant.family, variant.name, params, gmacs, variant.paper), key))
    return out


def _variants_by_model(
    base: str,
    img_size: int | tuple[int, int] | None,
    num_classes: int | None,
    model_args: Mapping[str, Any] | None,
) -> dict[ModelKey, list[Variant]]:
    """Every family's variants grouped by the model they build (:func:`model_key`), each group in the
    paper's family order. A variant that ``model_args`` rule out is left out (``_measure`` refuses it
    when it is chosen, before this is asked)."""
    stages = _meta_model(base, _BASE, num_classes, img_size, model_args).stage_specs
    by_model: dict[ModelKey, list[Variant]] = {}
    for variant in ablation_variants(stages, FAMILY_ORDER):
        try:
            model = _meta_model(base, variant, num_classes, img_size, model_args)
        except UsageError:
            continue
        by_model.setdefault(model_key(model), []).append(variant)
    return by_model


def dry_run(
    base: str = "cvt_tiny",
    families: Sequence[str] | None = None,
    img_size: int | tuple[int, int] | None = None,
    num_classes: int | None = None,
    model_args: Mapping[str, Any] | None = None,
) -> list[AblationRow]:
    """One row per variant of ``families`` (None: all) with parameters and GMACs, nothing trained.

    ``model_args`` (model overrides shared by every variant, e.g. ``{"method": "avg"}``) are part of
    each variant's model, as when it is trained; ``num_classes`` None counts the base's default head.
    """
    return [row for _, row, _ in _measure(base, families, img_size, num_classes, model_args)]


TrainFn = Callable[[Variant], dict[str, float]]


def run_ablation(
    base: str,
    families: Sequence[str] | None,
    train_fn: TrainFn,
    num_classes: int,
    img_size: int | tuple[int, int] | None = None,
    on_row: Callable[[AblationRow], None] | None = None,
    model_args: Mapping[str, Any] | None = None,
    before_training: Callable[[list[Variant]], None] | None = None,
    choose_run: Callable[[Variant, list[Variant]], Variant] | None = None,
) -> list[AblationRow]:
    """Train every variant with ``train_fn(variant) -> {"top1", "train_seconds"}``; one row each.

    ``train_fn`` builds ``base`` with ``model_args`` and the variant's overrides and holds the rest
    of the budget (data, epochs, seed), so every variant gets the same one; for a variant whose
    training diverged it returns ``{"diverged_step", "train_seconds"}`` (a row without top-1). Only
    one variant of each distinct model is trained: the first of its chosen variants in the paper's
    family order, so families given in another order keep each model's run folder.

    ``choose_run(first, others)``, given that variant and the model's other variants of every family
    (chosen or not, in the paper's order), may return another one to train as instead: a resumed run
    continues a shared model's run in the folder of a family it leaves out. ``before_training`` gets
    the variants that will train before the first does (it may refuse them); ``on_row`` gets each row
    once its model is trained. A row whose model trained as another variant names it in
    ``trained_as``.
    """
    measured = _measure(base, families, img_size, num_classes, model_args)
    first: dict[ModelKey, Variant] = {}  # each model's first chosen variant in the paper's order
    for variant, _, key in sorted(measured, key=lambda m: FAMILY_ORDER.index(m[0].family)):  # stable
        first.setdefault(key, variant)
    if choose_run is not None:
        every = _variants_by_model(base, img_size, num_classes, model_args)
        first = {key: choose_run(v, [o for o in every[key] if o != v]) for key, v in first.items()}
    training = {key: first[key] for _, _, key in measured}  # in the chosen order
    if before_training is not None:
        before_training(list(training.values()))
    results: dict[ModelKey, dict[str, float]] = {}
    trained = []
    for variant, row, key in measured:
        if key not in results:  # the same model in another family: reuse its result
            results[key] = train_fn(training[key])
        result = results[key]
        if training[key] != variant:
            row = replace(row, trained_as=training[key].label)
        if "diverged_step" in result:
            row = replace(
                row, diverged_step=int(result["diverged_step"]), train_seconds=float(result["train_seconds"])
            )
        else:
            row = replace(row, top1=float(result["top1"]), train_seconds=float(result["train_seconds"]))
        trained.append(row)
        if on_row is not None:
            on_row(row)
    return trained
