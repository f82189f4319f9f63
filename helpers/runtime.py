"""The machine the notebook runs on: Colab, Kaggle or local; whether its GPU can run; its folders;
and what an earlier session left behind.

- `detect()` names the place and picks the folders: the run folder (checkpoints, schedule, logs:
  what must survive a disconnect) and the download folder (data fetched by kagglehub).
  Colab: the run on Google Drive, the data on the local disk (Drive's 15 GB are for checkpoints,
  and reading 20,000 small files through the Drive mount is slow); it is downloaded again after a
  disconnect, in about a minute. Kaggle: both under `/kaggle/working`. Local: `runs/notebook`.
- `gpu_problem()` says when the installed torch has no kernels for the GPU (Kaggle's P100,
  sm_60, under a torch built for sm_75 and newer): the first CUDA operation would fail.
- `adopt_earlier_run()`: a Kaggle session starts with an empty `/kaggle/working`; a run saved as a
  notebook version's output and attached as input is brought back, so training resumes.
- `train_in_subprocess()`: several GPUs (Kaggle's T4 x2) need DDP, whose processes Lightning cannot
  start from inside a notebook (it would fork a process that has initialised CUDA); the notebook
  runs `python -m helpers.train --config <run>/config.json --resume latest` instead.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .config import Config
from .data_source import KAGGLE_INPUT
from .schedule import Schedule
from .storage import atomic_write_text
from .utils import free_gpu_memory

RUN_NAME = "yolov3-voc"  # the run folder's name on Drive and in /kaggle/working


@dataclass(frozen=True)
class Runtime:
    kind: str  # "colab" | "kaggle" | "local"
    run_dir: Path
    download_dir: Path
    can_download: bool  # kagglehub is expected to work here (or the user asked for it)


def detect(env: dict | None = None, modules: dict | None = None) -> Runtime:
    env = os.environ if env is None else env
    modules = sys.modules if modules is None else modules
    download = env.get("YOLO_DOWNLOAD") == "1"
    if "google.colab" in modules:
        return Runtime("colab", Path("/content/drive/MyDrive") / RUN_NAME, Path("/content/data"), True)
    if "KAGGLE_KERNEL_RUN_TYPE" in env:
        return Runtime("kaggle", Path("/kaggle/working") / RUN_NAME, Path("/kaggle/working/data"), True)
    return Runtime("local", Path("runs/notebook"), Path("runs/notebook/data"), download)


def mode_run_dir(run_dir: str | os.PathLike, smoke: bool) -> Path:
    """The run folder of a notebook mode: a smoke run (the small embedded config on generated data) in
    `<run_dir>-smoke`, beside the course run's folder, so neither ever meets the other's schedule or
    checkpoints (a smoke run first would otherwise stop the course run with a schedule mismatch)."""
    run_dir = Path(run_dir)
    return run_dir.with_name(f"{run_dir.name}-smoke") if smoke else run_dir


# --- the GPU -------------------------------------------------------------------------------------
def runs_on(capability: tuple[int, int], arch_list: list[str]) -> bool:
    """Whether a torch built for `arch_list` (`torch.cuda.get_arch_list()`, e.g. ['sm_75', 'compute_90'])
    runs on a GPU of compute `capability`: a binary for the same major version and a minor at most
    the GPU's, or PTX (`compute_XY`) for an older or equal architecture, which the driver compiles."""
    major, minor = capability
    for arch in arch_list:
        kind, _, digits = arch.partition("_")
        if not digits.isdigit():
            continue
        a_major, a_minor = int(digits[:-1]), int(digits[-1])
        if kind == "sm" and a_major == major and a_minor <= minor:
            return True
        if kind == "compute" and (a_major, a_minor) <= (major, minor):
            return True
    return False


def gpu_problem() -> str | None:
    """One line saying why this machine's GPU cannot be used with the installed torch, or None."""
    import torch

    if not torch.cuda.is_available():
        return None
    arch_list = torch.cuda.get_arch_list()
    for i in range(torch.cuda.device_count()):
        capability = torch.cuda.get_device_capability(i)
        if arch_list and not runs_on(capability, arch_list):
            name = torch.cuda.get_device_name(i)
            return (f"GPU {i} ({name}, sm_{capability[0]}{capability[1]}) cannot run this torch "
                    f"{torch.__version__}, built for {', '.join(arch_list)}. On Kaggle choose the accelerator "
                    "'GPU T4 x2' (Settings > Accelerator); on Colab a T4, L4 or A100 (Runtime > Change runtime type).")
    return None


# --- what an earlier session left ----------------------------------------------------------------
def adopt_earlier_run(run_dir: str | os.PathLike, search: str | os.PathLike = KAGGLE_INPUT) -> Path | None:
    """Copy the newest earlier run found under `search` into an empty `run_dir`, so it resumes.

    A run is a folder named like `run_dir` holding `schedule.txt`, at most 3 levels below `search`
    (e.g. `/kaggle/input/<notebook>/yolov3-voc`, a notebook version's output attached as input).
    Everything but the checkpoints is copied, and of the checkpoints only the newest one that loads
    (the resume point: the per-epoch weights stay where they are, to spare the 20 GB disk).
    With several, the most recently written wins. Returns the folder adopted, or None when `run_dir`
    already holds a run or none is found."""
    from .weights import find_latest

    run_dir, search = Path(run_dir), Path(search)
    if (run_dir / "schedule.txt").exists() or not search.is_dir():
        return None
    found = [p.parent for depth in range(1, 4) for p in search.glob("/".join(["*"] * depth) + "/schedule.txt")
             if p.parent.name == run_dir.name]
    found = [p for p in found if _readable_schedule(p)]
    if not found:
        return None
    earlier = max(found, key=lambda p: max((f.stat().st_mtime for f in p.rglob("*") if f.is_file()), default=0.0))
    weights = shutil.ignore_patterns("*.ckpt", "*.tmp", "*.pt", "*.pth", "*.safetensors")
    shutil.copytree(earlier, run_dir, dirs_exist_ok=True, ignore=weights)
    latest = find_latest(earlier / "checkpoints")
    if latest is not None:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        shutil.copy2(latest, run_dir / "checkpoints" / latest.name)
    return earlier


def _readable_schedule(run: Path) -> bool:
    try:
        Schedule.read(run / "schedule.txt")
        return True
    except (OSError, ValueError):
        return False


# --- several GPUs ----------------------------------------------------------------------------------
CONFIG_FILE = "config.json"


class TrainingFailed(RuntimeError):
    """The training process ended with an error (its own output, shown above, says which)."""


def train_command(cfg: Config, resume: str = "latest", lr_find: bool = False) -> list[str]:
    """Write `cfg` to `<run_dir>/config.json` and return the command that trains it (any devices),
    as `train(cfg, resume=resume, lr_find=lr_find)` would in this process."""
    run_dir = Path(cfg.train.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / CONFIG_FILE, json.dumps(cfg.to_dict(), indent=1))
    return [sys.executable, "-m", "helpers.train", "--config", str(run_dir / CONFIG_FILE), "--resume", resume,
            *(["--lr-find"] if lr_find else [])]


def train_in_subprocess(cfg: Config, resume: str = "latest", lr_find: bool = False) -> dict:
    """Train `cfg` in a child process (`train_command`), its output shown here line by line; the
    run's summary (`metrics.json`) when it succeeds, else TrainingFailed with its exit status. The LR
    range test (`lr_find`) runs in the child too, so this process holds no GPU memory for it."""
    command = train_command(cfg, resume, lr_find)
    free_gpu_memory()  # anything this process still holds on cuda:0 goes to the child
    print("$", " ".join(command), flush=True)
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as child:
        for line in child.stdout:
            print(line, end="", flush=True)
    if child.returncode:
        raise TrainingFailed(f"training stopped with exit status {child.returncode} (its output is above); "
                           "rerun the cell to resume from the newest checkpoint")
    return json.loads((Path(cfg.train.run_dir) / "metrics.json").read_text())
