"""Typed configuration: the course's defaults in three dataclasses, plus the VOC classes and anchors.

Configuration is passed explicitly (no module-level mutable state): build a `Config`, change what
you need, hand it to the code that uses it.
"""
from __future__ import annotations

import difflib
import numbers
import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)

# (w, h) as fractions of the image side; 3 scales x 3 anchors, coarse (stride 32) to fine (stride 8).
ANCHORS: tuple[tuple[tuple[float, float], ...], ...] = (
    ((0.28, 0.22), (0.38, 0.48), (0.90, 0.78)),
    ((0.07, 0.15), (0.15, 0.11), (0.14, 0.29)),
    ((0.02, 0.03), (0.04, 0.07), (0.08, 0.06)),
)
# Pixels per grid cell of each scale, coarse to fine (the model's outputs are H/32, H/16, H/8).
STRIDES: tuple[int, ...] = (32, 16, 8)
# The clamp on the size logits tw, th before exp (loss and decode alike): exp(10) x anchor is far
# beyond any image, so no real box is cut, and extreme or fp16 logits never decode to inf.
MAX_LOG_SCALE: float = 10.0

# Loss variants (helpers.loss.YoloLoss): the course's object term is "mse", its box term "mse".
OBJ_LOSSES: tuple[str, ...] = ("mse", "bce")
BOX_LOSSES: tuple[str, ...] = ("mse", "giou", "diou", "ciou")

# The YOLOv3 paper's multi-scale range: 320 ... 608 in steps of 32.
MULTI_SCALE_SIZES: tuple[int, ...] = tuple(range(320, 609, 32))


@dataclass(frozen=True)
class AccuracyTargets:
    """The course's pass marks for its three accuracies (percent; helpers.metrics.YoloAccuracy at its
    0.05 threshold, over the evaluation split), which a student is graded on after ~40 epochs."""
    class_acc: float
    noobj_acc: float
    obj_acc: float


# The course's targets: the full model (Darknet-53 at width 1.0), and a reduced (narrower) model.
FULL_MODEL_TARGETS = AccuracyTargets(class_acc=80.0, noobj_acc=98.0, obj_acc=78.0)
REDUCED_MODEL_TARGETS = AccuracyTargets(class_acc=75.0, noobj_acc=95.0, obj_acc=70.0)


class ConfigError(ValueError):
    """A setting of another type or out of its range, in one line naming it and what it takes."""


def check_probability(name: str, value: float | None) -> float | None:
    """`value` if it is None or strictly between 0 and 1, else ConfigError naming the setting."""
    if value is not None:
        require(0.0 < value < 1.0, name, value, "a probability strictly between 0 and 1")
    return value


def require(holds: bool, name: str, value: Any, expected: str) -> None:
    """ConfigError in one line naming the setting, its value and what it takes, unless `holds`: the
    command line prints it as the parser's error, so a value out of range never reaches a traceback."""
    if not holds:
        raise ConfigError(f"{name} {value}: expected {expected}")


def _image_side(size: Any) -> bool:
    return isinstance(size, numbers.Integral) and not isinstance(size, bool) and size > 0 and size % STRIDES[0] == 0


@dataclass
class ModelConfig:
    num_classes: int = 20
    width: float = 1.0  # channel multiplier; 1.0 is the course's Darknet-53 (61.6 M parameters)
    # Every cell's objectness starts near this probability (its bias the logit; RetinaNet's prior
    # initialisation), under the course's 0.05, instead of 0.5 everywhere; None: PyTorch's init, the
    # course's. 0.01 clears all three targets and mAP on every seed of the memorise protocol where None
    # missed on 2 of 6 (benchmarks/RESULTS.md, "The graded accuracies").
    obj_prior: float | None = 0.01

    def __post_init__(self):
        require(self.num_classes >= 1, "num_classes", self.num_classes, "at least 1")
        require(self.width > 0, "width", self.width, "a positive channel multiplier (1.0 is the full model)")
        check_probability("obj_prior", self.obj_prior)

    @property
    def accuracy_targets(self) -> AccuracyTargets:
        """The course's targets for this model: the full model's at width >= 1, the reduced model's below."""
        return FULL_MODEL_TARGETS if self.width >= 1.0 else REDUCED_MODEL_TARGETS


@dataclass
class DataConfig:
    root: str | None = None  # a VOCdevkit folder or a Kaggle/course folder; None = synthetic data
    # None = the layout's own: VOCdevkit trainval / test, the course's Kaggle CSVs train / test.
    train_split: str | None = None
    val_split: str | None = None
    image_size: int = 416  # val/test size
    train_sizes: tuple[int, ...] = MULTI_SCALE_SIZES  # one drawn per training batch
    batch_size: int = 16
    num_workers: int = 2
    mosaic: float = 0.75  # fraction of training samples built as a 4-image mosaic
    keep_difficult: bool = False  # difficult objects in the training targets
    pin_memory: bool = True
    classes: tuple[str, ...] = VOC_CLASSES
    # A broken annotation (malformed XML, unknown class, missing image): "skip" leaves that image out
    # with a warning naming the file (a training run never stops on one bad file), "raise" refuses the
    # dataset with every problem listed (`python -m helpers.annotations check` lists them too).
    on_error: str = field(default="skip", metadata={"choices": ("skip", "raise")})

    def __post_init__(self):
        side = f"a positive multiple of {STRIDES[0]} (the model's coarsest stride)"
        require(_image_side(self.image_size), "image_size", self.image_size, side)
        sizes = self.train_sizes
        require(isinstance(sizes, (tuple, list)) and len(sizes) > 0 and all(map(_image_side, sizes)), "train_sizes",
                list(sizes) if isinstance(sizes, (tuple, list)) else sizes, f"a list of one or more sizes, each {side}")
        require(self.batch_size >= 1, "batch_size", self.batch_size, "at least 1")
        require(self.num_workers >= 0, "num_workers", self.num_workers, "0 (load in the main process) or more")
        require(0.0 <= self.mosaic <= 1.0, "mosaic", self.mosaic, "a fraction of training samples, 0 to 1")


@dataclass
class TrainConfig:
    epochs: int = 40
    max_lr: float = 1e-3
    weight_decay: float = 1e-4
    optimizer: str = "adam"  # adam | adamw | sgd
    # OneCycle, as the course's Lightning port sets it up (warm up over the first 5 of 40 epochs).
    pct_start: float = 5 / 40
    div_factor: float = 100.0
    final_div_factor: float = 100.0
    anneal_strategy: str = "linear"
    three_phase: bool = False
    precision: str = "16-mixed"  # falls back on machines without CUDA (see helpers.train)
    accelerator: str = "auto"
    devices: int = 1
    strategy: str = "auto"
    # The loss (helpers.loss). Ours by default, chosen so the course's graded accuracies and mAP hold
    # together (benchmarks/RESULTS.md, "The graded accuracies"); COURSE_LOSS below is the course's.
    lambda_class: float = 1.0
    lambda_noobj: float = 100.0  # the course's: 10
    lambda_obj: float = 1.0
    lambda_box: float = 10.0
    # "bce" objectness learns real photos where the course's "mse" does not (RESULTS.md, "Learning").
    obj_loss: str = field(default="bce", metadata={"choices": OBJ_LOSSES})
    box_loss: str = field(default="mse", metadata={"choices": BOX_LOSSES})
    obj_target_min: float = 1.0  # a positive's objectness target is max(IoU, this): 0 the course's, 1 the paper's
    # per-scale weights of the object and no-object terms, coarse to fine (the course's: all 1)
    obj_balance: tuple[float, ...] = (0.4, 1.0, 4.0)
    # evaluation
    conf_threshold: float = 0.05
    nms_iou: float = 0.45
    map_iou: float = 0.5
    accuracy_every: int = 1  # epochs between validation accuracies
    map_every: int = 0  # epochs between mAP runs; 0 = last epoch only
    # checkpoints
    run_dir: str = "runs/default"
    checkpoint_dir: str | None = None  # defaults to <run_dir>/checkpoints (a Drive folder on Colab)
    checkpoint_every_minutes: float = 0.0  # 0 = only at epoch ends
    keep_last_k: int = 0  # 0 = keep all
    ema: bool = False
    seed: int = 42
    # an int: that many batches; a float: that fraction (Lightning's). int first: "10" on the command line is 10 batches.
    limit_train_batches: int | float | None = None
    limit_val_batches: int | float | None = None

    def __post_init__(self):
        require(self.epochs >= 1, "epochs", self.epochs, "at least 1")
        for name in ("max_lr", "div_factor", "final_div_factor"):
            require(getattr(self, name) > 0, name, getattr(self, name), "a positive number")
        require(0.0 < self.pct_start < 1.0, "pct_start", self.pct_start, "the warm-up's fraction of the run, between 0 and 1")
        for name in ("weight_decay", "lambda_class", "lambda_noobj", "lambda_obj", "lambda_box",
                     "checkpoint_every_minutes", "keep_last_k", "accuracy_every", "map_every"):
            require(getattr(self, name) >= 0, name, getattr(self, name), "0 or more")
        require(0.0 <= self.obj_target_min <= 1.0, "obj_target_min", self.obj_target_min, "0 to 1")
        require(len(self.obj_balance) == len(STRIDES) and min(self.obj_balance) >= 0, "obj_balance",
                list(self.obj_balance), f"{len(STRIDES)} weights of 0 or more, coarse scale to fine")
        require(0.0 <= self.conf_threshold < 1.0, "conf_threshold", self.conf_threshold, "0 or more, under 1")
        require(0.0 <= self.nms_iou <= 1.0, "nms_iou", self.nms_iou, "an IoU, 0 to 1")
        require(0.0 < self.map_iou <= 1.0, "map_iou", self.map_iou, "an IoU above 0, at most 1")


# The course's loss, every setting of it (TrainConfig's defaults are ours: benchmarks/RESULTS.md, "The
# graded accuracies"): `TrainConfig(**COURSE_LOSS)`, or `--course-loss` on the command line.
COURSE_LOSS: dict[str, Any] = {"obj_loss": "mse", "box_loss": "mse", "obj_target_min": 0.0,
                               "obj_balance": (1.0, 1.0, 1.0), "lambda_class": 1.0, "lambda_noobj": 10.0,
                               "lambda_obj": 1.0, "lambda_box": 10.0}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain types only, so a checkpoint holding it loads with `weights_only=True`."""
        return _plain(asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        """The Config that `d` (JSON's types: a checkpoint's, a bundle's or a --config file's) describes;
        a missing field takes its default. ConfigError, in one line naming the field and what it
        takes, for an unknown section or field or a value of another type: an int is taken where a
        float is expected and a list where a tuple is, nothing else is converted."""
        if not isinstance(d, dict):
            raise ConfigError(f"expected an object with model, data and train sections, got {type(d).__name__}")
        kinds = typing.get_type_hints(cls)  # section name -> its dataclass
        for section, values in d.items():
            if section not in kinds:
                raise ConfigError(f"unknown section {section!r} (expected {', '.join(kinds)})")
            if not isinstance(values, dict):
                raise ConfigError(f"section {section!r} must be an object, got {type(values).__name__}")
        return cls(**{section: _build(kind, section, d.get(section, {})) for section, kind in kinds.items()})

    def updated(self, changes: dict[str, Any]) -> Config:
        """A new Config: this one with the fields `changes` sets (`{section: {field: value}}`, any
        subset, JSON's types) replaced, checked as `from_dict` checks them."""
        if not isinstance(changes, dict):
            return Config.from_dict(changes)  # refused there, in its words
        merged = self.to_dict()
        for section, values in changes.items():
            merged[section] = {**merged.get(section, {}), **values} if isinstance(values, dict) else values
        return Config.from_dict(merged)


def field_types(kind: type) -> dict[str, Any]:
    """The resolved type of each field of the dataclass `kind` (a `Literal` of its choices where the
    field's metadata names some)."""
    hints = typing.get_type_hints(kind)
    return {f.name: typing.Literal[tuple(f.metadata["choices"])] if "choices" in f.metadata else hints[f.name]
            for f in fields(kind)}


def type_name(kind: Any) -> str:
    """A field type as a user writes its values: `int`, `int | float | null`, `list of int`, `one of 'mse', 'bce'`."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if isinstance(kind, types.UnionType) or origin is typing.Union:
        return " | ".join(type_name(a) for a in args)
    if origin is tuple:
        return f"list of {type_name(args[0])}"
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, args))
    return "null" if kind is type(None) else kind.__name__


def _checked(value: Any, kind: Any, name: str) -> Any:
    """`value` as a value of the field type `kind`, or ConfigError naming the field `name`. A value of
    one of the types a union names is kept as it is (10 stays an int for `float | int`)."""
    union = isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union
    options = typing.get_args(kind) if union else (kind,)
    for option in options:  # the value's own type first
        if type(value) is option or option is type(None) and value is None:
            return value
        if typing.get_origin(option) is typing.Literal and isinstance(value, str) and value in typing.get_args(option):
            return value
    for option in options:  # then the two conversions JSON needs (never from a bool: JSON's true is no number)
        if option is float and type(value) is int:
            return float(value)
        if typing.get_origin(option) is tuple and isinstance(value, (list, tuple)):
            return tuple(_checked(v, typing.get_args(option)[0], f"{name}[{k}]") for k, v in enumerate(value))
    raise ConfigError(f"{name}: expected {type_name(kind)}, got {value!r} ({type(value).__name__})")


def _build(kind: type, section: str, values: dict[str, Any]):
    known = field_types(kind)
    for name in values:
        if name not in known:
            near = difflib.get_close_matches(name, known, n=1)
            raise ConfigError(f"unknown {section} field {name!r}" + (f" (did you mean {near[0]!r}?)" if near else ""))
    return kind(**{name: _checked(v, known[name], f"{section}.{name}") for name, v in values.items()})


def _plain(x: Any) -> Any:
    if is_dataclass(x):
        return _plain(asdict(x))
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x
