"""Progress of the long stages (feature extraction, coreset picks, scoring chunks, sweep cells), for
the drivers to show; the kernels never see it (a stage takes an optional host callback that its
driver gets from `bar`, and calls it between device calls).

On a terminal (stderr a tty) each stage is a tqdm bar with rate and ETA; otherwise (logs, CI,
pytest) one absl INFO line per stage when it ends, which an un-flagged absl (tests, notebooks)
does not print. `SOFTPATCH_PROGRESS=0` turns both off, `=1` forces the bars, e.g. into a file.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator

from absl import logging


def mode() -> str:
    """ "bar", "log" or "off" from SOFTPATCH_PROGRESS (unset: a bar on a terminal, else a log line)."""
    value = os.environ.get("SOFTPATCH_PROGRESS", "").strip().lower()
    if value in ("0", "off", "false", "no"):
        return "off"
    if value in ("1", "bar", "on", "true", "yes"):
        return "bar"
    return "bar" if sys.stderr.isatty() else "log"


@contextlib.contextmanager
def bar(desc: str, total: int, unit: str = "it") -> Iterator[Callable[[int], None] | None]:
    """A stage's progress: yields update(n), to call with each chunk of work done on the host, or
    None where nothing would be drawn (log mode or off), so that a stage can skip the host round
    trips it makes only to report (the coreset loop runs in one call then). The stage blocks on its
    results before leaving the block: the log line's time and rate are measured at its exit."""
    how = mode()
    if how == "bar":
        from tqdm import tqdm

        with tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=True) as t:
            yield t.update
        return
    start = time.perf_counter()
    yield None
    if how == "log":
        seconds = time.perf_counter() - start
        rate = total / seconds if seconds > 0 else float("inf")
        logging.info("%s: %d %s in %.1f s (%.1f %s/s)", desc, total, unit, seconds, rate, unit)
