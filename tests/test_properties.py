"""Property-based tests of the model over random valid configurations and input sizes (hypothesis)."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cvt.models import CvT, expand_stages
from cvt.models.cvt import min_input_size
from cvt.models.layers import conv_out_size


@st.composite
def configs(draw: st.DrawFn) -> tuple[CvT, tuple[int, int], int]:
    """A small random CvT, an input size it accepts, and a batch size."""
    num_stages = draw(st.integers(1, 3))

    def per_stage(values: st.SearchStrategy) -> list:
        return draw(st.lists(values, min_size=num_stages, max_size=num_stages))

    heads = per_stage(st.integers(1, 2))
    dims = [h * draw(st.sampled_from([4, 8])) for h in heads]
    kernel = draw(st.sampled_from([1, 3, 5]))
    stride_kv = draw(st.integers(1, 2))
    stage_fields = dict(
        embed_dim=dims,
        num_heads=heads,
        depth=per_stage(st.integers(1, 2)),
        patch_size=per_stage(st.sampled_from([1, 3, 5])),
        patch_stride=per_stage(st.integers(1, 2)),
        patch_padding=per_stage(st.integers(0, 1)),
        method=per_stage(st.sampled_from(["dw_bn", "avg", "linear"])),
        cls_token=per_stage(st.booleans()),
        pos_embed=per_stage(st.booleans()),
        kernel_qkv=kernel, padding_kv=kernel // 2, padding_q=kernel // 2, stride_kv=stride_kv,
        mlp_ratio=draw(st.sampled_from([1.0, 2.0])),
        qkv_bias=draw(st.booleans()),
    )  # fmt: skip
    torch.manual_seed(draw(st.integers(0, 2**16)))
    act = draw(st.sampled_from(["quick_gelu", "gelu"]))
    num_classes = draw(st.integers(1, 5))
    specs = tuple(expand_stages(num_stages, **stage_fields))
    img_size = max(16, *min_input_size(specs))  # position embeddings are sized at img_size
    model = CvT(specs, num_classes=num_classes, img_size=img_size, act=act)
    with torch.no_grad():  # random BatchNorm statistics, as a trained model has
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    min_h, min_w = model.min_input_size()
    h = draw(st.integers(min_h, min_h + 20))
    w = draw(st.integers(min_w, min_w + 20))
    return model.eval(), (h, w), draw(st.integers(1, 3))


def expected_grid(model: CvT, size: tuple[int, int]) -> tuple[int, int]:
    h, w = size
    for s in model.stage_specs:
        h = conv_out_size(h, s.patch_size, s.patch_stride, s.patch_padding)
        w = conv_out_size(w, s.patch_size, s.patch_stride, s.patch_padding)
    return h, w


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs())
def test_output_shape_finiteness_and_batch_independence(config: tuple[CvT, tuple[int, int], int]) -> None:
    model, size, batch = config
    x = torch.randn(batch + 1, 3, *size)
    with torch.no_grad():
        logits = model(x)
        alone = model(x[:1])
        maps = model.forward_intermediates(x, intermediates_only=True)
    assert logits.shape == (batch + 1, model.num_classes)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(alone[0], logits[0], atol=1e-5, rtol=1e-4)
    assert tuple(maps[-1].shape[-2:]) == expected_grid(model, size)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs())
def test_state_dict_round_trip(config: tuple[CvT, tuple[int, int], int]) -> None:
    model, size, _ = config
    clone = CvT(model.stage_specs, num_classes=model.num_classes, img_size=model.img_size, act=model.act)
    clone.eval()
    clone.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        torch.testing.assert_close(clone(x), model(x), atol=0, rtol=0)


@given(
    size=st.integers(1, 16), kernel=st.integers(1, 5), stride=st.integers(1, 4), data=st.data(),
)  # fmt: skip
@settings(max_examples=300, deadline=None)
def test_conv_out_size_is_that_of_pytorchs_layers(size: int, kernel: int, stride: int, data: st.DataObject):
    """The grid formula the model sizes its maps by, against the layers it stands for: a convolution,
    and average pooling with ``ceil_mode`` (the ``avg`` projection), whose last window is dropped when
    it would start inside the right padding."""
    padding = data.draw(st.integers(0, kernel // 2))  # what AvgPool2d accepts
    if size + 2 * padding < kernel:
        return
    x = torch.zeros(1, 1, size, size)
    conv = torch.nn.functional.conv2d(x, torch.zeros(1, 1, kernel, kernel), stride=stride, padding=padding)
    pool = torch.nn.AvgPool2d(kernel, stride, padding, ceil_mode=True)(x)
    assert conv_out_size(size, kernel, stride, padding) == conv.shape[-1]
    assert conv_out_size(size, kernel, stride, padding, ceil_mode=True) == pool.shape[-1]
