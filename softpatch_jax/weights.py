"""Backbone weights: read published checkpoints, convert them to Flax variables, cache, resolve.

METHOD.md section 2 uses torchvision's original ImageNet weights (IMAGENET1K_V1), published both as
torchvision `.pth` files and as the `<arch>.tv_in1k` safetensors on the Hugging Face hub (same
parameter names). Neither needs torch here: `.pth` goes through `models.torch_pickle`.

Converted variables are cached as an orbax checkpoint in `<cache_dir>/<arch>/` (with an info.json
naming the source), written to a temporary directory and renamed into place so a reader never sees
half a cache.

Convert once, offline:
  python -m softpatch_jax.weights convert --source=wide_resnet50_2-95faca4d.pth \\
      --arch=wide_resnet50_2 [--cache_dir=DIR]
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import shutil
import tempfile
import time
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from softpatch_jax import models
from softpatch_jax.models import resnet, torch_pickle

DEFAULT_CACHE_ROOT = os.path.join("~", ".cache", "softpatch_jax")
DOWNLOAD_TIMEOUT_S = 10.0
_HF = "https://huggingface.co/timm/{}.tv_in1k/resolve/main/model.safetensors"
_TV = "https://download.pytorch.org/models/{}.pth"
# Published sources per arch, tried in order: the safetensors publication, then torchvision's file
# (whose name carries the first 8 hex digits of its sha256, checked after download).
DOWNLOADS: dict[str, tuple[str, ...]] = {
    "resnet18": (_HF.format("resnet18"), _TV.format("resnet18-f37072fd")),
    "resnet50": (_HF.format("resnet50"), _TV.format("resnet50-0676ba61")),
    "wide_resnet50_2": (_HF.format("wide_resnet50_2"), _TV.format("wide_resnet50_2-95faca4d")),
    "wide_resnet101_2": (_HF.format("wide_resnet101_2"), _TV.format("wide_resnet101_2-32ee1156")),
}
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# The source name of randomly initialised variables: `resolve`'s info["weights"], and so the
# "weights" field of results rows (`results.RANDOM_INIT`).
RANDOM_INIT = "random-init"


def compute_dtype(name: str) -> jnp.dtype:
    """The backbone's compute dtype from its config name (parameters always stay float32)."""
    if name not in _DTYPES:
        raise ValueError(f"backbone dtype must be one of {sorted(_DTYPES)}, got {name!r}")
    return jnp.dtype(_DTYPES[name])


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A torch-named state dict from a `.pth`/`.pt`/`.bin` torch pickle or a `.safetensors` file."""
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        return dict(load_file(path))
    if path.endswith((".pth", ".pt", ".bin", ".ckpt")):
        return torch_pickle.load_state_dict(path)
    raise ValueError(f"{path}: expected a .pth/.pt/.bin/.ckpt or .safetensors weights file")


def convert(arch: str, state_dict: Mapping[str, np.ndarray]) -> dict:
    """Flax variables for `arch` (its full trunk) from a torch-named state dict."""
    fn = models.converter(arch)
    if fn is resnet.convert_torchvision:
        # Published torchvision checkpoints carry the ImageNet classifier, which no feature trunk
        # uses; anything else unexpected stays an error.
        return fn(state_dict, arch, ignore_prefixes=("fc.",))
    return fn(state_dict, arch=arch)


def variables_sha256(variables: Mapping[str, Any]) -> str:
    """sha256 over every variable's path, dtype, shape and bytes (order-independent of dicts)."""
    leaves = jax.tree_util.tree_flatten_with_path(variables)[0]
    digest = hashlib.sha256()
    for path, leaf in sorted(leaves, key=lambda item: jax.tree_util.keystr(item[0])):
        array = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}|{array.dtype.str}|{array.shape};".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def cache_root(cache_dir: str = "") -> str:
    return os.path.expanduser(cache_dir or DEFAULT_CACHE_ROOT)


def save_cache(variables: Mapping[str, Any], directory: str, info: Mapping[str, Any]) -> str:
    """Write `variables` (orbax, under variables/) and `info` (info.json) to `directory` atomically.

    Everything goes to a temporary sibling first and is renamed into place; if another process won
    the race, its (equal) entry is kept. Returns `directory`.
    """
    import orbax.checkpoint as ocp  # slow to import; only the cache paths need it

    directory = os.path.abspath(directory)
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.tmp-", dir=parent)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is shared like any other
    try:
        tree = jax.tree.map(np.asarray, dict(variables))
        ocp.PyTreeCheckpointer().save(os.path.join(tmp, "variables"), tree)
        with open(os.path.join(tmp, "info.json"), "w") as f:
            json.dump(dict(info), f, indent=1, sort_keys=True)
        if os.path.exists(directory):
            shutil.rmtree(directory)  # a stale entry (e.g. a re-conversion) is replaced whole
        try:
            os.rename(tmp, directory)
        except OSError:
            if not _is_cache(directory):
                raise
            logging.info("cache %s appeared concurrently; keeping it", directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def load_cache(directory: str) -> tuple[dict, dict]:
    """(variables as numpy, info) from a `save_cache` directory or a bare orbax directory."""
    import orbax.checkpoint as ocp

    directory = os.path.abspath(os.path.expanduser(directory))
    info: dict = {}
    state_dir = directory
    if os.path.isdir(os.path.join(directory, "variables")):
        state_dir = os.path.join(directory, "variables")
        info_path = os.path.join(directory, "info.json")
        if os.path.exists(info_path):
            with open(info_path) as f:
                info = json.load(f)
    variables = ocp.PyTreeCheckpointer().restore(state_dir)
    return jax.tree.map(np.asarray, variables), info


def _is_cache(directory: str) -> bool:
    return os.path.isdir(os.path.join(directory, "variables"))


def load_source(path: str, arch: str) -> dict:
    """Flax variables from an explicit weights file (.pth/.safetensors) or an orbax directory."""
    path = os.path.expanduser(path)
    if os.path.isdir(path):
        return load_cache(path)[0]
    if not os.path.exists(path):
        raise FileNotFoundError(f"backbone weights {path!r} do not exist")
    return convert(arch, read_state_dict(path))


def download(url: str, dest: str, timeout_s: float = DOWNLOAD_TIMEOUT_S) -> str:
    """Fetch `url` into the file `dest` (via a temporary file, renamed when complete)."""
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".download-", dir=os.path.dirname(dest))
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response, os.fdopen(fd, "wb") as f:
            shutil.copyfileobj(response, f, length=1 << 20)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dest


def _check_torchvision_hash(path: str, url: str) -> None:
    # torchvision names its files <arch>-<first 8 hex digits of the file's sha256>.pth.
    prefix = os.path.basename(url).rsplit("-", 1)[-1].split(".")[0]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if not digest.hexdigest().startswith(prefix):
        raise ValueError(f"{path}: sha256 {digest.hexdigest()[:8]} does not match {url}")


def _local_finder(arch: str):
    """The arch module's optional `find_local_weights(arch) -> str | None` hook, or None."""
    module_name = models.get_spec(arch).module.split(":")[0]
    return getattr(importlib.import_module(module_name), "find_local_weights", None)


@dataclasses.dataclass(frozen=True)
class Backbone:
    """Which backbone and where its weights come from (the driver builds it from
    `config.backbone`; defaults live in configs/base.py)."""

    arch: str
    layers: str  # comma list; "" = the architecture's default stride-8/stride-16 pair
    weights: str  # explicit weights file or orbax dir; "" = resolve
    cache_dir: str  # orbax cache of converted weights; "" = the default cache
    allow_random_init: bool
    dtype: str  # compute dtype (`compute_dtype`)
    # Depthwise convolution lowering (EfficientNet-Lite): "auto" (CPU: "shifted"), "conv",
    # "shifted"; equal to float32 rounding, so not part of any identity or cache key.
    depthwise: str = "auto"


def _layers(backbone_cfg: Backbone, arch: str) -> tuple[str, ...]:
    layers = models.split_layers(backbone_cfg.layers or ())
    return layers or models.get_spec(arch).feature_layers


def missing_weights_message(arch: str, root: str, errors: Sequence[str] = ()) -> str:
    """What to fetch and how to convert it, for the offline error."""
    urls = DOWNLOADS.get(arch, ())
    source = os.path.basename(urls[-1]) if urls else f"<{arch} weights>.pth"
    lines = [
        f"no weights for backbone {arch!r}: no backbone.weights file, no cache in "
        f"{os.path.join(root, arch)}, no local copy"
        + (f", and downloading failed ({'; '.join(errors)})." if errors else "."),
    ]
    if urls:
        lines += ["Fetch one of:", *(f"  {url}" for url in urls)]
    lines += [
        "then convert it once:",
        f"  python -m softpatch_jax.weights convert --source={source} --arch={arch} "
        f"--cache_dir={root}",
        "or set --config.backbone.weights=/path/to/that/file. "
        "(--config.backbone.allow_random_init=True gives random features, for smoke tests only.)",
    ]
    return "\n".join(lines)


def random_variables(module, seed: int = 0, image_size: int = 64) -> dict:
    """He-normal kernels, unit scale/variance, zero bias/mean, for every variable of `module`.

    Drawn on the host with numpy: XLA takes tens of seconds to compile Flax's initialisers
    (threefry per parameter) for a deep ResNet on CPU, for weights that are only a smoke-test aid.
    """
    shapes = jax.eval_shape(
        module.init,
        jax.random.key(0),
        jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32),
    )
    rng = np.random.default_rng(seed)

    def draw(path, leaf) -> np.ndarray:
        name = path[-1].key
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            return (rng.standard_normal(leaf.shape) * np.sqrt(2.0 / fan_in)).astype(leaf.dtype)
        fill = 1.0 if name in ("scale", "var") else 0.0
        return np.full(leaf.shape, fill, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, dict(shapes))


def resolve(backbone_cfg: Backbone, seed: int = 0) -> tuple[dict, dict]:
    """Flax variables for `backbone_cfg.arch`, and a small dict saying where they came from.

    Order: backbone_cfg.weights (a file or orbax directory); the orbax cache in
    `<cache_dir>/<arch>`; the arch module's `find_local_weights` hook; a download of DOWNLOADS[arch]
    (converted and cached). With none of these, random init if `allow_random_init` (seeded by
    `seed`) with a loud warning, else FileNotFoundError saying what to fetch.

    Returns:
      variables: {"params": ..., "batch_stats": ...} as float32 arrays.
      info: {"arch", "weights" ("random-init" or a description of the source), "sha256"}.
    """
    arch = backbone_cfg.arch
    models.get_spec(arch)
    compute_dtype(backbone_cfg.dtype)  # fail on a typo before any conversion work
    root = cache_root(backbone_cfg.cache_dir)
    entry = os.path.join(root, arch)

    def done(variables: dict, source: str) -> tuple[dict, dict]:
        info = {"arch": arch, "weights": source, "sha256": variables_sha256(variables)}
        logging.info("backbone %s weights: %s (sha256 %s)", arch, source, info["sha256"][:12])
        return variables, info

    def convert_and_cache(path: str, source: str) -> tuple[dict, dict]:
        variables = convert(arch, read_state_dict(path))
        variables, info = done(variables, source)
        save_cache(variables, entry, info)
        return variables, info

    if backbone_cfg.weights:
        return done(load_source(backbone_cfg.weights, arch), f"file:{backbone_cfg.weights}")
    if _is_cache(entry):
        variables, cached_info = load_cache(entry)
        return done(variables, f"cache:{entry} ({cached_info.get('weights', 'unknown source')})")
    finder = _local_finder(arch)
    local = finder(arch) if finder is not None else None
    if local:
        return convert_and_cache(local, f"local:{local}")
    errors = []
    downloads = os.path.join(root, "downloads")
    for url in DOWNLOADS.get(arch, ()):
        name = os.path.basename(url)
        if "huggingface.co" in url:
            name = f"{arch}.tv_in1k.safetensors"  # the hub's file is just model.safetensors
        dest = os.path.join(downloads, name)
        os.makedirs(downloads, exist_ok=True)
        try:
            download(url, dest)
            if url.startswith("https://download.pytorch.org/"):
                _check_torchvision_hash(dest, url)
            return convert_and_cache(dest, f"download:{url}")
        except (OSError, ValueError) as e:
            errors.append(f"{url}: {e}")
            logging.info("download of %s failed: %s", url, e)
        finally:
            # The converted cache is what later runs read; the raw file would only double the disk.
            if os.path.exists(dest):
                os.remove(dest)
    if not backbone_cfg.allow_random_init:
        raise FileNotFoundError(missing_weights_message(arch, root, errors))
    logging.warning(
        "\n%s\n!!! backbone %s runs on RANDOM weights (allow_random_init=True): features and "
        "scores are meaningless beyond smoke tests.\n%s",
        "!" * 80,
        arch,
        "!" * 80,
    )
    module = models.build(arch, _layers(backbone_cfg, arch))
    return done(random_variables(module, seed), RANDOM_INIT)


def convert_file(source: str, arch: str, cache_dir: str = "") -> str:
    """Converts a weights file into the cache under `cache_dir`; returns what the command prints."""
    start = time.perf_counter()
    variables = convert(arch, read_state_dict(source))
    info = {
        "arch": arch,
        "weights": f"converted:{os.path.abspath(source)}",
        "sha256": variables_sha256(variables),
    }
    entry = save_cache(variables, os.path.join(cache_root(cache_dir), arch), info)
    count = sum(np.size(leaf) for leaf in jax.tree.leaves(variables))
    return (
        f"wrote {entry} ({count:,} values, sha256 {info['sha256']}) in "
        f"{time.perf_counter() - start:.1f} s"
    )


def _define_flags() -> None:
    flags.DEFINE_string("source", None, ".pth / .safetensors weights file")
    flags.DEFINE_string("arch", None, f"one of {sorted(models.ARCHS)}")
    flags.DEFINE_string("cache_dir", "", f"cache root (default {DEFAULT_CACHE_ROOT})")
    flags.mark_flags_as_required(["source", "arch"])


def main(argv: Sequence[str]) -> None:
    if list(argv[1:]) != ["convert"]:
        raise app.UsageError(f"expected the command `convert`, got {argv[1:]}")
    f = flags.FLAGS
    print(convert_file(f.source, f.arch, f.cache_dir))


if __name__ == "__main__":
    _define_flags()  # here, not at import: the library imports this module beside other flags
    app.run(main)
