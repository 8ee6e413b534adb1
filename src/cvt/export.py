"""Export a CvT to runtimes outside this package, and check each export against the eager model.

Formats: ``onnx`` (legacy TorchScript-based exporter, dynamic batch axis; checked with onnxruntime),
``torchscript`` (``torch.jit.trace``), ``safetensors`` (this project's checkpoint: weights and
architecture, :func:`cvt.checkpoint.save_checkpoint`) and ``hf`` (a transformers
``CvtForImageClassification`` folder, :func:`cvt.checkpoint.export_hf`). The traced formats fix the
image size (``img_size``, default the model's); the batch size stays free.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from timm.layers import to_2tuple

from cvt.checkpoint.hf import hf_export_files
from cvt.errors import UsageError
from cvt.fileio import atomic_write_bytes, check_folder_path, refuse_existing
from cvt.models import CvT

EXPORT_FORMATS: tuple[str, ...] = ("onnx", "torchscript", "safetensors", "hf")
# the packages each format needs to write its file, and those that run it to check the export
_WRITE_PACKAGES = {"onnx": ("onnx",), "safetensors": ("safetensors",), "hf": ("safetensors",)}
_CHECK_PACKAGES = {"onnx": ("onnxruntime",)}
# what reads each export back for the check (transformers itself cannot: its CvT runs GELU, not QuickGELU)
CHECKED_BY = {"onnx": "onnxruntime", "torchscript": "torch.jit.load", "safetensors": "cvt.load_model",
              "hf": "cvt.load_model"}  # fmt: skip
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
            f"(pip install {' '.join(missing)}, or from a source checkout pip install '.[export]')"
            + (
                "; --no-verify exports without the check"
                if missing[0] in _CHECK_PACKAGES.get(fmt, ())
                else ""
            )
        )


def _example_input(model: CvT, img_size: int | tuple[int, int] | None, batch: int) -> torch.Tensor:
    """Random images (fixed seed) of ``img_size`` in the model's dtype and on its device."""
    size = to_2tuple(img_size or model.img_size)  # an int N is N x N
    weight = next(model.parameters())
    x = torch.randn(batch, model.in_chans, *size, generator=torch.Generator().manual_seed(0))
    x = x.to(device=weight.device, dtype=weight.dtype)
    model.check_input(x)  # a clear error for a size the stages cannot take, before tracing
    return x


def check_output(fmt: str, output: str | Path, overwrite: bool = False) -> Path:
    """The path ``fmt`` would write, checked before any work: :class:`UsageError` for a folder where
    a file goes (or the reverse), a file where a parent folder goes, or outputs that exist already
    without ``overwrite``."""
    path = Path(output)
    check_folder_path(path.parent)
    if fmt == "hf":
        if path.exists() and not path.is_dir():
            raise UsageError(f"--output {path} is a file; hf export writes a folder")
        refuse_existing(hf_export_files(path), overwrite)
    else:
        if path.is_dir():
            raise UsageError(f"--output {path} is a folder; {fmt} export writes one file")
        refuse_existing([path], overwrite)
    return path


def export_onnx(model: CvT, img_size: int | tuple[int, int] | None = None) -> bytes:
    """ONNX with a dynamic batch axis (input ``image``, output ``logits``) at ``img_size``."""
    x = _example_input(model, img_size, batch=2)
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # the legacy exporter is deprecated in favour of the dynamo one, which needs onnxscript
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model, (x,), buffer, dynamo=False, opset_version=ONNX_OPSET,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )  # fmt: skip
    return buffer.getvalue()


@contextlib.contextmanager
def _torchscript_deprecation_silenced() -> Iterator[None]:
    """No FutureWarning from ``torch.jit``: TorchScript is deprecated in favour of ``torch.export``, but
    it is still what C++ and mobile load, so tracing, saving and loading one stay quiet."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


def export_torchscript(model: CvT, img_size: int | tuple[int, int] | None = None) -> bytes:
    """A traced TorchScript module at ``img_size`` (``torch.jit.load`` reads it without cvt)."""
    x = _example_input(model, img_size, batch=2)
    buffer = io.BytesIO()
    with torch.no_grad(), _torchscript_deprecation_silenced():
        traced = torch.jit.trace(model, (x,))  # check_trace re-runs it against eager
        torch.jit.save(traced, buffer)
    return buffer.getvalue()


def export_model(
    model: CvT,
    fmt: str,
    output: str | Path,
    img_size: int | tuple[int, int] | None = None,
    variant: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Export ``model`` (put in eval mode) as ``fmt`` to ``output`` (a folder for ``hf``); returns it.

    ``variant`` names the registered variant in a ``safetensors`` checkpoint. Existing files are
    replaced only with ``overwrite``; ONNX and TorchScript files are replaced atomically, so a failed
    export leaves the old file as it was.
    """
    require_packages(fmt)
    from cvt.checkpoint import export_hf, save_checkpoint

    path = check_output(fmt, output, overwrite)
    model.eval()
    if fmt == "hf":
        return export_hf(model, path, overwrite=overwrite)
    if fmt == "safetensors":
        return save_checkpoint(model, path, variant=variant, overwrite=overwrite)
    data = (export_onnx if fmt == "onnx" else export_torchscript)(model, img_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)
    return path


def run_exported(fmt: str, path: str | Path, images: torch.Tensor) -> torch.Tensor:
    """Logits of the exported file on ``images``, computed by what reads that format back
    (:data:`CHECKED_BY`)."""
    require_packages(fmt, verify=True)
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})[0])
    if fmt == "torchscript":
        with _torchscript_deprecation_silenced():
            module = torch.jit.load(str(path), map_location="cpu")
    else:  # safetensors file or hf folder: both describe their architecture (rebuilt in fp32)
        from cvt.checkpoint import load_model

        module = load_model(path).to(images.dtype)  # a fp64 or bf16 model's images
    with torch.no_grad():
        return module(images)


def verify_export(
    model: CvT, fmt: str, path: str | Path, img_size: int | tuple[int, int] | None = None, batch: int = 3
) -> float:
    """Largest absolute logit difference between the export and the eager model on random images.

    ``batch`` differs from the traced batch of 2, so the dynamic batch axis is exercised too. The
    eager model runs where it is; the export runs on the CPU.
    """
    images = _example_input(model, img_size, batch)
    model.eval()
    with torch.no_grad():
        expected = model(images).cpu()
    return (run_exported(fmt, path, images.cpu()) - expected).abs().max().item()
