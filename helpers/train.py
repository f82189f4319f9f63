"""`python -m helpers.train`: the main job.

With no arguments: the embedded default, a small model on generated data (coloured shapes with
VOC class names), on CPU, in a few minutes. With `--data PATH --preset course`: the course's
40-epoch 16-bit run on a VOCdevkit or the Kaggle/course layout. Rerun the same command after a
disconnect with `--resume latest` and it continues from the newest checkpoint that loads, on the
same line of the saved schedule file.

Every field of the config dataclasses is a flag (`--epochs 40`, `--batch-size 16`, `--width 0.5`,
`--train-sizes 320,352,...`), parsed as the field's type. Settings come from the preset, then a
`--config FILE.json` (any subset of `{model: {...}, data: {...}, train: {...}}`), then the flags:
each overrides the one before.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import types
import typing
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.rank_zero import rank_zero_only

from .annotations import find_dataset
from .checkpoints import (
    NoOverwriteCheckpointIO,
    PeriodicCheckpoint,
    check_resumable,
    remove_temporaries,
    set_aside,
    storage_plan,
)
from .config import Config, DataConfig, ModelConfig, TrainConfig
from .datamodule import YOLODataModule
from .errors import USER_ERRORS
from .module import YOLOModule, build_optimizer
from .schedule import OneCycleSpec, Schedule, limited_steps, one_cycle_settings
from .storage import free_bytes, human
from .weights import find_latest

SCHEDULE_FILE = "schedule.txt"
# CSV rows are appended to metrics.csv every LOG_FLUSH_STEPS steps: a kill loses at most the rows since
# (and a resume redoes the steps after its checkpoint, so curves keep no gap). An append a step is cheap.
LOG_FLUSH_STEPS = 1


def embedded_default() -> Config:
    """A run that shows every part working on a 2-core CPU in a few minutes (loss: TrainConfig's default)."""
    return Config(
        model=ModelConfig(num_classes=20, width=0.25),
        data=DataConfig(root=None, image_size=160, train_sizes=(128, 160, 192), batch_size=8, num_workers=2,
                        mosaic=0.5),
        train=TrainConfig(epochs=8, max_lr=2e-3, pct_start=0.2, precision="32-true", run_dir="runs/default",
                          checkpoint_every_minutes=1.0, keep_last_k=2, map_every=4),
    )


def course_preset() -> Config:
    """The course's run: full Darknet-53, 40 epochs, batch 16, 16-bit, 320-608 training sizes.

    Storage: a full training state every 20 minutes and at each epoch end, the last two kept, plus
    each epoch's weights alone (fp16): within a free Google Drive (15 GB, shared with Gmail and
    Photos); the sizes are in benchmarks/RESULTS.md ("Checkpoint storage") and `storage_plan` prints
    them before a run. Its loss is TrainConfig's default, BCE objectness, not the course's MSE one,
    which learns no objectness on real photos (benchmarks/RESULTS.md, "Learning real photos");
    `--obj-loss mse` restores it."""
    return Config(train=TrainConfig(run_dir="runs/course", checkpoint_every_minutes=20.0, keep_last_k=2))


PRESETS = {"default": embedded_default, "course": course_preset}


# --- command line -----------------------------------------------------------------------------
def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_value(kind, text: str):
    """`text` as a value of the type `kind` (a resolved annotation of a config field): bool, int,
    float, str, `tuple[X, ...]` (comma-separated) or a union of them (`None` from "none"; an int
    before a float before a str, the first that parses)."""
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        options = typing.get_args(kind)
        if type(None) in options and text.lower() == "none":
            return None
        ranked = sorted((o for o in options if o is not type(None)), key=lambda o: (int, float, bool, str).index(o)
                        if o in (int, float, bool, str) else 4)
        for option in ranked:
            try:
                return _parse_value(option, text)
            except (ValueError, argparse.ArgumentTypeError):
                continue
        raise argparse.ArgumentTypeError(f"expected {_type_name(kind)}, got {text!r}")
    if typing.get_origin(kind) is tuple:
        item = typing.get_args(kind)[0]
        return tuple(_parse_value(item, v.strip()) for v in text.split(",") if v.strip())
    if kind is bool:
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
        return text.lower() in ("true", "1", "yes")
    if kind in (int, float, str):
        return kind(text)
    raise TypeError(f"no command-line parser for a setting of type {kind!r}")


def _type_name(kind) -> str:
    """What a flag takes, for its help and its errors: INT, FLOAT|INT|NONE, INT,INT,..."""
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        return "|".join(_type_name(o) for o in typing.get_args(kind))
    if typing.get_origin(kind) is tuple:
        item = _type_name(typing.get_args(kind)[0])
        return f"{item},{item},..."
    return "NONE" if kind is type(None) else kind.__name__.upper()


def _parser_for(kind):
    def parse(text: str):
        return _parse_value(kind, text)

    parse.__name__ = _type_name(kind)  # argparse names it in "invalid ... value"
    return parse


def _merge(base: dict, file: dict) -> dict:
    """`base` (a Config's dict) with the sections and fields `file` sets replaced; an unknown section
    refused (an unknown field is refused by Config.from_dict)."""
    if not isinstance(file, dict):
        raise ValueError(f"expected a JSON object with model, data and train sections, got {type(file).__name__}")
    merged = {section: dict(values) for section, values in base.items()}
    for section, values in file.items():
        if section not in merged:
            raise ValueError(f"unknown section {section!r} (expected {', '.join(merged)})")
        if not isinstance(values, dict):
            raise ValueError(f"section {section!r} must be a JSON object, got {type(values).__name__}")
        merged[section].update(values)
    return merged


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m helpers.train",
        description="Train YOLOv3 from scratch on PASCAL VOC (or the embedded generated data).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  python -m helpers.train                                  # embedded default, CPU, minutes\n"
               "  python -m helpers.train --data ~/VOCdevkit --preset course --run-dir /content/drive/MyDrive/yolo\n"
               "  python -m helpers.train --data ~/VOCdevkit --preset course --run-dir ... --resume latest\n",
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="default",
                   help="starting configuration: 'default' (small, CPU, generated data) or 'course' (the 40-epoch run)")
    p.add_argument("--config", type=Path, help="JSON file with any of {model: {...}, data: {...}, train: {...}}: what it sets overrides the "
                        "preset, and flags override it")
    p.add_argument("--data", dest="root", help="dataset folder: a VOCdevkit or the Kaggle/course layout")
    p.add_argument("--resume", help="'latest' (newest checkpoint that loads in the checkpoint folder) or a path")
    p.add_argument("--start-fresh", action="store_true",
                   help="start over on purpose: move the checkpoint folder's files into a set-aside-* subfolder first")
    p.add_argument("--lr-find", action="store_true",
                   help="run the LR range test first and use its suggestion as max LR (see helpers.lr_finder)")
    p.add_argument("--checkpoint-every-steps", type=int, default=0,
                   help="also checkpoint every N optimizer steps (0 = off)")
    for section, kind in (("model", ModelConfig), ("data", DataConfig), ("train", TrainConfig)):
        group = p.add_argument_group(f"{section} settings ({kind.__name__})")
        hints = typing.get_type_hints(kind)  # the fields' types, resolved from their annotations
        for f in dataclasses.fields(kind):
            if f.name in ("root", "classes"):
                continue
            group.add_argument(_flag(f.name), dest=f"{section}.{f.name}", metavar=_type_name(hints[f.name]),
                               type=_parser_for(hints[f.name]),
                               choices=f.metadata.get("choices"),
                               help="default: the preset's, or the --config file's")
    return p


def config_from_args(args: argparse.Namespace) -> Config:
    """The preset, then what the --config file sets, then the flags given: each overrides the one before."""
    settings = PRESETS[args.preset]().to_dict()
    if args.config:
        settings = _merge(settings, json.loads(args.config.read_text()))
    cfg = Config.from_dict(settings)
    if args.root:
        cfg.data.root = str(args.root)
    for key, value in vars(args).items():
        if "." in key and value is not None:
            section, name = key.split(".")
            setattr(getattr(cfg, section), name, value)
    return cfg


# --- the run ----------------------------------------------------------------------------------
def choose_precision(requested: str) -> str:
    """16-bit on CUDA as asked; elsewhere fall back and say why."""
    if requested.startswith("16") and not torch.cuda.is_available():
        print(f"precision: {requested} needs a CUDA GPU and none is available; training in 32-true "
              "(bf16 on a CPU is slower than fp32 for this model)")
        return "32-true"
    return requested


def prepare_schedule(cfg: Config, run_dir: Path, steps_per_epoch: int, dataset_length: int,
                     max_lr: float | None = None, max_lr_source: str | None = None) -> Schedule:
    """Read the run's schedule file, or compute and write it; refuse one made for another run.

    steps_per_epoch: the training loader's batches per epoch and process; `limit_train_batches` is
    applied here. max_lr: None for the config's; a value chosen at the start (the LR range test's) is
    recorded as such ("given"), and a resume keeps it instead of comparing it with the config's."""
    path = run_dir / SCHEDULE_FILE
    t = cfg.train
    steps = limited_steps(steps_per_epoch, t.limit_train_batches)
    if max_lr is None:
        max_lr = t.max_lr
    source = max_lr_source or ("config" if max_lr == t.max_lr else "given")
    settings = {**one_cycle_settings(t), "max_lr": max_lr}
    if path.exists():
        schedule = Schedule.read(path)
        schedule.check_matches(cfg.data.batch_size, steps, path, **settings)
        rank_zero_only(print)(f"schedule: reusing {path} ({schedule.spec.total_steps} steps, max LR "
                              f"{schedule.spec.max_lr:.3g})")
        return schedule
    spec = OneCycleSpec(steps_per_epoch=steps, batch_size=cfg.data.batch_size, dataset_length=dataset_length,
                        max_lr_source=source, **settings)
    schedule = Schedule.compute(spec)
    schedule.write(path)
    rank_zero_only(print)(f"schedule: wrote {path} ({spec.total_steps} steps = {t.epochs} epochs x {steps})")
    return schedule


def lr_range_test(cfg: Config, datamodule):
    """The LR range test for `cfg` (its model, optimizer and loss weights) on the real training
    loader, on the GPU with fp16 where there is one: a `helpers.lr_finder.LRFinderResult`."""
    from .lr_finder import find_lr

    module = YOLOModule(cfg.to_dict())
    cuda = torch.cuda.is_available()
    optimizer = build_optimizer(module.model.parameters(), cfg.train, cfg.train.max_lr)
    return find_lr(module.model, optimizer, datamodule.train_dataloader(), loss=module.loss_fn,
                   num_iter=100, device="cuda" if cuda else "cpu", amp=cuda)


def run_lr_finder(cfg: Config, datamodule, run_dir: Path) -> float:
    from .lr_finder import describe_choice
    from .plotting import plot_lr_finder

    result = lr_range_test(cfg, datamodule)
    plot_lr_finder(result.lrs, result.smoothed, result.max_lr, raw=result.losses, steepest=result.steepest
                   ).savefig(run_dir / "lr_finder.png", dpi=100)
    if result.max_lr is None:
        print(f"LR finder: no suggestion (too few points, or the loss never fell); keeping max LR "
              f"{cfg.train.max_lr:.3g}")
        return cfg.train.max_lr
    print(f"LR finder: max LR {result.max_lr:.3g} ({describe_choice(result)}); plot: {run_dir / 'lr_finder.png'}")
    return result.max_lr


def resolve_resume(resume: str | None, ckpt_dir: Path, cfg: Config) -> Path | None:
    """The checkpoint to resume from, checked against this run (CheckpointError, one line, if it
    cannot be used): 'latest' = the newest full state in `ckpt_dir` that loads (None: there is
    none, a fresh start), else a path."""
    if not resume:
        return None
    path = find_latest(ckpt_dir) if resume == "latest" else Path(resume)
    if path is None:
        rank_zero_only(print)(f"resume: no checkpoint in {ckpt_dir}; starting fresh")
        return None
    check_resumable(path, cfg)
    rank_zero_only(print)(f"resume: {path}")
    return path


def finished_summary(run_dir: Path, ckpt_path: Path | None) -> dict | None:
    """The summary of a run that already ended (metrics.json written after the checkpoint's final
    step), or None: what a rerun of `train` on a finished run returns instead of training."""
    summary_file, schedule_file = run_dir / "metrics.json", run_dir / SCHEDULE_FILE
    if ckpt_path is None or not summary_file.is_file() or not schedule_file.is_file():
        return None
    step = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True).get("global_step", -1)
    try:
        summary = json.loads(summary_file.read_text())
    except (OSError, ValueError):
        return None
    total = Schedule.read(schedule_file).spec.total_steps
    return summary if step >= total and summary.get("global_step") == step else None


def storage_report(plan, folder: Path, free: int) -> str:
    """What the run's checkpoints will take, and a warning when `free` bytes fall short."""
    text = plan.describe(folder)
    if free < plan.full_state + plan.weights:
        text += (f"\nwarning: only {human(free)} free in {folder}, short of the next save (~{human(plan.full_state)}"
                 " full state + weights): free some space first (on Google Drive, empty the Trash)")
    elif free < plan.total:
        text += f"\nwarning: {human(free)} free in {folder}; this run may need up to {human(plan.total)}"
    return text


def train(cfg: Config, resume: str | None = None, lr_find: bool = False, checkpoint_every_steps: int = 0,
          extra_callbacks: list | None = None, trainer_kwargs: dict | None = None,
          start_fresh: bool = False) -> dict:
    """Fit with `cfg`; returns a summary (paths and final metrics) that is also written as JSON.

    resume: None (a new run), 'latest' or a checkpoint path. A checkpoint that cannot be used stops
    the run with `CheckpointError` (one line; `start_fresh=True` sets the folder's checkpoints aside
    into a `set-aside-*` subfolder and starts over); a changed schedule setting with
    `ScheduleMismatch`; a full disk with `StorageFull`. Rerun on a finished run, it returns that
    run's summary (metrics.json) without training."""
    t = cfg.train
    run_dir = Path(t.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = Path(t.checkpoint_dir or run_dir / "checkpoints")
    if rank_zero_only.rank == 0:
        count, freed = remove_temporaries(ckpt_dir)
        if count:
            print(f"checkpoints: removed {count} temporary file(s) left by an interrupted save in {ckpt_dir}, "
                  f"{human(freed)} freed")
        if start_fresh and (moved := set_aside(ckpt_dir)):
            print(f"start fresh: moved the earlier checkpoints to {moved} (nothing deleted)")
    ckpt_path = resolve_resume(resume, ckpt_dir, cfg)
    if (done := finished_summary(run_dir, ckpt_path)) is not None:
        rank_zero_only(print)(f"run already complete (step {done['global_step']}): returning its summary from "
                              f"{run_dir / 'metrics.json'}")
        return done
    pl.seed_everything(t.seed, workers=True, verbose=False)
    precision = choose_precision(t.precision)

    datamodule = YOLODataModule(cfg.data, seed=t.seed)
    datamodule.prepare_data()
    datamodule.setup("fit")
    # The splits the layout chose (None = its default) go into the checkpoint's config by name.
    cfg.data.train_split, cfg.data.val_split = datamodule.train_dataset.split, datamodule.val_dataset.split
    world = t.devices if isinstance(t.devices, int) and t.devices > 0 else 1
    steps_per_epoch = datamodule.num_training_batches(world)
    schedule_path = run_dir / SCHEDULE_FILE
    max_lr = None
    if lr_find and not schedule_path.exists():
        max_lr = run_lr_finder(cfg, datamodule, run_dir)
    schedule = prepare_schedule(cfg, run_dir, steps_per_epoch, len(datamodule.train_dataset), max_lr,
                                "given" if lr_find else None)
    module = YOLOModule(cfg.to_dict(), schedule_path=str(schedule_path))
    plan = storage_plan(module.model, t.epochs, t.keep_last_k, t.optimizer)
    rank_zero_only(print)(storage_report(plan, ckpt_dir, free_bytes(ckpt_dir)))

    loggers = [pl.loggers.CSVLogger(run_dir, name="logs", flush_logs_every_n_steps=LOG_FLUSH_STEPS)]
    try:
        loggers.append(pl.loggers.TensorBoardLogger(run_dir, name="tensorboard"))
    except ModuleNotFoundError:
        pass
    callbacks = [PeriodicCheckpoint(ckpt_dir, every_minutes=t.checkpoint_every_minutes,
                                    every_n_steps=checkpoint_every_steps, keep_last_k=t.keep_last_k, plan=plan),
                 # ~20 refreshes an epoch: a logged notebook stays small, a terminal stays lively.
                 pl.callbacks.TQDMProgressBar(refresh_rate=max(1, steps_per_epoch // 20))]
    if t.ema:  # exponential moving average of the weights, used for validation and the final model
        from torch.optim.swa_utils import get_ema_multi_avg_fn

        callbacks.append(pl.callbacks.WeightAveraging(multi_avg_fn=get_ema_multi_avg_fn(0.999)))
    callbacks += extra_callbacks or []
    strategy = t.strategy
    if world > 1 and not torch.cuda.is_available():
        rank_zero_only(print)("DDP on CPU: BatchNorm statistics stay per process (SyncBatchNorm needs GPUs)")
    kwargs = dict(
        max_epochs=t.epochs, accelerator=t.accelerator, devices=t.devices, strategy=strategy,
        precision=precision, logger=loggers, callbacks=callbacks, enable_checkpointing=False,
        plugins=[NoOverwriteCheckpointIO()], sync_batchnorm=world > 1 and torch.cuda.is_available(), log_every_n_steps=1,
        num_sanity_val_steps=0, use_distributed_sampler=False, default_root_dir=run_dir,
        limit_train_batches=t.limit_train_batches, limit_val_batches=t.limit_val_batches,
    )
    kwargs.update(trainer_kwargs or {})
    trainer = pl.Trainer(**kwargs)
    started = time.time()
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)

    summary = {
        "run_dir": str(run_dir), "schedule": str(schedule_path), "checkpoints": str(ckpt_dir),
        "weights": str(ckpt_dir / "weights"), "logs": str(run_dir / "logs"), "global_step": trainer.global_step,
        "epochs": trainer.current_epoch, "seconds": round(time.time() - started, 1),
        "metrics": _final_metrics(run_dir / "logs", trainer), "schedule_steps": schedule.spec.total_steps,
        "skipped_images": dict(module.skipped_images),
    }
    if module.last_map:
        summary["ap_per_class_voc07"] = {row["class"]: None if row["ap50_voc07"] is None else round(row["ap50_voc07"], 4)
                                         for row in module.last_map["per_class"]}
    if trainer.is_global_zero:
        _save_plots(summary, run_dir)
        (run_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
    return summary


def _final_metrics(logs: Path, trainer) -> dict[str, float]:
    """The last value of every metric over all the run's sessions (each resume logs a new version),
    then this session's in-memory values on top."""
    metrics = {}
    try:
        from .run_logs import read_run_metrics

        for name, values in read_run_metrics(logs).items():
            finite = values[~np.isnan(values)]
            if name not in ("step", "epoch") and len(finite):
                metrics[name] = float(finite[-1])
    except (ImportError, ValueError, OSError):
        pass
    metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1})
    return metrics


def _save_plots(summary: dict, run_dir: Path) -> None:
    try:
        from .plotting import plot_training_curves
    except ImportError:
        return
    fig = plot_training_curves(summary["logs"])
    fig.savefig(run_dir / "training_curves.png", dpi=100)
    summary["plots"] = [str(run_dir / "training_curves.png")]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except (OSError, ValueError, TypeError) as e:  # --config: missing, not JSON, unknown or mistyped fields
        parser.error(f"--config {args.config}: {e}")
    try:
        if cfg.data.root:  # the dataset folder itself, said once (--data may be a folder above it)
            cfg.data.root = str(find_dataset(cfg.data.root))
            print(f"data: {cfg.data.root}")
        summary = train(cfg, resume=args.resume, lr_find=args.lr_find,
                        checkpoint_every_steps=args.checkpoint_every_steps, start_fresh=args.start_fresh)
    except USER_ERRORS as e:  # one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_written(summary)
    return 0


@rank_zero_only
def print_written(summary: dict) -> None:
    print("\nwritten:")
    for key in ("schedule", "checkpoints", "logs"):
        print(f"  {key:12s} {summary[key]}")
    for plot in summary.get("plots", []):
        print(f"  {'plot':12s} {plot}")
    print(f"  {'metrics':12s} {Path(summary['run_dir']) / 'metrics.json'}")
    shown = {k: round(v, 4) for k, v in summary["metrics"].items() if k.startswith("val/")}
    print(f"final validation metrics: {shown}")


if __name__ == "__main__":
    raise SystemExit(main())
