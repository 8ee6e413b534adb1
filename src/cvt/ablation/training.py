"""Training the ablation variants: one ``cvt train`` run per distinct model, all with the same budget.

The budget is a :class:`~cvt.engine.config.TrainConfig` (data, epochs, batch, lr, seed); a variant
only adds its model overrides to ``model_args`` and gets its own run folder under the ablation's.
"""

from __future__ import annotations

import re
import time
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from cvt.ablation.report import top1_text, write_report
from cvt.ablation.runner import AblationRow, run_ablation
from cvt.ablation.variants import Variant
from cvt.engine.config import TrainConfig
from cvt.errors import DataError, UsageError

# The default budget: 11 distinct cvt_tiny models on the digits (1437 training images) must train in
# under 15 minutes on a 2-core CPU: 3 epochs each (8.9 min measured, 93.6% top-1 for the baseline),
# with the warm-up shortened to a quarter epoch. docs/ablations.md has the measured run.
ABLATION_DEFAULTS = TrainConfig(epochs=3, warmup_epochs=0.25)

# data sets whose classes are fixed: their count needs none of their files (a dry run without the data)
FIXED_CLASS_COUNTS: dict[str, int] = {"digits": 10, "cifar10": 10, "cifar100": 100}


def variant_slug(variant: Variant) -> str:
    """A folder name for a variant: ``kv_stride-stride_1``."""
    return f"{variant.family}-" + re.sub(r"[^a-z0-9]+", "_", variant.name.lower()).strip("_")


def variant_config(budget: TrainConfig, variant: Variant, run_dir: Path) -> TrainConfig:
    """``budget`` with the variant's model overrides (lists, so the run's config.yaml can hold them)."""
    overrides = {k: list(v) if isinstance(v, tuple) else v for k, v in variant.overrides.items()}
    return replace(
        budget, model_args={**budget.model_args, **overrides}, output=str(run_dir), name=run_dir.name
    )


def check_data(budget: TrainConfig) -> int:
    """The training set's class count; :class:`DataError` when it cannot fill one batch of the budget."""
    from cvt.data import build_dataset

    train_set = build_dataset(budget.dataset, budget.data_dir, "train")
    images = len(train_set)
    if budget.train_subset is not None:
        images = min(images, budget.train_subset)
    steps = images // (budget.batch_size * budget.accum_steps)
    if steps == 0:
        raise DataError(
            f"the {budget.dataset} training set has {images} image(s), fewer than one batch of "
            f"{budget.batch_size * budget.accum_steps}: lower --batch-size or use more data"
        )
    return len(train_set.classes)


def class_count(budget: TrainConfig) -> int:
    """The class count the variants' heads get, found without reading an image: ``num_classes``, the
    fixed count of digits and CIFAR, or the class folders of an ImageFolder's ``train/`` (as training
    finds them). When those cannot be listed (a dry run without the data), the base model's default,
    with a warning that says so."""
    import torch

    from cvt.data.datasets import DATASETS, image_folder_classes
    from cvt.models import create_model

    if budget.num_classes:
        return budget.num_classes
    if budget.dataset in FIXED_CLASS_COUNTS:
        return FIXED_CLASS_COUNTS[budget.dataset]
    if budget.dataset != "imagefolder":
        raise UsageError(f"dataset must be one of {', '.join(DATASETS)}, got {budget.dataset!r}")
    train_dir = Path(budget.data_dir) / "train"
    try:
        found = image_folder_classes(train_dir)
    except DataError:  # an unreadable folder: as good as none for counting
        found = None
    if found:
        return len(found)
    with torch.device("meta"):
        default = create_model(budget.model).num_classes
    warnings.warn(
        f"found no class folders in {train_dir}: counted {budget.model} with its default head of {default} "
        f"classes; pass --num-classes to count another",
        stacklevel=2,
    )
    return default


def check_variant_dirs(run_dirs: Sequence[Path], overwrite: bool) -> None:
    """Refuse (touching nothing) variant run folders that already hold something, unless ``overwrite``.

    Checked for every variant before the first trains, so an ablation never stops midway at a
    folder after retraining the variants before it.
    """
    not_dirs = [str(d) for d in run_dirs if d.exists() and not d.is_dir()]
    if not_dirs:
        raise UsageError(
            f"{', '.join(not_dirs)}: not a folder, needed for a variant's run; choose another --output"
        )
    used = [str(d) for d in run_dirs if d.is_dir() and any(d.iterdir())]
    if used and not overwrite:
        raise UsageError(
            f"variant run folder(s) {', '.join(used)} already have content: pass --overwrite to retrain "
            f"every variant over them, or choose another --output"
        )


def train_variant(config: TrainConfig) -> dict[str, float]:
    """Train one variant with the engine; its final validation top-1 (%) and training seconds.

    A variant whose loss becomes NaN/Inf diverged: a result of the ablation, not an error of the run.
    It gives ``diverged_step`` (the optimizer step whose loss was not finite) instead of a top-1.
    """
    from cvt.engine import NonFiniteLossError, train

    start = time.perf_counter()
    try:
        summary = train(config)
    except NonFiniteLossError as err:
        return {"diverged_step": err.step, "train_seconds": time.perf_counter() - start}
    return {"top1": float(summary["final_top1"]), "train_seconds": float(summary["train_seconds"])}


REPORT_FILES: tuple[str, ...] = ("ablation.md", "ablation.csv", "ablation.png")


def ablation_dir(budget: TrainConfig) -> Path:
    """The ablation's folder: ``budget.output`` or ``runs/ablate-<model>-<dataset>``."""
    return Path(budget.output) if budget.output else Path("runs") / f"ablate-{budget.model}-{budget.dataset}"


def train_ablation(
    budget: TrainConfig, families: Sequence[str] | None = None, verbose: bool = True
) -> tuple[list[AblationRow], list[Path]]:
    """Train every variant of ``families`` with ``budget``; the rows and the report files written.

    Variant runs go to ``<ablation dir>/<family>-<variant>/``. Refuses to replace an existing
    report or variant run folder unless ``budget.overwrite``, and starting weights (``finetune``,
    ``pretrained``); checks the data can fill a batch, the family names (in :func:`run_ablation`'s dry
    run) and every variant's folder before training anything, then removes an earlier report. A
    variant that diverges gets a row saying so (and a warning); the others still train.
    """
    if budget.finetune or budget.pretrained:
        raise UsageError(
            "finetune and pretrained do not apply to an ablation: its variants change the architecture "
            "(e.g. position embeddings), so no one set of weights loads into all of them"
        )
    out_dir = ablation_dir(budget)
    existing = [str(out_dir / name) for name in REPORT_FILES if (out_dir / name).exists()]
    if existing and not budget.overwrite:
        raise UsageError(
            f"refusing to overwrite {', '.join(existing)}: choose another --output or --overwrite"
        )
    num_classes = check_data(budget)

    def train_fn(variant: Variant) -> dict[str, float]:
        return train_variant(variant_config(budget, variant, out_dir / variant_slug(variant)))

    def announce(row: AblationRow) -> None:
        if not verbose:
            return
        result = f"top-1 {row.top1:.2f}%" if row.diverged_step is None else top1_text(row)
        print(f"ablation {row.family} / {row.variant}: {result} in {row.train_seconds:.0f} s")

    def check_dirs(variants: list[Variant]) -> None:
        check_variant_dirs([out_dir / variant_slug(v) for v in variants], budget.overwrite)
        for name in REPORT_FILES:  # an --overwrite run: no report of the runs it replaces survives it
            (out_dir / name).unlink(missing_ok=True)

    rows = run_ablation(
        budget.model,
        families,
        train_fn,
        budget.num_classes or num_classes,
        budget.img_size,
        on_row=announce,
        model_args=budget.model_args,
        before_training=check_dirs,
    )
    diverged = [f"{r.family} / {r.variant}" for r in rows if r.diverged_step is not None]
    if diverged:
        warnings.warn(
            f"{len(diverged)} variant(s) diverged (non-finite loss): {', '.join(diverged)}; their rows "
            f"have no top-1 (lower --lr or set --clip-grad to train them)",
            stacklevel=2,
        )
    title = (
        f"{budget.model} on {budget.dataset}: {budget.epochs} epoch(s) per variant, "
        f"batch {budget.batch_size}, lr {budget.lr:g}, seed {budget.seed}"
    )
    return rows, write_report(rows, out_dir, title)
