"""The data sets: scikit-learn's digits (embedded), CIFAR-10/100 (python archive), ImageFolder trees.

Every data set returns ``(PIL RGB image, class index)`` pairs, has ``.classes`` (names) and
``.targets`` (one index per item), and raises :class:`~cvt.errors.DataError` with what was expected
and what was found when its files are missing, empty or unreadable.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pickle
import shutil
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from cvt.data.images import IMAGE_EXTENSIONS, is_image_file, load_image
from cvt.errors import DataError, UsageError, first_names

# data sets whose classes are fixed: their count needs none of their files (a dry run without the data)
FIXED_CLASS_COUNTS: dict[str, int] = {"digits": 10, "cifar10": 10, "cifar100": 100}
DATASETS: tuple[str, ...] = (*FIXED_CLASS_COUNTS, "imagefolder")
SPLITS: tuple[str, ...] = ("train", "val")

# The fixed digits split: stratified 80/20 with this seed → 1,437 train / 360 val images.
DIGITS_VAL_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0

# folder, file names and the label-name key of the two CIFAR python archives
_CIFAR_LAYOUT: dict[str, dict[str, Any]] = {
    "cifar10": dict(
        folder="cifar-10-batches-py", train=[f"data_batch_{i}" for i in range(1, 6)], val=["test_batch"],
        meta="batches.meta", names_key="label_names", labels_key="labels",
    ),
    "cifar100": dict(
        folder="cifar-100-python", train=["train"], val=["test"], meta="meta",
        names_key="fine_label_names", labels_key="fine_labels",
    ),
}  # fmt: skip


class ArrayImageDataset(Dataset):
    """Images held in memory as one ``(N, H, W, 3)`` uint8 array (digits, CIFAR).

    An item is ``Image.fromarray`` of one row (no decoding, a few µs), so the same PIL transforms
    (RandAugment included) apply to every data set.
    """

    def __init__(
        self, images: np.ndarray, targets: list[int], classes: list[str], transform: Callable | None = None
    ) -> None:
        self.images = images
        self.targets = targets
        self.classes = classes
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img = Image.fromarray(self.images[index])
        return (self.transform(img) if self.transform else img), self.targets[index]


def digits_dataset(split: str, transform: Callable | None = None) -> ArrayImageDataset:
    """scikit-learn's handwritten digits (1,797 real 8×8 images, 10 classes) with the fixed split.

    Gray levels 0..16 are scaled to 0..255 and copied to 3 channels; the model's transform resizes
    the 8×8 images to its input size.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    indices = np.arange(len(digits.target))
    train_idx, val_idx = train_test_split(
        indices, test_size=DIGITS_VAL_FRACTION, stratify=digits.target, random_state=DIGITS_SPLIT_SEED
    )
    idx = np.sort(train_idx if split == "train" else val_idx)
    gray = np.round(digits.images[idx] * (255.0 / 16.0)).astype(np.uint8)  # (N, 8, 8)
    rgb = np.repeat(gray[..., None], 3, axis=-1)  # (N, 8, 8, 3)
    return ArrayImageDataset(rgb, digits.target[idx].tolist(), [str(d) for d in range(10)], transform)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR archives' dicts of numpy arrays and refuses every other global (no code runs)."""

    _ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset({
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
    })  # fmt: skip

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are allowed")
        return super().find_class(module, name)


def _read_cifar_pickle(path: Path) -> dict[str, Any]:
    """One file of the CIFAR python archive as a dict (latin-1: the archive was pickled by Python 2)."""
    try:
        with open(path, "rb") as f:
            entry = _NumpyOnlyUnpickler(f, encoding="latin1").load()
    except FileNotFoundError:
        raise DataError(f"CIFAR file {path} is missing; the folder needs all the archive's files") from None
    except Exception as err:  # truncated, not a pickle, or a pickle with code in it
        raise DataError(f"cannot read CIFAR file {path}: {type(err).__name__}: {err}") from err
    if not isinstance(entry, dict):
        raise DataError(f"CIFAR file {path} holds a {type(entry).__name__}, expected a dict")
    return {_text(k): v for k, v in entry.items()}


def _text(value: Any) -> Any:
    """Bytes keys and label names (pickles written by Python 3 with bytes) as str."""
    return value.decode("latin1") if isinstance(value, bytes) else value


def _cifar_pixels(data: np.ndarray, path: Path) -> np.ndarray:
    """The archive's ``data``, one row of 3072 bytes per image (its R, G and B planes of 32 x 32), as
    ``(N, 3, 32, 32)`` uint8. Anything else (an HWC ``(N, 32, 32, 3)`` array, floats in [0, 1], values
    past 255) would be read as other pixels, so it is refused."""
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(
            f"CIFAR file {path} holds data of shape {data.shape}; the CIFAR python format has one row of "
            f"3072 values per image (R, G, B planes of 32x32): shape (N, 3072)"
        )
    if data.dtype != np.uint8:
        integral = np.issubdtype(data.dtype, np.integer)
        if not integral or (data.size and (data.min() < 0 or data.max() > 255)):
            raise DataError(
                f"CIFAR file {path} holds {data.dtype} data; the CIFAR python format has bytes (uint8, "
                f"0..255)"
            )
    return data.astype(np.uint8, copy=False).reshape(-1, 3, 32, 32)


def cifar_dataset(
    name: str, root: Path, split: str, transform: Callable | None = None, download: bool = False
) -> ArrayImageDataset:
    """CIFAR-10 or CIFAR-100 from the python archive under ``root`` (downloaded there if asked)."""
    layout = _CIFAR_LAYOUT[name]
    folder = root / layout["folder"]
    if not folder.is_dir():
        if not download:
            raise DataError(
                f"{name}: no folder {folder}; put the extracted '{layout['folder']}' folder of the "
                f"python archive under {root} (or pass --download to fetch it)"
            )
        _download_cifar(name, root)
    images, targets = [], []
    for file_name in layout[split]:
        path = folder / file_name
        entry = _read_cifar_pickle(path)
        try:
            data = _cifar_pixels(np.asarray(entry["data"]), path)
            labels = [int(t) for t in entry[layout["labels_key"]]]
        except (KeyError, ValueError, TypeError) as err:
            raise DataError(f"CIFAR file {path} is not in the CIFAR python format: {err!r}") from err
        if len(labels) != len(data):
            raise DataError(f"CIFAR file {path} has {len(data)} images but {len(labels)} labels")
        images.append(data.transpose(0, 2, 3, 1))  # (N, 32, 32, 3)
        targets.extend(labels)
    meta_path = folder / layout["meta"]
    classes = [str(_text(c)) for c in _read_cifar_pickle(meta_path).get(layout["names_key"], [])]
    low, high = min(targets, default=0), max(targets, default=0)
    if not classes or low < 0 or high >= len(classes):
        raise DataError(f"CIFAR meta file {meta_path} lists {len(classes)} class names for labels "
                        f"{low}..{high}")  # fmt: skip
    return ArrayImageDataset(np.concatenate(images), targets, classes, transform)


def _download_cifar(name: str, root: Path) -> None:
    """Fetch and extract the archive with torchvision (which checks its md5). A download that fails
    leaves nothing it made behind: the archive, the extracted folder and the folders up to ``root``
    that did not exist before are removed (what was there before is left as it was)."""
    from torchvision.datasets import CIFAR10, CIFAR100
    from torchvision.datasets.utils import download_and_extract_archive

    source = CIFAR10 if name == "cifar10" else CIFAR100
    made = [p for p in (root / source.filename, root / source.base_folder) if not p.exists()]
    made_dirs = [p for p in (root, *root.parents) if not p.exists()]  # deepest first
    try:
        download_and_extract_archive(source.url, str(root), filename=source.filename, md5=source.tgz_md5)
    except Exception as err:  # no network, DNS failure, bad checksum, full disk …
        for path in made:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        for folder in made_dirs:
            with contextlib.suppress(OSError):  # not empty: something else was put there meanwhile
                folder.rmdir()
        raise DataError(f"could not download {name} from {source.url} into {root}: {err}") from err


class ImageFolderDataset(Dataset):
    """An ImageNet-layout tree ``root/<class>/<image>`` (class names sorted, as torchvision's ImageFolder).

    Files without an image extension and hidden files and folders (name starting with '.') are ignored,
    linked folders followed (see :func:`find_image_files`). A class folder without images stays a class,
    with a warning (unless ``classes`` is given). Images are decoded when an item is read, so a
    broken file is found then and raises :class:`~cvt.errors.DataError` naming it. With
    ``skip_bad_images``, construction first scans every file's header (fast: no decoding) and drops
    empty or non-image files with one warning (they are listed in ``skipped``); a file that only fails
    when decoded (a truncated JPEG) is then replaced by the next readable item, with a warning naming
    it, so that training batches stay full, or with ``replace_bad_images=False`` its item is None, which
    :func:`~cvt.data.loader.collate_readable` leaves out of the batch: an evaluation counts every
    readable image once and no other.

    ``classes`` fixes the class names and their order (e.g. the training split's), so that a
    validation folder lacking some classes keeps the training indices; a folder of a class not in
    the list is then an error.
    """

    def __init__(
        self,
        root: Path,
        transform: Callable | None = None,
        skip_bad_images: bool = False,
        classes: Sequence[str] | None = None,
        replace_bad_images: bool = True,
    ) -> None:
        self.root = root
        self.transform = transform
        self.skip_bad_images = skip_bad_images
        self.replace_bad_images = replace_bad_images
        if not root.is_dir():
            what = "is a file" if root.exists() else "does not exist"
            raise DataError(f"image folder {root} {what}, expected a folder of class sub-folders")
        found = image_folder_classes(root)
        if found is None:
            raise DataError(f"image folder {root} has no class sub-folders (hidden '.' folders do not count)")
        if classes is not None:
            repeated = sorted(name for name, n in Counter(classes).items() if n > 1)
            if repeated:
                raise DataError(f"class names must be unique, {', '.join(repeated[:5])} given more than once")
            unknown = sorted(set(found) - set(classes))
            if unknown:
                raise DataError(
                    f"image folder {root} has class folder(s) {first_names(unknown)} that are not among the "
                    f"{len(classes)} given classes (in training: the training split's)"
                )
        self.classes: list[str] = list(classes) if classes is not None else found
        class_to_idx = {name: i for i, name in enumerate(self.classes)}
        # classes without a folder, or with an empty one, simply have no samples; classes in name order
        # and paths sorted as torchvision's make_dataset does, so the sample order is ImageFolder's
        samples = [
            (str(path), class_to_idx[name])
            for name in sorted(class_to_idx)
            if (root / name).is_dir()
            for path in sorted(find_image_files(root / name), key=lambda p: (str(p.parent), p.name))
        ]
        bad: list[str] = []
        if skip_bad_images:
            bad = [path for path, _ in samples if not _has_image_header(path)]
            if bad:
                warnings.warn(
                    f"skipping {len(bad)} unreadable file(s) in {root}: {first_names(bad)}",
                    stacklevel=2,
                )
                bad_set = set(bad)
                samples = [s for s in samples if s[0] not in bad_set]
        if not samples and bad:
            raise DataError(f"image folder {root}: none of its {len(bad)} image file(s) is readable")
        if not samples:
            raise DataError(
                f"image folder {root} has {len(found)} class folder(s) but no image files "
                f"(expected {root}/<class>/<image> with extension {', '.join(IMAGE_EXTENSIONS)})"
            )
        if classes is None:
            # a class folder without images still becomes a class (an output no image trains), which
            # shifts the meaning of the model's outputs; with a given list (a validation split) a
            # class may lack images, so only a split that defines the classes warns
            empty = sorted(set(self.classes) - {self.classes[t] for _, t in samples})
            if empty:
                warnings.warn(
                    f"image folder {root}: class folder(s) {first_names(empty)} hold no image files "
                    "(readable, with an image extension) but still count as classes; remove or fill them",
                    stacklevel=2,
                )
        self.samples: list[tuple[str, int]] = samples
        self.targets: list[int] = [t for _, t in samples]
        self.skipped: list[str] = bad  # the files dropped when their header was scanned

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int] | None:
        for attempt in range(len(self.samples)):
            path, target = self.samples[(index + attempt) % len(self.samples)]
            try:
                img = load_image(path)
            except DataError as err:
                if not self.skip_bad_images:
                    raise
                if not self.replace_bad_images:
                    warnings.warn(f"{err}; left out", stacklevel=2)
                    return None
                warnings.warn(f"{err}; using the next image instead", stacklevel=2)
                continue
            return (self.transform(img) if self.transform else img), target
        raise DataError(f"no readable image in {self.root}")


def _has_image_header(path: str) -> bool:
    """Whether PIL recognises the file's header (reads a few bytes; does not decode the pixels)."""
    try:
        with Image.open(path) as img:
            return img.size[0] > 0 and img.size[1] > 0
    except Exception:  # any failure means "not a readable image": the caller skips it with a warning
        return False


def _is_hidden(name: str) -> bool:
    """Dot-files and dot-folders (``.ipynb_checkpoints``, macOS ``._*`` AppleDouble files) are not data."""
    return name.startswith(".")


def _entry_kind(entry: os.DirEntry) -> str | None:
    """``"dir"`` or ``"file"``, links followed; None for anything else, such as a broken link or a link
    onto itself (ELOOP), which os.walk likewise passes over."""
    try:
        return "dir" if entry.is_dir() else "file" if entry.is_file() else None
    except OSError:
        return None


def _list_folder(folder: Path) -> list[os.DirEntry]:
    """The entries of ``folder`` sorted by name; an unreadable folder is a :class:`DataError` naming it."""
    try:
        with os.scandir(folder) as entries:
            return sorted(entries, key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError):
        raise  # no such folder: the caller knows what was expected there
    except OSError as err:  # no permission, I/O error …
        raise DataError(f"cannot list folder {folder}: {type(err).__name__}: {err}") from err


def first_difference(before: Sequence[str], now: Sequence[str]) -> tuple[int, str, str]:
    """The first index where two class lists differ and the names there (``"(none)"`` past the end of
    the shorter one); the lists must differ."""
    pairs = itertools.zip_longest(before, now, fillvalue="(none)")
    return next((i, a, b) for i, (a, b) in enumerate(pairs) if a != b)


def image_folder_classes(root: Path) -> list[str] | None:
    """The class folder names of an ImageFolder split in index order (sorted), or None if ``root`` has
    none or is not a folder. Hidden folders (``.ipynb_checkpoints``) are not classes; linked folders are.

    The one definition of an ImageFolder's classes: :class:`ImageFolderDataset` and ``cvt eval`` use it.
    """
    try:
        entries = _list_folder(root)
    except (FileNotFoundError, NotADirectoryError):
        return None
    classes = [e.name for e in entries if not _is_hidden(e.name) and _entry_kind(e) == "dir"]
    return classes or None


def find_image_files(folder: Path) -> list[Path]:
    """The image files under ``folder``, recursively, in sorted path order: what ImageFolder reads from
    a class folder and what ``cvt predict`` reads from a folder.

    A file counts when it has one of :data:`~cvt.data.images.IMAGE_EXTENSIONS` and neither it nor a
    folder between it and ``folder`` is hidden (name starting with '.'). Linked folders are followed,
    except a link back to a folder being searched (a loop that would never end).
    """
    found: list[Path] = []

    def walk(directory: Path, ancestors: frozenset[str]) -> None:
        real = os.path.realpath(directory)
        if real in ancestors:
            return
        for entry in _list_folder(directory):
            if _is_hidden(entry.name):
                continue
            kind = _entry_kind(entry)
            if kind == "dir":
                walk(Path(entry.path), ancestors | {real})
            elif kind == "file" and is_image_file(entry.name):
                found.append(Path(entry.path))

    walk(folder, frozenset())
    return found


def check_dataset_name(name: str) -> None:
    """:class:`UsageError` for a data set name not in :data:`DATASETS`."""
    if name not in DATASETS:
        raise UsageError(f"dataset must be one of {', '.join(DATASETS)}, got {name!r}")


def build_dataset(
    name: str,
    root: str | Path | None,
    split: str,
    transform: Callable | None = None,
    download: bool = False,
    skip_bad_images: bool = False,
    classes: Sequence[str] | None = None,
    replace_bad_images: bool = True,
) -> Dataset:
    """Build one split (``train`` or ``val``) of a data set in :data:`DATASETS`.

    ``root``: for CIFAR the folder holding ``cifar-10-batches-py`` / ``cifar-100-python``
    (default ``./data``); for ``imagefolder`` the folder holding ``train/`` and ``val/``;
    ignored for ``digits``. The result has ``.classes`` and ``.targets`` and at least one item.
    ``classes`` (imagefolder only; digits and CIFAR have fixed classes): the class names in index
    order, e.g. ``train_set.classes`` when building ``val``, so that the indices agree even when
    ``val/`` lacks a class folder. ``skip_bad_images``, ``replace_bad_images``: see
    :class:`ImageFolderDataset` (evaluation passes ``replace_bad_images=False``).
    """
    check_dataset_name(name)
    if split not in SPLITS:
        raise UsageError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if name == "digits":
        return digits_dataset(split, transform)
    if name in _CIFAR_LAYOUT:
        return cifar_dataset(name, Path(root if root is not None else "data"), split, transform, download)
    if root is None:
        raise UsageError("dataset imagefolder needs a data folder (--data-dir) holding train/ and val/")
    folder = Path(root) / split
    if not folder.exists():  # a file there: ImageFolderDataset says so
        raise DataError(f"image folder {folder} does not exist; expected {root}/{split}/<class>/<image>")
    return ImageFolderDataset(folder, transform, skip_bad_images, classes, replace_bad_images)
