"""The sweep's results log: one JSON line per finished cell, appended and fsynced, so a killed sweep
loses at most the line being written. Reading drops a torn last line and rewrites the file without
it (atomically), so the next append starts on a clean line.
"""

from __future__ import annotations

import json
import os

from absl import logging

from softpatch_jax.io_utils import atomic_open


def read(path: str, repair: bool = False) -> list[dict]:
    """Every complete row of the log (none if it does not exist)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        text = f.read()
    lines = text.split("\n")
    rows, good, bad = [], [], 0
    for line in lines:
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
            good.append(line)
        except json.JSONDecodeError:
            bad += 1
    if bad:
        logging.warning("%s: dropping %d unreadable line(s) (an interrupted write)", path, bad)
    if repair and (bad or (text and not text.endswith("\n"))):
        with atomic_open(path) as f:
            f.write("".join(g + "\n" for g in good))
    return rows


def append(path: str, row: dict) -> None:
    line = json.dumps(row, default=str, allow_nan=True) + "\n"
    with open(path, "a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())
