"""``TrainConfig``: every option of ``cvt train`` as plain data, and how YAML files and flags fill it.

Precedence, lowest first: the dataclass defaults → a YAML recipe (``--config FILE`` or the name of a
recipe shipped in ``cvt/configs``) → command-line flags. YAML keys and flags share their names
(``batch_size`` ↔ ``--batch-size``). Unknown keys and values of the wrong type raise
:class:`~cvt.errors.UsageError` naming the key, with a close match when there is one.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cvt.errors import UsageError, per_token_logits_error
from cvt.fileio import read_yaml_mapping

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

    from cvt.data.transforms import AugmentConfig

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "step", "multistep", "constant")
AMP_MODES = ("none", "bf16", "fp16")
# how one command treats the run folder's existing files, not how the run trains: config.yaml and
# checkpoints do not record them and YAML files cannot set them, so a reused config.yaml never
# replaces (overwrite) or mixes (resume) runs by itself
RUN_CONTROL = ("overwrite", "resume")
# create_model arguments a run sets from its own options (or that make no classifier): not model_args
RUN_MODEL_OPTIONS = {
    "num_classes", "img_size", "pretrained", "checkpoint_path", "features_only", "out_indices", "feature_cls",
}  # fmt: skip
# the seeds a run accepts: numpy's range (it is seeded with the seed modulo 2**32), and small enough for
# the data order's generator seed (seed x 1,000,003 + epoch) to stay within torch's 64 bits
SEED_LIMIT = 2**32


def _opt(default: Any, why: str) -> Any:
    """A dataclass field whose ``why`` is both the reason for its default and its ``--help`` text."""
    return field(default=default, metadata={"help": why})


@dataclass
class TrainConfig:
    """Every option of a training run; the run folder's ``config.yaml`` is this, fully resolved."""

    # ---- what to train
    model: str = _opt("cvt_tiny", "variant name (cvt list); cvt_tiny trains on a 2-core CPU in minutes")
    model_args: dict = field(
        default_factory=dict, metadata={"help": "model overrides KEY=VALUE, e.g. method=avg drop_path_rate=0"}
    )
    pretrained: bool = _opt(False, "start from the published weights of an arch.tag name")
    finetune: str = _opt("", "checkpoint to start from; a head of another class count is re-initialised")
    num_classes: int | None = _opt(None, "classifier outputs; default: the data set's class count")
    img_size: int | None = _opt(None, "training resolution; default: the variant's (32 for cvt_tiny)")
    # ---- data
    dataset: str = _opt("digits", "digits (bundled, no download) | cifar10 | cifar100 | imagefolder")
    data_dir: str = _opt("data", "root of the data set (cifar-10-batches-py, or train/ and val/)")
    download: bool = _opt(False, "allow torchvision to download CIFAR into --data-dir")
    skip_bad_images: bool = _opt(False, "skip unreadable ImageFolder files instead of stopping")
    workers: int = _opt(0, "data loader processes; 0 loads in the training process (exact resume)")
    train_subset: int | None = _opt(None, "train on N images of a fixed random subset (quick checks)")
    # ---- augmentation and regularisation (timm)
    auto_augment: str | None = _opt(None, "timm RandAugment policy, e.g. rand-m9-mstd0.5-inc1")
    re_prob: float = _opt(0.0, "random-erasing probability")
    hflip: float = _opt(0.0, "horizontal-flip probability (0 for digits: a flipped 2 is no digit)")
    random_crop: bool = _opt(True, "random crop: pad-and-crop up to 64 px (digits, CIFAR), RRC above")
    precrop: int = _opt(
        0,
        "with random_crop: resize to (size + precrop) square, then a random crop of size (32: the "
        "official fine-tuning crop); 0: the crop above",
    )
    scale: list[float] = field(
        default_factory=lambda: [0.08, 1.0],
        metadata={"help": "RandomResizedCrop area range (inputs > 64 px)"},
    )
    color_jitter: float | None = _opt(None, "colour-jitter strength")
    mixup: float = _opt(0.0, "mixup alpha (soft-target loss when > 0)")
    cutmix: float = _opt(0.0, "cutmix alpha (soft-target loss when > 0)")
    label_smoothing: float = _opt(0.0, "label smoothing of the cross-entropy (or of mixup targets)")
    # ---- optimisation
    epochs: int = _opt(30, "passes over the training set")
    batch_size: int = _opt(64, "images per process and step (global batch = batch_size x processes)")
    eval_batch_size: int | None = _opt(None, "validation batch; default: 2 x batch_size")
    optimizer: str = _opt("adamw", "adamw (the paper's) | sgd (the seed's)")
    lr: float = _opt(2e-3, "peak learning rate, for a global batch of lr_base_batch if that is set")
    lr_base_batch: int | None = _opt(None, "scale lr by global_batch / lr_base_batch (official recipes)")
    weight_decay: float = _opt(0.05, "decoupled (adamw) or L2 (sgd); never on biases, norms, tokens")
    momentum: float = _opt(0.9, "SGD momentum")
    nesterov: bool = _opt(False, "Nesterov momentum for SGD")
    sched: str = _opt("cosine", "per-step lr schedule: cosine | step | multistep | constant")
    warmup_epochs: float = _opt(2.0, "linear warm-up from warmup_lr (per step)")
    warmup_lr: float = _opt(1e-5, "learning rate at step 0 of the warm-up")
    min_lr: float = _opt(1e-5, "floor of the cosine schedule")
    decay_epochs: float = _opt(30.0, "step schedule: decay every this many epochs")
    decay_milestones: list[int] = field(
        default_factory=lambda: [30, 60, 90],
        metadata={"help": "multistep schedule: epochs at which lr decays"},
    )
    decay_rate: float = _opt(0.1, "step/multistep: lr factor at each decay")
    clip_grad: float | None = _opt(None, "clip the global gradient norm to this value")
    accum_steps: int = _opt(1, "micro-batches accumulated per optimizer step")
    ema: bool = _opt(False, "keep an exponential moving average of the weights (timm ModelEmaV3)")
    ema_decay: float = _opt(0.9998, "EMA decay per optimizer step")
    amp: str = _opt("none", "autocast dtype: none | bf16 (CPU and GPU) | fp16 (GPU, with a grad scaler)")
    compile: bool = _opt(False, "torch.compile the model")
    grad_checkpointing: bool = _opt(False, "recompute block activations in backward (saves memory)")
    sync_bn: bool = _opt(False, "synchronise BatchNorm statistics across GPUs (torchrun)")
    skip_nonfinite: bool = _opt(False, "skip steps with a NaN/Inf loss instead of stopping the run")
    # ---- run bookkeeping
    name: str = _opt("", "run name; default: <model>-<dataset>")
    output: str = _opt("", "run folder; default: runs/<name>")
    overwrite: bool = _opt(False, "replace the run files of an existing run folder (command line only)")
    resume: str = _opt(
        "", "continue from a last.pt, or 'auto' for <output>/last.pt when it exists (command line only)"
    )
    save_every_steps: int = _opt(0, "also write last.pt every N optimizer steps (exact mid-epoch resume)")
    seed: int = _opt(0, "seeds the weights, data order, augmentation and dropout (0 to 2**32 - 1)")
    deterministic: bool = _opt(False, "deterministic algorithms only (bit-exact reruns and resumes on CPU)")
    device: str = _opt("auto", "auto (cuda if available) | cpu | cuda | cuda:N")

    @property
    def run_name(self) -> str:
        """The run's name: ``name`` or ``<model>-<dataset>``."""
        return self.name or f"{self.model}-{self.dataset}"

    @property
    def run_dir(self) -> Path:
        """The run folder: ``output`` or ``runs/<run_name>``."""
        return Path(self.output) if self.output else Path("runs") / self.run_name

    def to_dict(self) -> dict[str, Any]:
        """Plain-data copy (YAML- and ``torch.load(weights_only=True)``-safe)."""
        return dataclasses.asdict(self)

    def recorded(self) -> dict[str, Any]:
        """:meth:`to_dict` without :data:`RUN_CONTROL`: what ``config.yaml`` and checkpoints keep."""
        return {k: v for k, v in self.to_dict().items() if k not in RUN_CONTROL}


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HINTS: dict[str, Any] = typing.get_type_hints(TrainConfig)


def run_model_kwargs(model_args: dict[str, Any] | None, img_size: int | None) -> dict[str, Any]:
    """The ``create_model`` arguments a run's options give besides variant and class count: its
    ``model_args`` and, when set, its input size. Training and rebuilding a run's checkpoint share it."""
    kwargs = dict(model_args or {})
    if img_size:
        kwargs["img_size"] = img_size
    return kwargs


def field_help(name: str, defaults: TrainConfig | None = None) -> str:
    """The ``--help`` text of an option: why, then the default value (``defaults``' when given, for a
    command with its own defaults) when it has one to show."""
    default = getattr(defaults or TrainConfig(), name)
    why = FIELDS[name].metadata["help"]
    if default is None or default == "" or default == {}:  # the help says what happens without it
        return why
    return f"{why} (default: {default})"


def field_type(name: str) -> Any:
    """The base type of an option with ``None`` stripped (``int | None`` → ``int``)."""
    hint = _HINTS[name]
    if isinstance(hint, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return typing.get_origin(hint) or hint


def list_item_type(name: str) -> type:
    """The item type of a list option (``list[float]`` → ``float``)."""
    (item,) = typing.get_args(_HINTS[name])
    return item


def _fits(value: Any, want: type) -> bool:
    """Whether ``value`` can stand for a ``want``: an int does for a float, a bool only for a bool."""
    if isinstance(value, bool):
        return want is bool
    return isinstance(value, want) or (want is float and isinstance(value, int))


def _check_value(key: str, value: Any) -> Any:
    """Return ``value`` converted to the option's type, or raise a UsageError naming the option."""
    hint = _HINTS[key]
    if value is None and isinstance(hint, types.UnionType) and type(None) in typing.get_args(hint):
        return None
    want = field_type(key)
    if want is list and isinstance(value, tuple):
        value = list(value)
    if not _fits(value, want):
        raise UsageError(
            f"option {key!r} must be of type {want.__name__}, got {value!r} ({type(value).__name__})"
        )
    if want is list:
        # the range checks of validate() compare the items: a string among them is refused here, by name
        item = list_item_type(key)
        bad = [v for v in value if not _fits(v, item)]
        if bad:
            raise UsageError(
                f"option {key!r} must be a list of {item.__name__}, got {value!r} "
                f"({bad[0]!r} is {type(bad[0]).__name__})"
            )
        return [float(v) for v in value] if item is float else value
    return float(value) if want is float else value


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, FIELDS, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def apply_overrides(cfg: TrainConfig, overrides: dict[str, Any], source: str) -> TrainConfig:
    """A copy of ``cfg`` with ``overrides`` applied; unknown keys and wrong types raise UsageError."""
    unknown = [k for k in overrides if k not in FIELDS]
    if unknown:
        named = ", ".join(f"{k!r}{_suggest(k)}" for k in unknown)
        raise UsageError(f"unknown option(s) in {source}: {named}")
    return dataclasses.replace(cfg, **{k: _check_value(k, v) for k, v in overrides.items()})


def recipe_names() -> list[str]:
    """Names of the YAML recipes shipped with the package (``cvt train --config NAME``)."""
    root = resources.files("cvt") / "configs"
    return sorted(p.name.removesuffix(".yaml") for p in root.iterdir() if p.name.endswith(".yaml"))


def read_yaml(path_or_name: str) -> dict[str, Any]:
    """The options of a YAML file, or of a shipped recipe given by name (``cvt13_in1k``)."""
    path = Path(path_or_name)
    source: Path | Traversable = path
    if not path.is_file():
        source = resources.files("cvt") / "configs" / f"{path.name.removesuffix('.yaml')}.yaml"
        if not source.is_file():
            raise UsageError(
                f"config {path_or_name!r} is neither a file nor a shipped recipe; recipes: "
                f"{', '.join(recipe_names())}"
            )
    return read_yaml_mapping(source, f"config {path_or_name!r}", "option: value pairs")


def augment_config(cfg: TrainConfig) -> AugmentConfig:
    """The run's augmentation and label-regularisation options (fields of the same names); raises
    UsageError, naming the option, for a value no run can use."""
    from cvt.data.transforms import AugmentConfig

    options = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(AugmentConfig)}
    return AugmentConfig(**{**options, "scale": tuple(cfg.scale)})


def validate(cfg: TrainConfig) -> TrainConfig:
    """Raise UsageError for values no run can use (zero epochs, a negative lr, an unknown optimizer)."""
    # NaN passes every range test below (all its comparisons are false) and inf every lower bound
    for key in FIELDS:
        value = getattr(cfg, key)
        items = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in items):
            raise UsageError(f"option {key!r} must be a finite number, got {value}")
    positive = ("epochs", "batch_size", "lr", "accum_steps")
    for key in positive:
        if getattr(cfg, key) <= 0:
            raise UsageError(f"option {key!r} must be > 0, got {getattr(cfg, key)}")
    for key in ("eval_batch_size", "lr_base_batch", "img_size", "num_classes", "clip_grad", "train_subset"):
        value = getattr(cfg, key)
        if value is not None and value <= 0:
            raise UsageError(f"option {key!r} must be > 0 when given, got {value}")
    for key in ("weight_decay", "warmup_epochs", "warmup_lr", "min_lr", "workers", "save_every_steps"):
        if getattr(cfg, key) < 0:
            raise UsageError(f"option {key!r} must be >= 0, got {getattr(cfg, key)}")
    if not 0 <= cfg.seed < SEED_LIMIT:  # beyond it: an internal "Overflow when unpacking long long"
        raise UsageError(f"option 'seed' must be in [0, {SEED_LIMIT - 1}], got {cfg.seed}")
    augment_config(cfg)  # the augmentation options, checked by AugmentConfig as the run builds it
    # timm's Mixup mixes each image with its mirror in the batch (x.flip(0)) and asserts an even batch:
    # refused here, before the data (CIFAR may download) and the model (pretrained weights may) are built
    if (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.batch_size % 2:
        raise UsageError(f"mixup/cutmix need an even batch size, got {cfg.batch_size}")
    if not 0 <= cfg.momentum < 1:  # 1 and above: the momentum buffer never forgets, the steps grow
        raise UsageError(f"option 'momentum' must be in [0, 1), got {cfg.momentum}")
    if cfg.optimizer == "sgd" and cfg.nesterov and cfg.momentum == 0:  # torch's SGD refuses it at build time
        raise UsageError(
            "option 'nesterov' needs a momentum > 0 (got momentum 0): drop --nesterov or set --momentum"
        )
    if not 0 <= cfg.ema_decay <= 1:
        raise UsageError(
            f"option 'ema_decay' is the weight of the old average per step and must be in [0, 1] "
            f"(0 copies the model, 1 keeps the starting weights), got {cfg.ema_decay}"
        )
    choices = {"optimizer": OPTIMIZERS, "sched": SCHEDULES, "amp": AMP_MODES}
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise UsageError(f"option {key!r} must be one of {', '.join(allowed)}, got {getattr(cfg, key)!r}")
    _validate_schedule(cfg)
    owned = sorted(set(cfg.model_args) & RUN_MODEL_OPTIONS)
    if owned:
        raise UsageError(
            f"model_args {', '.join(owned)}: set by the run itself (--num-classes, --img-size, --pretrained "
            f"…), or not a model for training; pass them as options"
        )
    if cfg.model_args.get("global_pool") == "":  # the loss takes one score per class and image
        raise per_token_logits_error("the model of model_args", "training")
    if cfg.overwrite and cfg.resume:
        raise UsageError("options 'overwrite' and 'resume' conflict: choose one")
    return cfg


def _validate_schedule(cfg: TrainConfig) -> None:
    """The lr schedule's options; those of one schedule only are checked when ``sched`` uses them."""
    if not 0 < cfg.decay_rate <= 1:
        raise UsageError(
            f"option 'decay_rate' is the factor the lr is multiplied by at each decay and must be in "
            f"(0, 1] (1: no decay), got {cfg.decay_rate}"
        )
    if cfg.sched == "step" and cfg.decay_epochs <= 0:
        raise UsageError(f"option 'decay_epochs' must be > 0 for sched step, got {cfg.decay_epochs}")
    milestones = cfg.decay_milestones
    # timm's multistep schedule counts the milestones passed by bisection: they must be sorted
    increasing = milestones == sorted(set(milestones))
    if cfg.sched == "multistep" and (not increasing or any(m <= 0 for m in milestones)):
        raise UsageError(
            f"option 'decay_milestones' must be epochs > 0 in increasing order for sched multistep, "
            f"got {milestones}"
        )
    # with lr_base_batch the peak is lr x global batch / lr_base_batch, and the global batch counts the
    # processes, known only when training starts: the floor can be compared with lr alone without it
    if cfg.sched == "cosine" and cfg.lr_base_batch is None and cfg.min_lr > cfg.lr:
        raise UsageError(
            f"option 'min_lr' is the floor the cosine schedule decays to from the peak 'lr' and must be "
            f"<= lr {cfg.lr}, got {cfg.min_lr}"
        )


def resolve_config(
    yaml_source: str | None, flags: dict[str, Any], base: TrainConfig | None = None, check: bool = True
) -> TrainConfig:
    """Defaults (or ``base``) ← the YAML file ``yaml_source`` ← ``flags``, validated unless ``check`` is
    False (each option's type is checked either way).

    :data:`RUN_CONTROL` keys of the YAML file are ignored (a ``config.yaml`` written before they were
    left out holds them): only flags set them.
    """
    cfg = base or TrainConfig()
    if yaml_source:
        options = {k: v for k, v in read_yaml(yaml_source).items() if k not in RUN_CONTROL}
        cfg = apply_overrides(cfg, options, f"config {yaml_source!r}")
    cfg = apply_overrides(cfg, flags, "the command line")
    return validate(cfg) if check else cfg
