"""The one writer: every file the project writes appears whole under its final name or not at all, a
full disk is one line saying how much was free, and what a kill leaves is removed at the next start.

- `atomic_write(path, write, replace=...)`: one file; `replace=False` (checkpoints, weights, the
  schedule file) refuses an existing one, `replace=True` (metrics.json, plots, config files) swaps
  the new content in. `atomic_write_text`, `write_figure`: text and matplotlib figures through it.
- `atomic_new_folder(out, fill)`: one folder of files (a model bundle, a Space).
- `append_text(path, text)`: rows added to a log (the CSV log): all of `text` or none of it.
- `refuse_existing(out)`: the refusal both folder writers use for a folder that exists and is not empty.
- `remove_temporaries(folder)`: what writes killed mid-way left (run it at start);
  `removed_temporaries(*folders)`: the same, as the line to print (None when nothing was left).

The writers write beside the target under a hidden temporary name (`.<name>.<random>.<pid>.tmp`),
fsync, then move it into place; whatever fails, the temporary is removed. A kill leaves it, and the
next start removes it (`remove_temporaries`: only those of processes no longer running).
Standard library only: anything may import this module.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

TEMPORARY = ".*.tmp"  # the glob of what the writers leave behind when killed mid-write
# .<target name>.<mkstemp's 8 random characters>.<writer's pid>.tmp; before the pid: .<target>.<random>.tmp
_TEMPORARY_NAME = (re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.(?P<pid>\d+)\.tmp$"),
                   re.compile(r"^\.(?P<target>.+)\.[A-Za-z0-9_]+\.tmp$"))
FULL_DISK = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
EMPTY_TRASH = ("on Google Drive, files deleted through the mount go to the Trash and still count: empty it at "
               "drive.google.com/drive/trash")
RERUN = f"Nothing existing was changed. Free some space ({EMPTY_TRASH}) and rerun"


class StorageFull(OSError):
    """A file could not be written for lack of space; nothing that existed was touched."""

    def __str__(self) -> str:  # the sentence alone, without OSError's "[Errno 28]"
        return self.strerror or super().__str__()


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


def _open(path: Path, mode: str, buffering: int = -1) -> BinaryIO:
    """Every file the writers write is opened here (one place to watch, and for tests to fail)."""
    fd = os.open(path, os.O_WRONLY | (os.O_APPEND | os.O_CREAT if "a" in mode else os.O_TRUNC), 0o666)
    return os.fdopen(fd, mode) if buffering == -1 else os.fdopen(fd, mode, buffering)


def full_disk(cause: BaseException, path: str | os.PathLike, advice: str = RERUN) -> StorageFull | None:
    """The one-line StorageFull for `cause` if it is a full disk (ENOSPC, EDQUOT, or EFBIG: a file
    size limit) met while writing `path`, else None."""
    if not (isinstance(cause, OSError) and cause.errno in FULL_DISK):
        return None
    path = Path(path)
    return StorageFull(cause.errno, f"could not write {path}: no space left ({human(free_bytes(path.parent))} free "
                                    f"in {path.parent}). {advice}")


def _temporary_beside(path: Path, folder: bool = False) -> Path:
    """A new hidden temporary file (or folder) beside `path`, named for it and for this process."""
    make = tempfile.mkdtemp if folder else tempfile.mkstemp
    made = make(prefix=f".{path.name}.", suffix=f".{os.getpid()}.tmp", dir=path.parent)
    if not folder:
        os.close(made[0])
        made = made[1]
    return Path(made)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object], *, replace: bool = False,
                 advice: str = RERUN) -> Path:
    """Create (or with `replace`, replace) `path` atomically with `write(file)`.

    The bytes go to a temporary file beside the target and are fsynced. Without `replace` the file
    is then hard-linked to the final name, which fails if it exists (FileExistsError: never
    overwritten); filesystems without hard links (some FUSE mounts) fall back to an existence check
    and a rename. With `replace` it is renamed over the target, which readers see whole, old or new.
    Whatever fails, the temporary file is removed and the target is as it was; a full disk raises
    `StorageFull`: what could not be written, how much was free, then `advice`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_beside(path)
    recorder = None
    try:
        try:
            with _open(tmp, "wb") as f:
                recorder = _WriteErrors(f)
                write(recorder)
                f.flush()
                os.fsync(f.fileno())
        except Exception as e:  # noqa: BLE001 - re-raised below, as one clear line when the disk is full
            full = full_disk(recorder.error if recorder is not None and recorder.error is not None else e,
                             path, advice)
            if full is not None:
                raise full from None
            raise
        if replace:
            os.replace(tmp, path)
            return path
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise FileExistsError(f"{path} exists; it is never overwritten") from None
        except OSError:
            if path.exists():
                raise FileExistsError(f"{path} exists; it is never overwritten") from None
            os.rename(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_new(path: str | os.PathLike, write: Callable[[BinaryIO], object], *, advice: str = RERUN) -> Path:
    """`atomic_write` of a file that must not exist yet (checkpoints, weights, the schedule file)."""
    return atomic_write(path, write, replace=False, advice=advice)


def atomic_write_text(path: str | os.PathLike, text: str, *, replace: bool = True, advice: str = RERUN) -> Path:
    """`text` (UTF-8) as the whole content of `path`, atomically (`atomic_write`)."""
    data = text.encode()
    return atomic_write(path, lambda f: f.write(data), replace=replace, advice=advice)


def write_figure(fig, path: str | os.PathLike, *, advice: str = RERUN, **savefig) -> Path:
    """A matplotlib figure saved as `path` (format from its suffix), atomically, replacing one there."""
    path = Path(path)
    fmt = path.suffix.lstrip(".") or "png"
    return atomic_write(path, lambda f: fig.savefig(f, format=fmt, **savefig), replace=True, advice=advice)


def append_text(path: str | os.PathLike, text: str, *, advice: str = RERUN) -> Path:
    """Add `text` at the end of `path` (created if missing), all of it or none: on any failure the
    file is cut back to its length before, and a full disk raises `StorageFull`. One write call, so
    a kill cannot split a short row (`trim_partial_line` mends a longer one at the next start)."""
    path = Path(path)
    data = text.encode()
    with _open(path, "ab", buffering=0) as f:  # unbuffered: nothing left to flush after a failure
        size = f.seek(0, os.SEEK_END)
        try:
            done = 0
            while done < len(data):
                done += f.write(data[done:])
        except BaseException as e:
            f.truncate(size)  # frees what the partial write took; needs no space
            full = full_disk(e, path, advice)
            if full is not None:
                raise full from None
            raise
    return path


def trim_partial_line(path: str | os.PathLike) -> int:
    """Cut `path` back to its last complete line (a row a kill cut short); returns the bytes cut."""
    path = Path(path)
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        f.seek(max(size - 65536, 0))
        tail = f.read()
        if tail.endswith(b"\n"):
            return 0
        cut = tail.rfind(b"\n")
        keep = (size - len(tail) + cut + 1) if cut >= 0 else (0 if size <= 65536 else size)
        f.truncate(keep)
        return size - keep


def atomic_new_folder(out: str | os.PathLike, fill: Callable[[Path], object], *,
                      what: str = "nothing is overwritten", advice: str = RERUN) -> Path:
    """Create the folder `out` atomically: `fill(tmp)` writes files into a temporary folder beside it,
    they are fsynced, and the folder is renamed to `out`. Refuses (`refuse_existing`, ending with
    `what`) an `out` that exists and is not empty, before and again just before the rename; an empty
    `out` is replaced (POSIX renames onto empty folders only). A full disk raises `StorageFull`;
    whatever fails, the temporary folder is removed."""
    out = Path(out)
    refuse_existing(out, what)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_beside(out, folder=True)
    try:
        try:
            fill(tmp)
            for f in tmp.rglob("*"):
                if f.is_file():
                    with open(f, "rb") as handle:
                        os.fsync(handle.fileno())
        except OSError as e:
            full = full_disk(e, out, advice)
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


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process is starting: nothing of its own is being written yet
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_temporaries(folder: str | os.PathLike, recursive: bool = True) -> tuple[int, int]:
    """Delete the temporary files and folders that writes killed mid-way left in `folder` (and its
    subfolders): (how many, bytes freed). Those of a process still running (a writer at work) stay.
    Run it at start, before anything writes there."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0, 0
    count = freed = 0
    for tmp in sorted(folder.rglob(TEMPORARY) if recursive else folder.glob(TEMPORARY)):  # a folder before its files
        ours, legacy = (pattern.match(tmp.name) for pattern in _TEMPORARY_NAME)
        if not (ours or legacy) or (ours and _running(int(ours["pid"]))) or not os.path.lexists(tmp):
            continue
        try:
            if tmp.is_dir() and not tmp.is_symlink():
                size = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
                shutil.rmtree(tmp)
            else:
                size = tmp.stat().st_size
                tmp.unlink()
        except FileNotFoundError:
            continue
        count, freed = count + 1, freed + size
    return count, freed


def removed_temporaries(*folders: str | os.PathLike, recursive: bool = True) -> str | None:
    """`remove_temporaries` on each folder, said in one line (None when there was nothing)."""
    count = freed = 0
    for folder in folders:
        removed, size = remove_temporaries(folder, recursive=recursive)
        count, freed = count + removed, freed + size
    if not count:
        return None
    return (f"removed {count} temporary file(s) or folder(s) left by an interrupted write in "
            f"{' and '.join(map(str, folders))}, {human(freed)} freed")
