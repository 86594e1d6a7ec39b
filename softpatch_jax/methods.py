"""The methods compared in the papers, as data: which discriminators drive patch removal, at what
granularity and tau, which soft weight the memory bank keeps, and whether a second (segmentation)
bank is built. `from_config` turns `config.methods` into specs; adding a method is one entry here.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from softpatch_jax import contamination, discriminators
from softpatch_jax.io_utils import split_list

SOFT_WEIGHTS = ("none", "fused", *discriminators.NAMES)
# tau policies besides a fixed quantile: "auto" estimates it per training set (contamination.py);
# "oracle" is the true contaminated patch fraction, which only an experiment with injected noise
# knows (the driver resolves it to a number before fitting).
TAU_POLICIES = ("auto", "oracle")


@dataclasses.dataclass(frozen=True)
class BankSpec:
    """One memory bank: removal of the top `tau` by `removal` scores, then coreset.

    removal: discriminators whose (rank-fused, if several) score ranks the patches; () = no removal.
    granularity: "patch" removes patches; "image" removes whole images by their max patch score.
    tau: a fraction in [0, 1), or "auto": estimated from the scores by `estimator`
      (`contamination.ESTIMATORS`), the soft weights then fading to 1 on images that look clean.
    """

    removal: tuple[str, ...] = ()
    tau: float | str = 0.0
    granularity: str = "patch"
    soft_weight: str = "none"
    rank_scope: str = "all"
    estimator: str = contamination.DEFAULT

    def __post_init__(self):
        if isinstance(self.tau, str):
            if self.tau not in TAU_POLICIES:
                raise ValueError(
                    f"tau must be a fraction or one of {TAU_POLICIES}, got {self.tau!r}"
                )
        elif not 0.0 <= self.tau < 1.0:
            raise ValueError(f"tau must be in [0, 1), got {self.tau}")
        contamination.check(self.estimator)
        if self.granularity not in ("patch", "image"):
            raise ValueError(f"granularity must be 'patch' or 'image', got {self.granularity!r}")
        if self.soft_weight not in SOFT_WEIGHTS:
            raise ValueError(f"soft_weight {self.soft_weight!r}; valid: {SOFT_WEIGHTS}")
        if self.rank_scope not in ("all", "position"):
            raise ValueError(f"rank_scope must be 'all' or 'position', got {self.rank_scope!r}")

    def coreset_key(self) -> tuple:
        """Banks that remove the same patches share one coreset run."""
        if not self.removal or self.tau == 0.0:
            return ("all",)
        policy = (self.tau, self.estimator) if self.tau == "auto" else self.tau
        return (self.removal, policy, self.granularity, self.rank_scope)


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    name: str
    cls: BankSpec  # image scores
    seg: BankSpec | None = None  # pixel maps; None: the classification bank serves both

    def discriminators(self) -> tuple[str, ...]:
        banks = [b for b in (self.cls, self.seg) if b is not None]
        needed = {n for b in banks for n in b.removal}
        needed |= {b.soft_weight for b in banks if b.soft_weight in discriminators.NAMES}
        return tuple(n for n in discriminators.NAMES if n in needed)


def _softpatch(name: str, disc: str, sp: ml_collections.ConfigDict) -> MethodSpec:
    discriminators.check_names([disc])
    return MethodSpec(name, BankSpec((disc,), sp.tau, "patch", disc, estimator=_estimator(sp)))


def _estimator(sp: ml_collections.ConfigDict) -> str:
    return sp.get("auto_estimator", contamination.DEFAULT)


def spec(name: str, sp: ml_collections.ConfigDict) -> MethodSpec:
    """The MethodSpec for a method name given the `config.softpatch` section."""
    if name == "patchcore":
        return MethodSpec(name, BankSpec())
    if name == "softpatch":
        return _softpatch(name, sp.discriminator, sp)
    if name.startswith("softpatch_") and name[len("softpatch_") :] in discriminators.NAMES:
        return _softpatch(name, name[len("softpatch_") :], sp)
    if name == "softpatch_plus":
        names = discriminators.check_names(split_list(sp.discriminators))

        def bank(tau: float) -> BankSpec:
            return BankSpec(names, tau, "patch", sp.soft_weight, sp.rank_scope, _estimator(sp))

        return MethodSpec(name, bank(sp.tau), bank(sp.tau_seg))
    if name == "image_denoise":
        discriminators.check_names([sp.discriminator])
        disc = (sp.discriminator,)
        return MethodSpec(name, BankSpec(disc, sp.tau, "image", "none", estimator=_estimator(sp)))
    raise ValueError(
        f"unknown method {name!r}; valid: patchcore, softpatch, "
        + ", ".join(f"softpatch_{n}" for n in discriminators.NAMES)
        + ", softpatch_plus, image_denoise"
    )


def from_config(config: ml_collections.ConfigDict) -> list[MethodSpec]:
    names = split_list(config.methods)
    if not names:
        raise ValueError("config.methods is empty")
    if len(set(names)) != len(names):
        raise ValueError(f"config.methods lists a method twice: {names}")
    return [spec(n, config.softpatch) for n in names]
