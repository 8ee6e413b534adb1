"""The seed's command: ``python train.py --model cvt --name cvt --sched cosine --epochs 200 --lr 0.01``.

It is ``cvt train --config seed_cifar10 ...``: the shipped recipe ``seed_cifar10.yaml`` holds the seed
trainer's defaults (CIFAR-10 from ``./data/cifar-10-batches-py``, downloaded only with ``--download``;
batch 128; SGD with momentum 0.9 and weight decay 5e-4; no augmentation; 200 epochs at lr 0.01,
cosine), and every ``cvt train`` flag overrides it (``--data-dir``, ``--output``, ``--resume`` …).
The run folder is ``runs/<name>``. A ``--config`` of its own replaces the recipe, and a resumed run
continues under its checkpoint's config, as with ``cvt train``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from cvt.cli.main import build_parser, main
from cvt.cli.train import flags_from_args
from cvt.engine.config import resolve_config
from cvt.engine.resume import resume_path
from cvt.errors import CvtError

SEED_RECIPE = "seed_cifar10"


def train_argv(argv: Sequence[str]) -> list[str]:
    """The ``cvt`` arguments for ``python train.py ARGV``: ``train``, the seed recipe, then ``argv``.

    The recipe is left out when ``argv`` names a ``--config`` or resumes a checkpoint: applied on
    resume it would replace what the checkpoint recorded (its model, lr, weight decay …).
    ``--resume auto`` looks where the seed recipe puts the run; it resumes the checkpoint ``cvt train
    --resume auto`` would take there (``last.pt``, or the ``best.pt`` of a run stopped in its first
    epoch's saves) by its path, and keeps the recipe when there is none (a fresh seed run).
    """
    seed_run = ["train", "--config", SEED_RECIPE, *argv]
    args = build_parser().parse_args(["train", *argv])  # a bad flag or --help: as cvt train does
    resume = getattr(args, "resume", "")  # absent unless given
    if args.config or (resume and resume != "auto"):
        return ["train", *argv]
    if not resume:
        return seed_run
    try:
        checkpoint = resume_path(resolve_config(SEED_RECIPE, flags_from_args(args)))
    except CvtError:
        return seed_run  # cvt train reports the bad option
    return ["train", *argv, "--resume", str(checkpoint)] if checkpoint.is_file() else seed_run


if __name__ == "__main__":
    if {"-h", "--help"} & set(sys.argv[1:]):  # cvt train's help follows: say what this script changes
        print(__doc__)
        print("The options are cvt train's; the defaults it shows are replaced by the seed recipe above.\n")
    sys.exit(main(train_argv(sys.argv[1:])))
