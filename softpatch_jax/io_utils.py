"""Atomic writes: a temp file in the target folder, renamed over the target only when complete, so an
interrupted run or a full disk never leaves a half-written results file behind; and the comma lists
that config strings hold."""

from __future__ import annotations

import contextlib
import csv
import json
import math
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
    mask = os.umask(0o022)
    os.umask(mask)
    os.fchmod(fd, 0o666 & ~mask)  # mkstemp makes 0600; the result follows the umask
    try:
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename is None:  # ENOSPC from a write names no file
            raise OSError(e.errno, e.strerror, path) from e
        raise


def _finite(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(path: str, obj, *, strict: bool = False) -> None:
    """strict: valid JSON for any reader, NaN/inf written as null (json's default writes a bare
    NaN, which only Python reads back)."""
    if strict:
        obj = _finite(obj)
    with atomic_open(path) as f:
        json.dump(obj, f, indent=1, sort_keys=False, default=str, allow_nan=not strict)
        f.write("\n")


# A text cell starting with one of these is a formula to a spreadsheet (=HYPERLINK(...), +1+1,
# -2+3, @SUM): `csv_guard` prefixes it with ' so it shows as text; ' itself is guarded too, so
# `csv_unguard` gives back every original string exactly.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "'")


def csv_guard(value):
    """A CSV cell that no spreadsheet runs as a formula (numbers are left as they are)."""
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return value


def csv_unguard(text: str) -> str:
    """The inverse of `csv_guard` for a cell read back (a cell written by hand is left as it is)."""
    if text.startswith("'") and text[1:2] and text[1:].startswith(FORMULA_START):
        return text[1:]
    return text


def write_csv(path: str, rows: list[dict]) -> None:
    """Rows as CSV (atomically); text cells go through `csv_guard`."""
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    with atomic_open(path, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows({k: csv_guard(v) for k, v in row.items()} for row in rows)


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
