"""The Hugging Face transformers CvT layout: key renames, ``config.json`` ↔ stages, and export.

transformers' ``CvtForImageClassification`` names the same tensors differently
(``cvt.encoder.stages.0.layers.0.attention.attention.projection_query`` is our
``stage0.blocks.0.attn.proj_q``) and can express fewer architectures: only ``dw_bn`` projections,
no position embeddings, a cls token only in the last stage, LayerNorm eps fixed at 1e-5, GELU
always, and (because it indexes drop-path rates by stage) stage ``i`` needs more than ``i`` blocks.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cvt.checkpoint.read import HF_CONFIG_FILE, HF_PREPROCESSOR_FILE, HF_WEIGHT_FILES
from cvt.errors import CheckpointError
from cvt.fileio import atomic_write_files, refuse_existing
from cvt.models.cvt import CvT, StageSpec, is_whole_number

_HF_STAGE = "cvt.encoder.stages.{i}."
_HF_LAYER = _HF_STAGE + "layers.{j}."
_HF_ATTN = _HF_LAYER + "attention.attention."
# (native prefix, Hugging Face prefix); the rest of the key (weight, bias, running_mean …) is shared
_KEY_PREFIXES: list[tuple[str, str]] = [
    ("stage{i}.patch_embed.proj.", _HF_STAGE + "embedding.convolution_embeddings.projection."),
    ("stage{i}.patch_embed.norm.", _HF_STAGE + "embedding.convolution_embeddings.normalization."),
    ("stage{i}.cls_token", _HF_STAGE + "cls_token"),
    ("stage{i}.blocks.{j}.norm1.", _HF_LAYER + "layernorm_before."),
    ("stage{i}.blocks.{j}.norm2.", _HF_LAYER + "layernorm_after."),
    ("stage{i}.blocks.{j}.attn.proj.", _HF_LAYER + "attention.output.dense."),
    ("stage{i}.blocks.{j}.mlp.fc1.", _HF_LAYER + "intermediate.dense."),
    ("stage{i}.blocks.{j}.mlp.fc2.", _HF_LAYER + "output.dense."),
    ("norm.", "layernorm."),
    ("head.", "classifier."),
]
for _short, _long in (("q", "query"), ("k", "key"), ("v", "value")):
    _conv = _HF_ATTN + f"convolution_projection_{_long}.convolution_projection."
    _KEY_PREFIXES += [
        (f"stage{{i}}.blocks.{{j}}.attn.conv_proj_{_short}.conv.", _conv + "convolution."),
        (f"stage{{i}}.blocks.{{j}}.attn.conv_proj_{_short}.bn.", _conv + "normalization."),
        (f"stage{{i}}.blocks.{{j}}.attn.proj_{_short}.", _HF_ATTN + f"projection_{_long}."),
    ]


def _prefix_regex(template: str) -> re.Pattern[str]:
    """``stage{i}.blocks.{j}.`` → a regex matching that prefix and capturing ``i`` and ``j``."""
    pattern = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{j\}", r"(?P<j>\d+)")
    return re.compile("^" + pattern)


_TO_NATIVE = [(_prefix_regex(hf), native) for native, hf in _KEY_PREFIXES]
_TO_HF = [(_prefix_regex(native), hf) for native, hf in _KEY_PREFIXES]


def _rename(key: str, rules: list[tuple[re.Pattern[str], str]]) -> str | None:
    for pattern, target in rules:
        m = pattern.match(key)
        if m:
            return target.format(**m.groupdict()) + key[m.end() :]
    return None


def hf_to_native(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename transformers CvT keys to the native (official) layout; unknown keys are kept as they are
    so that the strict check reports them."""
    return {_rename(k, _TO_NATIVE) or k: v for k, v in state_dict.items()}


def native_to_hf(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename native keys to transformers' CvT layout (every native key of an exportable model maps)."""
    out = {}
    for key, value in state_dict.items():
        hf_key = _rename(key, _TO_HF)
        if hf_key is None:
            raise CheckpointError(f"the Hugging Face CvT layout has no place for the tensor {key!r}")
        out[hf_key] = value
    return out


# transformers CvtConfig list field -> StageSpec field
HF_STAGE_FIELDS: dict[str, str] = {
    "patch_sizes": "patch_size",
    "patch_stride": "patch_stride",
    "patch_padding": "patch_padding",
    "embed_dim": "embed_dim",
    "num_heads": "num_heads",
    "depth": "depth",
    "mlp_ratio": "mlp_ratio",
    "attention_drop_rate": "attn_drop_rate",
    "drop_rate": "drop_rate",
    "drop_path_rate": "drop_path_rate",
    "qkv_bias": "qkv_bias",
    "cls_token": "cls_token",
    "qkv_projection_method": "method",
    "kernel_qkv": "kernel_qkv",
    "padding_kv": "padding_kv",
    "stride_kv": "stride_kv",
    "padding_q": "padding_q",
    "stride_q": "stride_q",
}
_OPTIONAL_HF_FIELDS = {"attention_drop_rate", "drop_rate", "drop_path_rate"}  # regularization only
# not CvtConfig fields: what we add so that a model exported here rebuilds exactly
HF_ACT_KEY = "hidden_act"
HF_IMAGE_SIZE_KEY = "image_size"
# the published microsoft/cvt-* weights were trained with QuickGELU (transformers runs GELU)
HF_DEFAULT_ACT = "quick_gelu"


# transformers' ConvNeXt image processor (the hub's CvT one) resizes to the size, without a crop
# (squashing the aspect), from this size up
_HF_NO_CROP_SIZE = 384


def hf_input_settings(preprocessor: dict[str, Any] | None) -> dict[str, Any]:
    """``img_size``, ``mean``, ``std`` and ``crop`` (``(crop_pct, crop_mode)``) found in a
    ``preprocessor_config.json`` dict.

    The hub's CvT processors (ConvNeXt's) center-crop ``crop_pct`` below 384 pixels and from 384 up
    resize the whole image to the size, squashing its aspect; ``size`` is an int or
    ``{"shortest_edge": n}``.
    """
    if not preprocessor:
        return {}
    size = preprocessor.get("size") or preprocessor.get("crop_size")
    if isinstance(size, dict):
        size = size.get("shortest_edge") or size.get("height")
    settings: dict[str, Any] = {}
    if isinstance(size, int):
        settings["img_size"] = size
        if size >= _HF_NO_CROP_SIZE:
            settings["crop"] = (1.0, "squash")
        elif preprocessor.get("crop_pct") is not None:  # else the official rule (inference_cfg)
            settings["crop"] = (float(preprocessor["crop_pct"]), "center")
    for ours, theirs in (("mean", "image_mean"), ("std", "image_std")):
        if isinstance(preprocessor.get(theirs), list):
            settings[ours] = tuple(preprocessor[theirs])
    return settings


# transformers' image processor resample codes (PIL's): what timm's interpolation names mean
_HF_RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3}


def hf_preprocessor_from_model(model: CvT) -> dict[str, Any]:
    """A ``preprocessor_config.json`` dict (transformers' ConvNeXt image processor, as the hub's CvT
    repositories use) for the preprocessing ``cvt predict`` applies to ``model``; :func:`hf_input_settings`
    reads it back. transformers cannot express a non-square input: ``size`` is the shorter side."""
    from cvt.data.transforms import resolve_data_config

    data_cfg = resolve_data_config(model)
    size = min(data_cfg["input_size"][-2:])
    if data_cfg.get("crop_mode") == "squash" and size < _HF_NO_CROP_SIZE:
        warnings.warn(
            f"the model's preprocessing resizes the whole image to {size} pixels, squashing it; "
            f"transformers' image processor center-crops below {_HF_NO_CROP_SIZE} pixels, so the "
            f"export's preprocessor_config.json keeps the image's aspect and crops instead",
            UserWarning,
            stacklevel=3,
        )
    if data_cfg["crop_pct"] < 1 and size >= _HF_NO_CROP_SIZE:
        warnings.warn(
            f"the model's preprocessing center-crops ({data_cfg['crop_pct']:g}) at {size} pixels; "
            f"transformers' image processor never crops from {_HF_NO_CROP_SIZE} pixels up, so the "
            f"export's preprocessor_config.json resizes the whole image instead",
            UserWarning,
            stacklevel=3,
        )
    if data_cfg["input_size"][0] == 1:
        warnings.warn(
            "the model reads one (luma) channel; transformers' image processor does not convert images to "
            "grayscale: give it images converted with image.convert('L') (it normalizes that one channel)",
            UserWarning,
            stacklevel=3,
        )
    return {
        "image_processor_type": "ConvNextImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": size},
        "crop_pct": data_cfg["crop_pct"],
        "resample": _HF_RESAMPLE.get(data_cfg["interpolation"], _HF_RESAMPLE["bicubic"]),
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(data_cfg["mean"]),
        "image_std": list(data_cfg["std"]),
    }


def model_kwargs_from_hf_config(
    config: dict[str, Any], act: str | None = None, img_size: int = 224
) -> dict[str, Any]:
    """``CvT(**kwargs)`` arguments for a transformers ``config.json`` dict.

    ``act`` defaults to the config's ``hidden_act`` (written by :func:`export_hf`) or QuickGELU,
    the activation of the published weights. ``img_size`` applies when the config does not record
    one (transformers' does not; :func:`export_hf` adds it). LayerNorm eps is 1e-5 whatever
    ``layer_norm_eps`` says: transformers' CvT never passes that value to its LayerNorms.
    """
    if config.get("model_type") not in (None, "cvt"):
        raise CheckpointError(f"config.json describes a {config['model_type']!r} model, expected 'cvt'")
    missing = [k for k in HF_STAGE_FIELDS if k not in config and k not in _OPTIONAL_HF_FIELDS]
    if missing:
        raise CheckpointError(f"config.json lacks the CvT field(s) {missing}")
    if not isinstance(config["embed_dim"], list):
        raise CheckpointError(
            f"config.json field embed_dim must be a list (one value per stage), got {config['embed_dim']!r}"
        )
    num_stages = len(config["embed_dim"])
    columns = {field: config[k] for k, field in HF_STAGE_FIELDS.items() if k in config}
    bad = [k for k, v in columns.items() if not isinstance(v, list) or len(v) != num_stages]
    if bad:
        raise CheckpointError(
            f"config.json fields {bad} must be lists of {num_stages} values (one per stage)"
        )
    stages = [StageSpec(**{f: v[i] for f, v in columns.items()}) for i in range(num_stages)]
    if isinstance(config.get("id2label"), dict):  # what transformers counts, {} included
        num_classes = len(config["id2label"])
        hf_label_names(config)  # its keys must be class indices
    else:
        num_classes = config.get("num_labels", 2)  # transformers' default: 2 labels
    size = config.get(HF_IMAGE_SIZE_KEY, img_size)
    kwargs = dict(
        stages=stages,
        num_classes=num_classes,
        in_chans=config.get("num_channels", 3),
        img_size=tuple(size) if isinstance(size, list) else size,
        act=act or config.get(HF_ACT_KEY, HF_DEFAULT_ACT),
    )
    for key, value in (("num_labels", num_classes), ("num_channels", kwargs["in_chans"])):
        if not is_whole_number(value):
            raise CheckpointError(f"config.json field {key} must be a whole number, got {value!r}")
    return {**kwargs, "norm_eps": 1e-5}


def hf_label_names(config: dict[str, Any]) -> list[str] | None:
    """Class names from ``id2label``, or None when they are transformers' placeholders (``LABEL_3``)."""
    labels = config.get("id2label") or {}
    # JSON's "0", "1", … (ints in a live CvtConfig), every output once: a gap or an offset would put
    # each name on another output than transformers does
    indices = {str(i): i for i in range(len(labels))}
    if {str(k) for k in labels} != set(indices):
        raise CheckpointError(
            f"config.json id2label keys must be the class indices 0..{len(labels) - 1}, one each, got "
            f"{list(labels)!r}"
        )
    names = [labels[k] for k in sorted(labels, key=lambda k: indices[str(k)])]
    if not names or all(n == f"LABEL_{i}" for i, n in enumerate(names)):
        return None
    return names


def hf_config_from_model(model: CvT) -> dict[str, Any]:
    """A transformers ``config.json`` dict for ``model``; CheckpointError if transformers cannot say it."""
    specs = model.stage_specs
    last = len(specs) - 1
    problems = []
    for i, s in enumerate(specs):
        if s.pos_embed:
            problems.append(f"stages.{i} has a position embedding (transformers' CvT has none)")
        if s.cls_token and i != last:
            problems.append(f"stages.{i} has a cls token (transformers supports one only in the last stage)")
        if s.method != "dw_bn":
            problems.append(
                f"stages.{i} uses the {s.method!r} projection (transformers supports only 'dw_bn')"
            )
        if s.depth <= i:
            problems.append(
                f"stages.{i} has {s.depth} block(s) (transformers indexes drop-path rates by stage, so "
                f"stages.{i} needs at least {i + 1})"
            )
    if isinstance(model.norm, nn.Identity):
        problems.append("the final LayerNorm was pruned (transformers' CvT always has one)")
    if model.norm_eps != 1e-5:
        problems.append(f"LayerNorm eps is {model.norm_eps} (transformers' CvT always uses 1e-5)")
    if model.global_pool != ("token" if model.has_cls_token else "avg"):
        problems.append(f"global_pool is {model.global_pool!r} (transformers pools the cls token if any)")
    if problems:
        raise CheckpointError("cannot export to the Hugging Face layout: " + "; ".join(problems))
    if not specs[last].cls_token:
        warnings.warn(
            "the model has no cls token: transformers' CvtForImageClassification cannot classify with it "
            "(its forward fails with an IndexError); its CvtModel runs the folder, and this package "
            "reads it back whole",
            UserWarning,
            stacklevel=3,
        )
    if model.act != "gelu":
        warnings.warn(
            f"the model uses {model.act}; transformers' CvtForImageClassification always runs GELU, so "
            f"its outputs will differ slightly (this package reads '{HF_ACT_KEY}' back and matches)",
            UserWarning,
            stacklevel=3,
        )
    names = (model.pretrained_cfg or {}).get("label_names")
    names = list(names) if names and len(names) == model.num_classes else None
    id2label = {str(i): (names[i] if names else f"LABEL_{i}") for i in range(model.num_classes)}
    config: dict[str, Any] = {
        "architectures": ["CvtForImageClassification"],
        "model_type": "cvt",
        "num_channels": model.in_chans,
        **{k: [getattr(s, field) for s in specs] for k, field in HF_STAGE_FIELDS.items()},
        "initializer_range": 0.02,
        "layer_norm_eps": model.norm_eps,
        "id2label": id2label,
        "label2id": {v: int(k) for k, v in id2label.items()},
        HF_ACT_KEY: model.act,
        HF_IMAGE_SIZE_KEY: list(model.img_size),
    }
    return config


def hf_export_files(out_dir: Path) -> tuple[Path, Path, Path]:
    """The files :func:`export_hf` writes in ``out_dir``: config, weights, preprocessor config."""
    return out_dir / HF_CONFIG_FILE, out_dir / HF_WEIGHT_FILES[0], out_dir / HF_PREPROCESSOR_FILE


def export_hf(model: torch.nn.Module, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write ``config.json`` + ``model.safetensors`` that ``CvtForImageClassification.from_pretrained``
    loads, and ``preprocessor_config.json`` (input size, crop, mean/std) for ``AutoImageProcessor``;
    returns the directory. Refuses to replace existing files unless ``overwrite``.

    Everything that can fail is computed before the folder is made, and the three files are written
    together (:func:`~cvt.fileio.atomic_write_files`): a failure leaves an earlier export as it was."""
    from safetensors.torch import save
    from timm.utils import unwrap_model

    model = unwrap_model(model)  # DistributedDataParallel, torch.compile, ModelEmaV3: the CvT inside
    config = hf_config_from_model(model)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"export target {out} exists and is not a directory")
    config_file, weight_file, preprocessor_file = hf_export_files(out)
    refuse_existing(
        (config_file, weight_file, preprocessor_file),
        overwrite,
        option="overwrite=True (CLI: --overwrite)",
        output="folder",
    )
    preprocessor = hf_preprocessor_from_model(model)
    tensors = {k: v.detach().cpu().contiguous() for k, v in native_to_hf(model.state_dict()).items()}
    contents = {
        weight_file: save(tensors, metadata={"format": "pt"}),
        config_file: _json_bytes(config),
        preprocessor_file: _json_bytes(preprocessor),
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_files(contents)
    return out


def _json_bytes(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, indent=2) + "\n").encode("utf-8")
