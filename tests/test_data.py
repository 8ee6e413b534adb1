"""Tests of cvt.data: the three data sets on files the tests write, image decoding, transforms, loaders."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import random
import re
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torch import nn

from cvt.data import (
    AugmentConfig,
    build_dataset,
    build_loader,
    build_mixup,
    build_transform,
    is_image_file,
    load_image,
    load_input,
    resolve_data_config,
)
from cvt.data.datasets import image_folder_classes
from cvt.data.transforms import _posterize_keep_msb
from cvt.errors import DataError, UsageError


class _ModelWithCfg(nn.Module):
    """The two attributes resolve_data_config reads, without building a CvT."""

    def __init__(self, img_size: int, crop_pct: float, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)) -> None:
        super().__init__()
        self.img_size = (img_size, img_size)
        self.pretrained_cfg = dict(
            input_size=(3, 224, 224), interpolation="bicubic", crop_pct=crop_pct, mean=mean, std=std
        )


# ------------------------------------------------------------------------------------ digits
def test_digits_split_is_fixed_stratified_and_complete():
    from sklearn.datasets import load_digits

    digits = load_digits()
    train, val = build_dataset("digits", None, "train"), build_dataset("digits", None, "val")
    assert (len(train), len(val)) == (1437, 360)
    assert train.classes == [str(d) for d in range(10)]
    # stratified: every class keeps 20% (±1) of its images in val
    full = np.bincount(digits.target, minlength=10)
    assert np.all(np.abs(np.bincount(val.targets, minlength=10) - 0.2 * full) <= 1)

    # the two splits together are exactly the 1,797 images (as a multiset of pixel arrays)
    def digests(ds):
        return sorted(hashlib.sha1(ds.images[i, :, :, 0].tobytes()).hexdigest() + str(ds.targets[i])
                      for i in range(len(ds)))  # fmt: skip

    expected = sorted(
        hashlib.sha1(np.round(img * 255 / 16).astype(np.uint8).tobytes()).hexdigest() + str(t)
        for img, t in zip(digits.images, digits.target, strict=True)
    )
    assert sorted(digests(train) + digests(val)) == expected
    # fixed: a second build gives the same order
    assert build_dataset("digits", None, "val").targets == val.targets


def test_digits_item_is_rgb_scaled_to_255_and_transform_upscales():
    ds = build_dataset("digits", None, "train")
    img, target = ds[0]
    assert img.size == (8, 8) and img.mode == "RGB"
    arr = np.asarray(img)
    assert np.array_equal(arr[..., 0], arr[..., 2])
    assert ds.images.max() == 255 and ds.images.min() == 0 and ds.images.dtype == np.uint8
    cfg = resolve_data_config(_ModelWithCfg(32, 0.875), "digits")
    assert cfg["crop_pct"] == 1.0 and cfg["input_size"] == (3, 32, 32)
    x, _ = build_dataset("digits", None, "train", build_transform(cfg, train=False))[0]
    assert x.shape == (3, 32, 32)
    # a black corner stays black after the resize: (0 - 0.5) / 0.5 = -1
    assert x[:, 0, 0].tolist() == pytest.approx([-1.0] * 3, abs=1e-6)
    assert target == ds.targets[0]


def test_digits_split_and_item_order_are_the_published_ones():
    """The split seed and the items in the archive's order are pinned: another seed (or the split's
    shuffled order) is still fixed and stratified, yet changes every digits result already reported."""
    first_val_targets = [1, 4, 8, 6, 5, 9, 9, 1, 3, 2, 2, 2, 0, 7, 4, 8]
    assert build_dataset("digits", None, "val").targets[:16] == first_val_targets
    assert build_dataset("digits", None, "train").targets[:12] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]


# ------------------------------------------------------------------------------------- CIFAR
def _write_cifar10(root: Path, per_batch: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    """The CIFAR-10 python archive layout with ``per_batch`` random images per file (protocol 2)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch).tolist()
        entry = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                 b"filenames": [f"{i}.png".encode() for i in range(per_batch)]}  # fmt: skip
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
        written[name] = (data, labels)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship",
             b"truck"]  # fmt: skip
    meta = {b"num_cases_per_batch": per_batch, b"label_names": names, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return written


def test_cifar10_reads_the_pickle_archive(tmp_path):
    written = _write_cifar10(tmp_path)
    train = build_dataset("cifar10", tmp_path, "train")
    val = build_dataset("cifar10", tmp_path, "val")
    assert (len(train), len(val)) == (40, 8)
    assert train.classes[:3] == ["airplane", "automobile", "bird"]
    data, labels = written["data_batch_2"]
    img, target = train[8 + 3]  # 4th image of the second file
    # a row is 1024 red, 1024 green, 1024 blue values of a 32x32 image
    assert np.array_equal(np.asarray(img), data[3].reshape(3, 32, 32).transpose(1, 2, 0))
    assert target == labels[3]
    assert val.targets == written["test_batch"][1]


def test_cifar100_reads_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name, n in (("train", 12), ("test", 4)):
        entry = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "fine_labels": list(range(n)), "coarse_labels": [0] * n}  # fmt: skip
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"c{i}" for i in range(100)]}))
    ds = build_dataset("cifar100", tmp_path, "train")
    assert len(ds) == 12 and len(ds.classes) == 100 and ds.targets[5] == 5 and ds.classes[5] == "c5"
    val = build_dataset("cifar100", tmp_path, "val")  # the "test" file
    assert len(val) == 4 and val.targets == [0, 1, 2, 3]


def test_cifar_missing_folder_says_where_to_put_it(tmp_path):
    with pytest.raises(DataError, match=r"no folder .*cifar-10-batches-py.*--download"):
        build_dataset("cifar10", tmp_path, "train")


def test_cifar_truncated_file_is_named(tmp_path):
    _write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(DataError, match="data_batch_3"):
        build_dataset("cifar10", tmp_path, "train")


def test_cifar_meta_must_name_every_label(tmp_path):
    _write_cifar10(tmp_path)
    meta = tmp_path / "cifar-10-batches-py" / "batches.meta"
    meta.write_bytes(pickle.dumps({"label_names": ["a", "b"]}, protocol=2))
    with pytest.raises(DataError, match=r"batches\.meta lists 2 class names for labels 0\.\.9"):
        build_dataset("cifar10", tmp_path, "train")


def test_cifar_labels_must_be_indices_of_the_meta_class_names(tmp_path):
    """Labels 0..9 of CIFAR-10's 10 names are read; 10 (one past the last name) or -1 are refused."""
    _write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"

    def with_labels(labels):
        data = np.zeros((len(labels), 3072), dtype=np.uint8)
        path.write_bytes(pickle.dumps({b"data": data, b"labels": labels}, protocol=2))
        return build_dataset("cifar10", tmp_path, "val")

    assert with_labels([0, 9, 4]).targets == [0, 9, 4]  # the first and the last class
    with pytest.raises(DataError, match=r"batches\.meta lists 10 class names for labels 0\.\.10"):
        with_labels([0, 10, 4])
    with pytest.raises(DataError, match=r"batches\.meta lists 10 class names for labels -1\.\.9"):
        with_labels([-1, 9])


class _Payload:
    """Unpickling this runs ``os.system`` — a CIFAR file must never do that."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar_pickle_with_code_is_refused_without_running_it(tmp_path):
    _write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps({"data": _Payload(marker)}))
    with pytest.raises(DataError, match=r"test_batch.*refusing to load"):
        build_dataset("cifar10", tmp_path, "val")
    assert not marker.exists()


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ([1, 2, 3], r"data_batch_2 holds a list, expected a dict"),
        (
            {b"data": np.zeros((2, 3072), np.uint8)},
            r"data_batch_2 is not in the CIFAR python format: KeyError",
        ),
        (
            {b"data": np.zeros((3, 3072), np.uint8), b"labels": [0, 1]},
            r"data_batch_2 has 3 images but 2 labels",
        ),
        # re-packed copies: read as rows of CHW planes, they were other pixels (an HWC red image gave grey)
        (
            {b"data": np.zeros((2, 32, 32, 3), np.uint8), b"labels": [0, 1]},
            r"data_batch_2 holds data of shape \(2, 32, 32, 3\); .* shape \(N, 3072\)",
        ),
        (
            {b"data": np.full((2, 3072), 0.5, np.float32), b"labels": [0, 1]},
            r"data_batch_2 holds float32 data; the CIFAR python format has bytes \(uint8, 0..255\)",
        ),
        (
            {b"data": np.full((2, 3072), 300, np.int64), b"labels": [0, 1]},
            r"data_batch_2 holds int64 data; the CIFAR python format has bytes",
        ),
    ],
    ids=["a list", "no labels", "fewer labels", "HWC images", "floats", "past 255"],
)
def test_cifar_file_of_another_shape_is_named_with_what_is_wrong(tmp_path, entry, message):
    _write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_2").write_bytes(pickle.dumps(entry, protocol=2))
    with pytest.raises(DataError, match=message):
        build_dataset("cifar10", tmp_path, "train")


def test_cifar_bytes_stored_in_a_wider_integer_type_read_as_the_same_images(tmp_path):
    written = _write_cifar10(tmp_path)
    data, labels = written["data_batch_2"]
    entry = {b"data": data.astype(np.int64), b"labels": labels}
    (tmp_path / "cifar-10-batches-py" / "data_batch_2").write_bytes(pickle.dumps(entry, protocol=2))
    img, _ = build_dataset("cifar10", tmp_path, "train")[8 + 3]
    assert np.array_equal(np.asarray(img), data[3].reshape(3, 32, 32).transpose(1, 2, 0))


def test_cifar_without_a_data_folder_reads_data_under_the_working_directory(tmp_path, monkeypatch):
    _write_cifar10(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    assert len(build_dataset("cifar10", None, "val")) == 8


def test_cifar_download_fetches_a_missing_archive_only(tmp_path, monkeypatch):
    from cvt.data import datasets

    fetched: list[tuple[str, Path]] = []

    def fake_download(name: str, root: Path) -> None:
        fetched.append((name, root))
        _write_cifar10(root)

    monkeypatch.setattr(datasets, "_download_cifar", fake_download)
    assert len(build_dataset("cifar10", tmp_path, "val", download=True)) == 8
    assert len(build_dataset("cifar10", tmp_path, "train", download=True)) == 40  # already there
    assert fetched == [("cifar10", tmp_path)]


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_download_asks_torchvision_for_the_named_archive(tmp_path, monkeypatch, name):
    from torchvision.datasets import CIFAR10, CIFAR100, utils

    calls = []

    def no_network(url: str, root: str, filename: str, md5: str) -> None:
        calls.append((url, root, filename, md5))
        raise OSError("no network in tests")

    monkeypatch.setattr(utils, "download_and_extract_archive", no_network)
    with pytest.raises(DataError, match=rf"could not download {name} from .* into {tmp_path}: no network"):
        build_dataset(name, tmp_path, "train", download=True)
    source = CIFAR10 if name == "cifar10" else CIFAR100
    assert calls == [(source.url, str(tmp_path), source.filename, source.tgz_md5)]


def test_a_failed_cifar_download_leaves_nothing_it_made(tmp_path, monkeypatch):
    """Offline, torchvision made the folders and a partial archive before failing: they go, and what
    was there before stays (an empty data/ folder was left behind)."""
    from torchvision.datasets import utils

    def cut_off(url: str, root: str, filename: str, md5: str) -> None:
        Path(root).mkdir(parents=True, exist_ok=True)
        (Path(root) / filename).write_bytes(b"partial")
        (Path(root) / "cifar-10-batches-py").mkdir()
        raise OSError("connection reset")

    monkeypatch.setattr(utils, "download_and_extract_archive", cut_off)
    root = tmp_path / "data" / "cifar"
    with pytest.raises(DataError, match="could not download cifar10"):
        build_dataset("cifar10", root, "train", download=True)
    assert list(tmp_path.iterdir()) == []

    root.mkdir(parents=True)
    (root / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="could not download cifar10"):
        build_dataset("cifar10", root, "train", download=True)
    assert [p.name for p in root.iterdir()] == ["notes.txt"]


# -------------------------------------------------------------------------------- imagefolder
def _save(path: Path, img: Image.Image, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kwargs)
    return path


def _make_folder(root: Path, split: str = "train", per_class: int = 3) -> None:
    for c, name in enumerate(("cat", "dog")):
        for i in range(per_class):
            _save(root / split / name / f"{i}.png", Image.new("RGB", (10, 12), (40 * c + i, 7, 9)))


def test_imagefolder_classes_targets_and_non_images_ignored(tmp_path):
    _make_folder(tmp_path)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    ds = build_dataset("imagefolder", tmp_path, "train")
    assert ds.classes == ["cat", "dog"] and ds.targets == [0, 0, 0, 1, 1, 1]
    img, target = ds[4]
    assert target == 1 and img.getpixel((0, 0)) == (41, 7, 9)


def test_image_extensions_are_matched_whatever_their_case(tmp_path):
    """Cameras write IMG_0001.JPG: an image whatever the case of its extension, as torchvision's
    ImageFolder finds it."""
    names = ("IMG_1.JPG", "b.Png", "c.TIFF", "d.webp", "e.txt", "f.jpg.bak")
    assert [is_image_file(name) for name in names] == [True] * 4 + [False] * 2
    _make_folder(tmp_path, per_class=1)
    _save(tmp_path / "train" / "dog" / "IMG_1.JPG", Image.new("RGB", (10, 12), (200, 7, 9)))
    ds = build_dataset("imagefolder", tmp_path, "train")
    assert ds.targets == [0, 1, 1] and ds[2][0].getpixel((0, 0))[0] > 190


def test_imagefolder_given_classes_keep_their_order(tmp_path):
    """A class list passed in (a checkpoint's label names) fixes the indices: it is not re-sorted."""
    _save(tmp_path / "val" / "cat" / "0.png", Image.new("RGB", (4, 4)))
    val = build_dataset("imagefolder", tmp_path, "val", classes=["cat", "ant", "bee"])
    assert val.classes == ["cat", "ant", "bee"] and val.targets == [0]


def test_a_split_with_empty_class_folders_counts_its_own_folders(tmp_path):
    """A validation split given the training classes names its own folders' count, not the list's."""
    for name in ("cat", "dog"):
        (tmp_path / "val" / name).mkdir(parents=True)
    with pytest.raises(DataError, match=r"has 2 class folder\(s\) but no image files"):
        build_dataset("imagefolder", tmp_path, "val", classes=[str(i) for i in range(10)] + ["cat", "dog"])


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: None, r"does not exist; expected .*/train/<class>/<image>"),
        (lambda root: (root / "train").mkdir(), "no class sub-folders"),
        (lambda root: (root / "train" / "cat").mkdir(parents=True), "no image files"),
        (
            lambda root: (root / "train").write_text("x"),
            "is a file, expected a folder",
        ),  # was NotADirectoryError
    ],
)
def test_imagefolder_missing_or_empty(tmp_path, make, message):
    make(tmp_path)
    with pytest.raises(DataError, match=message):
        build_dataset("imagefolder", tmp_path, "train")


def _truncated_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 40).convert("RGB").save(buf, "JPEG")
    data = buf.getvalue()
    return data[: len(data) // 2]  # headers intact, half of the scan data missing


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"", "empty"), (b"plain text", "UnidentifiedImageError"), (_truncated_jpeg(), "truncated")],
)
def test_imagefolder_bad_file_is_named_at_item_time(tmp_path, content, reason):
    _make_folder(tmp_path)
    bad = tmp_path / "train" / "dog" / "1.png"
    bad.write_bytes(content)
    ds = build_dataset("imagefolder", tmp_path, "train")
    assert len(ds) == 6  # lazy: found when the item is read
    ds[3]
    with pytest.raises(DataError, match=rf"(?i){bad}.*{reason}"):
        ds[4]


def test_imagefolder_skip_bad_images(tmp_path):
    _make_folder(tmp_path)
    (tmp_path / "train" / "cat" / "0.png").write_bytes(b"")
    (tmp_path / "train" / "cat" / "1.png").write_bytes(b"GIF89a but not really")
    (tmp_path / "train" / "dog" / "1.jpg").write_bytes(_truncated_jpeg())  # header is fine
    with pytest.warns(UserWarning, match=r"skipping 2 unreadable file\(s\)"):
        ds = build_dataset("imagefolder", tmp_path, "train", skip_bad_images=True)
    assert len(ds) == 5 and ds.targets == [0, 1, 1, 1, 1]
    index = [p for p, _ in ds.samples].index(str(tmp_path / "train" / "dog" / "1.jpg"))
    with pytest.warns(UserWarning, match=r"1\.jpg.*using the next image"):
        img, target = ds[index]
    assert target == 1 and img.getpixel((0, 0)) == (41, 7, 9)  # dog/1.png, the next sample


def test_imagefolder_for_evaluation_leaves_a_file_that_fails_to_decode_out(tmp_path):
    """``replace_bad_images=False`` (cvt eval): the item of a file that fails when decoded is None and
    ``collate_readable`` leaves it out of its batch, instead of the next image counted a second time."""
    from cvt.data.loader import collate_readable

    _make_folder(tmp_path)
    (tmp_path / "train" / "cat" / "2.png").write_bytes(_truncated_jpeg())  # the next sample is dog/0.png
    ds = build_dataset("imagefolder", tmp_path, "train", skip_bad_images=True, replace_bad_images=False)
    ds.transform = lambda img: torch.tensor(img.getpixel((0, 0)))
    assert len(ds) == 6 and ds.skipped == []
    with pytest.warns(UserWarning, match=r"2\.png: .*truncated.*; left out"):
        assert ds[2] is None
    loader = build_loader(ds, batch_size=4, train=False, collate_fn=collate_readable)
    with pytest.warns(UserWarning, match="left out"):
        batches = list(loader)
    assert [b[1].tolist() for b in batches] == [[0, 0, 1], [1, 1]]  # cat/2.png only is missing
    assert batches[0][0][:, 0].tolist() == [0, 1, 40]
    assert [t.shape for t in collate_readable([None, None])] == [(0,), (0,)]


def test_imagefolder_sample_order_is_torchvisions_in_nested_folders(tmp_path):
    """A class folder's own files before its sub-folders', sub-folders as torchvision's sorted os.walk
    orders them ("a" < "a b" < "a-1" < "a/b"), which is neither the search's order nor the paths' as
    strings."""
    from torchvision.datasets import ImageFolder

    for rel in ("cat/z.png", "cat/a/y.png", "cat/a b/x.png", "cat/a-1/w.png", "cat/a/b/v.png", "dog/0.png"):
        _save(tmp_path / "train" / rel, Image.new("RGB", (4, 4)))
    ds = build_dataset("imagefolder", tmp_path, "train")
    assert ds.samples == ImageFolder(str(tmp_path / "train")).samples
    assert [Path(p).relative_to(tmp_path / "train").as_posix() for p, _ in ds.samples] == [
        "cat/z.png", "cat/a/y.png", "cat/a b/x.png", "cat/a-1/w.png", "cat/a/b/v.png", "dog/0.png"
    ]  # fmt: skip


def test_imagefolder_with_given_classes_reads_the_folders_in_name_order(tmp_path):
    """The given list sets the indices, not the sample order: that stays torchvision's (folders by name)."""
    _make_folder(tmp_path)
    ds = build_dataset("imagefolder", tmp_path, "train", classes=["dog", "cat"])
    assert ds.targets == [1, 1, 1, 0, 0, 0]
    img, target = ds[0]
    assert target == 1 and img.getpixel((0, 0)) == (0, 7, 9)  # cat/0.png


def test_imagefolder_lists_the_skipped_files_and_replaces_a_bad_last_item_by_the_first(tmp_path):
    _make_folder(tmp_path)
    empty = tmp_path / "train" / "cat" / "0.png"
    empty.write_bytes(b"")
    (tmp_path / "train" / "dog" / "2.png").write_bytes(_truncated_jpeg())  # its header passes the scan
    with pytest.warns(UserWarning, match=r"skipping 1 unreadable file"):
        ds = build_dataset("imagefolder", tmp_path, "train", skip_bad_images=True)
    assert ds.skipped == [str(empty)] and len(ds) == 5
    with pytest.warns(UserWarning, match=r"2\.png.*using the next image"):
        img, target = ds[4]
    assert target == 0 and img.getpixel((0, 0)) == (1, 7, 9)  # cat/1.png: the next one wraps around


def test_imagefolder_needs_a_data_folder():
    with pytest.raises(UsageError, match=r"dataset imagefolder needs a data folder \(--data-dir\)"):
        build_dataset("imagefolder", None, "train")


def test_first_difference_names_the_first_differing_class_and_none_past_the_shorter_list():
    from cvt.data.datasets import first_difference

    assert first_difference(["a", "b", "c"], ["a", "x", "c"]) == (1, "b", "x")
    assert first_difference(["a", "b"], ["a", "b", "c"]) == (2, "(none)", "c")
    assert first_difference(["a", "b"], ["a"]) == (1, "b", "(none)")


# ------------------------------------------------------------------------------ load_image
def test_load_image_modes_become_rgb(tmp_path):
    gray = load_image(_save(tmp_path / "g.png", Image.new("L", (4, 3), 77)))
    rgba = load_image(_save(tmp_path / "a.png", Image.new("RGBA", (4, 3), (10, 20, 30, 0))))
    palette = load_image(_save(tmp_path / "p.gif", Image.new("RGB", (4, 3), (255, 0, 0)).convert("P")))
    assert [im.mode for im in (gray, rgba, palette)] == ["RGB"] * 3
    assert gray.getpixel((1, 1)) == (77, 77, 77)
    assert rgba.getpixel((1, 1)) == (10, 20, 30)
    assert palette.getpixel((0, 0)) == (255, 0, 0)


def test_load_image_16bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 100], [32768, 65535]], dtype=np.uint16)
    path = _save(tmp_path / "deep.png", Image.fromarray(values))
    assert Image.open(path).mode.startswith("I")
    img = load_image(path)
    assert np.asarray(img)[..., 0].tolist() == [[0, 100], [128, 255]]


def test_load_image_applies_exif_orientation(tmp_path):
    # 4 wide x 2 high, left half black, right half white, stored with "rotate 90° clockwise to view"
    stored = Image.new("RGB", (4, 2), (0, 0, 0))
    stored.paste((255, 255, 255), (2, 0, 4, 2))
    exif = Image.Exif()
    exif[0x0112] = 6
    img = load_image(_save(tmp_path / "rot.jpg", stored, exif=exif, quality=100))
    assert img.size == (2, 4)
    # after the rotation the black half is on top
    assert img.getpixel((0, 0))[0] < 60 and img.getpixel((0, 3))[0] > 200


def test_load_image_draft_decodes_large_jpeg_small(tmp_path, reduced_decode):
    path = _save(tmp_path / "big.jpg", Image.new("L", (2400, 1600), 128))
    img = load_image(path, min_side=200)
    # JPEG DCT scaling 1/4, the shorter side staying >= 2 * 200: never the full 2400x1600 in RGB
    assert img.size == (600, 400) and img.getpixel((10, 10)) == (128, 128, 128)
    assert load_image(path).size == (2400, 1600)


def test_load_input_decodes_a_large_image_big_enough_for_the_longer_input_side(tmp_path):
    """A non-square input needs its longer side covered: decoding only to the shorter side would leave
    the resize to upscale a blurred image."""
    small = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    big = Image.fromarray(small).resize((2048, 2048), Image.BICUBIC)  # smooth: reduced decodes agree
    path = _save(tmp_path / "big.png", big)
    cfg = dict(input_size=(3, 64, 256), interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3,
               crop_pct=1.0, crop_mode="center")  # fmt: skip
    transform = build_transform(cfg, train=False)
    full_decode = transform(big).unsqueeze(0)
    assert (load_input(path, cfg, transform) - full_decode).abs().max().item() < 0.1


def test_load_image_reads_a_float_image_as_0_to_1(tmp_path):
    values = np.full((8, 8), 0.5, dtype=np.float32)
    values[0, 0] = 1.0
    img = load_image(_save(tmp_path / "float.tif", Image.fromarray(values, mode="F")))
    assert img.getpixel((1, 1)) == (128, 128, 128) and img.getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        (np.full((8, 8), 70000, dtype=np.int32), "integer pixels range 70000..70000, outside the 0..65535"),
        (np.full((8, 8), -3, dtype=np.int32), "integer pixels range -3..-3, outside the 0..65535"),
        (
            np.linspace(0, 255, 64, dtype=np.float32).reshape(8, 8),
            "float pixels range 0..255, outside the 0..1",
        ),
    ],
)
def test_load_image_refuses_wide_pixels_outside_the_range_it_maps(tmp_path, values, fragment):
    """A 32-bit integer image beyond 16 bits, a float image in 0..255: a DataError naming the file
    (they were clipped into a white or black image without a word)."""
    path = _save(tmp_path / "wide.tif", Image.fromarray(values))
    with pytest.raises(DataError, match=re.escape(f"cannot read image {path}: its {fragment}")):
        load_image(path)


def test_load_image_refuses_nan_pixels(tmp_path):
    path = _save(tmp_path / "nan.tif", Image.fromarray(np.array([[0.25, np.nan]], dtype=np.float32)))
    with pytest.raises(DataError, match=re.escape(f"cannot read image {path}: it has NaN pixels")):
        load_image(path)


@pytest.mark.parametrize(
    ("values", "mode"),
    [(np.array([[1.02, 0.4], [0.4, 1.02]], dtype=np.float32), "F"), (np.array([[70000, 60000]] * 2), "I")],
)
def test_the_reduced_decode_checks_the_range_before_averaging(tmp_path, reduced_decode, values, mode):
    """A large image is box-reduced before it becomes RGB: averaging a checkerboard of 1.02 and 0.4
    gave 0.71, in range, and `cvt predict` read an image `cvt eval` refuses."""
    tiles = np.tile(values, (32, 32)).astype(np.float32 if mode == "F" else np.int32)  # 64x64
    path = _save(tmp_path / "wide.tif", Image.fromarray(tiles))
    assert Image.open(path).mode == mode
    for min_side in (None, 8):  # full decode, reduced 4x
        with pytest.raises(DataError, match="pixels range"):
            load_image(path, min_side=min_side)


def test_load_image_clips_float_rounding_just_outside_0_to_1(tmp_path):
    values = np.array([[-0.0005, 1.0005, 0.25]], dtype=np.float32)
    img = load_image(_save(tmp_path / "float.tif", Image.fromarray(values, mode="F")))
    assert [img.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (255, 255, 255), (64, 64, 64)]


def test_load_image_drafts_a_jpeg_by_its_shorter_side(tmp_path, monkeypatch, reduced_decode):
    """The DCT scale keeps the shorter side at >= 2 * min_side (a panorama at 1/2, not 1/8), and the
    decoder is asked for the image's own aspect (a square request decodes a landscape at twice the size)."""
    from PIL import JpegImagePlugin

    drafted = []
    draft = JpegImagePlugin.JpegImageFile.draft

    def recording_draft(self, mode, size):
        result = draft(self, mode, size)
        drafted.append(self.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", recording_draft)
    landscape = _save(tmp_path / "big.jpg", Image.new("L", (2400, 1600), 128))
    assert load_image(landscape, min_side=200).size == (600, 400) and drafted == [(600, 400)]
    panorama = _save(tmp_path / "pano.jpg", Image.new("L", (3200, 800), 128))
    assert load_image(panorama, min_side=200).size == (1600, 400)


@pytest.mark.parametrize(("side", "decoded"), [(4095, 4095), (4097, 513)])
def test_load_image_decodes_an_indivisible_jpeg_in_full_up_to_4096_squared_then_at_an_eighth(
    tmp_path, side, decoded
):
    """Up to 4096×4096 pixels an image is decoded in full, as the evaluation data sets decode it; above,
    a JPEG no DCT scale divides is scaled at the largest anyway (1/8: ceil(4097 / 8) = 513) to spare
    memory."""
    path = _save(tmp_path / "odd.jpg", Image.new("L", (side, side), 90))
    img = load_image(path, min_side=200)
    assert img.size == (decoded, decoded) and img.getpixel((7, 7)) == (90, 90, 90)


def test_load_image_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.png: no such file"):
        load_image(tmp_path / "nope.png")


def test_load_image_names_a_png_that_pillow_opens_but_cannot_load(tmp_path):
    """A zTXt chunk after the image data, with a compression method PNG does not define: Pillow opens
    the file (it reads only the chunks before the data) and raises SyntaxError in ``load``."""
    path = _save(tmp_path / "late.png", Image.new("RGB", (4, 4), (10, 20, 30)))
    data = path.read_bytes()
    end = data.rindex(b"IEND") - 4  # the IEND chunk's length field
    body = b"comment\0" + b"\x01" + zlib.compress(b"text")  # method 1: only 0 (deflate) exists
    chunk = struct.pack(">I", len(body)) + b"zTXt" + body + struct.pack(">I", zlib.crc32(b"zTXt" + body))
    path.write_bytes(data[:end] + chunk + data[end:])
    Image.open(path)  # opens: the failure is in decoding, which load_image must report too
    # Pillow's own words follow the exception's name ("Unknown compression method 1 in zTXt chunk")
    with pytest.raises(DataError, match=rf"^cannot read image {re.escape(str(path))}: SyntaxError: \S.*zTXt"):
        load_image(path)


def test_load_image_names_a_png_whose_text_chunk_inflates_past_pillows_limit(tmp_path):
    """Pillow refuses a compressed text chunk that inflates past 1 MB with a ValueError (a bomb in the
    metadata): a DataError naming the file, as for any other unreadable image."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "x" * (2 << 20), zip=True)  # 2 MB of text in 2 kB of file
    path = _save(tmp_path / "text.png", Image.new("RGB", (4, 4)), pnginfo=info)
    # Pillow 10.0 capitalises the message ("Decompressed Data Too Large"), later releases do not
    with pytest.raises(
        DataError,
        match=rf"cannot read image {re.escape(str(path))}: ValueError: (?i:decompressed data too large)",
    ):
        load_image(path)


# ------------------------------------------------------------------------------ transforms
def test_eval_transform_resizes_by_crop_pct_and_normalizes():
    model = _ModelWithCfg(224, 0.875, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    cfg = resolve_data_config(model)
    assert cfg["interpolation"] == "bicubic" and cfg["crop_pct"] == 0.875
    tf = build_transform(cfg, train=False)
    # 300x400 image: shorter side to floor(224 / 0.875) = 256, then a 224 center crop
    resize = tf.transforms[0]
    assert resize.size == 256
    img = Image.new("RGB", (400, 300), (255, 128, 0))
    x = tf(img)
    assert x.shape == (3, 224, 224)
    expected = [(255 / 255 - 0.485) / 0.229, (128 / 255 - 0.456) / 0.224, (0 - 0.406) / 0.225]
    assert x.mean(dim=(1, 2)).tolist() == pytest.approx(expected, abs=1e-4)


def _gray_model(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> nn.Module:
    model = _ModelWithCfg(224, 0.875, mean=mean, std=std)
    model.in_chans = 1
    return model


def test_a_grayscale_model_reads_the_luma_normalized_by_luma_weighted_statistics():
    cfg = resolve_data_config(_gray_model())
    assert cfg["input_size"] == (1, 224, 224)
    # ITU-R 601-2 weights (PIL's "L") of the RGB statistics
    assert cfg["mean"] == pytest.approx((0.299 * 0.485 + 0.587 * 0.456 + 0.114 * 0.406,))
    assert cfg["std"] == pytest.approx((0.299 * 0.229 + 0.587 * 0.224 + 0.114 * 0.225,))
    (mean,), (std,) = cfg["mean"], cfg["std"]
    img = Image.new("RGB", (400, 300), (255, 128, 0))
    x = build_transform(cfg, train=False)(img)
    assert x.shape == (1, 224, 224)
    luma = (0.299 * 255 + 0.587 * 128 + 0.114 * 0) / 255
    torch.testing.assert_close(x, torch.full_like(x, (luma - mean) / std), atol=1e-5, rtol=0)
    # PIL's own conversion gives the same up to its rounding to 8 bits
    pil_luma = img.convert("L").getpixel((0, 0)) / 255
    assert abs(x[0, 0, 0].item() - (pil_luma - mean) / std) <= 0.5 / 255 / std
    # a grayscale file (read as RGB, three equal channels) reaches the model as its own values
    gray = build_transform(cfg, train=False)(Image.new("L", (300, 300), 77).convert("RGB"))
    torch.testing.assert_close(gray, torch.full_like(gray, (77 / 255 - mean) / std), atol=1e-5, rtol=0)


def test_a_grayscale_model_is_augmented_in_rgb_and_erased_in_its_channel():
    cfg = resolve_data_config(_gray_model(mean=(0.5,), std=(0.5,)))  # one value for all of RGB
    assert cfg["mean"] == (0.5,) and cfg["std"] == (0.5,)
    img = Image.effect_noise((300, 300), 60).convert("RGB")
    eval_x = build_transform(cfg, train=False)(img)
    assert torch.equal(build_transform(cfg, train=True, aug=AugmentConfig())(img), eval_x)
    aug = AugmentConfig(auto_augment="rand-m9-mstd0.5-inc1", re_prob=1.0, hflip=0.5, random_crop=True)
    train = build_transform(cfg, train=True, aug=aug)
    names = [type(t).__name__ for t in train.transforms]
    # RandAugment sees the RGB image; random erasing (every time, p=1) the luma channel
    assert names.index("RandAugment") < names.index("LumaChannel") < names.index("RandomErasing")
    assert train(img).shape == (1, 224, 224)
    # random erasing alone (every time, p=1): per-pixel normal values replace a patch of the one channel
    erase = build_transform(cfg, train=True, aug=AugmentConfig(re_prob=1.0))
    torch.manual_seed(0)
    random.seed(0)
    white = erase(Image.new("RGB", (300, 300), (255, 255, 255)))
    assert white.shape == (1, 224, 224)
    erased = white != 1.0  # the normalized white is (1 - 0.5) / 0.5
    assert 0 < erased.float().mean() < 1


def test_images_cannot_feed_a_model_of_other_channel_counts():
    model = _ModelWithCfg(224, 0.875)
    model.in_chans = 4
    cfg = resolve_data_config(model)  # the configuration itself is fine (an HF export writes it)
    assert cfg["input_size"] == (4, 224, 224) and cfg["mean"] == (0.5, 0.5, 0.5)
    for train in (False, True):
        with pytest.raises(UsageError, match="the model takes 4 input channels; images give 3 .RGB. or 1"):
            build_transform(cfg, train=train, aug=AugmentConfig())
    odd = _gray_model(mean=(0.5, 0.5), std=(0.5, 0.5))
    with pytest.raises(UsageError, match=r"a mean or std for RGB images has 1 or 3 values, got \(0.5, 0.5\)"):
        resolve_data_config(odd)


def test_default_augment_is_no_augmentation():
    cfg = resolve_data_config(_ModelWithCfg(32, 1.0), "cifar10")
    img = Image.effect_noise((32, 32), 60).convert("RGB")
    eval_x = build_transform(cfg, train=False)(img)
    assert torch.equal(build_transform(cfg, train=True, aug=AugmentConfig())(img), eval_x)
    assert torch.equal(build_transform(cfg, train=True, aug=None)(img), eval_x)


def test_small_inputs_pad_and_crop_large_inputs_resized_crop():
    aug = AugmentConfig(random_crop=True, hflip=0.5)
    small = build_transform(resolve_data_config(_ModelWithCfg(32, 1.0), "cifar10"), True, aug)
    names = [type(t).__name__ for t in small.transforms]
    assert "RandomCrop" in names and "RandomResizedCropAndInterpolation" not in names
    assert next(t for t in small.transforms if type(t).__name__ == "RandomCrop").padding == 4
    large = build_transform(resolve_data_config(_ModelWithCfg(224, 0.875)), True, aug)
    assert type(large.transforms[0]).__name__ == "RandomResizedCropAndInterpolation"
    # pad-and-crop: over many draws some output rows are the zero padding ((0 - 0.5) / 0.5 = -1)
    torch.manual_seed(0)
    white = Image.new("RGB", (32, 32), (255, 255, 255))
    padded = sum(bool((small(white) == -1).all(dim=0).any()) for _ in range(20))
    assert padded >= 15
    # hflip: with probability 1 every training image is the mirror of what evaluation sees
    cfg = resolve_data_config(_ModelWithCfg(32, 1.0), "cifar10")
    flipping = build_transform(cfg, True, AugmentConfig(random_crop=False, hflip=1.0))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    evaluated = build_transform(cfg, False)
    torch.testing.assert_close(flipping(image), evaluated(ImageOps.mirror(image)))
    assert not torch.allclose(flipping(image), evaluated(image))


def test_large_input_augmentations_take_the_configured_flip_scale_and_erasing():
    """Above 64 px the crop is timm's RandomResizedCrop: the options reach it, and timm's defaults (a
    0.5 flip, the 0.08 area floor) do not stand in for them."""
    cfg = resolve_data_config(_ModelWithCfg(96, 0.875))

    def steps(**options) -> dict[str, object]:
        tf = build_transform(cfg, True, AugmentConfig(random_crop=True, **options))
        return {type(t).__name__: t for t in tf.transforms}

    assert "RandomHorizontalFlip" not in steps(hflip=0.0)  # timm would flip half the images
    assert steps(hflip=1.0)["RandomHorizontalFlip"].p == 1.0
    assert steps(scale=(0.35, 1.0))["RandomResizedCropAndInterpolation"].scale == (0.35, 1.0)
    erasing = steps(re_prob=0.25)["RandomErasing"]
    assert erasing.probability == 0.25 and erasing.mode == "pixel"  # per-pixel noise, as the paper's recipe
    assert "RandomErasing" not in steps()
    # the flip, seen in the pixels: with p=1 every training image is mirrored left to right
    flipping = build_transform(cfg, True, AugmentConfig(random_crop=True, hflip=1.0, scale=(1.0, 1.0)))
    ramp = Image.fromarray(np.tile(np.arange(96, dtype=np.uint8) * 2, (96, 1)))
    torch.manual_seed(0)
    row = flipping(ramp.convert("RGB"))[0, 48]
    assert row[0] > row[-1]  # the bright right edge of the ramp is now on the left


@pytest.mark.parametrize("size", [32, 96])
def test_color_jitter_reaches_the_training_pipeline_at_small_and_large_inputs(size):
    """``--color-jitter 0.4`` is timm's ColorJitter with brightness, contrast and saturation drawn from
    [0.6, 1.4] (no hue), after either crop; None (the default) adds none, and 0 adds one that changes
    nothing. With auto_augment timm drops it (RandAugment does the colour work), as AugmentConfig says."""
    cfg = resolve_data_config(_ModelWithCfg(size, 0.875))

    def jitters(**options) -> list[tuple]:
        """(brightness, contrast, saturation, hue) of each ColorJitter step of the training pipeline."""
        tf = build_transform(cfg, True, AugmentConfig(random_crop=True, **options))
        return [(t.brightness, t.contrast, t.saturation, t.hue) for t in tf.transforms
                if type(t).__name__ == "ColorJitter"]  # fmt: skip

    assert jitters(color_jitter=0.4) == [((0.6, 1.4), (0.6, 1.4), (0.6, 1.4), None)]
    assert jitters() == [] and jitters(color_jitter=None) == []
    assert all(factors == (None,) * 4 for factors in jitters(color_jitter=0))
    assert jitters(color_jitter=0.4, auto_augment="rand-m9-mstd0.5-inc1") == []


def test_rand_augment_posterize_to_zero_bits_gives_black():
    cfg = resolve_data_config(_ModelWithCfg(32, 1.0), "cifar10")
    tf = build_transform(cfg, True, AugmentConfig(auto_augment="rand-m10-mstd0-inc1"))
    ops = next(t for t in tf.transforms if type(t).__name__ == "RandAugment").ops
    posterize = next(op for op in ops if op.name == "PosterizeIncreasing")
    posterize.prob = 1.0
    img = Image.new("RGB", (8, 8), (200, 100, 50))
    assert np.asarray(posterize(img)).max() == 0  # magnitude 10: keep 0 bits (Pillow 13 would raise)
    assert _posterize_keep_msb(img, 1).getpixel((0, 0)) == (128, 0, 0)


def test_augment_config_rejects_bad_values():
    with pytest.raises(UsageError, match="re_prob"):
        AugmentConfig(re_prob=1.5)
    with pytest.raises(UsageError, match="scale"):
        AugmentConfig(scale=(0.5, 0.2))
    # checked by cvt train's validation only, before: an internal ValueError (unpacking, ColorJitter)
    with pytest.raises(UsageError, match=r"'scale' must be two numbers 0 < lo <= hi <= 1, got \(0\.5,\)"):
        AugmentConfig(scale=(0.5,))
    with pytest.raises(UsageError, match="'color_jitter' must be >= 0 when given, got -0.4"):
        AugmentConfig(color_jitter=-0.4)
    cfg = resolve_data_config(_ModelWithCfg(32, 1.0), "cifar10")
    with pytest.raises(UsageError, match="auto_augment must be a timm policy .* got 'bogus'"):
        build_transform(cfg, True, AugmentConfig(auto_augment="bogus"))


def test_augment_config_bounds_are_inclusive_where_the_option_allows_the_value():
    """Probabilities may be 0 and 1, the crop area 1 and the smoothing 0; a smoothing of 1 (uniform
    targets: nothing to learn) and a crop area of 0 (an empty crop) are refused."""
    edge = AugmentConfig(re_prob=1.0, hflip=1.0, label_smoothing=0.0, scale=(1.0, 1.0), mixup=0.0)
    assert (edge.re_prob, edge.hflip, edge.label_smoothing, edge.scale) == (1.0, 1.0, 0.0, (1.0, 1.0))
    assert AugmentConfig(label_smoothing=0.99).label_smoothing == 0.99
    with pytest.raises(UsageError, match=r"'label_smoothing' must be in \[0, 1\), got 1\.0"):
        AugmentConfig(label_smoothing=1.0)
    with pytest.raises(UsageError, match=r"'scale' must be two numbers .*, got \(0\.0, 1\.0\)"):
        AugmentConfig(scale=(0.0, 1.0))


def test_build_mixup_soft_targets():
    assert build_mixup(AugmentConfig(), 10) is None
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    off, on = 0.1 / 4, 1 - 0.1 + 0.1 / 4  # smoothing spreads 0.1 over the 4 classes

    def mixed(aug: AugmentConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """Images, their mixed version and targets, and the weight λ of each image's own label."""
        images = torch.rand(6, 3, 8, 8)
        out, target = build_mixup(aug, 4)(images.clone(), labels.clone())  # timm mixes in place
        assert target.shape == (6, 4) and target.sum(dim=1).tolist() == pytest.approx([1.0] * 6)
        assert target.min() >= off - 1e-6
        lam = float((target[0, 0] - off) / (on - off))  # image 0 (label 0) mixed with image 5 (label 1)
        assert target[0, 1].item() == pytest.approx((1 - lam) * on + lam * off)
        return images, out, target, lam

    torch.manual_seed(0)
    np.random.seed(0)  # timm draws λ and the cutmix box from numpy's global generator
    # mixup: every pixel is the λ-blend of the image and its partner in the flipped batch
    images, out, _, lam = mixed(AugmentConfig(mixup=0.8, label_smoothing=0.1))
    assert 0 < lam < 1
    torch.testing.assert_close(out, lam * images + (1 - lam) * images.flip(0))
    # cutmix: every pixel comes whole from one of the two, the image's own in the fraction λ
    images, out, _, lam = mixed(AugmentConfig(cutmix=1.0, label_smoothing=0.1))
    own, partner = out == images, out == images.flip(0)
    assert (own | partner).all() and 0 < own[0].float().mean().item() < 1
    assert own[0].float().mean().item() == pytest.approx(lam)
    # the smoothing option is the one spread, not timm's default 0.1: a class neither image has
    # gets smoothing / classes
    for smoothing in (0.0, 0.3):
        _, target = build_mixup(AugmentConfig(mixup=0.8, label_smoothing=smoothing), 4)(
            torch.rand(6, 3, 8, 8), labels.clone()
        )
        assert target[0, 2:].tolist() == pytest.approx([smoothing / 4] * 2)  # image 0: labels 0 and 1


def test_training_without_a_random_crop_resizes_as_the_evaluation_does():
    """Without random_crop the training geometry is the configuration's eval resize: its crop mode (the
    whole image squashed here, not a center crop) and its interpolation (bicubic upscaling of a small
    image, not bilinear)."""
    cfg = dict(input_size=(3, 32, 48), interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3,
               crop_pct=1.0, crop_mode="squash")  # fmt: skip
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 20, 3), dtype=np.uint8))
    expected = np.array(image.resize((48, 32), Image.Resampling.BICUBIC))
    expected = (torch.from_numpy(expected).permute(2, 0, 1).float() / 255 - 0.5) / 0.5
    for transform in (
        build_transform(cfg, train=False),
        build_transform(cfg, train=True, aug=AugmentConfig()),
    ):
        torch.testing.assert_close(transform(image), expected, rtol=0, atol=1e-5)


def test_evaluation_ignores_the_augmentations():
    cfg = resolve_data_config(_ModelWithCfg(32, 1.0), "cifar10")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    aug = AugmentConfig(random_crop=True, hflip=1.0, re_prob=1.0, color_jitter=0.4, precrop=8)
    torch.testing.assert_close(build_transform(cfg, False, aug)(image), build_transform(cfg, False)(image))


def test_precrop_applies_with_random_crop_only_and_at_any_input_size():
    """precrop replaces RandomResizedCrop above 64 px too; without random_crop it changes nothing."""
    steps = build_transform(resolve_data_config(_ModelWithCfg(96, 1.0)), True,
                            AugmentConfig(random_crop=True, precrop=32)).transforms  # fmt: skip
    assert type(steps[0]).__name__ == "Resize" and steps[0].size == (128, 128)
    assert type(steps[1]).__name__ == "RandomCrop" and steps[1].size == (96, 96)
    assert "RandomResizedCropAndInterpolation" not in [type(t).__name__ for t in steps]
    cfg = resolve_data_config(_ModelWithCfg(32, 1.0), "cifar10")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    no_crop = build_transform(cfg, True, AugmentConfig(precrop=32))
    torch.testing.assert_close(no_crop(image), build_transform(cfg, False)(image), rtol=0, atol=0)


def test_small_input_pad_and_crop_takes_an_eighth_of_the_longer_side_and_the_flip_probability():
    cfg = resolve_data_config(_ModelWithCfg(16, 1.0), "cifar10", img_size=(32, 48))
    tf = build_transform(cfg, True, AugmentConfig(random_crop=True, hflip=0.3))
    steps = {type(t).__name__: t for t in tf.transforms}
    assert steps["RandomCrop"].padding == 6 and steps["RandomCrop"].size == (32, 48)
    assert steps["RandomHorizontalFlip"].p == 0.3  # not torchvision's default 0.5


def test_auto_augment_v0_posterize_to_zero_bits_gives_black():
    """AutoAugment's ops sit in sub-policies, not in RandAugment's flat list: they keep 0 bits too."""
    cfg = resolve_data_config(_ModelWithCfg(32, 1.0), "cifar10")
    tf = build_transform(cfg, True, AugmentConfig(auto_augment="v0"))
    policy = next(t for t in tf.transforms if type(t).__name__ == "AutoAugment").policy
    posterize = [op for sub in policy for op in sub if op.name == "Posterize"]
    assert posterize
    img = Image.new("RGB", (8, 8), (200, 100, 50))
    for op in posterize:
        op.prob, op.magnitude = 1.0, 0  # level 0: keep int(0 / 10 * 4) = 0 bits
        assert np.asarray(op(img)).max() == 0


def test_load_input_decodes_at_least_the_eval_resize_of_the_input(tmp_path, monkeypatch):
    """At crop_pct 0.875 a 224 input is cropped from a 256 resize: the decode must reach 256, not 224."""
    from cvt.data import transforms as transforms_module

    asked: list[int] = []
    real_load = transforms_module.load_image

    def recording_load(path: Path, min_side: int) -> Image.Image:
        asked.append(min_side)
        return real_load(path, min_side=min_side)

    monkeypatch.setattr(transforms_module, "load_image", recording_load)
    path = _save(tmp_path / "x.png", Image.new("RGB", (300, 300), (255, 128, 0)))
    assert load_input(path, resolve_data_config(_ModelWithCfg(224, 0.875))).shape == (1, 3, 224, 224)
    assert asked == [256]


@pytest.mark.parametrize("option", ["precrop", "mixup", "cutmix"])
def test_augment_config_refuses_negative_sizes_and_alphas(option):
    with pytest.raises(UsageError, match=rf"option '{option}' must be >= 0, got -1"):
        AugmentConfig(**{option: -1})
    assert getattr(AugmentConfig(**{option: 0}), option) == 0


def test_augment_config_refuses_a_crop_area_beyond_the_whole_image():
    with pytest.raises(UsageError, match=r"'scale' must be two numbers .*, got \(0\.5, 1\.5\)"):
        AugmentConfig(scale=(0.5, 1.5))


# ---------------------------------------------------------------------------------- loader
def test_loader_order_is_seeded_and_batches_checked():
    ds = torch.utils.data.TensorDataset(torch.arange(20))

    def order(seed):
        return torch.cat([b[0] for b in build_loader(ds, 4, train=True, seed=seed)]).tolist()

    assert order(3) == order(3) and order(3) != order(4) and sorted(order(3)) == list(range(20))
    eval_batches = [b[0].tolist() for b in build_loader(ds, 6, train=False)]
    assert eval_batches[0] == [0, 1, 2, 3, 4, 5] and eval_batches[-1] == [18, 19]  # no drop, no shuffle
    assert len(build_loader(ds, 6, train=True)) == 3  # drop_last for training
    with pytest.raises(UsageError, match=r"batch size 32 is larger than the data set \(20 images"):
        build_loader(ds, 32, train=True)
    with pytest.raises(UsageError, match=r"batch size 21 is larger .* use --batch-size 20 or less"):
        build_loader(ds, 21, train=True)
    # the whole data set in one batch is the largest training batch
    (whole,) = [b[0].tolist() for b in build_loader(ds, 20, train=True, seed=3)]
    assert sorted(whole) == list(range(20))
    assert [b[0].tolist() for b in build_loader(ds, 1, train=False)][:2] == [[0], [1]]  # the smallest batch
    with pytest.raises(UsageError, match="batch size must be >= 1"):
        build_loader(ds, 0, train=False)


def test_training_loader_reads_in_its_samplers_order():
    """cvt train's loader: its ResumableSampler orders (and shards) the epoch; the owner checks its
    length, which is 0 for a run resumed at the very end of an epoch."""
    from cvt.engine.sampler import ResumableSampler

    ds = torch.utils.data.TensorDataset(torch.arange(20))
    sampler = ResumableSampler(len(ds), batch_size=4, seed=1)
    sampler.set_position(epoch=2, batches_done=1)
    loader = build_loader(ds, 4, train=True, sampler=sampler, seed=7)
    assert torch.cat([b[0] for b in loader]).tolist() == list(sampler)  # the sampler's order, no reshuffle
    assert loader.drop_last
    sampler.set_position(epoch=2, batches_done=sampler.batches_per_epoch)
    assert list(build_loader(ds, 4, train=True, sampler=sampler)) == []
    assert build_loader(ds, 4, train=False, pin_memory=True).pin_memory
    assert not build_loader(ds, 4, train=False, pin_memory=False).pin_memory


def test_only_evaluation_loaders_keep_their_workers():
    """A training loader is made for one epoch: its workers go with it, not later (during validation)."""
    ds = torch.utils.data.TensorDataset(torch.arange(20))
    assert build_loader(ds, 4, train=False, num_workers=1).persistent_workers
    assert not build_loader(ds, 4, train=True, num_workers=1).persistent_workers
    assert not build_loader(ds, 4, train=False).persistent_workers  # no workers


def test_seed_generators_takes_seeds_beyond_numpys_range_and_seeds_gpus_on_request(monkeypatch):
    from cvt.data.seeding import seed_generators

    seeded_gpus = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", seeded_gpus.append)
    seed_generators(2**32 + 5, cuda=True)  # cvt train's per-rank seeds grow with the step
    first = (torch.rand(1).item(), np.random.rand())
    assert seeded_gpus == [2**32 + 5]
    np.random.seed(5)
    assert first[1] == np.random.rand()  # numpy takes the seed mod 2**32
    seed_generators(2**32 + 5)
    assert torch.rand(1).item() == first[0] and seeded_gpus == [2**32 + 5]  # the CPU generator only


def test_build_dataset_rejects_unknown_names():
    with pytest.raises(UsageError, match="dataset must be one of digits, cifar10"):
        build_dataset("mnist", None, "train")
    with pytest.raises(UsageError, match="split must be one of train, val"):
        build_dataset("digits", None, "test")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_dataset("digits", None, "val")


def test_published_variants_resolve_to_the_official_preprocessing():
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    from cvt import create_model

    with torch.device("meta"):  # shapes only
        at_224, at_384 = create_model("cvt_13"), create_model("cvt_21.msft_in22k_ft_in1k_384")
    cfg = resolve_data_config(at_224)
    assert (cfg["input_size"], cfg["crop_pct"], cfg["interpolation"]) == ((3, 224, 224), 0.875, "bicubic")
    assert (cfg["mean"], cfg["std"]) == (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    assert resolve_data_config(at_384)["input_size"] == (3, 384, 384)
    assert resolve_data_config(at_384)["crop_pct"] == 1.0


def test_a_requested_size_crops_as_the_official_evaluation_at_that_size():
    """``img_size`` (``--img-size``) changes the crop with the size, as building the model at that size
    does; a crop of another origin, and the small-image data sets' whole image, stay."""
    from cvt import create_model

    with torch.device("meta"):  # shapes only
        at_224, at_384 = create_model("cvt_13"), create_model("cvt_21.msft_in22k_ft_in1k_384")

    def resolved(model, size, dataset=None):
        cfg = resolve_data_config(model, dataset, img_size=size)
        return cfg["input_size"], cfg["crop_pct"], cfg["crop_mode"]

    assert resolved(at_224, (384, 384)) == ((3, 384, 384), 1.0, "squash")
    assert resolved(at_384, (224, 224)) == ((3, 224, 224), 0.875, "center")
    assert resolved(at_384, (288, 256)) == ((3, 288, 256), 1.0, "squash")
    assert resolved(at_224, None) == ((3, 224, 224), 0.875, "center")  # the size the model was built for
    # not the official crop: kept at any size
    assert resolved(_ModelWithCfg(224, 0.9), (384, 384)) == ((3, 384, 384), 0.9, "center")
    assert resolved(at_224, (384, 384), "cifar10") == ((3, 384, 384), 1.0, "center")
    assert resolved(at_384, (224, 224), "cifar10") == ((3, 224, 224), 1.0, "center")


@pytest.mark.parametrize("height, width", [(16, 16), (16, 24)])
def test_precrop_resizes_then_crops_at_a_random_offset_as_the_official_fine_tuning(height, width):
    """FINETUNE without USE_TRAIN_AUG: T.Resize((crop + 32, crop + 32)), then T.RandomCrop(crop); a
    non-square input size (H, W) is padded on both sides, (H + 32, W + 32)."""
    data_cfg = resolve_data_config(_ModelWithCfg(16, 1.0), "cifar10", img_size=(height, width))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 20, 3), dtype=np.uint8))
    transform = build_transform(data_cfg, train=True, aug=AugmentConfig(random_crop=True, precrop=4))
    resized = image.resize((width + 4, height + 4), Image.Resampling.BICUBIC)  # the aspect not kept
    full_cfg = resolve_data_config(_ModelWithCfg(16, 1.0), "cifar10", img_size=(height + 4, width + 4))
    full = build_transform(full_cfg, train=False)(resized)
    offsets = set()
    for seed in range(20):
        torch.manual_seed(seed)
        got = transform(image)
        assert got.shape == (3, height, width)
        matches = [
            (i, j) for i in range(5) for j in range(5)
            if torch.allclose(got, full[:, i : i + height, j : j + width], atol=1e-5)
        ]  # fmt: skip
        assert len(matches) == 1
        offsets.add(matches[0])
    assert len(offsets) > 5  # the offset is drawn, not fixed
    with pytest.raises(UsageError, match="'precrop' must be >= 0"):
        AugmentConfig(precrop=-1)


def test_a_timm_eval_pipeline_of_another_shape_is_an_explicit_error(monkeypatch):
    """The pad-and-crop reuses timm's eval steps without their last (a PIL-to-tensor step); that was an
    ``assert``, gone under ``python -O``, which then dropped whatever step timm had put last."""
    import timm
    import timm.data.transforms_factory as factory
    from torchvision import transforms

    monkeypatch.setattr(
        factory, "transforms_imagenet_eval", lambda *a, **k: transforms.Compose([transforms.ToTensor()])
    )
    data_cfg = resolve_data_config(_ModelWithCfg(16, 1.0), "cifar10")
    with pytest.raises(RuntimeError, match=rf"timm {timm.__version__}'s eval pipeline no longer ends with"):
        build_transform(data_cfg, train=True, aug=AugmentConfig(random_crop=True))


def test_384_models_are_evaluated_on_the_whole_image_squashed():
    """The official 384 evaluation (``TEST.CENTER_CROP: False``) is ``T.Resize((384, 384))``: the whole
    image, its aspect squashed, as transformers' processor from 384 px; a center crop would cut the
    sides of a landscape image away."""
    from cvt import create_model

    with torch.device("meta"):
        model = create_model("cvt_13.msft_in1k_384")
    data_cfg = resolve_data_config(model)
    image = Image.new("RGB", (512, 384), (128, 128, 128))
    image.paste((255, 0, 0), (0, 0, 64, 384))  # a red band down the left side
    got = build_transform(data_cfg, train=False)(image)
    expected = image.resize((384, 384), Image.Resampling.BICUBIC)  # the whole image, 512 wide to 384
    mean, std = torch.tensor(data_cfg["mean"])[:, None, None], torch.tensor(data_cfg["std"])[:, None, None]
    expected = (torch.from_numpy(np.array(expected)).permute(2, 0, 1).float() / 255 - mean) / std
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert got[0, :, :40].mean() > 2  # the band is there: red, normalized


def test_imagefolder_with_given_classes_keeps_training_indices(tmp_path):
    for name in ("ant", "bee", "cat"):
        _save(tmp_path / "train" / name / "0.png", Image.new("RGB", (4, 4)))
    _save(tmp_path / "val" / "cat" / "0.png", Image.new("RGB", (4, 4)))  # val has only "cat"
    train = build_dataset("imagefolder", tmp_path, "train")
    assert build_dataset("imagefolder", tmp_path, "val").targets == [0]  # on its own, cat would be 0
    val = build_dataset("imagefolder", tmp_path, "val", classes=train.classes)
    assert val.classes == ["ant", "bee", "cat"] and val.targets == [2]
    _save(tmp_path / "val" / "dog" / "0.png", Image.new("RGB", (4, 4)))
    with pytest.raises(DataError, match="class folder.*dog.*not among the 3 given classes"):
        build_dataset("imagefolder", tmp_path, "val", classes=train.classes)
    with pytest.raises(DataError, match="class names must be unique, cat given more than once"):
        build_dataset("imagefolder", tmp_path, "val", classes=["cat", "cat", "dog"])


def test_imagefolder_with_only_unreadable_files_says_so(tmp_path):
    for name in ("cat", "dog"):
        (tmp_path / "train" / name).mkdir(parents=True)
        (tmp_path / "train" / name / "0.png").write_bytes(b"")
    with pytest.warns(UserWarning, match="skipping 2"), pytest.raises(DataError, match="none of its 2 image"):
        build_dataset("imagefolder", tmp_path, "train", skip_bad_images=True)


def test_imagefolder_skips_hidden_folders_and_files(tmp_path):
    _make_folder(tmp_path)
    train = tmp_path / "train"
    # Jupyter's checkpoint folder, an AppleDouble file (not an image), a dot-file and a dot-folder
    _save(train / ".ipynb_checkpoints" / "0.png", Image.new("RGB", (4, 4)))
    (train / "cat" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble metadata")
    _save(train / "cat" / ".hidden.png", Image.new("RGB", (4, 4)))
    _save(train / "dog" / ".thumbs" / "0.png", Image.new("RGB", (4, 4)))
    ds = build_dataset("imagefolder", tmp_path, "train")
    assert ds.classes == ["cat", "dog"] and ds.targets == [0, 0, 0, 1, 1, 1]
    assert all("/." not in path for path, _ in ds.samples)
    assert [ds[i][1] for i in range(len(ds))] == ds.targets  # every item decodes
    # cvt eval's look at the class folders agrees with the data set's
    assert image_folder_classes(train) == ["cat", "dog"]
    (train / "cat").rename(train / ".cat")
    (train / "dog").rename(train / ".dog")
    assert image_folder_classes(train) is None
    with pytest.raises(DataError, match="no class sub-folders"):
        build_dataset("imagefolder", tmp_path, "train")


def test_imagefolder_follows_linked_folders_and_survives_link_loops(tmp_path):
    _make_folder(tmp_path)
    _save(tmp_path / "elsewhere" / "more" / "9.png", Image.new("RGB", (4, 4)))
    os.symlink(tmp_path / "elsewhere", tmp_path / "train" / "cat" / "linked")
    (tmp_path / "train" / "dog" / "sub").mkdir()
    os.symlink("..", tmp_path / "train" / "dog" / "sub" / "back")  # dog/sub/back/sub/back/… never ends
    for folder in (tmp_path / "train", tmp_path / "train" / "dog"):
        os.symlink("knot", folder / "knot")  # a link onto itself (ELOOP), passed over as a broken link
    ds = build_dataset("imagefolder", tmp_path, "train")
    assert ds.classes == ["cat", "dog"]
    assert ds.targets == [0, 0, 0, 0, 1, 1, 1]  # each dog image once
    assert str(tmp_path / "train" / "cat" / "linked" / "more" / "9.png") in [p for p, _ in ds.samples]


def test_imagefolder_empty_class_folder_warns_unless_classes_are_given(tmp_path):
    _make_folder(tmp_path)
    (tmp_path / "train" / "bird").mkdir()
    (tmp_path / "train" / "emu").mkdir()
    (tmp_path / "train" / "emu" / "notes.txt").write_text("no images here")
    with pytest.warns(UserWarning, match=r"class folder\(s\) bird, emu .*no image files") as record:
        train = build_dataset("imagefolder", tmp_path, "train")
    assert len(record) == 1
    assert train.classes == ["bird", "cat", "dog", "emu"]  # still classes: the warning says so
    # a validation split read with the training classes legitimately lacks some: no warning
    _make_folder(tmp_path, "val", per_class=1)
    (tmp_path / "val" / "bird").mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        val = build_dataset("imagefolder", tmp_path, "val", classes=train.classes)
    assert val.targets == [1, 2]


def test_imagefolder_classes_sort_case_sensitively_as_torchvision(tmp_path):
    for name in ("a", "B"):
        _save(tmp_path / "train" / name / "0.png", Image.new("RGB", (4, 4), (1, 2, 3)))
    assert image_folder_classes(tmp_path / "train") == ["B", "a"]
    ds = build_dataset("imagefolder", tmp_path, "train")
    assert ds.classes == ["B", "a"] and ds.targets == [0, 1]


def test_small_image_variants_resolve_to_their_dataset_statistics():
    from cvt import create_model

    with torch.device("meta"):  # shapes only
        cifar, tiny = create_model("cvt_13_cifar"), create_model("cvt_tiny")
    cfg = resolve_data_config(cifar, "cifar10")
    assert cfg["mean"] == pytest.approx((0.4914, 0.4822, 0.4465), abs=1e-6)
    assert cfg["std"] == pytest.approx((0.2470, 0.2435, 0.2616), abs=1e-6)
    assert (cfg["input_size"], cfg["crop_pct"]) == ((3, 32, 32), 1.0)
    cfg = resolve_data_config(tiny, "cifar10")
    assert (tuple(cfg["mean"]), tuple(cfg["std"])) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100", "digits"])
def test_small_image_datasets_resize_the_whole_image(dataset):
    from cvt import create_model

    with torch.device("meta"):
        model = create_model("cvt_13")
    assert resolve_data_config(model, dataset)["crop_pct"] == 1.0
    assert resolve_data_config(model, "imagefolder")["crop_pct"] == 0.875
    assert resolve_data_config(model)["crop_pct"] == 0.875


@pytest.mark.parametrize(("size", "resized_crop"), [(63, False), (64, False), (65, True), (96, True)])
def test_random_resized_crop_only_above_64_pixels(size, resized_crop):
    aug = AugmentConfig(random_crop=True)
    tf = build_transform(resolve_data_config(_ModelWithCfg(size, 1.0), "cifar10"), True, aug)
    names = [type(t).__name__ for t in tf.transforms]
    assert ("RandomResizedCropAndInterpolation" in names) is resized_crop
    assert ("RandomCrop" in names) is not resized_crop
    assert tf(Image.new("RGB", (size, size), (9, 9, 9))).shape == (3, size, size)


@pytest.mark.parametrize("height, width", [(32, 96), (96, 32)])
def test_a_non_square_input_is_small_only_if_its_longer_side_is(height, width):
    """A side above 64 px makes the input ImageNet-size: RandomResizedCrop (the pad-and-crop is for
    32×32-like inputs); no flip step with hflip 0, as for small inputs."""
    cfg = resolve_data_config(_ModelWithCfg(16, 1.0), "cifar10", img_size=(height, width))
    tf = build_transform(cfg, True, AugmentConfig(random_crop=True))
    names = [type(t).__name__ for t in tf.transforms]
    assert "RandomResizedCropAndInterpolation" in names and "RandomCrop" not in names
    assert "RandomHorizontalFlip" not in names
    assert tf(Image.new("RGB", (48, 48), (9, 9, 9))).shape == (3, height, width)
    small = build_transform(resolve_data_config(_ModelWithCfg(32, 1.0), "cifar10"), True, AugmentConfig())
    assert "RandomHorizontalFlip" not in [type(t).__name__ for t in small.transforms]


def test_close_workers_ends_an_evaluation_loaders_worker_processes():
    """An evaluation loader keeps its workers between passes; close_workers ends them now, and the
    loader can still be iterated afterwards (with fresh workers)."""
    import multiprocessing

    from cvt.data.loader import close_workers

    data = torch.utils.data.TensorDataset(torch.arange(12.0))
    earlier = set(multiprocessing.active_children())  # another test's processes may still be ending
    loader = build_loader(data, 4, train=False, num_workers=2)
    assert [x for (batch,) in loader for x in batch.tolist()] == [float(i) for i in range(12)]  # one pass
    workers = [p for p in multiprocessing.active_children() if p.daemon and p not in earlier]
    assert len(workers) == 2  # kept for the next pass
    close_workers(loader)
    assert not any(p.is_alive() for p in workers)
    assert sum(len(b[0]) for b in loader) == 12
    close_workers(loader)


def test_loader_edge_cases_evaluation_batches_samplers_and_empty_batches():
    from cvt.data.loader import close_workers, collate_readable
    from cvt.engine.sampler import ResumableSampler

    ds = torch.utils.data.TensorDataset(torch.arange(6))
    with pytest.raises(UsageError, match="num_workers must be >= 0, got -1"):
        build_loader(ds, 2, train=False, num_workers=-1)
    # evaluation reads every item: a batch larger than the data set is one short batch, not an error
    assert [b[0].tolist() for b in build_loader(ds, 32, train=False)] == [[0, 1, 2, 3, 4, 5]]
    # a sampler's owner checks its batch size: no full batch is an empty epoch (a resume at its end)
    assert list(build_loader(ds, 8, train=True, sampler=ResumableSampler(6, batch_size=8))) == []
    # an evaluation batch of unreadable images only: labels as long as every other batch's
    images, labels = collate_readable([None, None])
    assert images.numel() == 0 and labels.dtype == torch.long
    close_workers(build_loader(ds, 2, train=False, num_workers=1))  # never iterated: no workers to end


_WORKER_TAG = -1


def _tag_worker(worker_id: int) -> None:
    global _WORKER_TAG
    _WORKER_TAG = 100 + worker_id


class _WorkerTags(torch.utils.data.Dataset):
    """Item i: the tag the worker_init_fn left in the process that loads it."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> int:
        return _WORKER_TAG


def test_loader_runs_the_worker_init_fn_in_each_worker():
    from cvt.data.loader import close_workers

    loader = build_loader(_WorkerTags(), 1, train=False, num_workers=2, worker_init_fn=_tag_worker)
    assert [b.item() for b in loader] == [100, 101, 100, 101]  # batch i from worker i % 2
    close_workers(loader)


# --------------------------------------------------------------------------------- sampler
def test_sampler_order_is_a_function_of_seed_and_epoch():
    """Seed 1's epoch 0 is not seed 0's epoch 1: two runs of neighbouring seeds do not share orders."""
    from cvt.engine.sampler import ResumableSampler

    def order(seed: int, epoch: int) -> list[int]:
        sampler = ResumableSampler(20, batch_size=4, seed=seed)
        sampler.set_position(epoch)
        return list(sampler)

    assert order(1, 2) == order(1, 2) and sorted(order(1, 2)) == list(range(20))
    assert len({tuple(order(seed, epoch)) for seed in (0, 1) for epoch in (0, 1)}) == 4


def test_sampler_ranks_share_each_global_batch_and_a_resume_continues_the_epoch():
    """Rank r's k-th batch of B holds, with the other ranks', exactly the k-th batch of R * B of one
    process; 22 samples in global batches of 4 (two ranks of 2) are 5 batches, the last 2 dropped."""
    from cvt.engine.sampler import ResumableSampler

    one = ResumableSampler(22, batch_size=4, seed=3)
    ranks = [ResumableSampler(22, batch_size=2, rank=r, world_size=2, seed=3) for r in range(2)]
    for sampler in (one, *ranks):
        sampler.set_position(epoch=1)
    full, per_rank = list(one), [list(sampler) for sampler in ranks]
    assert len(full) == len(one) == 20 and [len(p) for p in per_rank] == [10, 10]
    assert [ranks[0].batches_per_epoch, ranks[1].batches_per_epoch] == [5, 5]
    for k in range(5):
        step = per_rank[0][2 * k : 2 * k + 2] + per_rank[1][2 * k : 2 * k + 2]
        assert sorted(step) == sorted(full[4 * k : 4 * k + 4])
    # resumed after 3 of its batches, a rank reads the rest of the same order
    ranks[1].set_position(epoch=1, batches_done=3)
    assert list(ranks[1]) == per_rank[1][6:] and len(ranks[1]) == 4


def test_sampler_cuts_the_epoch_to_whole_accumulation_windows():
    from cvt.engine.sampler import ResumableSampler

    sampler = ResumableSampler(22, batch_size=2, accum_steps=3)  # 11 batches: 3 windows of 3
    assert sampler.batches_per_epoch == 9 and len(sampler) == len(list(sampler)) == 18


def test_load_image_scales_a_float_image_by_255_rounded(tmp_path):
    """0.61 is 155.55 levels (156), 0.8 is 204 (values outside 0..1 are refused: the test above)."""
    values = np.array([[0.61, 0.8], [1.0, 0.0]], dtype=np.float32)
    img = load_image(_save(tmp_path / "float.tif", Image.fromarray(values)))
    assert np.asarray(img).transpose(2, 0, 1).tolist() == [[[156, 204], [255, 0]]] * 3


def test_load_image_keeps_the_top_8_bits_of_a_32_bit_integer_image(tmp_path):
    """A 32-bit integer TIFF (PIL mode I) holds 16-bit data, as a 16-bit PNG does: 25600 is 100 of 255
    (PIL's own conversion clips it to 255); values past 16 bits or negative are refused (above)."""
    values = np.array([[0, 25600], [65535, 255]], dtype=np.int32)
    path = _save(tmp_path / "deep32.tif", Image.fromarray(values))
    assert Image.open(path).mode == "I"
    assert np.asarray(load_image(path)).transpose(2, 0, 1).tolist() == [[[0, 100], [255, 0]]] * 3


def test_load_image_decodes_an_indivisible_jpeg_one_pixel_under_4096_squared_in_full(tmp_path):
    """4097x4095 is 4096² - 1 pixels, and its sides share no factor: decoded in full, not at an eighth."""
    path = _save(tmp_path / "odd.jpg", Image.new("L", (4097, 4095), 90), quality=50)
    img = load_image(path, min_side=200)
    assert img.size == (4097, 4095) and img.getpixel((4096, 4094)) == (90, 90, 90)
