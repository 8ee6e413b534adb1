"""The compared subjects, built with the same weights: this package's model (``cvt``), transformers'
port (``hf``) and the official algorithm of ``benchmarks/official_reference.py`` (``official``), with the
check that the official one computes this package's logits."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cvt.benchmark.config import BenchConfig
from cvt.errors import CheckpointError, UsageError, first_line

SUBJECTS: tuple[str, ...] = ("cvt", "hf", "official")
OFFICIAL_REFERENCE = Path(__file__).resolve().parents[3] / "benchmarks" / "official_reference.py"


def load_official_reference() -> Any:
    """The ``benchmarks/official_reference.py`` module of a source checkout."""
    if not OFFICIAL_REFERENCE.is_file():
        raise UsageError(
            "--compare official runs the official algorithm kept in the repository's "
            "benchmarks/official_reference.py, which an installed package does not ship: run cvt bench "
            "from a source checkout (git clone, then pip install -e .)"
        )
    spec = importlib.util.spec_from_file_location("cvt_official_reference", OFFICIAL_REFERENCE)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def build_hf_peer(model: nn.Module) -> nn.Module:
    """transformers' ``CvtForImageClassification`` with ``model``'s configuration and weights.

    transformers always runs GELU, so its logits differ slightly from a QuickGELU model's.
    """
    try:
        from transformers import CvtConfig, CvtForImageClassification
    except ImportError:
        raise UsageError(
            "--compare hf needs the transformers package, which is not installed (pip install 'cvt[hf]')"
        ) from None
    from cvt.checkpoint.hf import hf_config_from_model, native_to_hf

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the GELU-vs-QuickGELU warning: known, stated above
        try:
            config = hf_config_from_model(model)
        except CheckpointError as err:  # worded for export; here no file is written
            reason = str(err).removeprefix("cannot export to the Hugging Face layout: ")
            raise UsageError(f"--compare hf: transformers' CvT cannot express this model: {reason}") from None
    try:
        peer = CvtForImageClassification(CvtConfig(**config))
    except ImportError as err:  # a backend transformers needs is missing or too old (5.x: torch >= 2.6)
        raise UsageError(
            f"--compare hf: transformers cannot build its CvT model here: {first_line(err)} "
            "(transformers 5 needs torch >= 2.6; with an older torch: pip install 'transformers<5')"
        ) from None
    peer.load_state_dict(native_to_hf(model.state_dict()))
    return peer


class _Logits(nn.Module):
    """Wraps a transformers model so that calling it returns the logits tensor."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(pixel_values=x).logits


def build_subjects(cfg: BenchConfig, names: list[str]) -> tuple[dict[str, nn.Module], int]:
    """The models to time, in eval mode on ``cfg.device``, all holding the same weights, and their
    number of classes."""
    from cvt.models import create_model

    torch.manual_seed(0)
    ours = create_model(cfg.model).to(cfg.device).eval()
    if cfg.grad_checkpointing:
        ours.set_grad_checkpointing(True)
    subjects: dict[str, nn.Module] = {}
    for name in names:
        if name == "cvt":
            subjects[name] = ours
        elif name == "hf":
            subjects[name] = _Logits(build_hf_peer(ours)).to(cfg.device).eval()
        elif name == "official":
            peer = load_official_reference().OfficialCvT.from_cvt(ours).eval()
            check_same_logits(ours, peer, cfg)
            subjects[name] = peer
        else:
            raise UsageError(f"unknown benchmark subject {name!r}; expected one of {SUBJECTS}")
    if cfg.channels_last:
        for model in subjects.values():
            model.to(memory_format=torch.channels_last)
    return subjects, ours.num_classes


def check_same_logits(ours: nn.Module, peer: nn.Module, cfg: BenchConfig, atol: float = 1e-4) -> None:
    """Assert that the official re-implementation computes this package's function (fp32, eval).

    cuDNN's TF32 convolutions (PyTorch's default on Ampere and later) are switched off for the check:
    they round inputs to 10 mantissa bits, which alone moves the logits by more than ``atol``.
    """
    x = torch.randn(2, 3, *cfg.measured_size, device=cfg.device, generator=None)
    with torch.inference_mode(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        diff = (ours(x) - peer(x)).abs().max().item()
    if diff > atol:
        raise AssertionError(f"official re-implementation differs from cvt by {diff:.2e} (> {atol})")
