"""Named CvT variants, their pretrained configurations, and ``create_model`` / ``list_models``.

Each variant is one small factory registered in timm's registry (so ``timm.create_model('cvt_13')``
works after ``import cvt``) that only fills an args dict. Pretrained tags follow timm's
``arch.tag`` form; ``pretrained=True`` downloads the published Microsoft weights from the Hugging
Face hub (transformers layout) and converts them on the fly.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, get_pretrained_cfg_value, register_model
from torch import nn

from cvt.errors import CheckpointError, UsageError
from cvt.models.cvt import FIRST_CONV, STAGE_FIELDS, CvT, expand_stages

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def official_eval_crop(height: int, width: int) -> tuple[float, str]:
    """The official evaluation's ``(crop_pct, crop_mode)`` at an input size: up to 224 pixels, resize
    the shorter side to size / 0.875 and center crop (``TEST.CENTER_CROP`` True); above, resize the
    whole image to the input size, squashing its aspect (the 384 models: ``CENTER_CROP`` False,
    ``T.Resize((H, W))``; transformers' image processor warps from 384 pixels up too)."""
    return (0.875, "center") if max(height, width) <= 224 else (1.0, "squash")


def _cfg(hf_hub_id: str = "", input_size: int = 224, **kwargs: Any) -> dict[str, Any]:
    """A pretrained configuration: 0.875 center crop at 224, the whole image squashed to 384 at 384,
    bicubic, ImageNet stats."""
    crop_pct, crop_mode = official_eval_crop(input_size, input_size)
    return {
        "hf_hub_id": hf_hub_id,
        "num_classes": 1000,
        "input_size": (3, input_size, input_size),
        "pool_size": None,
        "crop_pct": crop_pct,
        "crop_mode": crop_mode,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": FIRST_CONV,
        "classifier": "head",
        "license": "mit",
        **kwargs,
    }


def _small_cfg(input_size: int, num_classes: int, mean: tuple, std: tuple) -> dict[str, Any]:
    """Configuration of a variant made for small images (no published weights)."""
    return _cfg(input_size=input_size, num_classes=num_classes, crop_pct=1.0, mean=mean, std=std)


default_cfgs = generate_default_cfgs(
    {
        "cvt_13.msft_in1k": _cfg("microsoft/cvt-13"),
        "cvt_13.msft_in1k_384": _cfg("microsoft/cvt-13-384", 384),
        "cvt_13.msft_in22k_ft_in1k_384": _cfg("microsoft/cvt-13-384-22k", 384),
        "cvt_21.msft_in1k": _cfg("microsoft/cvt-21"),
        "cvt_21.msft_in1k_384": _cfg("microsoft/cvt-21-384", 384),
        "cvt_21.msft_in22k_ft_in1k_384": _cfg("microsoft/cvt-21-384-22k", 384),
        "cvt_w24.msft_in22k_ft_in1k_384": _cfg("microsoft/cvt-w24-384-22k", 384),
        "cvt_tiny": _small_cfg(32, 10, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        "cvt_13_cifar": _small_cfg(32, 10, CIFAR_MEAN, CIFAR_STD),
        "cvt_21_cifar": _small_cfg(32, 10, CIFAR_MEAN, CIFAR_STD),
        "cvt": _small_cfg(32, 10, CIFAR_MEAN, CIFAR_STD),
    }
)

# The official models share everything but width and depth (official YAMLs, MODEL.SPEC).
_OFFICIAL = dict(
    patch_size=(7, 3, 3), patch_stride=(4, 2, 2), patch_padding=(2, 1, 1), cls_token=(False, False, True),
    method="dw_bn", kernel_qkv=3, stride_kv=2, padding_kv=1, stride_q=1, padding_q=1, qkv_bias=True,
)  # fmt: skip
_CVT_13 = dict(_OFFICIAL, embed_dim=(64, 192, 384), num_heads=(1, 3, 6), depth=(1, 2, 10),
               drop_path_rate=(0.0, 0.0, 0.1))  # fmt: skip
_CVT_21 = dict(_CVT_13, depth=(1, 4, 16))
# 32x32 input: a stride-1 3x3 stem keeps 32/16/8 token grids (the 56/28/14 of 224 scaled down);
# the official 4/2/2 strides would leave a 2x2 map in the last stage.
_CIFAR_STEM = dict(patch_size=(3, 3, 3), patch_stride=(1, 2, 2), patch_padding=(1, 1, 1))


def _build(**kwargs: Any) -> CvT:
    """Split flat kwargs into per-stage fields and model arguments, then build the model."""
    stage_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in STAGE_FIELDS}
    # the stage count from the per-stage lists (a scalar override, embed_dim=64, sets every stage)
    lengths = [len(v) for v in stage_kwargs.values() if isinstance(v, (list, tuple))]
    if not lengths:
        raise UsageError(
            "give at least one stage option as a list, one value per stage (e.g. depth=[1, 2, 10])"
        )
    return CvT(expand_stages(lengths[0], **stage_kwargs), **kwargs)


def _create(variant: str, pretrained: bool, arch: dict[str, Any], **kwargs: Any) -> CvT:
    from cvt.checkpoint import checkpoint_filter_fn  # checkpoints import the model, not the reverse

    if kwargs.pop("features_only", False):
        kwargs["features_only"] = True
        feature_cls = kwargs.setdefault("feature_cls", "getter")
        if feature_cls != "getter":
            # timm's hook/dict/fx extractors read module outputs, which are tokens here, not NCHW maps
            raise UsageError(
                f"feature_cls must be 'getter' (the stage maps come from forward_intermediates), "
                f"got {feature_cls!r}"
            )
        kwargs.setdefault("out_indices", tuple(range(len(arch["embed_dim"]))))
    tag = kwargs.get("pretrained_cfg")
    full_name = f"{variant}.{tag}" if isinstance(tag, str) and tag else variant
    hub_id = get_pretrained_cfg_value(full_name, "hf_hub_id")
    if pretrained and not hub_id:
        with_weights = ", ".join(list_models(pretrained=True)) or "none"
        raise UsageError(f"{full_name} has no published weights; variants with weights: {with_weights}")
    try:
        return build_model_with_cfg(
            _build, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
            feature_cfg=dict(flatten_sequential=False), **{**arch, **kwargs},
        )  # fmt: skip
    except Exception as err:
        if not pretrained or not isinstance(err, _fetch_errors()):
            raise  # our own message, a bad keyword, out of memory, a bug: not a download problem
        raise CheckpointError(
            f"could not fetch the pretrained weights of {full_name} from the Hugging Face hub "
            f"({hub_id}: model.safetensors or pytorch_model.bin): {type(err).__name__}: {err}. "
            f"Without network, download the file elsewhere and pass checkpoint_path=<file> "
            f"(CLI: --checkpoint <file>); HF_HUB_OFFLINE=1 makes this fail at once instead of after "
            f"huggingface_hub's retries"
        ) from err


def _fetch_errors() -> tuple[type[Exception], ...]:
    """What fetching the published weights raises for a hub, network or file problem: ``OSError``
    (files, urllib, most of huggingface_hub's errors), huggingface_hub's ``EntryNotFoundError``, the
    errors of its HTTP client (``HfHubHTTPError`` extends them; httpx's are no ``OSError``), and
    safetensors' error for a damaged download."""
    from huggingface_hub.utils import EntryNotFoundError, HfHubHTTPError
    from safetensors import SafetensorError

    client_errors = tuple(base for base in HfHubHTTPError.__bases__ if base is not Exception)
    return (OSError, EntryNotFoundError, *client_errors, SafetensorError)


def _default_img_size(kwargs: dict[str, Any], default: int) -> None:
    """Size the model for its pretrained tag's input (224 or 384) unless given."""
    cfg = kwargs.get("pretrained_cfg")
    size = default
    if isinstance(cfg, str) and cfg.endswith("_384"):
        size = 384
    elif hasattr(cfg, "input_size"):
        size = cfg.input_size[-1]
    kwargs.setdefault("img_size", size)


@register_model
def cvt_13(pretrained: bool = False, **kwargs: Any) -> CvT:
    """CvT-13: 20.0M params, 4.57 GMACs at 224 (`cvt info`; paper Table 2: 20M, 4.5G)."""
    _default_img_size(kwargs, 224)
    return _create("cvt_13", pretrained, _CVT_13, **kwargs)


@register_model
def cvt_21(pretrained: bool = False, **kwargs: Any) -> CvT:
    """CvT-21: 31.6M params, 7.18 GMACs at 224 (paper Table 2: 32M, 7.1G)."""
    _default_img_size(kwargs, 224)
    return _create("cvt_21", pretrained, _CVT_21, **kwargs)


@register_model
def cvt_w24(pretrained: bool = False, **kwargs: Any) -> CvT:
    """CvT-W24: the wide model, 277M params, 60.92 GMACs at 224 (published at 384, ImageNet-22k)."""
    arch = dict(_OFFICIAL, embed_dim=(192, 768, 1024), num_heads=(3, 12, 16), depth=(2, 2, 20),
                drop_path_rate=(0.0, 0.0, 0.3))  # fmt: skip
    _default_img_size(kwargs, 384)
    return _create("cvt_w24", pretrained, arch, **kwargs)


@register_model
def cvt_tiny(pretrained: bool = False, **kwargs: Any) -> CvT:
    """A 0.57M-parameter CvT for 32x32 inputs that trains on a 2-core CPU in minutes (digits default)."""
    arch = dict(_OFFICIAL, embed_dim=(32, 64, 128), num_heads=(1, 2, 4), depth=(1, 1, 2),
                patch_size=(3, 3, 3), patch_stride=(2, 2, 2), patch_padding=(1, 1, 1),
                drop_path_rate=(0.0, 0.0, 0.05))  # fmt: skip
    kwargs.setdefault("img_size", 32)
    return _create("cvt_tiny", pretrained, arch, **kwargs)


@register_model
def cvt_13_cifar(pretrained: bool = False, **kwargs: Any) -> CvT:
    """CvT-13 with a 3x3 stride-1 stem for 32x32 images (CIFAR): token grids 32/16/8."""
    kwargs.setdefault("img_size", 32)
    return _create("cvt_13_cifar", pretrained, dict(_CVT_13, **_CIFAR_STEM), **kwargs)


@register_model
def cvt_21_cifar(pretrained: bool = False, **kwargs: Any) -> CvT:
    """CvT-21 with a 3x3 stride-1 stem for 32x32 images (CIFAR): token grids 32/16/8."""
    kwargs.setdefault("img_size", 32)
    return _create("cvt_21_cifar", pretrained, dict(_CVT_21, **_CIFAR_STEM), **kwargs)


@register_model
def cvt(pretrained: bool = False, **kwargs: Any) -> CvT:
    """Our reading of the seed's CIFAR-10 model (``train.py --model cvt``): CvT-13 with a 3x3 first
    embedding kernel. The write-up says only that the stride "and other parameters" were changed; with
    the stride of 4 kept, this kernel reads 56 % of a 32x32 image's pixels (``cvt_13_cifar``: all)."""
    kwargs.setdefault("img_size", 32)
    return _create("cvt", pretrained, dict(_CVT_13, patch_size=(3, 3, 3)), **kwargs)


def list_models(pattern: str = "", pretrained: bool = False) -> list[str]:
    """Names of the registered CvT variants matching a wildcard ``pattern`` (with tags if ``pretrained``)."""
    return timm.list_models(pattern or "*", module=__name__.rsplit(".", 1)[-1], pretrained=pretrained)


def create_model(
    name: str,
    pretrained: bool = False,
    num_classes: int | None = None,
    checkpoint_path: str | Path | None = None,
    **overrides: Any,
) -> CvT:
    """Build a CvT variant by name (``cvt_13`` or ``cvt_13.msft_in1k``), optionally with weights.

    ``overrides`` are model arguments (``act``, ``img_size``, ``in_chans``, ``norm_eps``, ``init``,
    ``global_pool``)
    or per-stage fields of :class:`~cvt.models.cvt.StageSpec` as a scalar (every stage) or one
    value per stage, e.g. ``drop_path_rate=(0, 0, 0.2)``. ``checkpoint_path`` loads any supported
    checkpoint format strictly.
    """
    arch = name.split(".", 1)[0]
    known = list_models()
    if arch not in known:
        close = difflib.get_close_matches(arch, known, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(known)}"
        raise UsageError(f"unknown model {name!r}{hint}")
    if "." in name:
        tags = list_models(arch, pretrained=True)
        if name not in tags:
            raise UsageError(f"unknown pretrained tag in {name!r}; {arch} has: {', '.join(tags) or 'none'}")
    allowed = set(STAGE_FIELDS) | {
        "act", "img_size", "in_chans", "norm_eps", "init", "global_pool", "features_only", "out_indices",
        "feature_cls", "pretrained_cfg_overlay", "cache_dir",
    }  # fmt: skip
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        close = {u: difflib.get_close_matches(u, sorted(allowed), n=1) for u in unknown}
        hints = ", ".join(f"{u!r}" + (f" (did you mean {c[0]!r}?)" if c else "") for u, c in close.items())
        raise UsageError(f"unknown model option(s) {hints}")
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    model = timm.create_model(name, pretrained=pretrained, **overrides)
    if checkpoint_path is not None:
        from cvt.checkpoint import load_checkpoint

        if overrides.get("features_only"):
            _load_into_features(model, name, checkpoint_path, overrides)
        else:
            load_checkpoint(model, checkpoint_path)
    return model


def _load_into_features(
    features: nn.Module, name: str, checkpoint_path: str | Path, overrides: dict[str, Any]
) -> None:
    """Load a whole-model checkpoint into a ``features_only`` model, whose CvT (``features.model``)
    has lost its head, final norm and the stages past the last feature map. The checkpoint is
    checked strictly against the whole model (built on ``meta``: no memory, no init; any head), then
    the tensors of the parts kept are copied."""
    from cvt.checkpoint import load_checkpoint

    whole_args = {
        k: v for k, v in overrides.items() if k not in ("features_only", "out_indices", "feature_cls")
    }
    with torch.device("meta"):
        whole = timm.create_model(name, **whole_args)
    load_checkpoint(whole, checkpoint_path, ignore_head=True)
    kept = features.model.state_dict()
    features.model.load_state_dict({k: v for k, v in whole.state_dict().items() if k in kept})
