"""How contaminated is a training set? Estimates from the discriminator scores the fit already has,
for SoftPatch's `tau = "auto"` policy (README "Unknown contamination").

SoftPatch removes the top tau of the training patches (METHOD.md section 4) with tau fixed at 0.15;
a production line knows neither whether its folder holds defects nor how many. Every estimator here
maps raw discriminator scores [N, P] to an `Estimate`: the contaminated patch fraction (the tau to
remove), the anomalous image fraction, and a per-image suspicion in [0, 1] by which the soft weights
fade to 1 (`fade_weights`). `policy_tau` turns an estimate into the tau removed: a set found clean
removes nothing, a contaminated one at least the bank's floor (the authors' tau). With the default
`image_contrast` (or `image_floor`) a set found clean gets exactly PatchCore's bank and a
contaminated one the authors' SoftPatch bank (or one removing more, where more images look
defective).

The estimators work on log scores (LOF's inliers sit near log 1 = 0 whatever the texture; distance
scores become scale-free) against the bulk's median and MAD (1.4826 MAD = sigma for a Gaussian):
  image  images whose top-k mean log score is an outlier among the images' (robust z above a
         cutoff that grows with N as the maximum of N null z-scores does); within them, the patches
         above the normal images' typical maximum. Rare normal patterns spread over many images do
         not flag an image; a defect makes one image unlike the rest (TailedCore's tail-vs-noise
         question, asked at the image level).
  image_share  the image gate's flagged images, tau = their share: a defect
         contaminates far more patches than its mask, and removing only the mask fraction
         (`image`, or the oracle) leaves most of it in the bank (README "Unknown contamination").
  image_share_global  as image_share, with the authors' soft weights on every image of a set
         found contaminated.
  image_floor  the image gate with its median and MAD re-estimated on the images it has not
         flagged (`GATE_ROUNDS` rounds: at 40% noise the defects themselves inflate a one-pass
         MAD and hide each other); a set with a flagged image is contaminated and gets the authors'
         soft weights on every image; tau = the flagged share, which the bank's floor (the
         authors' tau, `softpatch.auto_floor`) raises: on every noisy set measured the fixed 0.15
         beat removing only the estimated share (README "Unknown contamination").
  image_contrast  (the default) image_floor on each image's top-k mean log score less its own
         median log score: an image that is unusual all over (another colour, scale or orientation
         of a variable texture) raises both and is not flagged; a local defect raises only the
         top. It finds the variable textures' contaminated sets at 10-20% that image_floor misses,
         ties it on the demo and PIPED, and flags one clean PIPED set (README "Unknown
         contamination").
  tail   patch-level: the share of patches whose robust z exceeds a cutoff (no image structure).
  lof    LOF's natural scale: the share of patches with LOF above a fixed ratio (2: twice as
         sparse as its neighbours), less the share a clean set has, ~0.
Every estimator is a pure jnp function (jit, no host round trip); `ESTIMATORS` is the registry.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

TINY = 1e-12
MAD_TO_SIGMA = 1.4826  # 1 / Phi^-1(3/4): MAD of a Gaussian = 0.6745 sigma


@flax.struct.dataclass
class Estimate:
    tau: jax.Array  # () estimated contaminated patch fraction: the share to remove
    image_fraction: jax.Array  # () estimated share of anomalous training images
    suspicion_N: jax.Array  # [N] in [0, 1]: how contaminated each image looks (weights fade by it)


def log_scores(scores: jax.Array) -> jax.Array:
    """log of non-negative scores, clamped away from 0 (LOF is positive; distances can be 0)."""
    return jnp.log(jnp.maximum(scores.astype(jnp.float32), TINY))


def robust_z(x: jax.Array, axis: int | None = None) -> jax.Array:
    """(x - median) / (1.4826 MAD) along `axis` (all of x when None); a zero MAD counts as TINY."""
    med = jnp.median(x, axis=axis, keepdims=True)
    mad = jnp.median(jnp.abs(x - med), axis=axis, keepdims=True)
    return (x - med) / jnp.maximum(MAD_TO_SIGMA * mad, TINY)


def null_cutoff(n: int, alpha: float = 0.05, margin: float = 1.0) -> float:
    """Robust z above which one of `n` null values is an outlier: the one-sided Bonferroni quantile
    Phi^-1(1 - alpha / n) (the largest of n standard normals stays below it with probability
    ~1 - alpha) plus `margin` for the heavier right tail of maxima and top-k means."""
    return statistics.NormalDist().inv_cdf(1.0 - alpha / max(n, 1)) + margin


def top_mean(v_NxP: jax.Array, k: int) -> jax.Array:
    """[N]: the mean of each image's k largest values (k static)."""
    return jnp.mean(jax.lax.top_k(v_NxP, k)[0], axis=1)


def top_k_for(num_positions: int, share: float = 0.01) -> int:
    """The k of the image statistic: 1% of the positions, at least 1 (a defect covers a few)."""
    return max(1, math.ceil(share * num_positions))


def gate_z(x_N: jax.Array, cutoff: float, rounds: int = 1) -> jax.Array:
    """Robust z of the image statistics, the median and MAD re-estimated `rounds` times on the
    images not yet above `cutoff` (round 1: all images). A set with no outlier is unchanged by
    further rounds; in a heavily contaminated one the strong outliers stop inflating the scale."""
    flagged_N = jnp.zeros(x_N.shape, bool)
    z_N = x_N
    for _ in range(rounds):
        rest_N = jnp.where(flagged_N, jnp.nan, x_N)
        med = jnp.nanmedian(rest_N)
        mad = jnp.nanmedian(jnp.abs(rest_N - med))
        z_N = (x_N - med) / jnp.maximum(MAD_TO_SIGMA * mad, TINY)
        flagged_N = z_N > cutoff
    return z_N


GATE_ROUNDS = 3  # image_floor's rounds (a 4th changed no flag on the 76 sets measured)


def image_statistic(v_NxP: jax.Array, share: float = 0.01, contrast: bool = False) -> jax.Array:
    """[N]: each image's mean of its top `share` log scores (`top_k_for`), less its median log score
    when `contrast` (the defect's rise above the image's own level)."""
    x = top_mean(v_NxP, top_k_for(v_NxP.shape[1], share))
    return x - jnp.median(v_NxP, axis=1) if contrast else x


def image_gate(
    scores_NxP: jax.Array,
    cutoff: float | None = None,
    share: float = 0.01,
    rounds: int = 1,
    contrast: bool = False,
) -> Estimate:
    """Flag images whose top-k mean log score (less the image's median with `contrast`) is an
    outlier among the images'; in them, count the patches above the median of the unflagged
    images' maxima (what the worst patch of a normal image looks like).

    suspicion: 0 at robust z <= cutoff - 1, rising linearly to 1 at cutoff + 1 (a soft flag, so a
      borderline image keeps part of its soft weights). cutoff None: `null_cutoff(N)`.
    """
    n = scores_NxP.shape[0]
    c = null_cutoff(n) if cutoff is None else cutoff
    v = log_scores(scores_NxP)
    z_N = gate_z(image_statistic(v, share, contrast), c, rounds)
    flagged_N = z_N > c
    suspicion_N = jnp.clip((z_N - (c - 1.0)) / 2.0, 0.0, 1.0)
    max_N = jnp.max(v, axis=1)
    # Median of the unflagged maxima: flagged ones pushed to +inf and -inf in equal numbers keep
    # the median where the unflagged ones put it, with static shapes.
    theta = jnp.nanmedian(jnp.where(flagged_N, jnp.nan, max_N))
    above_NxP = (v > theta) & flagged_N[:, None]
    return Estimate(
        tau=jnp.mean(above_NxP.astype(jnp.float32)),
        image_fraction=jnp.mean(flagged_N.astype(jnp.float32)),
        suspicion_N=suspicion_N,
    )


def image_share(scores_NxP: jax.Array, cutoff: float | None = None) -> Estimate:
    """`image_gate`'s flagged images, with tau = their share of the images: a defect contaminates
    far more patches than its mask (the 3x3 aggregation and the backbone's receptive field spread
    it; the oracle mask fraction removes too little, README "Unknown contamination"), so remove
    as many top patches as a flagged image's share. Weights fade per image as `image_gate`'s."""
    est = image_gate(scores_NxP, cutoff)
    return est.replace(tau=est.image_fraction)


def image_share_global(scores_NxP: jax.Array, cutoff: float | None = None) -> Estimate:
    """`image_share`, with the authors' soft weights on every image once any image is flagged (a
    set found contaminated is treated as the papers treat it; a clean one is PatchCore)."""
    est = image_share(scores_NxP, cutoff)
    dirty = (est.image_fraction > 0).astype(jnp.float32)
    return est.replace(suspicion_N=jnp.full_like(est.suspicion_N, 1.0) * dirty)


def image_floor(
    scores_NxP: jax.Array, cutoff: float | None = None, contrast: bool = False
) -> Estimate:
    """The iterated image gate (`gate_z`, `GATE_ROUNDS`; `contrast` as `image_gate`); tau = the
    flagged images' share; once an image is flagged every image carries the authors' soft weights
    (suspicion 1), else all are PatchCore's (0). Used with a bank floor (`policy_tau`): a
    contaminated set removes at least the authors' tau."""
    est = image_gate(scores_NxP, cutoff, rounds=GATE_ROUNDS, contrast=contrast)
    dirty = (est.image_fraction > 0).astype(jnp.float32)
    return est.replace(tau=est.image_fraction, suspicion_N=jnp.ones_like(est.suspicion_N) * dirty)


def image_contrast(scores_NxP: jax.Array, cutoff: float | None = None) -> Estimate:
    """`image_floor` with the gate on each image's top-k mean less its median log score."""
    return image_floor(scores_NxP, cutoff, contrast=True)


def _from_flags(flag_NxP: jax.Array) -> Estimate:
    """The estimate of per-patch flags: tau their share, an image anomalous if any of its patches
    is, its suspicion its share of flagged patches relative to the largest share."""
    flag = flag_NxP.astype(jnp.float32)
    per_image = jnp.mean(flag, axis=1)
    return Estimate(
        tau=jnp.mean(flag),
        image_fraction=jnp.mean((per_image > 0).astype(jnp.float32)),
        suspicion_N=per_image / jnp.maximum(jnp.max(per_image), TINY),
    )


def tail(scores_NxP: jax.Array, cutoff: float = 3.5) -> Estimate:
    """The share of patches whose robust z (log scores, over all patches) exceeds `cutoff`; an
    image is anomalous if any of its patches is, its suspicion the share of its patches flagged
    relative to the largest share."""
    return _from_flags(robust_z(log_scores(scores_NxP)) > cutoff)


def lof_scale(scores_NxP: jax.Array, ratio: float = 2.0) -> Estimate:
    """LOF's natural scale: the share of patches with LOF > `ratio` (their local density is
    `ratio` times below their neighbours'); meaningful for LOF scores only."""
    return _from_flags(scores_NxP > ratio)


ESTIMATORS: dict[str, Callable[[jax.Array], Estimate]] = {
    "image": image_gate,
    "image_share": image_share,
    "image_share_global": image_share_global,
    "image_floor": image_floor,
    "image_contrast": image_contrast,
    "tail": tail,
    "lof": lof_scale,
}
DEFAULT = "image_contrast"
# The least tau "auto" removes from a set found contaminated (`policy_tau`): the authors' tau and
# SoftPatch+'s tau_seg (configs/base.py's softpatch.auto_floor / auto_floor_seg).
FLOOR, FLOOR_SEG = 0.15, 0.5
# The discriminators an estimate prefers, in order: LOF has the natural scale (inliers ~1).
PREFERRED = ("lof", "gaussian", "nearest")


def check(name: str) -> str:
    if name not in ESTIMATORS:
        raise ValueError(f"unknown contamination estimator {name!r}; valid: {sorted(ESTIMATORS)}")
    return name


def source(scores_NxP: dict[str, jax.Array], candidates=PREFERRED) -> str | None:
    """The discriminator whose raw scores an estimate reads: the first of `candidates` scored."""
    return next((n for n in candidates if n in scores_NxP), None)


@jax.jit(static_argnames=("name",))
def _estimate(scores_NxP: jax.Array, name: str) -> Estimate:
    return ESTIMATORS[name](scores_NxP)


def estimate(scores_NxP: dict[str, jax.Array], name: str = DEFAULT, prefer=PREFERRED) -> Estimate:
    """The estimate `name` from the first of `prefer` among the raw scores {discriminator: [N, P]}
    (LOF where scored: SoftPatch+ fuses ranks, which carry no scale, so it reads the raw score)."""
    src = source(scores_NxP, prefer)
    if src is None:
        raise ValueError(f"tau='auto' needs a discriminator's scores; got {sorted(scores_NxP)}")
    return _estimate(scores_NxP[src], check(name))


def policy_tau(est: Estimate, floor: float, granularity: str = "patch") -> jax.Array:
    """The removal fraction tau "auto" applies: the estimate (the image fraction for image-level
    removal), raised to `floor` on a set with a flagged image; a set found clean removes nothing
    whatever the floor."""
    tau = est.image_fraction if granularity == "image" else est.tau
    if floor <= 0:
        return tau
    return jnp.where(est.image_fraction > 0, jnp.maximum(tau, floor), tau)


def fade_weights(weights_NxP: jax.Array, suspicion_N: jax.Array) -> jax.Array:
    """Soft weights faded towards 1 by each image's suspicion: 1 + s_n (w - 1). Images that look
    clean carry weight 1 (PatchCore's), suspect ones their discriminator's weight."""
    return 1.0 + suspicion_N[:, None] * (weights_NxP - 1.0)


def summary(est: Estimate, applied=None) -> dict[str, float]:
    """The row fields of an estimate (host floats); `applied`: the tau the policy removed
    (`policy_tau`), when the bank's tau is "auto"."""
    tau, frac = jax.device_get((est.tau, est.image_fraction))
    out = {
        "tau_estimated": round(float(tau), 6),
        "image_fraction_estimated": round(float(frac), 6),
    }
    if applied is not None:
        out["tau_applied"] = round(float(jax.device_get(applied)), 6)
    return out


def true_patch_fraction(masks_IxHxW: np.ndarray, grid: tuple[int, int], num_train: int) -> float:
    """The oracle tau: the share of the N = `num_train` training images' h x w patches that touch a
    defect, from the injected images' masks (host numpy; labels, not a hot path). A patch touches a
    defect when any mask pixel of its cell (rows y*H//h .. (y+1)*H//h) is set."""
    masks = np.asarray(masks_IxHxW, bool)
    if masks.size == 0:
        return 0.0
    _, hh, ww = masks.shape
    h, w = grid
    rows = np.arange(hh) * h // hh  # the grid row of each pixel row
    cols = np.arange(ww) * w // ww
    cells = np.zeros((masks.shape[0], h, w), bool)
    np.logical_or.at(cells, (slice(None), rows[:, None], cols[None, :]), masks)
    return float(cells.sum()) / float(num_train * h * w)
