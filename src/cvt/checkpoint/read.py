"""Read any supported checkpoint file into a flat ``{key: tensor}`` state dict, safely.

Supported inputs (the format is detected from the file type and the keys, never from the name):

- ``cvt``: this project's safetensors file, whose metadata describes the architecture;
- ``official``: the Microsoft key layout (``stage0.patch_embed.proj.weight`` …) in a ``.pth``
  pickle or a safetensors file without our metadata, plain or nested under ``state_dict`` /
  ``model`` (training checkpoints of this project and timm's), with or without ``module.`` prefixes;
  a ``cvt train`` checkpoint also brings its ``config`` (model, class count, input size, data set)
  and class names;
- ``hf``: a Hugging Face transformers CvT checkpoint (``cvt.encoder.stages.*`` keys), given as
  its directory or as the weight file inside it (``config.json`` beside it is read too), in one
  file or sharded (``model.safetensors.index.json`` and the shards it names).

Pickles are read with ``torch.load(weights_only=True)`` only: a pickle that would run code is refused.
"""

from __future__ import annotations

import argparse
import json
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from cvt.errors import CheckpointError, is_out_of_memory

FORMAT_NATIVE = "cvt"
FORMAT_OFFICIAL = "official"
FORMAT_HF = "hf"

# safetensors metadata of the project's own format
NATIVE_FORMAT_KEY = "cvt_format"
NATIVE_FORMAT_VERSION = "1"
NATIVE_ARCH_KEY = "cvt_arch"

HF_CONFIG_FILE = "config.json"
HF_PREPROCESSOR_FILE = "preprocessor_config.json"  # input size, mean/std, crop (optional)
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# sharded checkpoints (save_pretrained above max_shard_size): an index maps every key to its shard file
HF_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# the order of transformers' from_pretrained: safetensors before pickles, each whole before sharded
HF_LOOKUP_ORDER = (HF_WEIGHT_FILES[0], HF_INDEX_FILES[0], HF_WEIGHT_FILES[1], HF_INDEX_FILES[1])
SHARD_INDEX_SUFFIX = ".index.json"
# a `cvt train` checkpoint: its run configuration and class names beside the weights
TRAIN_CONFIG_KEY = "config"
TRAIN_CONFIG_REQUIRED = {"model", "num_classes"}  # what rebuilds its model
# the config entries that reading one uses: to rebuild its model, to find and preprocess its data
TRAIN_CONFIG_READ = ("model", "num_classes", "model_args", "img_size", "dataset", "data_dir")
CLASSES_KEY = "classes"
# non-tensor objects that trusted training checkpoints pickle: timm's CheckpointSaver stores `args`
SAFE_PICKLE_GLOBALS = [argparse.Namespace]
# containers of the model weights in training checkpoints (ours, timm's, the official trainer's)
STATE_DICT_KEYS = ("state_dict", "model")
AVERAGED_MODEL_COUNT = "n_averaged"  # AveragedModel's counter: no weight
EMA_STATE_DICT_KEYS = ("ema", "model_ema", "state_dict_ema")  # cvt train; DeiT-style; timm
# wrappers that prefix every key: DistributedDataParallel / DataParallel, torch.compile
WRAPPER_PREFIXES = ("module.", "_orig_mod.")

_NATIVE_KEY = re.compile(r"^stage\d+\.")
_HF_KEY_PREFIX = "cvt.encoder."
_HF_BASE_KEY_PREFIX = "encoder.stages."  # transformers CvtModel: the encoder alone


def read_state_dict(
    path: str | Path, use_ema: bool = False
) -> tuple[dict[str, torch.Tensor], str, dict[str, Any]]:
    """Read a checkpoint file or Hugging Face directory.

    Returns ``(state_dict, format_name, extra_info)``: the tensors in the file's own key layout
    (unwrapped and de-prefixed, not yet renamed), one of ``"cvt"``, ``"official"``, ``"hf"``, and
    a dict with ``path`` (the weight file read), ``nested_key`` (the container the weights came
    from, or None), ``arch`` (``cvt`` files: the architecture), for ``hf`` ``hf_config`` and
    ``hf_preprocessor`` (the parsed ``config.json`` and ``preprocessor_config.json`` when present),
    and for a ``cvt train`` checkpoint ``train_config`` (its ``config`` dict) and ``classes`` (its
    class names, or None). ``use_ema`` takes the EMA weights of a training checkpoint.
    """
    weight_file, hf_config_file = _locate(Path(path))
    obj, metadata = _load_file(weight_file)
    state_dict, nested_key = unwrap_state_dict(obj, weight_file, use_ema)
    fmt = detect_format(state_dict, metadata, weight_file)
    extra: dict[str, Any] = {"path": str(weight_file), "nested_key": nested_key}
    if _is_train_checkpoint(obj):
        extra["train_config"] = _checked_train_config(obj[TRAIN_CONFIG_KEY], weight_file)
        extra["classes"] = _checked_classes(
            obj.get(CLASSES_KEY) or obj[TRAIN_CONFIG_KEY].get(CLASSES_KEY), weight_file
        )
    if fmt == FORMAT_NATIVE:
        extra["arch"] = _native_arch(metadata, weight_file)
    if fmt == FORMAT_HF and hf_config_file.is_file():
        extra["hf_config"] = _read_json(hf_config_file)
        preprocessor = hf_config_file.with_name(HF_PREPROCESSOR_FILE)
        if preprocessor.is_file():
            extra["hf_preprocessor"] = _read_json(preprocessor)
    return state_dict, fmt, extra


def _is_train_checkpoint(obj: Any) -> bool:
    """A ``cvt train`` checkpoint: a ``config`` naming the model and its class count. Other projects
    also save ``{"model": ..., "config": vars(args)}``; those load as plain state dicts."""
    config = obj.get(TRAIN_CONFIG_KEY) if isinstance(obj, Mapping) else None
    return isinstance(config, dict) and config.keys() >= TRAIN_CONFIG_REQUIRED


def _checked_train_config(config: dict[str, Any], path: Path) -> dict[str, Any]:
    """The ``config`` of a ``cvt train`` checkpoint; a CheckpointError names an entry that reading it
    uses (:data:`TRAIN_CONFIG_READ`) holding a value of the wrong type (a file edited by hand)."""
    from cvt.engine.config import TrainConfig, apply_overrides
    from cvt.errors import UsageError

    malformed = f"training checkpoint {path} has a malformed config"
    given = {k: config[k] for k in TRAIN_CONFIG_READ if config.get(k) is not None}  # None: not recorded
    try:  # the types of the options of the same names
        apply_overrides(TrainConfig(), given, str(path))
    except UsageError as err:
        raise CheckpointError(f"{malformed}: {err}") from None
    num_classes = given.get("num_classes")
    if config["model"] is None or num_classes is None or num_classes < 0:  # what rebuilds its model
        raise CheckpointError(
            f"{malformed}: it must name its 'model' and a 'num_classes' >= 0, got {config['model']!r} and "
            f"{config['num_classes']!r}"
        )
    return config


def _checked_classes(classes: Any, path: Path) -> list[str] | None:
    """The class names of a ``cvt train`` checkpoint (None when it has none); a CheckpointError when
    they are not a list of strings."""
    if not classes:
        return None
    if not isinstance(classes, list | tuple) or not all(isinstance(c, str) for c in classes):
        raise CheckpointError(
            f"training checkpoint {path} has malformed class names: 'classes' must be a list of strings, "
            f"got {classes!r:.80} ({type(classes).__name__})"
        )
    return list(classes)


def _locate(path: Path) -> tuple[Path, Path]:
    """The weight file to read and where a Hugging Face ``config.json`` would be."""
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_dir():
        return path, path.parent / HF_CONFIG_FILE
    config = path / HF_CONFIG_FILE
    saved = [name for name in ("best.pt", "last.pt") if (path / name).is_file()]
    if saved and not config.is_file():  # a `cvt train` run folder: its checkpoints are files in it
        raise CheckpointError(
            f"{path} is a run folder, not a checkpoint: pass {' or '.join(str(path / n) for n in saved)}"
        )
    if not config.is_file():
        raise CheckpointError(
            f"directory {path} is not a Hugging Face checkpoint: expected {HF_CONFIG_FILE} with "
            f"{' or '.join(HF_WEIGHT_FILES)}, found no {HF_CONFIG_FILE}"
        )
    for name in HF_LOOKUP_ORDER:
        if (path / name).is_file():
            return path / name, config
    raise CheckpointError(
        f"Hugging Face directory {path} has {HF_CONFIG_FILE} but no weights: expected "
        f"{' or '.join(HF_WEIGHT_FILES + HF_INDEX_FILES)}"
    )


def _is_safetensors(path: Path) -> bool:
    """A safetensors file starts with an 8-byte little-endian header length, then a JSON object."""
    with path.open("rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _load_file(path: Path) -> tuple[Any, dict[str, str]]:
    """The deserialized object (a tensor dict, or a container of one) and safetensors metadata; a
    shard index gives the tensors of all its shards."""
    if path.name.endswith(SHARD_INDEX_SUFFIX):
        return _load_shards(path), {}
    return _load_weight_file(path)


def _load_weight_file(path: Path) -> tuple[Any, dict[str, str]]:
    """One safetensors file or pickle: its deserialized object and safetensors metadata."""
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
    if _is_safetensors(path):
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118
        except Exception as err:
            if is_out_of_memory(err):  # tensors this machine cannot hold, not a damaged file
                raise
            raise CheckpointError(
                f"checkpoint {path} is not a readable safetensors file (truncated or corrupt?): {err}"
            ) from err
    return safe_torch_load(path), {}


def _load_shards(index_path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a sharded checkpoint: every shard named by the index's ``weight_map``, which must
    be plain file names beside the index and hold exactly the keys the index gives them."""
    index = _read_json(index_path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"shard index {index_path} has no 'weight_map' of tensor names to files")
    state_dict: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        if not isinstance(shard, str) or Path(shard).name != shard:
            raise CheckpointError(f"shard index {index_path} names {shard!r}: not a file name beside it")
        shard_path = index_path.parent / shard
        if not shard_path.is_file():
            raise CheckpointError(f"shard {shard} listed in {index_path} does not exist")
        tensors, _ = _load_weight_file(shard_path)  # a shard is one file, never another index
        if not isinstance(tensors, Mapping):
            raise CheckpointError(f"shard {shard_path} does not hold a flat dict of tensors")
        expected = {k for k, v in weight_map.items() if v == shard}
        if set(tensors) != expected:
            missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
            raise CheckpointError(
                f"shard {shard_path} does not match {index_path.name}: missing {missing[:5]}, "
                f"unlisted {extra[:5]}"
            )
        state_dict.update(tensors)
    return state_dict


def _is_torchscript_archive(path: Path) -> bool:
    """A ``torch.jit.save`` file: a zip archive like ``torch.save``'s, plus the program's ``code/``
    and ``constants.pkl`` (which ``torch.load(weights_only=True)`` refuses with a page of advice)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/constants.pkl") for name in archive.namelist())
    except zipfile.BadZipFile:  # not a zip, or a damaged one: torch.load says what is wrong
        return False


def safe_torch_load(path: Path) -> Any:
    """``torch.load(path, weights_only=True)``, with one-line errors: unsafe pickle, or unreadable file.

    A pickle that names a Python object (``os.system``, a class …) would run code when loaded
    normally: torch's weights-only unpickler refuses it, and so do we, naming the object. Only
    :data:`SAFE_PICKLE_GLOBALS` (``argparse.Namespace``, a plain attribute bag) are allowed.
    """
    if _is_torchscript_archive(path):
        raise CheckpointError(
            f"{path} is a TorchScript export (a traced program, read by torch.jit.load), not a checkpoint: "
            f"use the checkpoint it was exported from"
        )
    if path.suffix.lower() == ".onnx":
        raise CheckpointError(
            f"{path} is an ONNX export, not a checkpoint: use the checkpoint it was exported from"
        )
    if path.suffix.lower() == ".json":  # a transformers folder's config.json, say
        raise CheckpointError(
            f"{path} is a JSON file, not a checkpoint: for a transformers folder, pass the folder that holds "
            f"{HF_CONFIG_FILE} and the weights"
        )
    try:
        with torch.serialization.safe_globals(SAFE_PICKLE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        if is_out_of_memory(err):  # a checkpoint this machine cannot hold, not a damaged one
            raise
        # torch's weights-only unpickler words a refusal "Unsupported global: GLOBAL os.system" or
        # "unsupported GLOBAL posix.system whose module posix is blocked", depending on the object
        unsafe = re.search(r"GLOBAL ([\w.]+)", str(err))
        if isinstance(err, pickle.UnpicklingError) and unsafe:
            raise CheckpointError(
                f"refused to load {path}: its pickle needs {unsafe.group(1)}, which could run code; "
                f"only tensors, containers and plain values are read (torch.load(weights_only=True)); "
                f"re-save the checkpoint with torch.save(model.state_dict()) if you trust it"
            ) from err
        # anything else: a truncated zip archive, random bytes, an unreadable file
        # torch's weights-only errors open with paragraphs of advice: keep the line that says what failed
        advice = ("Weights only load failed", "Please file an issue", "Check the documentation")
        lines = [ln.strip() for ln in str(err).splitlines()]
        lines = [ln for ln in lines if ln and not ln.startswith(advice)]
        detail = lines[0] if lines else "no detail"
        raise CheckpointError(
            f"checkpoint {path} is not a readable PyTorch or safetensors file (truncated or not a "
            f"checkpoint?): {type(err).__name__}: {detail}"
        ) from err


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def unwrap_state_dict(
    obj: Any, source: str | Path = "checkpoint", use_ema: bool = False
) -> tuple[dict[str, torch.Tensor], str | None]:
    """The flat tensor dict inside ``obj`` and the container key it was under (None if top level).

    Training checkpoints hold the weights under ``state_dict`` or ``model`` next to optimizer state;
    EMA weights (``ema``, ``model_ema``, ``state_dict_ema``) are taken when ``use_ema`` or when nothing else
    is there; ``use_ema`` without them (a bare state dict included) is a CheckpointError. Prefixes
    that wrappers add to every key (``module.``, ``_orig_mod.``) are removed.
    """
    nested_key = None
    if use_ema and _is_tensor_dict(obj):
        raise CheckpointError(
            f"{source} has no EMA weights: it holds one set of weights (a weight file or bare state "
            f"dict), not a training checkpoint with one of {list(EMA_STATE_DICT_KEYS)}"
        )
    if not _is_tensor_dict(obj):
        if not isinstance(obj, Mapping):
            raise CheckpointError(
                f"{source} holds a {type(obj).__name__}, not a state dict (a mapping of names to tensors)"
            )
        order = (
            (*EMA_STATE_DICT_KEYS, *STATE_DICT_KEYS) if use_ema else (*STATE_DICT_KEYS, *EMA_STATE_DICT_KEYS)
        )
        nested_key = next((k for k in order if _is_tensor_dict(obj.get(k))), None)
        if nested_key is None:
            shown = ", ".join(repr(k) for k in list(obj)[:8]) or "none"
            raise CheckpointError(
                f"{source} holds no state dict: expected a mapping of names to tensors, at the top level "
                f"or under one of {list(order)}; top-level keys: {shown}"
            )
        if use_ema and nested_key not in EMA_STATE_DICT_KEYS:
            # `cvt train` without --ema saves an empty "ema": say that none holds weights
            shown = ", ".join(repr(k) for k in list(obj)[:8])
            raise CheckpointError(
                f"{source} has no EMA weights: none of {list(EMA_STATE_DICT_KEYS)} holds a state dict "
                f"(top-level keys: {shown}); was it trained with EMA (cvt train --ema)?"
            )
        obj = obj[nested_key]
    state_dict = dict(obj)
    # torch.optim.swa_utils.AveragedModel (PyTorch's own EMA and SWA) keeps its update count beside the
    # weights of the model it wraps, ``module.*``
    if AVERAGED_MODEL_COUNT in state_dict and all(
        k.startswith("module.") for k in state_dict if k != AVERAGED_MODEL_COUNT
    ):
        del state_dict[AVERAGED_MODEL_COUNT]
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state_dict):
                state_dict = {k[len(prefix) :]: v for k, v in state_dict.items()}
                stripped = True
    return state_dict, nested_key


def detect_format(
    state_dict: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    source: Any = "checkpoint",
) -> str:
    """``cvt``, ``official`` or ``hf`` from the keys (and safetensors metadata); error if no CvT keys."""
    if any(k.startswith(_HF_KEY_PREFIX) for k in state_dict):
        return FORMAT_HF
    if any(_NATIVE_KEY.match(k) for k in state_dict):
        return FORMAT_NATIVE if metadata and NATIVE_FORMAT_KEY in metadata else FORMAT_OFFICIAL
    if any(k.startswith(_HF_BASE_KEY_PREFIX) for k in state_dict):
        raise CheckpointError(
            f"{source} holds the weights of a transformers CvtModel (keys 'encoder.stages...'): the "
            f"encoder without the final LayerNorm that every CvT here ends with; save the "
            f"CvtForImageClassification it came from instead"
        )
    shown = ", ".join(repr(k) for k in list(state_dict)[:4])
    raise CheckpointError(
        f"{source} holds no CvT weights: expected keys like 'stage0.patch_embed.proj.weight' (official) "
        f"or 'cvt.encoder.stages.0...' (Hugging Face), found {shown}"
    )


def _native_arch(metadata: Mapping[str, str], path: Path) -> dict[str, Any]:
    version = metadata.get(NATIVE_FORMAT_KEY)
    if version != NATIVE_FORMAT_VERSION:
        raise CheckpointError(
            f"{path} is a cvt checkpoint of format version {version}; this version of cvt reads "
            f"version {NATIVE_FORMAT_VERSION}"
        )
    try:
        arch = json.loads(metadata[NATIVE_ARCH_KEY])
    except (KeyError, json.JSONDecodeError) as err:
        raise CheckpointError(
            f"{path} has a missing or unreadable '{NATIVE_ARCH_KEY}' metadata entry"
        ) from err
    if not isinstance(arch, dict):
        raise CheckpointError(
            f"{path}: the '{NATIVE_ARCH_KEY}' metadata entry holds a JSON {type(arch).__name__}, expected an "
            f"object describing the model"
        )
    return arch


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is not a readable JSON file: {err}") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a JSON {type(data).__name__}, expected an object of settings")
    return data
