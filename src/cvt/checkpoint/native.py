"""The project's own checkpoint format: a safetensors file that can rebuild its model alone.

The tensors are the native state dict (the official key layout). The metadata holds
``cvt_format`` (the format version) and ``cvt_arch``: JSON with the variant name (if any), every
stage's :class:`~cvt.models.cvt.StageSpec`, ``num_classes``, ``in_chans``, ``img_size``, ``act``,
``norm_eps``, ``final_norm`` (False once ``prune_intermediate_layers`` removed the final LayerNorm)
and the ``pretrained_cfg`` (input size, mean/std, crop, class names) for inference.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from cvt.checkpoint.read import NATIVE_ARCH_KEY, NATIVE_FORMAT_KEY, NATIVE_FORMAT_VERSION
from cvt.errors import CheckpointError, UsageError
from cvt.fileio import atomic_write_bytes, refuse_existing
from cvt.models.cvt import FIRST_CONV, CvT, StageSpec
from cvt.models.variants import official_eval_crop

# pretrained_cfg entries stored as tuples by timm; JSON turns them into lists
_TUPLE_CFG_KEYS = ("input_size", "mean", "std")


def inference_cfg(
    in_chans: int,
    img_size: tuple[int, int],
    num_classes: int,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    crop: tuple[float, str] | None = None,
) -> dict[str, Any]:
    """A timm ``pretrained_cfg`` (what ``timm.data.resolve_data_config`` reads) for a model rebuilt
    from a file: ImageNet mean/std and bicubic resizing by default, as the official recipe;
    ``crop`` as ``(crop_pct, crop_mode)``, by default the official evaluation's at that size (0.875
    center crop up to 224 pixels, the whole image squashed above: :func:`official_eval_crop`)."""
    h, w = img_size
    crop_pct, crop_mode = crop or official_eval_crop(h, w)
    return dict(
        input_size=(in_chans, h, w), interpolation="bicubic", mean=tuple(mean or IMAGENET_DEFAULT_MEAN),
        std=tuple(std or IMAGENET_DEFAULT_STD), crop_pct=crop_pct, crop_mode=crop_mode,
        num_classes=num_classes, first_conv=FIRST_CONV, classifier="head",
    )  # fmt: skip


def architecture_of(model: CvT, variant: str | None = None) -> dict[str, Any]:
    """The JSON-serializable description that :func:`model_from_architecture` rebuilds ``model`` from."""
    cfg = dict(model.pretrained_cfg or {})
    return {
        "variant": variant or cfg.get("architecture"),
        "stages": [dataclasses.asdict(s) for s in model.stage_specs],
        "num_classes": model.num_classes,
        "in_chans": model.in_chans,
        "img_size": list(model.img_size),
        "act": model.act,
        "norm_eps": model.norm_eps,
        "final_norm": not isinstance(model.norm, torch.nn.Identity),
        "global_pool": model.global_pool,
        "pretrained_cfg": cfg,
        # the crop above is the model's own: files without this key are read as written before 384
        # evaluation squashed the image (model_from_architecture)
        "crop_as_recorded": True,
    }


def model_from_architecture(arch: dict[str, Any]) -> CvT:
    """Build the (randomly initialized) model an :func:`architecture_of` dict describes, on the
    caller's default device (``meta`` inside ``with torch.device("meta")``: no init to overwrite)."""
    try:
        stages = [StageSpec(**s) for s in arch["stages"]]
        model = CvT(
            stages, num_classes=arch["num_classes"], in_chans=arch["in_chans"],
            img_size=tuple(arch["img_size"]), act=arch["act"], norm_eps=arch["norm_eps"],
            global_pool=arch.get("global_pool"),
        )  # fmt: skip
    except (KeyError, TypeError, UsageError) as err:  # UsageError: a value CvT refuses
        raise CheckpointError(f"the architecture metadata is incomplete or invalid: {err!r}") from err
    if not arch.get("final_norm", True):  # saved after prune_intermediate_layers
        model.norm = torch.nn.Identity()
    cfg = dict(arch.get("pretrained_cfg") or {})
    for key in _TUPLE_CFG_KEYS:
        if isinstance(cfg.get(key), list):
            cfg[key] = tuple(cfg[key])
    # files written before 384 evaluation squashed the image (no crop_as_recorded) recorded the official
    # rule at their own input size as crop 1.0, center; a small-image config (cvt_tiny: 32 px, no crop)
    # built larger is not one
    old_file = not arch.get("crop_as_recorded", False)
    old_384_rule = old_file and (cfg.get("crop_pct"), cfg.get("crop_mode")) == (1.0, "center")
    if old_384_rule and max(model.img_size) > 224 and tuple(cfg.get("input_size", ())[-2:]) == model.img_size:
        cfg["crop_pct"], cfg["crop_mode"] = official_eval_crop(*model.img_size)
    model.pretrained_cfg = cfg
    return model


def save_checkpoint(
    model: torch.nn.Module, path: str | Path, variant: str | None = None, overwrite: bool = False
) -> Path:
    """Save ``model`` in the project's safetensors format (weights + architecture); returns the path.

    ``model`` may be wrapped (DDP, ``torch.compile``, an EMA, a ``features_only`` backbone, whose
    pruned CvT is saved and loads back as that CvT). ``variant`` names the registered
    variant (default: ``model.pretrained_cfg['architecture']``);
    the full per-stage spec is stored either way. An existing file is replaced only with
    ``overwrite=True``, and atomically (written beside it, then renamed).
    """
    from safetensors.torch import save
    from timm.utils import unwrap_model

    model = unwrap_model(model)  # DistributedDataParallel, torch.compile, ModelEmaV3: the CvT inside
    if not isinstance(model, CvT) and isinstance(getattr(model, "model", None), CvT):
        model = model.model  # timm's FeatureGetterNet (features_only=True)
    if not isinstance(model, CvT):
        raise CheckpointError(f"save_checkpoint saves a CvT model, got {type(model).__name__}")
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint target {path} is a directory, expected a file path")
    refuse_existing([path], overwrite, option="overwrite=True (CLI: --overwrite)", output="path")
    # safetensors stores contiguous, unshared tensors; the state dict of a CvT shares none
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {
        "format": "pt",
        NATIVE_FORMAT_KEY: NATIVE_FORMAT_VERSION,
        # default=str: a pretrained_cfg may hold paths (timm's ``file``) or other non-JSON values
        NATIVE_ARCH_KEY: json.dumps(architecture_of(model, variant), default=str),
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a parent is a file, or the folder is not writable
        raise CheckpointError(f"cannot write checkpoint {path}: {err.strerror or err}") from err
    atomic_write_bytes(path, save(tensors, metadata=metadata))
    return path
