"""Frozen, validated configurations of an edit and of the sampler (ALGORITHM.md §2, §5–§9)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from adapedit.errors import ConfigError

EDIT_TYPES = ("refine", "replace", "reweight")
#: How P2P's resolution constants apply to a model (``adapedit.algorithm.geometry``): ``scaled`` as
#: fractions of the latent, equal to P2P's numbers at 512 px; ``p2p-literal`` P2P's numbers
#: as written (self-attention control in layers of at most 256 queries, LocalBlend's maps
#: max-pooled over 3×3 cells).
ATTENTION_LIMITS = ("scaled", "p2p-literal")
TAU_RULES = ("paper", "released")
CALIBRATION_MODES = ("mean", "last")
SCHEDULERS = ("ddim", "pndm", "euler", "dpmpp")
INVERSIONS = ("direct", "ddim", "npi")
RESIZE_POLICIES = ("crop", "pad", "stretch")
#: The calibration cache's default bound (:mod:`adapedit.pipelines.calibration_cache`): 256 MiB, a
#: few 512 px SD 1.4 entries or hundreds of ``shapes`` ones; small beside a GPU replica's UNet.
DEFAULT_CACHE_BYTES = 256 << 20


def _check_range(
    name: str, value: float, lo: float, hi: float, where: str, field: str | None = None
) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and lo <= value <= hi):
        raise ConfigError(
            f"{name} is out of range",
            where=where,
            expected=f"{lo} ≤ {name} ≤ {hi}",
            got=value,
            field=field or name,
        )


def check_choice(name: str, value: str, choices: tuple[str, ...], where: str) -> None:
    """Raise a :class:`ConfigError` naming ``name`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ConfigError(
            f"unknown {name}", where=where, expected=" | ".join(choices), got=value, field=name
        )


@dataclass(frozen=True)
class EditConfig:
    """How the edit branch's attention is controlled.

    Defaults are the paper's (§4.1): FWT and DPS on, ``λ_τ = 1``, ``λ_S = 0.9``, ``λ_SV = 1``,
    ``α_m = 0.03``. With ``use_fwt = use_dps = False`` the method is exactly P2P refine with
    ``cross_replace_steps = tau_fixed`` and ``self_replace_steps = tau_self_fixed``.

    ``calibration_steps`` K runs the calibration pass at K steps of the edit's scheduler from the
    same initial latent (None: the edit's steps, the paper's full pass); τ and ``E_k`` are
    computed from it as from a full pass. It must not exceed the edit's steps
    (:func:`check_calibration_steps`).

    ``attention_limits`` (:data:`ATTENTION_LIMITS`) says which self-attention layers are
    controlled and how widely LocalBlend max-pools its maps
    (:func:`adapedit.algorithm.geometry.self_max_queries`,
    :func:`adapedit.algorithm.geometry.blend_pool`). An engine folder is exported under one rule and
    runs only edits asking for it.
    """

    edit_type: str = "refine"
    use_fwt: bool = True
    use_dps: bool = True
    dps_mask: bool = True
    lambda_tau: float = 1.0
    lambda_s: float = 0.9
    lambda_sv: float = 1.0
    alpha_m: float = 0.03
    tau_rule: str = "paper"
    tau_fixed: float = 0.8
    tau_self_fixed: float = 0.4
    calibration: str = "mean"
    calibration_downscale: int = 2
    local_blend: tuple[str, ...] = ()
    local_blend_threshold: float = 0.3
    reweight: tuple[tuple[str, float], ...] = ()
    attention_limits: str = "scaled"
    calibration_steps: int | None = None

    def __post_init__(self) -> None:
        w = "EditConfig"
        check_choice("edit_type", self.edit_type, EDIT_TYPES, w)
        check_choice("tau_rule", self.tau_rule, TAU_RULES, w)
        check_choice("calibration", self.calibration, CALIBRATION_MODES, w)
        check_choice("attention_limits", self.attention_limits, ATTENTION_LIMITS, w)
        _check_range("lambda_tau", self.lambda_tau, 0.0, 100.0, w)
        _check_range("lambda_s", self.lambda_s, 0.0, 1.0, w)
        _check_range("lambda_sv", self.lambda_sv, 0.0, 100.0, w)
        _check_range("alpha_m", self.alpha_m, 0.0, 1.0, w)
        _check_range("tau_fixed", self.tau_fixed, 0.0, 1.0, w)
        _check_range("tau_self_fixed", self.tau_self_fixed, 0.0, 1.0, w)
        _check_range("local_blend_threshold", self.local_blend_threshold, 0.0, 1.0, w)
        if self.calibration_downscale not in (1, 2, 4, 8):
            raise ConfigError(
                "calibration_downscale must be a power of two",
                where=w,
                expected="1, 2, 4 or 8",
                got=self.calibration_downscale,
                field="calibration_downscale",
            )
        if self.calibration_steps is not None and not (
            isinstance(self.calibration_steps, int)
            and not isinstance(self.calibration_steps, bool)
            and self.calibration_steps >= 1
        ):
            raise ConfigError(
                "calibration_steps must be a positive integer (or None: the edit's steps)",
                where=w,
                expected="1 ≤ calibration_steps ≤ the edit's steps",
                got=self.calibration_steps,
                field="calibration_steps",
            )
        object.__setattr__(self, "local_blend", tuple(self.local_blend))
        object.__setattr__(self, "reweight", tuple((str(k), float(v)) for k, v in self.reweight))
        for word, factor in self.reweight:
            _check_range(f"reweight factor of {word!r}", factor, -100.0, 100.0, w, "reweight")
        if self.edit_type == "reweight" and not self.reweight:
            raise ConfigError(
                "edit_type 'reweight' needs at least one word and factor",
                where=w,
                expected="reweight=(('word', factor), ...)",
                got="none",
                field="edit_type",
            )
        if self.reweight and self.edit_type != "reweight":
            raise ConfigError(
                "reweight words are given but edit_type is not 'reweight'",
                where=w,
                expected="edit_type='reweight'",
                got=self.edit_type,
                field="reweight",
            )

    @property
    def needs_calibration(self) -> bool:
        """The calibration pass is needed for FWT's τ and for DPS's keyword embeddings."""
        return self.use_fwt or self.use_dps

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["local_blend"] = list(self.local_blend)
        d["reweight"] = {k: v for k, v in self.reweight}
        return d


@dataclass(frozen=True)
class SamplerConfig:
    """Sampler settings shared by every pass of an edit. ``height``/``width`` of ``None`` take the
    model's native resolution."""

    steps: int = 50
    guidance: float = 7.5
    scheduler: str = "ddim"
    seed: int = 0
    height: int | None = None
    width: int | None = None

    def __post_init__(self) -> None:
        w = "SamplerConfig"
        check_choice("scheduler", self.scheduler, SCHEDULERS, w)
        if not (isinstance(self.steps, int) and 1 <= self.steps <= 1000):
            raise ConfigError(
                "steps out of range",
                where=w,
                expected="1 ≤ steps ≤ 1000",
                got=self.steps,
                field="steps",
            )
        _check_range("guidance", self.guidance, 0.0, 100.0, w)
        if not (isinstance(self.seed, int) and 0 <= self.seed < 2**63):
            raise ConfigError(
                "seed must be a non-negative integer", where=w, got=self.seed, field="seed"
            )
        for name in ("height", "width"):
            v = getattr(self, name)
            if v is None:
                continue
            if not isinstance(v, int) or v <= 0 or v % 8:
                raise ConfigError(
                    f"{name} must be a positive multiple of 8",
                    where=w,
                    expected="a multiple of 8 (the VAE's factor) and of the model's own size "
                    "multiple, which the model checks (64 for SD 1.4, 32 for shapes)",
                    got=v,
                    field=name,
                )

    def resolved(self, default_size: int) -> tuple[int, int]:
        """(height, width) in pixels, falling back to the model's native size."""
        return (self.height or default_size, self.width or default_size)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_calibration_steps(edit: EditConfig, sampler: SamplerConfig) -> None:
    """The calibration pass is no longer than the edit pass.

    Raises:
        ConfigError: ``calibration_steps`` > ``steps`` (field ``calibration_steps``).
    """
    k = edit.calibration_steps
    if k is not None and k > sampler.steps:
        raise ConfigError(
            "calibration_steps exceeds the edit's steps",
            where="EditConfig and SamplerConfig",
            expected=f"1 ≤ calibration_steps ≤ steps ({sampler.steps})",
            got=k,
            field="calibration_steps",
        )


def calibration_sampler(edit: EditConfig, sampler: SamplerConfig) -> SamplerConfig:
    """The calibration pass's sampler: the edit's, at ``calibration_steps`` steps if set."""
    check_calibration_steps(edit, sampler)
    return replace(sampler, steps=edit.calibration_steps or sampler.steps)


@dataclass(frozen=True)
class Preset:
    """A named trade-off between UNet work and quality: the scheduler, its steps and the
    calibration pass's steps (None: as many as the edit's)."""

    scheduler: str
    steps: int
    calibration_steps: int | None
    description: str

    def apply(self, edit: EditConfig, sampler: SamplerConfig) -> tuple[EditConfig, SamplerConfig]:
        """``edit`` and ``sampler`` with the preset's steps, scheduler and calibration steps."""
        return (
            replace(edit, calibration_steps=self.calibration_steps),
            replace(sampler, scheduler=self.scheduler, steps=self.steps),
        )


#: ``paper``: the paper's setting. ``fast``: the cheapest setting whose success and preservation
#: on hard and on soft edits stay within the paper's 95 % intervals on the quality suite
#: (``benchmarks/quality_cost.py``; docs/benchmarks.md).
PRESETS: dict[str, Preset] = {
    "paper": Preset("ddim", 50, None, "DDIM 50 steps, a full calibration pass: 300 UNet samples"),
    "fast": Preset("dpmpp", 10, 5, "DPM-Solver++ 10 steps, calibration at 5: 50 UNet samples"),
}


def preset(name: str, where: str = "preset") -> Preset:
    """The preset called ``name``.

    Raises:
        ConfigError: an unknown name (field ``preset``).
    """
    check_choice("preset", name, tuple(PRESETS), where)
    return PRESETS[name]


@dataclass(frozen=True)
class ImageConfig:
    """How a real image is taken in (docs/algorithm.md "Editing a given image";
    docs/usage.md "Editing your own images").

    Attributes:
        inversion: ``direct`` (default: DDIM inversion, then the edit pass's source branch is
            put back on the inversion trajectory after every step), ``ddim`` (DDIM inversion
            alone) or ``npi`` (DDIM inversion, the source prompt's embedding as the source
            branch's unconditional one).
        resize: how the image is brought to the model's resolution: ``crop`` (scale to cover,
            centre crop; default), ``pad`` (scale to fit, pad with mid grey) or ``stretch``
            (scale each side on its own).
    """

    inversion: str = "direct"
    resize: str = "crop"

    def __post_init__(self) -> None:
        check_choice("inversion", self.inversion, INVERSIONS, "ImageConfig")
        check_choice("resize", self.resize, RESIZE_POLICIES, "ImageConfig")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
