"""A fitted model on disk and back: the memory banks with their soft weights (orbax), and beside them
a JSON record of everything needed to use the banks correctly later: the backbone's identity and the
sha256 of its parameters, the preprocessing, the embedding dimensions, the config, the code version,
the threshold rule and the training-set statistics the audit and threshold are computed from.

Layout of MODEL/:
  model.json   human-readable metadata (FORMAT_VERSION below)
  arrays/      orbax checkpoint: banks, projection, per-training-image audit arrays
  audit/       the training-set audit written by `fit` (optional)

Saving builds the whole folder under a temporary name beside the target and renames it into place
last, so an interrupted save or a full disk never leaves a model that looks complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import shutil
import subprocess
import tempfile

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

import softpatch_jax
from softpatch_jax import features, io_utils, models
from softpatch_jax.memory_bank import Banks, MemoryBank

FORMAT_VERSION = 1
META = "model.json"
ARRAYS = "arrays"


class IncompatibleModelError(ValueError):
    """The saved model cannot be used with this install; the message lists every difference."""


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
        cfg = ml_collections.ConfigDict(self.meta["config"])
        # Models saved before scoring.distance existed were fitted and thresholded with the plain
        # L2 distance (and the masked coreset): keep scoring them as they were fitted.
        if "distance" not in cfg.scoring:
            cfg.scoring.distance = "l2"
        if "strict_parity" not in cfg.coreset:
            cfg.coreset.strict_parity = False
        return cfg


def git_commit() -> str | None:
    """The commit of the source tree this package runs from ("+dirty" if modified), or None."""
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


def variables_sha256(variables) -> str:
    """sha256 over every parameter leaf: its path, dtype, shape and little-endian bytes, in path
    order. Computed here for every model so the check never depends on what weights.resolve put in
    its info."""
    h = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(variables)[0]
    for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
        arr = np.ascontiguousarray(np.asarray(leaf))
        arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
        h.update(f"{jax.tree_util.keystr(path)}|{arr.dtype.str}|{arr.shape}\n".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def identity(ex: features.Extractor, config: ml_collections.ConfigDict) -> dict:
    """What must match between fitting and predicting, as plain JSON values."""
    spec = models.get_spec(config.backbone.arch)
    dim = jax.eval_shape(
        ex.apply, ex.variables, jax.ShapeDtypeStruct((1, *ex.image_size, 3), "uint8")
    )
    return {
        "backbone": {
            "arch": config.backbone.arch,
            "layers": list(models.split_layers(config.backbone.layers) or spec.feature_layers),
            "dtype": config.backbone.dtype,
            "weights": ex.info.get("weights"),
            "params_sha256": variables_sha256(ex.variables),
            "info_sha256": ex.info.get("sha256"),
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
            "dim": int(dim.shape[-1]),
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
    # The parameters' hash decides: weights.resolve's own hash may come and go between versions,
    # and its source string may hold a machine-specific path.
    informative = ("backbone.info_sha256", "backbone.weights:")
    soft = [d for d in fatal if d.startswith(informative)]
    fatal = [d for d in fatal if not d.startswith(informative)]
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


def save(
    model: Model, path: str, *, overwrite: bool = False, extra_dirs: dict | None = None
) -> str:
    """Writes MODEL/ atomically. extra_dirs {name: callable(folder)} add sub-folders (the audit)."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(
            f"model folder {path!r} already exists; pass --overwrite to replace it"
        )
    parent = os.path.dirname(path)
    io_utils.check_writable(parent)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        tree = {"cls": _bank_tree(model.banks.cls), "seg": _bank_tree(model.banks.seg)}
        tree["audit"] = {k.replace("/", "__"): np.asarray(v) for k, v in model.arrays.items()}
        if model.projection_DxR is not None:
            tree["projection"] = np.asarray(model.projection_DxR)
        with _quiet(), ocp.StandardCheckpointer() as ckpt:
            ckpt.save(os.path.join(tmp, ARRAYS), tree)
            ckpt.wait_until_finished()
        meta = dict(model.meta, seg_is_cls=model.banks.seg is model.banks.cls)
        io_utils.write_json(os.path.join(tmp, META), meta)
        for name, write in (extra_dirs or {}).items():
            write(os.path.join(tmp, name))
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent)
            os.replace(path, os.path.join(old, "m"))
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load(path: str) -> Model:
    """Reads MODEL/; compatibility with the current backbone is checked by `check_compatible`."""
    meta_path = os.path.join(path, META)
    if not os.path.isfile(meta_path) or not os.path.isdir(os.path.join(path, ARRAYS)):
        raise FileNotFoundError(
            f"{path!r} is not a saved model: expected {META} and {ARRAYS}/ (written by `fit`)"
        )
    meta = io_utils.read_json(meta_path)
    if meta.get("code", {}).get("format") != FORMAT_VERSION:
        raise IncompatibleModelError(
            f"{path!r} has model format {meta.get('code', {}).get('format')!r}; "
            f"this install reads format {FORMAT_VERSION}"
        )
    with _quiet(), ocp.StandardCheckpointer() as ckpt:
        tree = ckpt.restore(os.path.abspath(os.path.join(path, ARRAYS)))
    cls = _bank(tree["cls"])
    seg = cls if meta.get("seg_is_cls") else _bank(tree["seg"])
    arrays = {k.replace("__", "/"): np.asarray(v) for k, v in tree["audit"].items()}
    proj = tree.get("projection")
    projection = None if proj is None else np.asarray(proj)
    return Model(Banks(cls=cls, seg=seg), projection, arrays, meta, os.path.abspath(path))
