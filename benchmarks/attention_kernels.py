"""CPU kernel choices of CvT-13 on their own: the attention kernels, bf16 vs fp32 depthwise conv.

They decide the ``explicit_few_keys``, ``chunked_attn``, ``recompute_attn`` and ``dw_fp32`` fast paths
(``cvt.models.layers``):

- attention of each stage (at 224: 1 head x 3136 queries x 784 keys; 3 x 784 x 196; 6 x 197 x 50),
  forward at batch 8 and forward + backward at batch 16, as ``F.scaled_dot_product_attention``, as the
  model's explicit path (``ConvAttention.attention_probs`` then a product with v), and as the
  package's own CPU kernel for that pass (``cpu_kernels.chunked_attention`` forward,
  ``cpu_kernels.RecomputedAttention`` forward + backward);
- the ``dw_bn`` depthwise 3x3 conv of each stage (stride 1 for q, 2 for k/v) on a channels-last bf16
  map, in bf16 and in fp32 with the casts in and out (inference, batch 8 at 224).

    .venv/bin/python benchmarks/attention_kernels.py --threads 2
    python benchmarks/attention_kernels.py --threads 2 --dtypes bf16 --img-size 384 --batch-scale 0.125
    taskset -c 0,1 python benchmarks/attention_kernels.py --threads 2 --dtypes bf16,fp32   # a bigger CPU

Times are medians of interleaved runs, in ms. bf16 on a CPU without AVX-512 is emulated: slow, and
shown only to say so.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F

from cvt.benchmark import describe_machine, interleaved_medians, machine_info
from cvt.errors import run_script
from cvt.models import cpu_kernels, create_model
from cvt.models.cvt import StageSpec, kv_grid, stage_grids
from cvt.models.layers import ConvAttention
from cvt.precision import DTYPES

HEAD_DIM = 64


def stage_maps(img_size: int) -> dict[str, tuple[StageSpec, tuple[int, int]]]:
    """Each CvT-13 stage's spec and token grid at ``img_size``."""
    with torch.device("meta"):
        specs = create_model("cvt_13", img_size=img_size).stage_specs
    grids = stage_grids(specs, (img_size, img_size))
    return {f"stage {i + 1}": (spec, grid) for i, (spec, grid) in enumerate(zip(specs, grids, strict=True))}


def attention_shapes(img_size: int) -> dict[str, tuple[int, int, int]]:
    """``(heads, queries, keys)`` of each CvT-13 stage's attention at ``img_size`` (a cls token counts)."""
    shapes = {}
    for stage, (spec, grid) in stage_maps(img_size).items():
        kv_h, kv_w = kv_grid(spec, grid)
        cls = int(spec.cls_token)
        shapes[stage] = (spec.num_heads, grid[0] * grid[1] + cls, kv_h * kv_w + cls)
    return shapes


def median_ms(fns: dict[str, Callable[[], object]], runs: int) -> dict[str, float]:
    """Median wall time of each function in ms, their runs interleaved (after 3 warm-up calls each)."""
    return {name: t * 1e3 for name, t in interleaved_medians(fns, runs, warmup=3).items()}


def attention_row(
    dtype_name: str, train: bool, stage: str, shape: tuple[int, int, int], batch: int, runs: int
) -> str:
    heads, queries, keys = shape
    dtype = DTYPES[dtype_name]
    attn = ConvAttention(heads * HEAD_DIM, heads * HEAD_DIM, heads, method="linear")
    gen = torch.Generator().manual_seed(0)

    def tensor(tokens: int) -> torch.Tensor:
        x = torch.randn(batch, heads, tokens, HEAD_DIM, generator=gen, dtype=dtype)
        return x.requires_grad_(train)

    q, k, v = tensor(queries), tensor(keys), tensor(keys)
    grad = torch.randn(batch, heads, queries, HEAD_DIM, generator=gen, dtype=dtype)
    kernels = {
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, scale=attn.scale),
        "explicit": lambda: attn.attention_probs(q, k).to(v.dtype) @ v,
        "cvt": (
            (lambda: cpu_kernels.RecomputedAttention.apply(q, k, v, attn.scale))
            if train
            else (lambda: cpu_kernels.chunked_attention(q, k, v, attn.scale))
        ),
    }

    def timed(kernel: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            if train:
                torch.autograd.backward(kernel(), grad)
                q.grad = k.grad = v.grad = None
            else:
                with torch.inference_mode():
                    kernel()

        return run

    ms = median_ms({name: timed(kernel) for name, kernel in kernels.items()}, runs)
    mode = f"{'fwd+bwd' if train else 'forward'}, batch {batch}"
    return (
        f"| {dtype_name} | {mode} | {stage}: {heads} x {queries} x {keys} | {ms['sdpa']:.2f} | "
        f"{ms['explicit']:.2f} | {ms['sdpa'] / ms['explicit']:.2f}x | {ms['cvt']:.2f} | "
        f"{ms['sdpa'] / ms['cvt']:.2f}x |"
    )


def conv_row(stage: str, channels: int, grid: tuple[int, int], stride: int, batch: int, runs: int) -> str:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, *grid, generator=gen)
    x = x.to(torch.bfloat16, memory_format=torch.channels_last)
    weight, bias = torch.randn(channels, 1, 3, 3, generator=gen), torch.randn(channels, generator=gen)
    weight16, bias16 = weight.bfloat16(), bias.bfloat16()
    with torch.inference_mode():
        ms = median_ms(
            {
                "bf16": lambda: F.conv2d(x, weight16, bias16, stride, 1, 1, channels),
                "fp32": lambda: F.conv2d(x.float(), weight, bias, stride, 1, 1, channels).bfloat16(),
            },
            runs,
        )
    size = f"{channels} x {grid[0]} x {grid[1]}"
    return f"| {stage}: {size}, stride {stride} | {ms['bf16']:.2f} | {ms['fp32']:.2f} |"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--dtypes", default="fp32,bf16", help="attention dtypes, of bf16,fp32")
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--img-size", type=int, default=224, help="CvT-13's input size (attention shapes)")
    parser.add_argument(
        "--batch-scale", type=float, default=1.0, help="scales the batches of 8 (forward) and 16 (training)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(describe_machine(machine_info("cpu")))
    shapes = attention_shapes(args.img_size)
    print(f"\nCvT-13 at {args.img_size}; cvt: chunked_attention (forward), RecomputedAttention (fwd+bwd)")
    columns = "SDPA ms | explicit ms | speed-up | cvt ms | speed-up"
    print(f"\n| dtype | pass | attention (heads x queries x keys) | {columns} |")
    print("|---|---|---|---|---|---|---|---|")
    for dtype_name in args.dtypes.split(","):
        for train in (False, True):
            batch = max(1, round((16 if train else 8) * args.batch_scale))
            for stage, shape in shapes.items():
                print(attention_row(dtype_name, train, stage, shape, batch, args.runs), flush=True)
    batch = max(1, round(8 * args.batch_scale))
    print(f"\n| depthwise conv, batch {batch}, channels-last bf16 input | bf16 ms | fp32 ms (with casts) |")
    print("|---|---|---|")
    for stage, (spec, grid) in stage_maps(args.img_size).items():
        for stride in (1, 2):
            print(conv_row(stage, spec.embed_dim, grid, stride, batch, args.runs), flush=True)
    return 0


if __name__ == "__main__":
    run_script(main, "attention_kernels.py")
