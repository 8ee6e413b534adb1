"""Load any supported checkpoint into a model (strictly, with readable mismatch reports), or
rebuild a model from a file that describes its architecture."""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from timm.layers import to_2tuple

from cvt.checkpoint.hf import hf_input_settings, hf_label_names, hf_to_native, model_kwargs_from_hf_config
from cvt.checkpoint.native import architecture_of, inference_cfg, model_from_architecture
from cvt.checkpoint.read import (
    FORMAT_HF,
    FORMAT_NATIVE,
    HF_CONFIG_FILE,
    detect_format,
    read_state_dict,
    unwrap_state_dict,
)
from cvt.errors import CheckpointError, UsageError, first_names
from cvt.models.cvt import FIRST_CONV, CvT, check_act

HEAD_KEYS = ("head.weight", "head.bias")
STEM_WEIGHT = f"{FIRST_CONV}.weight"  # (embed_dim, in_chans, k, k)
_SHOWN = 5  # keys named per category in a mismatch message
_BLOCK_KEY = re.compile(r"^stage(\d+)\.blocks\.(\d+)\.")


def convert_state_dict(state_dict: Mapping[str, torch.Tensor], model: CvT) -> dict[str, torch.Tensor]:
    """Map a state dict of any supported layout onto ``model``'s native keys.

    Hugging Face keys are renamed; official and native keys pass as they are. BatchNorm
    ``num_batches_tracked`` counters that the model has and the checkpoint lacks are filled with 0
    (a step counter, not a weight: some exports drop it).
    """
    sd, _ = unwrap_state_dict(state_dict)
    if detect_format(sd) == FORMAT_HF:
        sd = hf_to_native(sd)
    for key, buf in model.state_dict().items():
        # only beside the BatchNorm's other statistics: a missing layer must stay missing
        stats = key.removesuffix("num_batches_tracked") + "running_mean"
        if key.endswith("num_batches_tracked") and key not in sd and stats in sd:
            sd[key] = torch.zeros_like(buf, device="cpu")
    return sd


@dataclass
class FitReport:
    """How a native state dict fits a model: keys missing, unexpected, and of another shape."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    # key -> (shape in the model, shape in the checkpoint)
    mismatched: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when every key matches in name and shape."""
        return not (self.missing or self.unexpected or self.mismatched)

    @property
    def head_only(self) -> bool:
        """True when the only differences are in the classifier head (another class count)."""
        bad = set(self.missing) | set(self.unexpected) | set(self.mismatched)
        return bool(bad) and bad <= set(HEAD_KEYS)


def check_fit(state_dict: Mapping[str, torch.Tensor], model: torch.nn.Module) -> FitReport:
    """Compare a native state dict with ``model``'s keys and shapes."""
    expected = model.state_dict()
    report = FitReport(
        missing=[k for k in expected if k not in state_dict],
        unexpected=[k for k in state_dict if k not in expected],
    )
    for key, value in state_dict.items():
        if key in expected and tuple(value.shape) != tuple(expected[key].shape):
            report.mismatched[key] = (tuple(expected[key].shape), tuple(value.shape))
    return report


def stage_signature(state_dict: Mapping[str, Any]) -> list[tuple[int, int]]:
    """``[(width, depth), ...]`` per stage, read off native keys: a fingerprint of the variant."""
    depth: dict[int, int] = {}
    for key in state_dict:
        m = _BLOCK_KEY.match(key)
        if m:
            depth[int(m[1])] = max(depth.get(int(m[1]), 0), int(m[2]) + 1)
    sig = []
    for i in range(len(depth)):
        proj = state_dict.get(f"stage{i}.patch_embed.proj.weight")
        sig.append((int(proj.shape[0]) if proj is not None else 0, depth.get(i, 0)))
    return sig


@lru_cache(maxsize=1)
def _variant_shapes() -> dict[str, dict[str, tuple[int, ...]]]:
    """Key → shape of every registered variant without its head, built once per process on ``meta``."""
    from cvt.models.variants import create_model, list_models

    shapes = {}
    for name in list_models():
        with torch.device("meta"):  # shapes only: even CvT-W24 allocates nothing
            candidate = create_model(name, num_classes=0)
        shapes[name] = {k: tuple(v.shape) for k, v in candidate.state_dict().items()}
    return shapes


def matching_variants(state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Registered variants whose keys and shapes (head aside) match a native state dict.

    Shapes cannot tell strides and paddings apart: ``cvt`` and ``cvt_13_cifar`` both match a CvT-13
    with a 3x3 stem. BatchNorm's ``num_batches_tracked`` counters are left out of the comparison: some
    exports drop them, and loading fills them in; so is the stem's input-channel count (a grayscale
    model of a variant is still that variant, rebuilt with :func:`infer_in_chans`).
    """

    def weights(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        kept = {k: v for k, v in shapes.items() if not k.endswith("num_batches_tracked")}
        if STEM_WEIGHT in kept:  # (embed_dim, in_chans, k, k): any input-channel count
            kept[STEM_WEIGHT] = kept[STEM_WEIGHT][:1] + kept[STEM_WEIGHT][2:]
        return kept

    wanted = weights({k: tuple(v.shape) for k, v in state_dict.items() if k not in HEAD_KEYS})
    return [name for name, shapes in _variant_shapes().items() if weights(shapes) == wanted]


def _fmt_keys(keys: list[str]) -> str:
    more = f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


def other_class_count(report: FitReport, state_dict: Mapping[str, torch.Tensor], model: CvT) -> int | None:
    """The class count of ``state_dict``'s head where a whole head for another number of classes is its
    only difference from ``model`` (0: no head); None otherwise (a head of another input width, a
    missing bias)."""
    if not report.head_only:
        return None
    n = infer_num_classes(state_dict)
    head = {k: tuple(state_dict[k].shape) for k in HEAD_KEYS if k in state_dict}
    whole = {"head.weight": (n, model.num_features), "head.bias": (n,)} if n else {}
    return n if head == whole and n != model.num_classes else None


def mismatch_message(
    report: FitReport, state_dict: Mapping[str, torch.Tensor], model: CvT, source: Any
) -> str:
    """One readable sentence (or a few) saying why ``state_dict`` does not fit ``model``."""
    n = other_class_count(report, state_dict, model)
    if n is not None:
        return (
            f"checkpoint {source} has a {n}-class head, the model has {model.num_classes} classes: build "
            f"the model with num_classes={n}, or keep a fresh head for fine-tuning with "
            f"load_checkpoint(model, ..., ignore_head=True) (cvt train: --finetune)"
        )
    parts = []
    if report.missing:
        parts.append(f"{len(report.missing)} missing key(s): {_fmt_keys(report.missing)}")
    if report.unexpected:
        parts.append(f"{len(report.unexpected)} unexpected key(s): {_fmt_keys(report.unexpected)}")
    if report.mismatched:
        shapes = [f"{k} (model {list(a)}, checkpoint {list(b)})" for k, (a, b) in report.mismatched.items()]
        parts.append(f"{len(shapes)} shape mismatch(es): {_fmt_keys(shapes)}")
    text = f"checkpoint {source} does not fit the model: " + "; ".join(parts)
    theirs, ours = stage_signature(state_dict), stage_signature(model.state_dict())
    if theirs and theirs != ours:
        like = matching_variants(state_dict)
        text += (
            f". It looks like another architecture: (width, depth) per stage {theirs} vs the model's {ours}"
            + (f"; it matches {' or '.join(like)}" if like else "")
        )
    if any(k.endswith("pos_embed") for k in report.mismatched):
        text += ". Position embeddings differ in size: build the model with the checkpoint's img_size"
    stem = report.mismatched.get(STEM_WEIGHT)
    if stem is not None and differs_in_input_channels(*stem):
        chans = stem[1][1]
        text += f". Its stem takes {chans} input channel(s): build the model with in_chans={chans}"
    return text


def differs_in_input_channels(ours: tuple[int, ...], theirs: tuple[int, ...]) -> bool:
    """Whether two conv weight shapes ``(out, in, kh, kw)`` differ in their input channels alone."""
    return len(ours) == len(theirs) == 4 and ours[:1] + ours[2:] == theirs[:1] + theirs[2:] and ours != theirs


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: CvT) -> dict[str, torch.Tensor]:
    """timm's ``pretrained_filter_fn``: :func:`convert_state_dict`, then a check of everything but the
    head (timm itself replaces a head of another class count), so that published weights that do
    not fit fail with a CheckpointError naming the keys rather than a RuntimeError inside timm.

    A stem conv (``first_conv`` of the pretrained cfg) that differs only in its input channels
    passes: timm adapts it to ``in_chans`` after this filter (``adapt_input_conv``).
    """
    sd = convert_state_dict(state_dict, model)
    report = check_fit({k: v for k, v in sd.items() if k not in HEAD_KEYS}, model)
    report.missing = [k for k in report.missing if k not in HEAD_KEYS]
    if STEM_WEIGHT in report.mismatched and differs_in_input_channels(*report.mismatched[STEM_WEIGHT]):
        del report.mismatched[STEM_WEIGHT]
    if not report.ok:
        raise CheckpointError(mismatch_message(report, sd, model, "pretrained weights"))
    return sd


@dataclass(frozen=True)
class LoadResult:
    """What :func:`load_checkpoint` did: the format read and the keys it left out."""

    format: str
    path: str | None
    skipped: tuple[str, ...] = ()  # keys not loaded (ignored head, or mismatches with strict=False)
    missing: tuple[str, ...] = ()  # model keys the checkpoint lacked (strict=False)


def load_checkpoint(
    model: CvT,
    source: str | Path | Mapping[str, torch.Tensor],
    strict: bool = True,
    ignore_head: bool = False,
    use_ema: bool = False,
    *,
    name: str | None = None,
) -> LoadResult:
    """Load a checkpoint file, Hugging Face directory or state dict of any supported format into ``model``.

    ``strict`` (default): every key must match in name and shape, else a CheckpointError names the
    differences. ``ignore_head``: keep the model's own head (fine-tuning on other classes).
    ``use_ema``: take the EMA weights of a training checkpoint. ``strict=False`` loads what fits
    and reports the rest in the returned :class:`LoadResult`. ``name``: what messages call a state
    dict given as a mapping (e.g. the file it was read from; default "state dict").
    """
    recorded = None  # the architecture the file records, if any
    if isinstance(source, Mapping):
        raw, _ = unwrap_state_dict(source, use_ema=use_ema)
        fmt, path = detect_format(raw), None
    else:
        raw, fmt, info = read_state_dict(source, use_ema=use_ema)
        path = info["path"]
        recorded = _recorded_architecture_of(fmt, info)
    label = path or name or "state dict"
    result = _load_converted(model, convert_state_dict(raw, model), fmt, path, label, strict, ignore_head)
    _warn_other_architecture(model, recorded, label)  # once the weights are in: their shapes fit
    return result


# stage fields that change no tensor's shape but what the stage computes (training-only rates left out)
_SHAPELESS_STAGE_FIELDS = (
    "num_heads", "patch_stride", "patch_padding", "method", "stride_q", "padding_q", "stride_kv",
    "padding_kv",
)  # fmt: skip
_SHAPELESS_MODEL_FIELDS = ("act", "norm_eps", "global_pool", "final_norm")


def _recorded_architecture_of(fmt: str, info: dict[str, Any]) -> dict[str, Any] | None:
    """The architecture a file records, as :func:`~cvt.checkpoint.native.architecture_of` describes a
    model: a ``cvt`` file's metadata, or a transformers folder's ``config.json``; None for files that
    record none (official state dicts)."""
    if fmt == FORMAT_NATIVE and "arch" in info:
        return info["arch"]
    if fmt == FORMAT_HF and "hf_config" in info:
        try:
            kwargs = model_kwargs_from_hf_config(info["hf_config"])
        except CheckpointError:  # a config load_model refuses: the weights still load, unchecked
            return None
        stages = [dataclasses.asdict(spec) for spec in kwargs["stages"]]
        return {"stages": stages, "act": kwargs["act"], "norm_eps": kwargs["norm_eps"]}
    return None


def _warn_other_architecture(model: CvT, recorded: dict[str, Any] | None, path: str) -> None:
    """Warn when the file at ``path`` records settings that its tensors' shapes do not show (heads,
    strides, the projection, the activation, LayerNorm eps, pooling) and ``model`` has others: the
    weights load, but into a network that computes something else."""
    if recorded is None:
        return
    mine = architecture_of(model)
    differ = [
        f"{key} {recorded[key]!r} (the model: {mine[key]!r})"
        for key in _SHAPELESS_MODEL_FIELDS
        if key in recorded and recorded[key] != mine[key]
    ]
    for i, (theirs, ours) in enumerate(zip(recorded.get("stages", []), mine["stages"], strict=False)):
        differ += [
            f"stage{i} {key} {theirs[key]!r} (the model: {ours[key]!r})"
            for key in _SHAPELESS_STAGE_FIELDS
            if key in theirs and theirs[key] != ours[key]
        ]
    if differ:
        warnings.warn(
            f"{path} records another architecture than the model it is loaded into: {first_names(differ)}; "
            f"its weights fit, but the model computes something else with them (load_model rebuilds the "
            f"file's own)",
            stacklevel=3,
        )


def _load_converted(
    model: CvT,
    sd: dict[str, torch.Tensor],
    fmt: str,
    path: str | None,
    label: str,
    strict: bool,
    ignore_head: bool,
    head_record: str | None = None,
) -> LoadResult:
    """:func:`load_checkpoint` from a state dict already in this package's key names. ``head_record``:
    where the file recorded the class count it built ``model`` from (a head of another size then means
    the file contradicts itself, which no option can fix)."""
    skipped = [k for k in HEAD_KEYS if k in sd] if ignore_head else []
    for k in skipped:
        del sd[k]
    report = check_fit(sd, model)
    if head_record is not None and other_class_count(report, sd, model) is not None:
        raise CheckpointError(
            f"checkpoint {label} has a {infer_num_classes(sd)}-class head but {head_record} is "
            f"{model.num_classes}: the file contradicts itself (edited by hand?)"
        )
    if ignore_head:
        report.missing = [k for k in report.missing if k not in HEAD_KEYS]
    if strict and not report.ok:
        raise CheckpointError(mismatch_message(report, sd, model, label))
    for k in [*report.unexpected, *report.mismatched]:
        skipped.append(k)
        del sd[k]
    own = model.state_dict()
    assign = any(t.is_meta for t in own.values())  # built on "meta": take the tensors
    if assign:
        # the model gets its own tensors in its own dtype, as a copy into its parameters would give:
        # an fp16 file still gives an fp32 model, and tensors read from a safetensors file are views
        # of its mapping at unaligned offsets (where the CPU kernels round differently) tied to the file
        for k, v in sd.items():
            dtype = own[k].dtype if v.is_floating_point() and own[k].is_floating_point() else v.dtype
            sd[k] = v.to(dtype, copy=True)
    model.load_state_dict(sd, strict=False, assign=assign)
    return LoadResult(fmt, path, tuple(skipped), tuple(report.missing))


def load_model(
    path: str | Path, model_name: str | None = None, act: str | None = None, use_ema: bool = False
) -> CvT:
    """Rebuild a model with its weights from a checkpoint alone, in eval mode.

    This project's safetensors files, ``cvt train`` checkpoints (``last.pt`` / ``best.pt``: variant,
    model arguments, class count, input size and class names from their ``config``) and Hugging
    Face directories (or their weight file beside ``config.json``) describe their architecture.
    Official state dicts do not: ``model_name`` names the variant to build (a tag such as
    ``cvt_13.msft_in1k_384`` sets the input size), by default the one registered variant whose keys
    and shapes match; the class count comes from the head. ``act`` sets the activation where the
    file does not record it (Hugging Face default: ``hidden_act`` if exported by this package, else
    QuickGELU, as the published weights need). ``use_ema``: the EMA weights of a training checkpoint.
    Weights stored in half precision are loaded into the model's float32 parameters.
    """
    return rebuild_model(path, model_name, act, use_ema)[0]


def rebuild_model(
    path: str | Path, model_name: str | None = None, act: str | None = None, use_ema: bool = False
) -> tuple[CvT, dict[str, Any]]:
    """:func:`load_model`, and what :func:`~cvt.checkpoint.read.read_state_dict` found in the file
    (``train_config`` and ``classes`` of a ``cvt train`` checkpoint among them)."""
    from cvt.models.variants import create_model

    sd, fmt, info = read_state_dict(path, use_ema=use_ema)
    source = info["path"]
    train_config = info.get("train_config")
    hf_config = info.get("hf_config") if fmt == FORMAT_HF else None
    describes_itself = train_config is not None or fmt == FORMAT_NATIVE or hf_config is not None
    # the variant name the file records, if any (HF configs and unnamed cvt files record none)
    if train_config is not None:
        recorded, what = str(train_config["model"]), f"a {train_config['model']} training checkpoint"
    else:
        recorded = info.get("arch", {}).get("variant") if fmt == FORMAT_NATIVE else None
        what = f"a {recorded} file" if recorded else "a file that records its architecture, no variant name"
    if model_name and describes_itself and not _same_architecture(model_name, recorded):
        another = "names another" if recorded else "cannot be checked against it"
        raise UsageError(
            f"{source} is {what}; model_name= (CLI: --model) {model_name!r} {another} (it is for "
            f"official state dicts)"
        )
    if act and (train_config is not None or fmt == FORMAT_NATIVE):
        raise UsageError(f"{source} records its activation; act= (CLI: --act) is for files that do not")
    if act:
        check_act(act)  # the caller's value: refused as theirs, not as the file's
    # on "meta": no random init, every tensor comes from the file
    record = None  # where the file records its class count, when it built the model from its own record
    if train_config is not None:
        with torch.device("meta"), _recorded_architecture(source, "its config"):
            model = _model_from_train_config(train_config, info["classes"])
        record = "its config's num_classes"
    elif fmt == FORMAT_NATIVE:
        with torch.device("meta"):
            model = model_from_architecture(info["arch"])
        record = "its cvt_arch metadata's num_classes"
    elif hf_config is not None:
        record = f"the id2label/num_labels of its {HF_CONFIG_FILE}"
        inputs = hf_input_settings(info.get("hf_preprocessor"))
        with torch.device("meta"), _recorded_architecture(source, f"its {HF_CONFIG_FILE}"):
            kwargs = model_kwargs_from_hf_config(hf_config, act, inputs.pop("img_size", 224))
            model = CvT(**kwargs)
        model.pretrained_cfg = _hf_pretrained_cfg(kwargs, hf_config, inputs)
    else:
        native = hf_to_native(sd) if fmt == FORMAT_HF else sd
        if model_name is None:
            like = matching_variants(native)
            if len(like) != 1:
                what = f"matches {' and '.join(like)}" if like else "matches no registered variant"
                raise CheckpointError(
                    f"{source} does not describe its architecture and {what}: pass model_name= "
                    f"(CLI: --model NAME), or build the model and use load_checkpoint"
                )
            model_name = like[0]
        with torch.device("meta"):
            model = create_model(
                model_name, num_classes=infer_num_classes(native), in_chans=infer_in_chans(native),
                **({"act": act} if act else {}),
            )  # fmt: skip
    native = convert_state_dict(sd, model)
    _load_converted(model, native, fmt, source, source, strict=True, ignore_head=False, head_record=record)
    return model.eval(), info


@contextmanager
def _recorded_architecture(source: str, record: str) -> Iterator[None]:
    """Turn a :class:`UsageError` of building the model that ``source`` describes in its own ``record``
    into a :class:`CheckpointError` naming the file: the value is the file's (edited by hand, or
    written by another version), not an option the caller gave."""
    try:
        yield
    except UsageError as err:
        raise CheckpointError(f"{source}: {record} describes a model that cannot be built: {err}") from None


def _model_from_train_config(config: dict[str, Any], classes: list[str] | None) -> CvT:
    """The model a ``cvt train`` run built (variant, ``model_args``, class count, input size), with the
    inference settings of that run: its class names, and no center crop on small-image data sets."""
    from cvt.data.transforms import SMALL_IMAGE_DATASETS
    from cvt.engine.config import run_model_kwargs
    from cvt.models.variants import create_model

    kwargs = run_model_kwargs(config.get("model_args"), config.get("img_size"))
    model = create_model(config["model"], num_classes=int(config["num_classes"]), **kwargs)
    cfg = dict(model.pretrained_cfg or {})
    if classes:
        cfg["label_names"] = list(classes)
    if config.get("dataset") in SMALL_IMAGE_DATASETS:
        cfg["crop_pct"] = 1.0  # as training evaluated it and `cvt predict` reads it (resolve_data_config)
    model.pretrained_cfg = cfg
    return model


def _same_architecture(name: str, recorded: str | None) -> bool:
    """Whether a variant name (``cvt_13`` or ``cvt_13.msft_in1k``) is the ``recorded`` one, tags aside."""
    return recorded is not None and name.split(".", 1)[0] == recorded.split(".", 1)[0]


def _hf_pretrained_cfg(
    kwargs: dict[str, Any], config: dict[str, Any], inputs: dict[str, Any]
) -> dict[str, Any]:
    """A timm ``pretrained_cfg`` for a model rebuilt from a transformers config and the preprocessing
    ``inputs`` (mean, std, crop) of its ``preprocessor_config.json``; ImageNet defaults otherwise."""
    cfg = inference_cfg(kwargs["in_chans"], to_2tuple(kwargs["img_size"]), kwargs["num_classes"], **inputs)
    names = hf_label_names(config)
    if names:
        cfg["label_names"] = names
    return cfg


def infer_num_classes(state_dict: Mapping[str, torch.Tensor]) -> int:
    """Classifier outputs of a native state dict (0 when it has no head)."""
    head = state_dict.get("head.weight")
    return int(head.shape[0]) if head is not None else 0


def infer_in_chans(state_dict: Mapping[str, torch.Tensor]) -> int:
    """Input channels of a native state dict: its stem's (3 when it has none)."""
    stem = state_dict.get(STEM_WEIGHT)
    return int(stem.shape[1]) if stem is not None and stem.dim() == 4 else 3
