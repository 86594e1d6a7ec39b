"""The config read once, by the drivers: each stage's small frozen options built from the config
sections of the same names (flax's imagenet example: the config stops at the driver, stages take
plain arguments). Every default lives in configs/base.py; nothing here supplies one.
"""

from __future__ import annotations

import ml_collections

from softpatch_jax import (
    data,
    discriminators,
    features,
    inreach,
    memory_bank,
    methods,
    scoring,
    weights,
)


def method_options(config: ml_collections.ConfigDict) -> methods.Options:
    sp = config.softpatch
    return methods.Options(
        discriminator=sp.discriminator,
        discriminators=sp.discriminators,
        tau=sp.tau,
        tau_seg=sp.tau_seg,
        soft_weight=sp.soft_weight,
        rank_scope=sp.rank_scope,
        auto_estimator=sp.auto_estimator,
        auto_floor=sp.auto_floor,
        auto_floor_seg=sp.auto_floor_seg,
        inreach=inreach.Options(
            window=config.inreach.window,
            min_length=config.inreach.min_length,
            spread_quantile=config.inreach.spread_quantile,
        ),
    )


def method_specs(config: ml_collections.ConfigDict) -> list[methods.MethodSpec]:
    """`config.methods` as specs (a typo in a method or discriminator name fails here)."""
    return methods.specs(config.methods, method_options(config))


def fit_options(config: ml_collections.ConfigDict) -> memory_bank.FitOptions:
    sp = config.softpatch
    return memory_bank.FitOptions(
        projection_dim=sp.projection_dim,
        discriminator_params={k: sp[k] for k in discriminators.config_defaults()},
        score_dtype=sp.score_dtype,
        num_starts=config.coreset.num_starts,
        coreset_ratio=config.coreset.ratio,
        strict_parity=config.coreset.strict_parity,
        parallel=config.parallel.enabled,
    )


def scoring_options(config: ml_collections.ConfigDict) -> scoring.Options:
    sc = config.scoring
    return scoring.Options(sc.distance, sc.search, sc.blur_sigma, sc.chunk_size)


def backbone_options(bb: ml_collections.ConfigDict) -> weights.Backbone:
    """The `config.backbone` section."""
    return weights.Backbone(
        arch=bb.arch,
        layers=bb.layers,
        weights=bb.weights,
        cache_dir=bb.cache_dir,
        allow_random_init=bb.allow_random_init,
        dtype=bb.dtype,
        # Configs saved before the option existed (deploy models) lower as "auto".
        depthwise=bb.get("depthwise", "auto"),
    )


def extractor_options(config: ml_collections.ConfigDict) -> features.Options:
    emb = config.embedding
    return features.Options(
        backbone=backbone_options(config.backbone),
        patch_size=emb.patch_size,
        pretrain_dim=emb.pretrain_dim,
        target_dim=emb.target_dim,
        crop=config.dataset.crop,
        batch_size=config.dataset.batch_size,
    )


def dataset_options(ds: ml_collections.ConfigDict) -> data.Options:
    """The `config.dataset` section."""
    return data.Options(
        layout=ds.layout,
        root=ds.root,
        categories=ds.categories,
        resize=ds.resize,
        crop=ds.crop,
        prepared=ds.prepared,
        data_dir=ds.data_dir,
        split=ds.split,
        resolution=ds.resolution,
    )
