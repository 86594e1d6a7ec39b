"""Output folders the project writes (a model from `fit`, a prediction from `predict`, an audit, a
demo dataset), written so that a production line never sees a half-written folder and nothing the
tool did not write is ever deleted.

Rules, for a target folder OUT:
- Ownership: every folder written here gets a list of the files and folders this tool put there
  (`OUT/.softpatch-owned.json`, with the kind: model, prediction, audit, demo, demo dataset). An
  existing OUT is replaced only with `overwrite`, only when its list names this kind, and only when
  every entry in it is on its list (a sub-folder with its own list, such as MODEL/audit, is judged
  by that list). Anything else present (a photo copied in, a NOTES.txt, a folder with a stray
  marker file but no list) is a refusal naming the first foreign file; nothing is changed. An empty
  folder is used as if it did not exist.
- The whole folder is built under a hidden staging name beside OUT (`.OUT.staging-*`) and renamed
  into place only when complete; an existing OUT is moved aside (`.OUT.old-*`), checked again and
  deleted only after the rename, and only if it still holds nothing foreign (else it is kept, and
  named in a warning).
- One writer at a time: a lock file beside OUT (`.OUT.lock`, an flock, so the kernel releases it when
  a run is killed) refuses a second concurrent writer with a message naming the holder's pid.
- Leftovers of killed runs: staging folders (`.OUT.staging-*`, `.OUT.tmp-*` beside it, the older
  `.predict-staging-*` inside it) are incomplete and removed by the next run that holds the lock.
  `.OUT.old-*` may hold the only copy of the previous output (a run killed between its two renames):
  when OUT is missing the newest one is restored to OUT first (and then judged as OUT), and all of
  them are kept until the new output is in place. Every leftover is reported.
- OUT may not be an input, hold one, or lie inside an input folder (with or without overwrite):
  inside the inputs it may hold images, and its own PNGs would be read as images by the next run.
  `check_outside` refuses an OUT inside a folder that must stay as it is (a model's folder).
- Files and folders get the permissions the umask gives (temp files start private, 0600/0700).
- An OSError that names no file (ENOSPC from a flush, or from the lock's pid) is re-raised naming
  the file or folder.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence

from absl import logging

from softpatch_jax import io_utils

OWNED = ".softpatch-owned.json"  # the list of what this tool wrote into a folder
# What a killed run of this tool leaves (staging/old/temp folders and lock files, see `staged`,
# and the older `.predict-staging-*`): ours by construction, so never foreign.
_LEFTOVER = re.compile(r"\.(predict-staging-.+|.+\.(staging|old|tmp)-[^/]+|.+\.lock)")


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


def write_owned(folder: str, kind: str) -> None:
    """Records every file, link and folder now under `folder` as written by this tool."""
    files, folders = [], []
    for dirpath, dirnames, filenames in os.walk(folder):
        rel = os.path.relpath(dirpath, folder)
        for d in dirnames:
            path = os.path.normpath(os.path.join(rel, d))
            (files if os.path.islink(os.path.join(dirpath, d)) else folders).append(path)
        files += [os.path.normpath(os.path.join(rel, f)) for f in filenames]
    record = {
        "tool": "softpatch_jax",
        "kind": kind,
        "doc": "what this tool wrote here; --overwrite replaces this folder only while it holds "
        "nothing else (softpatch_jax/outdir.py)",
        "folders": sorted(folders),
        "files": sorted(f for f in files if f != OWNED),
    }
    io_utils.write_json(os.path.join(folder, OWNED), record)


def read_owned(folder: str) -> dict | None:
    """The ownership record of `folder`, or None when it has none (or an unreadable one)."""
    path = os.path.join(folder, OWNED)
    if not os.path.isfile(path) or os.path.islink(path):
        return None
    try:
        record = io_utils.read_json(path)
    except (OSError, ValueError):
        return None
    ok = isinstance(record, dict) and record.get("tool") == "softpatch_jax"
    return record if ok and isinstance(record.get("files"), list) else None


def first_foreign(folder: str) -> str | None:
    """The first entry under `folder` (sorted, depth first) that its ownership record does not
    list, as a path relative to `folder`; None when everything there was written by this tool."""
    record = read_owned(folder)
    entries = sorted(e for e in os.listdir(folder) if not _LEFTOVER.fullmatch(e))
    if record is None:
        return entries[0] if entries else None
    files = set(map(os.path.normpath, record["files"]))
    folders = set(map(os.path.normpath, record.get("folders", [])))
    for dirpath, dirnames, filenames in os.walk(folder):
        rel = os.path.relpath(dirpath, folder)
        for f in sorted(filenames):
            name = os.path.normpath(os.path.join(rel, f))
            if name not in files and name != OWNED and not _LEFTOVER.fullmatch(f):
                return name
        descend = []
        for d in sorted(dirnames):
            name = os.path.normpath(os.path.join(rel, d))
            if _LEFTOVER.fullmatch(d) and name not in folders:
                continue
            full = os.path.join(dirpath, d)
            if os.path.islink(full):
                if name not in files:
                    return name
            elif name not in folders:
                return name
            elif read_owned(full) is not None:  # a sub-folder with its own record (MODEL/audit)
                inner = first_foreign(full)
                if inner is not None:
                    return os.path.join(name, inner)
            else:
                descend.append(d)
        dirnames[:] = descend
    return None


def _old_leftovers(target: str) -> list[str]:
    """`.NAME.old-*` folders beside target that hold a previous NAME, newest first."""
    parent, name = os.path.split(os.path.abspath(target))
    found = glob.glob(os.path.join(glob.escape(parent), f".{name}.old-*"))
    held = [p for p in found if os.path.lexists(os.path.join(p, name))]
    return sorted(held, key=lambda p: os.lstat(os.path.join(p, name)).st_mtime, reverse=True)


def check_outside(target: str, folder: str, what: str, *, allowed: Sequence[str] = ()) -> None:
    """OutputFolderError when `target` is `folder`, lies inside it or holds it (except the paths in
    `allowed`): writing there would change a folder that must stay as it is (a model)."""
    real, keep = os.path.realpath(target), os.path.realpath(folder)
    if any(real == os.path.realpath(a) for a in allowed):
        return
    if _inside(real, keep) or _inside(keep, real):
        raise OutputFolderError(
            f"output folder {target!r} lies inside (or holds) the {what} {folder!r}: writing there "
            f"would change the {what} (its checksums would no longer match); choose a folder "
            f"outside it"
        )


def check_target(
    target: str,
    marker: str,
    kind: str,
    *,
    overwrite: bool,
    inputs: Sequence[str] = (),
    input_folders: bool = True,
) -> None:
    """Raises unless `target` may be written: absent, empty, or (with overwrite) a folder of this
    kind holding only what this tool wrote there (see module docstring); never a folder that is or
    holds an input, nor (input_folders: the inputs are image folders) one inside an input folder.
    A missing target with a crash leftover (`.OUT.old-*`) is judged by that leftover, which the
    writer restores first. `marker` (the kind's main file) is named in messages only."""
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
    judged, note = target, ""
    if not os.path.lexists(target):
        old = _old_leftovers(target)
        if not old:
            return
        judged = os.path.join(old[0], os.path.basename(os.path.abspath(target)))
        note = (
            f" (an interrupted run left its previous contents in {old[0]!r}; a run that writes "
            "here restores them first)"
        )
    if not os.path.isdir(judged) or os.path.islink(judged):
        raise OutputFolderError(f"{kind} folder {target!r} exists and is not a folder")
    entries = sorted(os.listdir(judged))
    if not entries:
        return
    record = read_owned(judged)
    if record is None:
        shown = ", ".join(entries[:8]) + (
            f", ... ({len(entries)} entries)" if len(entries) > 8 else ""
        )
        why = (
            f"holds a {marker} but no list of the files this tool wrote ({OWNED}: a folder of an "
            "older version, or not ours)"
            if os.path.lexists(os.path.join(judged, marker))
            else f"is not a {kind} written by this tool (no {OWNED})"
        )
        raise OutputFolderError(
            f"{kind} folder {target!r} exists and {why}; it holds: {shown}{note}. Nothing was "
            "changed: choose another folder, or move its contents away yourself"
        )
    if record.get("kind") != kind:
        raise OutputFolderError(
            f"{kind} folder {target!r} holds a {record.get('kind')} written by this tool, not a "
            f"{kind}{note}; nothing was changed: choose another folder"
        )
    foreign = first_foreign(judged)
    if foreign is not None:
        raise OutputFolderError(
            f"{kind} folder {target!r} holds {foreign!r}, which this tool did not write{note}: "
            "--overwrite replaces only what this tool wrote there. Nothing was changed: move it "
            "away, or choose another folder"
        )
    if not overwrite:
        raise OutputFolderError(
            f"{kind} folder {target!r} already holds a {kind} from an earlier run{note}; pass "
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
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        except OSError as e:  # ENOSPC names no file
            raise OSError(e.errno, e.strerror, path) from e
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def _restore(target: str) -> str | None:
    """Moves the newest `.OUT.old-*/OUT` back to a missing target; returns where it was."""
    if os.path.lexists(target):
        return None
    old = _old_leftovers(target)
    if not old:
        return None
    os.replace(os.path.join(old[0], os.path.basename(target)), target)
    with contextlib.suppress(OSError):
        os.rmdir(old[0])
    logging.warning("restored %s from %s, left by an interrupted run", target, old[0])
    return old[0]


def clean_leftovers(target: str) -> list[str]:
    """Removes (and returns) the staging folders killed runs left beside or inside target; call
    under the lock. `.OUT.old-*` are not touched here (see `staged`)."""
    parent, name = os.path.split(os.path.abspath(target))
    found = []
    for pattern in (f".{name}.staging-*", f".{name}.tmp-*"):
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


def _discard(old: str, name: str) -> None:
    """Deletes a moved-aside earlier output (`old`/`name`, or a bare `.OUT.old-*` folder) when it
    holds only what this tool wrote; otherwise keeps it and says where."""
    inner = os.path.join(old, name)
    if not os.path.lexists(inner):
        with contextlib.suppress(OSError):
            os.rmdir(old)
        return
    foreign = first_foreign(inner) if os.path.isdir(inner) else name
    if foreign is None and read_owned(inner) is not None:
        shutil.rmtree(old, ignore_errors=True)
    else:
        logging.warning(
            "kept %s: the earlier output holds %r, which this tool did not write", inner, foreign
        )


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
    """Yields (staging folder, leftovers of killed runs); on a clean exit the staging folder gets
    its ownership record and replaces target whole. On any error the staging folder is removed
    and target is untouched (or restored from a crash leftover)."""
    target = os.path.abspath(target)
    parent, name = os.path.split(target)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise PermissionError(f"folder {parent!r} is not writable: {e.strerror or e}") from e
    check = dict(overwrite=overwrite, inputs=inputs, input_folders=input_folders)
    try:
        lock_cm = lock(target)
        lock_cm.__enter__()
    except PermissionError as e:
        raise PermissionError(f"folder {parent!r} is not writable: {e.strerror or e}") from e
    try:
        restored = _restore(target)  # first, so a refused run leaves the output where it belongs
        check_target(target, marker, kind, **check)
        olds = [p for p in glob.glob(os.path.join(glob.escape(parent), f".{name}.old-*"))]
        cleaned = sorted(clean_leftovers(target) + olds + ([restored] if restored else []))
        try:
            stage = tempfile.mkdtemp(prefix=f".{name}.staging-", dir=parent)
        except OSError as e:
            raise PermissionError(f"folder {parent!r} is not writable: {e.strerror or e}") from e
        try:
            yield stage, cleaned
            write_owned(stage, kind)
            apply_umask(stage)
            if os.path.lexists(target):
                check_target(target, marker, kind, **check)  # nothing foreign arrived meanwhile
                old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
                os.replace(target, os.path.join(old, name))
                os.replace(stage, target)
                olds.append(old)
            else:
                os.replace(stage, target)
            for old in olds:  # only now that the new output is in place
                _discard(old, name)
        except OSError as e:
            if e.filename is None:
                raise OSError(e.errno, e.strerror, target) from e
            raise
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    finally:
        lock_cm.__exit__(None, None, None)
