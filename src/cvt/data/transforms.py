"""Preprocessing: the model's data configuration, train/eval transforms and batch mixing (timm).

Images are read as RGB; a model built with ``in_chans=1`` gets them as one luma channel (the weights
of PIL's ``L`` conversion), normalized by the luma-weighted mean and std, after every augmentation.

Eval follows the pretrained configuration: resize the shorter side to ``size / crop_pct`` (bicubic
for the published weights) and center crop, or (``crop_mode`` squash, the 384 models) resize the whole
image to the input size; normalize. Training reuses timm's augmentation stack
(RandAugment, color jitter, random erasing, mixup/cutmix); only the crop differs with the input
size: ImageNet-size inputs use RandomResizedCrop, small inputs (CIFAR, digits at 32×32) the
pad-and-crop of the CIFAR recipes, since a resized crop of a 32×32 image throws most of it away;
with ``precrop`` the official fine-tuning crop (resize to size + 32, random crop) replaces both.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageOps
from torch import nn
from torchvision import transforms

from cvt.data.images import load_image
from cvt.errors import UsageError

# inputs up to this size train with pad-and-crop instead of RandomResizedCrop
SMALL_INPUT_MAX = 64
# data sets of small images: evaluated without a center crop (cropping 12.5% of 32×32 loses content)
SMALL_IMAGE_DATASETS: tuple[str, ...] = ("digits", "cifar10", "cifar100")
# ITU-R 601-2 luma: the weights of R, G and B in PIL's convert("L"), which grayscale models read
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


@dataclass
class AugmentConfig:
    """Training augmentation and label regularisation; the defaults apply none of it."""

    # RandAugment / AutoAugment policy in timm's syntax, e.g. "rand-m9-mstd0.5-inc1" (paper recipe)
    auto_augment: str | None = None
    # probability of random erasing (per-pixel random values), 0.25 in the paper's recipe
    re_prob: float = 0.0
    # probability of a horizontal flip (0.5 for natural images; leave 0 for digits)
    hflip: float = 0.0
    # random crop: pad-and-crop for small inputs, RandomResizedCrop with `scale` for ImageNet-size ones
    random_crop: bool = False
    # with random_crop: resize to (size + precrop) square, then crop size at a random offset instead (the
    # official trainer's fine-tuning crop, FINETUNE without USE_TRAIN_AUG: precrop 32)
    precrop: int = 0
    # RandomResizedCrop area range for ImageNet-size inputs (ImageNet default)
    scale: tuple[float, float] = (0.08, 1.0)
    # color jitter strength for brightness/contrast/saturation; ignored with auto_augment, as in timm
    color_jitter: float | None = None
    # mixup alpha (0.8 in the paper's recipe); mixup or cutmix needs an even batch size
    mixup: float = 0.0
    # cutmix alpha (1.0 in the paper's recipe); with both set, timm picks one at random per batch (p=0.5)
    cutmix: float = 0.0
    # label smoothing (0.1 in the paper's recipe); applied inside mixup when mixing is on
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        # the messages name the fields as options: cvt train's options of the same names fill them
        for name in ("re_prob", "hflip"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UsageError(f"option {name!r} is a probability in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise UsageError(f"option 'label_smoothing' must be in [0, 1), got {self.label_smoothing}")
        for name in ("precrop", "mixup", "cutmix"):
            if getattr(self, name) < 0:
                raise UsageError(f"option {name!r} must be >= 0, got {getattr(self, name)}")
        if self.color_jitter is not None and self.color_jitter < 0:
            raise UsageError(f"option 'color_jitter' must be >= 0 when given, got {self.color_jitter}")
        if len(self.scale) != 2 or not 0.0 < self.scale[0] <= self.scale[1] <= 1.0:
            raise UsageError(f"option 'scale' must be two numbers 0 < lo <= hi <= 1, got {self.scale}")


def resolve_data_config(
    model: nn.Module, dataset: str | None = None, img_size: tuple[int, int] | None = None
) -> dict[str, Any]:
    """``input_size``, ``interpolation``, ``mean``, ``std``, ``crop_pct``, ``crop_mode`` for ``model``'s
    preprocessing.

    ``input_size`` is ``(C, H, W)`` with ``C`` the model's ``in_chans``; for a grayscale model (1) the mean
    and std are the luma-weighted RGB ones (:data:`LUMA_WEIGHTS`). Image transforms exist for 3 and 1
    channels only (:func:`build_transform`).

    From ``model.pretrained_cfg`` (timm's resolver), at ``img_size`` (H, W) when given (``--img-size``),
    else at the input size the model was built for (``model.img_size``, which a fine-tuning run may
    have changed). A configuration that crops as the official evaluation does (a 0.875 center crop up
    to 224 pixels; above, the whole image squashed to the input size) keeps doing so at that size:
    CvT-13 built at 384, or run at 384, is evaluated on the whole image resized to 384x384, as the
    official 384 models are, and a 384 model run at 224 is center-cropped. For the small-image data
    sets (:data:`SMALL_IMAGE_DATASETS`) ``crop_pct`` is 1: the whole (square) image is resized.
    """
    from timm.data import resolve_data_config as timm_resolve

    from cvt.models.variants import official_eval_crop

    cfg = timm_resolve(model=model)
    cfg.setdefault("crop_mode", "center")
    in_chans = getattr(model, "in_chans", 3)
    cfg["input_size"] = (in_chans, *cfg["input_size"][-2:])
    if in_chans == 1:
        cfg["mean"], cfg["std"] = (_luma(cfg["mean"]),), (_luma(cfg["std"]),)
    size = img_size or getattr(model, "img_size", None)
    if size is not None:
        configured = cfg["input_size"][-2:]
        official = (cfg["crop_pct"], cfg["crop_mode"]) == official_eval_crop(*configured)
        if tuple(size) != tuple(configured) and official:
            cfg["crop_pct"], cfg["crop_mode"] = official_eval_crop(*size)
        cfg["input_size"] = (cfg["input_size"][0], *size)
    if dataset in SMALL_IMAGE_DATASETS:
        cfg["crop_pct"], cfg["crop_mode"] = 1.0, "center"
    return cfg


def _luma(values: tuple[float, ...]) -> float:
    """A per-channel statistic of RGB images (``(r, g, b)``, or one value for all three) for their luma."""
    if len(values) == 1:
        return float(values[0])
    if len(values) != 3:
        raise UsageError(f"a mean or std for RGB images has 1 or 3 values, got {tuple(values)}")
    return sum(w * v for w, v in zip(LUMA_WEIGHTS, values, strict=True))


class LumaChannel:
    """``(3, H, W)`` → ``(1, H, W)``: the luma-weighted sum of the channels (:data:`LUMA_WEIGHTS`).

    On channels normalized by one mean ``m`` and std ``s`` it gives ``(luma - m) / s``: the normalized
    luma, as PIL's ``convert("L")`` then normalizing would, without rounding the luma to 8 bits.
    """

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        weights = torch.tensor(LUMA_WEIGHTS, dtype=image.dtype).view(3, 1, 1)
        return (image * weights).sum(dim=0, keepdim=True)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _luma_after_normalize(steps: list[Callable]) -> list[Callable]:
    """``steps`` with :class:`LumaChannel` after their ``Normalize``: every augmentation sees the RGB
    image, random erasing (after ``Normalize``) the one channel the model reads."""
    at = next((i for i, step in enumerate(steps) if isinstance(step, transforms.Normalize)), None)
    if at is None:
        raise RuntimeError(
            f"no Normalize step in {[type(step).__name__ for step in steps]}: cvt's grayscale input needs "
            f"updating for this timm version"
        )
    return [*steps[: at + 1], LumaChannel(), *steps[at + 1 :]]


def _eval_geometry(data_cfg: dict[str, Any]) -> list[Callable]:
    """The resize + center-crop steps of timm's eval pipeline (PIL in, PIL out)."""
    import timm
    from timm.data.transforms import MaybePILToTensor
    from timm.data.transforms_factory import transforms_imagenet_eval

    steps = transforms_imagenet_eval(
        tuple(data_cfg["input_size"][-2:]), crop_pct=data_cfg["crop_pct"],
        crop_mode=data_cfg.get("crop_mode", "center"), interpolation=data_cfg["interpolation"],
        use_prefetcher=True,
    ).transforms  # fmt: skip
    if not isinstance(steps[-1], MaybePILToTensor):  # with use_prefetcher the last step only converts
        raise RuntimeError(
            f"timm {timm.__version__}'s eval pipeline no longer ends with MaybePILToTensor (it ends with "
            f"{type(steps[-1]).__name__}): cvt's eval geometry needs updating for this timm version"
        )
    return steps[:-1]


def build_transform(data_cfg: dict[str, Any], train: bool, aug: AugmentConfig | None = None) -> Callable:
    """A PIL image → normalized ``(C, H, W)`` float tensor transform, ``C`` from ``input_size`` (1: the
    image's luma); other channel counts are refused (:class:`UsageError`): images have no such channels.

    ``train=False`` (or ``aug`` None with ``train=True``): the deterministic eval pipeline
    (timm's ``transforms_imagenet_eval``). ``train=True``: the crop chosen by the input size
    (see the module docstring), then timm's augmentations, normalization and random erasing.
    """
    channels = data_cfg["input_size"][0]
    if channels not in (1, 3):
        raise UsageError(
            f"the model takes {channels} input channels; images give 3 (RGB) or 1 (grayscale, in_chans=1): "
            f"feed this model tensors of your own through the Python API"
        )
    if channels == 3:
        return transforms.Compose(_transform_steps(data_cfg, train, aug))
    # grayscale: RGB steps whose channels share the luma's mean and std, then one channel
    (mean,), (std,) = data_cfg["mean"], data_cfg["std"]
    rgb_cfg = {**data_cfg, "mean": (mean,) * 3, "std": (std,) * 3}
    return transforms.Compose(_luma_after_normalize(_transform_steps(rgb_cfg, train, aug)))


def _transform_steps(data_cfg: dict[str, Any], train: bool, aug: AugmentConfig | None) -> list[Callable]:
    """The steps of :func:`build_transform` for RGB images."""
    from timm.data.transforms import str_to_interp_mode
    from timm.data.transforms_factory import transforms_imagenet_eval, transforms_imagenet_train

    height, width = data_cfg["input_size"][-2:]
    common = dict(interpolation=data_cfg["interpolation"], mean=data_cfg["mean"], std=data_cfg["std"])
    if not train or aug is None:
        crop = dict(crop_pct=data_cfg["crop_pct"], crop_mode=data_cfg.get("crop_mode", "center"))
        return list(transforms_imagenet_eval((height, width), **crop, **common).transforms)
    try:
        rrc_crop, augment, finish = transforms_imagenet_train(
            (height, width), scale=aug.scale, hflip=aug.hflip, color_jitter=aug.color_jitter,
            auto_augment=aug.auto_augment, re_prob=aug.re_prob, re_mode="pixel", separate=True, **common,
        )  # fmt: skip
    except AssertionError as err:  # timm asserts on an unknown policy name
        raise UsageError(
            f"auto_augment must be a timm policy such as rand-m9-mstd0.5-inc1, augmix-m5 or v0; "
            f"got {aug.auto_augment!r} ({err})"
        ) from err
    if aug.random_crop and not aug.precrop and max(height, width) > SMALL_INPUT_MAX:
        crop = rrc_crop.transforms  # RandomResizedCrop (+ flip)
    else:
        if aug.random_crop and aug.precrop:
            # official fine-tuning: T.Resize((crop + 32, crop + 32)), then T.RandomCrop(crop)
            size = (height + aug.precrop, width + aug.precrop)
            resize = transforms.Resize(size, interpolation=str_to_interp_mode(data_cfg["interpolation"]))
            crop = [resize, transforms.RandomCrop((height, width))]
        else:
            crop = _eval_geometry(data_cfg)
            if aug.random_crop:
                # CIFAR recipe: zero-pad by 1/8 of the side (4 px at 32) and crop back at a random offset
                crop.append(transforms.RandomCrop((height, width), padding=max(height, width) // 8))
        if aug.hflip > 0:
            crop.append(transforms.RandomHorizontalFlip(aug.hflip))
    _allow_zero_bit_posterize(augment.transforms)
    return [*crop, *augment.transforms, *finish.transforms]


def _posterize_keep_msb(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """Keep the ``bits_to_keep`` most significant bits of every channel; 0 bits gives a black image."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _allow_zero_bit_posterize(steps: list[Callable]) -> None:
    """Make timm's Posterize ops accept 0 bits, which Pillow >= 13 rejects with a ValueError.

    timm's RandAugment ("inc1" policies at magnitude 10) and AutoAugment ("v0") ask Pillow to keep
    0 bits; older Pillow then returned a black image, Pillow 13 raises mid-epoch. The ops of these
    transform instances (not timm's globals) get a posterize that keeps the old behaviour.
    """
    for step in steps:
        policy = getattr(step, "policy", None)  # AutoAugment: a list of sub-policies (lists of ops)
        ops = [op for sub in policy for op in sub] if policy is not None else getattr(step, "ops", [])
        for op in ops:
            if getattr(op, "name", "").startswith("Posterize"):
                op.aug_fn = _posterize_keep_msb


def load_input(path: str | Path, data_cfg: dict[str, Any], transform: Callable | None = None) -> torch.Tensor:
    """One image file → the ``(1, C, H, W)`` model input of ``data_cfg``'s eval preprocessing.

    A large image is decoded at reduced size (see :func:`~cvt.data.images.load_image`), never below
    the size the eval resize needs. ``transform`` reuses a pipeline built by :func:`build_transform`.
    """
    transform = transform or build_transform(data_cfg, train=False)
    # timm's eval resize scales the image, keeping its aspect, until it covers floor(side / crop_pct)
    # on both sides (H and W); the decode only guarantees a shorter side, so that side must reach the
    # larger of the two (a non-square input's other side would otherwise be upscaled)
    min_side = max(math.floor(side / data_cfg["crop_pct"]) for side in data_cfg["input_size"][-2:])
    return transform(load_image(path, min_side=min_side)).unsqueeze(0)


def build_mixup(aug: AugmentConfig, num_classes: int) -> Callable | None:
    """timm's ``Mixup`` (mixup/cutmix with smoothed one-hot targets) when either alpha is set, else None.

    With it, the loss must take soft targets (``timm.loss.SoftTargetCrossEntropy``) and batches must
    have an even size.
    """
    if aug.mixup <= 0 and aug.cutmix <= 0:
        return None
    from timm.data import Mixup

    return Mixup(
        mixup_alpha=aug.mixup, cutmix_alpha=aug.cutmix, label_smoothing=aug.label_smoothing,
        num_classes=num_classes,
    )  # fmt: skip
