"""The methods compared in the papers, as data: which discriminators drive patch removal, at what
granularity and tau, which soft weight the memory bank keeps, and whether a second (segmentation)
bank is built. `specs` turns a list of method names into specs, given the `Options` the driver
builds from `config.softpatch`. Methods are a registry (`REGISTRY`): adding one is one `@register`
entry here, and `names()`, config validation (`experiment/config_errors.py`), the sweeps and
README's method table follow it.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Sequence

from softpatch_jax import contamination, discriminators, inreach
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
    channels: keep only the patches of InReaCh's long, tight channels (`inreach.keep_mask`)
      instead of a removal by scores.
    tau: a fraction in [0, 1), or "auto": estimated from the scores by `estimator`
      (`contamination.ESTIMATORS`), the soft weights then fading to 1 on images that look clean.
    floor: under "auto", the least tau of a set found contaminated (`contamination.policy_tau`).
    """

    removal: tuple[str, ...] = ()
    tau: float | str = 0.0
    granularity: str = "patch"
    soft_weight: str = "none"
    rank_scope: str = "all"
    channels: inreach.Options | None = None
    estimator: str = contamination.DEFAULT
    floor: float = 0.0

    def __post_init__(self):
        if isinstance(self.tau, str):
            if self.tau not in TAU_POLICIES:
                raise ValueError(
                    f"tau must be a fraction or one of {TAU_POLICIES}, got {self.tau!r}"
                )
        elif not 0.0 <= self.tau < 1.0:
            raise ValueError(f"tau must be in [0, 1), got {self.tau}")
        contamination.check(self.estimator)
        if not 0.0 <= self.floor < 1.0:
            raise ValueError(f"floor must be in [0, 1), got {self.floor}")
        if self.granularity not in ("patch", "image"):
            raise ValueError(f"granularity must be 'patch' or 'image', got {self.granularity!r}")
        if self.soft_weight not in SOFT_WEIGHTS:
            raise ValueError(f"soft_weight {self.soft_weight!r}; valid: {SOFT_WEIGHTS}")
        if self.rank_scope not in ("all", "position"):
            raise ValueError(f"rank_scope must be 'all' or 'position', got {self.rank_scope!r}")

    def coreset_key(self) -> tuple:
        """Banks that remove the same patches share one coreset run."""
        if self.channels is not None:
            return ("inreach", self.channels)
        if not self.removal or self.tau == 0.0:
            return ("all",)
        policy = (self.tau, self.estimator, self.floor) if self.tau == "auto" else self.tau
        return (self.removal, policy, self.granularity, self.rank_scope)


@dataclasses.dataclass(frozen=True)
class Options:
    """What the method specs read: the `config.softpatch` fields of the same names (the driver
    builds it; defaults live in configs/base.py)."""

    discriminator: str  # for `softpatch` and `image_denoise`
    discriminators: str  # SoftPatch+'s fused discriminators, a comma list
    tau: float | str  # a fraction, "auto" or "oracle"
    tau_seg: float | str
    soft_weight: str
    rank_scope: str
    inreach: inreach.Options  # the `inreach` method's channel selection
    auto_estimator: str = contamination.DEFAULT  # tau "auto": `contamination.ESTIMATORS`
    auto_floor: float = contamination.FLOOR  # "auto": least tau of a contaminated set (tau_cls)
    auto_floor_seg: float = contamination.FLOOR_SEG  # the same for SoftPatch+'s seg bank


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


@dataclasses.dataclass(frozen=True)
class Method:
    """One registered method: its name, how its banks are built from the softpatch options, and
    its line in README's method table (tests/test_methods.py checks the table against `REGISTRY`).

    family: the README row that documents it when it is one of a generated family
      (`softpatch_<discriminator>`, one per registered discriminator); None: its own row.
    """

    name: str
    build: Callable[[Options], MethodSpec]
    summary: str
    family: str | None = None


# name -> Method, in registration order (the order of `names()`)
REGISTRY: dict[str, Method] = {}


def register(name: str, summary: str, family: str | None = None):
    """Decorator: registers `build(sp: Options) -> MethodSpec` as the method `name`."""

    def add(build: Callable[[Options], MethodSpec]) -> Callable[[Options], MethodSpec]:
        if name in REGISTRY:
            raise ValueError(f"method {name!r} is registered twice")
        REGISTRY[name] = Method(name, build, summary, family)
        return build

    return add


def _softpatch(name: str, disc: str, sp: Options) -> MethodSpec:
    discriminators.check_names([disc])
    return MethodSpec(
        name,
        BankSpec((disc,), sp.tau, "patch", disc, estimator=_estimator(sp), floor=sp.auto_floor),
    )


def _estimator(sp: Options) -> str:
    return sp.auto_estimator


@register("patchcore", "no denoising, no soft weights (the baseline)")
def _patchcore(sp: Options) -> MethodSpec:
    del sp
    return MethodSpec("patchcore", BankSpec())


@register(
    "softpatch",
    "one discriminator (`softpatch.discriminator`, default `lof`), top `tau`=0.15 removed, "
    "soft weights",
)
def _softpatch_configured(sp: Options) -> MethodSpec:
    return _softpatch("softpatch", sp.discriminator, sp)


def _register_per_discriminator(disc: str) -> None:
    name = f"softpatch_{disc}"
    register(
        name,
        "the same with that discriminator (any registered one, table below)",
        family="softpatch_<discriminator>",
    )(lambda sp: _softpatch(name, disc, sp))


for _disc in discriminators.NAMES:
    _register_per_discriminator(_disc)


@register(
    "softpatch_plus",
    "rank fusion of `softpatch.discriminators` (default `gaussian,lof`); two banks, `tau`=0.15 for "
    "image scores and `tau_seg`=0.50 for pixel maps; soft weight `softpatch.soft_weight` (`lof`, "
    "`nearest`, `gaussian`, `fused` = 1 + fused rank, `none`); ranks over all patches or per "
    "position (`softpatch.rank_scope`)",
)
def _softpatch_plus(sp: Options) -> MethodSpec:
    fused = discriminators.check_names(split_list(sp.discriminators))

    def bank(tau: float, floor: float) -> BankSpec:
        return BankSpec(
            fused,
            tau,
            "patch",
            sp.soft_weight,
            sp.rank_scope,
            estimator=_estimator(sp),
            floor=floor,
        )

    return MethodSpec(
        "softpatch_plus", bank(sp.tau, sp.auto_floor), bank(sp.tau_seg, sp.auto_floor_seg)
    )


@register(
    "image_denoise",
    "drop whole training images whose max patch score is in the top `tau`, then PatchCore "
    "(journal Table 9)",
)
def _image_denoise(sp: Options) -> MethodSpec:
    discriminators.check_names([sp.discriminator])
    disc = (sp.discriminator,)
    return MethodSpec(
        "image_denoise",
        BankSpec(disc, sp.tau, "image", "none", estimator=_estimator(sp), floor=sp.auto_floor),
    )


@register(
    "inreach",
    "InReaCh (ICCV 2023; `softpatch_jax/inreach.py`, written from the paper): keep only the "
    "patches of long, tight mutual-nearest-neighbour channels across training images "
    "(`inreach.window`=1 grid cell, `inreach.min_length`=0.5 of the images, "
    "`inreach.spread_quantile`=0.9), then the same coreset and plain nearest-neighbour scoring; "
    "the window stands in for the paper's positional encoding",
)
def _inreach(sp: Options) -> MethodSpec:
    return MethodSpec("inreach", BankSpec(channels=sp.inreach))


def spec(name: str, sp: Options) -> MethodSpec:
    """The MethodSpec for a method name given the softpatch options."""
    return REGISTRY[check_name(name)].build(sp)


def check_name(name: str) -> str:
    """`name` if a method is registered under it, else an error with the valid names."""
    if name in REGISTRY:
        return name
    valid = names()
    close = difflib.get_close_matches(str(name), valid, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unknown method {name!r}{hint} (valid: {', '.join(valid)})")


def names() -> tuple[str, ...]:
    """Every registered method name, in registration order: the fixed ones and
    `softpatch_<name>` for every registered discriminator (tests/test_registered.py runs each)."""
    return tuple(REGISTRY)


def check(methods: str | Sequence[str]) -> list[str]:
    """The names of `methods` (a comma list, as `config.methods`, or names), each registered and
    listed once, else an error naming the first bad one."""
    wanted = split_list(methods) if isinstance(methods, str) else list(methods)
    if not wanted:
        raise ValueError("config.methods is empty")
    if len(set(wanted)) != len(wanted):
        raise ValueError(f"config.methods lists a method twice: {wanted}")
    return [check_name(n) for n in wanted]


def specs(methods: str | Sequence[str], sp: Options) -> list[MethodSpec]:
    """The specs of `methods` (a comma list, as `config.methods`, or names), each name once."""
    return [spec(n, sp) for n in check(methods)]
