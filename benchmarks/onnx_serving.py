"""Serving CvT on a CPU: this package's eager forward next to its ONNX export run by onnxruntime.

    .venv/bin/python benchmarks/onnx_serving.py --threads 2                  # CvT-13 at 224, batches 1 and 8
    .venv/bin/python benchmarks/onnx_serving.py --batch-sizes 1,4,16 --runs 9 --threads 2

The model (random weights, seed 0) is exported as ``cvt export --format onnx`` exports it
(:func:`cvt.export.export_onnx`: opset 17, a free batch axis) and run by onnxruntime's CPU provider
with as many intra-op threads as torch uses. For each batch size three forwards run interleaved, one
timed run of each in turn: eager fp32, eager under CPU bf16 autocast (only where oneDNN has bf16
kernels: elsewhere bf16 is emulated), and the ONNX model in fp32 (onnxruntime's CPU provider has no
bf16 matrix products). Prints img/s (median of the runs) and the ONNX logits' largest difference
from eager fp32's. onnxruntime's threads do not spin between runs unless ``--spinning``: spinning, they
take the cores from the torch runs that follow (cvt_tiny's eager batch 1 ran at half speed).
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable

import numpy as np
import onnxruntime as ort
import torch
from timm.layers import to_2tuple

from cvt.benchmark import has_bf16_kernels, interleaved_medians
from cvt.cli.common import parse_img_size
from cvt.errors import run_script
from cvt.export import INPUT_NAME, export_onnx
from cvt.models import CvT, create_model

VARIANTS: tuple[str, ...] = ("eager fp32", "eager bf16 autocast", "onnxruntime fp32")


def onnx_session(
    model: CvT, img_size: tuple[int, int], threads: int, spinning: bool = False
) -> ort.InferenceSession:
    """An onnxruntime CPU session of ``model`` exported at ``img_size``, with ``threads`` intra-op threads
    that spin after each run only if ``spinning`` (onnxruntime's default: lower latency for the next
    run, but on the cores torch's next run needs when the two are interleaved)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return ort.InferenceSession(export_onnx(model, img_size), options, providers=["CPUExecutionProvider"])


Forward = Callable[[], object]


def forwards(
    model: CvT, bf16_model: CvT | None, session: ort.InferenceSession, images: torch.Tensor
) -> dict[str, Forward]:
    """One call per variant of :data:`VARIANTS` that runs here (bf16 where ``bf16_model`` is given), each
    computing the logits of ``images``."""
    pixels = images.numpy()

    def eager(net: CvT, autocast: bool) -> Callable[[], torch.Tensor]:
        def forward() -> torch.Tensor:
            with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
                return net(images)

        return forward

    calls: dict[str, Forward] = {"eager fp32": eager(model, False)}
    if bf16_model is not None:
        calls["eager bf16 autocast"] = eager(bf16_model, True)
    calls["onnxruntime fp32"] = lambda: session.run(None, {INPUT_NAME: pixels})[0]
    return calls


def measure(calls: dict[str, Forward], batch: int, runs: int) -> tuple[dict[str, float], float]:
    """Img/s of each of :func:`forwards`' ``calls`` on a ``batch`` of images (median of ``runs``
    interleaved timed runs, after one warm-up call each) and the largest absolute difference between
    the ONNX model's logits and eager fp32's."""
    onnx_logits = torch.from_numpy(np.asarray(calls["onnxruntime fp32"]()))
    max_diff = (onnx_logits - calls["eager fp32"]()).abs().max().item()
    seconds = interleaved_medians(calls, runs)
    return {name: batch / t for name, t in seconds.items()}, max_diff


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="cvt_13")
    parser.add_argument("--img-size", type=parse_img_size, help="input size N or H,W (default: the model's)")
    parser.add_argument("--batch-sizes", default="1,8", help="comma-separated")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--threads", type=int, help="torch and onnxruntime threads (default: torch's choice)")
    parser.add_argument("--spinning", action="store_true",
                        help="onnxruntime's threads spin after each run (its default; slows the torch runs "
                        "interleaved with it, so read only its own column)")  # fmt: skip
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    torch.manual_seed(0)
    model = create_model(args.model).eval()
    height, width = to_2tuple(args.img_size or model.img_size)
    session = onnx_session(model, (height, width), torch.get_num_threads(), args.spinning)
    # a copy of its own, made once: a model keeps its packed weights for one autocast state, and would
    # repack them on every call if fp32 and bf16 calls alternated on it
    bf16_model = copy.deepcopy(model) if has_bf16_kernels("cpu") else None

    print(f"{args.model} {height}x{width} inference, {torch.get_num_threads()} threads, onnxruntime "
          f"{ort.__version__}, torch {torch.__version__}: img/s, median of {args.runs} "
          "interleaved runs\n")  # fmt: skip
    print(f"| batch | {' | '.join(VARIANTS)} | max logit difference, onnx vs eager fp32 |")
    print(f"|---|{'---|' * len(VARIANTS)}---|")
    for batch in batch_sizes:
        seed = torch.Generator().manual_seed(batch)
        images = torch.randn(batch, model.in_chans, height, width, generator=seed)
        rates, max_diff = measure(forwards(model, bf16_model, session, images), batch, args.runs)
        cells = " | ".join(f"{rates[name]:.2f}" if name in rates else "-" for name in VARIANTS)
        print(f"| {batch} | {cells} | {max_diff:.1e} |")
    return 0


if __name__ == "__main__":
    run_script(main, "onnx_serving.py")
