"""Entry point: python -m softpatch_jax.main --config=configs/demo.py --workdir=/tmp/sp_demo

Every config value can be overridden: --config.noise.ratios=0.0,0.2 --config.methods=patchcore
A misspelt key or a bad value is one line naming the key and value (experiment/config_errors.py), exit 2;
so is any other error about the input (a missing dataset root, an unknown layout, method or
category, a workdir that is a file): softpatch_jax/cli.py. --debug shows the traceback instead.
Compiled programs are cached across runs (softpatch_jax/compile_cache.py; --compile_cache=off).
"""

from absl import app, flags
from ml_collections import config_flags

from softpatch_jax import cli, compile_cache
from softpatch_jax.experiment import config_errors, driver

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a configs/*.py file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Folder for config.json, results.json/csv, summary.md."
)
_DEBUG = flags.DEFINE_bool("debug", False, "Show tracebacks instead of one-line errors.")
flags.mark_flags_as_required(["config", "workdir"])


def _run(config, workdir: str) -> None:
    config_errors.validate(config)
    driver.run(config, workdir)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    compile_cache.enable(compile_cache.FLAG.value)
    cli.one_line_errors(_run, _CONFIG.value, _WORKDIR.value, debug=_DEBUG.value)


if __name__ == "__main__":
    app.run(main, flags_parser=config_errors.parse_flags)
