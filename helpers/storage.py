"""Writing that never replaces anything: files and folders appear whole under their final name or not
at all, an existing one is refused, a full disk is one line saying how much was free.

- `atomic_write_new(path, write)`: one file (checkpoints, weights, the schedule file).
- `atomic_new_folder(out, fill)`: one folder of files (a model bundle).
- `refuse_existing(out)`: the refusal both use for a folder that exists and is not empty.

Both write beside the target under a hidden temporary name (`TEMPORARY`), fsync, then move it into
place; whatever fails, the temporary is removed (a kill leaves it: `checkpoints.remove_temporaries`).
Standard library only: anything may import this module.
"""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

TEMPORARY = ".*.tmp"  # what atomic_write_new and atomic_new_folder leave behind when killed mid-write
FULL_DISK = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
EMPTY_TRASH = ("on Google Drive, files deleted through the mount go to the Trash and still count: empty it at "
               "drive.google.com/drive/trash")


class StorageFull(OSError):
    """A file could not be written for lack of space; nothing that existed was touched."""


def human(n: float) -> str:
    """Bytes for a person: 740 MB, 6.43 GB."""
    if n >= 1e9:
        return f"{n / 1e9:.2f} GB"
    return f"{n / 1e6:.0f} MB" if n >= 1e6 else f"{n / 1e3:.0f} KB" if n >= 1e3 else f"{int(n)} B"


def free_bytes(folder: str | os.PathLike) -> int:
    """Free bytes where `folder` is (or would be created)."""
    folder = Path(folder).absolute()
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free


def refuse_existing(out: str | os.PathLike, what: str = "nothing is overwritten") -> None:
    """FileExistsError if `out` exists and is not an empty folder; `what` ends the message."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not empty; {what}: choose a new folder")


class _WriteErrors:
    """A file object that remembers the OSError its `write` raised: torch.save's zip writer turns it
    into a RuntimeError ("unexpected pos ...") that no longer says the disk is full."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.f.flush()


def _storage_full(cause: BaseException, path: Path, advice: str) -> StorageFull | None:
    """The one-line StorageFull for `cause` if it is a full disk, else None."""
    if not (isinstance(cause, OSError) and cause.errno in FULL_DISK):
        return None
    return StorageFull(cause.errno, f"could not write {path}: no space left ({human(free_bytes(path.parent))} free "
                                    f"in {path.parent}). {advice}")


def atomic_write_new(path: str | os.PathLike, write: Callable[[BinaryIO], object], *,
                     advice: str = f"Nothing existing was changed. Free some space ({EMPTY_TRASH}) and rerun") -> Path:
    """Create `path` atomically with `write(file)`; never replaces an existing file.

    The bytes go to a temporary file beside the target, are fsynced, then hard-linked to the final
    name (which fails if it exists). Filesystems without hard links (some FUSE mounts) fall back to
    an existence check and a rename. Whatever fails, the temporary file is removed; a full disk
    (ENOSPC, EDQUOT) raises `StorageFull`: what could not be written, how much was free, then `advice`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    recorder = None
    try:
        try:
            with os.fdopen(fd, "wb") as f:
                recorder = _WriteErrors(f)
                write(recorder)
                f.flush()
                os.fsync(f.fileno())
        except Exception as e:  # noqa: BLE001 - re-raised below, as one clear line when the disk is full
            full = _storage_full(recorder.error if recorder is not None and recorder.error is not None else e,
                                 path, advice)
            if full is not None:
                os.unlink(tmp)
                raise full from None
            raise
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise FileExistsError(f"{path} exists; it is never overwritten") from None
        except OSError:
            if path.exists():
                raise FileExistsError(f"{path} exists; it is never overwritten") from None
            os.rename(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_new_folder(out: str | os.PathLike, fill: Callable[[Path], object], *,
                      what: str = "nothing is overwritten",
                      advice: str = f"Nothing existing was changed. Free some space ({EMPTY_TRASH}) and rerun") -> Path:
    """Create the folder `out` atomically: `fill(tmp)` writes files into a temporary folder beside it,
    they are fsynced, and the folder is renamed to `out`. Refuses (`refuse_existing`, ending with
    `what`) an `out` that exists and is not empty, before and again just before the rename; an empty
    `out` is replaced (POSIX renames onto empty folders only). A full disk raises `StorageFull`."""
    out = Path(out)
    refuse_existing(out, what)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        try:
            fill(tmp)
            for f in tmp.iterdir():
                with open(f, "rb") as handle:
                    os.fsync(handle.fileno())
        except OSError as e:
            full = _storage_full(e, out, advice)
            if full is not None:
                raise full from None
            raise
        refuse_existing(out, what)  # again: someone may have created it meanwhile
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
