"""``cvt predict``: the top-k classes, with probabilities, of image files or folders of images."""

from __future__ import annotations

import argparse
from pathlib import Path

from cvt.cli.common import print_json
from cvt.cli.model_source import add_model_source_arguments, label_names, load_model_source
from cvt.errors import DataError, UsageError, per_token_logits_error


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``predict`` subcommand."""
    p = subparsers.add_parser("predict", help="classify image files or folders of images (top-k labels)")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files, or folders of images")
    add_model_source_arguments(p)
    p.add_argument("--top-k", type=int, default=5, help="classes shown per image (default 5)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--json", action="store_true", help="print a JSON list, one entry per image")
    p.set_defaults(func=run_predict)


def collect_images(inputs: list[str]) -> list[Path]:
    """The files given, plus the image files under each folder given: sorted, recursive, linked folders
    followed and hidden files skipped, as an ImageFolder class folder is read."""
    from cvt.data.datasets import find_image_files

    paths: list[Path] = []
    for text in inputs:
        path = Path(text)
        if path.is_dir():
            found = find_image_files(path)
            if not found:
                raise DataError(f"folder {path} holds no image files (.jpg, .png, …)")
            paths.extend(found)
        elif path.is_file():
            paths.append(path)
        elif path.exists():  # a device, a FIFO, a socket: reading it could block forever
            raise DataError(f"{path} is not a regular file (expected an image file or a folder of images)")
        else:
            raise DataError(f"{path} does not exist (expected an image file or a folder of images)")
    return paths


def run_predict(args: argparse.Namespace) -> int:
    """``cvt predict``: print the top classes of each image; the exit status."""
    import torch

    from cvt.data import build_transform, load_input, resolve_data_config
    from cvt.devices import resolve_device

    if args.top_k < 1:
        raise UsageError(f"--top-k must be >= 1, got {args.top_k}")
    paths = collect_images(args.inputs)
    source = load_model_source(args)
    if source.model.num_classes == 0:
        raise UsageError(f"{source.description} has no classifier (num_classes 0): no class to predict")
    if source.model.global_pool == "":
        raise per_token_logits_error(source.description, "predict")
    names = label_names(source)
    data_cfg = resolve_data_config(source.model, source.train_config.get("dataset"), args.img_size)
    transform = build_transform(data_cfg, train=False)
    device = resolve_device(args.device)
    model = source.model.to(device)
    k = min(args.top_k, len(names))
    results = []
    for path in paths:
        x = load_input(path, data_cfg, transform).to(device)  # (1, 3, H, W)
        with torch.inference_mode():
            probs = model(x).float().softmax(dim=-1)[0]  # (num_classes,)
        top = probs.topk(k)
        results.append({
            "image": str(path),
            "predictions": [{"index": int(i), "label": names[int(i)], "prob": float(p)}
                            for p, i in zip(top.values, top.indices, strict=True)],
        })  # fmt: skip
    if args.json:
        print_json(results)
        return 0
    for entry in results:
        print(entry["image"])
        for rank, pred in enumerate(entry["predictions"], 1):
            print(f"  {rank}. {pred['label']}  {100 * pred['prob']:.2f}%")
    return 0
