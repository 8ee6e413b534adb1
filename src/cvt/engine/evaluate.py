"""The evaluation loop and its metrics: top-1/top-k accuracy, mean loss, per-class accuracy, confusion;
and the checks that a model's classes fit the data set it is evaluated on.

Used by ``cvt eval`` and by the training engine for validation. Top-5 becomes top-k with
k = the class count when a data set has fewer than 5 classes.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cvt.data.datasets import FIXED_CLASS_COUNTS, first_difference, image_folder_classes
from cvt.errors import CheckpointError, DataError, UsageError, first_names
from cvt.figures import new_figure, save_figure
from cvt.models.call_context import evaluating


def topk_of(num_classes: int) -> int:
    """The k of the top-k accuracy (the ``top5`` column): 5, or every class when there are fewer."""
    return min(5, num_classes)


@dataclass
class EvalResult:
    """Metrics of one pass over a data set (accuracies in percent)."""

    top1: float
    top5: float  # top-k accuracy with k = min(5, num_classes), see `topk`
    loss: float  # mean cross-entropy per sample
    per_class_acc: list[float]  # percent per true class; NaN for a class with no samples
    confusion: torch.Tensor  # (num_classes, num_classes) int64: rows = true class, columns = predicted
    num_samples: int
    topk: int = 5
    # per true class: samples whose logits were not all finite (NaN/Inf); they count as wrong and, having
    # no predicted class, are in no cell of `confusion`
    non_finite: list[int] = field(default_factory=list)

    @property
    def class_counts(self) -> list[int]:
        """Samples per true class: the rows of ``confusion`` plus the samples with non-finite logits."""
        counts = self.confusion.sum(dim=1).tolist()
        return [c + n for c, n in zip(counts, self.non_finite or [0] * len(counts), strict=True)]

    def as_dict(self, classes: Sequence[str] | None = None) -> dict[str, Any]:
        """JSON-ready metrics; per-class accuracies keyed by class name (None for absent classes) and
        a non-finite loss (NaN logits) as None."""
        names = list(classes) if classes is not None else [str(i) for i in range(len(self.per_class_acc))]
        return {
            "top1": self.top1,
            "top5": self.top5,
            "topk": self.topk,
            "loss": self.loss if math.isfinite(self.loss) else None,
            "num_samples": self.num_samples,
            "non_finite_logits": sum(self.non_finite),
            "per_class_acc": {
                n: (None if math.isnan(a) else a) for n, a in zip(names, self.per_class_acc, strict=True)
            },
            "confusion": self.confusion.tolist(),
        }


def image_folder_eval_classes(
    folder: Path, model_classes: Sequence[str] | None, model_name: str
) -> list[str] | None:
    """The class list to read the ImageFolder split ``folder`` with, to evaluate a model that knows the
    classes ``model_classes`` (``model_name`` in messages): the model's when it knows every class folder
    (indices agree even if the split lacks a class); None, the folder read as it is, when the model knows
    no names or none of the folders (:func:`check_eval_classes` compares them). :class:`DataError` when
    the folder has some of the model's classes and others: its indices would not be the model's."""
    if not model_classes:
        return None
    found = image_folder_classes(folder) or []
    unknown = sorted(set(found) - set(model_classes))
    if not unknown:
        return list(model_classes)
    if len(unknown) < len(found):
        raise DataError(
            f"image folder {folder} has class folder(s) {first_names(unknown)} that {model_name} "
            f"does not know (its classes: {first_names(list(model_classes))}); evaluate it on the "
            f"classes it knows: move those folders out"
        )
    return None


def check_eval_classes(
    num_classes: int,
    dataset: str,
    dataset_classes: Sequence[str],
    *,
    model_name: str,
    model_classes: Sequence[str] | None,
    trained_on: str | None,
    finetune_command: str,
) -> None:
    """Check that a model with ``num_classes`` outputs (``model_name`` in messages) can be scored on the
    data set ``dataset`` of ``dataset_classes``.

    :class:`CheckpointError` for another class count, suggesting ``finetune_command`` (a training with a
    new head), unless the head is wider than the classes of the data set it was ``trained_on``
    (``cvt train --num-classes``). A warning when the model's class names ``model_classes`` differ from
    the data set's: the indices are compared as they are.
    """
    # a head trained wider than its data set's classes is scored on those classes; an image folder's
    # classes are its folders, so another folder of fewer classes is another data set
    fixed = dataset in FIXED_CLASS_COUNTS
    own_classes = fixed or not model_classes or list(dataset_classes) == list(model_classes)
    trained_wider = dataset == trained_on and len(dataset_classes) < num_classes and own_classes
    if len(dataset_classes) != num_classes and not trained_wider:
        raise CheckpointError(
            f"{model_name} has {num_classes} classes but {dataset} has {len(dataset_classes)}: evaluate "
            f"on the data set it was trained on, or fine-tune it first with a new head ({finetune_command})"
        )
    if model_classes and list(model_classes) != list(dataset_classes):
        _, theirs, ours = first_difference(model_classes, dataset_classes)
        warnings.warn(
            f"the checkpoint's class names differ from {dataset}'s (e.g. {theirs!r} vs {ours!r}); indices "
            f"are compared as they are",
            stacklevel=2,
        )


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device | str,
    amp_dtype: torch.dtype | None = None,
    num_classes: int | None = None,
    progress: bool = False,
) -> EvalResult:
    """Run ``model`` in eval mode over ``loader`` (batches of images and class indices) and score it.

    ``amp_dtype`` (e.g. ``torch.bfloat16``) runs the forward pass under autocast; the loss and
    metrics are computed in float32. ``num_classes`` defaults to the width of the model's logits.
    ``progress`` shows a progress bar on stderr. The model's train/eval mode is restored afterwards.
    A sample whose logits are not all finite (NaN, Inf) counts as wrong for top-1 and top-k (topk would
    rank NaN first) and makes the mean loss NaN; ``non_finite`` counts them per class.
    """
    if progress:
        from tqdm import tqdm

        loader = tqdm(loader, desc="eval", unit="batch", leave=False, file=sys.stderr)
    device = torch.device(device)
    confusion: torch.Tensor | None = None
    non_finite = torch.zeros(0, dtype=torch.int64)
    loss_sum, topk_correct, k = 0.0, 0, 5
    with evaluating(model):
        for images, targets in loader:
            targets = torch.as_tensor(targets)
            if targets.numel() == 0:  # every image of the batch was unreadable (cvt.data.collate_readable)
                continue
            images = images.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                logits = model(images)
            logits = logits.float()  # (B, C)
            if confusion is None:
                num_classes = num_classes or logits.shape[1]
                if logits.shape[1] != num_classes:
                    raise UsageError(
                        f"the model gives {logits.shape[1]} logits per image, expected {num_classes} classes"
                    )
                k = topk_of(num_classes)
                confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
                non_finite = torch.zeros(num_classes, dtype=torch.int64, device=device)
            if targets.min() < 0 or targets.max() >= num_classes:
                low, high = int(targets.min()), int(targets.max())
                raise DataError(f"class indices must be in [0, {num_classes}), found {low}..{high}")
            loss_sum += F.cross_entropy(logits, targets, reduction="sum").item()
            finite = torch.isfinite(logits).all(dim=1)  # (B,): a row with NaN/Inf predicts nothing
            topk_pred = logits.topk(k, dim=1).indices  # (B, k), best first
            topk_correct += int(((topk_pred == targets[:, None]).any(dim=1) & finite).sum())
            # one bincount over (true, predicted) pairs fills the whole confusion matrix
            pairs = (targets * num_classes + topk_pred[:, 0])[finite]
            confusion += torch.bincount(pairs, minlength=num_classes * num_classes).view(num_classes, -1)
            non_finite += torch.bincount(targets[~finite], minlength=num_classes)
    if confusion is None:
        raise DataError("the evaluation data set yielded no images")
    confusion, non_finite = confusion.cpu(), non_finite.cpu()
    per_class_total = confusion.sum(dim=1) + non_finite
    n = int(per_class_total.sum())
    # in float64, as top-1 (3 of 35 is 8.571428571428571, not float32's 8.571428298950195); NaN where a
    # class has no samples
    per_class_acc = (100.0 * confusion.diag().double() / per_class_total).tolist()
    return EvalResult(
        top1=100.0 * int(confusion.diag().sum()) / n,
        top5=100.0 * topk_correct / n,
        loss=loss_sum / n,
        per_class_acc=per_class_acc,
        confusion=confusion,
        num_samples=n,
        topk=k,
        non_finite=non_finite.tolist(),
    )


def save_confusion_png(
    confusion: torch.Tensor, classes: Sequence[str], path: str | Path, title: str = ""
) -> Path:
    """Write :func:`confusion_figure` as a PNG to ``path``; returns it."""
    path = Path(path)
    save_figure(confusion_figure(confusion, classes, title), path)
    return path


def confusion_figure(confusion: torch.Tensor, classes: Sequence[str], title: str = "") -> Any:
    """The confusion matrix ``(C, C)`` as a matplotlib figure, normalized per true class (counts written
    in each cell when there are at most 20 classes)."""
    counts = confusion.double()
    rates = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)  # (C, C), rows sum to 1
    num = len(classes)
    side = min(max(4.0, 0.45 * num + 2.0), 24.0)
    fig = new_figure(figsize=(side, side))
    ax = fig.subplots()
    image = ax.imshow(rates.numpy(), cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if num <= 50:
        ax.set_xticks(range(num), labels=list(classes), rotation=90)
        ax.set_yticks(range(num), labels=list(classes))
    if num <= 20:
        for i in range(num):
            for j in range(num):
                ax.text(j, i, int(counts[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if rates[i, j] > 0.5 else "black")  # fmt: skip
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title or "confusion matrix")
    fig.tight_layout()
    return fig
