"""Build, measure and (optionally) train every variant of the chosen ablation families.

A dry run measures parameters and GMACs only (models built on the ``meta`` device: no weights, a
second per model). A training run gives every variant the same budget through a ``train_fn``
(:func:`cvt.ablation.training.train_variant` by default). A variant's model is the base with the
budget's ``model_args`` and then the variant's overrides, in both: sizes, costs and the check for
variants that build the same model (the baseline appears in several families, measured and trained
once) describe the model that is trained.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from cvt.ablation.variants import PaperFigures, Variant, ablation_variants
from cvt.complexity import count_gmacs
from cvt.models import CvT, StageSpec, count_params, create_model


@dataclass(frozen=True)
class AblationRow:
    """One measured variant: size and cost, the paper's figures, and (after training) its results."""

    family: str
    variant: str
    params: int
    gmacs: float
    paper: PaperFigures
    top1: float | None = None  # validation top-1 accuracy, %
    train_seconds: float | None = None

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


def _base_stages(base: str, model_args: Mapping[str, Any] | None) -> tuple[StageSpec, ...]:
    """The stages the families start from: ``base`` with the budget's ``model_args``."""
    with torch.device("meta"):
        return create_model(base, **(model_args or {})).stage_specs


def _measure(
    base: str,
    families: Sequence[str] | None,
    img_size: int | tuple[int, int] | None,
    num_classes: int | None,
    model_args: Mapping[str, Any] | None,
) -> list[tuple[Variant, AblationRow, tuple[StageSpec, ...]]]:
    """Each variant with its row and its model's stages (equal stages: the same model)."""
    variants = ablation_variants(_base_stages(base, model_args), families)
    measured: dict[tuple[StageSpec, ...], tuple[int, float]] = {}
    out = []
    for variant in variants:
        with torch.device("meta"):  # shapes only: counting needs no weights
            model = build_variant(base, variant, num_classes, img_size, model_args).eval()
        if model.stage_specs not in measured:
            gmacs = count_gmacs(model, model.img_size, model.in_chans)
            measured[model.stage_specs] = (count_params(model), gmacs)
        params, gmacs = measured[model.stage_specs]
        out.append(
            (
                variant,
                AblationRow(variant.family, variant.name, params, gmacs, variant.paper),
                model.stage_specs,
            )
        )
    return out


def dry_run(
    base: str = "cvt_tiny",
    families: Sequence[str] | None = None,
    img_size: int | tuple[int, int] | None = None,
    num_classes: int | None = None,
    model_args: Mapping[str, Any] | None = None,
) -> list[AblationRow]:
    """One row per variant of ``families`` (default all) with parameters and GMACs, nothing trained.

    ``model_args`` (model overrides shared by every variant, e.g. ``{"method": "avg"}``) are part of
    each variant's model, as when it is trained.
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
) -> list[AblationRow]:
    """Train every variant with ``train_fn(variant) -> {"top1", "train_seconds"}``; one row each.

    ``train_fn`` builds ``base`` with ``model_args`` and the variant's overrides and holds the rest
    of the budget (data, epochs, seed), so every variant gets the same one. Only the first variant of
    each distinct model is trained; ``before_training`` gets those variants before the first trains
    (it may refuse them), ``on_row`` each row once its variant is trained.
    """
    measured = _measure(base, families, img_size, num_classes, model_args)
    first: dict[tuple[StageSpec, ...], Variant] = {}
    for variant, _, specs in measured:
        first.setdefault(specs, variant)
    if before_training is not None:
        before_training(list(first.values()))
    results: dict[tuple[StageSpec, ...], dict[str, float]] = {}
    trained = []
    for _, row, specs in measured:
        if specs not in results:  # the same model in another family: reuse its result
            results[specs] = train_fn(first[specs])
        result = results[specs]
        row = replace(row, top1=float(result["top1"]), train_seconds=float(result["train_seconds"]))
        trained.append(row)
        if on_row is not None:
            on_row(row)
    return trained
