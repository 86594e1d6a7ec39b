"""`fit` for the deployment tool: an unlabelled image folder -> a saved model (memory banks with soft
weights, METHOD.md section 4) plus the training-set audit and the threshold's training scores.

Images stream through the backbone one batch at a time; only the patch features of the whole set
are held (the discriminators need all of them at once, METHOD.md section 3). All three
discriminators are computed whatever the method uses, so the audit can report each of them.
"""

from __future__ import annotations

import dataclasses
import datetime
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from softpatch_jax import discriminators, features, memory_bank, methods
from softpatch_jax.data import folder, images
from softpatch_jax.deploy import audit as audit_lib
from softpatch_jax.deploy import model as model_lib
from softpatch_jax.deploy import region as region_lib
from softpatch_jax.deploy import threshold as threshold_lib
from softpatch_jax.experiment import config_errors
from softpatch_jax.experiment import options as options_lib
from softpatch_jax.io_utils import split_list


@dataclasses.dataclass(frozen=True)
class Options:
    method: str = "softpatch_plus"
    threshold: str = threshold_lib.DEFAULT_RULE
    threshold_folds: int = threshold_lib.DEFAULT_FOLDS
    skip_bad_images: bool = False
    allow_upscale: bool = False
    region: str = region_lib.DEFAULT  # "full" frame (tiled) or "center" crop, deploy/region.py


def check_finite(feats_BxPxD: jax.Array, paths: Sequence[str]) -> None:
    """FloatingPointError naming every image whose features hold NaN or inf."""
    ok = np.asarray(jnp.all(jnp.isfinite(feats_BxPxD), axis=tuple(range(1, feats_BxPxD.ndim))))
    if not ok.all():
        bad = [paths[i] for i in np.flatnonzero(~ok)]
        raise FloatingPointError(
            f"NaN or inf in the backbone features of {len(bad)} image(s): {bad[:10]}; "
            "check the backbone weights and dtype (bfloat16 can overflow)"
        )


def extract_all(
    ex: features.Extractor,
    listing: folder.Listing,
    config,
    opts: Options,
    sixteen_bit_max: int = images.FULL_16_BIT,
) -> tuple[np.ndarray, list[int], list[images.BadImageError], dict]:
    """Features [N, T*P, D] (host, float32) of the readable images (T tiles of P patches each,
    deploy/region.py), their listing indices, the skipped files, and the region's description.
    16-bit images are scaled by 255 / sixteen_bit_max (`images.sixteen_bit_range`)."""
    paths = [r.path for r in listing.records]
    chunks, kept, bad = [], [], []
    layout, first = None, None
    done, t0 = 0, time.perf_counter()
    for index, views, skipped in region_lib.iter_views(
        paths,
        ex.batch_size,
        config.dataset.resize,
        config.dataset.crop,
        opts.region,
        skip_bad=opts.skip_bad_images,
        allow_upscale=opts.allow_upscale,
        sixteen_bit_max=sixteen_bit_max,
    ):
        bad += skipped
        done += len(index) + len(skipped)
        for i, v in zip(index, views):
            if layout is None:
                layout, first = v.layout, (paths[i], v)
            elif v.layout != layout:
                raise ValueError(
                    f"fit with --region=full needs training images of one size: {paths[i]!r} is "
                    f"{v.source_hw[1]}x{v.source_hw[0]} but {first[0]!r} is "
                    f"{first[1].source_hw[1]}x{first[1].source_hw[0]} (width x height); "
                    "resize them alike or pass --region=center"
                )
        if index:
            tiles = np.concatenate([v.tiles for v in views])
            f = features.extract(ex, tiles)
            f = f.reshape(len(index), -1, f.shape[-1])  # [b, T*P, D], tile-major
            check_finite(f, [paths[i] for i in index])
            chunks.append(np.asarray(f, np.float32))
            kept += index
        logging.info(
            "fit: features %d/%d images (%.1f img/s)",
            done,
            len(paths),
            done / max(time.perf_counter() - t0, 1e-9),
        )
    for b in bad:
        logging.warning("skipped bad image %s", b)
    if len(kept) < 2:
        raise ValueError(
            f"fit needs at least 2 readable training images, found {len(kept)} "
            f"({len(bad)} skipped as bad) in {listing.root!r}"
        )
    v = first[1]
    info = {
        "mode": opts.region,
        "tiles": len(v.origins),
        "origins": v.origins.tolist(),
        "frame_hw": list(v.frame.shape[:2]),
        "distinct_fraction": min(
            1.0, v.frame.shape[0] * v.frame.shape[1] / (len(v.origins) * config.dataset.crop**2)
        ),
        "source_hw": list(v.source_hw),
        "described": region_lib.describe(
            opts.region, v, config.dataset.resize, config.dataset.crop
        ),
    }
    return np.concatenate(chunks), kept, bad, info


def fit(
    config: ml_collections.ConfigDict,
    sources: str | Sequence[str],
    opts: Options | None = None,
    extractor: features.Extractor | None = None,
) -> tuple[model_lib.Model, audit_lib.Audit, folder.Listing]:
    """Fits the model on every image under `sources`; returns it (unsaved), its audit, the listing.

    `extractor` reuses one built earlier for this config (`features.build` of
    `options_lib.extractor_options(config)`), saving the compilation in notebooks and tests.
    """
    opts = opts or Options()
    config_errors.validate(config)  # every value checked before hours of work
    threshold_lib.parse(opts.threshold)
    spec = methods.spec(opts.method, options_lib.method_options(config))
    fit_opts = options_lib.fit_options(config)
    listing = folder.list_images(sources)
    for path in listing.ignored:
        logging.warning("ignored non-image file %s", path)
    ex = extractor or features.build(options_lib.extractor_options(config))
    if ex.image_size != (config.dataset.crop, config.dataset.crop):
        raise ValueError(
            f"extractor takes {ex.image_size} images, config crop is {config.dataset.crop}"
        )
    if ex.random_init:
        logging.warning(features.RANDOM_INIT_WARNING)
    region_lib.check_mode(opts.region)
    # The 16-bit range the training images use (12-bit sensors write 0..4095), recorded with the
    # model and used at predict: the fixed 16-bit scale would leave such images ~16 grey levels.
    s16, n16 = images.sixteen_bit_range([r.path for r in listing.records])
    if n16:
        logging.info(
            "fit: %d 16-bit image(s) use %d bits (0..%d), scaled by 255/%d",
            n16,
            images.bit_depth(s16),
            s16,
            s16,
        )
    feats_np, kept, bad, region_info = extract_all(ex, listing, config, opts, s16)
    n, p, _ = feats_np.shape
    feats = jnp.asarray(feats_np)
    del feats_np
    key = jax.random.key(config.seed)
    # Every discriminator, whatever the method uses: the audit reports each of them.
    logging.info("fit: discriminators on %d images x %d positions", n, p)
    prepared = memory_bank.prepare(key, feats, fit_opts, discriminators.NAMES)
    logging.info("fit: %s memory banks", opts.method)
    # Overlapping tiles hold near-duplicate patches: the coreset ratio counts the frame's distinct
    # area, so the bank has the density per pixel it has on centre crops (deploy/region.py).
    ratio = config.coreset.ratio * region_info["distinct_fraction"]
    region_info["coreset_ratio"] = ratio
    out = memory_bank.fit_banks(
        prepared, feats, dataclasses.replace(fit_opts, coreset_ratio=ratio), [spec]
    )
    banks = out.banks[opts.method]
    projection = out.projection_DxR
    estimate = contamination_info(spec, out.scores_NxP)
    logging.info(
        "fit: tau=%s tau_seg=%s; estimated contamination %.4f of patches, %.3f of images",
        config.softpatch.tau,
        config.softpatch.tau_seg,
        estimate["tau_estimated"],
        estimate["image_fraction_estimated"],
    )
    logging.info("fit: held-out training scores (%d folds)", opts.threshold_folds)
    fold_N = threshold_lib.fold_of(n, opts.threshold_folds, config.seed)
    train_patch = threshold_lib.heldout_patch_scores(
        prepared,
        feats,
        out.keep_NxP[opts.method],
        memory_bank.soft_weights(spec.cls, out.scores_NxP, (n, p)),
        ratio,
        fold_N,
        config.scoring.chunk_size,
        distance=config.scoring.distance,
        strict=config.coreset.strict_parity,
    )
    del prepared
    owned = region_lib.owned_patches(
        np.asarray(region_info["origins"]),
        config.dataset.crop,
        tuple(ex.grid),
        tuple(region_info["frame_hw"]),
    )
    train_scores = train_patch[:, owned].max(axis=1)  # as predict scores an image
    names = [folder.escape(listing.relative(listing.records[i].path)) for i in kept]
    arrays = {f"scores/{k}": np.asarray(v) for k, v in out.scores_NxP.items()}
    arrays["keep"] = np.asarray(out.keep_NxP[opts.method])
    arrays["train_scores"] = train_scores
    arrays["train_patch_median"] = np.median(train_patch, axis=1)
    arrays["fold"] = fold_N
    fusion = split_list(config.softpatch.discriminators)
    degenerate = threshold_lib.spread_warning(train_scores)
    if degenerate:
        logging.warning("fit: %s", degenerate)
    meta = {
        **model_lib.identity(ex, config),
        "code": model_lib.code_version(),
        "config": config.to_dict(),
        "method": opts.method,
        "threshold": {
            "rule": opts.threshold,
            "value": threshold_lib.value(opts.threshold, train_scores),
            "train_scores": f"held out, {len(np.unique(fold_N))} folds (deploy/threshold.py)",
            "warning": degenerate,  # None, or why the threshold has no margin
        },
        "region": region_info,
        "decoding": {
            "sixteen_bit_max": s16,
            "sixteen_bit_images": n16,
            "doc": "16-bit samples are scaled by 255/sixteen_bit_max; larger ones are refused",
        },
        "training": {
            "root": folder.escape(listing.root),
            "images": names,
            "names": "escaped (data/folder.py escape): \\ a backslash, \\xNN a byte",
            "skipped_bad": [{"path": folder.escape(b.path), "reason": b.reason} for b in bad],
            "ignored_non_images": [folder.escape(p) for p in listing.ignored],
            "skipped_entries": [
                {"path": folder.escape(p), "reason": why} for p, why in listing.skipped
            ],
        },
        "banks": {
            "cls": int(banks.cls.feats_MxD.shape[0]),
            "seg": int(banks.seg.feats_MxD.shape[0]),
        },
        "audit": {"fusion": fusion, "rank_scope": config.softpatch.rank_scope},
        "contamination": estimate,
        "random_init": ex.random_init,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    model = model_lib.Model(
        banks, None if projection is None else np.asarray(projection), arrays, meta
    )
    return model, audit_of(model), listing


def contamination_info(spec, scores_NxP) -> dict:
    """The training set's contamination estimate (contamination.py) and the tau policy used."""
    name, fields = memory_bank.contamination_summary(spec.cls, scores_NxP)
    return {"tau": spec.cls.tau, "estimator": name, **fields}


def audit_tau(model: model_lib.Model) -> float:
    """The removal fraction the audit marks: the fixed tau, or the fit's estimate under "auto"."""
    tau = model.config.softpatch.tau
    if tau == "auto":
        est = model.meta.get("contamination", {})
        return float(est.get("tau_applied", est.get("tau_estimated", 0.0)))
    return float(tau)


def audit_of(model: model_lib.Model) -> audit_lib.Audit:
    """The audit from a model's saved arrays (no features needed)."""
    scores = {k.split("/", 1)[1]: v for k, v in model.arrays.items() if k.startswith("scores/")}
    return audit_lib.compute(
        model.meta["training"]["images"],
        scores,
        model.meta["audit"]["fusion"],
        model.meta["audit"]["rank_scope"],
        audit_tau(model),
        model.arrays["keep"],
    )
