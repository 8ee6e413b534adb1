"""Build a model from an official CvT experiment YAML (``experiments/imagenet/cvt/*.yaml``).

Read: ``MODEL.SPEC`` (the per-stage lists, via :func:`cvt.models.official_spec.stages_from_official_spec`,
and ``INIT``), ``MODEL.NUM_CLASSES`` (official default 1000), ``TRAIN.IMAGE_SIZE`` (the size the
model was trained at: sizes position embeddings), ``TEST.IMAGE_SIZE`` / ``TEST.CENTER_CROP`` and
``INPUT.MEAN`` / ``INPUT.STD`` (the inference preprocessing). Sizes are ``[W, H]``, as the official
config writes them. Everything else (solver, data) is training recipe, not architecture, and is ignored.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cvt.checkpoint.native import inference_cfg
from cvt.errors import UsageError
from cvt.fileio import read_yaml_mapping
from cvt.models.cvt import CvT, is_whole_number
from cvt.models.official_spec import stages_from_official_spec

OFFICIAL_NUM_CLASSES = 1000  # the official config's default MODEL.NUM_CLASSES
OFFICIAL_IMAGE_SIZE = (224, 224)


def _image_size(section: Any) -> tuple[int, int] | None:
    """``(H, W)`` from a section's ``IMAGE_SIZE``, which the official config writes as ``[W, H]``
    (``# width * height``; its evaluation resizes to ``(IMAGE_SIZE[1], IMAGE_SIZE[0])``)."""
    size = section.get("IMAGE_SIZE") if isinstance(section, Mapping) else None
    if size is None:
        return None
    sizes = list(size) if isinstance(size, (list, tuple)) else [size, size]
    if len(sizes) != 2 or not all(is_whole_number(v) for v in sizes):
        raise UsageError(f"IMAGE_SIZE must be N or [W, H] in whole numbers, got {size!r}")
    width, height = sizes
    return height, width


def create_model_from_official_yaml(
    path_or_mapping: str | Path | Mapping[str, Any], num_classes: int | None = None
) -> CvT:
    """A randomly initialized :class:`CvT` described by an official experiment YAML (file or parsed dict).

    ``num_classes`` overrides ``MODEL.NUM_CLASSES``. Load weights afterwards with
    :func:`cvt.checkpoint.load_checkpoint`.
    """
    if isinstance(path_or_mapping, Mapping):
        doc, source = path_or_mapping, "the official config"
    else:
        source = str(path_or_mapping)
        doc = read_yaml_mapping(
            Path(path_or_mapping),
            f"official YAML file {source}",
            "experiment sections (MODEL, TRAIN, TEST …)",
        )
    model_cfg = doc.get("MODEL")
    if not isinstance(model_cfg, Mapping) or not isinstance(model_cfg.get("SPEC"), Mapping):
        raise UsageError(f"{source} has no MODEL.SPEC section: not an official CvT experiment file")
    spec = model_cfg["SPEC"]
    train_size = _image_size(doc.get("TRAIN"))
    test_size = _image_size(doc.get("TEST"))
    img_size = train_size or test_size or OFFICIAL_IMAGE_SIZE
    classes = model_cfg.get("NUM_CLASSES", OFFICIAL_NUM_CLASSES) if num_classes is None else num_classes
    input_cfg = doc.get("INPUT") if isinstance(doc.get("INPUT"), Mapping) else {}
    for key in ("MEAN", "STD"):
        stats = input_cfg.get(key)
        if stats is not None and not (
            isinstance(stats, (list, tuple)) and all(isinstance(v, numbers.Real) for v in stats)
        ):
            raise UsageError(f"INPUT.{key} must be a list of numbers, one per channel, got {stats!r}")
    model = CvT(
        stages_from_official_spec(spec), num_classes=classes, img_size=img_size,
        init=str(spec.get("INIT", "trunc_norm")),
    )  # fmt: skip
    test_cfg = doc.get("TEST") if isinstance(doc.get("TEST"), Mapping) else {}
    # official default: resize the shorter side to size / 0.875 and center crop; without, T.Resize((H, W))
    center_crop = bool(test_cfg.get("CENTER_CROP", True))
    model.pretrained_cfg = inference_cfg(
        model.in_chans, test_size or img_size, classes, mean=input_cfg.get("MEAN"), std=input_cfg.get("STD"),
        crop=(0.875, "center") if center_crop else (1.0, "squash"),
    )  # fmt: skip
    return model
