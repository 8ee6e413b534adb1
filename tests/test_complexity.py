"""GMACs of the official variants against the paper's figures (within 2%), and the eval mode that the
read-only calls (FLOP counts, evaluation, attention maps) run a caller's model in."""

from __future__ import annotations

import pytest
import torch

import cvt
from cvt.attention_maps import last_stage_attention
from cvt.complexity import complexity, count_gmacs
from cvt.engine.evaluate import evaluate
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


def _frozen_first_batchnorm(training: bool) -> cvt.CvT:
    """cvt_tiny in ``training`` mode with its first BatchNorm in the other mode (a frozen BN, say)."""
    torch.manual_seed(0)
    model = cvt.create_model("cvt_tiny").train(training)
    next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)).train(not training)
    return model


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("read_only_call", ["count_gmacs", "evaluate", "attention_maps"])
def test_read_only_calls_run_in_eval_mode_and_give_each_submodule_its_mode_back(
    read_only_call: str, training: bool
) -> None:
    """Counting FLOPs, evaluating and drawing attention maps run the network as it evaluates (BatchNorm
    on its running statistics, no dropout); afterwards every submodule is back in its own mode, a frozen
    BatchNorm of a training model included."""
    model = _frozen_first_batchnorm(training)
    modes_before = [m.training for m in model.modules()]
    modes_seen: list[bool] = []
    for m in model.modules():  # the BatchNorms of the depthwise q/k/v projections
        if isinstance(m, torch.nn.BatchNorm2d):
            m.register_forward_pre_hook(lambda module, args: modes_seen.append(module.training))
    image = torch.randn(1, 3, 32, 32)
    if read_only_call == "count_gmacs":
        count_gmacs(model, (32, 32))
        complexity(model)
    elif read_only_call == "evaluate":
        evaluate(model, [(image, torch.tensor([0]))], "cpu")
    else:
        last_stage_attention(model, image)
    assert modes_seen and not any(modes_seen)
    assert [m.training for m in model.modules()] == modes_before
    assert True in modes_before and False in modes_before


def test_a_grayscale_model_is_counted_with_its_one_input_channel() -> None:
    """in_chans=1 changes only the stem conv: two input channels fewer, so its MACs per output position
    and output channel drop by 2 * k * k, and its weights by 2 * k * k per output channel."""
    with torch.device("meta"):
        rgb, gray = cvt.create_model("cvt_13"), cvt.create_model("cvt_13", in_chans=1)
    stem = gray.stage_specs[0]
    k, s, p, dim = stem.patch_size, stem.patch_stride, stem.patch_padding, stem.embed_dim
    assert (k, s, p, dim) == (7, 4, 2, 64)  # the official stem, as the hand count below takes it
    size = (224, 160)
    h, w = ((n + 2 * p - k) // s + 1 for n in size)
    assert (h, w) == (56, 40)
    stem_macs_saved = 2 * h * w * dim * k * k  # 2 channels x (56 * 40 outputs) x 64 filters x 7 x 7
    info, rgb_info = complexity(gray, size), complexity(rgb, size)
    assert rgb_info.gmacs - info.gmacs == pytest.approx(stem_macs_saved / 1e9, rel=1e-9)
    assert info.gmacs == pytest.approx(count_gmacs(gray, size, in_chans=1), rel=1e-12)
    assert rgb_info.params - info.params == 2 * dim * k * k
    assert info.token_grids == rgb_info.token_grids == [(56, 40), (28, 20), (14, 10)]
