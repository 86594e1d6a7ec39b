"""Output folders of the deployment tool (a model from `fit`, a prediction from `predict`, an audit
from `audit`), written so that a production line never sees a half-written or destroyed folder.

Rules, for a target folder OUT:
- The whole folder is built under a hidden staging name beside OUT (`.OUT.staging-*`) and renamed
  into place only when complete; an existing OUT is moved aside first and deleted after the rename.
- One writer at a time: a lock file beside OUT (`.OUT.lock`, an flock, so the kernel releases it when
  a run is killed) refuses a second concurrent writer with a message naming the holder's pid.
- Leftovers of killed runs (`.OUT.staging-*`, `.OUT.old-*`, `.OUT.tmp-*` beside it, and the older
  `.predict-staging-*` inside it) are removed by the next run that holds the lock, and reported.
- An existing OUT is replaced only with `overwrite` and only when it is an output of the same kind
  (its marker file is there: `manifest.json` for a model, `predictions.json`, `audit.json`);
  anything else is an error saying what is there. An empty folder is used as if it did not exist.
- OUT may not be an input, hold one, or lie inside an input folder (with or without overwrite):
  inside the inputs it may hold images, and its own PNGs would be read as images by the next run.
- Files and folders get the permissions the umask gives (temp files start private, 0600/0700).
- An OSError that names no file (ENOSPC from a flush, say) is re-raised naming the folder.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence

from absl import logging


class OutputFolderError(ValueError):
    """The target folder cannot be used (not ours, holds the inputs, or another run writes it)."""


def umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(root: str) -> None:
    """chmod a freshly written tree to what the umask would have given (temp names start private)."""
    mask = umask()
    os.chmod(root, 0o777 & ~mask)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o777 & ~mask)
        for f in filenames:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p):
                os.chmod(p, 0o666 & ~mask)


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_target(
    target: str,
    marker: str,
    kind: str,
    *,
    overwrite: bool,
    inputs: Sequence[str] = (),
    input_folders: bool = True,
) -> None:
    """Raises unless `target` may be written: absent, empty, or (with overwrite) an earlier output
    of this kind; never a folder that is or holds an input, nor (input_folders: the inputs are
    image folders) one inside an input folder."""
    real = os.path.realpath(target)
    for src in inputs:
        src_real = os.path.realpath(src)
        if _inside(src_real, real):
            raise OutputFolderError(
                f"{kind} folder {target!r} holds the input {src!r}: writing there would destroy "
                "the images; choose another folder"
            )
        if input_folders and os.path.isdir(src_real) and _inside(real, src_real):
            raise OutputFolderError(
                f"{kind} folder {target!r} lies inside the input folder {src!r}: it may hold input "
                "images, and what is written there would be read as images by the next run; "
                "choose a folder outside the inputs"
            )
    if not os.path.lexists(target):
        return
    if not os.path.isdir(target):
        raise OutputFolderError(f"{kind} folder {target!r} exists and is a file, not a folder")
    entries = sorted(os.listdir(target))
    if not entries:
        return
    if not os.path.isfile(os.path.join(target, marker)):
        shown = ", ".join(entries[:8]) + (
            f", ... ({len(entries)} entries)" if len(entries) > 8 else ""
        )
        raise OutputFolderError(
            f"{kind} folder {target!r} exists and is not a {kind} written by this tool (no {marker}); "
            f"it holds: {shown}. Nothing was changed: choose another folder or empty it yourself"
        )
    if not overwrite:
        raise OutputFolderError(
            f"{kind} folder {target!r} already holds a {kind} from an earlier run; pass "
            "--overwrite to replace it, or choose another folder"
        )


@contextlib.contextmanager
def lock(target: str) -> Iterator[str]:
    """An exclusive flock on `.NAME.lock` beside target; OutputFolderError if another run holds it."""
    parent, name = os.path.split(os.path.abspath(target))
    path = os.path.join(parent, f".{name}.lock")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~umask())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise OutputFolderError(
                    f"another run (pid {holder}) is writing {target!r} (lock {path!r}); wait for "
                    "it to finish or choose another folder"
                ) from None
            raise
        # The file may have been unlinked by the previous holder between our open and flock.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def clean_leftovers(target: str) -> list[str]:
    """Removes (and returns) what killed runs left beside or inside target; call under the lock."""
    parent, name = os.path.split(os.path.abspath(target))
    found = []
    for pattern in (f".{name}.staging-*", f".{name}.old-*", f".{name}.tmp-*"):
        found += glob.glob(os.path.join(glob.escape(parent), pattern))
    if os.path.isdir(target):
        found += glob.glob(os.path.join(glob.escape(target), ".predict-staging-*"))
    for path in sorted(found):
        logging.warning("removing %s, left by an interrupted run", path)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(path)
    return sorted(found)


@contextlib.contextmanager
def staged(
    target: str,
    marker: str,
    kind: str,
    *,
    overwrite: bool = False,
    inputs: Sequence[str] = (),
    input_folders: bool = True,
) -> Iterator[tuple[str, list[str]]]:
    """Yields (staging folder, cleaned leftovers); on a clean exit the staging folder replaces
    target whole. On any error the staging folder is removed and target is untouched."""
    target = os.path.abspath(target)
    parent, name = os.path.split(target)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise PermissionError(f"folder {parent!r} is not writable: {e.strerror or e}") from e
    check = dict(overwrite=overwrite, inputs=inputs, input_folders=input_folders)
    check_target(target, marker, kind, **check)
    try:
        lock_cm = lock(target)
        lock_cm.__enter__()
    except PermissionError as e:
        raise PermissionError(f"folder {parent!r} is not writable: {e.strerror or e}") from e
    try:
        check_target(target, marker, kind, **check)  # again, now under the lock
        cleaned = clean_leftovers(target)
        try:
            stage = tempfile.mkdtemp(prefix=f".{name}.staging-", dir=parent)
        except OSError as e:
            raise PermissionError(f"folder {parent!r} is not writable: {e.strerror or e}") from e
        try:
            yield stage, cleaned
            apply_umask(stage)
            if os.path.lexists(target):
                old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
                os.replace(target, os.path.join(old, name))
                os.replace(stage, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(stage, target)
        except OSError as e:
            if e.filename is None:
                raise OSError(e.errno, e.strerror, target) from e
            raise
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    finally:
        lock_cm.__exit__(None, None, None)
