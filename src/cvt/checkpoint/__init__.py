"""Checkpoint formats: official Microsoft ``.pth``, Hugging Face transformers, and the project's own.

``load_checkpoint(model, path)`` detects the format and loads strictly; ``load_model(path)``
rebuilds a model from a file that describes it (``rebuild_model`` also returns what the file says
beside the weights); ``save_checkpoint`` and ``export_hf`` write;
``create_model_from_official_yaml`` builds the model an official experiment YAML describes, to load
official weights into.
"""

from cvt.checkpoint.hf import export_hf
from cvt.checkpoint.load import (
    LoadResult,
    check_fit,
    checkpoint_filter_fn,
    convert_state_dict,
    load_checkpoint,
    load_model,
    matching_variants,
    rebuild_model,
)
from cvt.checkpoint.native import save_checkpoint
from cvt.checkpoint.official_yaml import create_model_from_official_yaml
from cvt.checkpoint.read import read_state_dict

__all__ = [
    "LoadResult",
    "check_fit",
    "checkpoint_filter_fn",
    "convert_state_dict",
    "create_model_from_official_yaml",
    "export_hf",
    "load_checkpoint",
    "load_model",
    "matching_variants",
    "read_state_dict",
    "rebuild_model",
    "save_checkpoint",
]
