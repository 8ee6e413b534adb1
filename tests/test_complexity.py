"""GMACs of the official variants against the paper's figures (within 2%)."""

from __future__ import annotations

import pytest
import torch

import cvt
from cvt.complexity import complexity, count_gmacs
from cvt.models import cpu_kernels

PUBLISHED_GMACS = [
    ("cvt_13", 224, 4.53),
    ("cvt_13", 384, 16.3),
    ("cvt_21", 224, 7.13),
    ("cvt_21", 384, 24.9),
    ("cvt_w24", 224, 60.86),
    ("cvt_w24", 384, 193.2),
]


@pytest.mark.parametrize(("name", "size", "published"), PUBLISHED_GMACS)
def test_gmacs_match_the_paper(name: str, size: int, published: float) -> None:
    with torch.device("meta"):  # shapes only: no weights are allocated
        model = cvt.create_model(name).eval()
    info = complexity(model, (size, size))
    assert info.gmacs == pytest.approx(published, rel=0.02)
    assert info.params == cvt.count_params(model)


def test_kv_stride_one_costs_more() -> None:
    with torch.device("meta"):
        stride2, stride1 = cvt.create_model("cvt_13"), cvt.create_model("cvt_13", stride_kv=1)
    # paper Table 7: 4.53 vs 6.55 GFLOPs
    assert complexity(stride1).gmacs == pytest.approx(6.55, rel=0.02)
    assert complexity(stride1).gmacs / complexity(stride2).gmacs == pytest.approx(6.55 / 4.53, rel=0.02)


def test_token_grids_non_square() -> None:
    with torch.device("meta"):
        model = cvt.create_model("cvt_13")
    assert complexity(model, (288, 224)).token_grids == [(72, 56), (36, 28), (18, 14)]
    with pytest.raises(cvt.InputShapeError, match="minimum size"):
        complexity(model, (2, 2))


def test_cpu_sdpa_is_counted_like_the_reference_and_the_meta_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """At 64 px cvt_tiny's first stage attends over 16x16 = 256 keys: the CPU SDPA kernel runs."""
    model = cvt.create_model("cvt_tiny").eval()
    sdpa = torch.nn.functional.scaled_dot_product_attention
    key_counts: list[int] = []

    def recording_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs: object) -> torch.Tensor:
        key_counts.append(k.shape[-2])
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_sdpa)
    fused = count_gmacs(model, (64, 64))
    assert key_counts and max(key_counts) == 256  # the fused CPU kernel was counted
    with torch.device("meta"):
        on_meta = cvt.create_model("cvt_tiny").eval()
    assert fused == pytest.approx(count_gmacs(on_meta, (64, 64)), rel=1e-9)
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    assert fused == pytest.approx(count_gmacs(model, (64, 64)), rel=1e-9)


@pytest.mark.parametrize("packed", [False, True])
def test_onednn_packed_linears_are_counted_like_f_linear(
    monkeypatch: pytest.MonkeyPatch, packed: bool
) -> None:
    """Without a graph AVX-512 CPUs run the Linear layers as oneDNN's packed kernel (its fp32 kernel runs
    on any x86 CPU, so it is forced on here): counted as F.linear, on the meta device."""
    monkeypatch.setattr(cpu_kernels, "ONEDNN_PACKED_LINEAR", packed)
    monkeypatch.setattr(cpu_kernels, "ONEDNN_FP32_LINEAR", packed)
    monkeypatch.setattr(cpu_kernels, "ONEDNN_MIN_MACS", 0)  # cvt_tiny's products are small
    ran_packed: list[bool] = []
    linear = cpu_kernels.linear

    def recording_linear(*args: object, **kwargs: object) -> torch.Tensor:
        ran_packed.append(True)
        return linear(*args, **kwargs)

    monkeypatch.setattr(cpu_kernels, "linear", recording_linear)
    gmacs = count_gmacs(cvt.create_model("cvt_tiny").eval(), (32, 32))
    assert bool(ran_packed) == packed
    with torch.device("meta"):
        on_meta = cvt.create_model("cvt_tiny").eval()
    assert gmacs == pytest.approx(count_gmacs(on_meta, (32, 32)), rel=1e-9)
