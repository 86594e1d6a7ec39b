"""Command line of the deployment tool.

  python -m softpatch_jax.deploy fit --images=DIR --model=MODEL [--config=configs/demo.py]
      [--config.x=v] [--method=softpatch_plus] [--threshold=mad:3] [--skip_bad_images]
      [--region=full|center] [--truth=truth.csv] [--overwrite]   # fit also writes MODEL/audit/
  python -m softpatch_jax.deploy predict --model=MODEL --images=DIR_OR_FILE [--images=...]
      --out=DIR [--threshold=0.8|mad:3|quantile:0.95] [--skip_bad_images] [--nowrite_maps]
      [--region=full|center] [--overwrite]
  python -m softpatch_jax.deploy audit --model=MODEL --out=DIR [--truth=truth.csv] [--top=16]
  python -m softpatch_jax.deploy make_demo --out=DIR [--category=pill] [--noise_ratio=0.2]
      [--overwrite]
  python -m softpatch_jax.deploy export --model=MODEL --out=FILE.onnx [--format=onnx]
      [--bank_dtype=float32|float16] [--region=full|center] [--overwrite]   # deploy/export.py

Image files may also follow the command as positional arguments (shell globs). Errors about the
input (bad image, empty folder, incompatible or damaged model, unwritable or foreign output folder,
bad config key or value) print one message naming the file or value and exit with status 2;
--debug shows the traceback instead. Output folders (MODEL, OUT) are written whole or not at all;
--overwrite replaces only an earlier output of the same kind holding nothing but what this
tool wrote there; anything foreign is a refusal naming it (softpatch_jax/outdir.py).
Compiled programs are cached across runs, so a second predict compiles nothing
(softpatch_jax/compile_cache.py; --compile_cache=off or a folder).
"""

from __future__ import annotations

import importlib.util
import os

from absl import app, flags, logging
from ml_collections import config_flags

from softpatch_jax import cli, compile_cache
from softpatch_jax.data import demo
from softpatch_jax.deploy import commands, fitting, region, threshold
from softpatch_jax.experiment import config_errors


def _default_config() -> str | None:
    spec = importlib.util.find_spec("configs")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(next(iter(spec.submodule_search_locations)), "base.py")
    return path if os.path.isfile(path) else None


COMMANDS = ("fit", "predict", "audit", "make_demo", "export")
_CONFIG = config_flags.DEFINE_config_file(
    "config",
    _default_config(),
    "fit: a configs/*.py file (default configs/base.py).",
    lock_config=True,
)
_IMAGES = flags.DEFINE_multi_string("images", [], "fit/predict: image folder(s) or file(s).")
_MODEL = flags.DEFINE_string("model", None, "fit: folder to write; predict/audit: folder to read.")
_OUT = flags.DEFINE_string("out", None, "predict/audit/make_demo: output folder.")
_THRESHOLD = flags.DEFINE_string(
    "threshold",
    None,
    "A number, 'mad:K' or 'quantile:Q' (see deploy/threshold.py). fit: the "
    f"rule stored with the model (default {threshold.DEFAULT_RULE}); predict: overrides it.",
)
_METHOD = flags.DEFINE_string("method", "softpatch_plus", "fit: the method (see methods.py).")
_SKIP_BAD = flags.DEFINE_bool("skip_bad_images", False, "Skip and list unreadable images.")
_UPSCALE = flags.DEFINE_bool("allow_upscale", False, "Accept images smaller than the crop.")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite",
    False,
    "Replace an earlier output of the same kind (fit: a model; predict/audit: a prediction/audit; "
    "make_demo: a demo), only while it holds nothing but what this tool wrote there (its "
    ".softpatch-owned.json); never a folder holding the inputs or anything else.",
)
_REGION = flags.DEFINE_enum(
    "region",
    None,
    list(region.MODES),
    f"fit: what is inspected (default {region.DEFAULT}: the whole frame, tiled; center: the "
    "centre crop only); predict: overrides the model's.",
)
_TRUTH = flags.DEFINE_string(
    "truth", None, "fit/audit: CSV (image, defective) for precision/recall."
)
_TOP = flags.DEFINE_integer("top", 16, "fit/audit: suspects on the contact sheet.")
_WRITE_MAPS = flags.DEFINE_bool("write_maps", True, "predict: write heat map and overlay PNGs.")
_STRICT = flags.DEFINE_bool("strict_version", True, "predict: refuse a model from another version.")
_CATEGORY = flags.DEFINE_string("category", "pill", "make_demo: demo category.")
_NOISE = flags.DEFINE_float("noise_ratio", 0.2, "make_demo: injected defective share.")
_DEMO_SIZE = flags.DEFINE_integer("demo_size", 256, "make_demo: image size.")
_DEMO_TRAIN = flags.DEFINE_integer("demo_train", 30, "make_demo: normal training images.")
_FORMAT = flags.DEFINE_enum("format", "onnx", ["onnx"], "export: the file format.")
_BANK_DTYPE = flags.DEFINE_enum(
    "bank_dtype", "float32", ["float32", "float16"], "export: how the memory banks are stored."
)
_DEBUG = flags.DEFINE_bool("debug", False, "Show tracebacks instead of one-line errors.")

# Errors that describe bad input rather than a bug: shown as one message (softpatch_jax/cli.py).
USER_ERRORS = cli.USER_ERRORS


def _need(flag, name: str, command: str):
    if not flag.value:
        raise app.UsageError(f"{command} needs --{name}")
    return flag.value


def run(command: str, extra: list[str]) -> None:
    sources = list(_IMAGES.value) + extra
    if command in ("predict", "audit") and flags.FLAGS["config"].present:
        logging.warning("%s uses the config saved with the model; --config is ignored", command)
    if command == "fit":
        if not sources:
            raise app.UsageError("fit needs --images=DIR")
        opts = fitting.Options(
            method=_METHOD.value,
            threshold=_THRESHOLD.value or threshold.DEFAULT_RULE,
            skip_bad_images=_SKIP_BAD.value,
            allow_upscale=_UPSCALE.value,
            region=_REGION.value or region.DEFAULT,
        )
        if _CONFIG.value is None:
            raise app.UsageError("no configs/base.py found: pass --config=PATH")
        # tau stays the config's (the authors' 0.15 / 0.5): "auto" equals it on the noisy sets it
        # detects but leaves a set whose defects it cannot see with PatchCore's bank (README
        # "Unknown contamination"), so it is opt-in (--config.softpatch.tau=auto). The fit prints
        # the estimate (and under auto the tau it removed) and saves it in model.json.
        config_errors.validate(_CONFIG.value)
        fitted = commands.fit_and_save(
            _CONFIG.value,
            sources,
            _need(_MODEL, "model", command),
            opts,
            overwrite=_OVERWRITE.value,
            truth_csv=_TRUTH.value,
            top=_TOP.value,
        )
        est = fitted.meta["contamination"]
        used = f" -> removed {est['tau_applied']:.4f}" if "tau_applied" in est else ""
        print(
            f"tau={est['tau']}{used} ({est['estimator']} estimate: {est['tau_estimated']:.4f} "
            f"of patches, {est['image_fraction_estimated']:.3f} of images look contaminated)"
        )
    elif command == "predict":
        if not sources:
            raise app.UsageError("predict needs --images=DIR_OR_FILE")
        rows = commands.run_predict(
            _need(_MODEL, "model", command),
            sources,
            _need(_OUT, "out", command),
            threshold=_THRESHOLD.value,
            skip_bad_images=_SKIP_BAD.value,
            allow_upscale=_UPSCALE.value,
            write_maps=_WRITE_MAPS.value,
            strict_version=_STRICT.value,
            region=_REGION.value,
            overwrite=_OVERWRITE.value,
        )
        flagged = sum(r["anomalous"] for r in rows)
        print(f"{len(rows)} images scored, {flagged} above threshold -> {_OUT.value}")
    elif command == "audit":
        summary = commands.run_audit(
            _need(_MODEL, "model", command),
            _need(_OUT, "out", command),
            truth_csv=_TRUTH.value,
            top=_TOP.value,
            overwrite=_OVERWRITE.value,
        )
        if "precision_recall" in summary:
            from softpatch_jax.deploy import audit

            print(audit.markdown_table(summary["precision_recall"]))
    elif command == "export":
        from softpatch_jax.deploy import export

        export.export(
            _need(_MODEL, "model", command),
            _need(_OUT, "out", command),
            fmt=_FORMAT.value,
            overwrite=_OVERWRITE.value,
            bank_dtype=_BANK_DTYPE.value,
            region=_REGION.value,
        )
        print(_OUT.value)
    else:
        spec = demo.DemoSpec(
            size=_DEMO_SIZE.value, num_train=_DEMO_TRAIN.value, num_test_good=6, num_per_defect=4
        )
        out = commands.make_demo(
            _need(_OUT, "out", command),
            category=_CATEGORY.value,
            noise_ratio=_NOISE.value,
            spec=spec,
            overwrite=_OVERWRITE.value,
        )
        print(out)


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"first argument must be one of {COMMANDS}, got {argv[1:2]}")
    compile_cache.enable(compile_cache.FLAG.value)
    cli.one_line_errors(run, argv[1], argv[2:], debug=_DEBUG.value)


if __name__ == "__main__":
    app.run(main, flags_parser=config_errors.parse_flags)
