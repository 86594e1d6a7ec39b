"""The README's "Image statistics tried" table: which per-image statistic tells a contaminated
training set from a clean one, measured on every noisy training set of a run without fitting.

For each training set (category x noise ratio of the config), the LOF scores the fit computes
(`memory_bank.prepare`, the run's own projection and k) and candidate image statistics, each
through the same 3-round robust-z gate as `tau=auto` (`contamination.gate_z`, cutoff
`contamination.null_cutoff(N)`):

- `top1` / `contrast`: the top-1% mean log LOF, alone (`image_floor`) or less the image's median
  (`image_contrast`, the default estimator);
- `smooth3`: the top-1% mean of the log LOF map averaged over 3x3 positions;
- `zimg`: (top-1% mean - median) / the image's own MAD;
- `pos_k<K>_top|contrast`: per position, the log distance to the K-th nearest other image's patch
  at the same position (K = 1, 3, 6, N/10, N/5, N/3);
- `free_k<K>_top|contrast` (unless --noposition_free): the log distance to the nearest patch
  anywhere in the K-th nearest other image (K = 1, 3, N/10): a search of every patch against every
  other image's, N^2 P^2 D.

Per statistic and set: the largest gate z, how many images are flagged, and the within-set AUROC
of the statistic for the injected images (None on a clean set). The table counts, per statistic,
clean sets with an image flagged (false alarms), noisy sets with one flagged, and the mean AUROC.

  python -m launch.contamination_study --config=configs/demo.py --out=study_demo.jsonl \\
      --config.dataset.resize=128 --config.dataset.crop=128 \\
      --config.noise.ratios=0.0,0.1,0.2,0.4 --config.noise.overlap=True
  python -m launch.contamination_study --read=study_demo.jsonl --read=study_piped.jsonl

The sets' statistics are written to --out (JSON lines, whole or not at all). Results on a
random-initialised backbone say so in every line (`random_init`).
"""

from __future__ import annotations

import json
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from softpatch_jax import cli, compile_cache, contamination, memory_bank, metrics, ops
from softpatch_jax.experiment import config_errors, driver, options, plan
from softpatch_jax.io_utils import atomic_open


def _define_flags() -> None:
    """The command line's flags, defined only when run as a program: tests import this module
    beside other launch tools that define a --config of their own."""
    config_flags.DEFINE_config_file("config", None, "A configs/*.py file.", lock_config=True)
    flags.DEFINE_string("out", None, "JSON lines of the sets' statistics (with --config).")
    flags.DEFINE_multi_string("read", [], "--out files to tabulate, one column each.")
    flags.DEFINE_bool(
        "position_free", True, "Also the position-free statistics (N^2 P^2 D per set)."
    )


def per_position_kth(feats_NxPxD: jax.Array) -> jax.Array:
    """[N, P, N-1]: each patch's squared distance to the same position of every other image,
    ascending (the k-th entry is the k-th nearest other image)."""
    f = jnp.swapaxes(feats_NxPxD.astype(jnp.float32), 0, 1)  # [P, N, D]
    d2 = jax.vmap(ops.pairwise_sqdist)(f, f)  # [P, N, N]
    n = f.shape[1]
    d2 = jnp.where(jnp.eye(n, dtype=bool)[None], jnp.inf, d2)
    return jnp.swapaxes(jnp.sort(d2, axis=2)[:, :, : n - 1], 0, 1)


def position_free_kth(feats_NxPxD: jax.Array) -> jax.Array:
    """[N, P, N-1]: each patch's squared distance to the nearest patch anywhere in every other
    image, ascending over the other images."""
    f = feats_NxPxD.astype(jnp.float32)
    n, p, d = f.shape
    flat = f.reshape(n * p, d)
    flat_sq = ops.sq_norms(flat)

    def one(q_PxD):
        d2 = ops.pairwise_sqdist(q_PxD, flat, b_sq_N=flat_sq)  # [P, N * P]
        return jnp.min(d2.reshape(p, n, p), axis=2)  # [P, N]

    d2 = jax.lax.map(one, f)  # [N, P, N]
    own = jnp.eye(n, dtype=bool)[:, None, :]
    return jnp.sort(jnp.where(own, jnp.inf, d2), axis=2)[:, :, : n - 1]


def _ks(n: int, which: tuple) -> dict[str, int]:
    fixed = {"1": 1, "3": 3, "6": 6}
    share = {"n10": 10, "n5": 5, "n3": 3}
    out = {k: v for k, v in fixed.items() if k in which}
    out.update({k: max(1, -(-n // v)) for k, v in share.items() if k in which})
    return {k: min(v, n - 1) for k, v in out.items()}


def statistics(lof_NxP, feats_NxPxD, grid: tuple[int, int], position_free: bool) -> dict:
    """{name: [N] image statistic} (module docstring)."""
    n, p = lof_NxP.shape
    v = contamination.log_scores(lof_NxP)
    out = {
        "top1": contamination.image_statistic(v),
        "contrast": contamination.image_statistic(v, contrast=True),
    }
    m = jnp.pad(v.reshape(n, *grid), ((0, 0), (1, 1), (1, 1)), mode="edge")
    smooth = sum(m[:, i : i + grid[0], j : j + grid[1]] for i in range(3) for j in range(3)) / 9
    out["smooth3"] = contamination.image_statistic(smooth.reshape(n, p))
    med = jnp.median(v, axis=1)
    mad = contamination.MAD_TO_SIGMA * jnp.median(jnp.abs(v - med[:, None]), axis=1)
    out["zimg"] = (out["top1"] - med) / jnp.maximum(mad, 1e-6)
    searches = [("pos", per_position_kth, ("1", "3", "6", "n10", "n5", "n3"))]
    if position_free:
        searches.append(("free", position_free_kth, ("1", "3", "n10")))
    for prefix, search, which in searches:
        d2 = search(feats_NxPxD)
        eps = 1e-2 * jnp.median(d2[:, :, 0])  # keeps the log finite for duplicated patches
        for tag, k in _ks(n, which).items():
            w = jnp.log(d2[:, :, k - 1] + eps) / 2
            out[f"{prefix}_k{tag}_top"] = contamination.image_statistic(w)
            out[f"{prefix}_k{tag}_contrast"] = contamination.image_statistic(w, contrast=True)
    return out


def gate(x_N, n: int) -> dict:
    """The `tau=auto` gate on one statistic: z after `GATE_ROUNDS`, the cutoff, flagged images."""
    cutoff = contamination.null_cutoff(n)
    z = np.asarray(contamination.gate_z(jnp.asarray(x_N), cutoff, contamination.GATE_ROUNDS))
    return {"cutoff": cutoff, "max_z": float(z.max()), "flagged": int((z > cutoff).sum())}


def study_set(nset: driver.NoisySet, cfg, position_free: bool = True) -> dict:
    """One training set's line: its statistics through the gate, AUROC for the injected images."""
    feats = nset.feats
    n = int(feats.shape[0])
    key = plan.category_key(cfg.seed, nset.category)
    prepared = memory_bank.prepare(key, feats, options.fit_options(cfg), ("lof",))
    lof = prepared.scores_NxP["lof"]
    injected = np.arange(n) >= n - len(nset.injected)
    known = not nset.noisy.train_anomalous  # the source's own training anomalies are unlabelled
    line = {
        "dataset": cfg.dataset.name,
        "category": nset.category,
        "num_train": n,
        "num_injected": len(nset.injected),
        "truth_known": known,
        "random_init": nset.ex.random_init,
        "statistics": {},
    }
    for name, x in statistics(lof, feats, tuple(nset.ex.grid), position_free).items():
        x = np.asarray(x, np.float64)
        entry = gate(x, n)
        auc = metrics.auroc(x, injected) if known and 0 < injected.sum() < n else None
        entry["auroc"] = None if auc is None else round(float(auc), 6)
        line["statistics"][name] = entry
    return line


def study(config, position_free: bool = True) -> list[dict]:
    """Every noisy training set of `config` (plan.plan's grid, one method is enough), studied."""
    cells = plan.plan(config)
    lines = []

    def look(nset, cfg):
        lines.append(study_set(nset, cfg, position_free))
        s = lines[-1]["statistics"]["contrast"]
        logging.info(
            "%s %d/%d injected: contrast max z %.2f (cutoff %.2f), %d flagged",
            nset.category,
            lines[-1]["num_injected"],
            lines[-1]["num_train"],
            s["max_z"],
            s["cutoff"],
            s["flagged"],
        )

    with tempfile.TemporaryDirectory(prefix="softpatch_study_") as workdir:
        driver.execute(config, cells, workdir, on_training_set=look)
    return lines


def table(columns: dict[str, list[dict]]) -> str:
    """Markdown: per statistic and column, clean sets flagged / noisy sets detected / AUROC."""
    names = list(
        dict.fromkeys(k for lines in columns.values() for ln in lines for k in ln["statistics"])
    )
    head = "| statistic | " + " | ".join(
        f"{c}: clean flagged / noisy detected / AUROC" for c in columns
    )
    out = [head + " |", "|---|" + "---|" * len(columns)]
    for name in names:
        cells = []
        for lines in columns.values():
            clean = [ln for ln in lines if ln["num_injected"] == 0 and name in ln["statistics"]]
            noisy = [ln for ln in lines if ln["num_injected"] > 0 and name in ln["statistics"]]
            fa = sum(ln["statistics"][name]["flagged"] > 0 for ln in clean)
            det = sum(ln["statistics"][name]["flagged"] > 0 for ln in noisy)
            aucs = [ln["statistics"][name]["auroc"] for ln in noisy]
            aucs = [a for a in aucs if a is not None]
            auc = f"{np.mean(aucs):.3f}" if aucs else "-"
            cells.append(f"{fa}/{len(clean)}, {det}/{len(noisy)}, {auc}")
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    if any(ln["random_init"] for lines in columns.values() for ln in lines):
        out.append("\n(random-initialised backbone: not a result about real features)")
    return "\n".join(out)


def read(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _run(config, out: str, position_free: bool) -> None:
    if os.path.lexists(out):  # never replace a file this run did not write
        raise FileExistsError(f"--out={out!r} exists; choose a new file")
    config_errors.validate(config)
    lines = study(config, position_free)
    with atomic_open(out, "w") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")
    print(table({config.dataset.name: lines}))
    print(f"wrote {out}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    if f.read:
        print(table({os.path.basename(p): read(p) for p in f.read}))
        return
    if f.config is None or not f.out:
        raise app.UsageError("--config and --out (or --read=FILE ...)")
    compile_cache.enable(compile_cache.FLAG.value)
    cli.one_line_errors(_run, f.config, f.out, f.position_free)


if __name__ == "__main__":
    _define_flags()
    app.run(main, flags_parser=config_errors.parse_flags)
