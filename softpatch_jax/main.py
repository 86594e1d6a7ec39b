"""Entry point: python -m softpatch_jax.main --config=configs/demo.py --workdir=/tmp/sp_demo

Every config value can be overridden: --config.noise.ratios=0.0,0.2 --config.methods=patchcore
A misspelt key or a bad value is one line naming the key and value (experiment/config_errors.py), exit 2.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from softpatch_jax.experiment import config_errors, driver

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a configs/*.py file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Folder for config.json, results.json/csv, summary.md."
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        config_errors.validate(_CONFIG.value)
    except config_errors.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    driver.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main, flags_parser=config_errors.parse_flags)
