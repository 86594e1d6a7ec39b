"""Configuration errors as one line, for every command line (`main`, `deploy`): a misspelt key, a value
of the wrong type, or a value out of its range or choices prints the key, the value and what is
expected ("did you mean ..." for a misspelt key), with no traceback, and exits with status 2.

  app.run(main, flags_parser=config_errors.parse_flags)   # flag parsing errors
  config_errors.validate(config)                          # ranges and choices (RULES below)
"""

from __future__ import annotations

import difflib
import importlib.util
import math
import os
import sys

import ml_collections
from absl import app, flags

from softpatch_jax import contamination, data, discriminators, methods


class ConfigError(ValueError):
    """A bad configuration value; the message names the key, the value and what is expected."""


def _fraction(lo_open: bool, hi_open: bool):
    def check(v):
        lo_ok = v > 0 if lo_open else v >= 0
        hi_ok = v < 1 if hi_open else v <= 1
        return lo_ok and hi_ok

    text = ("(" if lo_open else "[") + "0, 1" + (")" if hi_open else "]")
    return check, f"a number in {text}"


def _tau():
    fraction, text = _fraction(False, True)

    def check(v):
        if isinstance(v, str):
            return v in ("auto", "oracle")
        return isinstance(v, int | float) and not isinstance(v, bool) and fraction(v)

    return check, f"{text}, 'auto' or 'oracle'"


def _at_least(n):
    return (lambda v: v >= n), f"an integer >= {n}"


def _choices(*names):
    return (lambda v: v in names), "one of " + ", ".join(repr(n) for n in names)


def _subset(*names):
    def check(v):
        items = [s.strip() for s in str(v).split(",") if s.strip()]
        return bool(items) and set(items) <= set(names)

    return check, "a comma list of " + ", ".join(repr(n) for n in names)


def _each(check_text):
    check, text = check_text

    def each(v):
        items = [s.strip() for s in str(v).split(",") if s.strip()]
        try:
            return bool(items) and all(check(float(s)) for s in items)
        except ValueError:
            return False

    return each, f"a comma list of {text.replace('a number', 'numbers')}"


# key -> (predicate, what is expected). Keys absent from a config are not checked.
RULES = {
    "softpatch.tau": _tau(),
    "softpatch.tau_seg": _tau(),
    "softpatch.auto_estimator": _choices(*contamination.ESTIMATORS),
    "softpatch.auto_floor": _fraction(False, True),
    "softpatch.auto_floor_seg": _fraction(False, True),
    "softpatch.projection_dim": _at_least(0),
    "softpatch.soft_weight": _choices(*discriminators.NAMES, "fused", "none"),
    "softpatch.rank_scope": _choices("all", "position"),
    "softpatch.discriminator": _choices(*discriminators.NAMES),
    "softpatch.discriminators": _subset(*discriminators.NAMES),
    # Each registered discriminator's own parameter checks (`Discriminator.checks`).
    **{
        f"softpatch.{key}": check
        for name in discriminators.NAMES
        for key, check in discriminators.REGISTRY[name].checks.items()
    },
    "coreset.ratio": _fraction(True, False),
    "coreset.num_starts": _at_least(1),
    "dataset.resize": _at_least(1),
    "dataset.crop": _at_least(1),
    "dataset.batch_size": _at_least(1),
    "backbone.dtype": _choices("float32", "bfloat16"),
    "backbone.depthwise": _choices("auto", "conv", "shifted"),
    "noise.ratios": _each(_fraction(False, False)),
    "scoring.blur_sigma": ((lambda v: math.isfinite(v) and v >= 0), "a finite number >= 0"),
    "softpatch.gaussian_eps": ((lambda v: math.isfinite(v) and v > 0), "a finite number > 0"),
}


# key -> a registry's own check, raising ValueError with the valid names (and a "did you mean"):
# the methods (`methods.REGISTRY`) and the dataset layouts (`data.LAYOUTS`).
REGISTRY_CHECKS = {
    "methods": methods.check,
    "dataset.layout": data.registry.get,
}


def _get(config, dotted: str):
    node = config
    for part in dotted.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return None, False
        node = node[part]
    return node, True


def _leaves(node, prefix: str = ""):
    for key, value in node.items():
        if isinstance(value, ml_collections.ConfigDict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def validate(config: ml_collections.ConfigDict) -> None:
    """ConfigError for the first number that is NaN or inf (no setting takes one), then for the
    first value outside its range or choices (RULES)."""
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"the config is a {type(config).__name__}, not a ConfigDict")
    for key, value in _leaves(config):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"config key {key}={value!r} is invalid: expected a finite number")
    for key, (check, expected) in RULES.items():
        value, found = _get(config, key)
        if found and not check(value):
            raise ConfigError(f"config key {key}={value!r} is invalid: expected {expected}")
    for key, check in REGISTRY_CHECKS.items():
        value, found = _get(config, key)
        if found:
            try:
                check(value)
            except ValueError as e:
                raise ConfigError(f"config key {key}={value!r} is invalid: {e}") from None
    crop, found = _get(config, "dataset.crop")
    resize, found2 = _get(config, "dataset.resize")
    if found and found2 and resize < crop:
        raise ConfigError(f"config key dataset.resize={resize} must be >= dataset.crop={crop}")


def check_command(argv: list[str], config: ml_collections.ConfigDict) -> None:
    """A launch script's start: no stray positional arguments and a valid config, else
    `app.UsageError` with the one-line message (absl prints it and exits)."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        validate(config)
    except ConfigError as e:
        raise app.UsageError(str(e)) from None


def unknown_key(config: ml_collections.ConfigDict, dotted: str) -> str | None:
    """'unknown config key ...; did you mean ...' for the first part of `dotted` that is not there,
    or None when the whole path exists."""
    node, seen = config, []
    for part in dotted.split("."):
        if not isinstance(node, ml_collections.ConfigDict):
            return f"config key {'.'.join(seen)} is a value, not a section: {dotted!r} is unknown"
        if part not in node:
            keys = sorted(node.keys())
            where = ".".join(seen)
            close = difflib.get_close_matches(part, keys, n=1, cutoff=0.5)
            hint = f"; did you mean {'.'.join([*seen, close[0]])!r}?" if close else ""
            return (
                f"unknown config key {'.'.join([*seen, part])!r}{hint} "
                f"(keys {'in ' + where if where else 'at the top'}: {', '.join(keys)})"
            )
        seen.append(part)
        node = node[part]
    return None


def _load_config(argv: list[str]) -> ml_collections.ConfigDict | None:
    """The config named by --config=PATH[:ARG] in argv (or the flag's default), best effort."""
    path = None
    for a in argv:
        if a.startswith("--config="):
            path = a.split("=", 1)[1]
    if path is None and "config" in flags.FLAGS:
        path = flags.FLAGS["config"].default_as_str
        path = path.strip("'\"") if path else None
    if not path:
        return None
    path, _, arg = path.partition(":")
    try:
        spec = importlib.util.spec_from_file_location("_config_for_error", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.get_config(arg) if arg else module.get_config()
    except Exception:  # the error is about a bad config file: let absl's message stand
        return None


def _parses_as(value: str, like) -> bool:
    """Whether `value` reads as a value of `like`'s type (as absl would parse a number or bool)."""
    if isinstance(like, bool):
        return value.lower() in ("true", "false", "1", "0")
    if isinstance(like, (int, float)):
        try:
            type(like)(value)
        except ValueError:
            return False
    return True


def explain(argv: list[str], error: Exception) -> str:
    """One line for an error raised while parsing `argv`'s flags. A key given more than once is
    reported with the value that fails (absl parses every occurrence; the last one is used)."""
    config = _load_config(argv)
    given: dict[str, list[str]] = {}
    for a in argv:
        if a.startswith("--config.") and config is not None:
            key, _, value = a[len("--config.") :].partition("=")
            given.setdefault(key, []).append(value)
    for key, values in given.items():
        msg = unknown_key(config, key)
        if msg:
            return f"{msg}, in --config.{key}={values[-1]}"
        current, _ = _get(config, key)
        if key in str(error) or f"--config.{key}" in str(error):
            bad = [v for v in values if not _parses_as(v, current)] or values
            twice = (
                f" (given {len(values)} times: {', '.join(map(repr, values))}; the last is used)"
                if len(values) > 1
                else ""
            )
            return (
                f"config key {key}={bad[-1]!r} is invalid: expected a "
                f"{type(current).__name__} (default {current!r}){twice}"
            )
    return _last_line(error)


def config_file_error(argv: list[str]) -> str | None:
    """One line for a --config file that cannot be loaded (missing, a syntax error, no
    get_config), or None when it loads."""
    path = next((a.split("=", 1)[1] for a in reversed(argv) if a.startswith("--config=")), None)
    if not path:
        return None
    path = path.partition(":")[0]
    if not os.path.isfile(path):
        return f"config file {path!r} does not exist (--config=PATH: a configs/*.py file)"
    try:
        spec = importlib.util.spec_from_file_location("_config_check", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.get_config  # noqa: B018
    except SyntaxError as e:
        return f"config file {path!r} line {e.lineno}: {e.msg} (a Python syntax error)"
    except Exception as e:  # anything the file raises is about the file
        return f"config file {path!r} cannot be loaded: {type(e).__name__}: {_last_line(e)}"
    return None


def _last_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return (text[-1] if text else type(error).__name__).strip("\"'")


def parse_flags(argv: list[str]) -> list[str]:
    """absl `flags_parser` for app.run: flag errors as one line on stderr, exit status 2."""
    try:
        rest = flags.FLAGS(argv)
    except (
        flags.Error,
        AttributeError,
        KeyError,
        TypeError,
        ValueError,
        OSError,
        SyntaxError,
    ) as e:
        print(f"error: {config_file_error(argv) or explain(argv, e)}", file=sys.stderr)
        sys.exit(2)
    # config_flags defers a file's load error to the first use of the config: report it now.
    if "config" in flags.FLAGS and flags.FLAGS["config"].present:
        value = flags.FLAGS["config"].value
        if value is not None and not isinstance(value, ml_collections.ConfigDict):
            print(f"error: {config_file_error(argv) or 'the --config file cannot be loaded'}",
                  file=sys.stderr)  # fmt: skip
            sys.exit(2)
    return rest
