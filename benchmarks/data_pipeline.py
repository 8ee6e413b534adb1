"""Throughput of the data pipeline and memory of ``cvt predict``'s image loading (not a test).

Run on a quiet machine: ``.venv/bin/python benchmarks/data_pipeline.py [--items N]``. Prints, one
line each, the time per item of: the digits eval and train transforms (8×8 → 32×32), a CIFAR-size
train transform with the paper's augmentation, decoding + eval transform of 500×375 JPEGs at 224
(an ImageNet-size photo), and the peak memory added by loading a 10,000×10,000 JPEG for a 224 model.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from cvt.benchmark import peak_rss_mb, settled_rss_mb
from cvt.data import AugmentConfig, build_dataset, build_transform, load_input, resolve_data_config
from cvt.data.datasets import ArrayImageDataset
from cvt.errors import run_script
from cvt.models import create_model


def _per_item_us(dataset: torch.utils.data.Dataset, items: int) -> float:
    """Mean microseconds per ``dataset[i]`` over ``items`` reads (after one warm-up read)."""
    dataset[0]
    start = time.perf_counter()
    for i in range(items):
        dataset[i % len(dataset)]
    return (time.perf_counter() - start) / items * 1e6


def main() -> None:
    """Measure and print."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=2000, help="items read per measurement")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the data loader's per-worker setting

    # what cvt train and cvt predict use: cvt_tiny on digits (32x32), CvT-13 at 224 (ImageNet)
    with torch.device("meta"):
        small = resolve_data_config(create_model("cvt_tiny"), "digits")
        large = resolve_data_config(create_model("cvt_13"))
    digits = build_dataset("digits", None, "train")
    for label, transform in (
        ("digits eval 8->32", build_transform(small, train=False)),
        ("digits train crop+flip", build_transform(small, True, AugmentConfig(random_crop=True, hflip=0.5))),
    ):
        digits.transform = transform
        print(f"{label:<32} {_per_item_us(digits, args.items):8.0f} us/item")

    paper = AugmentConfig(auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25, hflip=0.5, random_crop=True)
    cifar_like = ArrayImageDataset(
        torch.randint(0, 256, (256, 32, 32, 3), dtype=torch.uint8).numpy(), [0] * 256, ["x"],
        build_transform(small, True, paper),
    )  # fmt: skip
    print(f"{'32x32 train, paper recipe':<32} {_per_item_us(cifar_like, args.items):8.0f} us/item")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for i in range(20):
            path = root / "val" / "c" / f"{i}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.effect_noise((500, 375), 40 + i).convert("RGB").save(path, quality=90)
        folder = build_dataset("imagefolder", root, "val", build_transform(large, train=False))
        print(f"{'JPEG 500x375 -> 224 eval':<32} {_per_item_us(folder, min(args.items, 400)):8.0f} us/item")

        huge = root / "huge.jpg"
        # written by a child process, so this one's peak memory does not include the 100 MB image
        subprocess.run([sys.executable, "-c", "import sys; from PIL import Image; "
                        "Image.new('L', (10_000, 10_000), 128).save(sys.argv[1], quality=50)", str(huge)],
                       check=True)  # fmt: skip
        before = settled_rss_mb()  # the peak restarts here (ru_maxrss would keep the process's old peak)
        start = time.perf_counter()
        load_input(huge, large)
        seconds = time.perf_counter() - start
        grown = peak_rss_mb() - before
        print(f"{'10000x10000 JPEG -> 224 input':<32} {seconds * 1e3:8.0f} ms, peak RSS +{grown:.0f} MB")


if __name__ == "__main__":
    run_script(main, "data_pipeline.py")
