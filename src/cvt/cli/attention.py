"""``cvt attention``: save the last stage's per-head cls-token attention over one image as an image grid."""

from __future__ import annotations

import argparse
from pathlib import Path

from cvt.cli.model_source import add_model_source_arguments, load_model_source


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``attention`` subcommand."""
    p = subparsers.add_parser(
        "attention",
        help="save per-head attention maps of the last stage's cls token for one image",
        description="Run IMAGE through the model and save, per head of the last block, the cls token's "
        "attention over the key/value grid, upsampled over the (preprocessed) image.",
    )
    p.add_argument("image", help="image file")
    add_model_source_arguments(p)
    p.add_argument(
        "--output",
        required=True,
        help="image file to write: PNG (.png added without an extension), or .jpg, .pdf, .svg …",
    )
    p.add_argument(
        "--overwrite",
        "--force",
        dest="overwrite",
        action="store_true",
        help="replace an existing output file",
    )
    p.set_defaults(func=run_attention)


def run_attention(args: argparse.Namespace) -> int:
    """``cvt attention``: save the last stage's attention maps over one image; the exit status."""
    from cvt.attention_maps import attention_for_file, image_output_path
    from cvt.fileio import refuse_existing

    output = image_output_path(args.output)  # the file matplotlib will write: the one to protect
    refuse_existing([output], args.overwrite)
    source = load_model_source(args, random_weights=True)
    title = f"{source.description}: {Path(args.image).name}"
    maps, path = attention_for_file(source.model, args.image, output, title=title, img_size=args.img_size)
    heads, (h, w) = maps.probs.shape[0], maps.grid
    print(f"wrote {path}: {heads} head(s), attention of the {maps.query} over a {h}x{w} key grid")
    return 0
