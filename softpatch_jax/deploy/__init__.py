"""The deployment tool: fit a model on an unlabelled image folder, predict on new images, audit the
training set. Command line: `python -m softpatch_jax.deploy {fit,predict,audit,make_demo} ...`
(see `__main__.py`); the same operations as functions are in `commands.py`.

Modules: fitting (fit), predicting (predict, streamed), model (save/load/compatibility), threshold
(training scores and rules), audit (training-set audit), render (PNG heat maps, contact sheets).
"""

from softpatch_jax.deploy.commands import fit_and_save, make_demo, run_audit, run_predict
from softpatch_jax.deploy.fitting import Options, fit
from softpatch_jax.deploy.model import IncompatibleModelError, Model, check_compatible, load, save
from softpatch_jax.deploy.predicting import predict

__all__ = [
    "IncompatibleModelError",
    "Model",
    "Options",
    "check_compatible",
    "fit",
    "fit_and_save",
    "load",
    "make_demo",
    "predict",
    "run_audit",
    "run_predict",
    "save",
]
