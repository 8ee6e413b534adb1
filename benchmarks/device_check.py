"""Is CvT on this device the CPU reference, and does it compile as one graph? A minute's check for a
lent GPU machine before timing anything there (CI has no GPU; the suite checks the CPU).

    python3 benchmarks/device_check.py --device cuda            # CvT-13 at 224, batch 4
    .venv/bin/python benchmarks/device_check.py --device cpu --model cvt_tiny

The reference is the plain computation (``set_fast_paths(model, False)``) in fp32 on the CPU; the
subject is the same weights with the default fast paths on ``--device``, TF32 off. Printed: the
relative L2 error of the fp32 logits, of bf16-autocast logits against fp32, and of the gradients of
one training step (whole gradient, and the worst parameter among those whose gradient is not rounding
noise), and ``torch._dynamo.explain``'s graph and break counts in eval and train, fp32 and bf16. Exit 1
when an error passes its limit or a graph breaks. On 2026-11-27 the graph-break count found a break in
every block under torch 2.11 that the suite (torch 2.14) could not see.
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch
import torch.nn.functional as F

from cvt.devices import resolve_device
from cvt.errors import run_script
from cvt.models import CvT, create_model
from cvt.models.layers import set_fast_paths

FP32_LIMIT = 1e-4  # relative L2, device fp32 vs CPU fp32 (different kernels, TF32 off)
BF16_LIMIT = 0.02  # relative L2 of bf16-autocast logits vs fp32 (issue 4)
GRAD_LIMIT = 1e-3
# A parameter whose gradient is this small against the largest one holds rounding noise, not signal:
# a key projection's bias, say, whose gradient is zero in exact arithmetic (softmax ignores the shift
# q·b it adds to every score of a query).
NOISE_FLOOR = 1e-5


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """``||value - reference|| / ||reference||`` in fp32 on the CPU."""
    reference = reference.detach().float().cpu()
    return ((value.detach().float().cpu() - reference).norm() / reference.norm()).item()


def gradients(model: CvT, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every parameter's gradient of one cross-entropy step, on the CPU."""
    model.train().zero_grad()
    F.cross_entropy(model(x), y).backward()
    return {name: p.grad.detach().cpu() for name, p in model.named_parameters() if p.grad is not None}


def gradient_errors(
    grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]
) -> tuple[float, float, str]:
    """Relative error of the whole gradient, and the worst parameter's among those above the noise floor."""
    whole = relative_error(torch.cat([g.flatten() for g in grads.values()]),
                           torch.cat([reference[n].flatten() for n in grads]))  # fmt: skip
    largest = max(g.norm().item() for g in reference.values())
    signal = {n: relative_error(g, reference[n]) for n, g in grads.items()
              if reference[n].norm().item() > NOISE_FLOOR * largest}  # fmt: skip
    worst = max(signal, key=signal.__getitem__)
    return whole, signal[worst], worst


def graph_breaks(model: CvT, x: torch.Tensor) -> list[tuple[str, int, int, list[str]]]:
    """``(mode, graphs, breaks, reasons)`` as ``torch.compile`` would trace the whole model."""
    rows = []
    for train in (False, True):
        model.train(train)
        for bf16 in (False, True):
            torch._dynamo.reset()
            with torch.autocast(x.device.type, torch.bfloat16, enabled=bf16), torch.set_grad_enabled(train):
                explanation = torch._dynamo.explain(model)(x)
            reasons = sorted({str(r.reason).splitlines()[0][:160] for r in explanation.break_reasons})
            mode = f"{'train' if train else 'eval'} {'bf16' if bf16 else 'fp32'}"
            rows.append((mode, explanation.graph_count, explanation.graph_break_count, reasons))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--model", default="cvt_13")
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    device = resolve_device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    torch.manual_seed(0)
    reference = set_fast_paths(create_model(args.model, drop_path_rate=0.0), False).eval()
    subject = set_fast_paths(copy.deepcopy(reference), True).to(device)
    size = reference.img_size
    x = torch.randn(args.batch_size, 3, *size)
    y = torch.randint(0, reference.num_classes, (args.batch_size,))
    x_dev = x.to(device)
    failures = []

    with torch.no_grad():
        logits = reference(x)
        fp32 = relative_error(subject(x_dev), logits)
        with torch.autocast(device.type, torch.bfloat16):
            bf16 = relative_error(subject(x_dev), logits)
    print(f"{args.model} on {device}, batch {args.batch_size}: logits fp32 vs CPU reference {fp32:.2e}, "
          f"bf16 autocast {100 * bf16:.2f} %")  # fmt: skip
    if fp32 > FP32_LIMIT:
        failures.append(f"fp32 logits {fp32:.2e} > {FP32_LIMIT}")
    if bf16 > BF16_LIMIT:
        failures.append(f"bf16 logits {bf16:.3f} > {BF16_LIMIT}")

    whole, worst, name = gradient_errors(gradients(subject, x_dev, y.to(device)), gradients(reference, x, y))
    print(f"gradients vs CPU reference: whole {whole:.2e}, worst parameter {worst:.2e} ({name})")
    if max(whole, worst) > GRAD_LIMIT:
        failures.append(f"gradients {whole:.2e} / {worst:.2e} > {GRAD_LIMIT}")

    for mode, graphs, breaks, reasons in graph_breaks(subject, x_dev):
        print(f"explain {mode}: {graphs} graph(s), {breaks} break(s) {reasons}")
        if breaks:
            failures.append(f"{breaks} graph break(s) in {mode}")
    if failures:
        print("FAILED: " + "; ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    run_script(main, "device_check.py")
