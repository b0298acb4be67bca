"""The AdapEdit pipeline — plain generation, the calibration pass and the edit pass (batch
``[u_src, u_edt, c_src, c_edt]``) — over a backend, and its PyTorch reference backend on
diffusers components, against which everything else in the project is measured."""

from __future__ import annotations

import functools
import hashlib
import itertools
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from adapedit.algorithm.alignment import MAX_TOKENS, tokenize
from adapedit.algorithm.fwt import TauPlan, fixed_tau
from adapedit.algorithm.geometry import self_max_queries
from adapedit.algorithm.inversion import (
    INVERSION_SCHEDULER,
    check_model,
    check_sampler,
    ddim_inversion_step,
    inversion_schedule,
    to_epsilon,
)
from adapedit.algorithm.layout import CALIBRATION, EDIT, GENERATION, INVERSION
from adapedit.algorithm.plan import EditPlan, build_plan
from adapedit.config import (
    DEFAULT_CACHE_BYTES,
    EditConfig,
    ImageConfig,
    SamplerConfig,
    calibration_sampler,
)
from adapedit.errors import AdapEditError, ModelError
from adapedit.image_io import InputImage, fit_image, load_image
from adapedit.pipelines.calibration_cache import CalibrationCache, calibration_key
from adapedit.pipelines.controller import (
    CalibrationRecorder,
    CalibrationStats,
    Controller,
    EditController,
)
from adapedit.pipelines.models import (
    Components,
    latent_size,
    load_model,
    make_scheduler,
    torch_device,
)
from adapedit.pipelines.processors import ControlSlot, install_processors


@dataclass(frozen=True)
class Progress:
    """Where an edit is, after one more UNet step (or a stage served at once).

    Attributes:
        stage: ``inversion``, ``calibration`` or ``edit``.
        step / steps: UNet steps of this stage done, and in all.
        done / total: UNet steps of the whole edit done, and in all (a calibration served from
            the calibration cache counts as done at once).
    """

    stage: str
    step: int
    steps: int
    done: int
    total: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: Called with each :class:`Progress` of an edit, on the thread that runs it.
ProgressCallback = Callable[[Progress], None]
#: Called after each UNet step of a pass with the number of steps done.
StepCallback = Callable[[int], None]


class _Tracker:
    """Turns the steps of each stage of one edit into :class:`Progress` for ``callback``."""

    def __init__(self, callback: ProgressCallback, stages: dict[str, int]) -> None:
        self.callback, self.stages = callback, {k: v for k, v in stages.items() if v}
        self.total = sum(self.stages.values())
        starts = [0, *itertools.accumulate(self.stages.values())][:-1]
        self.before = dict(zip(self.stages, starts, strict=True))

    def stage(self, name: str) -> StepCallback:
        """The step callback of stage ``name``."""
        steps = self.stages[name]

        def on_step(step: int) -> None:
            self.callback(Progress(name, step, steps, self.before[name] + step, self.total))

        return on_step


@dataclass
class GenerationResult:
    """A plain generation: the image [H, W, 3] uint8 and, if asked, the latents after each
    step."""

    image: np.ndarray
    latents: list[torch.Tensor] = field(default_factory=list)


@dataclass
class EditResult:
    """The outcome of one edit.

    Attributes:
        source_image / edited_image: [H, W, 3] uint8.
        tau: the temporal plan (τ per word of the edit prompt, τ_self).
        sampler: the sampler that ran, its height and width resolved (the model's size where
            the request gave none).
        attention_maps: [n, h, w] mean edit-branch cross-attention of the edit prompt's tokens
            1…n (start token excluded, end token included), labelled by ``attention_labels``.
        timings: seconds per stage (``text``, ``calibration``, ``edit``, ``decode``, ``total``).
        latents: [2, C, h, w] (source, edit) after each step, if asked.
        layer_probs: per controlled layer, the probabilities [B*H, P, K] leaving the controller
            at the edit pass's step ``observe_step``, if asked (per-layer parity).
        image: for an edit of a given image, how it was read and resized and which inversion
            ran (``result.json``'s ``image``); None for a generated source.
        input_image: the given image at the model's resolution, [H, W, 3] uint8 (or None).
        trajectory: the inversion's latents [N + 1, 4, h, w] (``z0`` first, then ``z*_{t_1}``
            … ``z*_{t_N}``; the edit starts from the last), or None.
        calibration: ``computed`` (the pass ran), ``cached`` (its statistics came from the
            calibration cache) or ``off`` (neither FWT nor DPS: no pass).
        dps_weight: DPS's pixel weight ``S`` [h, w] at the last edit step, averaged over the
            LocalBlend-resolution layers (None without DPS).
    """

    source_image: np.ndarray
    edited_image: np.ndarray
    plan: EditPlan
    tau: TauPlan
    sampler: SamplerConfig
    attention_maps: torch.Tensor
    attention_labels: list[str]
    timings: dict[str, float]
    latents: list[torch.Tensor] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    layer_probs: dict[str, torch.Tensor] = field(default_factory=dict)
    image: dict[str, Any] | None = None
    input_image: np.ndarray | None = None
    trajectory: torch.Tensor | None = None
    calibration: str = "computed"
    dps_weight: torch.Tensor | None = None

    @property
    def keywords(self) -> list[str]:
        return self.plan.keyword_words

    def to_json(self, model: str) -> dict[str, Any]:
        """The ``result.json`` document (with ``image`` for an edit of a given image)."""
        doc = {
            "source": self.plan.source.text,
            "target": self.plan.target.text,
            "model": model,
            "tau": [
                {"word": w.word, "tokens": list(w.tokens), "tau": w.tau} for w in self.tau.words
            ],
            "tau_self": self.tau.tau_self,
            "tau_default": self.tau.tau_default,
            "keywords": self.keywords,
            "config": {"edit": self.plan.config.to_dict(), "sampler": self.sampler.to_dict()},
            "timings_s": self.timings,
            "calibration": self.calibration,
            "notes": self.notes,
        }
        if self.image is not None:
            doc["image"] = self.image
        return doc


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """A decoded image [3, H, W] in [-1, 1] → [H, W, 3] uint8."""
    img = ((image.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return img.permute(1, 2, 0).cpu().numpy()


def from_uint8(image: np.ndarray) -> torch.Tensor:
    """An image [H, W, 3] uint8 → [1, 3, H, W] float32 in [-1, 1] (the VAE encoder's input)."""
    x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float()  # [3, H, W]
    return (x / 127.5 - 1.0)[None]


class _Observer:
    """Wraps an :class:`EditController`, keeping the probabilities it returns at one step."""

    def __init__(self, inner: EditController, step: int) -> None:
        self.inner, self.step, self.layout = inner, step, inner.layout
        self.probs: dict[str, torch.Tensor] = {}

    def __call__(
        self,
        layer_id: str,
        is_cross: bool,
        probs: torch.Tensor,
        hidden: torch.Tensor | None,
        step: int,
    ) -> torch.Tensor:
        out = self.inner(layer_id, is_cross, probs, hidden, step)
        if step == self.step:
            self.probs[layer_id] = out.detach().float().cpu().clone()
        return out

    def after_step(self, step: int, latents: torch.Tensor) -> torch.Tensor:
        return self.inner.after_step(step, latents)


class EditPipeline(ABC):
    """The AdapEdit algorithm over a backend: plain generation, the calibration pass and the
    edit pass. Backends provide text encoding, one UNet call (with the controller applied at the
    controlled attention layers) and VAE decoding; everything else is shared, so the reference
    and the runtime run the same sampling loop, the same controllers and the same bookkeeping.
    """

    #: The model's name (built-in, folder or engine folder).
    name: str
    tokenizer: Any
    scheduler_config: dict[str, Any]
    device: torch.device
    #: dtype of the latents between scheduler steps
    dtype: torch.dtype
    vae_scale_factor: int
    size_multiple: int
    default_size: int
    latent_channels: int
    #: recent calibration passes' statistics (None: every edit calibrates)
    calibration_cache: CalibrationCache | None = None

    def _clock(self) -> float:
        """Now, once the device has done the work queued so far: on a GPU the stage timings of
        an edit count the work, not its queueing (a handful of waits per edit, at the stages'
        ends, none between its steps)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    @property
    @abstractmethod
    def model_identity(self) -> str:
        """A digest of what this backend computes with (model or engine folder, dtype,
        device): the calibration cache's entries of another model never match."""

    def use_calibration_cache(
        self, cache: CalibrationCache | int | None = DEFAULT_CACHE_BYTES
    ) -> None:
        """Keep recent calibration statistics: ``cache`` is a :class:`CalibrationCache` (to
        share one between backends), a bound in bytes for a new one, or None for none.

        Raises:
            ConfigError: a bound that is not a positive byte count.
        """
        if cache is None or isinstance(cache, CalibrationCache):
            self.calibration_cache = cache
        else:
            self.calibration_cache = CalibrationCache(cache)

    @abstractmethod
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings [n, 77, D] (prompts already validated for length)."""

    @abstractmethod
    def unet(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        embeddings: torch.Tensor,
        controller: Controller | None,
        step: int,
    ) -> torch.Tensor:
        """One UNet call, the ``step``-th of its pass: noise prediction [B, 4, h, w] for latents
        ``x`` at timestep ``t`` (a 0-dim tensor on :attr:`device`, put there once per pass so
        that no step copies from the host), with ``controller`` at the controlled layers."""

    @abstractmethod
    def decode_one(self, latent: torch.Tensor) -> torch.Tensor:
        """VAE-decode one latent [1, 4, h, w] → image [3, H, W] in [-1, 1]."""

    @abstractmethod
    def prepare(
        self, edit: EditConfig, latent_hw: tuple[int, int], batches: tuple[int, ...]
    ) -> None:
        """Before any UNet call: fix which layers are controlled (where the backend can choose)
        and check the resolution and the UNet batch sizes the passes will run against what the
        backend was built for."""

    @staticmethod
    def edit_batches(edit: EditConfig, *, image: bool = False) -> tuple[int, ...]:
        """The UNet batch sizes of an edit: the edit pass, the calibration pass if it runs, and
        the inversion for an edit of a given image."""
        passes = (CALIBRATION.size, EDIT.size) if edit.needs_calibration else (EDIT.size,)
        return (INVERSION.size, *passes) if image else passes

    @abstractmethod
    def check_image_encoder(self) -> None:
        """Before an edit of a given image, with no model work: the backend can encode images.

        Raises:
            AdapEditError: the model or engine folder has no VAE encoder.
        """

    @abstractmethod
    def encode_image_one(self, image: torch.Tensor) -> torch.Tensor:
        """VAE-encode one image [1, 3, H, W] in [-1, 1] → latent [1, 4, h, w] (the posterior
        mean times the scaling factor, the sampler's scale)."""

    # -- building blocks ---------------------------------------------------------------------

    def latent_hw(self, sampler: SamplerConfig) -> tuple[int, int]:
        """Validated latent size for the sampler's resolution."""
        h, w = sampler.resolved(self.default_size)
        return latent_size(h, w, self.size_multiple, self.vae_scale_factor, self.name)

    def tokens(self, prompts: list[str]) -> torch.Tensor:
        """Padded token ids [n, 77] (int64)."""
        return self.tokenizer(
            prompts,
            padding="max_length",
            max_length=MAX_TOKENS,
            truncation=True,
            return_tensors="pt",
        ).input_ids

    def initial_latent(self, sampler: SamplerConfig) -> torch.Tensor:
        """The seed's initial latent [1, 4, h, w] (drawn on the CPU, so any device agrees)."""
        h, w = self.latent_hw(sampler)
        gen = torch.Generator().manual_seed(sampler.seed)
        x = torch.randn((1, self.latent_channels, h, w), generator=gen)
        return x.to(self.device, self.dtype)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list[np.ndarray]:
        """VAE-decode latents [B, 4, h, w] to uint8 images [H, W, 3], one sample at a time (so
        an image does not depend on what else is in the batch)."""
        return [to_uint8(self.decode_one(z)) for z in latents.split(1)]

    @torch.no_grad()
    def denoise(
        self,
        latents: torch.Tensor,
        embeddings: torch.Tensor,
        sampler: SamplerConfig,
        controller=None,
        *,
        desc: str = "denoise",
        progress: bool = False,
        record: list[torch.Tensor] | None = None,
        start: int = 0,
        noise: torch.Tensor | None = None,
        on_step: StepCallback | None = None,
    ) -> torch.Tensor:
        """The CFG sampling loop. ``latents`` [B, 4, h, w]; ``embeddings`` [2B, 77, D] laid out
        ``[uncond…, cond…]`` (a guided :class:`~adapedit.algorithm.layout.BatchLayout`). The
        controller
        sees every controlled attention layer, with the index of the UNet call in the pass;
        ``on_step`` is called after each step with the number of steps done.

        With ``start > 0`` (SDEdit) ``latents`` are clean: they are noised with ``noise`` to
        the ``start``-th timestep and denoised from there.

        Raises:
            AdapEditError: the controller's layout does not fit the batch.
        """
        if controller is not None and controller.layout.size != embeddings.shape[0]:
            raise AdapEditError(
                "the controller's batch layout does not fit the batch",
                where=f"{desc} pass",
                expected=f"{controller.layout.size} samples {controller.layout.branches}",
                got=f"{embeddings.shape[0]} samples",
            )
        scheduler = make_scheduler(sampler.scheduler, self.scheduler_config)
        scheduler.set_timesteps(sampler.steps)
        timesteps = scheduler.timesteps[start:]
        on_device = self.to_device(timesteps)  # the UNet's copy; the scheduler keeps its own
        if start == 0:
            latents = latents * scheduler.init_noise_sigma
        else:
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(start)
            latents = scheduler.add_noise(latents, noise, timesteps[:1])
        for step, t in enumerate(tqdm(timesteps, desc=desc, disable=not progress, leave=False)):
            x_in = scheduler.scale_model_input(torch.cat([latents, latents]), t)
            eps = self.unet(x_in, on_device[step], embeddings, controller, step).to(latents.dtype)
            eps_u, eps_c = eps.chunk(2)
            eps = eps_u + sampler.guidance * (eps_c - eps_u)
            latents = scheduler.step(eps, t, latents).prev_sample
            if controller is not None:
                latents = controller.after_step(step, latents)
            if record is not None:  # kept on the device: no wait between steps
                record.append(latents.detach().clone())
            if on_step is not None:
                on_step(step + 1)
        if record:  # to the host in one copy, once the pass is done
            record[:] = torch.stack(record).cpu().unbind()
        return latents

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        """A small host tensor (timesteps, indices) on :attr:`device`, copied once, before a
        loop: on a GPU from pinned memory, asynchronously, so the host does not wait."""
        if self.device.type != "cuda":
            return x.to(self.device)
        return x.pin_memory().to(self.device, non_blocking=True)

    def num_steps(self, sampler: SamplerConfig) -> int:
        """UNet calls per pass (``steps`` for DDIM, ``steps + 1`` for PNDM's PLMS warm-up)."""
        scheduler = make_scheduler(sampler.scheduler, self.scheduler_config)
        scheduler.set_timesteps(sampler.steps)
        return len(scheduler.timesteps)

    @torch.no_grad()
    def invert(
        self,
        z0: torch.Tensor,
        cond: torch.Tensor,
        sampler: SamplerConfig,
        *,
        progress: bool = False,
        on_step: StepCallback | None = None,
    ) -> torch.Tensor:
        """DDIM inversion (:mod:`adapedit.algorithm.inversion`) of a clean latent ``z0`` [1, 4, h,
        w] with
        the text embedding ``cond`` [1, 77, D] at guidance 1, over the DDIM timesteps of
        ``sampler``: one UNet call per step at batch 1
        (:data:`~adapedit.algorithm.layout.INVERSION`).

        Returns:
            The trajectory [N + 1, 4, h, w]: ``z0``, ``z*_{t_1}``, …, ``z*_{t_N}``.
        """
        scheduler = make_scheduler(INVERSION_SCHEDULER, self.scheduler_config)
        scheduler.set_timesteps(sampler.steps)
        timesteps, alphas = inversion_schedule(scheduler)  # [N + 1] each
        # on the device before the loop: a host ᾱ moved there each step would make it wait
        on_device, alphas = self.to_device(timesteps), self.to_device(alphas)
        kind = scheduler.config.prediction_type
        emb = INVERSION.stack(None, {"source": cond})  # [1, 77, D]
        z, out = z0, [z0]
        for i in tqdm(range(len(timesteps) - 1), desc="invert", disable=not progress, leave=False):
            output = self.unet(z, on_device[i], emb, None, i).to(z.dtype)
            eps = to_epsilon(output, z, alphas[i], kind)  # ε_θ(z_{t_i}, t_i, c)
            z = ddim_inversion_step(z, eps, alphas[i], alphas[i + 1])  # z_{t_{i+1}}
            out.append(z)
            if on_step is not None:
                on_step(i + 1)
        return torch.cat(out)

    # -- public API --------------------------------------------------------------------------

    def generate(
        self,
        prompt: str,
        sampler: SamplerConfig = SamplerConfig(),
        *,
        record_latents: bool = False,
        progress: bool = False,
    ) -> GenerationResult:
        """Plain text-to-image generation of ``prompt`` (batch ``[u, c]``)."""
        tokenize(self.tokenizer, prompt)  # validates the length first
        x0 = self.initial_latent(sampler)
        uncond, cond = self.encode(["", prompt]).split(1)
        emb = GENERATION.stack(uncond, {"source": cond})
        record: list[torch.Tensor] | None = [] if record_latents else None
        self.prepare(EditConfig(), tuple(x0.shape[-2:]), (GENERATION.size,))
        latents = self.denoise(x0, emb, sampler, desc="generate", progress=progress, record=record)
        return GenerationResult(self.decode(latents)[0], record or [])

    def plan(self, source: str, target: str, edit: EditConfig = EditConfig()) -> EditPlan:
        """Validate and align the prompts (raises before any model work)."""
        return build_plan(self.tokenizer, source, target, edit)

    def edit(
        self,
        source: str,
        target: str,
        edit: EditConfig = EditConfig(),
        sampler: SamplerConfig = SamplerConfig(),
        *,
        image: str | Path | bytes | np.ndarray | InputImage | None = None,
        image_config: ImageConfig = ImageConfig(),
        record_latents: bool = False,
        progress: bool = False,
        observe_step: int | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> EditResult:
        """Edit ``source`` into ``target``: calibration pass (if FWT or DPS is on), then the
        edit pass; returns both images, τ, attention maps and stage timings (and, if asked, the
        latents after every step and the per-layer probabilities at one step).

        With ``image`` (a path, encoded PNG/JPEG/WebP bytes, a uint8 array [H, W, 3]; see
        :mod:`adapedit.image_io`) the source is that image, which ``source`` describes: it is
        brought to the sampler's resolution by ``image_config.resize``, VAE-encoded and
        DDIM-inverted (N conditional UNet calls at batch 1), and both passes start from the
        inverted latent; ``image_config.inversion`` says how the source branch keeps to the
        image (:class:`~adapedit.config.ImageConfig`). DDIM only. Every check on the image and
        the backend's VAE encoder is made before any model work.

        ``on_progress`` is called with a :class:`Progress` after each UNet step (inversion,
        calibration, edit), on this thread.
        """
        t_start = self._clock()
        plan = self.plan(source, target, edit)
        calib_sampler = calibration_sampler(edit, sampler)
        x0 = self.initial_latent(sampler)  # validates the resolution
        latent_hw = tuple(x0.shape[-2:])
        pixels = image_record = None
        if image is not None:
            check_sampler(sampler)
            check_model(self.scheduler_config, self.name)
            height, width = sampler.resolved(self.default_size)
            pixels, fitted = fit_image(load_image(image), height, width, image_config.resize)
            self.check_image_encoder()
            image_record = {"inversion": image_config.inversion, **fitted}
        self.prepare(edit, latent_hw, self.edit_batches(edit, image=image is not None))
        n = self.num_steps(sampler)
        stages = {
            "inversion": n if image is not None else 0,  # DDIM: one call per step
            "calibration": self.num_steps(calib_sampler) if edit.needs_calibration else 0,
            "edit": n,
        }
        track = _Tracker(on_progress, stages).stage if on_progress is not None else None
        timings: dict[str, float] = {}
        notes: list[str] = []

        t = self._clock()
        uncond, c_src, c_edt = self.encode(["", source, target]).split(1)
        timings["text"] = self._clock() - t

        trajectory = None
        if pixels is not None:
            t = self._clock()
            z0 = self.encode_image_one(from_uint8(pixels).to(self.device)).to(self.dtype)
            trajectory = self.invert(  # [N + 1, 4, h, w]
                z0, c_src, sampler, progress=progress, on_step=track and track("inversion")
            )
            x0 = trajectory[-1:]
            timings["inversion"] = self._clock() - t

        t = self._clock()
        keys = None
        calibration = "off"
        if edit.needs_calibration:
            stats, calibration = self.calibrate(
                x0,
                uncond,
                c_edt,
                target,
                edit,
                calib_sampler,
                progress=progress,
                on_step=track and track("calibration"),
            )
            tau, keys = stats.finish(plan, edit)
        else:
            tau = fixed_tau(plan, edit, "FWT off")
        if tau.fallback:
            notes.append(f"fixed τ = {edit.tau_fixed}: {tau.fallback}")
        if edit.use_dps and keys is None:
            notes.append("DPS off: no keyword to compute E_k from")
        timings["calibration"] = self._clock() - t

        t = self._clock()
        inversion = image_config.inversion if trajectory is not None else None
        editor = EditController(
            plan,
            tau,
            keys,
            n,
            latent_hw,
            trajectory=trajectory if inversion == "direct" else None,
            steps=sampler.steps,
        )
        controller = editor if observe_step is None else _Observer(editor, observe_step)
        record: list[torch.Tensor] | None = [] if record_latents else None
        own_uncond = {"source": c_src} if inversion == "npi" else None
        latents = self.denoise(
            torch.cat([x0, x0]),
            EDIT.stack(uncond, {"source": c_src, "edit": c_edt}, own_uncond),
            sampler,
            controller,
            desc="edit",
            progress=progress,
            record=record,
            on_step=track and track("edit"),
        )
        timings["edit"] = self._clock() - t

        t = self._clock()
        images = self.decode(latents)
        src_img, edt_img = (images[EDIT.latent_index(p)] for p in ("source", "edit"))
        end = self._clock()
        timings["decode"], timings["total"] = end - t, end - t_start

        n_tok = plan.target.length - 1  # tokens 1 … end
        maps = editor.attention_maps()[1 : n_tok + 1].cpu()
        labels = [self.tokenizer.decode([i]) for i in plan.target.ids[1 : n_tok + 1]]
        h, w = sampler.resolved(self.default_size)
        return EditResult(
            src_img,
            edt_img,
            plan,
            tau,
            replace(sampler, height=h, width=w),  # what ran: the model's size where none given
            maps,
            labels,
            timings,
            record or [],
            notes,
            controller.probs if observe_step is not None else {},
            image_record,
            pixels,
            None if trajectory is None else trajectory.cpu(),  # on the host, as the latents
            calibration,
            None if (s := editor.dps_weight()) is None else s.cpu(),
        )

    def calibrate(
        self,
        x0: torch.Tensor,
        uncond: torch.Tensor,
        c_edt: torch.Tensor,
        target: str,
        edit: EditConfig,
        sampler: SamplerConfig,
        *,
        progress: bool = False,
        on_step: StepCallback | None = None,
    ) -> tuple[CalibrationStats, str]:
        """The calibration pass (:data:`~adapedit.algorithm.layout.CALIBRATION`, ``[u_edt, c_edt]``)
        of
        ``target`` from ``x0`` [1, 4, h, w] under ``sampler`` (at the calibration steps), or its
        statistics from the calibration cache (``on_step`` then hears of every step at once).

        Returns:
            The statistics and ``computed`` or ``cached``.
        """
        key = None
        steps = self.num_steps(sampler)
        if self.calibration_cache is not None:
            key = calibration_key(self.model_identity, target, x0, edit, sampler)
            stats = self.calibration_cache.get(key)
            if stats is not None:
                if on_step is not None:
                    on_step(steps)
                return stats, "cached"
        recorder = CalibrationRecorder(tuple(x0.shape[-2:]), steps, edit)
        self.denoise(
            x0,
            CALIBRATION.stack(uncond, {"edit": c_edt}),
            sampler,
            recorder,
            desc="calibration",
            progress=progress,
            on_step=on_step,
        )
        stats = recorder.stats()
        if key is not None:
            self.calibration_cache.put(key, stats)
        return stats, "computed"


class ReferencePipeline(EditPipeline):
    """AdapEdit on diffusers modules with explicit attention in the controlled layers.

    Latents and the scheduler's arithmetic are fp32 whatever the modules' dtype
    (:attr:`model_dtype`), as in the runtime: an fp16 reference and an fp16 engine differ by
    their UNets alone (fp16 scheduler steps would drift by ~1e-2 over a pass by themselves)."""

    def __init__(
        self,
        components: Components,
        device: str | torch.device = "cpu",
        *,
        calibration_cache: CalibrationCache | int | None = DEFAULT_CACHE_BYTES,
    ) -> None:
        self.use_calibration_cache(calibration_cache)
        self.device = torch_device(device, where="ReferencePipeline")
        self.components = components.to(self.device)
        self.name = components.name
        self.tokenizer = components.tokenizer
        self.scheduler_config = components.scheduler_config
        # latents and scheduler in fp32, as the runtime keeps them; the models take their dtype
        self.dtype = torch.float32
        self.model_dtype = next(components.unet.parameters()).dtype
        self.vae_scale_factor = components.vae_scale_factor
        self.size_multiple = components.size_multiple
        self.default_size = components.default_size
        self.latent_channels = int(components.unet.config.in_channels)
        self.slot = ControlSlot()
        install_processors(components.unet, self.slot)

    @classmethod
    def from_model(
        cls, spec: str, device: str | torch.device = "cpu", **kwargs: Any
    ) -> ReferencePipeline:
        """Build from a built-in model name or a local diffusers folder (``device`` checked
        before the model loads)."""
        device = torch_device(device, where="ReferencePipeline")
        return cls(load_model(spec), device, **kwargs)

    @functools.cached_property
    def model_identity(self) -> str:
        """The model's name, architecture hash, dtype and device, and a fingerprint of every
        weight tensor of the three models (its shape and first values)."""
        h = hashlib.sha256(
            f"reference:{self.name}:{self.components.config_hash()}:{self.model_dtype}:{self.device}".encode()
        )
        c = self.components
        for module in (c.unet, c.text_encoder, c.vae):
            for name, p in module.state_dict().items():
                head = p.detach().reshape(-1)[:16].float().cpu().numpy().tobytes()
                h.update(f"{name}{tuple(p.shape)}".encode() + head)
        return h.hexdigest()

    def prepare(
        self, edit: EditConfig, latent_hw: tuple[int, int], batches: tuple[int, ...]
    ) -> None:
        self.slot.self_max_queries = self_max_queries(edit.attention_limits, latent_hw)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokens(prompts).to(self.device)
        return self.components.text_encoder(ids)[0].to(self.dtype)

    @torch.no_grad()
    def unet(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        embeddings: torch.Tensor,
        controller: Controller | None,
        step: int,
    ) -> torch.Tensor:
        self.slot.controller, self.slot.step = controller, step
        try:
            eps = self.components.unet(
                x.to(self.model_dtype),
                t,
                encoder_hidden_states=embeddings.to(self.model_dtype),
            ).sample
            return eps.to(self.dtype)
        finally:
            self.slot.controller, self.slot.step = None, 0

    @torch.no_grad()
    def decode_one(self, latent: torch.Tensor) -> torch.Tensor:
        vae = self.components.vae
        return vae.decode((latent / vae.config.scaling_factor).to(self.model_dtype)).sample[0]

    def check_image_encoder(self) -> None:
        if not self.components.has_vae_encoder:
            raise ModelError(
                "the model's VAE has no encoder, so it cannot edit a given image",
                where=f"model {self.name}: vae/",
                expected="VAE weights with the encoder (encoder.*, quant_conv.*)",
                got="a decoder-only VAE",
            )

    @torch.no_grad()
    def encode_image_one(self, image: torch.Tensor) -> torch.Tensor:
        vae = self.components.vae
        x = image.to(self.device, self.model_dtype)
        return (vae.encode(x).latent_dist.mean * vae.config.scaling_factor).to(self.dtype)
