"""`export`: a fitted model -> one ONNX file that scores images without this package or JAX
(ONNX Runtime, OpenVINO, a C++/C# program; `launch/onnx_predict.py` is a runner needing only numpy,
Pillow and one of onnxruntime or openvino).

  python -m softpatch_jax.deploy export --model=MODEL --out=FILE.onnx [--format=onnx]
      [--bank_dtype=float32|float16] [--region=full|center] [--overwrite]

The graph (`deploy/onnx_graph.py`): input `frames` uint8 [1, H, W, 3] RGB, the frame `deploy
predict` inspects (decoded, shorter side resized to `dataset.resize` with Pillow's bilinear filter;
for --region=center also centre-cropped to `crop`) at the size the model was fitted on; outputs
`score` float32 [1] and `anomaly_map` float32 [1, H, W], the whole frame's map. Why the resized frame
rather than the camera's file: Pillow's bilinear resize (antialiased when shrinking) is not an ONNX
Resize, and any runner can call Pillow or reproduce it, while everything after it (tiling,
normalisation, backbone, embedding, nearest search, soft weights, upsampling, blur, stitching, the
maximum over owned patches) is in the graph at fixed shapes, which every runtime optimises.

Conversion: the package's own scoring function is traced to a jaxpr and converted by jax2onnx
(Apache-2.0). One primitive is rewritten before conversion: `reduce_window_max` (the ResNet stem's
max pool), which jax2onnx 0.17 maps to a 4-D MaxPool that ONNX Runtime refuses, becomes a maximum
of strided slices (`onnx_graph.REPLACED`). The nearest search is written with a matmul, argmin and
gather (no cdist, no top-k). The batch is fixed at 1: jax2onnx 0.17 fails on the symbolic batch
once the tiles multiply it (a '4*N' dimension); a runner loops over images.

Metadata (ONNX metadata_props, all strings): `softpatch_jax` (one JSON object with everything
below) and flat keys: export_format, model_format, model_sha256 (the sha256 of the model's
manifest.json, which holds the sha256 of every model file), threshold, threshold_rule, input_name,
input_shape, input_layout, input_dtype, frame_hw, resize, crop, region, normalisation_mean,
normalisation_std, distance, bank_dtype, map_scale_lo, map_scale_hi, heatmap_lut (the inferno
colour table, hex), random_init.

Banks: constants in the graph; a file whose constants exceed `EXTERNAL_DATA_BYTES` (protobuf's
2 GB limit, with margin) keeps them in FILE.onnx.data beside it (ONNX external data).
`--bank_dtype=float16` stores the centred bank rows in float16 (half the bank's bytes).

Checks before anything is written: the model loads (format version, manifest checksums, finite
arrays: `deploy/model.py`), the output is not an existing file (without --overwrite), not
something this command did not write (with --overwrite: only an earlier export is replaced), and
its folder is writable. The file is built under a staging folder beside the target
(`.FILE.staging-*`, under deploy/outdir.py's lock, its leftovers cleaned as deploy's are), checked
(onnx.checker, and a synthetic frame scored in ONNX Runtime against the package when onnxruntime is
installed), and moved into place last: a failure leaves the target as it was.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging as py_logging
import os
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

import softpatch_jax
from softpatch_jax import io_utils
from softpatch_jax.deploy import model as model_lib
from softpatch_jax.deploy import onnx_graph, outdir, predicting, render

FORMATS = ("onnx",)
EXPORT_FORMAT = 1  # of the graph's inputs, outputs and metadata keys
EXTERNAL_DATA_BYTES = 1_800_000_000
INPUT, OUTPUTS = "frames", ("score", "anomaly_map")
OPSET = 17  # ONNX Runtime >= 1.11 and OpenVINO >= 2022.1 read it
META_KEY = "softpatch_jax"
# A synthetic frame must score within this of the package (relative) or the export is refused.
VERIFY_RTOL = 1e-4


class ExportError(ValueError):
    """The export cannot be done (converter missing, unsupported option, failed verification)."""


def _converter():
    try:
        import jax2onnx
        import onnx
    except ImportError as e:
        raise ExportError(
            f"export needs jax2onnx and onnx ({e}); install them in a virtual environment "
            "(python -m venv --system-site-packages VENV && VENV/bin/pip install jax2onnx) and run "
            "VENV/bin/python -m softpatch_jax.deploy export ..."
        ) from None
    return jax2onnx, onnx


def model_sha256(model_dir: str) -> str:
    """sha256 of MODEL/manifest.json, which holds the sha256 of every file of the model."""
    with open(os.path.join(model_dir, model_lib.MANIFEST), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _is_export(path: str) -> bool:
    """True when `path` is an ONNX file this command wrote (its metadata says so)."""
    try:
        import onnx

        proto = onnx.load(path, load_external_data=False)
    except Exception:  # not ONNX, unreadable, onnx missing: not ours as far as we can tell
        return False
    return any(p.key == META_KEY for p in proto.metadata_props)


def _external_location(path: str) -> str | None:
    """The external data file an earlier export at `path` references (relative name), or None."""
    import onnx

    proto = onnx.load(path, load_external_data=False)
    for t in proto.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                return e.value
    return None


def check_target(out: str, overwrite: bool) -> None:
    """OutputFolderError unless `out` may be written (absent, or an earlier export with overwrite)."""
    if not out.lower().endswith(".onnx"):
        raise ExportError(f"--out={out!r}: the exported file's name must end in .onnx")
    if os.path.isdir(out):
        raise outdir.OutputFolderError(f"--out={out!r} is a folder; give a file name FILE.onnx")
    if os.path.lexists(out) or os.path.lexists(out + ".data"):
        existing = out if os.path.lexists(out) else out + ".data"
        if not overwrite:
            raise outdir.OutputFolderError(
                f"{existing!r} already exists; pass --overwrite to replace an earlier export, "
                "or choose another name"
            )
        if not os.path.lexists(out) or not _is_export(out):
            raise outdir.OutputFolderError(
                f"{existing!r} exists and is not a model exported by this tool (no "
                f"'{META_KEY}' metadata); nothing was changed: choose another name or remove it "
                "yourself"
            )
        data = out + ".data"
        if os.path.lexists(data) and _external_location(out) != os.path.basename(data):
            raise outdir.OutputFolderError(
                f"{data!r} exists and is not the external data of {out!r}; nothing was changed"
            )


def metadata(
    model: model_lib.Model,
    lay: onnx_graph.Layout,
    *,
    bank_dtype: str,
    thr: float,
    rule: str,
) -> dict:
    """Everything a runner needs, as one JSON-able dict (see the module docstring)."""
    cfg = model.config
    lo, hi = predicting.map_scale(model, thr)
    pre = model.meta["preprocessing"]
    return {
        "export_format": EXPORT_FORMAT,
        "model_format": model.meta["code"]["format"],
        "model_sha256": model_sha256(model.path),
        "model_path": model.path,
        "exported_by": {
            "softpatch_jax": softpatch_jax.__version__,
            "git_commit": model_lib.git_commit(),
            "jax": jax.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
        "fitted_with": model.meta["code"],
        "threshold": thr,
        "threshold_rule": rule,
        "input_name": INPUT,
        "input_shape": [1, *lay.frame_hw, 3],
        "input_layout": "NHWC",
        "input_dtype": "uint8",
        "input_colour": "RGB",
        "output_names": list(OUTPUTS),
        "frame_hw": list(lay.frame_hw),
        "resize": int(cfg.dataset.resize),
        "crop": int(cfg.dataset.crop),
        "region": lay.mode,
        "region_fitted": model.meta["region"]["mode"],
        "tiles": len(lay.origins),
        "origins": lay.origins.tolist(),
        "preprocessing": (
            "decode as softpatch_jax.data.images.to_rgb (EXIF orientation applied; grey, palette "
            "and alpha images to RGB, alpha dropped; 16-bit scaled by 255/65535 and rounded), "
            "refuse a shorter side below crop, resize the shorter side to "
            + ("max(resize, crop)" if lay.mode == "full" else "resize")
            + " with PIL.Image.BILINEAR (longer side int(side * long / short); no resize when the "
            "shorter side already has that length)"
            + ("" if lay.mode == "full" else ", then centre-crop crop x crop (offsets rounded)")
        ),
        "normalisation_mean": [v * 255.0 for v in pre["mean"]],
        "normalisation_std": [v * 255.0 for v in pre["std"]],
        "normalisation": "in the graph: (pixel - mean) / std per channel, pixel in 0..255",
        "backbone": model.meta["backbone"],
        "embedding": model.meta["embedding"],
        "distance": cfg.scoring.distance,
        "blur_sigma": float(cfg.scoring.blur_sigma),
        "bank_dtype": bank_dtype,
        "banks": model.meta["banks"],
        "map_scale_lo": lo,
        "map_scale_hi": hi,
        "heatmap_lut": render._LUT.tobytes().hex(),
        "random_init": bool(model.meta.get("random_init")),
    }


def _props(meta: dict) -> dict[str, str]:
    flat = {
        k: v if isinstance(v, str) else json.dumps(v)
        for k, v in meta.items()
        if not isinstance(v, dict)
    }
    return {META_KEY: json.dumps(meta, sort_keys=True), **flat}


@contextlib.contextmanager
def _quiet_converter():
    """jax2onnx / onnx_ir log a line per untyped intermediate value; keep the tool's output short."""
    names = ("jax2onnx", "onnx_ir", "onnx_ir.serde", "onnxscript")
    saved = {n: py_logging.getLogger(n).level for n in names}
    for n in names:
        py_logging.getLogger(n).setLevel(py_logging.ERROR)
    try:
        yield
    finally:
        for n, level in saved.items():
            py_logging.getLogger(n).setLevel(level)


def _verify(path: str, fn, frame_hw: tuple[int, int]) -> dict:
    """A synthetic frame scored by the file in ONNX Runtime and by the package: the relative score
    difference and the map's max abs difference; ExportError beyond VERIFY_RTOL. Skipped (None
    values) when onnxruntime is not installed."""
    try:
        import onnxruntime as ort
    except ImportError:
        return {"verified": False, "reason": "onnxruntime not installed"}
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (1, *frame_hw, 3), dtype=np.uint8)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    s_onnx, m_onnx = sess.run(list(OUTPUTS), {INPUT: frame})
    s_jax, m_jax = (np.asarray(a) for a in jax.jit(fn)(jnp.asarray(frame)))
    rel = float(abs(s_onnx[0] - s_jax[0]) / max(abs(float(s_jax[0])), 1e-12))
    out = {
        "verified": True,
        "synthetic_score_rel_diff": rel,
        "synthetic_map_max_abs_diff": float(np.abs(m_onnx - m_jax).max()),
    }
    if not (rel <= VERIFY_RTOL and np.isfinite(m_onnx).all()):
        raise ExportError(
            f"the exported graph scores a synthetic frame {s_onnx[0]} in ONNX Runtime but the "
            f"package gives {s_jax[0]} (relative difference {rel:.2e} > {VERIFY_RTOL}); not written"
        )
    return out


def export(
    model_dir: str,
    out: str,
    *,
    fmt: str = "onnx",
    overwrite: bool = False,
    bank_dtype: str = "float32",
    region: str | None = None,
    external_data: bool | None = None,
    bank_block: int = onnx_graph.DEFAULT_BANK_BLOCK,
    verify: bool = True,
) -> dict:
    """Writes the fitted model at `model_dir` as an ONNX file `out`; returns its metadata.

    external_data: True/False forces ONNX external data on/off; None: on when the constants exceed
      EXTERNAL_DATA_BYTES.
    """
    if fmt not in FORMATS:
        raise ExportError(f"--format={fmt!r}: supported formats are {', '.join(FORMATS)}")
    if bank_dtype not in onnx_graph.BANK_DTYPES:
        raise ExportError(
            f"--bank_dtype={bank_dtype!r}: choose one of {', '.join(onnx_graph.BANK_DTYPES)}"
        )
    out = os.path.abspath(out)
    check_target(out, overwrite)
    io_utils.check_writable(os.path.dirname(out))
    jax2onnx, onnx = _converter()
    model = model_lib.load(model_dir)
    # ONNX runtimes have their own fast grouped convolution; the CPU lowering's k*k slices would
    # only add nodes to the graph.
    ex = predicting.build_extractor(model, depthwise="conv")
    mode = predicting.inspected_region(model, region)
    rule, thr = predicting.decision_threshold(model)
    lay = onnx_graph.layout(model, ex, mode)
    fn = onnx_graph.scoring_function(model, ex, lay, bank_dtype=bank_dtype, bank_block=bank_block)
    spec = jax.ShapeDtypeStruct((1, *lay.frame_hw, 3), jnp.uint8)
    meta = metadata(model, lay, bank_dtype=bank_dtype, thr=thr, rule=rule)

    parent, name = os.path.split(out)
    with outdir.lock(out):
        check_target(out, overwrite)  # again, under the lock
        outdir.clean_leftovers(out)
        stage = tempfile.mkdtemp(prefix=f".{name}.staging-", dir=parent)
        try:
            t0 = time.perf_counter()
            with _quiet_converter():
                ir_model = jax2onnx.to_onnx(
                    onnx_graph.exportable(fn, spec),
                    [spec],
                    model_name="softpatch_jax",
                    opset=OPSET,
                    return_mode="ir",
                    input_names=[INPUT],
                    output_names=list(OUTPUTS),
                )
            const_bytes = sum(v.const_value.nbytes for v in ir_model.graph.initializers.values())
            use_external = (
                const_bytes > EXTERNAL_DATA_BYTES if external_data is None else external_data
            )
            meta["constants_bytes"] = int(const_bytes)
            meta["external_data"] = name + ".data" if use_external else None
            staged = os.path.join(stage, name)
            ir_model.metadata_props.update(_props(meta))
            ir_model.doc_string = (
                "softpatch_jax anomaly model: frames uint8 NHWC RGB -> score, anomaly_map; "
                f"metadata_props['{META_KEY}'] says how to prepare the frames"
            )
            import onnx_ir

            with _quiet_converter():
                onnx_ir.save(
                    ir_model, staged, external_data=name + ".data" if use_external else None
                )
            logging.info(
                "converted in %.1f s: %d nodes, %.1f MB of constants%s",
                time.perf_counter() - t0,
                len(ir_model.graph),
                const_bytes / 1e6,
                " (external data)" if use_external else "",
            )
            onnx.checker.check_model(staged)
            if verify:
                check = _verify(staged, fn, lay.frame_hw)
                logging.info("verification on a synthetic frame: %s", check)
            outdir.apply_umask(stage)
            _move_into_place(stage, parent, name, use_external)
        except OSError as e:
            if e.filename is None:
                raise OSError(e.errno, e.strerror, out) from e
            raise
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    return meta


def _move_into_place(stage: str, parent: str, name: str, external: bool) -> None:
    """Earlier FILE.onnx / FILE.onnx.data moved aside (`.FILE.old-*`), the new ones renamed in
    (the data file first, the .onnx last), then the old ones deleted."""
    target = os.path.join(parent, name)
    olds = [p for p in (target, target + ".data") if os.path.lexists(p)]
    old_dir = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent) if olds else None
    for p in olds:
        os.replace(p, os.path.join(old_dir, os.path.basename(p)))
    try:
        if external:
            os.replace(os.path.join(stage, name + ".data"), target + ".data")
        os.replace(os.path.join(stage, name), target)
    except OSError:
        for p in olds:  # put the earlier export back before reporting the failure
            with contextlib.suppress(OSError):
                os.replace(os.path.join(old_dir, os.path.basename(p)), p)
        raise
    if old_dir:
        shutil.rmtree(old_dir, ignore_errors=True)
