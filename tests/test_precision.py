"""Precision names as the command line gives them, the autocast they stand for, and the CPU kernels that
run in each precision (:mod:`cvt.models.cpu_kernels`)."""

from __future__ import annotations

import importlib.util
import io
import warnings

import pytest
import torch

from cvt.models import cpu_kernels
from cvt.precision import active_autocast_dtype, autocast, autocast_dtype
from test_fast_paths import attention_inputs, softmax_attention


@pytest.mark.parametrize(
    ("name", "dtype"), [("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", None), ("none", None)]
)
def test_each_name_autocasts_to_its_dtype_or_not_at_all(name: str, dtype: torch.dtype | None) -> None:
    assert autocast_dtype(name) is dtype
    with autocast("cpu", name):
        assert active_autocast_dtype("cpu") is dtype
        assert torch.is_autocast_enabled("cpu") == (dtype is not None)
    assert active_autocast_dtype("cpu") is None  # and it ends with the block


def test_devices_without_autocast_answer_none() -> None:
    assert active_autocast_dtype("meta") is None


def test_autocast_turns_on_the_device_named_and_no_other() -> None:
    """``autocast("cuda", ...)`` leaves the CPU at full precision (it is off on a machine without CUDA)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: "CUDA is not available ... Disabling autocast"
        with autocast("cuda", "bf16"):
            assert not torch.is_autocast_enabled("cpu") and active_autocast_dtype("cpu") is None
            on_cuda = torch.bfloat16 if torch.cuda.is_available() else None
            assert active_autocast_dtype("cuda") is on_cuda


def test_each_device_answers_its_own_autocast_dtype() -> None:
    """CUDA autocast in fp16 while the CPU's is in bf16: each device answers its own dtype."""
    enabled, dtype = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    try:
        torch.set_autocast_enabled("cuda", True)  # the state only: no GPU needed
        torch.set_autocast_dtype("cuda", torch.float16)
        with autocast("cpu", "bf16"):
            assert active_autocast_dtype("cuda") is torch.float16
            assert active_autocast_dtype("cpu") is torch.bfloat16
    finally:
        torch.set_autocast_enabled("cuda", enabled)
        torch.set_autocast_dtype("cuda", dtype)


# ------------------------------------------------------------------ the CPU kernels' capability flags
def test_bf16_kernels_are_detected_by_any_probe_and_missing_probes_are_skipped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """AVX512-BF16, AMX or the AVX-512 core each suffice; a probe this torch build lacks is passed over."""
    probes = [(torch.cpu, "_is_avx512_bf16_supported"), (torch.cpu, "_is_amx_tile_supported"),
              (torch.ops.mkldnn, "_is_mkldnn_bf16_supported")]  # fmt: skip
    for answers in ((True, False, False), (False, True, False), (False, False, True), (False, False, False)):
        for (owner, name), answer in zip(probes, answers, strict=True):
            monkeypatch.setattr(owner, name, lambda answer=answer: answer, raising=False)
        assert cpu_kernels._cpu_has_bf16_kernels() is any(answers), answers
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")  # an older torch, asked first
    assert cpu_kernels._cpu_has_bf16_kernels() is False
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert cpu_kernels._cpu_has_bf16_kernels()


@pytest.mark.skipif(not cpu_kernels.ONEDNN_PACKED_LINEAR, reason="oneDNN's packed linear needs AVX-512")
def test_packed_linear_needs_mkldnn_and_its_bf16_support(monkeypatch: pytest.MonkeyPatch) -> None:
    assert cpu_kernels._onednn_packed_linear_available()
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)  # AVX2 only
    assert not cpu_kernels._onednn_packed_linear_available()
    monkeypatch.undo()
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)  # a build without oneDNN
    assert not cpu_kernels._onednn_packed_linear_available()


@pytest.mark.parametrize(("vendor", "fp32_too"), [("GenuineIntel", False), ("AuthenticAMD", True)])
def test_fp32_onednn_linear_is_chosen_at_import_on_cpus_other_than_intel(vendor: str, fp32_too: bool) -> None:
    """Executes the module afresh with ``vendor`` in its ``/proc/cpuinfo``: fp32 stays with MKL on Intel."""
    spec = importlib.util.spec_from_file_location("fresh_cpu_kernels", cpu_kernels.__file__)
    fresh = importlib.util.module_from_spec(spec)
    fresh.open = lambda *args, **kwargs: io.StringIO(f"processor\t: 0\nvendor_id\t: {vendor}\n")
    spec.loader.exec_module(fresh)
    assert fresh.ONEDNN_FP32_LINEAR is (fp32_too and fresh.ONEDNN_PACKED_LINEAR)


@pytest.mark.parametrize("bf16_kernels", [True, False])
def test_compiled_kernels_run_fp32_always_and_bf16_only_with_bf16_kernels(
    monkeypatch: pytest.MonkeyPatch, bf16_kernels: bool
) -> None:
    monkeypatch.setattr(cpu_kernels, "CPU_HAS_BF16_KERNELS", bf16_kernels)
    assert cpu_kernels.has_kernels_for(torch.float32)
    assert cpu_kernels.has_kernels_for(torch.bfloat16) is bf16_kernels
    assert not cpu_kernels.has_kernels_for(torch.float16)  # emulated on these CPUs
    assert not cpu_kernels.has_kernels_for(torch.float64)


def test_onednn_linears_take_cpu_tensors_of_kernel_dtypes_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Neither the packed (no graph) nor the training path for other devices (meta here) or for an
    operand in a dtype without a oneDNN kernel, whatever autocast's dtype."""
    monkeypatch.setattr(cpu_kernels, "ONEDNN_PACKED_LINEAR", True)
    monkeypatch.setattr(cpu_kernels, "ONEDNN_FP32_LINEAR", True)
    # a layer without inputs (nn.Linear(0, 4) is legal) has no product to speed up
    assert not cpu_kernels.large_enough_for_onednn(torch.empty(2, 0), torch.empty(4, 0))
    monkeypatch.setattr(cpu_kernels, "ONEDNN_MIN_MACS", 0)
    weight, x = torch.randn(4, 3), torch.randn(2, 3)
    meta_weight, meta_x = weight.to("meta"), x.to("meta")
    assert cpu_kernels.trains_on_onednn(x, weight) and not cpu_kernels.trains_on_onednn(meta_x, meta_weight)
    for other in (torch.bfloat16, torch.float64):  # one operand in fp32, the other not
        assert not cpu_kernels.trains_on_onednn(x, weight.to(other))
        assert not cpu_kernels.trains_on_onednn(x.to(other), weight)
    with torch.no_grad():
        assert cpu_kernels.linear_dtype(x, weight) == torch.float32
        assert cpu_kernels.linear_dtype(meta_x, meta_weight) is None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert cpu_kernels.linear_dtype(x, weight) == torch.bfloat16
            assert cpu_kernels.linear_dtype(x.double(), weight) is None
            assert cpu_kernels.linear_dtype(x, weight.double()) is None


@pytest.mark.skipif(not cpu_kernels.ONEDNN_PACKED_LINEAR, reason="oneDNN's packed linear needs AVX-512")
def test_packed_linear_weight_and_bias_are_both_in_the_packing_dtype() -> None:
    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(64, 32, generator=gen), torch.randn(64, generator=gen)
    x = torch.randn(10, 32, generator=gen)
    packed, packed_bias = cpu_kernels.pack_linear(weight, bias, torch.bfloat16)
    assert packed_bias.dtype == torch.bfloat16
    assert cpu_kernels.pack_linear(weight, None, torch.bfloat16)[1] is None
    expected = torch.nn.functional.linear(x.bfloat16(), weight.bfloat16(), bias.bfloat16())
    got = cpu_kernels.linear(x.bfloat16(), packed, packed_bias, silu=True)
    torch.testing.assert_close(got, torch.nn.functional.silu(expected), rtol=0.02, atol=0.02)


# ----------------------------------------------------------------------- the CPU attention kernels
def test_chunked_attention_runs_one_query_a_chunk_when_one_overflows_the_budget() -> None:
    """``max_scores`` below one query's scores still makes progress (a chunk of one query), and each
    chunk writes values of the values' width (4), not the queries' (5)."""
    q, k, v = (t.detach() for t in attention_inputs(torch.float64))
    out = cpu_kernels.chunked_attention(q, k, v, 0.3, max_scores=1)
    torch.testing.assert_close(out, softmax_attention(q, k, v, 0.3), rtol=0, atol=1e-12)


def test_attention_kernels_keep_fp32_inputs_in_fp32_under_bf16_autocast() -> None:
    """Autocast is off inside: fp32 inputs give the same fp32 outputs and gradients as without it."""
    q, k, v = (t.detach() for t in attention_inputs(torch.float32))
    grad_out = torch.randn(2, 3, 9, 4, generator=torch.Generator().manual_seed(5))
    results = []
    for enabled in (False, True):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            chunked = cpu_kernels.chunked_attention(q, k, v, 0.3, max_scores=2 * 3 * 7 * 4)
            recomputed = cpu_kernels.RecomputedAttention.apply(*leaves, 0.3)
            recomputed.backward(grad_out)
        results.append([chunked, recomputed, *(t.grad for t in leaves)])
    for name, got, want in zip(("chunked", "recomputed", "dq", "dk", "dv"), *results, strict=True):
        assert got.dtype == torch.float32, name
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)


def test_recomputed_attention_blocks_one_query_when_one_overflows_the_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """RECOMPUTE_SCORES below one query's 7 scores: blocks of one query row, forward and backward."""
    monkeypatch.setattr(cpu_kernels, "RECOMPUTE_SCORES", 3)
    q, k, v = attention_inputs(torch.float64)
    out = cpu_kernels.RecomputedAttention.apply(q, k, v, 0.3)
    expected = softmax_attention(q, k, v, 0.3)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    for name, a, b in zip("qkv", got, torch.autograd.grad(expected, (q, k, v), grad_out), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=f"d{name}")


@pytest.mark.parametrize("shape", [(0, 2, 5, 7), (2, 2, 5, 0)], ids=["no images", "no keys"])
def test_recomputed_attention_takes_empty_inputs(shape: tuple[int, int, int, int]) -> None:
    """As chunked_attention: no images, or no keys (the output is then zero, as softmax attention's)."""
    b, heads, queries, keys = shape
    q = torch.randn(b, heads, queries, 8, requires_grad=True)
    k = torch.randn(b, heads, keys, 8, requires_grad=True)
    v = torch.randn(b, heads, keys, 4, requires_grad=True)
    out = cpu_kernels.RecomputedAttention.apply(q, k, v, 0.5)
    torch.testing.assert_close(out, torch.zeros(b, heads, queries, 4), rtol=0, atol=0)
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape
