"""``cvt export``: write a model as ONNX, TorchScript, a safetensors checkpoint or a Hugging Face folder."""

from __future__ import annotations

import argparse

from cvt.cli.common import parse_img_size


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``export`` subcommand."""
    from cvt.export import EXPORT_FORMATS  # light: no torch.onnx import at module level

    p = subparsers.add_parser(
        "export",
        help="export a model to ONNX, TorchScript, safetensors or a Hugging Face folder",
        description="Export MODEL (random weights unless --checkpoint or --pretrained) and check the "
        "exported file against the eager model in its own runtime.",
    )
    p.add_argument("model", help="variant name, e.g. cvt_13 or cvt_13.msft_in1k")
    p.add_argument("--checkpoint", help="weights to load (official .pth, HF, or this project's safetensors)")
    p.add_argument("--pretrained", action="store_true", help="start from the published weights of MODEL")
    p.add_argument("--format", required=True, choices=EXPORT_FORMATS, dest="fmt", help="export format")
    p.add_argument("--output", required=True, help="file to write (a folder for --format hf)")
    p.add_argument(
        "--img-size", type=parse_img_size, help="traced input size N or H,W (default: the model's)"
    )
    p.add_argument("--num-classes", type=int, help="classifier outputs (default: the variant's)")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p.add_argument("--no-verify", action="store_true", help="skip the check against the eager model")
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from cvt.export import export_model, require_packages, verify_export
    from cvt.models import create_model

    require_packages(args.fmt, verify=not args.no_verify)  # before building a large model
    model = create_model(
        args.model, pretrained=args.pretrained, num_classes=args.num_classes, checkpoint_path=args.checkpoint
    ).eval()
    path = export_model(
        model, args.fmt, args.output, args.img_size, variant=args.model.split(".")[0], overwrite=args.force
    )
    print(f"wrote {path}")
    if not args.no_verify:
        diff = verify_export(model, args.fmt, path, args.img_size)
        print(f"max |logit difference| vs. eager PyTorch on 3 random images: {diff:.2e}")
    return 0
