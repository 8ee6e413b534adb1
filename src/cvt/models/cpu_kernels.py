"""What the CPU's compiled kernels can do, and the CPU paths that use them.

oneDNN runs bf16 convolutions and matrix products on compiled kernels only on AVX-512 CPUs (natively
with AVX512-BF16 or AMX); elsewhere (AVX2) they fall back to reference code, 20-40x slower than fp32
(benchmarks/results/avx2-vm_attention_kernels.md). The layers read :data:`CPU_HAS_BF16_KERNELS`,
:data:`ONEDNN_PACKED_LINEAR` and :data:`ONEDNN_FP32_LINEAR` at call time, so tests may override them
(``benchmarks/op_census.py`` overrides :data:`CPU_HAS_BF16_KERNELS`).

Two inference paths (no autograd graph, not traced or compiled) live here, both measured on a 2-core
AMD EPYC (Zen 4, AVX512-BF16, no AMX) in docs/performance-decisions.md:

- :func:`linear` with weights packed once by :func:`pack_linear`: oneDNN's linear on a weight kept in its
  blocked layout, with the bias and an optional SiLU fused in (bf16 on AVX-512, fp32 too on AVX-512
  CPUs other than Intel's; 6-15 % faster than ``F.linear`` plus a separate SiLU for CvT-13's MLP shapes);
- :func:`chunked_attention`: attention as two matrix products around a softmax, over chunks of queries
  whose scores stay in cache (bf16: 1.3-1.9x faster than CPU SDPA's blocked kernel at CvT-13's key
  counts; in fp32 SDPA stays faster beyond a few dozen keys); over fewer than 64 keys, with at least
  twice as many queries, the scores are laid out keys-first and the softmax runs down them
  (:func:`softmax_runs_down_keys`).

And two training paths (while a graph is built):

- :class:`OnednnLinear` (chosen by :func:`graph_linear`): fp32 Linear layers on oneDNN's kernel, where
  :data:`ONEDNN_FP32_LINEAR` (oneDNN's fp32 GEMM beats MKL's on CPUs other than Intel's);
- :class:`RecomputedAttention`: bf16 attention over many keys as 2-D products per image and head,
  the probabilities recomputed in backward (faster than CPU SDPA's forward and backward together).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import torch

from cvt.models.call_context import builds_no_graph, runs_plain_ops_only, traced_or_compiled
from cvt.precision import active_autocast_dtype


def _cpu_has_bf16_kernels() -> bool:
    """Whether oneDNN has compiled bf16 kernels here (AVX-512 core, AVX512-BF16 or AMX)."""
    probes = (
        getattr(torch.cpu, "_is_avx512_bf16_supported", None),
        getattr(torch.cpu, "_is_amx_tile_supported", None),
        getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None),  # AVX-512 core (BW, VL, DQ)
    )
    return any(probe() for probe in probes if probe is not None)


def _onednn_packed_linear_available() -> bool:
    """Whether oneDNN's packed linear runs here: its ops exist in this torch build and the CPU has the
    AVX-512 core its bf16 path requires (on AVX2 its fp32 kernel was measured slower than
    ``F.linear``: 20.7 against 18.1 ms for CvT-13's stage-3 fc1, on the project's AVX2 VM)."""
    ops = torch.ops.mkldnn
    needed = ("_linear_pointwise", "_reorder_linear_weight", "_is_mkldnn_bf16_supported")
    if not (torch.backends.mkldnn.is_available() and all(hasattr(ops, name) for name in needed)):
        return False
    return bool(ops._is_mkldnn_bf16_supported())


def cpuinfo_field(name: str, path: str = "/proc/cpuinfo") -> str:
    """The first value of field ``name`` in Linux's ``/proc/cpuinfo`` (``vendor_id``: ``GenuineIntel``,
    ``AuthenticAMD`` …; ``model name``: ``AMD EPYC 9R14 …``), or '' where the file or field is missing."""
    try:
        with open(path, encoding="ascii", errors="replace") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return ""


# read once at import: plain bools that torch.compile can guard on
CPU_HAS_BF16_KERNELS = _cpu_has_bf16_kernels()
ONEDNN_PACKED_LINEAR = _onednn_packed_linear_available()
# fp32 too, except on Intel CPUs: fp32 ``F.linear`` runs MKL's sgemm, which uses its AVX-512 kernels on
# Intel CPUs only; oneDNN's packed fp32 linear made CvT-13 inference 10 % faster on an AMD Zen 4, and
# its unpacked form 12 % slower on an Intel Xeon (docs/performance-decisions.md); bf16 ``F.linear`` runs
# oneDNN
ONEDNN_FP32_LINEAR = ONEDNN_PACKED_LINEAR and cpuinfo_field("vendor_id") != "GenuineIntel"

# oneDNN's linear pays a per-call cost that a small product does not earn back: F.linear stays for
# weights under ONEDNN_MIN_WEIGHT elements in products under ONEDNN_MIN_MACS multiply-accumulates
# (fp32, 2 threads, Zen 4: a 128x128 weight on 8 rows 3.5x slower, a 64x64 one on 1024 rows 1.1x slower
# and on 4096 rows 6 % faster; 192x768 on 64 rows 32 % faster, 256x1024 and up faster on any rows;
# bf16 within 30 % either way, the same trend)
ONEDNN_MIN_WEIGHT = 2**17
ONEDNN_MIN_MACS = 2**24

# scores (over the batch and heads) that chunked_attention computes at once: 2 MB in bf16, the two
# cores' L2 together (of 2**16..2**22, 2**20 was about fastest at each of CvT-13's three stages)
CHUNK_SCORES = 2**20

# scores (of one image and head) that RecomputedAttention computes at once: 8 MB in bf16. CvT-13's
# stage 1 at 224 (3136 x 784 scores) is one block per image; at 384 (9216 x 2304) whole-image blocks
# took 1.4x SDPA's forward + backward time, blocks of 2**21 or 2**22 scores 0.9-1.0x (bf16, Zen 4 VM)
RECOMPUTE_SCORES = 2**22


def has_kernels_for(dtype: torch.dtype) -> bool:
    """Whether CPU convolutions and matrix products in ``dtype`` run on compiled kernels: fp32 always,
    bf16 where oneDNN has bf16 kernels, nothing else (fp16 is emulated on these CPUs)."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and CPU_HAS_BF16_KERNELS)


def linear_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype | None:
    """The dtype in which ``F.linear(x, weight, ...)`` may run as oneDNN's packed kernel instead: CPU
    autocast's dtype, or without autocast the common dtype of ``x`` and ``weight``; None where
    ``F.linear`` runs: off the CPU, when a graph is built, traced or compiled, without
    :data:`ONEDNN_PACKED_LINEAR` (in fp32: :data:`ONEDNN_FP32_LINEAR`), in a dtype other than fp32 and
    bf16, for mismatched dtypes (``F.linear`` reports them), for small products
    (:func:`large_enough_for_onednn`), or for :func:`~cvt.models.call_context.runs_plain_ops_only`."""
    if x.device.type != "cpu" or not ONEDNN_PACKED_LINEAR or not builds_no_graph():
        return None
    if runs_plain_ops_only(x, weight) or not large_enough_for_onednn(x, weight):
        return None
    dtype = active_autocast_dtype("cpu") or weight.dtype
    kernels = (torch.float32, torch.bfloat16)
    if dtype not in kernels or x.dtype not in kernels or weight.dtype not in kernels:
        return None
    if dtype == torch.float32 and not ONEDNN_FP32_LINEAR:
        return None
    return dtype if torch.is_autocast_enabled("cpu") or x.dtype == weight.dtype else None


def pack_linear(
    weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``weight (out, in)`` in ``dtype`` reordered into oneDNN's blocked layout (an opaque ``_mkldnn``
    tensor) and ``bias`` in ``dtype``: the arguments of :func:`linear`."""
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(dtype).contiguous(), None)
    return packed, None if bias is None else bias.detach().to(dtype)


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu: bool = False
) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, then SiLU if ``silu``, by one oneDNN kernel on a weight packed by
    :func:`pack_linear` (or a plain ``(out, in)`` weight, strided views too): ``(..., in)`` → ``(..., out)``
    in ``x``'s dtype (which must be the weight's)."""
    rows = x.reshape(-1, x.shape[-1])  # (N, in): the op takes 2-D inputs
    out = torch.ops.mkldnn._linear_pointwise(rows, weight, bias, "swish" if silu else "none", [], "")
    # not a view (as F.linear's output): a hook may edit it in place, also as an autograd Function's output
    return torch.ops.aten._unsafe_view(out, (*x.shape[:-1], out.shape[-1]))


def trains_on_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``F.linear(x, weight, ...)`` may run as :class:`OnednnLinear` while a graph is built:
    fp32 on a CPU where :data:`ONEDNN_FP32_LINEAR` (oneDNN's fp32 GEMM beats MKL's), without CPU
    autocast, large enough (:func:`large_enough_for_onednn`), neither traced nor compiled (a trace or
    graph must see ``F.linear``), nor under ``torch.func`` transforms or forward-mode AD
    (:func:`~cvt.models.call_context.runs_plain_ops_only`)."""
    if x.device.type != "cpu" or not ONEDNN_FP32_LINEAR or not torch.is_grad_enabled():
        return False
    if traced_or_compiled() or torch.is_autocast_enabled("cpu"):
        return False
    if x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    return large_enough_for_onednn(x, weight) and not runs_plain_ops_only(x, weight)


def graph_linear(
    enabled: bool, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; with the layer's ``onednn_linear`` flag ``enabled``, as
    :class:`OnednnLinear` where :func:`trains_on_onednn` allows (fp32 CPU training off Intel: oneDNN's
    GEMM is faster than MKL's there)."""
    if enabled and trains_on_onednn(x, weight):
        return OnednnLinear.apply(x, weight, bias)
    return torch.nn.functional.linear(x, weight, bias)


def large_enough_for_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``F.linear(x, weight)`` is large enough to run faster as oneDNN's linear: a weight of at
    least :data:`ONEDNN_MIN_WEIGHT` elements, or at least :data:`ONEDNN_MIN_MACS` multiply-accumulates."""
    rows = x.numel() // max(1, x.shape[-1])
    return weight.numel() >= ONEDNN_MIN_WEIGHT or rows * weight.numel() >= ONEDNN_MIN_MACS


class OnednnLinear(torch.autograd.Function):
    """``F.linear(x, weight, bias)`` with its forward and input gradient as oneDNN's linear on the plain
    weight (no packing: the weight changes every step) and its weight gradient a ``torch.mm``.

    On the Zen 4 VM, batch-16 stage-3 shapes in fp32: forward 18.9 against MKL's 27.5 ms (fc1) and
    19.8 against 30.0 ms (fc2), input gradient 18.2 against 22.7 ms; the weight gradient, a product
    over the token rows, was slower in oneDNN (34 against 21 ms) and stays with ``torch.mm``.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        grad_rows = grad_out.reshape(-1, grad_out.shape[-1])  # (N, out)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            # grad_out @ weight is a linear on weight.t(); create_graph=True needs differentiable ops
            grad_x = grad_out @ weight if torch.is_grad_enabled() else linear(grad_out, weight.t(), None)
        if ctx.needs_input_grad[1]:
            grad_w = grad_rows.t() @ x.reshape(-1, x.shape[-1])  # (out, in)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_rows.sum(0)
        return grad_x, grad_w, grad_b


def softmax_runs_down_keys(queries: int, keys: int) -> bool:
    """Whether :func:`chunked_attention` lays its scores out as ``(keys, queries)`` and takes the softmax
    down the keys: for fewer than 64 keys and at least twice as many queries. Softmax over rows of few
    elements is slow on CPU (per-row overhead: 0.61 ms for CvT-13's stage-3 scores at batch 8, 50 keys
    a row, against 0.27 ms down the columns); with many queries each column step is a long vector."""
    return keys < 64 and queries >= 2 * keys


def chunked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, max_scores: int = CHUNK_SCORES
) -> torch.Tensor:
    """``softmax(q kᵀ · scale) v`` for inference: ``q (B, heads, Tq, d)``, ``k, v (B, heads, Tk, d)`` →
    ``(B, heads, Tq, d_v)``, in the inputs' dtype (the softmax itself accumulates in fp32).

    Queries run in chunks whose scores (at most ``max_scores`` over the batch and heads) stay in cache;
    the probabilities are kept in the inputs' dtype, which is all the second matrix product reads.
    """
    q, k, v = _operands(q, k, v, scale)
    queries, keys = q.shape[-2], k.shape[-2]
    down_keys = softmax_runs_down_keys(queries, keys)
    keys_t = k.transpose(-2, -1)  # (B, heads, d, Tk)

    def probs(rows: slice) -> torch.Tensor:
        """Attention weights ``(B, heads, n, Tk)`` of the queries in ``rows`` (a transposed view if
        ``down_keys``: 50-key stage-3 attention took 0.92 instead of 1.18 ms at batch 8)."""
        if down_keys:
            return (k @ q[..., rows, :].transpose(-2, -1)).softmax(dim=-2).transpose(-2, -1)
        return (q[..., rows, :] @ keys_t).softmax(dim=-1)

    scores_per_query = max(1, k.shape[:-1].numel())  # B * heads * Tk (at least 1: empty batches pass)
    chunk = max(1, max_scores // scores_per_query)  # queries per chunk
    with torch.autocast(q.device.type, enabled=False):  # probabilities in the inputs' dtype, not fp32
        if chunk >= queries:
            return probs(slice(None)) @ v
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        for start in range(0, queries, chunk):
            rows = slice(start, start + chunk)
            torch.matmul(probs(rows), v, out=out[..., rows, :])
        return out


class RecomputedAttention(torch.autograd.Function):
    """``softmax(q kᵀ · scale) v`` for CPU training over many keys: ``q (B, heads, Tq, d)``, ``k, v (B,
    heads, Tk, d)`` → ``(B, heads, Tq, d_v)`` in the inputs' dtype (the softmax accumulates in fp32).

    Each image and head runs as 2-D products over blocks of query rows (:data:`RECOMPUTE_SCORES`
    scores at most), and backward recomputes the probabilities instead of keeping them (``Tq × Tk``
    per image and head: 12x the tokens in CvT-13's stage 1). ``torch.mm`` reads a transposed operand
    at full speed where a batched ``matmul`` does not (bf16, stage 1, one image: ``pᵀ dO`` 1.0 against
    2.0 ms). Zen 4 VM, bf16, stage 1 at batch 16: forward 43 against CPU SDPA's 69 ms, forward +
    backward 152-200 against 193-233 ms (at 384 px, 9216 x 2304 scores an image: 199-218 against
    198-241 ms at batch 2; ``benchmarks/attention_kernels.py``); in fp32 slower than SDPA. The scale
    multiplies the keys (``Tk × d``) rather than the scores (``Tq × Tk``). With ``create_graph=True``
    backward runs differentiable batched ops (CPU SDPA has no double backward).
    """

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        with torch.autocast(q.device.type, enabled=False):  # probabilities in the inputs' dtype
            queries, keys, values = _operands(q, k, v, scale)
            out = q.new_empty(*q.shape[:-1], v.shape[-1])
            for b, h, rows in _score_blocks(q, k.shape[-2]):
                torch.mm(_block_probs(queries, keys, b, h, rows), values[b, h], out=out[b, h, rows])
        ctx.save_for_backward(q, k, v, out)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, out = ctx.saved_tensors
        scale = ctx.scale
        with torch.autocast(q.device.type, enabled=False):
            if torch.is_grad_enabled():  # create_graph=True: the same formulas as differentiable ops
                keys = k * scale
                probs = (q @ keys.transpose(-2, -1)).softmax(dim=-1)
                grad_probs = grad_out @ v.transpose(-2, -1)
                grad_scores = probs * (grad_probs - (probs * grad_probs).sum(-1, keepdim=True))
                grad_k = (grad_scores.transpose(-2, -1) @ q) * scale
                return grad_scores @ keys, grad_k, probs.transpose(-2, -1) @ grad_out, None
            queries, keys, values = _operands(q, k, v, scale)
            grad_out = grad_out.contiguous()
            # softmax backward's row term Σ_j p_ij (dO vᵀ)_ij = dO_i · out_i, from the saved output;
            # in the probabilities' dtype (subtracting an fp32 column from bf16 scores was 20x slower)
            acc = torch.promote_types(out.dtype, torch.float32)  # row_term: (B, heads, Tq, 1)
            row_term = (grad_out.to(acc) * out.to(acc)).sum(-1, keepdim=True).to(out.dtype)
            grad_q = torch.empty_like(queries)
            # key and value gradients sum over the blocks of queries: accumulated in fp32
            grad_k = torch.zeros(k.shape, dtype=acc, device=k.device)
            grad_v = torch.zeros(v.shape, dtype=acc, device=v.device)
            for b, h, rows in _score_blocks(q, k.shape[-2]):
                probs = _block_probs(queries, keys, b, h, rows)  # recomputed as in forward
                grad_v[b, h].add_(torch.mm(probs.t(), grad_out[b, h, rows]))
                grad_scores = torch.mm(grad_out[b, h, rows], values[b, h].t())
                grad_scores.sub_(row_term[b, h, rows]).mul_(probs)  # (n, Tk)
                torch.mm(grad_scores, keys[b, h], out=grad_q[b, h, rows])
                grad_k[b, h].add_(torch.mm(grad_scores.t(), queries[b, h, rows]))
        return grad_q, grad_k.mul_(scale).to(k.dtype), grad_v.to(v.dtype), None


def _operands(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The queries, scaled keys and values that :func:`chunked_attention` and :class:`RecomputedAttention`
    (forward and backward's recomputation) multiply, each contiguous.

    Contiguous heads: batched products over the permuted q/k/v views ran ~2x slower (stage 1, bf16). The
    scale goes on the keys (``Tk × d``), not on every block's scores (``Tq × Tk``): scaling the scores
    took 3.5 ms of a 265-ms CvT-13 bf16 forward at batch 8, 2.0 of them in stage 1 (49x more scores than
    keys). One pass for the keys: ``k * scale`` keeps a permuted k's strides, which ``.contiguous()``
    would then copy again.
    """
    keys = torch.mul(k, scale, out=torch.empty(k.shape, dtype=k.dtype, device=k.device))
    return q.contiguous(), keys, v.contiguous()


def _block_probs(queries: torch.Tensor, keys: torch.Tensor, b: int, h: int, rows: slice) -> torch.Tensor:
    """Attention probabilities ``(n, Tk)`` of image ``b``, head ``h``, the query ``rows`` of a block."""
    return torch.mm(queries[b, h, rows], keys[b, h].t()).softmax(dim=-1)


def _score_blocks(q: torch.Tensor, keys: int) -> Iterator[tuple[int, int, slice]]:
    """``(image, head, query rows)`` covering ``q (B, heads, Tq, d)`` in blocks of at most
    :data:`RECOMPUTE_SCORES` scores against ``keys`` keys."""
    rows = max(1, RECOMPUTE_SCORES // max(1, keys))
    for b, h in itertools.product(range(q.shape[0]), range(q.shape[1])):
        for start in range(0, q.shape[2], rows):
            yield b, h, slice(start, start + rows)
