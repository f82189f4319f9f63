"""Write S13_YOLOv3_Lightning.ipynb from the cell sources below (then execute it to fill outputs).

    python scripts/build_notebook.py                    # write the notebook, no outputs
    python scripts/build_notebook.py --keep-outputs     # rewrite the sources, keep the outputs of unchanged cells
    YOLO_SMOKE=1 python scripts/build_notebook.py --execute   # write it and run it (CPU smoke mode)
    YOLO_SMOKE=1 YOLO_FIGURES=images YOLO_RUN_NOTE="..." python scripts/build_notebook.py --execute
                                                        # the committed run: README's figures into images/

Keeping the cells here makes review and diffs readable; the notebook stays thin: every cell calls
`helpers`, training through `helpers.train.train` as `python -m helpers.train` does.
tests/test_notebook.py checks that the committed notebook's cells are these. Text both the README
and the notebook show (the GPU-time projection) is read from README.md, its one source.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "S13_YOLOv3_Lightning.ipynb"

CELLS = [
    ("md", """# YOLOv3 from scratch on PASCAL VOC, with PyTorch Lightning

[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({colab_url})

The course's YOLOv3 (Darknet-53, 3 scales, 20 VOC classes), trained from scratch: LR range test,
a precomputed OneCycle schedule saved to a text file, 16-bit training with multi-resolution batches
(320-608) and mosaic on 75% of training samples, checkpoints on Google Drive that survive
disconnects, the course's accuracies, VOC mAP, and Grad-CAM for each detection.

Everything here calls the `helpers/` package; run it top to bottom on Colab or Kaggle with a GPU.
**After a disconnect, or in a new session, run it top to bottom again**: it finds the data, resumes
training from the newest checkpoint (or skips it when the run is complete) and redoes the rest.
Without a GPU (or with `YOLO_SMOKE=1`) it runs in **smoke mode**: the embedded small config on
generated data, on the CPU, in a few minutes.

**{run_note}**"""),
    ("md", """## 1. Setup
Clones the repository where it is absent (set `REPO_URL` on the first line to your copy), installs
the training requirements (Colab's and Kaggle's torch and Jupyter are kept), mounts Google Drive on
Colab, and stops at once on a GPU the installed torch cannot run (Kaggle's P100). A smoke run keeps its
own run folder (`yolov3-voc-smoke` beside `yolov3-voc`), so it never blocks the course run. A cell
stopped by something you can mend (the data, a checkpoint, a changed setting, a full disk) says what
to do in one line."""),
    ("code", """REPO_URL = "{repo_url}"  # <- your copy of this repository (e.g. your fork on GitHub)

import os, sys, subprocess, json
from pathlib import Path

# Optional settings from the environment: YOLO_SMOKE=1 forces the CPU smoke run; YOLO_DATA names a
# VOCdevkit or the course's Kaggle folder (else step 3 finds or downloads it); YOLO_RUN_DIR moves
# the run folder; YOLO_FIGURES also saves the main figures into a folder (the repo's images/).
SMOKE = os.environ.get("YOLO_SMOKE", "auto")
DATA_ROOT = os.environ.get("YOLO_DATA")
FIGURES = os.environ.get("YOLO_FIGURES")

IN_COLAB, IN_KAGGLE = "google.colab" in sys.modules, "KAGGLE_KERNEL_RUN_TYPE" in os.environ
if not Path("helpers").is_dir():
    clone = Path("yolov3-lightning")
    if not clone.is_dir():  # a restarted session finds the earlier clone
        if "YOUR-GITHUB-USER" in REPO_URL:
            raise SystemExit("Set REPO_URL on the first line of this cell to your copy of the repository "
                             "(or run the notebook from the repository's root folder).")
        subprocess.run(["git", "clone", "--depth", "1", REPO_URL, str(clone)], check=True)
    os.chdir(clone)
if IN_COLAB or IN_KAGGLE:  # training packages only: never Jupyter, never the platform's torch
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-r", "requirements.txt"], check=True)

import torch
from helpers.errors import one_line_errors
from helpers.runtime import adopt_earlier_run, detect, gpu_problem, mode_run_dir

if (problem := gpu_problem()):
    raise SystemExit(problem)
runtime = detect()
if runtime.kind == "colab":
    from google.colab import drive
    drive.mount("/content/drive")  # checkpoints and schedule survive a disconnect
SMOKE = (not torch.cuda.is_available()) if SMOKE == "auto" else SMOKE == "1"
# A smoke run has its own folder (<run folder>-smoke): it never meets the course run's schedule or checkpoints.
RUN_DIR = str(mode_run_dir(os.environ.get("YOLO_RUN_DIR", runtime.run_dir), SMOKE))
if runtime.kind == "kaggle":
    with one_line_errors():  # e.g. the attached run's checkpoints cannot be read: said in one line
        if (earlier := adopt_earlier_run(RUN_DIR)):
            print(f"resuming the run saved in {earlier} (copied into {RUN_DIR})")
GPUS = torch.cuda.device_count()
DEVICE = "cuda" if GPUS else "cpu"
gpu = f"{GPUS} x {torch.cuda.get_device_name(0)}" if GPUS else "no GPU"
print(f"{runtime.kind}, {gpu}, torch {torch.__version__}; smoke mode: {SMOKE}; run folder: {RUN_DIR}")"""),
    ("md", """## 2. Configuration
The course's settings in one dataclass (smoke mode: the small embedded config); every GPU is used.

**How the run is judged.** The course grades three accuracies (sigmoid(objectness) > 0.05 over the
test split): class >= 80%, no-object >= 98%, object >= 78% for the full model (75 / 95 / 70% for a
narrower one). The progress bar shows each as value/target, every validation prints one line
against them, the curves draw them dashed, and the results cell ends with the verdict.

**The loss.** The course's four terms with a different objectness: BCE-with-logits (the course's MSE
on sigmoid(objectness) stops learning objectness once the no-object term has pushed it down), a
positive's target 1 rather than its box's IoU (as in the YOLOv3 paper), and the no-object term
weighted 100 and balanced per scale (0.4, 1, 4, coarse to fine). Memorising 16 real photos in 600
steps (0.25-width model, 224 px), it is the variant that met all three targets and mAP@0.5 >= 0.5
together (class 92.5%, no-object 98.3%, object 96.0%, mAP 0.74); the course's loss ends at object
accuracy 0% and mAP 0.00 (`benchmarks/RESULTS.md`, "The graded accuracies"). To train with the
course's own loss: `cfg.train = dataclasses.replace(cfg.train, **COURSE_LOSS)` here (from
`helpers.config`), or `python -m helpers.train --course-loss`. The smoke config weights the class term 10
rather than 1: in its 256 CPU steps the class term otherwise loses to the no-object term (test
mAP@0.5 on the shapes 3.0% against 36.5%)."""),
    ("code", """from helpers.train import course_preset, embedded_default

cfg = embedded_default() if SMOKE else course_preset()
cfg.train.run_dir = RUN_DIR
cfg.train.devices = max(GPUS, 1)
for section, values in cfg.to_dict().items():
    print(f"{section:5s}", {k: v for k, v in values.items() if k != "classes"})"""),
    ("md", """## 3. Data
The course's Kaggle dataset, found where it already is (`YOLO_DATA`, the dataset attached to a Kaggle
notebook, a copy downloaded earlier) or downloaded with `kagglehub` (on Colab into the local disk, in
about a minute; the token: a Colab secret `KAGGLE_API_TOKEN` from kaggle.com > Settings > API).
Then training samples with and without mosaic (boxes drawn from the targets), and the class counts."""),
    ("code", """import warnings
from collections import Counter
import matplotlib.pyplot as plt
from helpers.data_source import get_data
from helpers.datamodule import YOLODataModule
from helpers.dataset import TrainingDataset
from helpers.boxes import labels_to_pixels
from helpers.plotting import draw_boxes, show

with one_line_errors():  # no dataset, or a broken one: what to do, in one line
    if SMOKE and not DATA_ROOT:
        print("smoke mode: generated shapes with VOC class names (no download)")
    else:  # never the course's 40 epochs on generated shapes: real data or a clear stop
        cfg.data.root = str(get_data(DATA_ROOT, runtime.download_dir, download=runtime.can_download))
    datamodule = YOLODataModule(cfg.data, seed=cfg.train.seed)
    datamodule.prepare_data()
    datamodule.setup("fit")
train_set, val_set = datamodule.train_dataset, datamodule.val_dataset
print(f"data: {datamodule.root}; {len(train_set)} training images ({train_set.split}), "
      f"{len(val_set)} validation images ({val_set.split})")
counts = Counter(int(c) for r in train_set.records for c in r.labels)
print({cfg.data.classes[c]: n for c, n in sorted(counts.items())})
size = cfg.data.image_size
with warnings.catch_warnings():  # mosaic 0 and 1 here only to show both kinds of sample
    warnings.simplefilter("ignore")
    plain = TrainingDataset(train_set.root, train_set.split, size, mosaic=0.0, records=train_set.records)
    mosaic = TrainingDataset(train_set.root, train_set.split, size, mosaic=1.0, records=train_set.records)
fig, axes = plt.subplots(2, 4, figsize=(12, 6))
for k, ax in enumerate(axes.flat):
    image, boxes = (plain if k < 4 else mosaic)[(k % 4, size)]
    draw_boxes(image, labels_to_pixels(boxes, size, size), cfg.data.classes, ax=ax, title="plain" if k < 4 else "mosaic")
show(fig, "training_samples", FIGURES)
plt.close(fig)"""),
    ("md", "## 4. The model\nDarknet-53 + the YOLOv3 head; three outputs, coarse to fine."),
    ("code", """from helpers.config import STRIDES
from helpers.model import build_model, count_parameters

model = build_model(cfg.model)
with torch.no_grad():
    outputs = model.eval()(torch.zeros(1, 3, size, size))
print(f"{count_parameters(model):,} parameters (width {cfg.model.width})")
for out, stride in zip(outputs, STRIDES):
    print(f"stride {stride:2d}: {tuple(out.shape)}  [batch, anchor, row, column, obj+box+{cfg.model.num_classes} classes]")"""),
    ("md", """## 5. LR range test, schedule and training
What `python -m helpers.train --lr-find --resume latest` does, through the same function
(`helpers.train.train`): on a new run, the LR range test (torch-lr-finder on the real training
loader; the model and optimizer are restored afterwards; the max LR is a tenth of the LR at the
minimum of the lag-free smoothed loss, a decade short of where it turns up, when its fall stands
clear of the batch noise; with the objectness prior, the default, it did in none of the setups
measured, and the configured max LR is kept: 1e-3 in the course's configuration, 2e-3 in smoke
mode), then the OneCycle schedule, one LR per
optimizer step, written to a text file next to the checkpoints, then training: 16-bit mixed
precision on a GPU (32-bit on a CPU), multi-resolution batches, checkpoints in the run folder
(every epoch and every ~20 minutes). Several GPUs (Kaggle's T4 x2) train through
`python -m helpers.train --config <run>/config.json --resume latest --lr-find` in a child process:
Lightning cannot start DDP inside a notebook. **After a disconnect, rerun the notebook: this cell
resumes from the newest checkpoint that loads, on its line of the schedule file (the range test is
not run again); once the run is complete it only reports it.** The next cell shows the range test's
curve and the schedule.

{gpu_projection}"""),
    ("code", """from helpers.runtime import TrainingFailed, train_in_subprocess
from helpers.train import train

with one_line_errors(TrainingFailed):  # a changed setting, an unreadable checkpoint, a full disk: one line
    if cfg.train.devices > 1:  # python -m helpers.train --config <run>/config.json --resume latest --lr-find
        summary = train_in_subprocess(cfg, lr_find=True)
    else:
        summary = train(cfg, resume="latest", lr_find=True)  # start_fresh=True sets unreadable checkpoints aside
print(json.dumps({k: v for k, v in summary.items() if k not in ("metrics", "ap_per_class_voc07")}, indent=1))"""),
    ("md", "## 6. What the run chose: the LR range test and the OneCycle schedule\nThe range test's curve as training saved it (`lr_finder.png` in the run folder, written whenever the range test ran; its title says when the configured max LR was kept), and the schedule file every resume reads by step: it records where its max LR came from."),
    ("code", """from helpers.plotting import plot_schedule, show_saved
from helpers.schedule import Schedule

if (Path(RUN_DIR) / "lr_finder.png").is_file():
    show_saved(Path(RUN_DIR) / "lr_finder.png", "lr_finder", FIGURES)
schedule = Schedule.read(summary["schedule"])
print(f"max LR {schedule.spec.max_lr:.3g} ({'the LR range test' if schedule.spec.max_lr_source == 'given' else 'the config'}), "
      f"{schedule.spec.total_steps} steps = {schedule.spec.epochs} epochs x {schedule.spec.steps_per_epoch}")
show(plot_schedule(schedule.lrs, schedule.spec.steps_per_epoch), "schedule", FIGURES)"""),
    ("md", "## 7. Results\nLoss and accuracy curves per epoch (each course target dashed); then the newest checkpoint on the test split: the course's accuracies against their targets, mAP@0.5 (VOC07 11-point and all-point) per class, the PR curves, and last the verdict: passes all three targets, or which miss and by how much."),
    ("code", """from helpers.weights import find_latest, load_model
from helpers.evaluate import evaluate, format_report
from helpers.plotting import plot_pr_curves, plot_training_curves

show(plot_training_curves(summary["logs"], targets=cfg.model.accuracy_targets), "training_curves", FIGURES)
with one_line_errors():  # an unreadable checkpoint or test split: one line
    model, _ = load_model(find_latest(Path(RUN_DIR) / "checkpoints"), map_location=DEVICE)
    datamodule.setup("test")
    report = evaluate(model, datamodule.test_dataloader(), cfg, progress=False)
show(plot_pr_curves(report["curves"], cfg.data.classes), "pr_curves", FIGURES)
print(format_report(report))  # its last line: the verdict on the course's three targets"""),
    ("md", "## 8. Detections, Grad-CAM and the worst mistakes\nA few validation images with their detections (ground truth dashed); the Grad-CAM of each detection (which pixels raised its score); then the worst mistakes: confident false positives with the Grad-CAM of what made the model fire, and missed objects with the Grad-CAM of the anchor that should have found them."),
    ("code", """from helpers.analysis import detect_examples, mistake_cams, mistakes_on
from helpers.cam import detect_and_explain
from helpers.plotting import plot_cam_overlays, plot_examples, plot_worst_mistakes

conf = 0.05 if SMOKE else 0.3  # the smoke run's model is barely trained: its scores stay low
shown = detect_examples(model, val_set, n=4, conf_threshold=conf)
show(plot_examples(shown.images, shown.detections, shown.truths, cfg.data.classes, conf_threshold=conf),
     "detections", FIGURES)
for index in range(2):
    image, _, meta = val_set[index]
    detections, cams = detect_and_explain(model, image, conf_threshold=conf, top_k=3, min_detections=1)
    show(plot_cam_overlays(image, cams, detections, cfg.data.classes), f"gradcam_{index}", FIGURES)
images, mistakes = mistakes_on(model, val_set, n=32, conf_threshold=conf, k=3)
show(plot_worst_mistakes(images, mistakes, mistake_cams(model, images, mistakes), cfg.data.classes),
     "worst_mistakes", FIGURES)"""),
    ("md", "## 9. Export for the app\nA bundle the Gradio app loads: `model.safetensors` + `config.json` (classes, anchors, metrics)."),
    ("code", """from helpers.export import export_checkpoint
from helpers.weights import BundleError

latest = find_latest(Path(RUN_DIR) / "checkpoints")
bundle = Path(RUN_DIR) / f"bundle-{latest.stem}"  # one per checkpoint: a rerun reuses it
if not (bundle / "config.json").is_file():
    with one_line_errors(BundleError):  # a full disk while writing it: one line, no half-written bundle
        bundle = export_checkpoint(latest, bundle)
print("bundle:", bundle, sorted(p.name for p in Path(bundle).iterdir()))"""),
]


PLACEHOLDER_URL = "https://github.com/YOUR-GITHUB-USER/yolov3-lightning"


def repo_url() -> str:
    """The repository the notebook clones on Colab/Kaggle: $YOLO_REPO_URL, else this clone's `origin`
    on GitHub, else a placeholder the first cell asks the user to replace."""
    import subprocess

    url = os.environ.get("YOLO_REPO_URL")
    if not url:
        got = subprocess.run(["git", "-C", str(ROOT), "remote", "get-url", "origin"], capture_output=True, text=True)
        url = got.stdout.strip() if got.returncode == 0 and "github.com" in got.stdout else PLACEHOLDER_URL
    return url.removesuffix(".git")


def colab_url(url: str) -> str:
    return url.replace("https://github.com/", "https://colab.research.google.com/github/") + \
        f"/blob/main/{NOTEBOOK.name}"


def readme_part(first_words: str, readme: Path = ROOT / "README.md") -> str:
    """The README's paragraph starting with `first_words`, through the end of the table after it."""
    lines = readme.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(first_words))
    end = start
    while end < len(lines) and (lines[end].strip() or not any(x.startswith("|") for x in lines[start:end])):
        end += 1
    return "\n".join(lines[start:end]).strip()


def build(run_note: str, url: str | None = None) -> nbformat.NotebookNode:
    url = url or repo_url()
    values = {"{run_note}": run_note, "{repo_url}": url, "{colab_url}": colab_url(url),
              "{gpu_projection}": readme_part("How long the 40 epochs take")}
    nb = new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    for kind, source in CELLS:
        for key, value in values.items():
            source = source.replace(key, value)
        nb.cells.append(new_markdown_cell(source) if kind == "md" else new_code_cell(source))
    return nb


def keep_outputs(nb: nbformat.NotebookNode, old: nbformat.NotebookNode) -> int:
    """Give each code cell of `nb` whose source is unchanged in `old` its outputs and execution count
    there (and the notebook its metadata); changed cells keep none: an output is never shown under
    code that did not produce it. Returns the number of code cells left without outputs."""
    done = {c.source: c for c in old.cells if c.cell_type == "code"}
    missing = 0
    for cell in nb.cells:
        if cell.cell_type == "code":
            if cell.source in done:
                cell.outputs, cell.execution_count = done[cell.source].outputs, done[cell.source].execution_count
            else:
                missing += 1
    nb.metadata = old.metadata
    return missing


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--execute", action="store_true", help="run it (honours YOLO_SMOKE) and keep the outputs")
    p.add_argument("--keep-outputs", action="store_true",
                   help="without executing: keep the current notebook's outputs for cells whose code is unchanged, "
                        "and its run note")
    p.add_argument("--out", type=Path, default=NOTEBOOK)
    p.add_argument("--timeout", type=int, default=1800)
    args = p.parse_args()
    note = os.environ.get("YOLO_RUN_NOTE", "The outputs below are from no run yet.")
    old = nbformat.read(args.out, as_version=4) if args.keep_outputs and args.out.is_file() else None
    if old is not None and "YOLO_RUN_NOTE" not in os.environ:  # the run that produced the kept outputs
        note = old.cells[0].source.rsplit("**", 2)[-2]
    nb = build(note)
    if old is not None:
        if (missing := keep_outputs(nb, old)):
            print(f"{missing} code cell(s) changed and have no outputs until the notebook is executed again")
    if args.execute:
        from nbclient import NotebookClient

        start = time.time()
        NotebookClient(nb, timeout=args.timeout, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
                       ).execute()
        print(f"executed in {time.time() - start:.0f} s")
    nbformat.write(nb, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
