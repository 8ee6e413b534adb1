"""Every fast path of the model hot path equals the plain reference computation (issue 4).

Tiny 2-stage models with each projection method (dw_bn, avg, linear), with and without a cls token,
on a non-square input; BatchNorm statistics are randomised so that folding them is not a no-op.
"""

from __future__ import annotations

import copy
import pickle
import sys
import threading
import warnings

import pytest
import torch
from torch import nn
from torch.autograd import forward_ad

from cvt.errors import UsageError
from cvt.models import CvT, cpu_kernels, expand_stages, layers
from cvt.models.derived_weights import CastCachedLinear, DerivedWeights
from cvt.models.layers import (
    FAST_PATH_FLAGS,
    ConvProjection,
    DenseGradient,
    QuickGeluMlp,
    SiluLinear,
    dense_channels_last,
    set_fast_paths,
)

METHODS = ("dw_bn", "avg", "linear")
INPUT_HW = (40, 56)  # non-square: grids 10x14 then 5x7, stride-2 kv 3x4


def tiny_model(
    method: str, cls: bool, act: str = "quick_gelu", seed: int = 0, drop_path_rate: float = 0.0
) -> CvT:
    """A 2-stage CvT with unit-scale random weights and random BatchNorm statistics."""
    torch.manual_seed(seed)
    stages = expand_stages(
        2, embed_dim=(16, 32), depth=(1, 2), num_heads=(1, 2), patch_size=(7, 3), patch_stride=(4, 2),
        patch_padding=(2, 1), cls_token=(False, cls), method=method, stride_kv=2,
        drop_path_rate=drop_path_rate,
    )  # fmt: skip
    model = CvT(stages, num_classes=7, img_size=INPUT_HW, act=act)
    for m in model.modules():
        if isinstance(m, nn.Linear):  # unit-scale activations: logits of order 1, not 0.02
            nn.init.normal_(m.weight, std=m.in_features**-0.5)
            nn.init.normal_(m.bias, std=0.1)
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_(1, 0.2)
            m.bias.data.normal_(0, 0.2)
    return model


def images(batch: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, *INPUT_HW, generator=torch.Generator().manual_seed(seed))


def reference_logits(model: CvT, x: torch.Tensor) -> torch.Tensor:
    ref = set_fast_paths(copy.deepcopy(model), False)
    with torch.no_grad():
        return ref(x)


def assert_runs_as_reference_and_differs_from_plain_avg(model: CvT, min_change: float) -> None:
    """An eval-mode ``avg`` model whose stage-1 poolings were edited computes what its own reference does,
    and its logits move by more than ``min_change`` from an unedited one's: the fast path saw the edit."""
    x = images()
    with torch.no_grad():
        got = model(x)
    torch.testing.assert_close(got, reference_logits(model, x), rtol=0, atol=1e-5)
    assert (got - reference_logits(tiny_model("avg", cls=True).eval(), x)).abs().max() > min_change


def assert_same_step(
    model: nn.Module, expected: nn.Module, grad_tol: tuple[float, float], buffer_tol: tuple[float, float]
) -> None:
    """After a backward each: every parameter has a gradient equal to ``expected``'s (``(rtol, atol)``),
    and every buffer (the BatchNorm running statistics) equals its counterpart."""
    expected_params = dict(expected.named_parameters())
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        torch.testing.assert_close(
            p.grad, expected_params[name].grad, rtol=grad_tol[0], atol=grad_tol[1], msg=name
        )
    expected_buffers = dict(expected.named_buffers())
    for name, b in model.named_buffers():
        torch.testing.assert_close(
            b, expected_buffers[name], rtol=buffer_tol[0], atol=buffer_tol[1], msg=name
        )


@pytest.mark.parametrize("batch", [1, 3])  # one image: the projections' map is copied (dense_channels_last)
@pytest.mark.parametrize("cls", [False, True])
@pytest.mark.parametrize("method", METHODS)
def test_each_fast_path_equals_reference_in_eval(method: str, cls: bool, batch: int) -> None:
    model = tiny_model(method, cls).eval()
    x = images(batch)
    expected = reference_logits(model, x)
    assert expected.std() > 0.1  # a non-trivial function
    variants = [{}] + [{flag: False} for flag in FAST_PATH_FLAGS]  # all fast, then each one off
    for flags in variants:
        set_fast_paths(model, True, **flags)
        with torch.no_grad():
            torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-5, msg=f"flags {flags}")
    # single fast paths on their own
    for flag in FAST_PATH_FLAGS:
        set_fast_paths(model, False, **{flag: True})
        with torch.no_grad():
            torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-5, msg=f"only {flag}")


@pytest.fixture
def sdpa_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The key count of every ``F.scaled_dot_product_attention`` call made during the test."""
    calls: list[int] = []
    sdpa = nn.functional.scaled_dot_product_attention

    def counted_sdpa(*args: torch.Tensor, **kwargs: object) -> torch.Tensor:
        calls.append(args[1].shape[-2])
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(nn.functional, "scaled_dot_product_attention", counted_sdpa)
    return calls


@pytest.fixture
def recomputed_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The key count of every :class:`~cvt.models.cpu_kernels.RecomputedAttention` call made during the
    test."""
    calls: list[int] = []
    apply = cpu_kernels.RecomputedAttention.apply
    monkeypatch.setattr(
        layers.RecomputedAttention, "apply", lambda q, k, *a: calls.append(k.shape[-2]) or apply(q, k, *a)
    )
    return calls


@pytest.mark.parametrize(("few_keys", "expected_sdpa_calls"), [(64, 0), (20, 1), (0, 3)])
def test_cpu_attention_over_few_keys_is_explicit(
    monkeypatch: pytest.MonkeyPatch, sdpa_calls: list[int], few_keys: int, expected_sdpa_calls: int
) -> None:
    """``explicit_few_keys``: CPU attention over at most FEW_KEYS keys skips SDPA (stage 0 of the tiny
    model has 5x7 = 35 keys, stage 1 3x4 + cls = 13), with logits and gradients equal to SDPA's."""
    monkeypatch.setattr(layers, "FEW_KEYS", few_keys)
    model = tiny_model("dw_bn", cls=True).train()
    with_sdpa = set_fast_paths(copy.deepcopy(model), explicit_few_keys=False)
    x, target = images(4), torch.tensor([0, 3, 6, 2])
    logits = model(x)
    assert len(sdpa_calls) == expected_sdpa_calls
    nn.functional.cross_entropy(logits, target).backward()
    expected = with_sdpa(x)
    assert len(sdpa_calls) == expected_sdpa_calls + 3  # one per block without the flag
    nn.functional.cross_entropy(expected, target).backward()
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    assert_same_step(model, with_sdpa, grad_tol=(1e-4, 1e-6), buffer_tol=(1e-5, 1e-6))


@pytest.mark.parametrize("bf16_kernels", [False, True])
def test_bf16_attention_over_few_keys_is_explicit_only_with_bf16_kernels(
    monkeypatch: pytest.MonkeyPatch, sdpa_calls: list[int], bf16_kernels: bool
) -> None:
    """Under bf16 autocast the explicit path's bf16 matmuls are 3-9x slower than SDPA where oneDNN has
    no bf16 kernels (AVX2), so there SDPA stays; with the kernels the explicit path runs."""
    monkeypatch.setattr(cpu_kernels, "CPU_HAS_BF16_KERNELS", bf16_kernels)
    model = tiny_model("dw_bn", cls=True).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(images())
    assert len(sdpa_calls) == (0 if bf16_kernels else 3)
    torch.testing.assert_close(logits.float(), reference_logits(model, images()), rtol=0, atol=0.1)


def test_a_trace_keeps_sdpa_whatever_the_example_key_count() -> None:
    """A trace (ONNX, TorchScript) would freeze the explicit path chosen for the example's few keys;
    exported graphs keep SDPA, and their outputs equal eager's."""
    model = tiny_model("dw_bn", cls=True).eval()
    x = images()
    traced = torch.jit.trace(model, x, check_trace=False)
    assert str(traced.inlined_graph).count("scaled_dot_product_attention") == 3
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x), rtol=0, atol=1e-5)


def test_folded_batchnorm_equals_conv_then_bn() -> None:
    proj = ConvProjection("dw_bn", 8, 3, stride=2, padding=1).eval()
    proj.bn.running_mean.normal_()
    proj.bn.running_var.uniform_(0.2, 3.0)
    nn.init.normal_(proj.bn.weight)
    x = torch.randn(2, 8, 9, 7)
    with torch.no_grad():
        folded = proj(x)
        plain = proj.bn(proj.conv(x)).flatten(2).transpose(1, 2)
    torch.testing.assert_close(folded, plain, rtol=0, atol=1e-5)


@pytest.mark.parametrize("few_keys", [True, False])  # the tiny model's attention: explicit, or SDPA
@pytest.mark.parametrize("method", METHODS)
def test_training_fast_path_has_equal_gradients_and_bn_statistics(method: str, few_keys: bool) -> None:
    fast = set_fast_paths(tiny_model(method, cls=True).train(), explicit_few_keys=few_keys)
    ref = set_fast_paths(copy.deepcopy(fast), False)
    x, target = images(4), torch.tensor([0, 3, 6, 2])
    # the memory saving is real: SiLU + fc2 is one autograd node (SiluLinear), which keeps h alone
    graph_nodes = []
    fast.stage0.blocks[0].mlp.register_forward_hook(lambda m, a, out: graph_nodes.append(out.grad_fn.name()))
    for model in (fast, ref):
        nn.functional.cross_entropy(model(x), target).backward()
    assert_same_step(fast, ref, grad_tol=(1e-4, 1e-6), buffer_tol=(1e-5, 1e-6))
    assert graph_nodes == ["SiluLinearBackward"]


@pytest.mark.parametrize("method", METHODS)
def test_cls_only_last_block_equals_the_full_block_in_a_training_step(method: str) -> None:
    """Logits, every gradient (exact zeros for the last block's unused q conv, not None: DDP needs them),
    BatchNorm statistics and the stochastic-depth draws equal the full computation's."""
    fast = tiny_model(method, cls=True, seed=3, drop_path_rate=0.5).train()
    full = copy.deepcopy(fast)
    set_fast_paths(full, cls_only_last_block=False)
    x, target = images(4), torch.tensor([0, 3, 6, 2])
    logits = {}
    for name, model in (("fast", fast), ("full", full)):
        torch.manual_seed(11)  # same DropPath draws: they are per sample, not per token
        logits[name] = model(x)
        nn.functional.cross_entropy(logits[name], target).backward()
    torch.testing.assert_close(logits["fast"], logits["full"], rtol=0, atol=1e-5)
    assert_same_step(fast, full, grad_tol=(1e-4, 1e-6), buffer_tol=(1e-5, 1e-6))
    # the saving is real in training too: the last block's MLP ran on the cls token alone
    seen = []
    fast.stage1.blocks[-1].mlp.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    fast(x)
    assert seen == [1]
    if method == "dw_bn":
        unused_q = fast.stage1.blocks[-1].attn.conv_proj_q
        assert unused_q.conv.weight.grad.abs().max() == 0 and unused_q.bn.weight.grad.abs().max() == 0


def test_an_eval_model_trained_with_frozen_batchnorms_gives_every_parameter_a_gradient() -> None:
    """Backward through an eval-mode model (BatchNorms frozen): the last block's unused q conv gets
    zero gradients, not None (DDP without find_unused_parameters raised; AdamW skipped their decay)."""
    model = tiny_model("dw_bn", cls=True, seed=3).eval()
    nn.functional.cross_entropy(model(images(2)), torch.tensor([0, 3])).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert missing == []
    unused_q = model.stage1.blocks[-1].attn.conv_proj_q
    assert unused_q.conv.weight.grad.abs().max() == 0


def test_cls_only_features_are_the_cls_row_of_all_features() -> None:
    model = tiny_model("dw_bn", cls=True).eval()
    x = images()
    with torch.no_grad():
        every = model.forward_features(x)  # (B, 1 + T, C)
        cls = model.forward_features(x, cls_only=True)  # (B, 1, C)
    assert every.shape[1] > 1 and cls.shape == (x.shape[0], 1, every.shape[2])
    torch.testing.assert_close(cls, every[:, :1], rtol=0, atol=1e-5)
    with pytest.raises(UsageError, match="cls token"):
        tiny_model("dw_bn", cls=False).forward_features(x, cls_only=True)


def test_avg_pooled_head_runs_every_token_of_the_last_block() -> None:
    """``reset_classifier(global_pool='avg')``: every token reaches the head, so nothing is skipped."""
    model = tiny_model("dw_bn", cls=True).eval()
    model.reset_classifier(7, global_pool="avg")
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.forward_head(model.forward_features(x)), rtol=0, atol=0)
        torch.testing.assert_close(model(x), reference_logits(model, x), rtol=0, atol=1e-5)


def test_gradient_checkpointing_keeps_gradients_and_updates_batchnorm_statistics_once() -> None:
    plain = tiny_model("dw_bn", cls=True).train()
    recomputing = copy.deepcopy(plain)
    recomputing.set_grad_checkpointing(True)
    x, target = images(4), torch.tensor([0, 3, 6, 2])
    for model in (plain, recomputing):
        nn.functional.cross_entropy(model(x), target).backward()
    # running stats moved once, num_batches_tracked == 1
    assert_same_step(recomputing, plain, grad_tol=(0, 1e-6), buffer_tol=(0, 1e-7))


def test_train_and_eval_agree_when_batchnorm_uses_its_running_statistics() -> None:
    """Training mode with BN set to eval equals the eval model: dropout is off, only BN differs."""
    model = tiny_model("dw_bn", cls=True)
    x = images()
    model.eval()
    with torch.no_grad():
        evaluated = model(x)
    model.train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    torch.testing.assert_close(model(x).detach(), evaluated, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["dw_bn", "avg"])
def test_channels_last_input_gives_the_same_logits(method: str) -> None:
    model = tiny_model(method, cls=False).eval()
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(
            model(x.contiguous(memory_format=torch.channels_last)), model(x), rtol=0, atol=1e-5
        )


def test_gelu_model_keeps_timm_mlp_and_matches_reference() -> None:
    model = tiny_model("dw_bn", cls=True, act="gelu").eval()
    assert not any(isinstance(m, QuickGeluMlp) for m in model.modules())
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_logits(model, x), rtol=0, atol=1e-5)


def test_switching_a_fast_path_off_drops_its_cached_weights() -> None:
    """The derived copies cost memory (~47 MB for CvT-13): a path switched off must not keep them."""
    model = set_fast_paths(tiny_model("dw_bn", cls=True).eval(), onednn_linear=False)  # _scaled, not _packed
    x = images()
    with torch.no_grad():
        model(x)
    mlps = [m for m in model.modules() if isinstance(m, QuickGeluMlp)]
    assert mlps and all(m._scaled.cached is not None for m in mlps)
    set_fast_paths(model, fold_act=False)
    assert all(m._scaled.cached is None for m in mlps)
    with torch.no_grad():  # and the plain path neither fills nor needs them
        torch.testing.assert_close(model(x), reference_logits(model, x), rtol=0, atol=1e-5)
    assert all(m._scaled.cached is None for m in mlps)


def test_moving_or_converting_the_model_drops_the_cached_weights() -> None:
    """.to(), .double(), .half(): the cache of the old tensors kept them alive (CvT-13: ~72 MB of fp32
    weights and their packed copies) until the next call without a graph."""
    from cvt.models.derived_weights import DerivedWeights

    model = tiny_model("dw_bn", cls=True).eval()
    x = images()

    def kept() -> list[DerivedWeights]:
        caches = (v for m in model.modules() for v in vars(m).values() if isinstance(v, DerivedWeights))
        return [cache for cache in caches if cache.cached is not None]

    for convert in (lambda m: m.double(), lambda m: m.to(torch.float32), lambda m: m.half().float()):
        with torch.no_grad():
            model(x.to(next(model.parameters()).dtype))
        assert kept()
        convert(model)
        assert kept() == []


def test_cached_weights_are_reused_then_invalidated_by_weight_changes() -> None:
    model = set_fast_paths(tiny_model("avg", cls=True).eval(), onednn_linear=False)  # _scaled, not _packed
    mlp = model.stage1.blocks[0].mlp
    x = images()
    with torch.no_grad():
        model(x)
        cached = mlp._scaled.cached
        model(x)
        assert mlp._scaled.cached is cached  # no recomputation while nothing changed

    # in-place update (an optimizer step)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    model(x).square().mean().backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_logits(model, x), rtol=0, atol=1e-5)
        assert mlp._scaled.cached is not cached

    # load_state_dict (copies into the same tensors) and a BatchNorm buffer changed in place
    other = tiny_model("avg", cls=True, seed=5)
    model.load_state_dict(other.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_logits(other.eval(), x), rtol=0, atol=1e-5)
    dw_model = tiny_model("dw_bn", cls=False).eval()
    with torch.no_grad():
        dw_model(x)
        dw_model.stage0.blocks[0].attn.conv_proj_k.bn.running_mean.add_(0.7)
        torch.testing.assert_close(dw_model(x), reference_logits(dw_model, x), rtol=0, atol=1e-5)

    # .double() keeps each Parameter object and its version counter but gives it new storage
    with torch.no_grad():
        expected = model(x).double()
        model.double()
        torch.testing.assert_close(model(x.double()), expected, rtol=0, atol=1e-5)


def test_batchnorm_statistics_moved_by_a_train_mode_forward_refold_the_projection() -> None:
    """BatchNorm moves its running statistics in place without moving their version counters. Here
    only the BatchNorm layers switch modes (a frozen backbone whose BatchNorms keep adapting), so no
    ``eval()`` of the projection clears its cache: the next eval pass must still fold the new statistics."""
    model = tiny_model("dw_bn", cls=True).eval()
    batchnorms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    x = images()
    with torch.no_grad():
        model(x)  # folds and caches every projection
        for bn in batchnorms:
            bn.train()
        adapted = model(3 * x + 1)  # batch statistics, far from the running ones
        for bn in batchnorms:
            bn.eval()
        torch.testing.assert_close(model(x), reference_logits(model, x), rtol=0, atol=1e-5)
    for bn in batchnorms:
        bn.train()
    torch.testing.assert_close(adapted, reference_logits(model, 3 * x + 1), rtol=0, atol=1e-5)


def test_batchnorms_adapting_in_an_eval_model_move_as_in_the_reference() -> None:
    """Test-time adaptation (an eval model whose BatchNorms train): ``model(x)`` computes the last
    block for the cls token alone, yet its q projection's BatchNorm must still see every token, as
    the reference's does (before, its statistics stayed put while the logits matched)."""
    model = tiny_model("dw_bn", cls=True).eval()
    expected = set_fast_paths(copy.deepcopy(model), False)
    for m in (model, expected):
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.train()
    x = 3 * images() + 1
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected(x), rtol=0, atol=1e-5)
    expected_buffers = dict(expected.named_buffers())
    for name, buffer in model.named_buffers():
        torch.testing.assert_close(buffer, expected_buffers[name], rtol=0, atol=1e-6, msg=name)
    assert int(model.stage1.blocks[-1].attn.conv_proj_q.bn.num_batches_tracked) == 1


@pytest.mark.parametrize("autocast", [False, True])
def test_fused_optimizer_steps_refresh_the_cached_weights(autocast: bool) -> None:
    """``AdamW(fused=True)`` updates the parameters without moving their version counters; a model
    kept in eval mode (frozen BatchNorm) between steps must not run on the weights of before them."""
    model = tiny_model("dw_bn", cls=True).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
    x = images()

    def logits(m: nn.Module) -> torch.Tensor:  # autocast around the forward only, as PyTorch asks
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return m(x)

    for _ in range(2):
        before = logits(model)  # caches the folded, scaled and (under autocast) cast weights
        model(x).square().mean().backward()  # a graph: the cache is not used
        opt.step()
        opt.zero_grad()
        after = logits(model)
        assert (after - before).abs().max() > 0.05  # the step moved the logits
        torch.testing.assert_close(after, logits(copy.deepcopy(model)), rtol=0, atol=0)  # empty cache


def test_a_model_made_or_converted_under_inference_mode_runs() -> None:
    """Inference tensors have no version counter, so the cache cannot key on them: it recomputes."""
    x = images()
    with torch.no_grad():  # the packed oneDNN linears need the cache too: F.linear runs in both
        expected = set_fast_paths(tiny_model("dw_bn", cls=True).eval(), onednn_linear=False)(x)
    with torch.inference_mode():
        made_there = tiny_model("dw_bn", cls=True).eval()
        assert made_there.stage1.blocks[0].attn.proj.weight.is_inference()
        for _ in range(2):  # the second call would read the cache (torch 2.5 rounds differently here)
            torch.testing.assert_close(made_there(x), expected, rtol=0, atol=1e-6)
        converted = tiny_model("dw_bn", cls=True).eval().double()
        torch.testing.assert_close(converted(x.double()).float(), expected, rtol=0, atol=1e-5)


def test_threads_sharing_a_cache_each_get_the_tensors_of_their_own_sources() -> None:
    """``nn.DataParallel`` replicas share their modules' caches and run in threads: a thread must never
    get back the tensors another thread has just computed from its own sources."""
    shared = DerivedWeights()
    common = tuple(torch.zeros(1) for _ in range(100))  # a long key: a wide window between writes
    sources = [(torch.full((4,), float(i)), *common) for i in range(2)]
    wrong: list[int] = []

    def call(i: int) -> None:
        with torch.no_grad():  # grad mode is per thread
            for _ in range(500):
                (value,) = shared.get(sources[i], lambda i=i: (sources[i][0] * 2,))
                if value[0].item() != 2 * i:
                    wrong.append(i)

    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible (the old code: ~40 % wrong)
    try:
        threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(switch_interval)
    assert not wrong


def test_mode_switch_drops_weights_derived_before_an_edit_through_data() -> None:
    """``p.data.copy_()`` has a version counter of its own: no cache key can see it; the next
    ``eval()`` (or ``train()``) clears every cache, so code that edits weights that way and then
    evaluates gets the edited model."""
    model = tiny_model("linear", cls=True).eval()
    x = images()
    with torch.no_grad():
        model(x)
        for p in model.parameters():
            p.data.mul_(1.1)
        model.eval()
        torch.testing.assert_close(model(x), reference_logits(model, x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_hooks_on_bypassed_submodules_fire_and_see_the_reference_values(method: str) -> None:
    """The fast paths read fc1/fc2, the q/k/v linears and the conv + BatchNorm instead of calling them;
    with a hook on one of them those modules run as themselves (a hook must see its module run)."""
    model = tiny_model(method, cls=True).eval()
    x = images()
    expected = reference_logits(model, x)
    block = model.stage1.blocks[0]
    attn = block.attn
    hooked = [block.mlp.fc1, block.mlp.act, attn.proj_k]
    if method == "dw_bn":
        hooked.append(attn.conv_proj_v.bn)
    if method == "avg":
        hooked.append(attn.conv_proj_v)
    seen: list[nn.Module] = []
    for module in hooked:
        module.register_forward_hook(lambda m, args, out: seen.append(m))
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-5)
    assert all(any(m is module for m in seen) for module in hooked)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("linear", ["proj_q", "proj_k", "proj_v", "proj"])
def test_a_hook_that_changes_one_attention_linear_is_honoured(method: str, linear: str) -> None:
    """q/k/v linears read as one stacked product step aside when any one of them has a hook."""
    model = tiny_model(method, cls=True).eval()
    x = images()
    plain = reference_logits(model, x)
    getattr(model.stage1.blocks[0].attn, linear).register_forward_hook(lambda m, args, out: 2 * out)
    expected = reference_logits(model, x)
    assert (expected - plain).abs().max() > 1e-3  # the hook matters
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-5)


def test_a_hook_that_changes_the_k_pooling_does_not_leak_into_v_and_backward_hooks_fire() -> None:
    """With ``avg`` the k pooling stands in for the v pooling only while both are plain and unhooked;
    backward hooks are set up when a module is called, so they also make the fast path step aside."""
    model = tiny_model("avg", cls=True).eval()
    x = images()
    attn = model.stage1.blocks[0].attn
    attn.conv_proj_k.register_forward_hook(lambda m, args, out: 2 * out)  # changes k only
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_logits(model, x), rtol=0, atol=1e-5)
    replaced = tiny_model("avg", cls=True).eval()
    replaced.stage1.blocks[0].attn.conv_proj_v.avg = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
    with torch.no_grad():  # another pooling class for v: the k pooling must not stand in for it
        torch.testing.assert_close(replaced(x), reference_logits(replaced, x), rtol=0, atol=1e-5)
    fired: list[str] = []
    fc2 = model.stage1.blocks[0].mlp.fc2
    fc2.register_full_backward_hook(lambda m, grad_in, grad_out: fired.append("fc2"))
    model.train()
    model(x).sum().backward()
    assert fired == ["fc2"]


class Adapted(nn.Module):
    """An adapter (a stand-in for LoRA and the like): the module it wraps, its output ``y`` changed to
    ``y + 0.1 y**2`` (not a scale, which a following LayerNorm would undo)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        out = self.inner(*args)
        return out + 0.1 * out.square()


DROPOUTS = ("mlp.drop1", "mlp.drop2", "attn.attn_drop")


@pytest.mark.parametrize("dropout", DROPOUTS)
def test_a_hooked_or_replaced_dropout_runs_as_itself(
    onednn_calls: list, monkeypatch: pytest.MonkeyPatch, dropout: str
) -> None:
    """The packed MLP and SDPA never call their dropout modules (identities in eval): one with a hook,
    or replaced by another class, makes them step aside."""
    monkeypatch.setattr(layers, "FEW_KEYS", 0)  # SDPA, not the explicit softmax, over the tiny key counts
    x = images()
    plain = reference_logits(tiny_model("dw_bn", cls=True).eval(), x)
    hooked = tiny_model("dw_bn", cls=True).eval()
    hooked.get_submodule(f"stage1.blocks.0.{dropout}").register_forward_hook(lambda m, args, out: 2 * out)
    replaced = tiny_model("dw_bn", cls=True).eval()
    parent, name = f"stage1.blocks.0.{dropout}".rsplit(".", 1)
    setattr(replaced.get_submodule(parent), name, Adapted(getattr(replaced.get_submodule(parent), name)))
    for model in (hooked, replaced):
        expected = reference_logits(model, x)
        assert (expected - plain).abs().max() > 1e-3  # the hook or the adapter matters
        with torch.no_grad():
            torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-5)
    assert onednn_calls  # the packed path ran where it could
    replaced.train()  # the training paths too (dropout rates 0: the same computation)
    torch.testing.assert_close(
        replaced(x), set_fast_paths(copy.deepcopy(replaced), False)(x), rtol=0, atol=1e-5
    )


@pytest.mark.parametrize("dropout", DROPOUTS)
def test_monte_carlo_dropout_samples_in_an_eval_model(
    onednn_calls: list, monkeypatch: pytest.MonkeyPatch, dropout: str
):
    """Dropouts switched to training in an eval model (Monte Carlo dropout) drop, in the packed MLP and
    in SDPA too: a dropout's own mode decides, not its block's."""
    monkeypatch.setattr(layers, "FEW_KEYS", 0)
    model = tiny_model("dw_bn", cls=True).eval()
    x = images()
    with torch.no_grad():
        deterministic = model(x)
        for block in model.stage1.blocks:
            block.get_submodule(dropout).p = 0.5
        torch.testing.assert_close(model(x), deterministic, rtol=0, atol=1e-6)  # still eval: no dropout
        for block in model.stage1.blocks:
            block.get_submodule(dropout).train()
        samples = [model(x) for _ in range(2)]
    assert not torch.allclose(samples[0], deterministic, atol=1e-3)
    assert not torch.allclose(samples[0], samples[1], atol=1e-3)


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("submodule", ["stage0.patch_embed.proj", "stage1.blocks.0.attn.conv_proj_k"])
def test_an_adapter_in_place_of_a_convolution_runs(submodule: str, train: bool) -> None:
    """The stem conv and a conv projection replaced by another class: the model reads no attribute of
    theirs (the stem's weight dtype, the projection's compute dtype) and computes what the reference does."""
    model = tiny_model("dw_bn", cls=True).train(train)
    parent, name = submodule.rsplit(".", 1)
    setattr(model.get_submodule(parent), name, Adapted(getattr(model.get_submodule(parent), name)))
    x = images()
    expected = set_fast_paths(copy.deepcopy(model), False)
    torch.manual_seed(0)
    got = model(x)
    torch.manual_seed(0)
    torch.testing.assert_close(got, expected(x), rtol=0, atol=1e-5)
    assert (got - reference_logits(tiny_model("dw_bn", cls=True).train(train), x)).abs().max() > 1e-3


def _fuse_batchnorm_into_conv(projection: ConvProjection) -> None:
    """The usual conv + BatchNorm fusion (``fuse_conv_bn_eval``): a biased conv, an identity BatchNorm."""
    projection.conv = torch.nn.utils.fusion.fuse_conv_bn_eval(projection.conv.eval(), projection.bn.eval())
    projection.bn = nn.Identity()


def _drop_biases(mlp: nn.Module) -> None:
    for name in ("fc1", "fc2"):
        old = getattr(mlp, name)
        new = nn.Linear(old.in_features, old.out_features, bias=False)
        new.weight.data.copy_(old.weight.data)
        setattr(mlp, name, new)


def _biased_reflect_conv(projection: ConvProjection) -> None:
    conv = projection.conv
    conv.bias = nn.Parameter(torch.randn(conv.out_channels))
    conv.padding_mode = "reflect"


def _biased_zero_padded_conv(projection: ConvProjection) -> None:
    projection.conv.bias = nn.Parameter(torch.randn(projection.conv.out_channels))


def _replace_batchnorm(projection: ConvProjection, **kwargs: bool) -> None:
    bn = nn.BatchNorm2d(projection.bn.num_features, **kwargs)
    if bn.running_mean is not None:
        bn.running_mean.normal_(0, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    projection.bn = bn


def _double_output(parent: nn.Module, name: str) -> None:
    """A subclass of the layer's own class (``is_plain`` asks for the exact class) doubling its output."""
    layer = getattr(parent, name)

    class Doubled(type(layer)):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(x)

    layer.__class__ = Doubled


# layers of another kind, or configured otherwise, in the places a fast path reads directly: each
# changes the function (asserted), and the fast path must compute the changed one
SWAPS = {
    "dropouts as identities": lambda b: [
        setattr(b.get_submodule(p), n, nn.Identity())
        for p, n in (("mlp", "drop1"), ("mlp", "drop2"), ("attn", "attn_drop"), ("attn", "proj_drop"))
    ],
    "GELU for QuickGELU": lambda b: setattr(b.mlp, "act", nn.GELU()),
    "identity for QuickGELU": lambda b: setattr(b.mlp, "act", nn.Identity()),
    "bias-free MLP": lambda b: _drop_biases(b.mlp),
    "BatchNorm fused into the k conv": lambda b: _fuse_batchnorm_into_conv(b.attn.conv_proj_k),
    "biased reflect-padded v conv": lambda b: _biased_reflect_conv(b.attn.conv_proj_v),
    # folded too (eval): the conv's bias enters the folded bias
    "biased zero-padded k conv": lambda b: _biased_zero_padded_conv(b.attn.conv_proj_k),
    "affine-free BatchNorm": lambda b: _replace_batchnorm(b.attn.conv_proj_v, affine=False),
    "BatchNorm without running statistics": lambda b: _replace_batchnorm(
        b.attn.conv_proj_v, track_running_stats=False
    ),
    "Linear subclass computing otherwise": lambda b: _double_output(b.mlp, "fc1"),
    "dropout subclass computing otherwise": lambda b: _double_output(b.attn, "attn_drop"),
}


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("swap", sorted(SWAPS))
def test_layers_swapped_for_another_kind_run_as_themselves(swap: str, train: bool) -> None:
    """A fast path reads a layer directly only where it is the plain layer of the kind it expects there
    (a dropout, a QuickGELU, a biased Linear, a BatchNorm after a zero-padded conv); otherwise the layer
    runs. Before, an identity dropout broke training, a fused BatchNorm broke eval, and a GELU, a
    bias-free MLP or a biased reflect-padded conv were silently computed as the original layers."""
    model = tiny_model("dw_bn", cls=True).train(train)
    untouched = copy.deepcopy(model)
    for block in model.stage1.blocks:
        SWAPS[swap](block)
    model.train(train)
    expected = set_fast_paths(copy.deepcopy(model), False)
    x = images()
    got = model(x)
    torch.testing.assert_close(got, expected(x), rtol=0, atol=1e-5)
    same = {"dropouts as identities", "BatchNorm fused into the k conv"}  # those compute the same
    if train:
        same.add("biased zero-padded k conv")  # the batch mean takes the bias away
    if swap not in same:
        assert (got - set_fast_paths(untouched, False)(x)).abs().max() > 1e-3


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("method", METHODS)
def test_the_default_layers_take_the_fast_paths(
    monkeypatch: pytest.MonkeyPatch, method: str, train: bool
) -> None:
    """The other side of the swap tests, which compare with the reference only: the layers a model is
    built with pass every ``is_plain`` check, so the folded BatchNorm (eval), the folded QuickGELU and
    the stacked projections (k/v of ``avg``, whose pooling is shared, and q/k/v of ``linear``) run."""
    calls: dict[str, int] = {}

    def spy(cls: type, name: str) -> None:
        real = getattr(cls, name)

        def counted(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return real(*args, **kwargs)

        monkeypatch.setattr(cls, name, counted)

    spy(ConvProjection, "folded_conv")
    spy(QuickGeluMlp, "scaled_weights")
    spy(layers.ConvAttention, "_stacked_linear")
    model = tiny_model(method, cls=True).train(train)
    with torch.set_grad_enabled(train):  # eval: inference, where the cls-only last block skips its q conv
        expected = set_fast_paths(copy.deepcopy(model), False)(images())
        torch.testing.assert_close(model(images()), expected, rtol=0, atol=1e-5)
    assert calls.get("scaled_weights", 0) == 3  # every block's MLP
    folds = 8 if method == "dw_bn" and not train else 0  # 3 convs per block, the cls-only last block's q none
    assert calls.get("folded_conv", 0) == folds
    assert calls.get("_stacked_linear", 0) == {"dw_bn": 0, "avg": 3, "linear": 3}[method]


@pytest.mark.parametrize(("setting", "value"), [("count_include_pad", False), ("divisor_override", 2)])
def test_k_and_v_poolings_set_apart_are_not_shared(setting: str, value: object) -> None:
    """``avg`` projections pool the map once for k and v only while both poolings compute the same."""
    model = tiny_model("avg", cls=True).eval()
    for block in model.stage1.blocks:
        setattr(block.attn.conv_proj_v.avg, setting, value)
    assert_runs_as_reference_and_differs_from_plain_avg(model, min_change=1e-4)


def test_linear_projections_with_and_without_a_bias_are_not_stacked() -> None:
    """``linear`` projections share one product only when all have a bias or none has."""
    model = tiny_model("linear", cls=True).eval()
    for block in model.stage1.blocks:
        block.attn.proj_k.bias = None
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_logits(model, x), rtol=0, atol=1e-5)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")  # torch.ao quantization
def test_pruned_parametrized_and_quantized_layers_run_as_themselves() -> None:
    """Pruning computes the weight in a pre-hook, a parametrization on access, dynamic quantization
    swaps the Linear class: the fast paths step aside (before, a pruned fc1 broke the second training
    step and a quantized model failed to run)."""
    from torch.ao.quantization import quantize_dynamic
    from torch.nn.utils import prune

    model = tiny_model("dw_bn", cls=True)
    x = images()
    fc1 = model.stage1.blocks[0].mlp.fc1
    prune.l1_unstructured(fc1, "weight", amount=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        logits = model(x)  # the pre-hook recomputes the pruned weight without a graph: deep-copyable
    assert (fc1.weight == 0).float().mean() >= 0.5
    torch.testing.assert_close(logits, reference_logits(model, x), rtol=0, atol=1e-5)

    model = tiny_model("dw_bn", cls=True).eval()
    normed = copy.deepcopy(model)
    torch.nn.utils.parametrizations.weight_norm(normed.stage1.blocks[0].mlp.fc2)  # weight from g and v
    with torch.no_grad():
        normed.stage1.blocks[0].mlp.fc2.parametrizations.weight.original0.mul_(2.0)  # doubles fc2's rows
        torch.testing.assert_close(normed(x), reference_logits(normed, x), rtol=0, atol=1e-5)
        assert not torch.allclose(normed(x), model(x), atol=1e-3)
    quantized = quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)
    with torch.no_grad():
        error = (quantized(x) - reference_logits(model, x)).abs().max()
    assert 0 < error < 0.1  # int8 weights: close, not equal


def test_float64_reference_attention_keeps_float64() -> None:
    """The reference softmax runs in fp32 under autocast but must not round an fp64 model to fp32."""
    model = tiny_model("dw_bn", cls=True).double().eval()
    x = images().double()
    attn = model.stage1.blocks[0].attn
    q = k = torch.randn(2, attn.num_heads, 5, 16, dtype=torch.float64)
    assert attn.attention_probs(q, k).dtype == torch.float64
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_logits(model, x), rtol=0, atol=1e-12)


def test_attention_linears_keep_their_autocast_copies_between_calls() -> None:
    """CastCachedLinear: under autocast without a graph the bf16 weight is cast once, not per call,
    and the output equals nn.Linear's under autocast; with a graph the parameters are used directly."""
    model = set_fast_paths(tiny_model("dw_bn", cls=True).eval(), onednn_linear=False)  # _cast, not _packed
    proj = model.stage1.blocks[0].attn.proj
    assert isinstance(proj, CastCachedLinear) and "stage1.blocks.0.attn.proj.weight" in model.state_dict()
    x = torch.randn(2, 5, proj.in_features)
    plain = nn.Linear(proj.in_features, proj.out_features)
    plain.load_state_dict(proj.state_dict())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            out = proj(x)
            cached = proj._cast.cached
            assert cached[0].dtype == torch.bfloat16
            proj(x)
            assert proj._cast.cached is cached
            torch.testing.assert_close(out, plain(x), rtol=0, atol=0)
        proj(x).sum().backward()  # a graph: autograd reaches the fp32 parameters
    assert proj.weight.grad is not None and proj.weight.grad.dtype == torch.float32


def test_models_with_warm_caches_copy_and_pickle() -> None:
    model = tiny_model("linear", cls=True).eval()
    x = images()
    with torch.no_grad():
        expected = model(x)
        for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            torch.testing.assert_close(clone(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("bf16_kernels", [False, True])  # the depthwise convs in fp32, or in bf16
def test_bf16_autocast_logits_close_to_fp32_and_softmax_in_fp32(
    monkeypatch: pytest.MonkeyPatch, bf16_kernels: bool
) -> None:
    monkeypatch.setattr(cpu_kernels, "CPU_HAS_BF16_KERNELS", bf16_kernels)
    model = tiny_model("dw_bn", cls=True).eval()
    x = images()
    with torch.no_grad():
        fp32 = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(x)
            q = torch.randn(1, 2, 5, 8)
            probs = model.stage1.blocks[0].attn.attention_probs(q.bfloat16(), q.bfloat16())
    assert probs.dtype == torch.float32
    rel = (bf16.float() - fp32).norm() / fp32.norm()
    assert rel < 0.02, f"bf16 logits differ from fp32 by {rel:.3%}"


@pytest.mark.parametrize("bf16_kernels", [False, True])
@pytest.mark.parametrize("training", [False, True])
def test_depthwise_projection_stays_fp32_under_cpu_autocast(
    monkeypatch: pytest.MonkeyPatch, training: bool, bf16_kernels: bool
) -> None:
    """``dw_fp32``: under CPU bf16 autocast with a graph the dw_bn conv (+ BN) computes exactly its
    fp32 result, and its gradients too, whatever the CPU; with the flag off autocast runs it in bf16."""
    monkeypatch.setattr(cpu_kernels, "CPU_HAS_BF16_KERNELS", bf16_kernels)
    proj = ConvProjection("dw_bn", 8, 3, stride=2, padding=1).train(training)
    proj.bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 8, 9, 7, requires_grad=True)
    expected = proj(x)
    expected_grads = torch.autograd.grad(expected.square().sum(), (x, proj.conv.weight))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = proj(x)
        proj.dw_fp32 = False
        assert proj(x).dtype == torch.bfloat16
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    grads = torch.autograd.grad(out.square().sum(), (x, proj.conv.weight))
    for grad, grad_expected in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, grad_expected, rtol=0, atol=0)


@pytest.mark.parametrize("bf16_kernels", [False, True])
def test_depthwise_inference_runs_in_bf16_only_on_a_cpu_with_bf16_kernels(
    monkeypatch: pytest.MonkeyPatch, bf16_kernels: bool
) -> None:
    """Without a graph, ``dw_fp32`` keeps the conv in fp32 only where oneDNN has no bf16 kernels (AVX2);
    on an AVX-512 CPU the bf16 forward is faster, and equals the bf16 conv of the folded weights."""
    monkeypatch.setattr(cpu_kernels, "CPU_HAS_BF16_KERNELS", bf16_kernels)
    proj = ConvProjection("dw_bn", 8, 3, stride=2, padding=1).eval()
    proj.bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 8, 9, 7)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = proj(x)
        weight, bias = (t.bfloat16() for t in proj.folded_conv())
        bf16 = nn.functional.conv2d(x.bfloat16(), weight, bias, 2, 1, 1, 8).flatten(2).transpose(1, 2)
    with torch.no_grad():
        fp32 = proj(x)
    if bf16_kernels:
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out, bf16, rtol=0, atol=0)
    else:
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, fp32, rtol=0, atol=0)


@pytest.mark.parametrize("bf16_kernels", [False, True])
@pytest.mark.parametrize("autocast", [False, True])
def test_projections_of_a_cls_stage_read_one_shared_map_and_no_promoted_tokens(
    monkeypatch: pytest.MonkeyPatch, autocast: bool, bf16_kernels: bool
) -> None:
    """After the cls split the q/k/v convs get a dense channels-last map, made once per block and
    already in the dtype they compute in (fp32 under ``dw_fp32``, else bf16 under autocast): a strided
    view would make each conv copy it to NCHW, an fp32 map each cast it. The fp32 cls token does not
    promote the projected tokens to fp32 before the bf16 Linear layers."""
    monkeypatch.setattr(cpu_kernels, "CPU_HAS_BF16_KERNELS", bf16_kernels)
    model = tiny_model("dw_bn", cls=True).eval()
    conv_inputs: list[torch.Tensor] = []
    linear_dtypes: list[torch.dtype] = []
    for block in model.stage1.blocks:
        attn = block.attn
        for proj in (attn.conv_proj_q, attn.conv_proj_k, attn.conv_proj_v):
            proj.register_forward_pre_hook(lambda _m, args: conv_inputs.append(args[0]))
        for linear in (attn.proj_q, attn.proj_k, attn.proj_v):
            linear.register_forward_pre_hook(lambda _m, args: linear_dtypes.append(args[0].dtype))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        model.forward_features(images())  # every token: the last block's q conv runs too
    map_dtype = torch.bfloat16 if autocast and bf16_kernels else torch.float32
    assert len(conv_inputs) == 6
    for x in conv_inputs:
        assert x.is_contiguous(memory_format=torch.channels_last) and x.dtype == map_dtype
    assert len({x.data_ptr() for x in conv_inputs}) == 2  # one map per block, shared by its three convs
    assert linear_dtypes == [map_dtype] * 6  # the projected tokens with the cls token, unpromoted


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("batch", [1, 2])
def test_conv_projections_read_maps_with_fresh_channels_last_strides(batch: int, grad: bool) -> None:
    """With a batch of one, a map that is a view of tokens has batch stride C (or (1+H*W)*C after a cls
    split) and still passes ``is_contiguous(channels_last)``, which ignores size-1 dims; oneDNN's
    depthwise conv runs 2.4x slower on it. Every stage's projections get exact channels-last strides."""
    model = tiny_model("dw_bn", cls=True).eval()
    conv_inputs: list[torch.Tensor] = []
    for stage in model.stages:
        for block in stage.blocks:
            attn = block.attn
            for proj in (attn.conv_proj_q, attn.conv_proj_k, attn.conv_proj_v):
                proj.register_forward_pre_hook(lambda _m, args: conv_inputs.append(args[0]))
    with torch.set_grad_enabled(grad):
        model.forward_features(images(batch))
    assert len(conv_inputs) == 9  # stage 0: one block, stage 1: two
    for x in conv_inputs:
        _, c, h, w = x.shape
        assert x.stride() == (c * h * w, 1, w * c, c)

    token_view = torch.randn(1, 20, 3).transpose(1, 2).reshape(1, 3, 4, 5)
    assert token_view.is_contiguous(memory_format=torch.channels_last) and not dense_channels_last(token_view)
    assert dense_channels_last(torch.empty(1, 3, 4, 5, memory_format=torch.channels_last))
    assert dense_channels_last(torch.randn(2, 20, 3).transpose(1, 2).reshape(2, 3, 4, 5))
    assert not dense_channels_last(torch.randn(2, 3, 4, 5))


@pytest.mark.parametrize("batch", [1, 2])
def test_a_trace_turns_no_traced_size_into_a_bool(batch: int) -> None:
    """The exact-stride check must not compare traced sizes while tracing (a TracerWarning on every
    ``cvt export``, which traces two images), and the trace computes the model, for one image too."""
    model = tiny_model("dw_bn", cls=True).eval()
    x = images(batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)
        traced = torch.jit.trace(model, x, check_trace=False)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x), rtol=0, atol=1e-5)


def test_batchnorm_of_a_cls_stage_gets_a_dense_channels_last_gradient() -> None:
    """The backward of the cls-token cat hands the projection a strided slice; BatchNorm's CPU backward
    is ~3x slower on it, so DenseGradient makes it dense (same values)."""
    model = tiny_model("dw_bn", cls=True).train()
    layouts: list[bool] = []

    def keep_layout(_module: nn.Module, _grad_in: tuple, grad_out: tuple) -> None:
        layouts.append(grad_out[0].is_contiguous(memory_format=torch.channels_last))

    for block in model.stage1.blocks:
        for proj in (block.attn.conv_proj_q, block.attn.conv_proj_k, block.attn.conv_proj_v):
            proj.bn.register_full_backward_hook(keep_layout)
    model(images()).square().sum().backward()
    assert layouts == [True] * 6

    x = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    strided = torch.randn(2, 21, 3)[:, 1:].transpose(1, 2).reshape(2, 3, 4, 5)  # as the cat's backward gives
    assert not strided.is_contiguous(memory_format=torch.channels_last)
    DenseGradient.apply(x).backward(strided)
    assert x.grad.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(x.grad, strided, rtol=0, atol=0)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "reference"])
def test_a_forward_hook_may_scale_a_projection_output_in_place_while_training(fast: bool) -> None:
    """The output of a training ``dw_bn`` projection (through :class:`DenseGradient`) is no view: a hook's
    in-place edit is allowed and gives the gradients of the same edit out of place."""
    x = images()
    grads = []
    for scale in (lambda out: out.mul_(0.5), lambda out: out * 0.5):
        model = set_fast_paths(tiny_model("dw_bn", cls=True).train(), fast)
        projection = model.stage1.blocks[0].attn.conv_proj_k
        projection.register_forward_hook(lambda module, args, out, scale=scale: scale(out))
        model(x).square().sum().backward()
        grads.append({name: p.grad for name, p in model.named_parameters() if p.grad is not None})
    in_place, out_of_place = grads
    assert in_place.keys() == out_of_place.keys()
    for name, grad in in_place.items():
        torch.testing.assert_close(grad, out_of_place[name], rtol=1e-5, atol=1e-6, msg=name)


def test_set_fast_paths_rejects_unknown_flags() -> None:
    with pytest.raises(UsageError, match="fold_nothing"):
        set_fast_paths(tiny_model("linear", cls=False), fold_nothing=True)


def test_silu_linear_recomputing_backward_passes_gradcheck_and_gradgradcheck() -> None:
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(2, 3, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(4, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(SiluLinear.apply, (h, weight, bias))
    # create_graph=True (gradient penalties): the backward takes its differentiable branch
    assert torch.autograd.gradgradcheck(SiluLinear.apply, (h, weight, bias))
    out = SiluLinear.apply(h, weight, bias)
    torch.testing.assert_close(out, nn.functional.linear(nn.functional.silu(h), weight, bias))


@pytest.mark.parametrize("needs_grad", [(True, False, False), (False, True, True), (True, True, False)])
@pytest.mark.parametrize("transposed_h", [False, True])
@pytest.mark.parametrize("onednn", [False, True])
@pytest.mark.parametrize("create_graph", [False, True])
def test_silu_linear_backward_equals_autograd_for_any_subset_of_inputs(
    needs_grad: tuple[bool, bool, bool], transposed_h: bool, onednn: bool, create_graph: bool
) -> None:
    # the backward reuses one buffer for silu(h), grad_out @ weight and grad_h: whichever gradients are
    # asked for, and for a non-contiguous h, they must equal plain autograd's; with create_graph=True
    # (gradient penalties) its differentiable branch must give them too
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(3, 5, 8, generator=gen)
    h = h.transpose(0, 1).contiguous().transpose(0, 1) if transposed_h else h
    weight, bias = torch.randn(4, 8, generator=gen), torch.randn(4, generator=gen)
    grad_out = torch.randn(3, 5, 4, generator=gen)
    leaves = [t.clone().requires_grad_(need) for t, need in zip((h, weight, bias), needs_grad, strict=True)]
    refs = [t.clone().requires_grad_(need) for t, need in zip((h, weight, bias), needs_grad, strict=True)]
    out = SiluLinear.apply(*leaves, onednn)
    expected = nn.functional.linear(nn.functional.silu(refs[0]), refs[1], refs[2])
    torch.testing.assert_close(out, expected)
    out.backward(grad_out, create_graph=create_graph)
    expected.backward(grad_out)
    for leaf, ref in zip(leaves, refs, strict=True):
        if ref.grad is None:
            assert leaf.grad is None
        else:
            torch.testing.assert_close(leaf.grad, ref.grad)
    torch.testing.assert_close(leaves[0].detach(), h, rtol=0, atol=0)  # the saved h is left as it was


def test_bf16_autocast_training_step_gives_fp32_gradients_close_to_fp32() -> None:
    model = tiny_model("dw_bn", cls=True).train()
    x, target = images(4), torch.tensor([0, 3, 6, 2])
    nn.functional.cross_entropy(model(x), target).backward()
    fp32 = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = nn.functional.cross_entropy(model(x), target)
    loss.backward()
    fc1 = "stage1.blocks.1.mlp.fc1.weight"
    for name, p in model.named_parameters():
        assert p.grad.dtype == torch.float32, name
    rel = (model.get_parameter(fc1).grad - fp32[fc1]).norm() / fp32[fc1].norm()
    assert rel < 0.05, f"bf16 gradient of {fc1} differs by {rel:.2%}"


def test_avg_projection_counts_the_padding_as_the_official_avg_pooling() -> None:
    """The official ``avg`` projection is ``nn.AvgPool2d(k, s, p, ceil_mode=True)``: border windows
    average over the zero padding too (``count_include_pad``), so they differ from a mean of the valid
    pixels alone."""
    proj = ConvProjection("avg", 8, kernel_size=3, stride=2, padding=1)
    x = torch.randn(2, 8, 5, 7, generator=torch.Generator().manual_seed(0)) + 1.0
    expected = nn.functional.avg_pool2d(x, 3, stride=2, padding=1, ceil_mode=True, count_include_pad=True)
    assert expected.shape[-2:] == (3, 4)
    torch.testing.assert_close(proj(x), expected.flatten(2).transpose(1, 2), rtol=0, atol=0)
    corner = x[:, :, :2, :2].sum(dim=(2, 3)) / 9  # 4 valid pixels, 5 padded zeros
    torch.testing.assert_close(proj(x)[:, 0], corner)


@pytest.mark.parametrize("few_keys", [0, 64])  # SDPA everywhere, the explicit softmax everywhere
def test_attention_dropout_is_off_in_eval(monkeypatch: pytest.MonkeyPatch, few_keys: int) -> None:
    monkeypatch.setattr(layers, "FEW_KEYS", few_keys)
    model = tiny_model("dw_bn", cls=True).eval()
    x = images()
    with torch.no_grad():
        expected = model(x)
        for m in model.modules():
            if isinstance(m, layers.ConvAttention):
                m.attn_drop.p = 0.5
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-6)
        model.train()
        assert not torch.allclose(model(x), model(x), atol=1e-3)  # the rate is in use in training


def test_mlp_dropout_runs_in_the_training_fast_path() -> None:
    """With dropout in the MLP the training fast path (folded QuickGELU, plain autograd) still drops
    half of the hidden activations, as timm's Mlp does, and its output is not the one without dropout."""
    model = tiny_model("dw_bn", cls=True).train()
    zeros: list[float] = []
    for m in model.modules():
        if isinstance(m, QuickGeluMlp):
            m.drop1.p = 0.5
            m.drop1.register_forward_hook(lambda m, args, out: zeros.append((out == 0).float().mean().item()))
    no_dropout = copy.deepcopy(model)
    for m in no_dropout.modules():
        if isinstance(m, QuickGeluMlp):
            m.drop1.p = 0.0
    x, target = images(), torch.tensor([0, 3, 6])
    torch.manual_seed(7)
    logits = model(x)
    assert len(zeros) == 3 and all(0.4 < z < 0.6 for z in zeros)  # one MLP per block
    torch.manual_seed(7)
    assert not torch.allclose(no_dropout(x), logits, atol=1e-3)
    nn.functional.cross_entropy(logits, target).backward()
    assert all(p.grad is not None for p in model.parameters())


# keys 11: softmax down the keys (23 queries >= 2 x 11); keys 70: along the rows. max_scores: one query
# per chunk, 5 queries (ragged: 23 = 4*5 + 3), all at once
@pytest.mark.parametrize(("keys", "down_keys"), [(11, True), (70, False)])
@pytest.mark.parametrize("queries_per_chunk", [1, 5, 1000])
def test_chunked_attention_equals_softmax_attention_for_any_chunk(
    keys: int, down_keys: bool, queries_per_chunk: int
) -> None:
    """In float64 only the summation order differs; the inputs are permuted views as in the model."""
    assert cpu_kernels.softmax_runs_down_keys(23, keys) is down_keys
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 23, 3, 8, dtype=torch.float64, generator=gen).transpose(1, 2)  # (B, heads, Tq, d)
    k, v = (torch.randn(2, keys, 3, 8, dtype=torch.float64, generator=gen).transpose(1, 2) for _ in range(2))
    expected = torch.softmax(q @ k.transpose(-2, -1) * 0.3, dim=-1) @ v
    out = cpu_kernels.chunked_attention(q, k, v, 0.3, max_scores=queries_per_chunk * 2 * 3 * keys)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("queries", "keys", "down_keys"), [(98, 49, True), (97, 49, False), (400, 64, False), (1, 50, False)]
)
def test_softmax_runs_down_keys_only_for_few_keys_and_many_queries(
    queries: int, keys: int, down_keys: bool
) -> None:
    assert cpu_kernels.softmax_runs_down_keys(queries, keys) is down_keys


@pytest.mark.parametrize("shape", [(0, 2, 5, 7), (2, 2, 5, 0)], ids=["no images", "no keys"])
def test_chunked_attention_takes_empty_inputs(shape: tuple[int, int, int, int]) -> None:
    b, heads, queries, keys = shape
    q = torch.randn(b, heads, queries, 8)
    k, v = torch.randn(b, heads, keys, 8), torch.randn(b, heads, keys, 4)
    out = cpu_kernels.chunked_attention(q, k, v, 0.5, max_scores=16)
    assert out.shape == (b, heads, queries, 4)


def test_chunked_attention_in_bf16_stays_close_to_fp32_with_or_without_autocast() -> None:
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, n, 16, generator=gen) for n in (40, 12, 12))
    expected = torch.softmax(q @ k.transpose(-2, -1) * 0.25, dim=-1) @ v
    out = cpu_kernels.chunked_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 0.25, max_scores=120)
    assert out.dtype == torch.bfloat16
    rel = (out.float() - expected).norm() / expected.norm()
    assert rel < 0.01, f"bf16 chunked attention differs from fp32 by {rel:.3%}"
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast changes nothing inside
        under_autocast = cpu_kernels.chunked_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 0.25, 120)
    torch.testing.assert_close(under_autocast, out, rtol=0, atol=0)


def attention_inputs(dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """q ``(2, 3, 9, 5)``, k ``(2, 3, 7, 5)``, v ``(2, 3, 7, 4)``: permuted views that require grad, as the
    model's heads are."""
    gen = torch.Generator().manual_seed(seed)
    shapes = ((2, 9, 3, 5), (2, 7, 3, 5), (2, 7, 3, 4))
    return tuple(torch.randn(s, generator=gen).to(dtype).transpose(1, 2).requires_grad_() for s in shapes)


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.softmax(q @ k.transpose(-2, -1) * scale, dim=-1) @ v


# 7 keys: blocks of 4 query rows (4 + 4 + 1: ragged), or all 9 queries at once
@pytest.mark.parametrize("scores_per_block", [28, 2**22])
def test_recomputed_attention_passes_gradcheck_and_gradgradcheck(
    monkeypatch: pytest.MonkeyPatch, scores_per_block: int
) -> None:
    """float64: forward equal to softmax attention, its recomputing backward (key and value gradients
    summed over blocks of queries) to finite differences, and create_graph=True (gradient penalties)
    takes differentiable ops (CPU SDPA has no double backward)."""
    monkeypatch.setattr(cpu_kernels, "RECOMPUTE_SCORES", scores_per_block)
    q, k, v = attention_inputs(torch.float64)

    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return cpu_kernels.RecomputedAttention.apply(q, k, v, 0.3)

    torch.testing.assert_close(attention(q, k, v), softmax_attention(q, k, v, 0.3), rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(attention, (q, k, v))
    assert torch.autograd.gradgradcheck(attention, (q, k, v))
    # gradgradcheck checks the differentiable branch against itself: its first derivative too
    grad_out = torch.randn(2, 3, 9, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with_graph = torch.autograd.grad(attention(q, k, v), (q, k, v), grad_out, create_graph=True)
    expected = torch.autograd.grad(softmax_attention(q, k, v, 0.3), (q, k, v), grad_out)
    for name, got, want in zip("qkv", with_graph, expected, strict=True):
        assert got.requires_grad, name
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12, msg=f"d{name}")


def test_recomputed_attention_in_bf16_stays_close_to_fp32_under_autocast() -> None:
    """bf16 in, bf16 out and bf16 gradients, each within ~1 % of fp32 softmax attention's; autocast,
    active where the model calls it, changes nothing inside."""
    bf16, fp32 = attention_inputs(torch.bfloat16), attention_inputs(torch.float32)
    grad_out = torch.randn(2, 3, 9, 4, generator=torch.Generator().manual_seed(5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = cpu_kernels.RecomputedAttention.apply(*bf16, 0.3)
    out.backward(grad_out.bfloat16())
    expected = softmax_attention(*fp32, 0.3)
    expected.backward(grad_out)
    assert out.dtype == torch.bfloat16 and all(t.grad.dtype == torch.bfloat16 for t in bf16)
    got = (out, *(t.grad for t in bf16))
    want = (expected, *(t.grad for t in fp32))
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        rel = (a.float() - b).norm() / b.norm()
        assert rel < 0.015, f"bf16 {name} differs from fp32 by {rel:.3%}"


@pytest.mark.parametrize(
    ("bf16_kernels", "flag", "attn_drop", "dtype", "recomputed"),
    [
        (True, True, 0.0, torch.bfloat16, True),
        (False, True, 0.0, torch.bfloat16, False),
        (True, False, 0.0, torch.bfloat16, False),
        (True, True, 0.1, torch.bfloat16, False),
        (True, True, 0.0, torch.float32, False),
    ],
)
def test_bf16_cpu_training_attention_over_many_keys_is_recomputed(
    monkeypatch: pytest.MonkeyPatch, sdpa_calls: list[int], recomputed_calls: list[int],
    bf16_kernels: bool, flag: bool, attn_drop: float, dtype: torch.dtype, recomputed: bool,
) -> None:  # fmt: skip
    """``recompute_attn``: a bf16 training step on a CPU with bf16 kernels runs attention over more than
    FEW_KEYS_BF16 keys (all three blocks here) through RecomputedAttention instead of SDPA; without
    the kernels, with the flag off, with attention dropout or in fp32 SDPA stays. Logits and every
    gradient stay close to the fp32 reference's."""
    monkeypatch.setattr(cpu_kernels, "CPU_HAS_BF16_KERNELS", bf16_kernels)
    monkeypatch.setattr(layers, "FEW_KEYS", 0)
    monkeypatch.setattr(layers, "FEW_KEYS_BF16", 0)  # the tiny model's 35 and 13 keys count as many
    model = set_fast_paths(tiny_model("dw_bn", cls=True).train(), recompute_attn=flag)
    for m in model.modules():
        if isinstance(m, layers.ConvAttention):
            m.attn_drop.p = attn_drop  # SDPA's dropout_p (the probabilities are never materialised)
    expected = set_fast_paths(copy.deepcopy(model), False)
    x, target = images(4), torch.tensor([0, 3, 6, 2])
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        logits = model(x)
    nn.functional.cross_entropy(logits, target).backward()
    assert (len(recomputed_calls), len(sdpa_calls)) == ((3, 0) if recomputed else (0, 3))
    if attn_drop:
        return  # dropout draws differ from the reference's; the dispatch is what is checked
    torch.manual_seed(0)
    reference = expected(x)
    nn.functional.cross_entropy(reference, target).backward()
    torch.testing.assert_close(logits.float(), reference, rtol=0, atol=0.05)
    tol = (0, 1e-5) if dtype == torch.float32 else (0.1, 0.02)
    assert_same_step(model, expected, grad_tol=tol, buffer_tol=(1e-2, 1e-2))


@pytest.mark.parametrize(
    ("bf16_kernels", "grad", "flag", "chunked"),
    [
        (True, False, True, True),
        (False, False, True, False),
        (True, True, True, False),
        (True, False, False, False),
    ],
)
def test_bf16_cpu_inference_attention_is_chunked(
    monkeypatch: pytest.MonkeyPatch, sdpa_calls: list[int], bf16_kernels: bool, grad: bool, flag: bool,
    chunked: bool,
) -> None:  # fmt: skip
    """``chunked_attn``: bf16 inference on a CPU with bf16 kernels runs every block's attention through
    chunked_attention (no SDPA); with a graph, without the kernels or with the flag off, it does not."""
    monkeypatch.setattr(cpu_kernels, "CPU_HAS_BF16_KERNELS", bf16_kernels)
    monkeypatch.setattr(layers, "FEW_KEYS_BF16", 0)  # SDPA wherever the chunked path does not run
    calls: list[int] = []
    chunked_attention = layers.chunked_attention

    def counted(q: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        calls.append(q.shape[-2])
        return chunked_attention(q, *args, **kwargs)

    monkeypatch.setattr(layers, "chunked_attention", counted)
    model = set_fast_paths(tiny_model("dw_bn", cls=True).eval(), chunked_attn=flag, recompute_attn=False)
    x = images()
    with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
    assert (len(calls), len(sdpa_calls)) == ((3, 0) if chunked else (0, 3))
    expected = reference_logits(model, x)
    rel = (logits.float() - expected).norm() / expected.norm()
    assert rel < 0.02, f"bf16 logits differ from fp32 by {rel:.3%}"


@pytest.fixture
def onednn_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[torch.dtype, bool]]:
    """oneDNN's packed linear switched on (its fp32 kernel runs on any x86 CPU), and the dtype and
    SiLU flag of every call to it made during the test."""
    monkeypatch.setattr(cpu_kernels, "ONEDNN_PACKED_LINEAR", True)
    monkeypatch.setattr(cpu_kernels, "ONEDNN_FP32_LINEAR", True)
    monkeypatch.setattr(cpu_kernels, "ONEDNN_MIN_MACS", 0)  # the tiny model's products too
    calls: list[tuple[torch.dtype, bool]] = []
    linear = cpu_kernels.linear

    def counted(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu: bool = False):
        calls.append((x.dtype, silu))
        return linear(x, weight, bias, silu)

    monkeypatch.setattr(cpu_kernels, "linear", counted)
    return calls


@pytest.mark.parametrize("method", METHODS)
def test_onednn_linears_equal_the_reference_and_keep_their_packed_weights(
    onednn_calls: list[tuple[torch.dtype, bool]], method: str
) -> None:
    """``onednn_linear``: fp32 inference runs the attention projections (stacked or not, with and
    without bias) and the MLP (fc1 with its SiLU fused) on packed weights, packed once, repacked after
    an optimizer step; logits equal the reference computation's."""
    model = tiny_model(method, cls=True).eval()
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_logits(model, x), rtol=0, atol=1e-5)
    mlps = [m for m in model.modules() if isinstance(m, QuickGeluMlp)]
    assert [silu for _, silu in onednn_calls].count(True) == len(mlps) == 3  # fc1 + SiLU per block
    assert len(onednn_calls) >= 3 * 4 and {dtype for dtype, _ in onednn_calls} == {torch.float32}
    packed = [m._packed.cached for m in mlps]
    with torch.no_grad():
        model(x)
    assert all(m._packed.cached is p for m, p in zip(mlps, packed, strict=True))  # packed once

    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(x).square().mean().backward()  # a graph: F.linear on the parameters
    calls_before_step = len(onednn_calls)
    opt.step()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_logits(model, x), rtol=0, atol=1e-5)
    assert len(onednn_calls) > calls_before_step
    assert all(m._packed.cached is not p for m, p in zip(mlps, packed, strict=True))


@pytest.mark.parametrize("method", METHODS)
def test_replacing_any_one_parameter_refreshes_the_weights_derived_from_it(
    onednn_calls: list[tuple[torch.dtype, bool]], method: str
) -> None:
    """Each cached derived weight (packed MLP and projection weights, folded BatchNorm) is keyed on every
    tensor it is derived from: after cached forwards, any one parameter of a block replaced by a new one
    (model surgery, ``load_state_dict(assign=True)``) shows in the next forward."""
    model = tiny_model(method, cls=True).eval()
    x = images()
    block = model.stage1.blocks[0]
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        before = model(x)  # fills every cache
        for name, param in list(block.named_parameters()):
            owner, _, attr = name.rpartition(".")
            changed = param + 0.2 * torch.randn(param.shape, generator=gen)
            setattr(block.get_submodule(owner), attr, nn.Parameter(changed))
            after = model(x)
            torch.testing.assert_close(after, reference_logits(model, x), rtol=0, atol=1e-5, msg=name)
            if name != "attn.proj_k.bias":  # a key bias adds the same score to a query's every key
                assert (after - before).abs().max() > 1e-3, name
            before = after
    assert (torch.float32, True) in onednn_calls  # the packed MLP path ran


def test_onednn_linears_stay_out_of_traces_autocast_graphs_and_no_grad_training(
    onednn_calls: list[tuple[torch.dtype, bool]],
) -> None:
    model = tiny_model("dw_bn", cls=True).eval()
    x = images()
    torch.jit.trace(model, x, check_trace=False)  # an exported graph must hold F.linear
    assert onednn_calls == []
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a bf16 graph: autocast's F.linear
        model(x).float().sum().backward()
    assert onednn_calls == []
    model.train()
    with torch.no_grad():  # train mode without a graph: the MLP's dropout must run, so F.linear
        model(x)
    assert (torch.float32, True) not in onednn_calls


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("mlp_dropout", [0.0, 0.3])
def test_fp32_training_graph_on_onednn_linears_has_the_reference_gradients(
    onednn_calls: list[tuple[torch.dtype, bool]], method: str, mlp_dropout: float
) -> None:
    """``onednn_linear`` in fp32 training (CPUs other than Intel's): every Linear of the blocks, stacked
    or not, and the MLP's fc2 inside SiluLinear run oneDNN's kernel, forward and input gradient; the
    gradients equal those of the same paths on ``F.linear`` (with dropout in the MLP, plain autograd
    around it; the same masks, as both draw them for the same shapes)."""
    model = tiny_model(method, cls=True).train()
    for mlp in (m for m in model.modules() if isinstance(m, QuickGeluMlp)):
        mlp.drop1.p = mlp.drop2.p = mlp_dropout
    reference = set_fast_paths(copy.deepcopy(model), onednn_linear=False)
    x, target = images(), torch.tensor([0, 3, 6])
    grads = []
    for m in (model, reference):
        torch.manual_seed(3)  # the same dropout masks
        nn.functional.cross_entropy(m(x), target).backward()
        grads.append([p.grad for p in m.parameters()])
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m is not model.head]
    assert len(onednn_calls) >= len(linears)  # forward and backward products
    assert {dtype for dtype, _ in onednn_calls} == {torch.float32}
    for got, expected in zip(*grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_training_runs_onednn_linears_only_for_fp32_cpu_graphs_where_they_are_faster(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cpu_kernels, "ONEDNN_FP32_LINEAR", True)
    monkeypatch.setattr(cpu_kernels, "ONEDNN_MIN_MACS", 24)
    weight, x = torch.randn(4, 3), torch.randn(2, 3)  # 24 multiply-accumulates
    assert cpu_kernels.trains_on_onednn(x, weight)
    assert not cpu_kernels.trains_on_onednn(x[:1], weight)  # 12: F.linear is faster there
    assert not cpu_kernels.trains_on_onednn(x.bfloat16(), weight.bfloat16())
    assert not cpu_kernels.trains_on_onednn(x.double(), weight.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not cpu_kernels.trains_on_onednn(x, weight)  # autocast's bf16 F.linear
    with torch.no_grad():
        assert not cpu_kernels.trains_on_onednn(x, weight)  # no graph: the packed inference path's
    monkeypatch.setattr(cpu_kernels, "ONEDNN_FP32_LINEAR", False)  # Intel: MKL's fp32 GEMM is as fast
    assert not cpu_kernels.trains_on_onednn(x, weight)


def test_block_linear_outputs_may_be_edited_in_place_while_training_on_onednn(
    onednn_calls: list[tuple[torch.dtype, bool]],
) -> None:
    """A forward hook that edits a projection's or the MLP's output in place (``out.mul_``) works as
    with ``F.linear``: the oneDNN paths' outputs are not views an autograd Function may not hand out."""
    model = tiny_model("dw_bn", cls=True).train()
    reference = set_fast_paths(copy.deepcopy(model), onednn_linear=False)
    for m in (model, reference):
        block = m.stage1.blocks[0]
        for module in (block.attn.proj, block.attn.proj_v, block.mlp):
            module.register_forward_hook(lambda _m, _i, out: out.mul_(0.5))
    grads = []
    for m in (model, reference):
        m(images()).square().sum().backward()
        grads.append([p.grad for p in m.parameters()])
    assert onednn_calls
    for got, expected in zip(*grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("grad_mode", [True, False], ids=["graph", "no graph"])
def test_torch_func_jvp_passes_the_onednn_linears_by(
    onednn_calls: list[tuple[torch.dtype, bool]], grad_mode: bool
) -> None:
    """``torch.func`` transforms get ``F.linear``: oneDNN's op has no derivative formula or batching
    rule (an autograd Function around it would be refused, the packed path would drop the tangent)."""
    model = tiny_model("dw_bn", cls=True).eval()
    reference = set_fast_paths(copy.deepcopy(model), onednn_linear=False)
    x, tangent = images(2), torch.ones(2, 3, *INPUT_HW)
    with torch.set_grad_enabled(grad_mode):
        _, got = torch.func.jvp(model, (x,), (tangent,))
        _, expected = torch.func.jvp(reference, (x,), (tangent,))
    assert onednn_calls == []
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("grad_mode", [True, False], ids=["graph", "no graph"])
def test_forward_mode_dual_tensors_keep_their_tangent(
    onednn_calls: list[tuple[torch.dtype, bool]], grad_mode: bool
) -> None:
    """Dual tensors (``torch.autograd.forward_ad``) take plain ops: without a graph the packed path
    dropped the tangent silently; with one, the autograd Functions have no forward-mode formula."""
    model = tiny_model("dw_bn", cls=True).eval()
    x, tangent = images(2), torch.ones(2, 3, *INPUT_HW)
    _, expected = torch.func.jvp(set_fast_paths(copy.deepcopy(model), onednn_linear=False), (x,), (tangent,))
    with torch.set_grad_enabled(grad_mode), forward_ad.dual_level():
        got = forward_ad.unpack_dual(model(forward_ad.make_dual(x, tangent))).tangent
    assert onednn_calls == [] and got is not None
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_per_sample_gradients_by_torch_func_equal_one_backward_per_image(
    onednn_calls: list[tuple[torch.dtype, bool]],
) -> None:
    """``vmap(grad(...))`` (per-sample gradients, as for DP-SGD) runs through plain ops: the autograd
    Functions of the fast paths (SiluLinear, DenseGradient, OnednnLinear) lack functorch rules, and
    vmap cannot query the channels-last layout."""
    model = tiny_model("dw_bn", cls=True).eval()
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    x, target = images(3), torch.tensor([0, 3, 6])

    def loss(p: dict[str, torch.Tensor], image: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        logits = torch.func.functional_call(model, (p, buffers), (image[None],))
        return nn.functional.cross_entropy(logits, label[None])

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, target)
    assert onednn_calls == []
    for i in range(3):  # the fast paths' own backward, one image at a time
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 1]), target[i : i + 1]).backward()
        for name, p in model.named_parameters():
            # None: unused in eval (the last block's q conv, cls-only); torch.func gives zeros there
            expected = torch.zeros_like(p) if p.grad is None else p.grad
            torch.testing.assert_close(per_sample[name][i], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16 autocast"])
def test_an_ensemble_vmapped_over_stacked_parameters_without_a_graph_equals_each_model(bf16: bool) -> None:
    """``torch.func`` over parameters under ``no_grad`` (model ensembling, ``stack_module_state``): the
    batched parameters have no storage, so the derived-weight cache steps aside instead of keying on
    their address (RuntimeError: "Cannot access data pointer of Tensor that doesn't have storage"), and
    still hands out autocast's dtype (under ``vmap`` autocast left a folded conv's bias in fp32)."""
    models = [tiny_model("dw_bn", cls=True, seed=seed).eval() for seed in (0, 1)]
    params, buffers = torch.func.stack_module_state(models)
    base, x = copy.deepcopy(models[0]).to("meta"), images(2)

    def logits(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.func.functional_call(base, (p, b), (x,))

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        got = torch.func.vmap(logits)(params, buffers)
        expected = torch.stack([model(x) for model in models])
    tolerance = 0.05 if bf16 else 1e-5
    torch.testing.assert_close(got.float(), expected.float(), rtol=tolerance, atol=tolerance)
    if not bf16:  # the fast paths of each model equal the reference
        torch.testing.assert_close(
            got, torch.stack([reference_logits(m, x) for m in models]), rtol=0, atol=1e-5
        )


def test_a_jvp_over_parameters_without_a_graph_equals_the_reference() -> None:
    """Forward-mode derivatives over the weights under ``no_grad``: nothing is cached from the dual
    parameters (a kept value would keep a stale tangent)."""
    model = tiny_model("dw_bn", cls=True).eval()
    params = {name: p.detach() for name, p in model.named_parameters()}
    tangents = {name: torch.ones_like(p) for name, p in params.items()}
    x = images(2)

    def logits(m: nn.Module) -> object:
        return lambda p: torch.func.functional_call(m, p, (x,))

    with torch.no_grad():
        got = torch.func.jvp(logits(model), (params,), (tangents,))
        expected = torch.func.jvp(logits(set_fast_paths(copy.deepcopy(model), False)), (params,), (tangents,))
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("needs_grad", [(True, False, False), (False, True, True), (True, True, True)])
def test_onednn_linear_function_equals_autograd_linear(needs_grad: tuple[bool, bool, bool]) -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 5, 8, generator=gen).transpose(0, 1)  # non-contiguous, as after a head split
    weight, bias = torch.randn(4, 8, generator=gen), torch.randn(4, generator=gen)
    grad_out = torch.randn(5, 2, 4, generator=gen)
    leaves = [t.clone().requires_grad_(need) for t, need in zip((x, weight, bias), needs_grad, strict=True)]
    refs = [t.clone().requires_grad_(need) for t, need in zip((x, weight, bias), needs_grad, strict=True)]
    out = cpu_kernels.OnednnLinear.apply(*leaves)
    expected = nn.functional.linear(*refs)
    torch.testing.assert_close(out, expected)
    out.backward(grad_out)
    expected.backward(grad_out)
    for leaf, ref in zip(leaves, refs, strict=True):
        assert (leaf.grad is None) == (ref.grad is None)
        if ref.grad is not None:
            torch.testing.assert_close(leaf.grad, ref.grad)


def test_onednn_linear_function_gives_second_derivatives() -> None:
    """create_graph=True (gradient penalties): the backward takes its differentiable branch."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(6, 8, generator=gen)
    weight, bias = torch.randn(4, 8, generator=gen), torch.randn(4, generator=gen)
    penalties = []
    for linear in (cpu_kernels.OnednnLinear.apply, nn.functional.linear):
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
        (grad_x,) = torch.autograd.grad(linear(*leaves).tanh().sum(), leaves[0], create_graph=True)
        grad_x.square().sum().backward()
        penalties.append([leaf.grad for leaf in leaves])
    for got, expected in zip(*penalties, strict=True):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("fp32_too", [True, False])  # an AVX-512 CPU other than Intel's, or an Intel one
def test_packed_linear_dtype_follows_autocast_cpu_and_dtypes(
    monkeypatch: pytest.MonkeyPatch, fp32_too: bool
) -> None:
    """Which dtype oneDNN's packed linear would run in (the choice alone: no kernel runs here)."""
    monkeypatch.setattr(cpu_kernels, "ONEDNN_PACKED_LINEAR", True)
    monkeypatch.setattr(cpu_kernels, "ONEDNN_FP32_LINEAR", fp32_too)
    monkeypatch.setattr(cpu_kernels, "ONEDNN_MIN_MACS", 24)
    weight, x = torch.randn(4, 3), torch.randn(2, 3)  # 2 x 4 x 3 = 24 multiply-accumulates
    linear_dtype = cpu_kernels.linear_dtype
    with torch.no_grad():
        assert linear_dtype(x, weight) == (torch.float32 if fp32_too else None)
        assert linear_dtype(x[:1], weight) is None  # 12: too small a product for oneDNN's per-call cost
        assert linear_dtype(x[:1].bfloat16(), weight.bfloat16()) is None
        monkeypatch.setattr(cpu_kernels, "ONEDNN_MIN_WEIGHT", 12)  # a large weight pays on any rows
        assert linear_dtype(x[:1].bfloat16(), weight.bfloat16()) == torch.bfloat16
        assert linear_dtype(x.bfloat16(), weight.bfloat16()) == torch.bfloat16
        assert linear_dtype(x.bfloat16(), weight) is None  # F.linear reports the mismatch
        assert linear_dtype(x.double(), weight.double()) is None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert linear_dtype(x, weight) == torch.bfloat16
        with torch.autocast("cpu", dtype=torch.float16):
            assert linear_dtype(x, weight) is None
    assert linear_dtype(x.bfloat16(), weight.bfloat16()) is None  # grad enabled: a graph may be built
    monkeypatch.setattr(cpu_kernels, "ONEDNN_PACKED_LINEAR", False)
    with torch.no_grad():
        assert linear_dtype(x.bfloat16(), weight.bfloat16()) is None


@pytest.mark.skipif(not cpu_kernels.ONEDNN_PACKED_LINEAR, reason="oneDNN's bf16 linear needs AVX-512")
def test_onednn_linears_under_bf16_autocast_stay_close_to_fp32(
    onednn_calls: list[tuple[torch.dtype, bool]],
) -> None:
    model = tiny_model("dw_bn", cls=True).eval()
    x = images()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
        plain = set_fast_paths(copy.deepcopy(model), onednn_linear=False)(x)
    assert onednn_calls and {dtype for dtype, _ in onednn_calls} == {torch.bfloat16}
    expected = reference_logits(model, x)
    for name, out in (("oneDNN", logits), ("F.linear", plain)):
        rel = (out.float() - expected).norm() / expected.norm()
        assert rel < 0.02, f"{name} bf16 logits differ from fp32 by {rel:.3%}"


@pytest.mark.parametrize(("dtype", "expected_sdpa_calls"), [(torch.float32, 3), (torch.bfloat16, 0)])
def test_bf16_training_attention_is_explicit_up_to_more_keys(
    monkeypatch: pytest.MonkeyPatch, sdpa_calls: list[int], dtype: torch.dtype, expected_sdpa_calls: int
) -> None:
    """With a graph (no chunked path), bf16 attention over at most FEW_KEYS_BF16 keys is explicit where
    fp32 attention over as many keys runs SDPA; gradients stay close to fp32's."""
    monkeypatch.setattr(cpu_kernels, "CPU_HAS_BF16_KERNELS", True)
    monkeypatch.setattr(layers, "FEW_KEYS", 0)  # the tiny model's 35 and 13 keys: above it in fp32
    monkeypatch.setattr(layers, "FEW_KEYS_BF16", 64)  # and within it in bf16
    model = tiny_model("dw_bn", cls=True).train()
    expected = copy.deepcopy(model)
    x, target = images(4), torch.tensor([0, 3, 6, 2])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        loss = nn.functional.cross_entropy(model(x), target)
    assert len(sdpa_calls) == expected_sdpa_calls
    loss.backward()
    nn.functional.cross_entropy(set_fast_paths(expected, False)(x), target).backward()
    tol = (0, 1e-5) if dtype == torch.float32 else (0.1, 0.02)
    assert_same_step(model, expected, grad_tol=tol, buffer_tol=(1e-2, 1e-2))


def test_explicit_fast_path_keeps_bf16_probabilities_and_the_reference_fp32() -> None:
    attn = tiny_model("dw_bn", cls=True).stage1.blocks[0].attn
    gen = torch.Generator().manual_seed(2)
    q, k = (torch.randn(2, attn.num_heads, 13, 16, generator=gen) for _ in range(2))
    reference = attn.attention_probs(q.bfloat16(), k.bfloat16())
    fast = attn.attention_probs(q.bfloat16(), k.bfloat16(), in_fp32=False)
    assert (reference.dtype, fast.dtype) == (torch.float32, torch.bfloat16)
    torch.testing.assert_close(fast.float(), reference, rtol=0, atol=4e-3)  # one bf16 rounding


# ---------------------------------------------- behaviours found unguarded by hand mutations (2026-11-27)
@pytest.mark.parametrize("method", METHODS)
def test_backprop_through_an_eval_model_gives_the_reference_gradients(method: str) -> None:
    """A graph built through an eval-mode model (frozen BatchNorm statistics: fine-tuning with frozen
    statistics, linear probing through the backbone, saliency maps): the folded projections give every
    parameter the reference gradient, the BatchNorm affine included (the cls-only last block leaves its
    unused q convolution without a gradient where the reference gives it zeros)."""
    model = tiny_model(method, cls=True).eval()
    reference = set_fast_paths(copy.deepcopy(model), False)
    x, target = images(), torch.tensor([0, 3, 6])
    for m in (model, reference):
        nn.functional.cross_entropy(m(x), target).backward()
    expected = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        want = expected[name].grad
        got = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)
    if method == "dw_bn":  # the gradient of the folded BatchNorm's weight is not trivially zero
        assert model.stage1.blocks[0].attn.conv_proj_k.bn.weight.grad.abs().max() > 1e-3


@pytest.mark.parametrize("onednn_linear", [False, True])
def test_a_weight_given_new_storage_through_data_refreshes_the_cached_weights(onednn_linear: bool) -> None:
    """``param.data = tensor`` keeps the Parameter and its version counter but not its storage: the
    cached scaled (or packed) MLP weights follow it without a mode switch."""
    model = set_fast_paths(tiny_model("dw_bn", cls=True).eval(), onednn_linear=onednn_linear)
    x = images()
    fc1 = model.stage1.blocks[0].mlp.fc1
    with torch.no_grad():
        before = model(x)
        fc1.weight.data = fc1.weight + torch.randn(
            fc1.weight.shape, generator=torch.Generator().manual_seed(3)
        )
        after = model(x)
    torch.testing.assert_close(after, reference_logits(model, x), rtol=0, atol=1e-5)
    assert (after - before).abs().max() > 1e-2


def test_parameters_replaced_twice_between_calls_are_not_mistaken_for_the_cached_one() -> None:
    """Two replacements without a forward between them: the second new tensor may get the freed
    original's address and version 0, which only the identity of the cached source tells apart."""
    model = tiny_model("dw_bn", cls=True).eval()
    x = images()
    mlp = model.stage1.blocks[0].mlp
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        model(x)  # fills the cache
        for _ in range(10):
            for _ in range(2):
                mlp.fc1.weight = nn.Parameter(torch.randn(mlp.fc1.weight.shape, generator=gen))
            torch.testing.assert_close(model(x), reference_logits(model, x), rtol=0, atol=1e-5)


def test_monte_carlo_attention_dropout_samples_under_bf16_cpu_inference(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """bf16 inference runs the chunked kernel, which has no dropout: an attention dropout switched to
    training in an eval model (Monte Carlo dropout) makes attention leave it, and samples differ."""
    monkeypatch.setattr(cpu_kernels, "CPU_HAS_BF16_KERNELS", True)
    monkeypatch.setattr(layers, "FEW_KEYS_BF16", 0)  # no explicit few-key path: chunked or SDPA
    calls: list[int] = []
    chunked_attention = layers.chunked_attention
    monkeypatch.setattr(
        layers, "chunked_attention", lambda q, *a: calls.append(1) or chunked_attention(q, *a)
    )
    model = tiny_model("dw_bn", cls=True).eval()
    x = images()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
        assert len(calls) == 3  # without dropout every block's attention is chunked
        for block in model.stage1.blocks:
            block.attn.attn_drop.p = 0.5
            block.attn.attn_drop.train()
        samples = []
        for seed in (0, 1):
            torch.manual_seed(seed)
            samples.append(model(x).float())
    assert len(calls) == 3 + 2  # stage 0's attention (no dropout switched on there) stays chunked
    assert (samples[0] - samples[1]).abs().max() > 1e-2


def test_recomputed_attention_sums_key_gradients_over_many_blocks_in_fp32(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """At high resolution one image and head spans many blocks of queries; their key and value
    gradients are summed in fp32 (a bf16 running sum drifts by several percent over hundreds of blocks)."""
    monkeypatch.setattr(cpu_kernels, "RECOMPUTE_SCORES", 256)  # one query row per block
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, 2, n, 64, generator=gen).bfloat16() for n in (512, 256, 256))
    grad_out = torch.randn(2, 2, 512, 64, generator=gen).bfloat16()
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    cpu_kernels.RecomputedAttention.apply(*inputs, 0.125).backward(grad_out)
    exact = [t.double().requires_grad_() for t in (q, k, v)]  # the same bf16 values, in float64
    softmax_attention(*exact, 0.125).backward(grad_out.double())
    for name, got, want in zip("qkv", inputs, exact, strict=True):
        rel = (got.grad.double() - want.grad).norm() / want.grad.norm()
        assert rel < 0.01, f"d{name} differs from float64 by {rel:.3%}"


def test_a_trace_of_a_bf16_model_under_no_grad_keeps_sdpa(monkeypatch: pytest.MonkeyPatch) -> None:
    """A trace must record the plain ops, not the chunked bf16 inference kernel (its chunk sizes and
    layout frozen for the example), also when traced under no_grad; with grad, no traced size is
    compared (a TracerWarning) in deciding against the recomputing training kernel."""
    monkeypatch.setattr(cpu_kernels, "CPU_HAS_BF16_KERNELS", True)
    model = tiny_model("dw_bn", cls=True).eval().bfloat16()
    x = images().bfloat16()
    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)
        torch.jit.trace(model, x, check_trace=False)
    with torch.no_grad():
        traced = torch.jit.trace(model, x, check_trace=False)
        assert str(traced.inlined_graph).count("scaled_dot_product_attention") == 3
        torch.testing.assert_close(traced(x).float(), model(x).float(), rtol=0, atol=0.05)


def test_chunked_attention_keeps_fp32_inputs_fp32_under_bf16_autocast() -> None:
    """The kernel computes in its inputs' dtype: autocast around it must not round fp32 inputs."""
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 2, n, 16, generator=gen) for n in (40, 12, 12))
    expected = torch.softmax(q @ k.transpose(-2, -1) * 0.25, dim=-1) @ v
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = cpu_kernels.chunked_attention(q, k, v, 0.25, max_scores=120)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


# ------------------------------------------------- survivors of a mutation round on layers.py (gates, caches)
@pytest.mark.parametrize("kernel", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("stride", [1, 2, 3, 4])
def test_ceil_mode_output_size_equals_pytorch_pooling(kernel: int, stride: int) -> None:
    """Grids of ``avg`` projections: a last window starting exactly at the right padding's edge is kept
    (``(out - 1) * stride == size + padding``), one starting inside it dropped, as PyTorch does."""
    for size in range(1, 12):
        for padding in range(kernel // 2 + 1):
            if size + 2 * padding < kernel:
                continue
            pooled = nn.functional.avg_pool2d(
                torch.zeros(1, 1, size, 1), (kernel, 1), (stride, 1), (padding, 0), ceil_mode=True
            )
            assert layers.conv_out_size(size, kernel, stride, padding, ceil_mode=True) == pooled.shape[2]


def test_a_backward_pre_hook_on_a_bypassed_layer_fires() -> None:
    """Backward pre-hooks count as hooks too: the module they sit on must run for them to fire."""
    model = tiny_model("dw_bn", cls=True).train()
    fired: list[str] = []
    model.stage1.blocks[0].mlp.fc2.register_full_backward_pre_hook(lambda m, grad_out: fired.append("fc2"))
    model(images()).sum().backward()
    assert fired == ["fc2"]


def test_forward_mode_tangents_pass_unfolded_batchnorms() -> None:
    """With ``fold_bn`` off and a graph the conv + BatchNorm output would pass DenseGradient, which has
    no forward-mode formula: dual tensors take plain ops there and keep their tangent."""
    model = set_fast_paths(tiny_model("dw_bn", cls=True).eval(), fold_bn=False, onednn_linear=False)
    x, tangent = images(2), torch.ones(2, 3, *INPUT_HW)
    _, expected = torch.func.jvp(set_fast_paths(copy.deepcopy(model), False), (x,), (tangent,))
    with forward_ad.dual_level():
        got = forward_ad.unpack_dual(model(forward_ad.make_dual(x, tangent))).tangent
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "tensor", ["conv.weight", "conv.bias", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"]
)
def test_any_folded_tensor_edited_in_place_refolds_the_projection(tensor: str) -> None:
    """The folded conv is keyed on each tensor it is derived from, the conv's bias (folded in when the
    conv has one) and each BatchNorm statistic included: one edited in place alone shows at once."""
    model = tiny_model("dw_bn", cls=False).eval()
    projection = model.stage1.blocks[0].attn.conv_proj_v  # v: a shift of k would not show in the logits
    _biased_zero_padded_conv(projection)
    owner, name = tensor.split(".")
    x = images()
    with torch.no_grad():
        before = model(x)  # folds and caches
        getattr(projection.get_submodule(owner), name).mul_(1.5).add_(0.3)
        after = model(x)
    torch.testing.assert_close(after, reference_logits(model, x), rtol=0, atol=1e-5)
    assert (after - before).abs().max() > 1e-3


def test_a_bias_given_to_a_folded_conv_after_caching_is_folded_in() -> None:
    """The cache's sources grow by the new bias: a different number of sources is a miss, not an error."""
    model = tiny_model("dw_bn", cls=False).eval()
    x = images()
    with torch.no_grad():
        model(x)
        _biased_zero_padded_conv(model.stage1.blocks[0].attn.conv_proj_k)
        torch.testing.assert_close(model(x), reference_logits(model, x), rtol=0, atol=1e-5)


def test_a_batchnorm_eps_changed_after_caching_is_folded_in() -> None:
    """``eps`` is no tensor source of the fold: the cache is keyed on it as a setting."""
    model = tiny_model("dw_bn", cls=True).eval()
    x = images()
    with torch.no_grad():
        model(x)
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.eps = 0.5
        torch.testing.assert_close(model(x), reference_logits(model, x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "reference"])
@pytest.mark.parametrize("grad", [True, False], ids=["graph", "no graph"])
def test_a_float64_model_under_bf16_autocast_computes_in_float64(fast: bool, grad: bool) -> None:
    """Autocast leaves float64 tensors alone, and so do the cached copies and the projections' casts."""
    model = set_fast_paths(tiny_model("dw_bn", cls=True).double().eval(), fast)
    x = images().double()
    with torch.no_grad():
        expected = model(x)
    with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(x)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_a_cast_linear_of_float64_under_autocast_keeps_float64_weights() -> None:
    layer = CastCachedLinear(8, 4).double()
    x = torch.randn(3, 8, dtype=torch.float64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer(x)
    torch.testing.assert_close(got, nn.functional.linear(x, layer.weight, layer.bias), rtol=0, atol=0)


def test_a_depthwise_projection_given_a_bf16_map_under_autocast_computes_in_fp32() -> None:
    """``dw_fp32`` casts whatever map it is given (the attention casts it beforehand, a caller of the
    projection itself may not)."""
    proj = ConvProjection("dw_bn", 8, 3, stride=2, padding=1).train()
    x = torch.randn(2, 8, 9, 7).bfloat16()
    expected = copy.deepcopy(proj)(x.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = proj(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("train", [False, True])
def test_a_bf16_model_under_autocast_runs_its_depthwise_projections_in_bf16(train: bool) -> None:
    """``model.bfloat16()`` then autocast: ``dw_fp32`` would give its bf16 weights an fp32 map (a
    dtype-mismatch error in training, and in eval with grad enabled); it computes as autocast does."""
    model = tiny_model("dw_bn", cls=True).bfloat16().train(train)
    reference = set_fast_paths(copy.deepcopy(model), False)
    x = images().bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        expected = reference(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected.float(), rtol=0.05, atol=0.05)
    out.float().sum().backward()
    conv_grad = model.stage1.blocks[0].attn.conv_proj_k.conv.weight.grad
    assert conv_grad is not None and conv_grad.dtype == torch.bfloat16 and conv_grad.abs().sum() > 0


def test_dw_fp32_leaves_only_cpu_autocast() -> None:
    """A map on another device (here the meta device) is not the CPU autocast's business."""
    proj = ConvProjection("dw_bn", 8, 3, stride=2, padding=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert proj.computes_in_fp32(torch.empty(2, 8, 9, 7))
        assert not proj.computes_in_fp32(torch.empty(2, 8, 9, 7, device="meta"))


@pytest.mark.parametrize("train", [False, True])
def test_avg_projections_pool_fp32_maps_under_autocast(train: bool) -> None:
    """``avg`` pools in its input's dtype (autocast leaves pooling alone): the map is not cast to bf16
    for it, as it is for the ``dw_bn`` convs."""
    seen: list[torch.dtype] = []
    model = tiny_model("avg", cls=True).train(train)
    model.stage1.blocks[0].attn.conv_proj_k.avg.register_forward_pre_hook(
        lambda m, a: seen.append(a[0].dtype)
    )
    with torch.set_grad_enabled(train), torch.autocast("cpu", dtype=torch.bfloat16):
        model(images())
    assert seen == [torch.float32]


def test_a_training_model_with_frozen_projections_gives_the_cls_only_q_conv_zero_gradients() -> None:
    """Frozen (eval) projections in a training model: the cls-only last block still runs its q conv, so
    its parameters get zero gradients as in the full block (DDP expects a gradient for every parameter)."""
    model = tiny_model("dw_bn", cls=True).train()
    for m in model.modules():
        if isinstance(m, ConvProjection):
            m.eval()
    model(images()).sum().backward()
    unused_q = model.stage1.blocks[-1].attn.conv_proj_q
    assert unused_q.conv.weight.grad is not None and unused_q.conv.weight.grad.abs().max() == 0


def test_a_hook_on_the_v_pooling_itself_stops_k_standing_in_for_it() -> None:
    model = tiny_model("avg", cls=True).eval()
    model.stage1.blocks[0].attn.conv_proj_v.avg.register_forward_hook(lambda m, args, out: 2 * out)
    assert_runs_as_reference_and_differs_from_plain_avg(model, min_change=1e-3)


def test_pooling_padding_set_apart_for_v_is_not_shared() -> None:
    """Kernel 3, stride 3 over a 4x4 grid: padding 1 and 0 give the same 2x2 keys, different values."""
    attn = layers.ConvAttention(8, 8, 2, method="avg", stride_kv=3).eval()
    attn.conv_proj_v.avg.padding = 0
    x = torch.randn(2, 1 + 16, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = attn(x, (4, 4))
        expected = set_fast_paths(copy.deepcopy(attn), False)(x, (4, 4))
        attn.conv_proj_v.avg.padding = 1
        shared = attn(x, (4, 4))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert (got - shared).abs().max() > 1e-3


def test_fuse_proj_off_runs_every_projection_on_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    forward = ConvProjection.forward
    monkeypatch.setattr(ConvProjection, "forward", lambda self, x: calls.append("pool") or forward(self, x))
    stacked = layers.ConvAttention._stacked_linear
    monkeypatch.setattr(
        layers.ConvAttention, "_stacked_linear", lambda *a: calls.append("stacked") or stacked(*a)
    )
    model = tiny_model("avg", cls=True).eval()
    with torch.no_grad():
        model(images())
        assert calls == ["pool", "stacked"] * 3  # k and v: one pooling and one product per block
        calls.clear()
        set_fast_paths(model, fuse_proj=False)(images())
    assert calls == ["pool", "pool"] * 3


def test_stacked_projections_run_onednn_only_when_every_linear_allows_it(
    onednn_calls: list[tuple[torch.dtype, bool]],
) -> None:
    """k and v of ``avg`` read as one product take oneDNN's path only if both layers have the flag."""
    model = set_fast_paths(tiny_model("avg", cls=True).eval(), onednn_linear=False)
    for block in model.stage1.blocks:
        block.attn.proj_k.onednn_linear = True
    with torch.no_grad():
        torch.testing.assert_close(model(images()), reference_logits(model, images()), rtol=0, atol=1e-5)
    assert onednn_calls == []


def test_a_model_made_under_inference_mode_keeps_f_linear(
    onednn_calls: list[tuple[torch.dtype, bool]],
) -> None:
    """Inference tensors cannot key the cache: packing their weights on every call would cost more than
    the packed kernel saves, so the linears (stacked or not) and the MLP stay on ``F.linear``."""
    with torch.inference_mode():
        for method in ("avg", "linear"):
            tiny_model(method, cls=True).eval()(images())
    assert onednn_calls == []


def test_packed_and_plain_products_alternating_with_the_batch_size_keep_their_own_weights(
    onednn_calls: list[tuple[torch.dtype, bool]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whether a product is large enough for oneDNN depends on its rows: batches of 3 and 1 alternate the
    packed and the ``F.linear`` path of the same layers, each with its own cached weights."""
    monkeypatch.setattr(cpu_kernels, "ONEDNN_MIN_MACS", 50_000)  # stage 1's k/v product: 79872 at 3 images
    for method in ("avg", "linear"):
        model = tiny_model(method, cls=True).eval()
        with torch.no_grad():
            for batch in (3, 1, 3, 1):
                x = images(batch)
                torch.testing.assert_close(model(x), reference_logits(model, x), rtol=0, atol=1e-5)
    assert onednn_calls


@pytest.mark.parametrize("method", ["avg", "linear"])
def test_stacked_projections_train_on_onednn(
    onednn_calls: list[tuple[torch.dtype, bool]], monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    """fp32 training: the stacked k/v (``avg``) or q/k/v (``linear``) product runs oneDNN's linear too."""
    rows: list[int] = []
    counted = cpu_kernels.linear
    monkeypatch.setattr(cpu_kernels, "linear", lambda x, w, *a: rows.append(w.shape[0]) or counted(x, w, *a))
    model = tiny_model(method, cls=True).train()
    model(images()).sum().backward()
    stacked = {"avg": 2, "linear": 3}[method] * 32  # stage 1's width
    assert stacked in rows


def test_fuse_proj_off_leaves_the_conv_projections_the_token_view(monkeypatch: pytest.MonkeyPatch) -> None:
    """The dense channels-last copy of the projections' map belongs to ``fuse_proj``: off, the convs read
    the view of the tokens after the cls split."""
    model = set_fast_paths(tiny_model("dw_bn", cls=True).eval(), fuse_proj=False)
    conv_inputs: list[torch.Tensor] = []
    model.stage1.blocks[0].attn.conv_proj_k.register_forward_pre_hook(lambda m, a: conv_inputs.append(a[0]))
    with torch.no_grad():
        model(images(2))
    assert len(conv_inputs) == 1 and not dense_channels_last(conv_inputs[0])


@pytest.mark.parametrize("fused_attn", [True, False])
def test_explicit_attention_keeps_bf16_probabilities_only_on_the_fast_path(
    monkeypatch: pytest.MonkeyPatch, sdpa_calls: list[int], fused_attn: bool
) -> None:
    monkeypatch.setattr(cpu_kernels, "CPU_HAS_BF16_KERNELS", True)
    dtypes: list[torch.dtype] = []
    probs = layers.ConvAttention.attention_probs
    monkeypatch.setattr(
        layers.ConvAttention,
        "attention_probs",
        lambda *a, **k: dtypes.append(probs(*a, **k).dtype) or probs(*a, **k),
    )
    model = set_fast_paths(tiny_model("dw_bn", cls=True).train(), fused_attn=fused_attn)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(images())
    assert sdpa_calls == [] and dtypes == [torch.bfloat16 if fused_attn else torch.float32] * 3


def test_attention_kernels_switch_at_their_key_limits(
    monkeypatch: pytest.MonkeyPatch, sdpa_calls: list[int], recomputed_calls: list[int]
) -> None:
    """Stage 0 attends over 35 keys, stage 1 over 13: a limit of 13 keys is still "few" (explicit in fp32)
    and not "many" (no recomputation in bf16); the recomputing kernel runs only with a graph and the
    chunked one only in bf16."""
    monkeypatch.setattr(cpu_kernels, "CPU_HAS_BF16_KERNELS", True)
    monkeypatch.setattr(layers, "FEW_KEYS", 13)
    monkeypatch.setattr(layers, "FEW_KEYS_BF16", 13)
    chunked: list[int] = []
    chunk = layers.chunked_attention
    monkeypatch.setattr(
        layers, "chunked_attention", lambda q, k, *a: chunked.append(k.shape[-2]) or chunk(q, k, *a)
    )
    model = tiny_model("dw_bn", cls=True).train()
    model(images())  # fp32 with a graph: SDPA over 35 keys, explicit over 13
    assert (sdpa_calls, recomputed_calls, chunked) == ([35], [], [])
    sdpa_calls.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(images())  # bf16 with a graph: recomputed over 35 keys, explicit over 13
    assert (sdpa_calls, recomputed_calls, chunked) == ([], [35], [])
    recomputed_calls.clear()
    set_fast_paths(model.eval(), chunked_attn=False)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(images())  # bf16 without a graph and without chunks: SDPA, not the training kernel
    assert (sdpa_calls, recomputed_calls, chunked) == ([35], [], [])
    sdpa_calls.clear()
    set_fast_paths(model)
    with torch.no_grad():
        model(images())  # fp32 inference: no chunked kernel
    assert (sdpa_calls, recomputed_calls, chunked) == ([35], [], [])


def test_a_cast_linear_called_without_autocast_after_autocast_uses_its_fp32_weights() -> None:
    """The autocast dtype is part of the cache's key: bf16 copies kept under autocast must not serve the
    next fp32 call (the reverse order would hide it: autocast casts fp32 weights anyway)."""
    torch.manual_seed(0)
    lin = CastCachedLinear(16, 8)
    lin.onednn_linear = False  # the _cast cache
    x = torch.randn(4, 16)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lin(x)
        assert lin._cast.cached[0].dtype == torch.bfloat16
        out = lin(x)
        assert lin._cast.cached[0] is lin.weight  # recomputed for fp32: the parameters themselves
    torch.testing.assert_close(out, nn.functional.linear(x, lin.weight, lin.bias), rtol=0, atol=0)


def test_derived_weights_cast_only_floating_tensors_to_the_autocast_dtype() -> None:
    """Under autocast the kept copies are cast to its dtype, except integer tensors and absent ones
    (a Linear without a bias derives None)."""
    weight = torch.randn(3, 2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        scaled, index, bias = DerivedWeights().get((weight,), lambda: (2 * weight, torch.arange(3), None))
    assert (scaled.dtype, index.dtype, bias) == (torch.bfloat16, torch.int64, None)
    torch.testing.assert_close(scaled, (2 * weight).bfloat16(), rtol=0, atol=0)
    torch.testing.assert_close(index, torch.arange(3), rtol=0, atol=0)


def test_derived_weights_recompute_when_the_number_of_sources_changes() -> None:
    """A source added or removed after caching (a bias given to a layer, or deleted) is a miss: the
    common sources matching must neither hit the cache nor end in an error."""
    cache, a, b = DerivedWeights(), torch.ones(2), torch.full((2,), 3.0)
    with torch.no_grad():
        assert cache.get((a,), lambda: (a + 1,))[0].tolist() == [2.0, 2.0]
        assert cache.get((a, b), lambda: (a + b,))[0].tolist() == [4.0, 4.0]
        assert cache.get((a,), lambda: (a + 1,))[0].tolist() == [2.0, 2.0]


def test_derived_weights_recompute_for_a_source_reinterpreted_in_another_dtype() -> None:
    """``param.data = param.data.view(dtype)`` keeps the Parameter, its version counter and its storage
    address: only the dtype in the key tells the cached tensors apart."""
    cache, t = DerivedWeights(), torch.ones(3)
    with torch.no_grad():
        assert cache.get((t,), lambda: (t.clone(),))[0].dtype == torch.float32
        t.data = t.data.view(torch.int32)
        (value,) = cache.get((t,), lambda: (t.clone(),))
    assert value.dtype == torch.int32 and value.tolist() == [1065353216] * 3  # the bits of 1.0


def test_a_cast_linear_under_autocast_recasts_a_bias_edited_in_place() -> None:
    """The bias is a source of the kept bf16 copies as much as the weight is: an in-place edit of it
    alone must show in the next call."""
    torch.manual_seed(0)
    lin = CastCachedLinear(16, 8)
    lin.onednn_linear = False  # the _cast cache
    x = torch.randn(4, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = lin(x)
        lin.bias.add_(1.0)
        after = lin(x)
        expected = nn.functional.linear(x, lin.weight, lin.bias)
    torch.testing.assert_close(after, expected, rtol=0, atol=0)
    assert (after.float() - before.float()).abs().min() > 0.9


def test_attention_without_a_cls_token_rejects_cls_only() -> None:
    attn = layers.ConvAttention(8, 8, num_heads=1, with_cls_token=False)
    with pytest.raises(UsageError, match="cls token"):
        attn(torch.randn(2, 9, 8), (3, 3), cls_only=True)


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # vmap over SDPA
def test_per_sample_gradients_of_a_bf16_model_over_many_keys_pass_the_recomputing_attention_by(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """RecomputedAttention has no functorch rule: ``vmap(grad(...))`` of a bf16 model whose attention
    would recompute (many keys, a graph) runs SDPA instead, and gives each image's own gradient."""
    monkeypatch.setattr(cpu_kernels, "CPU_HAS_BF16_KERNELS", True)
    monkeypatch.setattr(layers, "FEW_KEYS_BF16", 13)  # stage 0's 35 keys are "many"
    model = tiny_model("dw_bn", cls=True).eval().bfloat16()
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    x = images(2).bfloat16()

    def loss(p: dict[str, torch.Tensor], image: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(model, (p, buffers), (image[None],)).float().square().mean()

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)
    weight = model.stage0.blocks[0].attn.proj_q.weight
    for i in range(2):
        model.zero_grad()
        model(x[i : i + 1]).float().square().mean().backward()
        got = per_sample["stage0.blocks.0.attn.proj_q.weight"][i].float()
        torch.testing.assert_close(got, weight.grad.float(), rtol=0.05, atol=0.02)


def test_reference_attention_of_a_bf16_model_multiplies_bf16_probabilities_with_v() -> None:
    """The reference path's softmax is fp32 even for a bf16 model (``model.bfloat16()``, no autocast to
    reconcile the dtypes): the probabilities are cast back before the product with bf16 values."""
    model = tiny_model("dw_bn", cls=True).eval()
    x = images()
    expected = reference_logits(model, x)
    reference = set_fast_paths(model.bfloat16(), False)
    with torch.no_grad():
        got = reference(x.bfloat16())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, rtol=0.05, atol=0.1)


def test_attention_output_dropout_drops_in_training_only() -> None:
    torch.manual_seed(0)
    attn = layers.ConvAttention(8, 8, num_heads=2, proj_drop=0.5, with_cls_token=True)
    x, grid = torch.randn(2, 1 + 12, 8), (3, 4)
    with torch.no_grad():
        dropped = (attn.train()(x, grid) == 0).float().mean().item()
        kept = attn.eval()(x, grid)
    assert 0.3 < dropped < 0.7
    assert (kept != 0).all()


def test_derived_weights_of_sources_partly_made_under_inference_mode_are_recomputed() -> None:
    """One inference tensor among the sources (a buffer replaced under ``torch.inference_mode``) is
    enough to bypass the cache: it has no version counter to key on."""
    weight = torch.ones(2)
    with torch.inference_mode():
        shift = torch.full((2,), 2.0)
    cache = DerivedWeights()
    with torch.no_grad():
        for _ in range(2):
            assert cache.get((weight, shift), lambda: (weight + shift,))[0].tolist() == [3.0, 3.0]
    assert cache.cached is None


def _many_keys_model() -> CvT:
    """One stage over 72x72 inputs: 18x18 tokens, 81 keys, past FEW_KEYS, so the fast path runs SDPA."""
    torch.manual_seed(0)
    stages = expand_stages(1, embed_dim=(16,), depth=(1,), num_heads=(1,), patch_size=(7,), patch_stride=(4,),
                           patch_padding=(2,), cls_token=(False,), method="dw_bn", stride_kv=2)  # fmt: skip
    return CvT(stages, num_classes=7, img_size=(72, 72)).eval()


def test_forward_mode_ad_over_many_keys_passes_sdpa_by() -> None:
    """CPU SDPA's flash kernel has no forward-mode derivative: ``jvp`` and dual tensors over more than
    FEW_KEYS keys raised NotImplementedError; they run the explicit products, as the reference does."""
    model = _many_keys_model()
    reference = set_fast_paths(copy.deepcopy(model), False)
    x, tangent = torch.randn(2, 3, 72, 72), torch.randn(2, 3, 72, 72)
    _, expected = torch.func.jvp(reference, (x,), (tangent,))
    _, got = torch.func.jvp(model, (x,), (tangent,))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    with forward_ad.dual_level():
        dual = forward_ad.unpack_dual(model(forward_ad.make_dual(x, tangent))).tangent
    torch.testing.assert_close(dual, expected, rtol=1e-4, atol=1e-5)


def test_sdpa_still_runs_over_many_keys_without_a_tangent(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    sdpa = nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(
        layers.F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k)
    )
    model = _many_keys_model()
    with torch.no_grad():
        model(torch.randn(1, 3, 72, 72))
    assert calls == [1]


def test_weights_given_new_data_twice_between_calls_refresh_the_derived_weights() -> None:
    """``param.data = t`` twice: the second tensor could take the freed first one's address, and with
    the same Parameter, version and dtype the cache kept the old derived weights (logits off by 1.5-2.5
    from the 6th round on). Holding the recorded storage keeps its address from being reused."""
    model = tiny_model("dw_bn", cls=True).eval()
    x, fc1 = images(), model.stage1.blocks[0].mlp.fc1
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        model(x)
        for _ in range(10):
            for _ in range(2):
                fc1.weight.data = torch.randn(fc1.weight.shape, generator=generator)
            torch.testing.assert_close(model(x), reference_logits(model, x), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not cpu_kernels.CPU_HAS_BF16_KERNELS, reason="the chunked kernel runs on bf16 CPUs only")
def test_vmap_over_bf16_inference_passes_the_chunked_kernel_by() -> None:
    """``torch.func.vmap`` under bf16 inference: the chunked kernel's ``out=`` products have no batching
    rule (RuntimeError: "Batching rule not implemented for aten::mul.out"); SDPA runs instead."""
    model, x = _many_keys_model(), torch.randn(3, 1, 3, 72, 72)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = torch.func.vmap(model)(x)
        expected = torch.stack(
            [set_fast_paths(copy.deepcopy(model), chunked_attn=False)(image) for image in x]
        )
    torch.testing.assert_close(got.float(), expected.float(), rtol=0.02, atol=0.02)


# SiluLinear, QuickGeluMlp and Block: which path runs, and with which settings


def _random_layer_norms(module: nn.Module, seed: int = 5) -> None:
    """LayerNorms off their identity init (weight 1, bias 0), so that they change what they normalise."""
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.LayerNorm):
            m.weight.data = 1 + 0.3 * torch.randn(m.weight.shape, generator=gen)
            m.bias.data = 0.3 * torch.randn(m.bias.shape, generator=gen)


def test_block_passes_its_settings_to_its_layers() -> None:
    for act in ("quick_gelu", "gelu"):
        block = layers.Block(
            8, num_heads=2, mlp_ratio=2.5, drop=0.25, attn_drop=0.125, norm_eps=1e-3, act=act
        )
        assert isinstance(block.mlp, QuickGeluMlp) == (act == "quick_gelu")
        assert block.mlp.fc1.out_features == block.mlp.fc2.in_features == 20
        assert block.mlp.drop1.p == block.mlp.drop2.p == block.attn.proj_drop.p == 0.25
        assert block.attn.attn_drop.p == 0.125
        assert block.norm1.eps == block.norm2.eps == 1e-3
        assert isinstance(block.drop_path, nn.Identity)


class _Doubled(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * x


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("swap", ["norm", "drop2", "drop1"])
def test_mlp_with_a_hidden_norm_or_another_dropout_kind_runs_as_timm_mlp(
    onednn_calls: list[tuple[torch.dtype, bool]], swap: str, train: bool
) -> None:
    """``fold_act`` reads fc1 → SiLU → fc2 directly only with no norm between them and plain dropouts:
    a LayerNorm on the hidden units (timm's ``norm_layer``) or another module as a dropout runs as is,
    on the packed inference path too (which calls neither dropout)."""
    torch.manual_seed(0)
    mlp = QuickGeluMlp(8, 32)
    if swap == "norm":
        mlp.norm = nn.LayerNorm(32)
        _random_layer_norms(mlp)
    else:
        setattr(mlp, swap, _Doubled())
    mlp.train(train)
    reference = set_fast_paths(copy.deepcopy(mlp), False)
    x = torch.randn(2, 10, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), reference(x), rtol=1e-5, atol=1e-5)
    x.requires_grad_(True)
    torch.testing.assert_close(mlp(x), reference(x), rtol=1e-5, atol=1e-5)
    assert (torch.float32, True) not in onednn_calls  # no packed fc1 + SiLU
    plain = QuickGeluMlp(8, 32).train(train)
    with torch.no_grad():
        plain(x)
    assert ((torch.float32, True) in onednn_calls) == (not train)  # where the plain MLP packs


@pytest.mark.parametrize("onednn", [False, True])
def test_silu_linear_runs_its_product_and_input_gradient_on_onednn_only_when_asked(
    onednn_calls: list[tuple[torch.dtype, bool]], onednn: bool
) -> None:
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(3, 5, 8, generator=gen, requires_grad=True)
    weight, bias = torch.randn(4, 8, generator=gen), torch.randn(4, generator=gen)
    out = SiluLinear.apply(h, weight, bias, onednn)
    torch.testing.assert_close(out, nn.functional.linear(nn.functional.silu(h), weight, bias))
    assert len(onednn_calls) == int(onednn)  # forward
    out.backward(torch.ones_like(out))
    assert len(onednn_calls) == 2 * int(onednn)  # and the input gradient


@pytest.mark.parametrize("mlp_dropout", [0.0, 0.3])
def test_onednn_linear_off_keeps_fp32_training_off_onednn(
    onednn_calls: list[tuple[torch.dtype, bool]], mlp_dropout: float
) -> None:
    """``onednn_linear=False`` on a CPU where fp32 training would run oneDNN: no product runs there."""
    model = set_fast_paths(tiny_model("linear", cls=True).train(), onednn_linear=False)
    for mlp in (m for m in model.modules() if isinstance(m, QuickGeluMlp)):
        mlp.drop1.p = mlp.drop2.p = mlp_dropout
    nn.functional.cross_entropy(model(images()), torch.tensor([0, 3, 6])).backward()
    assert onednn_calls == []


@pytest.mark.parametrize(("p1", "p2"), [(0.5, 0.0), (0.0, 0.5), (0.3, 0.3)])
def test_training_mlp_with_dropout_equals_timm_mlp_under_the_same_seed(p1: float, p2: float) -> None:
    """Unhooked dropouts in a training graph: the folded path draws the masks timm's Mlp draws, in the
    same places (drop1 on the hidden units, drop2 on the output); outputs and gradients equal."""
    torch.manual_seed(0)
    mlp = QuickGeluMlp(8, 32).train()
    mlp.drop1.p, mlp.drop2.p = p1, p2
    reference = set_fast_paths(copy.deepcopy(mlp), False)
    x = torch.randn(4, 50, 8, generator=torch.Generator().manual_seed(1))
    outs = []
    for m in (mlp, reference):
        torch.manual_seed(5)
        outs.append(m(x.requires_grad_(True)))
        outs[-1].square().sum().backward()
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    assert (outs[0] == 0).float().mean() > 0.1 or p2 == 0
    for got, expected in zip(mlp.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(got.grad, expected.grad, rtol=1e-4, atol=1e-5)


def test_attention_kernels_at_the_key_counts_of_cvt13_at_224(
    monkeypatch: pytest.MonkeyPatch, sdpa_calls: list[int], recomputed_calls: list[int]
) -> None:
    """CvT-13 at 224 pixels attends over 784, 196 and 50 keys: in fp32 only the 50 are few enough for the
    explicit products; in a bf16 training step on a CPU with bf16 kernels the 784 are recomputed and the
    196 and 50 explicit (the limits measured in docs/performance-decisions.md)."""
    from conftest import MICRO_MODEL_ARGS
    from cvt import create_model

    monkeypatch.setattr(cpu_kernels, "CPU_HAS_BF16_KERNELS", True)
    torch.manual_seed(0)
    model = create_model("cvt_13", num_classes=10, **MICRO_MODEL_ARGS).train()
    x = torch.randn(1, 3, 224, 224)
    model(x)
    assert (sdpa_calls, recomputed_calls) == ([784, 196], [])
    sdpa_calls.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
    assert (sdpa_calls, recomputed_calls) == ([], [784])
