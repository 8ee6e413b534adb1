"""Data: the data sets (digits, CIFAR-10/100, ImageFolder), transforms, mixing and loaders."""

from cvt.data.datasets import DATASETS, SPLITS, ArrayImageDataset, ImageFolderDataset, build_dataset
from cvt.data.images import IMAGE_EXTENSIONS, is_image_file, load_image
from cvt.data.loader import build_loader
from cvt.data.transforms import (
    AugmentConfig,
    build_mixup,
    build_transform,
    load_input,
    resolve_data_config,
)

__all__ = [
    "DATASETS",
    "IMAGE_EXTENSIONS",
    "SPLITS",
    "ArrayImageDataset",
    "AugmentConfig",
    "ImageFolderDataset",
    "build_dataset",
    "build_loader",
    "build_mixup",
    "build_transform",
    "is_image_file",
    "load_image",
    "load_input",
    "resolve_data_config",
]
