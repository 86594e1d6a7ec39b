"""The deployment tool: fit a model on an unlabelled image folder, predict on new images, audit the
training set. Command line: `python -m softpatch_jax.deploy {fit,predict,audit,make_demo} ...`
(see `__main__.py`); the same operations as functions are in `commands.py`.

Modules: fitting (fit), predicting (predict, streamed), model (save/load with a checksummed
manifest, compatibility), region (what is inspected: the whole frame in tiles, or the centre crop),
outdir (output folders staged whole, locked, replacing only what this tool wrote; it lives in
softpatch_jax/outdir.py), threshold (training scores and rules), audit (training-set audit), render
(PNG heat maps, contact sheets).

Determinism: all randomness (projection, coreset starts, threshold folds) derives from
config.seed, files are read in sorted path order, and batch shapes follow the image count
(features.batch_plan), so the same seed, images, code and device give bit-identical banks,
scores and maps run to run (tested).
Across devices or XLA versions results agree only to float tolerance: GPU and TPU reductions sum in
a different order, convolutions pick different algorithms, and bfloat16 backbones round
differently. Distance matmuls are pinned to full float32 (ops.PRECISION), so TF32 on recent NVIDIA
GPUs does not reorder near-ties; the backbone's convolutions are not pinned. Compare scores across
machines with a tolerance, and refit (or re-derive the threshold) when moving a model to another
accelerator type if decisions near the threshold matter.
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
