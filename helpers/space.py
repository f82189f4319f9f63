"""A folder ready to push as a Hugging Face Space: the app, the helpers it imports, a bundle, samples.

    python -m helpers.space build OUT --bundle DIR --samples DATASET [--hub-repo ID] [--count 6]
    python -m helpers.space push OUT --space USER/NAME       # create the Gradio Space, upload OUT
    python -m helpers.space samples OUT --samples DATASET [--count 6]

`build` needs no Gradio (the notebook installs only requirements.txt): the Space's Gradio is the
`sdk_version` of app/README.md, the version the app's tests run with (tests/test_app.py checks it).
`push` refuses, before any network call, when no Hugging Face token is found (`hf auth login`, HF_TOKEN).

`build` writes
    OUT/app.py                 the app (app/app.py)
    OUT/helpers/...            the helpers modules the app imports (SPACE_MODULES, checked by the tests)
    OUT/requirements.txt       the third-party packages those files import (CPU torch from PyTorch's index)
    OUT/README.md              the Spaces front matter (sdk gradio at this Gradio's version) and a model card
    OUT/bundle/                the model bundle (or, with --hub-repo and no --bundle, only its Hub id)
    OUT/space_settings.json    where the app finds its model
    OUT/examples/              sample photos from the dataset's test split, unchanged, with ATTRIBUTION.md
    OUT/.gitattributes         large files through Git LFS (the Hub's rule for files over 10 MB)
Nothing existing is overwritten: OUT must be new or empty. OUT is assembled under a temporary name
beside it and renamed into place (`storage.atomic_new_folder`): a full disk is one line, and what a
killed build left is removed at the next one.

Samples: only photos whose licence is known to allow sharing (CC BY, CC BY-SA, no known restrictions;
the table in app/examples/coco_licences.json) where the dataset has any; then the most classes for
the fewest images.
"""
from __future__ import annotations

import argparse
import ast
import importlib.metadata as md
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree as ET

from .annotations import DatasetError, Record, load_records
from .config import VOC_CLASSES
from .storage import atomic_new_folder, refuse_existing, removed_temporaries
from .utils import network_failure
from .weights import CONFIG, WEIGHTS, read_bundle_config

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "app" / "app.py"
APP_README = ROOT / "app" / "README.md"  # its front matter's sdk_version: the Gradio the Space runs
KNOWN_LICENCES = ROOT / "app" / "examples" / "coco_licences.json"
SHAREABLE = ("Attribution License", "Attribution-ShareAlike License", "No known copyright restrictions",
             "United States Government Work")
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
# packages the Space's base image provides (Gradio at sdk_version) or that come with the interpreter
PROVIDED = {"gradio", "gradio_client"}
# The helpers modules a Space carries: what app/app.py imports, directly or through them. A list, not
# derived at build time, so that moving an import into or out of a function never changes what a Space
# holds; tests/test_app.py checks it covers the imports (`imported_modules`) and the built Space runs.
SPACE_MODULES = ("__init__", "boxes", "cam", "config", "imageio", "model", "plotting", "postprocess", "storage",
                 "targets", "transforms", "weights")
NO_TOKEN = ("no Hugging Face token found (HF_TOKEN is not set and `hf auth login` has saved none): run `hf auth login` "
            "with a token that can write (huggingface.co/settings/tokens), or set HF_TOKEN, then push again")


# --- what the app needs ---------------------------------------------------------------------------
def _tolerates_import_error(handler: ast.ExceptHandler) -> bool:
    """An `except ImportError` that carries on (raises nothing): what it guards is optional."""
    types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    catches = any(isinstance(t, ast.Name) and t.id in ("ImportError", "ModuleNotFoundError") for t in types)
    return catches and not any(isinstance(n, ast.Raise) for stmt in handler.body for n in ast.walk(stmt))


def _is_helpers_import(node: ast.AST) -> bool:
    if isinstance(node, ast.ImportFrom):
        return bool(node.level) or (node.module or "").split(".")[0] == "helpers"
    return isinstance(node, ast.Import) and any(a.name.split(".")[0] == "helpers" for a in node.names)


def read_imports(path: Path, lazy_helpers: bool) -> tuple[set[str], set[str]]:
    """(helpers modules, third-party top-level modules) that `path` imports.

    Third-party imports count wherever they are (a superset is harmless in requirements.txt), except
    optional ones, tried under `except ImportError` (e.g. IPython for notebook display); helpers
    modules imported inside functions count only with `lazy_helpers` (for the app itself): inside
    helpers they are extras of paths the app does not take (e.g. plotting's analysis, which brings
    torchmetrics), and the test that runs the built Space catches any the app really needs.
    """
    helpers, external = set(), set()
    tree = ast.parse(path.read_text(), filename=str(path))
    in_functions = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                    for n in ast.walk(f) if n is not f}
    optional = {id(n) for t in ast.walk(tree) if isinstance(t, ast.Try) and any(_tolerates_import_error(h) for h in t.handlers)
                for stmt in t.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in optional and not _is_helpers_import(node):
            continue
        names: set[str] = set()
        if isinstance(node, ast.ImportFrom):
            parts = (node.module or "").split(".")
            if node.level or parts[0] == "helpers":
                inner = parts if node.level else parts[1:]
                names = {inner[0]} if inner and inner[0] else {a.name for a in node.names}
            else:
                external.add(parts[0])
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == "helpers" and len(parts) > 1:
                    names.add(parts[1])
                elif parts[0] != "helpers":
                    external.add(parts[0])
        if names and (lazy_helpers or id(node) not in in_functions):
            helpers |= names
    return helpers, external


def imported_modules(app: Path = APP, lazy: bool = False) -> set[str]:
    """The helpers modules `app` imports, transitively, read from the code: the app's own imports
    wherever they are, those of helpers modules only at module level (or everywhere with `lazy`)."""
    package = ROOT / "helpers"
    todo, seen = [app], set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        mods, _ = read_imports(path, lazy_helpers=lazy or path == app)
        todo += [package / f"{m}.py" for m in mods if (package / f"{m}.py").is_file()]
    return {p.stem for p in seen if p != app} | {"__init__"}


def app_modules(app: Path = APP, modules: tuple[str, ...] = SPACE_MODULES) -> tuple[list[Path], set[str]]:
    """The helpers files a Space carries (`modules`) and the third-party modules they and the app import."""
    files = sorted(ROOT / "helpers" / f"{m}.py" for m in modules)
    external = set().union(*(read_imports(path, lazy_helpers=False)[1] for path in [app, *files]))
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    return files, {m for m in external if m not in stdlib}


def requirements(external: set[str]) -> str:
    """requirements.txt for the third-party modules: distributions found from the installed packages,
    each at least the version tested here; torch and torchvision from the CPU wheel index."""
    dists = md.packages_distributions()
    lines = [f"--extra-index-url {CPU_TORCH_INDEX}"]
    names = set()
    for module in sorted(external):
        if module in PROVIDED:
            continue
        for dist in dists.get(module, [module]):
            names.add(dist)
    for dist in sorted(names, key=str.lower):
        try:
            version = md.version(dist)
        except md.PackageNotFoundError:
            lines.append(dist)
            continue
        release = ".".join(version.split("+")[0].split(".")[:2])  # 2.14.1+cpu -> 2.14
        lines.append(f"{dist}>={release}")
    return "\n".join(lines) + "\n"


# --- samples --------------------------------------------------------------------------------------
@dataclass
class Sample:
    record: Record
    licence: str | None  # the licence name when known
    credit: str  # one line: where the photo comes from


def _known_licences(path: Path = KNOWN_LICENCES) -> dict:
    return json.loads(path.read_text())["images"] if path.is_file() else {}


def _xml_source(record: Record) -> dict:
    """What a VOC annotation says of the photo's origin (<source>, <owner>), if anything."""
    if record.label_path is None or record.label_path.suffix != ".xml":
        return {}
    try:
        root = ET.parse(record.label_path).getroot()
    except (ET.ParseError, OSError):
        return {}
    return {k: (root.findtext(p) or "").strip() for k, p in (
        ("database", "source/database"), ("image", "source/image"), ("flickrid", "source/flickrid"),
        ("owner", "owner/name"), ("owner_flickrid", "owner/flickrid")) if (root.findtext(p) or "").strip()}


def describe(record: Record, known: dict) -> Sample:
    stem = record.image_path.stem
    if stem in known:
        k = known[stem]
        credit = (f"MS COCO 2017 {k['coco_split']} id {k['coco_id']} ({k['coco_url']}); Flickr photo "
                  f"{k['flickr_url']} (photographer not recorded by COCO); licence {k['licence']} "
                  f"({k['licence_url']})")
        return Sample(record, k["licence"], credit)
    src = _xml_source(record)
    parts = [src.get("database", f"dataset folder {record.image_path.parents[1].name}")]
    if src.get("image"):
        parts.append(f"image from {src['image']}" + (f" (id {src['flickrid']})" if src.get("flickrid") else ""))
    if src.get("owner") or src.get("owner_flickrid"):
        parts.append(f"owner {src.get('owner') or src.get('owner_flickrid')}")
    parts.append("licence not recorded: the dataset's terms apply")
    return Sample(record, None, "; ".join(parts))


def choose_samples(records: list[Record], count: int, known: dict | None = None) -> list[Sample]:
    """Up to `count` photos with objects, greedily the most new classes first, then by name. Where
    some photos have a licence known to allow sharing, only those are taken (a public Space should
    not carry photos of unknown terms); where none is known (e.g. PASCAL VOC itself, Flickr photos
    under the VOC terms), the photos are taken as they come, with what their annotations say."""
    known = _known_licences() if known is None else known
    samples = sorted((describe(r, known) for r in records if len(r.labels)), key=lambda s: s.record.image_path.name)
    pool = [s for s in samples if s.licence in SHAREABLE] or samples
    chosen: list[Sample] = []
    covered: set[int] = set()
    while pool and len(chosen) < count:
        best = max(pool, key=lambda s: (len(set(s.record.labels.tolist()) - covered), -pool.index(s)))
        pool.remove(best)
        chosen.append(best)
        covered |= set(best.record.labels.tolist())
    return chosen


def write_samples(dataset: str | Path, out: str | Path, split: str = "test", count: int = 6,
                  classes=VOC_CLASSES) -> list[Path]:
    """Copy chosen test-split photos (bytes unchanged) into the new folder `out` with ATTRIBUTION.md
    (written atomically: `storage.atomic_new_folder`)."""
    out = Path(out)
    refuse_existing(out)
    records = load_records(dataset, split, classes)
    from .imageio import ImageError, read_image

    usable = []
    for r in records:
        try:
            read_image(r.image_path, max_side=64)
            usable.append(r)
        except ImageError as e:
            print(f"sample skipped: {e}", file=sys.stderr)
    chosen = choose_samples(usable, count)
    if not chosen:
        raise DatasetError(f"{dataset}: no usable image with objects in split {split!r}")
    lines = ["# Sample images", "",
             f"{len(chosen)} photos from the `{split}` split of the dataset `{_dataset_name(dataset)}`, copied unchanged "
             "(the app shows them as examples). Where licences are known, only photos whose licence allows "
             "sharing were taken.", "",
             "| file | objects | licence | source and credit |", "|---|---|---|---|"]
    for s in chosen:
        names = sorted({classes[c] for c in s.record.labels.tolist()})
        lines.append(f"| {s.record.image_path.name} | {', '.join(names)} | {s.licence or 'not recorded'} | {s.credit} |")
    known = _known_licences()
    if any(s.record.image_path.stem in known for s in chosen):
        lines += ["", "Boxes drawn on these photos by the app are the model's, not COCO's. The COCO "
                  "annotations behind the dataset are CC BY 4.0, (c) COCO Consortium. The images remain "
                  "under the licences above, as the Flickr terms of use and the COCO terms of use say."]

    def fill(folder: Path) -> None:
        for s in chosen:
            shutil.copyfile(s.record.image_path, folder / s.record.image_path.name)
        (folder / "ATTRIBUTION.md").write_text("\n".join(lines) + "\n")

    atomic_new_folder(out, fill)
    return [out / s.record.image_path.name for s in chosen]


def _dataset_name(dataset: str | Path) -> str:
    path = Path(dataset).resolve()
    return f"{path.parent.name}/{path.name}" if path.name.lower() == "vocdevkit" else path.name


# --- the Space ------------------------------------------------------------------------------------
def sdk_version(app_readme: Path = APP_README) -> str:
    """The Gradio version the Space runs: app/README.md's `sdk_version` (read, so that writing a Space
    needs no Gradio installed)."""
    front = app_readme.read_text().split("---")[1]
    for line in front.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "sdk_version" and value.strip():
            return value.strip()
    raise ValueError(f"{app_readme}: no sdk_version in its front matter")


def readme(title: str, info: dict | None, hub_repo: str | None, licence: str, gradio_version: str) -> str:
    front = ["---", f"title: {title}", "emoji: 🔎", "colorFrom: indigo", "colorTo: green", "sdk: gradio",
             f"sdk_version: {gradio_version}", "app_file: app.py", "pinned: false", f"license: {licence}",
             "short_description: YOLOv3 on PASCAL VOC with a Grad-CAM for each detection"]
    if hub_repo:
        front += ["models:", f"  - {hub_repo}"]
    front.append("---")
    body = ["", f"# {title}", "",
            "YOLOv3 (Darknet-53) trained from scratch on PASCAL VOC with PyTorch Lightning. Upload a photo or "
            "pick a sample: the app draws the detected objects of the 20 VOC classes, lists them, and shows "
            "the Grad-CAM of each detection (or EigenCAM).", ""]
    if info is not None:
        body.append(f"Model: width {info['width']}, {info.get('parameters', 0):,} parameters, trained at "
                    f"{info['image_size']} px; weights in `bundle/` (safetensors, no pickle).")
    if hub_repo:
        body.append(f"Model repo: https://huggingface.co/{hub_repo}")
    body += ["", "Sample photos and their licences: `examples/ATTRIBUTION.md`.", ""]
    return "\n".join(front + body)


def build(out: str | Path, bundle: str | Path | None, samples: str | Path | None, hub_repo: str | None = None,
          split: str = "test", count: int = 6, title: str = "YOLOv3 PASCAL VOC Grad-CAM",
          licence: str = "other") -> Path:
    out = Path(out)
    refuse_existing(out)
    if bundle is None and hub_repo is None:
        raise ValueError("give --bundle DIR, --hub-repo ID, or both: the Space needs a model")
    info = read_bundle_config(bundle) if bundle is not None else None  # a bad bundle fails before any write
    if info is not None and not (Path(bundle) / WEIGHTS).is_file():
        raise ValueError(f"{bundle}: {WEIGHTS} missing")
    hub_repo = hub_repo or (info or {}).get("hub_repo")
    gradio_version = sdk_version()

    def fill(folder: Path) -> None:
        shutil.copyfile(APP, folder / "app.py")
        files, external = app_modules()
        (folder / "helpers").mkdir()
        for f in files:
            shutil.copyfile(f, folder / "helpers" / f.name)
        (folder / "requirements.txt").write_text(requirements(external))
        settings = {"bundle": None, "hub_repo": hub_repo}
        if bundle is not None:
            (folder / "bundle").mkdir()
            for name in (WEIGHTS, CONFIG):
                shutil.copyfile(Path(bundle) / name, folder / "bundle" / name)
            settings["bundle"] = "bundle"
        (folder / "space_settings.json").write_text(json.dumps(settings, indent=2) + "\n")
        if samples is not None:
            write_samples(samples, folder / "examples", split=split, count=count)
        (folder / "README.md").write_text(readme(title, info, hub_repo, licence, gradio_version))
        (folder / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
                                               "*.jpg filter=lfs diff=lfs merge=lfs -text\n")

    return atomic_new_folder(out, fill)


def upload_command(out: str | Path, space: str = "<user>/<space>") -> str:
    """The huggingface_hub CLI (`hf`, since 1.0) commands that create the Space and push a built folder."""
    return (f"hf repos create {space} --repo-type space --space-sdk gradio --exist-ok && "
            f"hf upload {space} {out} . --repo-type space")


def push(out: str | Path, space: str, private: bool = False, token: str | None = None) -> str:
    """Create the Gradio Space `space` (user/name) if needed and upload the built folder `out` to it;
    returns the Space's URL. The token comes from `token`, else huggingface_hub's `get_token` (HF_TOKEN,
    `hf auth login`'s file, a Colab secret); with none, PermissionError before any network call
    (huggingface_hub would send the request and fail on the Hub's answer, or offline on the connection)."""
    try:
        from huggingface_hub import HfApi, get_token
        from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError
    except ImportError:
        raise PermissionError("pushing needs huggingface_hub: pip install huggingface_hub, then push again") from None

    out = Path(out)
    if not (out / "app.py").is_file() or not (out / "README.md").is_file():
        raise ValueError(f"{out}: not a built Space folder (no app.py/README.md): run `python -m helpers.space build` first")
    token = token or get_token()
    if not token:
        raise PermissionError(NO_TOKEN)
    api = HfApi(token=token)
    try:
        url = api.create_repo(space, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
        api.upload_folder(repo_id=space, folder_path=out, repo_type="space",
                          commit_message="Upload the YOLOv3 app (python -m helpers.space push)")
    except LocalTokenNotFoundError:
        raise PermissionError(NO_TOKEN) from None
    except HfHubHTTPError as e:
        raise PermissionError(f"the Hub refused {space}: {str(e).splitlines()[0]} (a write token for that "
                              "user or organisation is needed: `hf auth login`)") from None
    except Exception as e:
        if not network_failure(e):
            raise
        from huggingface_hub import constants

        raise ConnectionError(f"could not reach the Hugging Face Hub at {constants.ENDPOINT} ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else 'no answer'}): check the internet connection "
                              "(on Kaggle: Settings > Internet on), then push again") from None
    return str(url)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m helpers.space", description="Build a Hugging Face Space folder.")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="write a folder ready to push as a Space")
    b.add_argument("out")
    b.add_argument("--bundle", help="model bundle folder (helpers.export)")
    b.add_argument("--hub-repo", help="Hugging Face model repo with the bundle (downloaded by the Space)")
    b.add_argument("--samples", help="dataset folder (VOCdevkit or course layout) to take sample photos from")
    b.add_argument("--split", default="test")
    b.add_argument("--count", type=int, default=6)
    b.add_argument("--title", default="YOLOv3 PASCAL VOC Grad-CAM")
    b.add_argument("--license", default="other", help="the Space's licence id for its front matter")
    u = sub.add_parser("push", help="create the Gradio Space and upload a built folder (huggingface_hub)")
    u.add_argument("out", help="the folder `build` wrote")
    u.add_argument("--space", required=True, help="the Space's id, user/name (created if it does not exist)")
    u.add_argument("--private", action="store_true")
    s = sub.add_parser("samples", help="only write sample photos and their attribution")
    s.add_argument("out")
    s.add_argument("--samples", required=True)
    s.add_argument("--split", default="test")
    s.add_argument("--count", type=int, default=6)
    args = p.parse_args(argv)
    if args.command != "push" and (removed := removed_temporaries(Path(args.out).absolute().parent, recursive=False)):
        print(removed, file=sys.stderr)  # what a killed build left beside its folder
    try:
        if args.command == "build":
            out = build(args.out, args.bundle, args.samples, args.hub_repo, args.split, args.count, args.title,
                        args.license)
            print(f"Space written: {out}\n  push it with: python -m helpers.space push {out} --space <user>/<space>"
                  f"\n  or with the CLI:  {upload_command(out)}")
        elif args.command == "push":
            print(f"Space pushed: {push(args.out, args.space, args.private)}")
        else:
            for path in write_samples(args.samples, args.out, args.split, args.count):
                print(path)
    except (FileExistsError, ValueError, OSError) as e:  # PermissionError (the Hub's refusal), StorageFull: OSErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
