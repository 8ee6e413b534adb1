"""``cvt convert``: rewrite a checkpoint of any supported format as this project's safetensors file
or a Hugging Face folder, without naming the model when the checkpoint tells it."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``convert`` subcommand."""
    p = subparsers.add_parser(
        "convert",
        help="convert a checkpoint (official .pth, Hugging Face, cvt) to cvt safetensors or a HF folder",
        description="Read SOURCE (format detected), rebuild its model and write it again. An official "
        "state dict is matched to the registered variant with the same shapes unless --model is given.",
    )
    p.add_argument("source", help="checkpoint file, or a Hugging Face folder")
    p.add_argument("--output", required=True, help="file to write (a folder with --to hf)")
    p.add_argument(
        "--to", choices=("cvt", "hf"), default="cvt",
        help="cvt: safetensors with the architecture (default); hf: transformers folder",
    )  # fmt: skip
    p.add_argument(
        "--model", metavar="NAME", help="variant of an official state dict, e.g. cvt_13.msft_in1k_384"
    )
    p.add_argument(
        "--act", choices=("quick_gelu", "gelu"),
        help="activation when SOURCE does not record it (Hugging Face default: quick_gelu)",
    )  # fmt: skip
    p.add_argument("--ema", action="store_true", help="take the EMA weights of a training checkpoint")
    p.add_argument(
        "--overwrite", "--force", dest="overwrite", action="store_true", help="replace an existing output"
    )
    p.set_defaults(func=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    """``cvt convert``: read a checkpoint, rebuild its model, write it as ``--to`` says; the exit status."""
    from cvt.checkpoint import export_hf, load_model, save_checkpoint
    from cvt.export import check_output
    from cvt.models import count_params

    check_output("hf" if args.to == "hf" else "safetensors", args.output, args.overwrite)  # before reading
    model = load_model(args.source, model_name=args.model, act=args.act, use_ema=args.ema)
    if args.to == "hf":  # warnings (e.g. an activation transformers cannot run) print as one line
        out = export_hf(model, args.output, overwrite=args.overwrite)
    else:
        out = save_checkpoint(model, args.output, overwrite=args.overwrite)
    # a transformers folder names no variant: its stages' widths then say what it is
    widths = "/".join(str(spec.embed_dim) for spec in model.stage_specs)
    name = model.pretrained_cfg.get("architecture") or f"a {len(model.stage_specs)}-stage CvT ({widths} wide)"
    print(
        f"wrote {out}: {name}, {count_params(model):,} parameters, {model.num_classes} classes, {model.act}"
    )
    return 0
