"""``cvt export``: write a model as ONNX, TorchScript, a safetensors checkpoint or a Hugging Face folder."""

from __future__ import annotations

import argparse

from cvt.cli.model_source import add_model_source_arguments, load_model_source
from cvt.errors import UsageError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``export`` subcommand."""
    from cvt.export import EXPORT_FORMATS  # light: no torch.onnx import at module level

    p = subparsers.add_parser(
        "export",
        help="export a model to ONNX, TorchScript, safetensors or a Hugging Face folder",
        description="Export a model (a checkpoint, published weights, or random weights of a variant) "
        "and check the exported file against the eager model, read back by onnxruntime, torch.jit.load, "
        "or this package (safetensors and hf: transformers' CvT runs GELU where CvT has QuickGELU). "
        "--img-size is the traced input size.",
    )
    p.add_argument("model_name", nargs="?", metavar="MODEL", help="variant name (same as --model)")
    add_model_source_arguments(p)
    p.add_argument("--format", required=True, choices=EXPORT_FORMATS, dest="fmt", help="export format")
    p.add_argument("--output", required=True, help="file to write (a folder for --format hf)")
    p.add_argument("--num-classes", type=int, help="classifier outputs of a model built by name")
    p.add_argument(
        "--overwrite", "--force", dest="overwrite", action="store_true", help="replace an existing output"
    )
    p.add_argument("--no-verify", action="store_true", help="skip the check against the eager model")
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    """``cvt export``: export the model and check the export against eager PyTorch; the exit status."""
    from cvt.export import CHECKED_BY, check_output, export_model, require_packages, verify_export

    if args.model_name and args.model and args.model_name != args.model:
        raise UsageError(f"MODEL {args.model_name!r} and --model {args.model!r} differ; give one")
    args.model = args.model or args.model_name
    if args.img_size and args.fmt in ("safetensors", "hf"):
        raise UsageError(
            f"--img-size is the traced input size of onnx and torchscript; a {args.fmt} export keeps the "
            f"model's own input size"
        )
    require_packages(args.fmt, verify=not args.no_verify)  # before building a large model
    check_output(args.fmt, args.output, args.overwrite)
    model = load_model_source(args, random_weights=True, num_classes=args.num_classes).model
    path = export_model(model, args.fmt, args.output, args.img_size, overwrite=args.overwrite)
    print(f"wrote {path}")
    if not args.no_verify:
        diff = verify_export(model, args.fmt, path, args.img_size)
        print(f"max |logit difference| of the export read by {CHECKED_BY[args.fmt]} vs. eager PyTorch "
              f"on 3 random images: {diff:.2e}")  # fmt: skip
    return 0
