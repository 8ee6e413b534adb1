"""The seed's command: ``python train.py --model cvt --name cvt --sched cosine --epochs 200 --lr 0.01``.

It is ``cvt train --config seed_cifar10 ...``: the shipped recipe ``seed_cifar10.yaml`` holds the seed
trainer's defaults (CIFAR-10 from ``./data/cifar-10-batches-py``, downloaded only with ``--download``;
batch 128; SGD with momentum 0.9 and weight decay 5e-4; no augmentation; 200 epochs at lr 0.01,
cosine), and every ``cvt train`` flag overrides it (``--data-dir``, ``--output``, ``--resume`` …).
The run folder is ``runs/<name>``.
"""

from __future__ import annotations

import sys

from cvt.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["train", "--config", "seed_cifar10", *sys.argv[1:]]))
