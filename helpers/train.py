"""`python -m helpers.train`: the main job.

With no arguments: the embedded default, a small model on generated data (coloured shapes with
VOC class names), on CPU, in a few minutes. With `--data PATH --preset course`: the course's
40-epoch 16-bit run on a VOCdevkit or the Kaggle/course layout. Rerun the same command after a
disconnect with `--resume latest` and it continues from the newest checkpoint that loads, on the
same line of the saved schedule file.

Every field of the config dataclasses is a flag (`--epochs 40`, `--batch-size 16`, `--width 0.5`,
`--train-sizes [320,352]`, `--checkpoint-dir null`), parsed as the field's type. Settings come from
the preset, then a `--config FILE.json` (any subset of `{model: {...}, data: {...}, train: {...}}`),
then the flags: each overrides the one before. `--help` shows each flag's type and the value this
command starts from (`--preset course --help`: the course's).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import jsonargparse
import numpy as np
import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.rank_zero import rank_zero_only

from .annotations import find_dataset
from .checkpoints import (
    NoOverwriteCheckpointIO,
    PeriodicCheckpoint,
    check_resumable,
    full_states,
    set_aside,
    step_of_state,
    storage_plan,
)
from .config import (
    COURSE_LOSS,
    AccuracyTargets,
    Config,
    DataConfig,
    ModelConfig,
    TrainConfig,
    field_types,
    type_name,
)
from .csv_log import AtomicCSVLogger, mend_logs
from .datamodule import YOLODataModule
from .errors import USER_ERRORS
from .metrics import ACCURACY_NAMES, judged
from .module import YOLOModule, build_optimizer
from .progress import TargetsProgressBar
from .schedule import OneCycleSpec, Schedule, limited_steps, one_cycle_settings
from .storage import (
    EMPTY_TRASH,
    StorageFull,
    atomic_write_text,
    free_bytes,
    full_disk,
    human,
    removed_temporaries,
    write_figure,
)
from .weights import find_latest, step_of

SCHEDULE_FILE = "schedule.txt"
# CSV rows are appended to metrics.csv every LOG_FLUSH_STEPS steps: a kill loses at most the rows since
# (and a resume redoes the steps after its checkpoint, so curves keep no gap). An append a step is cheap.
LOG_FLUSH_STEPS = 1
# What a full disk says once the training itself is done (plots, metrics.json).
RESULTS_ADVICE = (f"Training is complete and its checkpoints are intact. Free some space ({EMPTY_TRASH}) and rerun "
                  "the same command with --resume latest: it writes the results without training again")


def embedded_default() -> Config:
    """A run that shows every part working on a 2-core CPU in a few minutes. Its loss is TrainConfig's
    with the class term weighted 10: in its 256 steps the class term otherwise loses to the 100x
    no-object term (test mAP@0.5 on the generated shapes 3.0% against 36.5%, benchmarks/RESULTS.md;
    with the objectness prior too: 0.9%)."""
    return Config(
        model=ModelConfig(num_classes=20, width=0.25),
        data=DataConfig(root=None, image_size=160, train_sizes=(128, 160, 192), batch_size=8, num_workers=2,
                        mosaic=0.5),
        train=TrainConfig(epochs=8, max_lr=2e-3, pct_start=0.2, precision="32-true", run_dir="runs/default",
                          checkpoint_every_minutes=1.0, keep_last_k=2, map_every=4, lambda_class=10.0),
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
# Built by jsonargparse (LightningCLI's parser) from the config dataclasses: one flag a field, parsed
# and checked as the field's type, its default shown in --help. The defaults are the values this
# command line starts from, so --help is read after --preset and --config: `--preset course --help`
# shows the course's.
SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}
FLAGS = {"root": "--data", "classes": None}  # field -> its flag where that is not --field-name (None: no flag)
FIELD_HELP = {"root": "dataset folder: a VOCdevkit or the Kaggle/course layout, or a folder above either; "
                      "null: the generated shapes"}
# The flags that are not config fields, by dest: the type each takes.
OPTION_TYPES = {"preset": typing.Literal[tuple(sorted(PRESETS))], "config": str | None, "resume": str | None,
                "checkpoint_every_steps": int}


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, jsonargparse.DefaultHelpFormatter):
    """jsonargparse's help (each flag's type and default) keeping the description's and examples' lines."""


class CommandLineParser(jsonargparse.ArgumentParser):
    """jsonargparse's parser answering a bad flag in one line: the flag, what it takes, what it got."""

    def __init__(self, *args, value_types: dict[str, Any], **kwargs):
        super().__init__(*args, **kwargs)
        self.value_types = value_types  # dest -> the type its flag takes ("epochs" -> int), for the error line

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        key = re.match(r'Parser key "(\w+)"', message)
        got = re.findall(r"(?:Got|Given) value: (.*)", message)
        action = key and next((a for a in self._actions if a.dest == key.group(1)), None)
        if action and got:
            kind = self.value_types[action.dest]
            hint = "; write a list as [a,b,...]" if typing.get_origin(kind) is tuple else ""
            message = f"{action.option_strings[0]}: expected {type_name(kind)}, got {got[-1].strip()!r}{hint}"
        print(f"{self.prog}: error: {' '.join(message.split())} (--help lists every setting)", file=sys.stderr)
        self.exit(2)


def build_parser(start: Config | None = None, origin: str = "--preset default") -> CommandLineParser:
    """The command line, with `start` (default: the embedded default) as every setting's default;
    `origin` says in --help where those defaults come from."""
    start = start or embedded_default()
    value_types = OPTION_TYPES | {name: kind for k in SECTIONS.values() for name, kind in field_types(k).items()}
    p = CommandLineParser(
        prog="python -m helpers.train", value_types=value_types, allow_abbrev=False,
        usage="%(prog)s [--preset NAME] [--config FILE] [--data PATH] [--resume latest|PATH] [--SETTING VALUE ...]",
        description="Train YOLOv3 from scratch on PASCAL VOC (or the embedded generated data).\n\n"
                    "Every setting starts from the preset, then what a --config file sets, then the flags\n"
                    "given: each overrides the one before. The defaults shown are this command's:\n"
                    f"{origin}.",
        formatter_class=_HelpFormatter,
        epilog="examples:\n"
               "  python -m helpers.train                                  # embedded default, CPU, minutes\n"
               "  python -m helpers.train --data ~/VOCdevkit --preset course --run-dir /content/drive/MyDrive/yolo\n"
               "  python -m helpers.train --data ~/VOCdevkit --preset course --run-dir ... --resume latest\n"
               "  python -m helpers.train --preset course --help           # the course's values as defaults\n",
    )
    p.add_argument("--preset", type=OPTION_TYPES["preset"], default="default", metavar="NAME",
                   help="starting configuration: 'default' (small, CPU, generated data) or 'course' (the 40-epoch run)")
    p.add_argument("--config", type=OPTION_TYPES["config"], default=None, metavar="FILE",
                   help="JSON file with any of {model: {...}, data: {...}, train: {...}}: what it sets overrides "
                        "the preset, and flags override it")
    p.add_argument("--resume", type=OPTION_TYPES["resume"], default=None, metavar="latest|PATH",
                   help="'latest' (newest checkpoint that loads in the checkpoint folder) or a path; without it, "
                        "a run folder holding this run's checkpoints resumes from the latest too (--start-fresh "
                        "to start over)")
    p.add_argument("--start-fresh", action="store_true",
                   help="start over on purpose: move the checkpoint folder's files into a set-aside-* subfolder first")
    p.add_argument("--lr-find", action="store_true",
                   help="run the LR range test first and use its suggestion as max LR; when its loss never falls "
                        "clear of the batch noise, keep the configured one (see helpers.lr_finder)")
    p.add_argument("--checkpoint-every-steps", type=OPTION_TYPES["checkpoint_every_steps"], default=0,
                   help="also checkpoint every N optimizer steps (0 = off)")
    p.add_argument("--course-loss", action="store_true",
                   help="the course's loss: every loss setting as config.COURSE_LOSS (MSE objectness against "
                        "the IoU, no-object weight 10, no balance); loss flags given still override; the model's "
                        "init stays ours (--obj-prior null: the course's)")
    for section, kind in SECTIONS.items():
        group = p.add_argument_group(f"{section} settings ({kind.__name__})")
        values = getattr(start, section)
        for name, field_type in field_types(kind).items():
            if (flag := FLAGS.get(name, "--" + name.replace("_", "-"))) is not None:
                # dest: the field's bare name (field names are unique over the sections); a dotted
                # one would make jsonargparse read `--data` as the whole data section.
                group.add_argument(flag, dest=name, type=field_type, default=getattr(values, name),
                                   help=FIELD_HELP.get(name), metavar="PATH" if name == "root" else None)
    return p


def command_line(argv: Sequence[str] | None = None) -> tuple[Config, jsonargparse.Namespace]:
    """The run's Config and the other options (resume, lr_find, ...) from `argv`: the preset, then
    what the --config file sets, then the flags given, each overriding the one before. A bad flag
    or file exits with one line naming it (status 2)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    first = argparse.ArgumentParser(add_help=False, allow_abbrev=False)  # read before the defaults exist
    first.add_argument("--preset", default="default")
    first.add_argument("--config")
    first.add_argument("--course-loss", action="store_true")
    known, _ = first.parse_known_args(argv)
    start = PRESETS.get(known.preset, embedded_default)()  # an unknown name is refused by the parser below
    origin = f"--preset {known.preset}"
    if known.config:
        origin += f" with what --config {known.config} sets"
        try:
            start = start.updated(json.loads(Path(known.config).read_text()))
        except (OSError, ValueError) as e:  # ValueError: not JSON, or fields Config.from_dict refuses by name
            problem = e.strerror if isinstance(e, OSError) else f"not JSON: {e}" if isinstance(
                e, json.JSONDecodeError) else e
            build_parser(start, origin).error(f"--config {known.config}: {problem}")
    if known.course_loss:  # a layer of its own, under the flags
        start, origin = start.updated({"train": COURSE_LOSS}), origin + " and --course-loss"
    args = build_parser(start, origin).parse_args(argv)
    given = {section: {f.name: args[f.name] for f in dataclasses.fields(kind) if f.name in args}
             for section, kind in SECTIONS.items()}
    try:
        return start.updated(given), args
    except ValueError as e:  # a value of the right type that its setting refuses (e.g. ModelConfig's checks)
        build_parser(start, origin).error(str(e))


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


def run_lr_finder(cfg: Config, datamodule, run_dir: Path) -> float | None:
    """The range test's max LR, its curve saved as `run_dir`/lr_finder.png; None when the curve
    suggests none (the run keeps its configured max LR, and its schedule file says "config")."""
    from .lr_finder import describe_choice
    from .plotting import plot_lr_finder

    result = lr_range_test(cfg, datamodule)
    figure = plot_lr_finder(result.lrs, result.smoothed, result.max_lr, raw=result.losses, lowest=result.lowest)
    said = (f"max LR {result.max_lr:.3g} ({describe_choice(result)})" if result.max_lr is not None else
            f"{describe_choice(result)}; keeping the configured max LR {cfg.train.max_lr:.3g}")
    if result.max_lr is None:
        figure.axes[0].set_title(f"LR range test, {describe_choice(result)}:\nthe configured max LR "
                                 f"{cfg.train.max_lr:.3g} is used", fontsize=8)
    write_figure(figure, run_dir / "lr_finder.png", dpi=100)
    print(f"LR finder: {said}; plot: {run_dir / 'lr_finder.png'}")
    return result.max_lr


def resolve_resume(resume: str | None, ckpt_dir: Path, cfg: Config) -> Path | None:
    """The checkpoint to resume from, checked against this run (CheckpointError, one line, if it
    cannot be used): 'latest' = the newest full state in `ckpt_dir` that loads (None: there is
    none, a fresh start), else a path. None (no --resume): 'latest' when the folder holds full
    states, said in one line (the same command rerun after a disconnect goes on; `--start-fresh`
    sets them aside first), else a fresh start.

    A path older than states in `ckpt_dir` continues the run from there: the newer states are moved
    into a `set-aside-*` subfolder (nothing deleted), so that a later `--resume latest` follows this
    continuation, not the abandoned one."""
    if not resume:
        if not full_states(ckpt_dir):
            return None
        path = find_latest(ckpt_dir)  # CheckpointError naming --start-fresh if none of them loads
        rank_zero_only(print)(f"resume: {ckpt_dir} holds this run's checkpoints; resuming from {path.name} as "
                              "--resume latest does (pass --start-fresh to set them aside and start over)")
        check_resumable(path, cfg)
        return path
    path = find_latest(ckpt_dir) if resume == "latest" else Path(resume)
    if path is None:
        rank_zero_only(print)(f"resume: no checkpoint in {ckpt_dir}; starting fresh")
        return None
    check_resumable(path, cfg)
    rank_zero_only(print)(f"resume: {path}")
    if resume != "latest" and rank_zero_only.rank == 0:
        step = step_of_state(path)
        newer = {p for p in full_states(ckpt_dir) if step_of(p)[0] > step and p.resolve() != path.resolve()}
        if newer and (moved := set_aside(ckpt_dir, lambda p: p in newer)):
            print(f"resume: moved {len(newer)} newer checkpoint(s) of the continuation abandoned here to {moved} "
                  "(nothing deleted), so that --resume latest continues from this one")
    return path


# What a run writes in its folder besides the schedule file (kept: a rerun computes the same one)
# and the checkpoints: a run from step 0 moves an earlier run's aside, so that curves never mix runs.
RUN_OUTPUTS = ("logs", "tensorboard", "metrics.json", "training_curves.png")


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


def _mend_after_kill(run_dir: Path, ckpt_dir: Path) -> None:
    """Remove what writes killed mid-way left in the run (temporaries, a cut log row), and say so."""
    inside = ckpt_dir.resolve().is_relative_to(run_dir.resolve())
    if (removed := removed_temporaries(run_dir, *([] if inside else [ckpt_dir]))):
        print(removed)
    if (cut := mend_logs(run_dir / "logs")):
        print(f"logs: removed a row cut short by an interruption ({cut} bytes) in {run_dir / 'logs'}")


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

    resume: 'latest', a checkpoint path, or None: 'latest' if the checkpoint folder holds states
    (the same command rerun after a disconnect goes on, saying so), else a new run. A checkpoint that
    cannot be used stops the run with `CheckpointError` (one line; `start_fresh=True` sets the
    folder's checkpoints aside into a `set-aside-*` subfolder and starts over); a changed schedule
    setting with `ScheduleMismatch`; a full disk with `StorageFull`; a setting out of its range
    (set on the Config by hand, past its constructor's checks) with `ConfigError`, before anything
    is written. A run from step 0 first moves an earlier run's logs and results (`RUN_OUTPUTS`)
    aside. Rerun on a finished run, it returns that run's summary (metrics.json) without training."""
    Config.from_dict(cfg.to_dict())  # e.g. a notebook's `cfg.data.mosaic = 2`: refused here, in one line
    t = cfg.train
    run_dir = Path(t.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = Path(t.checkpoint_dir or run_dir / "checkpoints")
    if rank_zero_only.rank == 0:
        _mend_after_kill(run_dir, ckpt_dir)
        if start_fresh and (moved := set_aside(ckpt_dir)):
            print(f"start fresh: moved the earlier checkpoints to {moved} (nothing deleted)")
    ckpt_path = resolve_resume(resume, ckpt_dir, cfg)
    if ckpt_path is None and rank_zero_only.rank == 0:
        if moved := set_aside(run_dir, lambda p: p.name in RUN_OUTPUTS):
            print(f"fresh start: moved the logs and results of an earlier run in {run_dir} to {moved} (nothing deleted)")
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
                                "given" if max_lr is not None else None)
    module = YOLOModule(cfg.to_dict(), schedule_path=str(schedule_path))
    plan = storage_plan(module.model, t.epochs, t.keep_last_k, t.optimizer)
    rank_zero_only(print)(storage_report(plan, ckpt_dir, free_bytes(ckpt_dir)))

    loggers = [AtomicCSVLogger(run_dir, name="logs", flush_logs_every_n_steps=LOG_FLUSH_STEPS)]
    try:
        loggers.append(pl.loggers.TensorBoardLogger(run_dir, name="tensorboard"))
    except ModuleNotFoundError:
        pass
    callbacks = [PeriodicCheckpoint(ckpt_dir, every_minutes=t.checkpoint_every_minutes,
                                    every_n_steps=checkpoint_every_steps, keep_last_k=t.keep_last_k, plan=plan),
                 # ~20 refreshes an epoch: a logged notebook stays small, a terminal stays lively.
                 TargetsProgressBar(refresh_rate=max(1, steps_per_epoch // 20))]
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
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except OSError as e:  # a full disk in a writer not ours (TensorBoard's): the one line too
        if isinstance(e, StorageFull) or (full := full_disk(e, e.filename or run_dir)) is None:
            raise
        raise full from None

    summary = {
        "run_dir": str(run_dir), "schedule": str(schedule_path), "checkpoints": str(ckpt_dir),
        "weights": str(ckpt_dir / "weights"), "logs": str(run_dir / "logs"), "global_step": trainer.global_step,
        "epochs": trainer.current_epoch, "seconds": round(time.time() - started, 1),
        "metrics": _final_metrics(run_dir / "logs", trainer), "schedule_steps": schedule.spec.total_steps,
        "skipped_images": dict(module.skipped_images),
    }
    summary.update(judged_accuracies(summary["metrics"], cfg.model.accuracy_targets))
    if module.last_map:
        summary["ap_per_class_voc07"] = {row["class"]: None if row["ap50_voc07"] is None else round(row["ap50_voc07"], 4)
                                         for row in module.last_map["per_class"]}
    if trainer.is_global_zero:
        _save_plots(summary, run_dir, cfg.model.accuracy_targets)
        atomic_write_text(run_dir / "metrics.json", json.dumps(summary, indent=2), advice=RESULTS_ADVICE)
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


def judged_accuracies(metrics: dict[str, float], targets: AccuracyTargets) -> dict:
    """The last validation's course accuracies (`metrics`' val/class_acc, ...) against `targets`:
    {"accuracy_targets": {name: {value, target, passed}}, "verdict": one sentence}."""
    return judged({name: metrics.get(f"val/{name}") for name in ACCURACY_NAMES}, targets)


def _save_plots(summary: dict, run_dir: Path, targets: AccuracyTargets) -> None:
    try:
        from .plotting import plot_training_curves
    except ImportError:
        return
    fig = plot_training_curves(summary["logs"], targets=targets)
    write_figure(fig, run_dir / "training_curves.png", dpi=100, advice=RESULTS_ADVICE)
    summary["plots"] = [str(run_dir / "training_curves.png")]


def main(argv: Sequence[str] | None = None) -> int:
    cfg, args = command_line(argv)
    try:
        if cfg.data.root:  # the dataset folder itself, said once (--data may be a folder above it)
            cfg.data.root = str(find_dataset(cfg.data.root))
            print(f"data: {cfg.data.root}")
        else:
            print("data: no --data given: training on generated shapes with VOC class names (helpers.synthetic), "
                  "a demonstration, not PASCAL VOC photos")
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
    if summary.get("verdict"):  # the graded figures, last (a summary from before the targets has none)
        print(f"verdict: {summary['verdict']}")


if __name__ == "__main__":
    raise SystemExit(main())
