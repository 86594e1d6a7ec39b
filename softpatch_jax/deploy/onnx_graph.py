"""What an exported model computes, as one pure JAX function of the frames, written so that every
step converts to ONNX (`deploy/export.py` converts it with jax2onnx).

    frames uint8 [N, H, W, 3]  ->  image scores float32 [N], anomaly maps float32 [N, H, W]

The input is the frame `deploy predict` inspects: the decoded image (RGB, `data.images` rules)
resized so its shorter side is `dataset.resize` ("full") or then centre-cropped to `crop`
("center"), uint8, at the size the model was fitted on (`model.json` region.frame_hw). The resize is
Pillow's bilinear filter, which a graph cannot reproduce bit for bit; the runner
(`launch/onnx_predict.py`) does it with Pillow, as the package does, and everything after it is in
the graph:

1. the tiles of `deploy/region.py` (static slices: the frame size is fixed, so are the origins);
2. the backbone with its normalisation and the patch embedding (`features.Extractor.apply`, the
   package's own function, traced);
3. the nearest memory patch of every test patch: |q|^2 + |b|^2 - 2 q.b on bank-centred data with a
   matmul (no cdist), its argmin, then the winner's distance recomputed directly as |q - b| (as
   `scoring.nearest`); the bank is a constant, split into blocks of `bank_block` rows whose minima
   are merged (first index on ties), so the [patches, block] distance block bounds the memory;
4. the soft weight times the distance, squared or not as fitted (`scoring.weigh`);
5. the image score: the maximum over the patches each tile owns (`region.owned_patches`);
6. the maps: bilinear upsampling and Gaussian blur per tile (`scoring.anomaly_maps`, traced), then
   each frame pixel taken from the tile that owns it (`region.stitch`) by one gather.

The bank constants (centred bank rows, their squared norms, the centre) are computed here with the
package's own jitted functions (`ops.mean_row`, `ops.sq_norms`), so they have the bits scoring uses.
`bank_dtype="float16"` stores the centred rows in float16 (half the file), cast back to float32 in
the graph; the squared norms are then those of the rounded rows, so distances stay consistent.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np

from softpatch_jax import features, ops, scoring
from softpatch_jax.deploy import model as model_lib
from softpatch_jax.deploy import region as region_lib

BANK_DTYPES = {"float32": np.float32, "float16": np.float16}
# Rows of the bank per distance block: [tiles * patches, block] float32 stays ~100 MB for a
# 2x2-tile 224 px frame of 28x28 patches (3136 rows).
DEFAULT_BANK_BLOCK = 8192


@dataclasses.dataclass(frozen=True)
class Layout:
    """The fixed geometry of an exported graph.

    Attributes:
      mode: "full" or "center" (deploy/region.py).
      frame_hw: (H, W) of the graph's input frames.
      origins: int [T, 2], each tile's top-left corner in the frame.
      crop: the tile size.
      grid: (h, w) patches per tile.
      owned: int [K], the indices (tile-major, into T * h * w) of the patches the image score takes
        its maximum over.
      pixel_source: int [H * W], for each frame pixel its index into the tiles' maps [T * crop * crop].
    """

    mode: str
    frame_hw: tuple[int, int]
    origins: np.ndarray
    crop: int
    grid: tuple[int, int]
    owned: np.ndarray
    pixel_source: np.ndarray


def layout(model: model_lib.Model, ex: features.Extractor, mode: str) -> Layout:
    """The geometry for `mode`: "full" at the frame size the model was fitted on (every training
    image had it), "center" at crop x crop."""
    region_lib.check_mode(mode)
    crop = int(model.config.dataset.crop)
    grid = tuple(int(g) for g in ex.grid)
    if mode == "center":
        frame_hw = (crop, crop)
        origins = np.zeros((1, 2), np.int64)
    else:
        reg = model.meta["region"]
        if reg["mode"] == "full":
            frame_hw = tuple(int(v) for v in reg["frame_hw"])
        else:  # a centre-crop model exported whole-frame: the frame of its training images
            sh, sw = (int(v) for v in reg["source_hw"])
            side = max(int(model.config.dataset.resize), crop)
            probe = np.zeros((sh, sw, 3), np.uint8)
            frame_hw = region_lib.views(probe, side, crop, "full").frame.shape[:2]
        origins = np.array(
            [
                (y, x)
                for y in region_lib.starts(frame_hw[0], crop)
                for x in region_lib.starts(frame_hw[1], crop)
            ],
            np.int64,
        )
    owned = np.flatnonzero(region_lib.owned_patches(origins, crop, grid, frame_hw))
    own = region_lib.owners(origins, crop, frame_hw)
    ys, xs = np.mgrid[0 : frame_hw[0], 0 : frame_hw[1]]
    oy, ox = origins[own, 0], origins[own, 1]
    source = own * crop * crop + (ys - oy) * crop + (xs - ox)
    return Layout(
        mode, tuple(frame_hw), origins, crop, grid, owned, source.reshape(-1).astype(np.int64)
    )


@dataclasses.dataclass(frozen=True)
class BankConstants:
    """One memory bank as the graph holds it."""

    centre_1xD: np.ndarray  # float32
    rows_MxD: np.ndarray  # centred rows, float32 or float16
    sq_M: np.ndarray  # float32 squared norms of the (stored) centred rows
    weights_M: np.ndarray  # float32 soft weights


def bank_constants(bank, bank_dtype: str = "float32") -> BankConstants:
    """The centred rows and their norms, computed as `scoring.patch_scores` computes them."""
    if bank_dtype not in BANK_DTYPES:
        raise ValueError(f"bank_dtype {bank_dtype!r}; valid: {', '.join(BANK_DTYPES)}")
    centre = ops.mean_row(bank.feats_MxD)
    rows = jnp.asarray(bank.feats_MxD, jnp.float32) - centre
    rows = np.asarray(rows).astype(BANK_DTYPES[bank_dtype])
    sq = np.asarray(jax.jit(ops.sq_norms)(jnp.asarray(rows, jnp.float32)))
    return BankConstants(
        np.asarray(centre, np.float32), rows, sq, np.asarray(bank.weights_M, np.float32)
    )


def search(
    query_QxD: jax.Array, bank: BankConstants, distance: str, block: int = DEFAULT_BANK_BLOCK
) -> jax.Array:
    """Weighted distance of each query row to its nearest bank row [Q] (see module docstring)."""
    q = query_QxD.astype(jnp.float32) - jnp.asarray(bank.centre_1xD)
    q_sq = jnp.sum(q * q, axis=1)
    m = bank.rows_MxD.shape[0]
    best_d = best_i = None
    for start in range(0, m, block):
        rows = jnp.asarray(bank.rows_MxD[start : start + block]).astype(jnp.float32)
        sq = jnp.asarray(bank.sq_M[start : start + block])
        prod = jnp.matmul(q, rows.T, precision=ops.PRECISION)
        d2 = jnp.maximum(q_sq[:, None] + sq[None, :] - 2.0 * prod, 0.0)
        i = jnp.argmin(d2, axis=1).astype(jnp.int32) + start
        d = jnp.min(d2, axis=1)
        if best_d is None:
            best_d, best_i = d, i
        else:  # strictly smaller only: ties keep the earlier block, as one argmin would
            better = d < best_d
            best_d, best_i = jnp.where(better, d, best_d), jnp.where(better, i, best_i)
    all_rows = jnp.asarray(bank.rows_MxD).astype(jnp.float32)
    diff = q - jnp.take(all_rows, best_i, axis=0)
    dist = jnp.sqrt(jnp.sum(diff * diff, axis=1))
    return scoring.weigh(jnp.asarray(bank.weights_M), best_i, dist, distance)


def scoring_function(
    model: model_lib.Model,
    ex: features.Extractor,
    lay: Layout,
    *,
    bank_dtype: str = "float32",
    bank_block: int = DEFAULT_BANK_BLOCK,
):
    """frames uint8 [N, H, W, 3] -> (image scores [N], maps [N, H, W]); see the module docstring."""
    cfg = model.config
    distance = scoring.check_distance(cfg.scoring.distance)
    cls = bank_constants(model.banks.cls, bank_dtype)
    seg = cls if model.banks.seg is model.banks.cls else bank_constants(model.banks.seg, bank_dtype)
    crop, (h, w) = lay.crop, lay.grid
    t = len(lay.origins)
    sigma = float(cfg.scoring.blur_sigma)
    owned = jnp.asarray(lay.owned.astype(np.int32))
    source = jnp.asarray(lay.pixel_source.astype(np.int32))

    def fn(frames_NxHxWx3):
        n = frames_NxHxWx3.shape[0]
        tiles = jnp.stack(
            [frames_NxHxWx3[:, y : y + crop, x : x + crop, :] for y, x in lay.origins.tolist()],
            axis=1,
        ).reshape(n * t, crop, crop, 3)
        f = ex.apply(ex.variables, tiles)
        q = f.reshape(n * t * h * w, f.shape[-1])
        cls_s = search(q, cls, distance, bank_block)
        seg_s = cls_s if seg is cls else search(q, seg, distance, bank_block)
        score = jnp.max(jnp.take(cls_s.reshape(n, t * h * w), owned, axis=1), axis=1)
        maps = scoring.anomaly_maps(seg_s.reshape(n * t, h * w), (h, w), (crop, crop), sigma)
        frame = jnp.take(maps.reshape(n, t * crop * crop), source, axis=1)
        return score, frame.reshape(n, *lay.frame_hw)

    return fn


def _max_window(x, *, window_dimensions, window_strides, padding, base_dilation, window_dilation):
    """`reduce_window_max` as the maximum of strided slices of the (-inf) padded input.

    jax2onnx 0.17 maps this primitive to an ONNX MaxPool over all four NHWC axes, which ONNX
    Runtime refuses ("Unsupported pooling size"); slices and Max convert everywhere."""
    if any(d != 1 for d in (*base_dilation, *window_dilation)):
        raise NotImplementedError("dilated reduce_window_max is not exportable")
    low = jnp.array(-jnp.inf, x.dtype)
    xp = jax.lax.pad(x, low, [(lo, hi, 0) for lo, hi in padding])
    out_shape = [(n - k) // s + 1 for n, k, s in zip(xp.shape, window_dimensions, window_strides)]
    best = None
    for offset in np.ndindex(*window_dimensions):
        limit = [o + (m - 1) * s + 1 for o, m, s in zip(offset, out_shape, window_strides)]
        part = jax.lax.slice(xp, offset, limit, window_strides)
        best = part if best is None else jnp.maximum(best, part)
    return best


# Primitives whose jax2onnx conversion does not run in ONNX Runtime, and their replacements.
REPLACED = {"reduce_window_max": _max_window}


def _eval(jaxpr, consts, *args):
    """Evaluates a jaxpr eqn by eqn (entering nested jit calls), with `REPLACED` primitives
    rewritten: tracing this with jax2onnx sees only primitives that convert."""
    env = {}

    def read(v):
        return v.val if isinstance(v, jax.extend.core.Literal) else env[v]

    for v, c in zip(jaxpr.constvars, consts):
        env[v] = c
    for v, a in zip(jaxpr.invars, args):
        env[v] = a
    for eqn in jaxpr.eqns:
        vals = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        if name in REPLACED:
            outs = REPLACED[name](*vals, **eqn.params)
        elif name in ("jit", "pjit"):
            inner = eqn.params["jaxpr"]
            outs = _eval(inner.jaxpr, inner.consts, *vals)
        else:
            outs = eqn.primitive.bind(*vals, **eqn.primitive.get_bind_params(eqn.params))
        outs = outs if eqn.primitive.multiple_results or name in ("jit", "pjit") else [outs]
        for v, o in zip(eqn.outvars, outs):
            env[v] = o
    return [read(v) for v in jaxpr.outvars]


def exportable(fn, *specs):
    """`fn` traced once to a jaxpr and returned as a function of the same inputs that replays it
    with `REPLACED` primitives rewritten (same values; see `_max_window`)."""
    closed = jax.make_jaxpr(fn)(*specs)

    def replay(*args):
        return tuple(_eval(closed.jaxpr, closed.consts, *args))

    return replay
