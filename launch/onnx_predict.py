"""Score a folder of images with a model exported by `python -m softpatch_jax.deploy export`,
using only numpy, Pillow and one runtime, ONNX Runtime or OpenVINO (no JAX, no softpatch_jax): runs
from any folder.

  python onnx_predict.py --model=FILE.onnx --images=DIR_OR_FILE [--images=...] --out=DIR
      [--runtime=onnxruntime|openvino] [--threshold=NUMBER] [--nowrite_maps] [--save_maps_npy]
      [--skip_bad_images] [--allow_upscale] [--overwrite]
      [--provider=CPUExecutionProvider]                     # onnxruntime's execution provider
      [--openvino_device=CPU] [--openvino_precision=f32]    # OpenVINO's device and precision

--runtime=onnxruntime (the default) needs `pip install onnxruntime`; --runtime=openvino needs
`pip install openvino` (it reads the .onnx file itself, external data included; no conversion
step). Only the chosen runtime is imported. OpenVINO's CPU plugin computes in bfloat16 by default
on CPUs that have it (AVX512-BF16, AMX); this runner asks for --openvino_precision=f32, the
precision the model was fitted and checked in (bf16 / f16 trade accuracy for speed).

Writes OUT/predictions.csv with the columns of `deploy predict` (image, path, score, threshold,
anomalous, map_max, region, heatmap, overlay; names relative to the images' common folder and
escaped the same way), OUT/predictions.json, and heatmaps/ and overlays/ PNGs on the model's fixed
colour scale (same colours as `deploy predict`). --save_maps_npy also writes OUT/maps/<image>.npy
(the float32 anomaly map), for parity checks.

Preprocessing is the package's (softpatch_jax/data/images.py, preprocess.py, deploy/region.py),
restated here: decode with Pillow (EXIF orientation applied; palette via RGBA; alpha dropped; grey
replicated; 16-bit scaled by 255/65535 and rounded; floating-point images refused), refuse a
shorter side below the crop (unless --allow_upscale), resize the shorter side with Pillow's
BILINEAR filter (longer side int(side * long / short), none when already that length); "center"
models then centre-crop. The frame must have the size the model was exported for (one camera):
another size is a bad image naming the file and both sizes. Everything after that is in the graph.

Exit status 2 with one line on stderr for bad input (the chosen runtime not installed, a model
that is not an export of this tool or that the runtime cannot load, unreadable image without
--skip_bad_images, existing OUT without --overwrite, unwritable OUT); OUT is built under a hidden
staging name beside it and renamed into place only when complete.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import io
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np
from PIL import Image, ImageOps

RUNTIMES = ("onnxruntime", "openvino")
OPENVINO_PRECISIONS = ("f32", "bf16", "f16")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")
MARKER = "predictions.json"


class InputError(Exception):
    """Bad input: printed as one line, exit status 2."""


class BadImage(InputError):
    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


# ---------------------------------------------------------------- names (as data/folder.py)
def escape(name: str) -> str:
    out = []
    for ch in name:
        o = ord(ch)
        if ch == "\\":
            out.append("\\\\")
        elif 0xDC80 <= o <= 0xDCFF:
            out.append(f"\\x{o - 0xDC00:02x}")
        elif o < 0x20 or o == 0x7F:
            out.append(f"\\x{o:02x}")
        else:
            out.append(ch)
    return "".join(out)


def list_images(sources: list[str]) -> tuple[list[str], str]:
    """Image paths (absolute, sorted, each real file once) and their common folder."""
    found = []
    for src in sources:
        if os.path.isdir(src):
            seen_dirs = set()
            for dirpath, dirnames, filenames in os.walk(src, followlinks=True):
                st = os.stat(dirpath)
                if (st.st_dev, st.st_ino) in seen_dirs:
                    dirnames[:] = []
                    continue
                seen_dirs.add((st.st_dev, st.st_ino))
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for f in filenames:
                    p = os.path.join(dirpath, f)
                    if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS):
                        if os.path.isfile(p):
                            found.append(p)
        elif os.path.isfile(src):
            if not src.lower().endswith(IMAGE_EXTENSIONS):
                raise InputError(f"{src!r} is not an image file by its extension")
            found.append(src)
        else:
            raise InputError(f"image source {src!r} does not exist")
    images, seen = [], set()
    for p in sorted({os.path.abspath(p) for p in found}):
        st = os.stat(p)
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            images.append(p)
    if not images:
        raise InputError(f"no images found in {sources}")
    root = os.path.dirname(images[0]) if len(images) == 1 else os.path.commonpath(images)
    return images, root


# ---------------------------------------------------------------- pixels (as data/images.py)
def decode(path: str) -> np.ndarray:
    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            if img.mode == "F":
                raise BadImage(path, "floating-point images (mode F) are not supported")
            if img.mode in SIXTEEN_BIT:
                arr = np.asarray(img, dtype=np.float64)
                arr = np.clip(np.rint(arr * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
                return np.repeat(arr[..., None], 3, axis=2)
            if img.mode == "P":
                img = img.convert("RGBA")
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except BadImage:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadImage(path, f"cannot read image ({type(e).__name__}: {e})") from e


def resize_shorter(arr: np.ndarray, side: int) -> np.ndarray:
    h, w = arr.shape[:2]
    if min(h, w) == side:
        return arr
    size = (int(side * w / h), side) if h <= w else (side, int(side * h / w))
    return np.asarray(Image.fromarray(arr).resize(size, resample=Image.BILINEAR))


def center_crop(arr: np.ndarray, crop: int) -> np.ndarray:
    h, w = arr.shape[:2]
    top, left = round((h - crop) / 2.0), round((w - crop) / 2.0)
    return arr[top : top + crop, left : left + crop]


def frame_of(path: str, meta: dict, allow_upscale: bool) -> tuple[np.ndarray, tuple[int, int]]:
    arr = decode(path)
    h, w = arr.shape[:2]
    crop, resize = meta["crop"], meta["resize"]
    if min(h, w) < crop and not allow_upscale:
        raise BadImage(
            path,
            f"image is {w}x{h} (width x height) but the model needs at least {crop} pixels on the "
            f"shorter side (crop={crop}); pass --allow_upscale to enlarge it anyway",
        )
    if meta["region"] == "center":
        frame = center_crop(resize_shorter(arr, resize), crop)
    else:
        frame = resize_shorter(arr, max(resize, crop))
    want = tuple(meta["frame_hw"])
    if frame.shape[:2] != want:
        raise BadImage(
            path,
            f"image is {w}x{h}, giving a {frame.shape[1]}x{frame.shape[0]} frame, but the model "
            f"was exported for {want[1]}x{want[0]} frames (the fitted camera's size)",
        )
    return frame, (h, w)


def describe(meta: dict, source_hw, frame) -> str:
    (sh, sw), (fh, fw) = source_hw, frame.shape[:2]
    crop = meta["crop"]
    if meta["region"] == "center":
        return (
            f"center: a {crop}x{crop} crop of the {sw}x{sh} image resized to shorter side "
            f"{meta['resize']}; the border outside it is NOT inspected"
        )
    return f"full: whole {sw}x{sh} frame at {fw}x{fh}, {meta['tiles']} tiles of {crop}x{crop}"


# ---------------------------------------------------------------- pictures (as deploy/render.py)
def heat(map_hw, lut, lo, hi):
    span = max(hi - lo, 1e-12)
    t = np.clip((np.asarray(map_hw, np.float64) - lo) / span, 0.0, 1.0)
    return lut[np.rint(t * 255).astype(np.int64)]


def overlay(frame, map_hw, lut, lo, hi):
    span = max(hi - lo, 1e-12)
    a = np.clip((np.asarray(map_hw, np.float64) - lo) / span, 0.0, 1.0)[..., None] * 0.7
    out = frame.astype(np.float64) * (1 - a) + heat(map_hw, lut, lo, hi).astype(np.float64) * a
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def save_png(path: str, arr: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    with open(path, "wb") as f:
        f.write(buf.getvalue())


def png_name(rel: str) -> str:
    """The input's whole name plus .png, as `deploy predict` names its maps (unique per input)."""
    return rel + ".png"


def csv_guard(value):
    """A text cell no spreadsheet runs as a formula, as `deploy predict` writes its CSV."""
    if isinstance(value, str) and value.startswith(("=", "+", "-", "@", "\t", "\r", "'")):
        return "'" + value
    return value


# ---------------------------------------------------------------- model
class Session:
    """One loaded model: `meta` (the export's metadata), `runtime` (name, version, device) and
    `run(frame_1xHxWx3) -> (score [1], anomaly_map [1, H, W])`."""

    def __init__(self, meta: dict, runtime: str, run):
        self.meta, self.runtime, self.run = meta, runtime, run


def _import(runtime: str):
    try:
        return importlib.import_module(runtime)
    except ImportError as e:
        raise InputError(
            f"--runtime={runtime} needs the {runtime} package (pip install {runtime}): {e}"
        ) from None


def _brief(e: Exception) -> str:
    """A runtime's exception text on one line, shortened."""
    return " ".join(str(e).split())[:300]


def _onnxruntime_session(path: str, provider: str) -> Session:
    ort = _import("onnxruntime")
    try:
        sess = ort.InferenceSession(path, providers=[provider])
    except Exception as e:
        raise InputError(f"{path!r} cannot be loaded by onnxruntime ({_brief(e)})") from None
    props = sess.get_modelmeta().custom_metadata_map
    meta = _metadata(path, props.get("softpatch_jax"))
    names = meta["output_names"]

    def run(frame):
        return sess.run(names, {meta["input_name"]: frame})

    return Session(meta, f"onnxruntime {ort.__version__} ({provider})", run)


def _openvino_session(path: str, device: str, precision: str) -> Session:
    ov = _import("openvino")
    core = ov.Core()
    try:  # its ONNX frontend only: core.read_model would also try other formats on a bad file
        frontend = ov.frontend.FrontEndManager().load_by_framework("onnx")
        model = frontend.convert(frontend.load(path))
    except Exception as e:
        raise InputError(f"{path!r} cannot be read by OpenVINO as ONNX ({_brief(e)})") from None
    key = ["framework", "softpatch_jax"]  # OpenVINO keeps ONNX metadata_props under "framework"
    meta = _metadata(path, model.get_rt_info(key).astype(str) if model.has_rt_info(key) else None)
    try:
        compiled = core.compile_model(model, device, {"INFERENCE_PRECISION_HINT": precision})
    except Exception as e:
        raise InputError(
            f"OpenVINO cannot compile {path!r} for device {device!r} at precision {precision!r} "
            f"({_brief(e)})"
        ) from None
    request = compiled.create_infer_request()
    outputs = [compiled.output(n) for n in meta["output_names"]]

    def run(frame):
        result = request.infer({meta["input_name"]: frame})
        return [np.array(result[o]) for o in outputs]  # copies: the request reuses its buffers

    return Session(meta, f"openvino {ov.__version__} ({device}, {precision})", run)


def _metadata(path: str, text: str | None) -> dict:
    if text is None:
        raise InputError(
            f"{path!r} is not a model exported by softpatch_jax (no 'softpatch_jax' metadata)"
        )
    meta = json.loads(text)
    if meta.get("export_format") != 1:
        raise InputError(
            f"{path!r} has export format {meta.get('export_format')!r}; this runner reads 1"
        )
    return meta


def load_model(
    path: str,
    runtime: str = "onnxruntime",
    provider: str = "CPUExecutionProvider",
    openvino_device: str = "CPU",
    openvino_precision: str = "f32",
) -> Session:
    """The exported model at `path` in `runtime`, its metadata checked (InputError otherwise)."""
    if not os.path.isfile(path):
        raise InputError(f"model {path!r} does not exist")
    if runtime == "onnxruntime":
        return _onnxruntime_session(path, provider)
    if runtime == "openvino":
        return _openvino_session(path, openvino_device, openvino_precision)
    raise InputError(f"--runtime={runtime!r}: choose one of {', '.join(RUNTIMES)}")


def check_out(out: str, overwrite: bool, sources: list[str]) -> None:
    real = os.path.realpath(out)
    for s in sources:
        rs = os.path.realpath(s)
        if real == rs or rs.startswith(real + os.sep) or real.startswith(rs + os.sep):
            raise InputError(f"output folder {out!r} is, holds or lies inside the input {s!r}")
    if not os.path.lexists(out) or (os.path.isdir(out) and not os.listdir(out)):
        return
    if not os.path.isfile(os.path.join(out, MARKER)):
        raise InputError(f"output folder {out!r} exists and is not a prediction (no {MARKER})")
    if not overwrite:
        raise InputError(f"output folder {out!r} already holds a prediction; pass --overwrite")


def run(args) -> list[dict]:
    sess = load_model(
        args.model, args.runtime, args.provider, args.openvino_device, args.openvino_precision
    )
    meta = sess.meta
    thr = float(meta["threshold"]) if args.threshold is None else float(args.threshold)
    if not np.isfinite(thr):
        raise InputError(f"--threshold={args.threshold!r} is not a finite number")
    lut = np.frombuffer(bytes.fromhex(meta["heatmap_lut"]), np.uint8).reshape(256, 3)
    lo, hi = meta["map_scale_lo"], max(thr, meta["map_scale_lo"] + 1e-6)
    paths, root = list_images(args.images)
    out = os.path.abspath(args.out)
    check_out(out, args.overwrite, args.images)
    parent, name = os.path.split(out)
    try:
        os.makedirs(parent, exist_ok=True)
        stage = tempfile.mkdtemp(prefix=f".{name}.staging-", dir=parent)
    except OSError as e:
        raise InputError(f"folder {parent!r} is not writable: {e.strerror or e}") from None
    rows, bad = [], []
    try:
        t0 = time.perf_counter()
        for path in paths:
            try:
                frame, source_hw = frame_of(path, meta, args.allow_upscale)
            except BadImage as e:
                if not args.skip_bad_images:
                    raise InputError(f"{e}; pass --skip_bad_images to skip and list them") from None
                bad.append({"path": escape(e.path), "reason": e.reason})
                continue
            score, amap = sess.run(frame[None])
            score, amap = float(score[0]), amap[0]
            if not (np.isfinite(score) and np.isfinite(amap).all()):
                raise InputError(f"model {args.model!r} gives a non-finite score for {path!r}")
            rel = os.path.relpath(path, root)
            row = {
                "image": escape(rel),
                "path": escape(path),
                "score": score,
                "threshold": thr,
                "anomalous": bool(score > thr),
                "map_max": float(amap.max()),
                "region": describe(meta, source_hw, frame),
            }
            if args.write_maps:
                row["heatmap"] = escape(os.path.join("heatmaps", png_name(rel)))
                row["overlay"] = escape(os.path.join("overlays", png_name(rel)))
                save_png(os.path.join(stage, "heatmaps", png_name(rel)), heat(amap, lut, lo, hi))
                save_png(
                    os.path.join(stage, "overlays", png_name(rel)),
                    overlay(frame, amap, lut, lo, hi),
                )
            if args.save_maps_npy:
                target = os.path.join(stage, "maps", rel + ".npy")
                os.makedirs(os.path.dirname(target), exist_ok=True)
                np.save(target, amap.astype(np.float32))
            rows.append(row)
        if not rows:
            raise InputError(f"no readable image among {len(paths)} under {root!r}")
        with open(os.path.join(stage, "predictions.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows({k: csv_guard(v) for k, v in row.items()} for row in rows)
        summary = {
            "model": os.path.abspath(args.model),
            "model_sha256": meta["model_sha256"],
            "threshold": {
                "rule": meta["threshold_rule"] if args.threshold is None else "given",
                "value": thr,
            },
            "region": meta["region"],
            "num_images": len(rows),
            "num_anomalous": sum(r["anomalous"] for r in rows),
            "skipped_bad": bad,
            "runtime": sess.runtime,
            "seconds": time.perf_counter() - t0,
            "rows": rows,
        }
        with open(os.path.join(stage, MARKER), "w") as f:
            json.dump(summary, f, indent=1, allow_nan=False)
        if os.path.lexists(out):
            old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
            os.replace(out, os.path.join(old, name))
            os.replace(stage, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--images", action="append", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--threshold", default=None, help="a number; default: the model's")
    p.add_argument("--nowrite_maps", dest="write_maps", action="store_false")
    p.add_argument("--save_maps_npy", action="store_true")
    p.add_argument("--skip_bad_images", action="store_true")
    p.add_argument("--allow_upscale", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--runtime", default="onnxruntime", choices=RUNTIMES)
    p.add_argument("--provider", default="CPUExecutionProvider", help="onnxruntime's provider")
    p.add_argument("--openvino_device", default="CPU", help="OpenVINO's device")
    p.add_argument(
        "--openvino_precision",
        default="f32",
        choices=OPENVINO_PRECISIONS,
        help="OpenVINO's inference precision (its CPU default is bf16 where the CPU has it)",
    )
    args = p.parse_args(argv)
    try:
        rows = run(args)
    except (InputError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    flagged = sum(r["anomalous"] for r in rows)
    print(f"{len(rows)} images scored, {flagged} above threshold -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
