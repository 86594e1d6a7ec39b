"""A fitted model on disk and back: the memory banks with their soft weights (orbax), and beside them
a JSON record of everything needed to use the banks correctly later: the backbone's identity and the
sha256 of its parameters (`weights.variables_sha256`, the project's one parameter hash), the
preprocessing, the embedding dimensions, the config, the code version,
the threshold rule and the training-set statistics the audit and threshold are computed from.

Layout of MODEL/:
  model.json     human-readable metadata (FORMAT_VERSION below)
  arrays/        orbax checkpoint: banks, projection, per-training-image audit arrays
  audit/         the training-set audit written by `fit` (optional)
  manifest.json  sha256 and size of every file under arrays/ and of model.json (so of the config)

Saving builds the whole folder under a staging name beside the target and renames it into place
last (`softpatch_jax/outdir.py`, which also records what it wrote, in .softpatch-owned.json), so an
interrupted save or a full disk never leaves a model that looks complete. Loading verifies the
manifest before reading anything else, then that every stored array is finite: a flipped byte, a
missing or extra file, or a truncated array is a `DamagedModelError` naming the model and the file,
never a model that scores.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import os
import subprocess

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

import softpatch_jax
from softpatch_jax import features, io_utils, models, outdir, weights
from softpatch_jax.memory_bank import Banks, MemoryBank

# 2: manifest.json of checksums; 3: backbone.params_sha256 is `weights.variables_sha256` (format 2
# hashed the same bytes with its own header, so its hashes read as different weights).
FORMAT_VERSION = 3
META = "model.json"
ARRAYS = "arrays"
MANIFEST = "manifest.json"


class IncompatibleModelError(ValueError):
    """The saved model cannot be used with this install; the message lists every difference."""


class DamagedModelError(ValueError):
    """The saved model's files do not match its manifest, or it holds NaN/inf: never score with it."""


@dataclasses.dataclass
class Model:
    """A fitted deployment model.

    Attributes:
      banks: classification and segmentation memory banks (feats, soft weights, source indices).
      projection_DxR: the random projection the discriminators used (None if projection_dim=0).
      arrays: per-training-image arrays for the audit and threshold (numpy):
        "scores/<name>" [N, P] raw discriminator scores, "keep" [N, P] bool (classification bank),
        "train_scores" [N] held-out image scores, "train_patch_median" [N] their median patch
        score, "fold" [N] the held-out fold of each image.
      meta: the JSON metadata (see module docstring).
    """

    banks: Banks
    projection_DxR: np.ndarray | None
    arrays: dict[str, np.ndarray]
    meta: dict
    path: str | None = None  # where it was loaded from

    @property
    def config(self) -> ml_collections.ConfigDict:
        return ml_collections.ConfigDict(self.meta["config"])


@functools.cache
def git_commit() -> str | None:
    """The commit of the source tree this package runs from ("+dirty" if modified), or None.
    Asked once per process (two git calls, ~40 ms: a warm predict of one image paid it each time)."""
    here = os.path.dirname(os.path.abspath(softpatch_jax.__file__))
    try:
        head = subprocess.run(
            ["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


_SHA_CACHE: list[tuple] = []  # (tree structure, the leaves hashed, their sha256), newest last


def _params_sha256(variables) -> str:
    """`weights.variables_sha256`, remembered for the last few variable trees whose leaves are all
    jax arrays (immutable: the same leaf objects always hash the same), so a warm predict does not
    rehash the backbone every call (~75 ms for EfficientNet-Lite0). Leaves are compared by
    identity and held by the cache, so a freed leaf's id is never mistaken for another's."""
    leaves, tree = jax.tree.flatten(variables)
    if not all(isinstance(leaf, jax.Array) for leaf in leaves):
        return weights.variables_sha256(variables)
    for held_tree, held, sha in _SHA_CACHE:
        if held_tree == tree and all(a is b for a, b in zip(held, leaves)):
            return sha
    sha = weights.variables_sha256(variables)
    _SHA_CACHE.append((tree, leaves, sha))
    del _SHA_CACHE[:-4]
    return sha


_DIM_CACHE: dict[tuple, int] = {}  # (apply, image size, leaf shapes and dtypes) -> feature dim


def _feature_dim(ex: features.Extractor) -> int:
    """The extractor's patch feature dimension, traced once per (apply, image size, parameter
    shapes) rather than on every predict (~12 ms of tracing for EfficientNet-Lite0)."""
    shapes = tuple((leaf.shape, leaf.dtype) for leaf in jax.tree.leaves(ex.variables))
    key = (ex.apply, tuple(ex.image_size), shapes)
    if key not in _DIM_CACHE:
        out = jax.eval_shape(
            ex.apply, ex.variables, jax.ShapeDtypeStruct((1, *ex.image_size, 3), "uint8")
        )
        _DIM_CACHE[key] = int(out.shape[-1])
        while len(_DIM_CACHE) > 4:
            del _DIM_CACHE[next(iter(_DIM_CACHE))]
    return _DIM_CACHE[key]


def identity(ex: features.Extractor, config: ml_collections.ConfigDict) -> dict:
    """What must match between fitting and predicting, as plain JSON values."""
    spec = models.get_spec(config.backbone.arch)
    return {
        "backbone": {
            "arch": config.backbone.arch,
            "layers": list(models.split_layers(config.backbone.layers) or spec.feature_layers),
            "dtype": config.backbone.dtype,
            "weights": ex.info.get("weights"),
            # Computed from the extractor's variables, never read from its info: the check cannot
            # depend on what weights.resolve recorded.
            "params_sha256": _params_sha256(ex.variables),
        },
        "preprocessing": {
            "resize": config.dataset.resize,
            "crop": config.dataset.crop,
            "mean": list(spec.mean),
            "std": list(spec.std),
            "decoder": "softpatch_jax.data.images",
        },
        "embedding": {
            "grid": list(ex.grid),
            "image_size": list(ex.image_size),
            "dim": _feature_dim(ex),
            "patch_size": config.embedding.patch_size,
            "pretrain_dim": config.embedding.pretrain_dim,
            "target_dim": config.embedding.target_dim,
        },
    }


def code_version() -> dict:
    return {
        "softpatch_jax": softpatch_jax.__version__,
        "git_commit": git_commit(),
        "format": FORMAT_VERSION,
        "jax": jax.__version__,
    }


def differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """'key: saved X, now Y' for every leaf that differs between two nested dicts."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, name + ".")
        elif a != b:
            out.append(f"{name}: model has {a!r}, this install has {b!r}")
    return out


def check_compatible(
    model: Model, ex: features.Extractor, *, strict_version: bool = True
) -> list[str]:
    """Raises IncompatibleModelError listing every mismatch in backbone, weights, preprocessing,
    embedding dimensions and (if strict_version) code version; returns the tolerated ones."""
    now = identity(ex, model.config)
    fatal = []
    for section in ("backbone", "preprocessing", "embedding"):
        fatal += differences(model.meta[section], now[section], section + ".")
    # The parameters' hash decides: the weights' source string may hold a machine-specific path.
    soft = [d for d in fatal if d.startswith("backbone.weights:")]
    fatal = [d for d in fatal if not d.startswith("backbone.weights:")]
    saved_code, code = model.meta["code"], code_version()
    if saved_code["format"] != FORMAT_VERSION:
        fatal.append(
            f"code.format: model has {saved_code['format']}, this install reads {FORMAT_VERSION}"
        )
    if saved_code["softpatch_jax"] != code["softpatch_jax"]:
        msg = (
            f"code.softpatch_jax: model was fitted with version {saved_code['softpatch_jax']!r}, "
            f"this install is {code['softpatch_jax']!r}"
        )
        (fatal if strict_version else soft).append(msg)
    if saved_code.get("git_commit") != code["git_commit"]:
        soft.append(
            f"code.git_commit: model {saved_code.get('git_commit')}, now {code['git_commit']}"
        )
    if fatal:
        raise IncompatibleModelError(
            "the saved model does not match this backbone/install:\n  " + "\n  ".join(fatal)
        )
    return soft


def _bank_tree(bank: MemoryBank) -> dict:
    return {
        "feats": np.asarray(bank.feats_MxD),
        "weights": np.asarray(bank.weights_M),
        "index": np.asarray(bank.index_M),
    }


def _bank(tree: dict) -> MemoryBank:
    as_jax = {k: jax.numpy.asarray(v) for k, v in tree.items()}
    return MemoryBank(as_jax["feats"], as_jax["weights"], as_jax["index"])


@contextlib.contextmanager
def _quiet():
    """Orbax logs every step of a save at INFO; keep the tool's own progress readable."""
    level = logging.get_verbosity()
    logging.set_verbosity(min(level, logging.WARNING))  # absl: lower is quieter
    try:
        yield
    finally:
        logging.set_verbosity(level)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _covered(folder: str) -> list[str]:
    """Relative paths the manifest covers: model.json and every file under arrays/."""
    out = [META]
    for dirpath, _, filenames in os.walk(os.path.join(folder, ARRAYS)):
        out += [os.path.relpath(os.path.join(dirpath, f), folder) for f in filenames]
    return sorted(out)


def write_manifest(folder: str) -> dict:
    files = {
        rel: {
            "sha256": _sha256(os.path.join(folder, rel)),
            "bytes": os.path.getsize(os.path.join(folder, rel)),
        }
        for rel in _covered(folder)
    }
    manifest = {"format": FORMAT_VERSION, "algorithm": "sha256", "files": files}
    io_utils.write_json(os.path.join(folder, MANIFEST), manifest, strict=True)
    return manifest


def verify(path: str) -> None:
    """DamagedModelError naming the model and every file that is missing, extra or changed."""
    man_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(man_path):
        raise DamagedModelError(
            f"model {path!r} has no {MANIFEST}: it is damaged, or was written by an older version "
            "(format 1) without checksums; refit it"
        )
    try:
        files = io_utils.read_json(man_path)["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise DamagedModelError(f"model {path!r}: {MANIFEST} is unreadable ({e})") from e
    problems = []
    for rel in sorted(set(files) | set(_covered(path))):
        full = os.path.join(path, rel)
        if rel not in files:
            problems.append(f"{rel}: not in the manifest (added after the fit)")
        elif not os.path.isfile(full):
            problems.append(f"{rel}: missing")
        elif os.path.getsize(full) != files[rel]["bytes"]:
            problems.append(
                f"{rel}: {os.path.getsize(full)} bytes, the manifest says {files[rel]['bytes']}"
            )
        elif _sha256(full) != files[rel]["sha256"]:
            problems.append(f"{rel}: sha256 differs from the manifest (contents changed)")
    if problems:
        raise DamagedModelError(
            f"model {path!r} is damaged, refusing to use it (refit or restore it): "
            + "; ".join(problems[:10])
            + (f"; and {len(problems) - 10} more" if len(problems) > 10 else "")
        )


def save(
    model: Model,
    path: str,
    *,
    overwrite: bool = False,
    extra_dirs: dict | None = None,
    inputs: tuple[str, ...] = (),
) -> str:
    """Writes MODEL/ atomically (see `outdir.staged`: overwrite replaces only an earlier model, never
    a folder holding `inputs`). extra_dirs {name: callable(folder)} add sub-folders (the audit)."""
    path = os.path.abspath(path)
    with outdir.staged(path, MANIFEST, "model", overwrite=overwrite, inputs=inputs) as (tmp, _):
        tree = {"cls": _bank_tree(model.banks.cls), "seg": _bank_tree(model.banks.seg)}
        tree["audit"] = {k.replace("/", "__"): np.asarray(v) for k, v in model.arrays.items()}
        if model.projection_DxR is not None:
            tree["projection"] = np.asarray(model.projection_DxR)
        with _quiet(), ocp.StandardCheckpointer() as ckpt:
            ckpt.save(os.path.join(tmp, ARRAYS), tree)
            ckpt.wait_until_finished()
        meta = dict(model.meta, seg_is_cls=model.banks.seg is model.banks.cls)
        io_utils.write_json(os.path.join(tmp, META), meta, strict=True)
        for name, write in (extra_dirs or {}).items():
            write(os.path.join(tmp, name))
            outdir.write_owned(os.path.join(tmp, name), name)  # so `audit` may refresh MODEL/audit
        write_manifest(tmp)
    return path


def _check_finite(path: str, tree: dict, prefix: str = "") -> None:
    for key, value in tree.items():
        if isinstance(value, dict):
            _check_finite(path, value, f"{prefix}{key}/")
            continue
        arr = np.asarray(value)
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise DamagedModelError(
                f"model {path!r} is damaged: array {prefix}{key} holds "
                f"{int((~np.isfinite(arr)).sum())} NaN/inf values"
            )


def load(path: str) -> Model:
    """Reads MODEL/; compatibility with the current backbone is checked by `check_compatible`."""
    meta_path = os.path.join(path, META)
    if not os.path.isfile(meta_path) or not os.path.isdir(os.path.join(path, ARRAYS)):
        raise FileNotFoundError(
            f"{path!r} is not a saved model: expected {META} and {ARRAYS}/ (written by `fit`)"
        )
    try:
        meta = io_utils.read_json(meta_path)
    except ValueError as e:
        raise DamagedModelError(f"model {path!r}: {META} is not valid JSON ({e})") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("code", {}), dict):
        raise DamagedModelError(
            f"model {path!r}: {META} holds a JSON {type(meta).__name__}, not the model's record "
            "(an object with its backbone, config and code version); refit or restore it"
        )
    if (found := meta.get("code", {}).get("format")) != FORMAT_VERSION:
        raise IncompatibleModelError(
            f"{meta_path!r} says model format {found!r}; this install reads format "
            f"{FORMAT_VERSION} only (format 3 records the backbone's parameter hash as "
            "weights.variables_sha256): refit the model with this install "
            "(python -m softpatch_jax.deploy fit --images=DIR --model=MODEL)"
        )
    verify(path)
    try:
        with _quiet(), ocp.StandardCheckpointer() as ckpt:
            tree = ckpt.restore(os.path.abspath(os.path.join(path, ARRAYS)))
    except Exception as e:  # orbax/tensorstore raise many types; the manifest passed, so say so
        raise DamagedModelError(
            f"model {path!r}: its arrays pass the checksums but cannot be read "
            f"({type(e).__name__}: {str(e).splitlines()[0][:300]})"
        ) from e
    _check_finite(path, tree)
    cls = _bank(tree["cls"])
    seg = cls if meta.get("seg_is_cls") else _bank(tree["seg"])
    arrays = {k.replace("__", "/"): np.asarray(v) for k, v in tree["audit"].items()}
    proj = tree.get("projection")
    projection = None if proj is None else np.asarray(proj)
    return Model(Banks(cls=cls, seg=seg), projection, arrays, meta, os.path.abspath(path))
