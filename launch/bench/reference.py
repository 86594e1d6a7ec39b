"""The reference algorithm timed on the same arrays (--reference_impl): the authors' code from
--reference_path where given, else a re-implementation with their loop structure, labelled so.

- LOF: one scikit-learn LocalOutlierFactor fit per position on the host (theirs:
  SoftPatch._compute_lof, read out of src/softpatch.py and run on its own).
- Coreset: a greedy loop in torch reading each step's argmax back to the host with .item()
  (theirs: src/sampler.py's ApproximateGreedyCoresetSampler).
"""

from __future__ import annotations

import ast
import os
import sys
import time

import numpy as np


def authors_function(path: str, cls: str, name: str):
    """`cls.name` from the authors' file at `path`, compiled on its own: the module-level imports it
    does not use (faiss, their backbones) are never run. Its globals are torch, numpy and
    scikit-learn's LocalOutlierFactor, which is what the method body calls."""
    import torch
    from sklearn.neighbors import LocalOutlierFactor

    with open(path) as f:
        tree = ast.parse(f.read(), path)
    found = [
        node
        for top in tree.body
        if isinstance(top, ast.ClassDef) and top.name == cls
        for node in top.body
        if isinstance(node, ast.FunctionDef) and node.name == name
    ]
    if not found:
        raise ValueError(f"{path}: no method {cls}.{name} (is --reference_path the authors' code?)")
    scope = {"torch": torch, "np": np, "LocalOutlierFactor": LocalOutlierFactor}
    exec(compile(ast.Module(found, type_ignores=[]), path, "exec"), scope)
    return scope[name]


def lof(args, pool_NxPxR: np.ndarray, ours_NxP: np.ndarray) -> dict:
    """The reference's LOF, one scikit-learn fit per position on the host: the authors' own method
    with --reference_path, else a re-implementation of it."""
    n, p, _ = pool_NxPxR.shape
    todo = min(p, args.reference_positions or p)
    if args.reference_path:
        import torch

        src = os.path.join(args.reference_path, "src", "softpatch.py")
        compute_lof = authors_function(src, "SoftPatch", "_compute_lof")
        # Their _compute_patch_weight permutes [N, P, R] features to [P, N, R] before the call.
        feats = torch.from_numpy(np.array(pool_NxPxR[:, :todo])).permute(1, 0, 2)
        impl = f"authors' SoftPatch._compute_lof from {src}"
        t0 = time.perf_counter()
        scores = compute_lof(None, args.lof_k, feats).numpy()  # self is unused
    else:
        from sklearn.neighbors import LocalOutlierFactor

        clf = LocalOutlierFactor(n_neighbors=args.lof_k, metric="l2")
        scores = np.empty((todo, n), np.float32)
        impl = "re-implementation: sklearn LocalOutlierFactor fitted per position"
        t0 = time.perf_counter()
        for pos in range(todo):
            clf.fit(pool_NxPxR[:, pos])
            scores[pos] = -clf.negative_outlier_factor_
    seconds = (time.perf_counter() - t0) * p / todo
    rel = np.abs(scores - ours_NxP[:, :todo].T) / np.abs(scores)
    return {
        "impl": impl,
        "positions_run": todo,
        "seconds": seconds,
        "scaled_from_subset": todo < p,
        # Float32 near-ties at the k-th neighbour (distances equal to ~1e-8 relative) can swap a
        # neighbour and move a LOF by ~1e-3 relative; everywhere else they agree to ~1e-6.
        "lof_max_rel_diff_vs_ours": float(rel.max()),
        "lof_frac_within_1e-4": float(np.mean(rel < 1e-4)),
    }


def coreset(args, pool: np.ndarray, our_step: float) -> dict:
    """The reference's greedy loop in torch, host-synced every step; per-step time."""
    import torch

    steps = args.reference_coreset_steps
    feats = torch.from_numpy(np.array(pool))  # writable copy for torch
    if args.reference_path:
        sys.path.insert(0, os.path.join(args.reference_path, "src"))
        import sampler  # the authors' file, from the user's checkout

        s = sampler.ApproximateGreedyCoresetSampler(steps / len(feats), torch.device("cpu"))
        impl = f"authors' src/sampler.py from {args.reference_path}"
        run = lambda: s._compute_greedy_coreset_indices(feats)
    else:
        impl = "re-implementation: torch loop, argmax read to host with .item() every step"

        def run():
            starts = np.random.default_rng(0).choice(len(feats), 10, replace=False)
            sq = (feats * feats).sum(1, keepdim=True)
            with torch.no_grad():
                d = (sq + sq[starts].T - 2 * feats @ feats[starts].T).clamp(min=0).sqrt()
                anchor = d.mean(1, keepdim=True)
                picked = []
                for _ in range(steps):
                    j = torch.argmax(anchor).item()
                    picked.append(j)
                    dj = (sq + sq[j] - 2 * feats @ feats[j : j + 1].T).clamp(min=0).sqrt()
                    anchor = torch.min(torch.cat([anchor, dj], 1), 1).values.reshape(-1, 1)
            return picked

    t0 = time.perf_counter()
    run()
    total = time.perf_counter() - t0
    return {
        "impl": impl,
        "steps": steps,
        "step_s": total / steps,
        "speedup_per_step": total / steps / our_step,
        "torch_threads": torch.get_num_threads(),
    }
