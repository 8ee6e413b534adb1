"""Export a CvT to runtimes outside this package, and check each export against the eager model.

Formats: ``onnx`` (legacy TorchScript-based exporter, dynamic batch axis; checked with onnxruntime),
``torchscript`` (``torch.jit.trace``), ``safetensors`` (this project's checkpoint: weights and
architecture, :func:`cvt.checkpoint.save_checkpoint`) and ``hf`` (a transformers
``CvtForImageClassification`` folder, :func:`cvt.checkpoint.export_hf`). The traced formats fix the
image size (``img_size``, default the model's); the batch size stays free.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import torch

from cvt.errors import UsageError
from cvt.models import CvT

EXPORT_FORMATS: tuple[str, ...] = ("onnx", "torchscript", "safetensors", "hf")
# the packages each format needs to write its file, and those that run it to check the export
_WRITE_PACKAGES = {"onnx": ("onnx",), "safetensors": ("safetensors",), "hf": ("safetensors",)}
_CHECK_PACKAGES = {"onnx": ("onnxruntime",)}
ONNX_OPSET = 17  # LayerNormalization is a single op from 17 on; onnxruntime >= 1.17 runs it
INPUT_NAME, OUTPUT_NAME = "image", "logits"


def require_packages(fmt: str, verify: bool = False) -> None:
    """Raise :class:`UsageError` naming the package that format ``fmt`` needs and that is missing."""
    if fmt not in EXPORT_FORMATS:
        raise UsageError(f"unknown export format {fmt!r}; expected one of {', '.join(EXPORT_FORMATS)}")
    needed = _WRITE_PACKAGES.get(fmt, ()) + (_CHECK_PACKAGES.get(fmt, ()) if verify else ())
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise UsageError(
            f"--format {fmt} needs the package {missing[0]!r}, which is not installed "
            f"(pip install {' '.join(missing)}, or pip install 'cvt[export]')"
        )


def _example_input(model: CvT, img_size: tuple[int, int] | None, batch: int) -> torch.Tensor:
    size = tuple(img_size or model.img_size)
    x = torch.randn(batch, model.in_chans, *size, generator=torch.Generator().manual_seed(0))
    model.check_input(x)  # a clear error for a size the stages cannot take, before tracing
    return x


def _refuse_overwrite(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise UsageError(f"refusing to overwrite {path}: choose another --output or pass --force")


def export_onnx(model: CvT, path: Path, img_size: tuple[int, int] | None = None) -> None:
    """Write ONNX with a dynamic batch axis (input ``image``, output ``logits``) at ``img_size``."""
    x = _example_input(model, img_size, batch=2)
    with torch.no_grad(), warnings.catch_warnings():
        # the legacy exporter is deprecated in favour of the dynamo one, which needs onnxscript
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model, (x,), str(path), dynamo=False, opset_version=ONNX_OPSET,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )  # fmt: skip


def export_torchscript(model: CvT, path: Path, img_size: tuple[int, int] | None = None) -> None:
    """Write a traced TorchScript module at ``img_size`` (``torch.jit.load`` reads it without cvt)."""
    x = _example_input(model, img_size, batch=2)
    with torch.no_grad():
        traced = torch.jit.trace(model, (x,))  # check_trace re-runs it against eager
    torch.jit.save(traced, str(path))


def export_model(
    model: CvT,
    fmt: str,
    output: str | Path,
    img_size: tuple[int, int] | None = None,
    variant: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Export ``model`` (put in eval mode) as ``fmt`` to ``output`` (a folder for ``hf``); returns it.

    ``variant`` names the registered variant in a ``safetensors`` checkpoint. Existing files are
    replaced only with ``overwrite``.
    """
    require_packages(fmt)
    from cvt.checkpoint import export_hf, save_checkpoint

    path = Path(output)
    model.eval()
    if fmt == "hf":
        return export_hf(model, path, overwrite=overwrite)
    if path.is_dir():
        raise UsageError(f"--output {path} is a folder; {fmt} export writes one file")
    _refuse_overwrite(path, overwrite)
    if fmt == "safetensors":
        return save_checkpoint(model, path, variant=variant, overwrite=overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    (export_onnx if fmt == "onnx" else export_torchscript)(model, path, img_size)
    return path


def run_exported(fmt: str, path: str | Path, images: torch.Tensor) -> torch.Tensor:
    """Logits of the exported file on ``images``, computed by that format's own runtime."""
    require_packages(fmt, verify=True)
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})[0])
    if fmt == "torchscript":
        module = torch.jit.load(str(path), map_location="cpu")
    else:  # safetensors file or hf folder: both describe their architecture
        from cvt.checkpoint import load_model

        module = load_model(path)
    with torch.no_grad():
        return module(images)


def verify_export(
    model: CvT, fmt: str, path: str | Path, img_size: tuple[int, int] | None = None, batch: int = 3
) -> float:
    """Largest absolute logit difference between the export and the eager model on random images.

    ``batch`` differs from the traced batch of 2, so the dynamic batch axis is exercised too.
    """
    images = _example_input(model, img_size, batch).cpu()
    model.eval()
    with torch.no_grad():
        expected = model.cpu()(images)
    return (run_exported(fmt, path, images) - expected).abs().max().item()
