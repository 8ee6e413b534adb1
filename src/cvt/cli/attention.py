"""``cvt attention``: save the last stage's per-head cls-token attention over one image as a PNG grid."""

from __future__ import annotations

import argparse
from pathlib import Path

from cvt.cli.common import parse_img_size


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``attention`` subcommand."""
    p = subparsers.add_parser(
        "attention",
        help="save per-head attention maps of the last stage's cls token for one image",
        description="Run IMAGE through the model and save, per head of the last block, the cls token's "
        "attention over the key/value grid, upsampled over the (preprocessed) image.",
    )
    p.add_argument("image", help="image file")
    p.add_argument("--model", default="cvt_13", help="variant name or arch.tag (default: cvt_13)")
    p.add_argument("--pretrained", action="store_true", help="use the published weights of --model")
    p.add_argument("--checkpoint", help="weights to load (official .pth, HF, or this project's safetensors)")
    p.add_argument("--num-classes", type=int, help="classifier outputs of the checkpoint")
    p.add_argument("--img-size", type=parse_img_size, help="input size N or H,W (default: the model's)")
    p.add_argument("--output", required=True, help="PNG file to write")
    p.add_argument("--force", action="store_true", help="replace an existing output file")
    p.set_defaults(func=run_attention)


def run_attention(args: argparse.Namespace) -> int:
    from cvt.attention_maps import attention_for_file
    from cvt.errors import UsageError
    from cvt.models import create_model

    output = Path(args.output)
    if output.exists() and not args.force:
        raise UsageError(f"refusing to overwrite {output}: choose another --output or pass --force")
    size = {} if args.img_size is None else {"img_size": args.img_size}
    model = create_model(
        args.model, pretrained=args.pretrained, num_classes=args.num_classes,
        checkpoint_path=args.checkpoint, **size,
    ).eval()  # fmt: skip
    maps, path = attention_for_file(model, args.image, output, title=f"{args.model}: {Path(args.image).name}")
    heads, (h, w) = maps.probs.shape[0], maps.grid
    print(f"wrote {path}: {heads} head(s), attention of the {maps.query} over a {h}x{w} key grid")
    return 0
