"""torch.compile: the blocks trace without graph breaks, compiled equals eager, and a new batch size
does not recompile once the batch dimension is dynamic (issue 4)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from cvt.models import CvT, expand_stages


def tiny_model(method: str = "dw_bn") -> CvT:
    torch.manual_seed(0)
    stages = expand_stages(
        2, embed_dim=(16, 32), depth=(1, 1), num_heads=(1, 2), patch_size=(7, 3), patch_stride=(4, 2),
        patch_padding=(2, 1), cls_token=(False, True), method=method,
    )  # fmt: skip
    return CvT(stages, num_classes=5, img_size=(32, 48)).eval()


@pytest.fixture(autouse=True)
def fresh_dynamo() -> None:
    torch._dynamo.reset()


@pytest.mark.parametrize("method", ["dw_bn", "avg", "linear"])
def test_block_traces_as_one_graph_in_eval_and_train(method: str) -> None:
    block = tiny_model(method).stage1.blocks[0]
    x = torch.randn(2, 1 + 4 * 6, 32)  # cls + a 4x6 grid
    for train in (False, True):
        block.train(train)
        explanation = torch._dynamo.explain(block)(x, (4, 6))
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert explanation.graph_count == 1


@pytest.mark.parametrize("method", ["dw_bn", "avg"])
def test_block_traces_as_one_graph_under_bf16_autocast(method: str) -> None:
    """``cvt bench --dtype bf16 --compile`` (the GPU targets) compiles under autocast: the dtype checks
    of the projections (``dw_fp32``, the one cast of the conv input) must trace, not break the graph."""
    block = tiny_model(method).stage1.blocks[0]
    x = torch.randn(2, 1 + 4 * 6, 32)
    for train in (False, True):
        block.train(train)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            explanation = torch._dynamo.explain(block)(x, (4, 6))
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert explanation.graph_count == 1


def test_block_does_not_trace_the_autocast_availability_query(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch 2.11's Dynamo cannot trace ``torch.amp.is_autocast_available`` (a graph break in every
    block; on an H200 with torch 2.11 that made ``--compile`` training 0.77x transformers' eager fp32).
    Stand-in for such a Dynamo: the query is made untraceable, and the blocks must still be one graph."""
    monkeypatch.setattr(torch.amp, "is_autocast_available",
                        torch._dynamo.disable(torch.amp.is_autocast_available))  # fmt: skip
    block = tiny_model().stage1.blocks[0]
    x = torch.randn(2, 1 + 4 * 6, 32)
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            explanation = torch._dynamo.explain(block)(x, (4, 6))
        assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.slow
def test_batch_size_changes_do_not_recompile_each_time() -> None:
    model = tiny_model()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    with torch.no_grad():
        for batch in (2, 3, 5, 7):
            compiled(torch.randn(batch, 3, 32, 48))
    # the first call specialises on batch 2, the second marks the batch dynamic, then no more
    assert counter.frame_count <= 2, f"{counter.frame_count} compilations for 4 batch sizes"


@pytest.mark.slow
def test_compiled_model_matches_eager_in_inference_and_training() -> None:
    """Whole model in one graph (``fullgraph``), through AOT autograd's decompositions.

    The inductor backend gives the same result (checked by hand: 140 s of C++ compilation on a
    2-core CPU, too slow for the suite; ``cvt bench --compile`` exercises it).
    """
    model = tiny_model()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 3, 32, 48)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    model.train()
    compiled(x).square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model(x).square().sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("entry", ["forward", "forward_intermediates"])
def test_whole_model_traces_as_one_graph_without_warnings(entry: str) -> None:
    """The input checks run eagerly only: traced, ``min_input_size`` (an ``lru_cache`` function) made
    Dynamo warn on every compilation of ``forward_intermediates`` (timm's backbone interface)."""
    model = tiny_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        explanation = torch._dynamo.explain(getattr(model, entry))(torch.randn(2, 3, 32, 48))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
