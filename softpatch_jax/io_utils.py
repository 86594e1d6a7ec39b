"""Atomic writes: a temp file in the target folder, renamed over the target only when complete, so an
interrupted run or a full disk never leaves a half-written results file behind; and the comma lists
that config strings hold."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import tempfile


def split_list(text) -> list[str]:
    """A comma list ("a, b,,c") -> its non-empty items, stripped (["a", "b", "c"])."""
    return [s.strip() for s in str(text).split(",") if s.strip()]


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w", **kwargs):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", dir=folder)
    try:
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json(path: str, obj) -> None:
    with atomic_open(path) as f:
        json.dump(obj, f, indent=1, sort_keys=False, default=str)
        f.write("\n")


def write_csv(path: str, rows: list[dict]) -> None:
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    with atomic_open(path, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def check_writable(folder: str) -> None:
    """Creates `folder` if needed and proves a file can be written there (os.access says yes to root
    on read-only mounts), raising PermissionError that names the folder otherwise."""
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise PermissionError(f"folder {folder!r} is not writable: {e.strerror or e}") from e
