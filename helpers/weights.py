"""Reading saved models, without Lightning: a training checkpoint or an export bundle back into a
YOLOv3 and its Config, and finding the checkpoint a user means.

- `load_model(path)`: a YOLOv3 (eval mode) and its Config from a `helpers.train` checkpoint (a full
  training state or an epoch's weights file) or a bundle folder. Checkpoints load with
  `torch.load(..., weights_only=True)`; bundles (safetensors + JSON) unpickle nothing.
- `read_bundle_config(folder)`, `load_bundle(folder)`: the bundle format `helpers.export` writes;
  `display_conf(info)`: the confidence threshold the app first shows a bundle's model at.
- `problem_with(path)`: None for a complete checkpoint, else what is wrong with it, in words.
- `find_latest(folder)`: the newest full state that loads; `resolve_checkpoint(spec)`: what
  'latest', a run folder, a checkpoint folder, a bundle or a file means.

`checkpoints` (Lightning's plumbing: writing, rotating, resuming) and `export` (writing bundles) both
read through this module and never import each other; the app imports only this side.
"""
from __future__ import annotations

import json
import os
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .config import ANCHORS, STRIDES, Config
from .model import YOLOv3, build_model

# A full training state's file name: epoch, global step, the schedule's LR, a version on a clash.
NAME = re.compile(r"epoch=(\d+)-step=(\d+)-lr=([0-9.e+-]+)(?:-v(\d+))?\.ckpt$")
# Settings added after checkpoints were first written, and what a run saved before them used (the
# course's loss, PyTorch's initialisation): a saved config is read with these, not with today's defaults.
SETTINGS_ADDED = {"train": {"obj_loss": "mse", "box_loss": "mse", "obj_target_min": 0.0,
                            "obj_balance": (1.0, 1.0, 1.0)},
                  "model": {"obj_prior": None}}
FORMAT = "yolov3-voc-bundle"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
# The confidence thresholds the app offers (its slider), and the one it starts at for a bundle that
# records none (bundles written before `display_conf`, or exported without data and without a value).
DISPLAY_CONF_MIN, DISPLAY_CONF_MAX, DISPLAY_CONF_STEP = 0.01, 0.99, 0.01
DEFAULT_DISPLAY_CONF = 0.4


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


class BundleError(ValueError):
    """A bundle (or its source) that cannot be used; the message names the file and the problem."""


# --- checkpoints --------------------------------------------------------------------------------
def step_of(path: Path) -> tuple[int, int]:
    """(global step, version) from a checkpoint's name; (-1, 0) for a name not ours."""
    m = NAME.search(path.name)
    return (int(m.group(2)), int(m.group(4) or 1)) if m else (-1, 0)


def problem_with(path: Path) -> str | None:
    """None if `path` is a complete checkpoint; else what is wrong, starting with "truncated" (not a
    complete zip archive: a write cut short, or a copy not fully synced), "unreadable" (an I/O error:
    e.g. Google Drive not mounted or not synced yet) or "not a checkpoint"."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
        if head != b"PK\x03\x04":
            return "not a checkpoint (not a PyTorch zip archive)" if head else "truncated (empty file)"
        try:
            with zipfile.ZipFile(path) as z:
                z.namelist()
        except zipfile.BadZipFile:
            return "truncated (incomplete zip archive)"
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return None
    except OSError as e:
        return f"unreadable (I/O error: {e.strerror or e})"
    except Exception as e:  # noqa: BLE001 - torch's zip reader or the weights-only unpickler refused it
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "zip" in text.lower() or "archive" in text.lower():
            return f"truncated ({text[:120]})"
        return f"not a checkpoint of helpers.train ({text[:120]})"


def find_latest(folder: str | os.PathLike) -> Path | None:
    """The full training state with the highest global step (then newest) in `folder` that loads;
    None if the folder has no checkpoint at all.

    Truncated newer ones are skipped with a warning naming them. Refused (`CheckpointError`): a
    folder whose checkpoints all fail to load (resuming must not silently start over), and any I/O
    error (a flaky Drive mount: resuming from an older state would silently redo work)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    try:
        candidates = sorted(folder.glob("*.ckpt"), key=lambda p: (step_of(p), p.stat().st_mtime), reverse=True)
    except OSError as e:
        raise CheckpointError(f"cannot list {folder} (I/O error: {e.strerror or e}); is the drive mounted? "
                              "Remount it and rerun") from None
    bad = []
    for path in candidates:
        problem = problem_with(path)
        if problem is None:
            if bad:
                warnings.warn("skipping checkpoints newer than " + path.name + ": "
                              + "; ".join(f"{p} is {why}" for p, why in bad), stacklevel=2)
            return path
        bad.append((path, problem))
        if problem.startswith("unreadable"):
            raise CheckpointError(
                f"{path} is {problem}; not resuming from an older state. Check that the drive is mounted "
                "and synced, then rerun (or pass --resume PATH to pick a checkpoint yourself)")
    if bad:
        raise CheckpointError(
            f"no checkpoint in {folder} loads: " + "; ".join(f"{p.name} is {why}" for p, why in bad)
            + ". Rerun with --resume PATH to pick one, or --start-fresh to set them aside and start over")
    return None


def resolve_checkpoint(spec: str | os.PathLike, run_dir: str | os.PathLike = "runs/default") -> Path:
    """The checkpoint a user means: 'latest' (the newest that loads in `run_dir`'s checkpoints), a run
    folder or a checkpoint folder (its newest that loads), an export bundle folder, or a file.
    Raises FileNotFoundError naming what was searched."""
    path = Path(run_dir) if str(spec) == "latest" else Path(spec)
    if path.is_file() or (path / CONFIG).is_file():  # a checkpoint file, or an export bundle
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not found (no such checkpoint, bundle or run folder)")
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    try:
        latest = find_latest(folder)
    except CheckpointError as e:  # checkpoints there, none readable: the callers' "not found", in one line
        raise FileNotFoundError(str(e)) from None
    if latest is None:
        raise FileNotFoundError(f"{folder}: no checkpoint that loads (train first, or give --checkpoint PATH)")
    return latest


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[YOLOv3, Config]:
    """A YOLOv3 (eval mode, on `map_location`) and its Config, from a Lightning checkpoint or an export
    bundle folder."""
    path = Path(path)
    if path.is_dir():
        return load_bundle(path, map_location=map_location)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - report any unreadable file the same clear way
        raise ValueError(f"{path}: not a readable checkpoint ({e})") from e
    try:
        config = saved_config(ckpt["hyper_parameters"]["config"])
        state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    except KeyError as e:
        raise ValueError(f"{path}: not a checkpoint of helpers.train (missing {e})") from None
    model = build_model(config.model)
    model.load_state_dict(state)
    return model.to(map_location).eval(), config


# --- bundles ------------------------------------------------------------------------------------
def read_json(path: Path, what: str) -> dict:
    """A JSON object from `path`; BundleError naming the file (and `what` it should hold) otherwise."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{path}: cannot read {what} ({e})") from None
    if not isinstance(data, dict):
        raise BundleError(f"{path}: {what} must be a JSON object, got {type(data).__name__}")
    return data


def read_bundle_config(path: str | os.PathLike) -> dict[str, Any]:
    """The bundle's `config.json`, checked for the fields the app relies on."""
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"{path}: not a bundle folder (expected {WEIGHTS} and {CONFIG} inside)")
    info = read_json(path / CONFIG, "bundle config") if (path / CONFIG).is_file() else None
    if info is None:
        raise BundleError(f"{path}: {CONFIG} missing; not a model bundle")
    if info.get("format") != FORMAT:
        raise BundleError(f"{path / CONFIG}: format is {info.get('format')!r}, expected {FORMAT!r}")
    if info.get("format_version", 0) > FORMAT_VERSION:
        raise BundleError(f"{path / CONFIG}: format version {info['format_version']} is newer than this code "
                          f"reads ({FORMAT_VERSION}); update the project")
    missing = [k for k in ("classes", "num_classes", "image_size", "width", "config") if k not in info]
    if missing:
        raise BundleError(f"{path / CONFIG}: missing {', '.join(missing)}")
    # The weights predict offsets from the anchors they were trained with; this code decodes with
    # config.ANCHORS at config.STRIDES, so a bundle made for others would give wrong boxes silently.
    if not _same_numbers(info.get("anchors", ANCHORS), ANCHORS) or not _same_numbers(info.get("strides", STRIDES),
                                                                                      STRIDES):
        raise BundleError(f"{path / CONFIG}: its model was trained with anchors {info.get('anchors')} at strides "
                          f"{info.get('strides')}, and this code decodes with {[list(map(list, s)) for s in ANCHORS]} "
                          f"at {list(STRIDES)}; export it again with the code it was trained with")
    return info


def _same_numbers(a, b, tol: float = 1e-6) -> bool:
    """Whether nested lists/tuples `a` and `b` have the same shape and numbers (to `tol`)."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_numbers(x, y, tol) for x, y in zip(a, b))
    return isinstance(a, (int, float)) and isinstance(b, (int, float)) and abs(a - b) <= tol


def saved_config(d: dict[str, Any]) -> Config:
    """The Config a checkpoint or bundle was written with: a setting it predates reads as what such
    runs used (`SETTINGS_ADDED`), every other missing field as today's default."""
    d = {section: dict(values) if isinstance(values, dict) else values for section, values in d.items()}
    for section, added in SETTINGS_ADDED.items():
        if isinstance(d.get(section, {}), dict):
            d[section] = {**added, **d.get(section, {})}
    return Config.from_dict(d)


def load_bundle(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[YOLOv3, Config]:
    """The YOLOv3 (eval mode) and its Config from a bundle folder; no pickle is read."""
    path = Path(path)
    info = read_bundle_config(path)
    try:
        config = saved_config(info["config"])
    except (TypeError, ValueError) as e:
        raise BundleError(f"{path / CONFIG}: bad 'config' ({e})") from None
    if not (path / WEIGHTS).is_file():
        raise BundleError(f"{path}: {WEIGHTS} missing")
    device = str(map_location) if isinstance(map_location, torch.device) else map_location
    try:
        state = load_file(str(path / WEIGHTS), device=device)
    except (SafetensorError, OSError, ValueError) as e:
        raise BundleError(f"{path / WEIGHTS}: cannot read weights ({e})") from None
    model = build_model(config.model)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise BundleError(f"{path / WEIGHTS}: weights do not fit a YOLOv3 with {config.model.num_classes} "
                          f"classes at width {config.model.width} ({str(e).splitlines()[0]})") from None
    return model.to(map_location).eval(), config


def display_conf(info: dict[str, Any]) -> tuple[float, str]:
    """(the confidence threshold to first show the bundle's model at, where that value came from in
    words) from a bundle's `config.json`: its `display_conf` and `display_conf_source` (written by
    `helpers.export`); DEFAULT_DISPLAY_CONF, said so, for a bundle without one or with an unusable one."""
    value = info.get("display_conf")
    if value is None:
        return DEFAULT_DISPLAY_CONF, "the app's default (this bundle records no threshold of its own)"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            DISPLAY_CONF_MIN <= value <= DISPLAY_CONF_MAX):
        return DEFAULT_DISPLAY_CONF, (f"the app's default (the bundle's display_conf {value!r} is not a number "
                                      f"from {DISPLAY_CONF_MIN} to {DISPLAY_CONF_MAX}, so it is not used)")
    return float(value), str(info.get("display_conf_source") or "recorded in the bundle (source not stated)")
