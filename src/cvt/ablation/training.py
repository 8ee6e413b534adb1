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
from typing import Any

from cvt.ablation.report import top1_text, write_report
from cvt.ablation.runner import AblationRow, run_ablation
from cvt.ablation.variants import Variant
from cvt.engine.config import TrainConfig
from cvt.engine.rundir import read_recorded_config, run_dir_content
from cvt.errors import DataError, UsageError
from cvt.fileio import refuse_existing

# The default budget: 11 distinct cvt_tiny models on the digits (1437 training images) must train in
# under 15 minutes on a 2-core CPU: 3 epochs each, with the warm-up shortened to a quarter epoch.
# docs/ablations.md has the measured run (its wall time and the baseline's top-1).
ABLATION_DEFAULTS = TrainConfig(epochs=3, warmup_epochs=0.25)


def variant_slug(variant: Variant) -> str:
    """A folder name for a variant: ``kv_stride-stride_1``."""
    return f"{variant.family}-" + re.sub(r"[^a-z0-9]+", "_", variant.name.lower()).strip("_")


def variant_config(budget: TrainConfig, variant: Variant, run_dir: Path) -> TrainConfig:
    """``budget`` with the variant's model overrides (lists, so the run's config.yaml can hold them)."""
    overrides = {k: list(v) if isinstance(v, tuple) else v for k, v in variant.overrides.items()}
    return replace(
        budget, model_args={**budget.model_args, **overrides}, output=str(run_dir), name=run_dir.name
    )


def check_data(budget: TrainConfig) -> None:
    """:class:`DataError` when the training set cannot be read or cannot fill one batch of the budget."""
    from cvt.data import build_dataset

    train_set = build_dataset(budget.dataset, budget.data_dir, "train", download=budget.download)
    images = len(train_set)
    if budget.train_subset is not None:
        images = min(images, budget.train_subset)
    steps = images // (budget.batch_size * budget.accum_steps)
    if steps == 0:
        raise DataError(
            f"the {budget.dataset} training set has {images} image(s), fewer than one batch of "
            f"{budget.batch_size * budget.accum_steps}: lower --batch-size or use more data"
        )


def class_count(budget: TrainConfig) -> int:
    """The class count the variants' heads get, found without reading an image: ``num_classes``, the
    fixed count of digits and CIFAR, or the class folders of an ImageFolder's ``train/`` (as training
    finds them). When those cannot be listed (a dry run without the data), the base model's default,
    with a warning that says so."""
    import torch

    from cvt.data.datasets import FIXED_CLASS_COUNTS, check_dataset_name, image_folder_classes
    from cvt.models import create_model

    if budget.num_classes:
        return budget.num_classes
    check_dataset_name(budget.dataset)
    if budget.dataset in FIXED_CLASS_COUNTS:
        return FIXED_CLASS_COUNTS[budget.dataset]
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


def check_variant_dirs(run_dirs: Sequence[Path], allow_content: bool) -> None:
    """Refuse (touching nothing) variant run folders that already hold something, unless
    ``allow_content`` (``--overwrite`` retrains them, ``--resume auto`` continues them).

    Checked for every variant before the first trains, so an ablation never stops midway at a
    folder after retraining the variants before it.
    """
    not_dirs = [str(d) for d in run_dirs if d.exists() and not d.is_dir()]
    if not_dirs:
        raise UsageError(
            f"{', '.join(not_dirs)}: not a folder, needed for a variant's run; choose another --output"
        )
    used = [str(d) for d in run_dirs if run_dir_content(d)]
    if used and not allow_content:
        raise UsageError(
            f"variant run folder(s) {', '.join(used)} already have content: pass --resume auto to continue "
            f"an interrupted ablation, --overwrite to retrain every variant over them, or choose another "
            f"--output"
        )


# options that change how a variant's run goes, not what it learns: they may differ on --resume
RESUME_MAY_CHANGE = frozenset(
    {"output", "name", "device", "workers", "data_dir", "download", "eval_batch_size", "save_every_steps",
     "compile", "grad_checkpointing"}
)  # fmt: skip


def trained_img_size(budget: TrainConfig) -> int:
    """The input side the variants train at, as their ``config.yaml`` records it (``img_size``, or the
    base model's own)."""
    import torch

    from cvt.engine.config import run_model_kwargs
    from cvt.models import create_model

    with torch.device("meta"):
        return create_model(budget.model, **run_model_kwargs(budget.model_args, budget.img_size)).img_size[0]


def check_resumable(configs: Sequence[TrainConfig], num_classes: int, img_size: int) -> None:
    """For ``--resume auto``: refuse (before any variant trains) a variant folder with content that is
    not a run of that variant with the ablation's budget (:func:`resume_problem`): a finished variant
    is kept and an interrupted one continues, so all must share the options the report names."""
    for config in configs:
        problem = resume_problem(config, num_classes, img_size)
        if problem is not None:
            raise UsageError(f"{problem}, or pass --overwrite to retrain every variant")


def resume_problem(config: TrainConfig, num_classes: int, img_size: int) -> str | None:
    """Why the run in ``config.run_dir`` cannot continue as ``config`` (no readable ``config.yaml``,
    options it was trained with that differ), or None: an empty folder, or a run of that variant with
    that budget. ``num_classes`` and ``img_size`` are the resolved ones runs record (the options may
    be unset)."""
    import yaml

    if not run_dir_content(config.run_dir):
        return None
    recorded = read_recorded_config(config.run_dir)
    if recorded is None:
        return (
            f"variant run folder {config.run_dir} holds no variant's run (no readable config.yaml) to "
            f"resume: move its files away"
        )
    expected = yaml.safe_load(yaml.safe_dump(config.recorded()))  # as config.yaml holds it
    expected.update(num_classes=num_classes, img_size=img_size)
    differ = [
        f"{key} {recorded[key]!r} (now {value!r})"
        for key, value in expected.items()
        if key not in RESUME_MAY_CHANGE and key in recorded and recorded[key] != value
    ]
    if not differ:
        return None
    return (
        f"variant run folder {config.run_dir} was trained with {'; '.join(differ)}: resume with the "
        f"options the ablation was started with"
    )


def finished_result(config: TrainConfig) -> dict[str, float] | None:
    """The result of a variant whose run finished (its ``summary.json``), as :func:`train_variant`
    gives it; None when it has not finished (or the summary cannot be read: resuming writes it again)."""
    import json

    try:
        return _variant_result(json.loads((config.run_dir / "summary.json").read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _variant_result(summary: dict[str, Any]) -> dict[str, float]:
    """A variant's row figures from its run's summary: final top-1 (%) and training seconds."""
    return {"top1": float(summary["final_top1"]), "train_seconds": float(summary["train_seconds"])}


def train_variant(config: TrainConfig) -> dict[str, float]:
    """Train one variant with the engine; its final validation top-1 (%) and training seconds.

    A variant whose loss becomes NaN/Inf diverged: a result of the ablation, not an error of the run.
    It gives ``diverged_step`` (the optimizer step whose loss was not finite) instead of a top-1.
    """
    from cvt.engine import NonFiniteLossError, train
    from cvt.engine.resume import resume_checkpoint

    start = time.perf_counter()
    try:
        summary = train(config, resume_checkpoint(config))  # with resume auto: its last.pt, if any
    except NonFiniteLossError as err:
        return {"diverged_step": err.step, "train_seconds": time.perf_counter() - start}
    return _variant_result(summary)


REPORT_FILES: tuple[str, ...] = ("ablation.md", "ablation.csv", "ablation.png")


def ablation_dir(budget: TrainConfig) -> Path:
    """The ablation's folder: ``budget.output`` or ``runs/ablate-<model>-<dataset>``."""
    return Path(budget.output) if budget.output else Path("runs") / f"ablate-{budget.model}-{budget.dataset}"


def train_ablation(
    budget: TrainConfig, families: Sequence[str] | None = None, verbose: bool = True
) -> tuple[list[AblationRow], list[Path]]:
    """Train every variant of ``families`` with ``budget``; the rows and the report files written.

    Variant runs go to ``<ablation dir>/<family>-<variant>/``. Refuses to replace an existing
    report or variant run folder unless ``budget.overwrite`` (``budget.resume`` ``auto``: finished
    variants are kept, an interrupted one continues), and starting weights (``finetune``,
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
    replace_report = budget.overwrite or bool(budget.resume)  # resume: the report is written again
    refuse_existing([out_dir / name for name in REPORT_FILES], replace_report)
    check_data(budget)
    num_classes = class_count(budget)  # the heads the variants train (--num-classes, else the data's)
    # the input side the runs record, which a resumed run's folders are checked against
    img_size = trained_img_size(budget) if budget.resume else 0

    def config_of(variant: Variant) -> TrainConfig:
        return variant_config(budget, variant, out_dir / variant_slug(variant))

    def train_fn(variant: Variant) -> dict[str, float]:
        config = config_of(variant)
        return (budget.resume and finished_result(config)) or train_variant(config)

    def announce(row: AblationRow) -> None:
        if not verbose:
            return
        result = f"top-1 {row.top1:.2f}%" if row.diverged_step is None else top1_text(row)
        shared = "" if row.trained_as is None else f" (the same model as {row.trained_as}: one run)"
        print(f"ablation {row.label}: {result} in {row.train_seconds:.0f} s{shared}")

    def choose_run(first: Variant, others: list[Variant]) -> Variant:
        """With --resume auto, a model whose own folder is empty continues the run that another variant
        of it trained (in a family left out this time), if that run has this budget."""
        if run_dir_content(config_of(first).run_dir):
            return first  # its own run, or something check_dirs refuses

        def continues(variant: Variant) -> bool:
            config = config_of(variant)
            return (
                bool(run_dir_content(config.run_dir))
                and resume_problem(config, num_classes, img_size) is None
            )

        return next((v for v in others if continues(v)), first)

    def check_dirs(variants: list[Variant]) -> None:
        configs = [config_of(v) for v in variants]
        check_variant_dirs([c.run_dir for c in configs], budget.overwrite or bool(budget.resume))
        if budget.resume:  # folders with content may hold the variants' runs, which continue
            check_resumable(configs, num_classes, img_size)
        for name in REPORT_FILES:  # replaced or continued runs: no report of the earlier ones survives
            (out_dir / name).unlink(missing_ok=True)

    rows = run_ablation(
        budget.model,
        families,
        train_fn,
        num_classes,
        budget.img_size,
        on_row=announce,
        model_args=budget.model_args,
        before_training=check_dirs,
        choose_run=choose_run if budget.resume else None,
    )
    diverged = [r.label for r in rows if r.diverged_step is not None]
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
