"""Build, measure and (optionally) train every variant of the chosen ablation families.

A dry run measures parameters and GMACs only (models built on the ``meta`` device: no weights, a
second per model). A training run gives every variant the same budget through a ``train_fn``
(:func:`cvt.ablation.training.train_variant` by default). Variants that build the same model (the
baseline appears in several families) are measured and trained once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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
    base: str, variant: Variant, num_classes: int | None = None, img_size: int | tuple[int, int] | None = None
) -> CvT:
    """``create_model(base, **variant.overrides)`` at ``img_size`` (default: the base's own)."""
    size = {} if img_size is None else {"img_size": img_size}
    return create_model(base, num_classes=num_classes, **size, **variant.overrides)


def _base_stages(base: str) -> tuple[StageSpec, ...]:
    with torch.device("meta"):
        return create_model(base).stage_specs


def dry_run(
    base: str = "cvt_tiny",
    families: Sequence[str] | None = None,
    img_size: int | tuple[int, int] | None = None,
    num_classes: int | None = None,
) -> list[AblationRow]:
    """One row per variant of ``families`` (default all) with parameters and GMACs, nothing trained."""
    variants = ablation_variants(_base_stages(base), families)
    measured: dict[tuple[StageSpec, ...], tuple[int, float]] = {}
    rows = []
    for variant in variants:
        with torch.device("meta"):  # shapes only: counting needs no weights
            model = build_variant(base, variant, num_classes, img_size).eval()
        if model.stage_specs not in measured:
            gmacs = count_gmacs(model, model.img_size, model.in_chans)
            measured[model.stage_specs] = (count_params(model), gmacs)
        params, gmacs = measured[model.stage_specs]
        rows.append(AblationRow(variant.family, variant.name, params, gmacs, variant.paper))
    return rows


TrainFn = Callable[[Variant], dict[str, float]]


def run_ablation(
    base: str,
    families: Sequence[str] | None,
    train_fn: TrainFn,
    num_classes: int,
    img_size: int | tuple[int, int] | None = None,
    on_row: Callable[[AblationRow], None] | None = None,
) -> list[AblationRow]:
    """Train every variant with ``train_fn(variant) -> {"top1", "train_seconds"}``; one row each.

    ``train_fn`` builds ``base`` with the variant's model overrides and holds the budget (data,
    epochs, seed), so every variant gets the same one. ``on_row`` is called after each variant.
    """
    rows = dry_run(base, families, img_size, num_classes)
    variants = ablation_variants(_base_stages(base), families)
    results: dict[tuple[StageSpec, ...], dict[str, float]] = {}
    trained = []
    for row, variant in zip(rows, variants, strict=True):
        with torch.device("meta"):
            specs = build_variant(base, variant, num_classes, img_size).stage_specs
        if specs not in results:  # the same model in another family: reuse its result
            results[specs] = train_fn(variant)
        result = results[specs]
        row = replace(row, top1=float(result["top1"]), train_seconds=float(result["train_seconds"]))
        trained.append(row)
        if on_row is not None:
            on_row(row)
    return trained
