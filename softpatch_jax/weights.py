"""Backbone weights resolution (placeholder until the torchvision port lands): random initialisation
only, allowed solely when the config says so."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from softpatch_jax import models


def resolve(cfg: ml_collections.ConfigDict) -> tuple[dict, dict]:
    module = models.build(cfg.arch, tuple(models.split_layers(cfg.layers)) or None)
    if not cfg.allow_random_init:
        raise FileNotFoundError(
            f"no weights for backbone {cfg.arch!r}; set --config.backbone.allow_random_init=True "
            "to run on random features (useless for real defects)"
        )
    logging.warning("RANDOM-INIT BACKBONE %s: results say nothing about the method", cfg.arch)
    variables = module.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3), jnp.float32))
    return variables, {"weights": "random-init", "arch": cfg.arch}
