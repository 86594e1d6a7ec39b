"""Runs a sweep, from the repository root:

  python -m launch.sweep --config=configs/sweeps/noise_curve.py:demo --workdir=DIR

Every config value can be overridden, axes included: --config.sweep.axes.seed=0,1
Re-running the same command skips finished cells; then `python -m softpatch_jax.report --workdir=DIR`.
"""

from absl import app, flags
from ml_collections import config_flags

from softpatch_jax import compile_cache
from softpatch_jax.experiment import config_errors, driver

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Path to a configs/sweeps/*.py file (with its :dataset argument).",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Folder for sweep.json, results.jsonl, stats.jsonl, cache/ and maps/."
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    config_errors.check_command(argv, _CONFIG.value)
    compile_cache.enable(compile_cache.FLAG.value)
    driver.sweep(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main, flags_parser=config_errors.parse_flags)
