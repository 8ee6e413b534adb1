"""Where ``cvt eval``, ``cvt predict`` and ``cvt attention`` get their model: a checkpoint or a name.

Accepted checkpoints: a training checkpoint of ``cvt train`` (``last.pt`` / ``best.pt``: the model
name, class count, input size and class names come from its ``config``), this project's
safetensors file or a Hugging Face directory (they describe their architecture), or an official
``.pth`` / bare state dict (the variant whose shapes match, or ``--model NAME``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cvt.cli.common import parse_img_size
from cvt.errors import UsageError


@dataclass
class ModelSource:
    """A model ready for inference (eval mode, CPU) and what its checkpoint says about its data."""

    model: Any  # cvt.models.CvT
    description: str  # for messages: "cvt_tiny from runs/x/best.pt"
    classes: list[str] | None = None  # class names stored with the weights, if any
    train_config: dict[str, Any] = field(default_factory=dict)  # `config` of a training checkpoint


def add_model_source_arguments(parser: argparse.ArgumentParser) -> None:
    """``--checkpoint``, ``--model``, ``--pretrained``, ``--ema``, ``--img-size``."""
    group = parser.add_argument_group("model")
    group.add_argument("--checkpoint", metavar="PATH",
                       help="last.pt/best.pt of cvt train, a cvt .safetensors file, a Hugging Face "
                            "directory, or an official .pth")  # fmt: skip
    group.add_argument("--model", metavar="NAME", help="variant (cvt list), e.g. cvt_13 or cvt_13.msft_in1k")
    group.add_argument("--pretrained", action="store_true", help="download the published weights of --model")
    group.add_argument("--ema", action="store_true", help="use the EMA weights of a training checkpoint")
    group.add_argument("--img-size", type=parse_img_size, metavar="N|H,W",
                       help="input size (default: the model's)")  # fmt: skip


def load_model_source(
    args: argparse.Namespace, random_weights: bool = False, num_classes: int | None = None
) -> ModelSource:
    """Build the model that ``--checkpoint`` / ``--model`` / ``--pretrained`` describe.

    ``random_weights``: ``--model NAME`` alone gives a randomly initialised model (for tools that
    only look at the network, such as ``cvt attention``); otherwise weights are required.
    ``num_classes``: classifier outputs of a model built by name (a checkpoint brings its own).
    """
    from cvt.checkpoint import rebuild_model
    from cvt.models import create_model

    if args.checkpoint is None:
        if not (args.model and (args.pretrained or random_weights)):
            hint = ", or --model NAME alone for random weights" if random_weights else ""
            raise UsageError(
                f"give --checkpoint PATH, or --model NAME --pretrained for the published weights{hint}"
            )
        if args.ema:
            raise UsageError("--ema takes the EMA weights of a training checkpoint: give --checkpoint PATH")
        model = create_model(args.model, pretrained=args.pretrained, num_classes=num_classes)
        names = model.pretrained_cfg.get("label_names")
        weights = "pretrained" if args.pretrained else "random weights"
        return ModelSource(model.eval(), f"{args.model} ({weights})", names)
    if args.pretrained:
        raise UsageError("--pretrained and --checkpoint exclude each other: the weights come from one")
    if num_classes is not None:
        raise UsageError(
            "--num-classes applies to a model built by name; a checkpoint brings its own classifier"
        )
    path = Path(args.checkpoint)
    # official state dicts take --model (default: the one variant whose shapes match); the others
    # describe their model, a training checkpoint its run's config too
    model, info = rebuild_model(path, model_name=args.model, use_ema=args.ema)
    train_config = info.get("train_config") or {}
    name = train_config.get("model") or args.model or model.pretrained_cfg.get("architecture") or "model"
    return ModelSource(model, f"{name} from {path}", model.pretrained_cfg.get("label_names"), train_config)


def label_names(source: ModelSource) -> list[str]:
    """Names of the model's outputs: the checkpoint's classes, ImageNet's for 1000 outputs, else indices."""
    num_classes = source.model.num_classes
    if source.classes and len(source.classes) <= num_classes:
        return with_index_names(source.classes, num_classes)
    if num_classes == 1000:
        from timm.data import ImageNetInfo

        info = ImageNetInfo()  # shipped with timm: no download
        return [info.index_to_description(i) for i in range(num_classes)]
    return with_index_names([], num_classes)


def with_index_names(names: Sequence[str], num_classes: int) -> list[str]:
    """``names`` for the first outputs, then each output's index: a head trained wider than the data
    set's classes (``cvt train --num-classes``) has outputs no class name belongs to. An index that is
    itself a class's name (classes ``1`` and ``3``, four outputs) becomes ``output 3``: every output's
    name stays its own (per-class results are keyed by name)."""
    taken = set(names)
    extra = (str(i) if str(i) not in taken else f"output {i}" for i in range(len(names), num_classes))
    return [*names, *extra]
