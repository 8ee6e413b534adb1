"""The official implementation's outputs, reproduced through the checkpoint loader (issue 2, item 6).

Golden files live in ``shared/golden`` beside the repository (CI copies ``shared/`` next to the
clone). Each case: the official ``MODEL.SPEC``, a state dict with ``model.`` keys, input, logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cvt.checkpoint import load_checkpoint
from cvt.models import create_model
from cvt.models.cvt import CvT
from cvt.models.official_spec import stages_from_official_spec

GOLDEN = Path(__file__).resolve().parents[1].parent / "shared" / "golden"
pytestmark = pytest.mark.skipif(not GOLDEN.is_dir(), reason=f"golden files not found at {GOLDEN}")
CASES = json.loads((GOLDEN / "official_cases.json").read_text()) if GOLDEN.is_dir() else {}


def _golden_model(name: str) -> tuple[CvT, torch.Tensor, torch.Tensor]:
    """The case's model loaded strictly from its official state dict, with the golden input and logits."""
    case = CASES[name]
    tensors = load_file(GOLDEN / f"official_{name}.safetensors")
    model = CvT(
        stages_from_official_spec(case["official_spec"]),
        num_classes=case["num_classes"],
        act=case["act"],
        norm_eps=case["layer_norm_eps"],
        img_size=tuple(case["input_shape"][2:]),
    )
    state_dict = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    result = load_checkpoint(model, state_dict)  # strict
    assert result.format == "official" and not result.skipped and not result.missing
    return model.eval(), tensors["input"], tensors["logits"]


@pytest.mark.parametrize("name", sorted(CASES))
def test_official_logits_reproduced(name: str) -> None:
    model, x, expected = _golden_model(name)
    assert tuple(x.shape) == tuple(CASES[name]["input_shape"])
    with torch.no_grad():
        fused = model(x)
        first = model(x[:1])  # batch size 1: the official code's squeeze() bug
        for module in model.modules():
            if hasattr(module, "fused_attn"):
                module.fused_attn = False
        reference = model(x)
    assert (fused - expected).abs().max().item() < 1e-5
    assert (first - expected[:1]).abs().max().item() < 1e-5
    assert (reference - expected).abs().max().item() < 1e-5
    # the logits are not trivial: classes differ
    assert expected.std().item() > 1e-3


@pytest.mark.parametrize("variant", ["cvt_13", "cvt_21", "cvt_w24"])
def test_official_keys_load_strictly(variant: str) -> None:
    shapes = {
        k: tuple(s) for k, s in json.loads((GOLDEN / f"official_{variant}_keys.json").read_text()).items()
    }
    with torch.device("meta"):  # no init cost: CvT-W24 has 277M parameters
        model = create_model(variant)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes
    # real random tensors for CvT-13 (values checked below), shape-only tensors for the large ones
    device = "cpu" if variant == "cvt_13" else "meta"
    gen = torch.Generator().manual_seed(0) if device == "cpu" else None
    state_dict = {
        k: torch.zeros(s, dtype=torch.long, device=device)
        if k.endswith("num_batches_tracked")
        else torch.randn(s, generator=gen, device=device)
        for k, s in shapes.items()
    }
    result = load_checkpoint(model, state_dict)  # strict; a meta model takes the tensors (assign)
    assert result.format == "official" and not result.skipped and not result.missing
    if device == "cpu":
        key = "stage2.blocks.9.attn.conv_proj_k.bn.running_var"
        assert torch.equal(model.state_dict()[key], state_dict[key])
        assert torch.equal(model.head.weight, state_dict["head.weight"])
        assert not any(t.is_meta for t in model.state_dict().values())
