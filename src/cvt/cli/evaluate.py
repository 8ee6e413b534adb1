"""``cvt eval``: top-1/top-5, loss, per-class accuracy and a confusion matrix of a model on a data set."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cvt.cli.common import json_text, print_json
from cvt.cli.model_source import add_model_source_arguments, load_model_source, with_index_names
from cvt.tables import format_table

# files `cvt eval --output DIR` writes
CONFUSION_PNG = "confusion.png"
METRICS_JSON = "eval.json"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``eval`` subcommand."""
    p = subparsers.add_parser(
        "eval", help="evaluate a checkpoint on a data set (top-1/top-5, loss, per-class, confusion matrix)"
    )
    add_model_source_arguments(p)
    p.add_argument("--dataset", help="digits | cifar10 | cifar100 | imagefolder (default: the data set "
                                     "the training checkpoint was trained on)")  # fmt: skip
    p.add_argument("--data-dir", metavar="DIR",
                   help="CIFAR: the folder holding cifar-10-batches-py; imagefolder: the folder holding "
                        "val/ (default: a training checkpoint's own data folder on its own data set, "
                        "else ./data)")  # fmt: skip
    p.add_argument("--download", action="store_true", help="download CIFAR into --data-dir if missing")
    p.add_argument("--split", choices=("val", "train"), default="val", help="split to evaluate (default val)")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="leave unreadable ImageFolder files out (the report counts them)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    p.add_argument("--workers", type=int, default=0, help="data loader processes (default 0)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none", help="autocast dtype")
    p.add_argument("--output", metavar="DIR", help=f"write {CONFUSION_PNG} and {METRICS_JSON} into DIR")
    p.add_argument("--overwrite", action="store_true", help="replace files of an earlier eval in --output")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    """``cvt eval``: evaluate the model on a split of a data set and report it; the exit status."""
    from cvt.data import build_dataset, build_loader, build_transform, resolve_data_config
    from cvt.data.loader import collate_readable
    from cvt.devices import resolve_device
    from cvt.engine.evaluate import (
        check_eval_classes,
        confusion_figure,
        evaluate,
        image_folder_eval_classes,
    )
    from cvt.errors import UsageError, per_token_logits_error
    from cvt.figures import figure_bytes
    from cvt.fileio import atomic_write_files, check_folder_path, refuse_existing
    from cvt.precision import autocast_dtype

    output = Path(args.output) if args.output else None
    if output is not None:
        check_folder_path(output)  # before the evaluation, not after it
        refuse_existing([output / CONFUSION_PNG, output / METRICS_JSON], args.overwrite)
    source = load_model_source(args)
    if source.model.global_pool == "":
        raise per_token_logits_error(source.description, "eval")
    dataset_name = args.dataset or source.train_config.get("dataset")
    if dataset_name is None:
        raise UsageError("which data set? pass --dataset digits|cifar10|cifar100|imagefolder")
    data_dir = args.data_dir
    if data_dir is None and dataset_name == source.train_config.get("dataset"):
        data_dir = source.train_config.get("data_dir")
    data_dir = data_dir or "data"  # cvt train's default too
    known = None  # an ImageFolder's classes: the checkpoint's list where it has all of them
    if dataset_name == "imagefolder":
        known = image_folder_eval_classes(Path(data_dir) / args.split, source.classes, source.description)
    # an unreadable file is left out (counted below), never replaced by another image counted twice
    dataset = build_dataset(dataset_name, data_dir, args.split, download=args.download,
                            skip_bad_images=args.skip_bad_images, classes=known,
                            replace_bad_images=False)  # fmt: skip
    model = source.model
    # --finetune takes a checkpoint file; published weights are named by --model
    start = f"--finetune {args.checkpoint}" if args.checkpoint else f"--model {args.model} --pretrained"
    check_eval_classes(
        model.num_classes,
        dataset_name,
        dataset.classes,
        model_name=source.description,
        model_classes=source.classes,
        trained_on=source.train_config.get("dataset"),
        finetune_command=f"cvt train {start} --dataset {dataset_name}",
    )

    data_cfg = resolve_data_config(model, dataset_name, args.img_size)
    dataset.transform = build_transform(data_cfg, train=False)
    device = resolve_device(args.device)
    loader = build_loader(dataset, args.batch_size, train=False, num_workers=args.workers,
                          collate_fn=collate_readable, pin_memory=device.type == "cuda")  # fmt: skip
    amp_dtype = autocast_dtype(args.amp)
    result = evaluate(model.to(device), loader, device, amp_dtype=amp_dtype, num_classes=model.num_classes,
                      progress=sys.stderr.isatty())  # fmt: skip

    # unreadable files: those the header scan dropped, and those left out of batches when decoded
    skipped = len(getattr(dataset, "skipped", [])) + len(dataset) - result.num_samples
    classes = with_index_names(dataset.classes, model.num_classes)
    report = {
        "model": source.description, "ema": args.ema, "dataset": dataset_name, "split": args.split,
        "input_size": list(data_cfg["input_size"]), **result.as_dict(classes), "skipped_images": skipped,
    }  # fmt: skip
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
        title = f"{source.description} — {dataset_name} {args.split}, top-1 {result.top1:.2f}%"
        report["confusion_png"] = str(output / CONFUSION_PNG)
        # the two files as one: a failed write leaves neither new (a new plot beside an old report)
        atomic_write_files({
            output / CONFUSION_PNG: figure_bytes(confusion_figure(result.confusion, classes, title)),
            output / METRICS_JSON: (json_text(report) + "\n").encode(),
        })  # fmt: skip
    if args.json:
        print_json(report)
        return 0
    print(f"{source.description} on {dataset_name} {args.split}: {result.num_samples} images at "
          f"{data_cfg['input_size'][1]}x{data_cfg['input_size'][2]}"
          + (f" ({skipped} unreadable file(s) skipped)" if skipped else ""))  # fmt: skip
    print(f"top-1 {result.top1:.2f}%  top-{result.topk} {result.top5:.2f}%  loss {result.loss:.4f}")
    if sum(result.non_finite):
        print(f"{sum(result.non_finite)} image(s) gave non-finite (NaN/Inf) logits: counted as wrong")
    counts = result.class_counts
    rows = [[name, n, "-" if n == 0 else f"{acc:.2f}%"]
            for name, n, acc in zip(classes, counts, result.per_class_acc, strict=True)]  # fmt: skip
    print(format_table(["class", "images", "accuracy"], rows))
    if output is not None:
        print(f"confusion matrix: {output / CONFUSION_PNG}; metrics: {output / METRICS_JSON}")
    return 0
