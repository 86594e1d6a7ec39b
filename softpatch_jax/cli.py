"""The one error path of every command line (`main`, `deploy`, `data.demo`): an error about the
input (a missing folder or file, a bad value, a damaged model, a foreign output folder, a full disk)
prints one line `error: ...` naming the file or value, with no traceback, and exits with status 2.
`debug` re-raises instead, to show the traceback.

Every such error is a ValueError (ConfigError, BadImageError, OutputFolderError and the model errors
subclass it), an OSError (FileNotFoundError, PermissionError, ENOSPC) or a FloatingPointError.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

USER_ERRORS = (ValueError, OSError, FloatingPointError)

T = TypeVar("T")


def fail(error: BaseException | str) -> None:
    """Prints `error: MESSAGE` on stderr (and nothing else) and exits with status 2."""
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)


def one_line_errors(fn: Callable[..., T], *args, debug: bool = False, **kwargs) -> T:
    """fn(*args, **kwargs), with USER_ERRORS reported by `fail`."""
    try:
        return fn(*args, **kwargs)
    except USER_ERRORS as e:
        if debug:
            raise
        fail(e)
