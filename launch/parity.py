"""Parity with the authors' published SoftPatch code on identical inputs.

  python -m launch.parity --config=configs/parity.py --reference_path=CHECKOUT \
    --config.dataset.root=../shared/data/piped --out=/tmp/parity

For every category and noise setting of the config, this project's features are extracted once
(`features.extract`) and the same features, the same [D, R] projection and the same coreset start
points are fed to the authors' fit and predict (their `SoftPatch._fill_memory_bank` with
`_compute_patch_weight`, `WeightedGreedyCoresetSampler`, faiss `NearestNeighbourScorer` and
`RescaleSegmentor`, with their backbone bypassed) and to ours (`memory_bank.fit_many`,
`scoring.predict`), for each method of `config.methods` (patchcore and softpatch_<discriminator>).
It reports, per category x noise x method: bank index-set agreement, image-score max relative
difference and Spearman rho, pixel-map max difference, and image / pixel AUROC on both sides
(scikit-learn's `roc_auc_score` for both), and writes parity.json and parity.md to --out.

The authors' code is driven from outside this repository: CHECKOUT is a checkout of
TencentYoutuResearch/AnomalyDetection-SoftPatch; nothing of it is copied here. It needs torch,
scikit-learn and faiss-cpu (optional oracle dependencies, not in requirements.txt).

How the inputs are made identical (their code draws both with hidden global state):
- projection: their sampler builds a fresh random `torch.nn.Linear` on every `_reduce_features`
  call (so their discriminators and their coreset see two different projections); here it is
  replaced on the instance by our projection matrix, the one our fit uses for both.
- start points: their loop draws `np.random.choice(N*P, 128, replace=False)` from numpy's global
  generator; the global generator is seeded just before their fit and ours is given
  `np.random.RandomState(seed).choice(...)`, the same draw.
- LOF k: both sides use `config.softpatch.lof_k` (their command line's `--lof_k` never reaches the
  model: `main.py` passes `LOF_k=`, which `SoftPatch.load`'s `**kwargs` swallows, so their published
  runs used k=5; README "Fidelity").
"""

from __future__ import annotations

import functools
import os
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from softpatch_jax import data, discriminators, features, memory_bank, methods, pool, scoring
from softpatch_jax.experiment import grid, options, plan, stages
from softpatch_jax.io_utils import atomic_open, write_json

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/parity.py", "A configs/*.py file (dataset, backbone, noise, methods)."
)
_REFERENCE = flags.DEFINE_string(
    "reference_path",
    None,
    "Checkout of the authors' SoftPatch repository (holds src/softpatch.py).",
)
_OUT = flags.DEFINE_string("out", None, "Folder for parity.json and parity.md.")
_PRECISION = flags.DEFINE_enum(
    "reference_precision",
    "float64",
    ["float32", "float64"],
    "dtype the authors' discriminators and coreset run in (their code follows its input's dtype; "
    "faiss stays float32). float64 takes their float32 rounding (expanded-form distances, the "
    "inverse of an ill-conditioned covariance when N < R) out of the comparison.",
)
flags.mark_flags_as_required(["reference_path", "out"])

# The acceptance tolerances of the parity check (per category, method and noise setting).
IMAGE_AUROC_TOL = 1e-4
PIXEL_AUROC_TOL = 1e-3


def load_reference(path: str):
    """The authors' modules (softpatch, sampler, common) imported from CHECKOUT/src.

    Their `backbones` module (timm, downloads) is never used here, so a stub stands in for it."""
    src = os.path.join(path, "src")
    if not os.path.isfile(os.path.join(src, "softpatch.py")):
        raise ValueError(
            f"--reference_path={path!r}: expected the authors' SoftPatch checkout with "
            "src/softpatch.py, src/sampler.py and src/common.py"
        )
    missing = []
    for name in ("torch", "faiss", "sklearn"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ImportError(
            f"the authors' code needs {', '.join(missing)}: pip install torch faiss-cpu scikit-learn"
        )
    sys.path.insert(0, src)
    sys.modules.setdefault("backbones", types.ModuleType("backbones"))
    import common
    import sampler
    import softpatch

    return softpatch, sampler, common


def reference_method(name: str, sp) -> tuple[str, float, bool]:
    """(their weight_method, threshold, soft_weight_flag) for one of our method names."""
    if name == "patchcore":
        # No removal (the quantile at 1 removes nothing), no soft weights; the discriminator is
        # computed but unused, so the cheapest one.
        return "nearest", 0.0, False
    spec = methods.spec(name, sp)
    if spec.seg is not None or spec.cls.granularity != "patch" or len(spec.cls.removal) != 1:
        raise ValueError(
            f"method {name!r} has no counterpart in the authors' public code "
            "(valid: patchcore, softpatch, softpatch_nearest, softpatch_gaussian, softpatch_lof)"
        )
    return spec.cls.removal[0], spec.cls.tau, spec.cls.soft_weight != "none"


def reference_run(
    ref, name, config, train_NxPxD, test_TxPxD, grid, image_size, projection_DxR, seed,
    precision="float64", keep_override=None,
) -> dict:  # fmt: skip
    """Fit and predict with the authors' code on given features: bank indices, image scores [T],
    maps [T, H, W], and their removal decisions: keep [N*P] (their sampling weight) and the patch
    weights they thresholded (None for PatchCore).

    keep_override: bool [N*P] used as their sampling weight instead of the one their discriminator
    gives (their soft weights are unchanged): separates a keep-mask difference from the coreset."""
    softpatch, sampler, common = ref
    import torch

    dtype = {"float32": torch.float32, "float64": torch.float64}[precision]
    np_dtype = np.float32 if precision == "float32" else np.float64
    search = common.FaissNN(False, 4)
    fit, run_nn = search.fit, search.run  # faiss takes float32 only
    search.fit = lambda f: fit(np.ascontiguousarray(f, np.float32))
    search.run = lambda k, q, index=None: run_nn(
        k,
        np.ascontiguousarray(q, np.float32),
        None if index is None else np.ascontiguousarray(index, np.float32),
    )

    dev = torch.device("cpu")
    weight_method, threshold, soft = reference_method(name, config.softpatch)
    model = softpatch.SoftPatch(dev)
    model.forward_modules = torch.nn.ModuleDict({})
    model.patch_maker = softpatch.PatchMaker(config.embedding.patch_size, stride=1)
    model.anomaly_scorer = common.NearestNeighbourScorer(n_nearest_neighbours=1, nn_method=search)
    model.anomaly_segmentor = common.RescaleSegmentor(device=dev, target_size=tuple(image_size))
    model.featuresampler = sampler.WeightedGreedyCoresetSampler(config.coreset.ratio, dev)
    model.lof_k = config.softpatch.lof_k
    model.threshold = threshold
    model.weight_method = weight_method
    model.soft_weight_flag = soft
    model.coreset_weight = None
    proj = torch.from_numpy(np.asarray(projection_DxR, np_dtype))
    fs = model.featuresampler
    fs._reduce_features = lambda f: torch.as_tensor(f).to(dtype) @ proj
    picked = {}
    run = fs.run

    def run_and_keep(f):
        out = run(f)
        picked["idx"] = np.asarray(out[1])
        return out

    fs.run = run_and_keep
    set_weight = fs.set_sampling_weight

    def set_and_keep(weight):
        picked["keep"] = np.asarray(weight).astype(bool).reshape(-1)
        if keep_override is not None:
            weight = torch.from_numpy(np.asarray(keep_override, np.int64))
        set_weight(weight)

    fs.set_sampling_weight = set_and_keep
    source = {"feats": None}

    def embed(images, detach=True, provide_patch_shapes=False):
        # The "images" are index tensors [B, 1, 1, 1]: their backbone is bypassed.
        idx = images.reshape(-1).long().numpy()
        f = np.ascontiguousarray(source["feats"][idx].reshape(-1, source["feats"].shape[-1]))
        return (f, [list(grid), list(grid)]) if provide_patch_shapes else f

    model._embed = embed
    batches = lambda n: [
        torch.arange(i, min(i + 16, n), dtype=torch.float32).reshape(-1, 1, 1, 1)
        for i in range(0, n, 16)
    ]
    source["feats"] = np.asarray(train_NxPxD, np_dtype)
    np.random.seed(seed)  # noqa: NPY002  (their start points come from numpy's global generator)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # their Gaussian allocates its covariance in the default dtype
    try:
        model.fit(batches(train_NxPxD.shape[0]))
    finally:
        torch.set_default_dtype(default)
    source["feats"] = np.asarray(test_TxPxD, np_dtype)
    scores, maps = [], []
    for b in batches(test_TxPxD.shape[0]):
        s, m = model._predict(b)
        scores += [float(x) for x in s]
        maps += [np.asarray(x) for x in m]
    weights = getattr(model, "patch_weight", None)
    return {
        "idx": picked["idx"],
        "scores": np.asarray(scores),
        "maps": np.stack(maps),
        "keep": picked.get("keep"),
        "weights": None if weights is None else np.asarray(weights, np.float64).reshape(-1),
    }


def keep_flips_explained(ours_w: np.ndarray, theirs_w: np.ndarray, flips: np.ndarray, tau: float):
    """Whether every patch whose removal differs is explained by the reference's own rounding: its
    weight there is off from ours (computed to float64 accuracy) by at least our weight's distance
    to our threshold, so their error alone can move it across. Their nearest distance carries the
    self-distance's rounding residue (the expanded form's `.abs() ** 0.5`, issue point 4), which
    breaks exact ties at the tau quantile."""
    thr = np.quantile(ours_w, 1.0 - tau)
    return bool(np.all(np.abs(theirs_w[flips] - ours_w[flips]) >= np.abs(ours_w[flips] - thr)))


def compare(ours: dict, theirs: dict, labels, masks, same_bank_with_our_keep=False) -> dict:
    """Bank, score, map and AUROC agreement. same_bank_with_our_keep: their sampler, given our keep
    mask, picked our bank (`removal_tolerance`)."""
    from scipy.stats import spearmanr
    from sklearn.metrics import roc_auc_score

    a, b = set(ours["idx"].tolist()), set(theirs["idx"].tolist())
    rel = np.abs(ours["scores"] - theirs["scores"]) / np.maximum(np.abs(theirs["scores"]), 1e-12)
    pix = masks.reshape(-1).astype(bool)
    out = {
        "bank_size": len(b),
        "bank_shared": len(a & b),
        "bank_identical": a == b,
        "image_score_max_rel_diff": float(rel.max()),
        "image_score_spearman": float(spearmanr(ours["scores"], theirs["scores"])[0]),
        "map_max_abs_diff": float(np.abs(ours["maps"] - theirs["maps"]).max()),
        "map_max_rel_diff": float(
            np.abs(ours["maps"] - theirs["maps"]).max() / max(np.abs(theirs["maps"]).max(), 1e-12)
        ),
    }
    for side, res in (("ours", ours), ("theirs", theirs)):
        out[f"image_auroc_{side}"] = float(roc_auc_score(labels, res["scores"]))
        out[f"pixel_auroc_{side}"] = (
            float(roc_auc_score(pix, res["maps"].reshape(-1))) if 0 < pix.sum() < pix.size else None
        )
    pixel_ok = out["pixel_auroc_ours"] is None or (
        abs(out["pixel_auroc_ours"] - out["pixel_auroc_theirs"]) <= PIXEL_AUROC_TOL
    )
    # A bank that differs only through the reference's rounding of its removal scores (see
    # `keep_flips_explained`) is at parity when their sampler, given our keep mask, picks our bank.
    bank_ok = out["bank_identical"] or bool(same_bank_with_our_keep)
    out["parity"] = bool(
        bank_ok
        and abs(out["image_auroc_ours"] - out["image_auroc_theirs"]) <= IMAGE_AUROC_TOL
        and pixel_ok
    )
    return out


def removal_tolerance(fitted, spec, theirs: dict, ours: dict, run_theirs) -> dict:
    """Where the banks differ and so do the keep masks: how many removals differ, whether the
    reference's rounding explains each (`keep_flips_explained`), and if so whether their sampler
    given our keep mask picks our bank (a second reference fit)."""
    if set(ours["idx"].tolist()) == set(theirs["idx"].tolist()) or theirs["keep"] is None:
        return {}
    name = spec.cls.removal[0] if len(spec.cls.removal) == 1 else None
    keep = np.asarray(fitted.keep_NxP[spec.name]).reshape(-1)
    flips = np.flatnonzero(keep != theirs["keep"])
    out = {"keep_flips": int(flips.size)}
    if name is None or not flips.size or theirs["weights"] is None:
        return out
    scores = {k: np.asarray(v, np.float64).reshape(-1) for k, v in fitted.scores_NxP.items()}
    # Their thresholded weight: distance-type scores + 1, LOF as is; ours to float64 accuracy.
    ours_w = scores[name] + scores.get(discriminators.low_key(name), 0.0)
    ours_w = ours_w + (1.0 if name in ("nearest", "gaussian") else 0.0)
    out["keep_flips_explained"] = keep_flips_explained(
        ours_w, theirs["weights"], flips, spec.cls.tau
    )
    if out["keep_flips_explained"]:
        again = run_theirs(keep_override=keep)
        out["same_bank_with_our_keep"] = set(again["idx"].tolist()) == set(ours["idx"].tolist())
    return out


def run_category(ref, config, ex, category: str) -> list[dict]:
    splits = data.read(options.dataset_options(config.dataset), category)
    train, _ = stages.extract(ex, splits.train, config, category, "train")
    test, test_masks = stages.extract(ex, splits.test, config, category, "test")
    test_pos = {r.path: i for i, r in enumerate(splits.test)}
    specs = [
        methods.spec(n, options.method_options(config)) for n in methods.split_list(config.methods)
    ]
    rows = []
    for ratio in grid.parse_ratios(config.noise.ratios):
        noisy, injected, spec = plan.noisy_splits(config, splits, ratio)
        feats = train
        if injected:
            inj, _ = stages.extract(ex, injected, config, category, "injected")
            feats = jnp.concatenate([train, inj])
        keep_test = np.array([test_pos[r.path] for r in noisy.test])
        labels = np.array([r.label for r in noisy.test])
        masks = np.asarray(test_masks)[keep_test]
        t_feats = test[keep_test]
        n, p, d = feats.shape
        root = plan.category_key(config.seed, category)
        proj = pool.random_projection(
            pool.stream(root, "projection"), d, config.softpatch.projection_dim
        )
        seed = int(config.seed)
        starts = np.random.RandomState(seed).choice(
            n * p, min(config.coreset.num_starts, n * p), replace=False
        )
        fitted = memory_bank.fit_many(
            root,
            feats,
            options.fit_options(config),
            specs,
            projection=proj,
            starts=jnp.asarray(starts),
        )
        for s in specs:
            banks = fitted.banks[s.name]
            scores, maps = scoring.predict(
                banks,
                t_feats,
                ex.grid,
                ex.image_size,
                config.scoring.blur_sigma,
                config.scoring.chunk_size,
                distance=config.scoring.distance,
            )
            ours = {
                "idx": np.asarray(banks.cls.index_M),
                "scores": np.asarray(scores),
                "maps": np.asarray(maps),
            }
            t0 = time.perf_counter()
            run_theirs = functools.partial(
                reference_run, ref, s.name, config, np.asarray(feats), np.asarray(t_feats),
                ex.grid, ex.image_size, np.asarray(proj), seed, _PRECISION.value,
            )  # fmt: skip
            theirs = run_theirs()
            tolerance = removal_tolerance(fitted, s, theirs, ours, run_theirs)
            row = {
                "category": category,
                "method": s.name,
                "noise_ratio": spec.ratio,
                "overlap": spec.overlap,
                "num_train": n,
                "num_injected": len(injected),
                "reference_seconds": round(time.perf_counter() - t0, 2),
                **compare(
                    ours, theirs, labels, masks, tolerance.get("same_bank_with_our_keep", False)
                ),
                **tolerance,
            }
            logging.info(
                "%s %s r=%g: bank %d/%d shared, image AUROC %.4f / %.4f, pixel %s / %s",
                category, s.name, ratio, row["bank_shared"], row["bank_size"],
                row["image_auroc_ours"], row["image_auroc_theirs"],
                row["pixel_auroc_ours"], row["pixel_auroc_theirs"],
            )  # fmt: skip
            rows.append(row)
    return rows


def _f(x, digits=4):
    return "-" if x is None else f"{x:.{digits}f}"


def _parity_mark(r: dict) -> str:
    if not r["parity"]:
        return "NO"
    return (
        "yes" if r["bank_identical"] else f"yes: {r['keep_flips']} removal(s) off by their rounding"
    )


def table(rows: list[dict]) -> str:
    """Markdown: one line per category x noise x method, then the mean per noise x method."""
    head = (
        "| category | noise | method | bank shared | image AUROC ours / theirs | "
        "pixel AUROC ours / theirs | image score max rel diff | Spearman | map max rel diff | "
        "parity |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        noise = f"{r['noise_ratio']:g}" + (" overlap" if r["overlap"] and r["noise_ratio"] else "")
        lines.append(
            f"| {r['category']} | {noise} | {r['method']} | {r['bank_shared']}/{r['bank_size']} | "
            f"{_f(r['image_auroc_ours'])} / {_f(r['image_auroc_theirs'])} | "
            f"{_f(r['pixel_auroc_ours'])} / {_f(r['pixel_auroc_theirs'])} | "
            f"{r['image_score_max_rel_diff']:.1e} | {r['image_score_spearman']:.6f} | "
            f"{r['map_max_rel_diff']:.1e} | {_parity_mark(r)} |"
        )
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["noise_ratio"], r["overlap"], r["method"]), []).append(r)
    for (ratio, overlap, method), rs in groups.items():

        def mean(k, rs=rs):
            return float(np.mean([r[k] for r in rs if r[k] is not None]))

        noise = f"{ratio:g}" + (" overlap" if overlap and ratio else "")
        lines.append(
            f"| **mean of {len(rs)}** | {noise} | {method} | "
            f"{sum(r['bank_shared'] for r in rs)}/{sum(r['bank_size'] for r in rs)} | "
            f"{mean('image_auroc_ours'):.4f} / {mean('image_auroc_theirs'):.4f} | "
            f"{mean('pixel_auroc_ours'):.4f} / {mean('pixel_auroc_theirs'):.4f} | "
            f"{max(r['image_score_max_rel_diff'] for r in rs):.1e} | "
            f"{min(r['image_score_spearman'] for r in rs):.6f} | "
            f"{max(r['map_max_rel_diff'] for r in rs):.1e} | "
            f"{sum(r['parity'] for r in rs)}/{len(rs)} |"
        )
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    ref = load_reference(_REFERENCE.value)
    os.makedirs(_OUT.value, exist_ok=True)
    ex = features.build(options.extractor_options(config))
    rows: list[dict] = []
    categories = data.categories(options.dataset_options(config.dataset))
    for i, category in enumerate(categories):
        logging.info("[%d/%d] %s", i + 1, len(categories), category)
        rows += run_category(ref, config, ex, category)
        meta = {"config": config.to_dict(), "reference_path": _REFERENCE.value}
        meta["reference_precision"] = _PRECISION.value
        meta["weights"] = ex.info
        meta["jax_version"] = jax.__version__
        write_json(os.path.join(_OUT.value, "parity.json"), {**meta, "rows": rows})
    md = table(rows)
    if ex.random_init:
        md = "**random-init backbone: these numbers say nothing about the method.**\n\n" + md
    with atomic_open(os.path.join(_OUT.value, "parity.md"), "w") as f:
        f.write(md + "\n")
    print(md, flush=True)


if __name__ == "__main__":
    app.run(main)
