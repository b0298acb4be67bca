"""The public runtime API: a session loaded once from an engine folder, called many times."""

from __future__ import annotations

import functools
import hashlib
import json
import threading
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from adapedit.algorithm.geometry import is_controlled_by_rule, is_cross_layer, self_max_queries
from adapedit.config import DEFAULT_CACHE_BYTES, EditConfig, SamplerConfig
from adapedit.engines.base import Runner, require_cuda
from adapedit.engines.folder import load_engine_folder, make_runner
from adapedit.engines.ort import OrtOptions, check_attention_for_providers, check_providers
from adapedit.engines.weights import WeightPool
from adapedit.errors import EngineError, ManifestError
from adapedit.pipelines.calibration_cache import CalibrationCache
from adapedit.pipelines.controller import Controller
from adapedit.pipelines.models import load_tokenizer
from adapedit.pipelines.pipeline import EditPipeline, EditResult, GenerationResult
from adapedit.runtime.fused import FusedUNet
from adapedit.runtime.segmented import SegmentedUNet
from adapedit.spec import GraphSpec

ENGINE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


class EditSession(EditPipeline):
    """AdapEdit from an engine folder: text encoder, UNet and VAE decoder engines; the VAE
    encoder engine, created by the first edit of a given image.

    The UNet runs fused (the edit inside the graph: one engine call per step, replayed as a
    CUDA graph on the GPU) where the folder has the fused form, else segmented (the controller
    from ``adapedit`` applied between engine segments; any Python controller works there).
    Build once, call :meth:`edit` many times; calls from several threads are serialised (one
    edit at a time per session), so engine buffers are never shared between two edits. On a
    GPU every engine and every torch operation of an edit runs on one stream of the session's,
    and ONNX Runtime sessions share one copy of the UNet weights.

    Args:
        engine_dir: a folder written by ``adapedit build``.
        ort: override the ONNX Runtime options recorded at build time (providers, threads).
        model_hash / precision: refuse a folder of another model or precision.
        form: ``auto`` (fused where available), ``fused`` or ``segmented``.
        cuda_graphs: on a GPU, replay each fused UNet call as a CUDA graph (off: plain runs, to
            compare or to diagnose).
        calibration_cache: keep recent calibration statistics, so that a re-edit of the same
            target changing only edit-side options skips the calibration pass: a bound in bytes,
            a :class:`~adapedit.pipelines.calibration_cache.CalibrationCache` to share, or None.
        checks_only: a session that checks requests against the folder (its manifest,
            tokenizer and profile: :meth:`plan`, :meth:`describe`,
            :class:`~adapedit.runtime.api.Validator`) and runs nothing, so it touches no device:
            the HTTP ingress of a Ray Serve deployment, on a node with no GPU. No provider is
            checked, no stream or weights are made, and :meth:`edit` is an error.
    """

    def __init__(
        self,
        engine_dir: str | Path,
        *,
        ort: OrtOptions | None = None,
        model_hash: str | None = None,
        precision: str | None = None,
        form: str = "auto",
        cuda_graphs: bool = True,
        calibration_cache: CalibrationCache | int | None = DEFAULT_CACHE_BYTES,
        checks_only: bool = False,
    ) -> None:
        self.use_calibration_cache(calibration_cache)  # a bad bound fails before any loading
        folder = Path(engine_dir)
        manifest, config = load_engine_folder(folder, model_hash=model_hash, precision=precision)
        has = {"fused": manifest.has_fused, "segmented": manifest.has_segments}
        if form not in ("auto", *has) or not (
            has.get(form) or (form == "auto" and any(has.values()))
        ):
            raise EngineError(
                "the engine folder has no UNet of this form",
                where=str(folder),
                expected=" | ".join(["auto", *(k for k, v in has.items() if v)]),
                got=form,
                field="form",
            )
        self.form, self.cuda_graphs = form, cuda_graphs
        self.folder, self.manifest, self.config = folder, manifest, config
        self.name = f"{manifest.model} ({folder})"
        self.tokenizer = load_tokenizer(folder / "tokenizer")
        self.scheduler_config = json.loads((folder / "scheduler_config.json").read_text())
        self.vae_scale_factor = manifest.vae_scale_factor
        self.size_multiple = manifest.size_multiple
        self.default_size = manifest.height
        self.latent_channels = manifest.latent_channels
        self.dtype = torch.float32  # latents and scheduler in fp32; engines take their dtype
        self.engine_dtype = ENGINE_DTYPES[manifest.precision]
        self.ort, self.checks_only = ort, checks_only
        options = ort or config.ort
        if not checks_only:  # before any engine is made: no silent CPU run
            if config.backend == "ort":
                check_attention_for_providers(manifest.attention_op, options, str(folder))
                check_providers(options, f"engine folder {folder}")
            else:
                require_cuda("a TensorRT engine folder", str(folder), "an NVIDIA GPU")
        self.device = options.device if config.backend == "ort" else torch.device("cuda")
        runs = self.device.type == "cuda" and not checks_only
        self.stream = torch.cuda.Stream(self.device) if runs else None
        self.weights = (
            WeightPool(folder, manifest.weights, self.device)
            if config.backend == "ort" and manifest.weights and not checks_only
            else None
        )
        self.text_encoder = self._runner(manifest.graphs["text_encoder"])
        self.vae_decoder = self._runner(manifest.graphs["vae_decoder"])
        self.vae_encoder: Runner | None = None  # created by the first edit of an image
        self._unets: dict[int | None, SegmentedUNet] = {}
        self._fused: dict[int, FusedUNet] = {}
        self._lock = threading.RLock()

    @functools.cached_property
    def model_identity(self) -> str:
        """A digest of the engine folder (its manifest, and every file's path, size and
        modification time), the UNet form, backend and device."""
        h = hashlib.sha256((self.folder / "manifest.json").read_bytes())
        h.update(
            f"{self.folder.resolve()}:{self.form}:{self.config.backend}:{self.device}".encode()
        )
        for f in sorted(p for p in self.folder.rglob("*") if p.is_file()):
            st = f.stat()
            h.update(f"{f.relative_to(self.folder)}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()

    def describe(self) -> dict[str, Any]:
        """The engines in plain values: ``model``, ``backend`` (``ort`` | ``trt``), ``form``
        (the UNet that runs: ``fused`` or ``segmented``), ``precision``, ``shapes`` (``static``
        | ``dynamic``), ``attention_limits`` (the rule its edits must ask for), ``device`` and
        the model's ``height`` and ``width``."""
        m = self.manifest
        form = self.form if self.form != "auto" else ("fused" if m.has_fused else "segmented")
        return {
            "model": m.model,
            "backend": self.config.backend,
            "form": form,
            "precision": m.precision,
            "shapes": m.shapes,
            "attention_limits": m.attention_limits,
            "device": str(self.device),
            "height": m.height,
            "width": m.width,
        }

    def _runner(self, spec: GraphSpec, *, cuda_graph: bool = False) -> Runner:
        return make_runner(
            self.folder,
            self.config,
            spec,
            self.ort,
            stream=self.stream,
            weights=self.weights,
            cuda_graph=cuda_graph,
        )

    def fused(self, batch: int) -> FusedUNet | None:
        """The fused UNet that runs ``batch`` samples, if the folder has one (runner created on
        first use, a CUDA graph on the GPU)."""
        graphs = self.manifest.unet_graphs(batch)
        if graphs.fused is None or self.form == "segmented":
            return None
        unet = self._fused.get(batch)
        if unet is None:
            runner = self._runner(graphs.fused, cuda_graph=self.cuda_graphs)
            unet = self._fused[batch] = FusedUNet(self.manifest, graphs, runner, self.device)
        return unet

    def segmented(self, batch: int) -> SegmentedUNet:
        """The segmented UNet that runs ``batch`` samples (runners created on first use).

        Raises:
            EngineError: a static folder built for other batch sizes.
        """
        graphs = self.manifest.unet_graphs(batch)
        if not graphs.segments:
            raise EngineError(
                "the engine folder has no segmented UNet for this batch",
                where=str(self.folder),
                expected="an export with --form segmented",
                got=f"forms of batch {batch}: fused only",
            )
        unet = self._unets.get(graphs.batch)
        if unet is None:
            runners = [self._runner(s) for s in graphs.segments]
            unet = self._unets[graphs.batch] = SegmentedUNet(self.manifest, graphs, runners)
        return unet

    @property
    def runners(self) -> list[Runner]:
        return [
            self.text_encoder,
            self.vae_decoder,
            *([self.vae_encoder] if self.vae_encoder is not None else []),
            *(r for u in self._unets.values() for r in u.runners),
            *(u.runner for u in self._fused.values()),
        ]

    def controller_seconds(self) -> float:
        """Time spent in the controller since the last :meth:`reset_clocks`: between segments,
        and around each fused call (its inputs in, the maps the controllers keep out)."""
        unets = (*self._unets.values(), *self._fused.values())
        return sum(u.clock.seconds() for u in unets)

    def reset_clocks(self) -> None:
        for u in (*self._unets.values(), *self._fused.values()):
            u.clock.reset()

    def close(self) -> None:
        """Release every engine (the session can be used again; engines reload lazily), once
        the edit in progress, if any, is done."""
        with self._lock:
            for r in self.runners:
                r.deactivate()

    def __enter__(self) -> EditSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- backend hooks -----------------------------------------------------------------------
    def prepare(
        self, edit: EditConfig, latent_hw: tuple[int, int], batches: tuple[int, ...]
    ) -> None:
        h, w = (x * self.vae_scale_factor for x in latent_hw)
        where = f"engine folder {self.folder}"
        for b in batches:
            self.manifest.unet_graphs(b)  # a static folder has each batch, or says which it has
            self.config.profile.check(b, h, w, where=where)
        rule = self.manifest.attention_limits
        if edit.attention_limits != rule:
            raise EngineError(
                "the engines were exported under another attention rule",
                where=where,
                expected=f"attention_limits {rule!r} (the folder's)",
                got=f"attention_limits {edit.attention_limits!r} (the edit's)",
                field="attention_limits",
            )
        limit = self_max_queries(rule, latent_hw)
        m, f = self.manifest, self.vae_scale_factor
        scale = latent_hw[0] * latent_hw[1] / ((m.height // f) * (m.width // f))
        wanted = {  # the layers the rule controls at this resolution (queries scale with it)
            x
            for x, q in m.attention.items()
            if is_controlled_by_rule(is_cross_layer(x), round(q * scale), limit)
        }
        if wanted != set(m.controlled):
            raise EngineError(
                "the engines control another set of attention layers at this resolution",
                where=where,
                expected=f"the layers controlled at {m.height}×{m.width} px under {rule!r}",
                got=f"{h}×{w} px, where {rule!r} controls {len(wanted)} layers, not "
                f"{len(m.controlled)}",
                field="height",
            )

    def encode(self, prompts: list[str]) -> torch.Tensor:
        # [n, 77] on the host: ONNX Runtime binds integer inputs there, TensorRT stages them
        ids = self.tokens(prompts)
        n = self.text_encoder.spec.inputs[0].shape[0]  # a static graph's batch, or a symbol
        chunks = ids.split(n) if isinstance(n, int) else [ids]
        return torch.cat(
            [
                self.text_encoder.infer({"input_ids": c})["text_embeddings"].to(
                    self.dtype, copy=True
                )
                for c in chunks
            ]
        )

    def unet(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        embeddings: torch.Tensor,
        controller: Controller | None,
        step: int,
    ) -> torch.Tensor:
        timestep = t.reshape(1).to(torch.float32)  # on the device already: no host copy
        fused = self.fused(x.shape[0])
        use_fused = fused is not None and (
            self.form == "fused" or fused.accepts(controller) or not self._has_segments(x.shape[0])
        )
        eps = (fused if use_fused else self.segmented(x.shape[0]))(
            x.to(self.engine_dtype),
            timestep,
            embeddings.to(self.engine_dtype),
            controller,
            step,
        )
        return eps.to(self.dtype)

    def _has_segments(self, batch: int) -> bool:
        return bool(self.manifest.unet_graphs(batch).segments)

    def decode_one(self, latent: torch.Tensor) -> torch.Tensor:
        out = self.vae_decoder.infer({"latent": latent.to(self.engine_dtype)})["image"]
        return out[0].clone()

    def check_image_encoder(self) -> None:
        if "vae_encoder" not in self.manifest.graphs:
            raise ManifestError(
                "the engine folder has no VAE encoder, so it cannot edit a given image",
                where=str(self.folder),
                expected="a vae_encoder graph (exported by 'adapedit export')",
                got=f"graphs {sorted(self.manifest.graphs)}",
            )

    def encode_image_one(self, image: torch.Tensor) -> torch.Tensor:
        if self.vae_encoder is None:
            self.vae_encoder = self._runner(self.manifest.graphs["vae_encoder"])
        out = self.vae_encoder.infer({"image": image.to(self.device, self.engine_dtype)})
        return out["latent"].to(self.dtype, copy=True)

    def _check_runs(self, what: str) -> None:
        if self.checks_only:
            raise EngineError(
                "this session only checks requests: it runs no engine",
                where=str(self.folder),
                expected="EditSession(..., checks_only=False) where the engines' device is",
                got=what,
            )

    def on_stream(self):
        """The session's stream as the current one (a no-op on the CPU)."""
        return torch.cuda.stream(self.stream) if self.stream is not None else nullcontext()

    # -- thread-safe public API --------------------------------------------------------------
    def plan(self, source: str, target: str, edit: EditConfig = EditConfig()):
        """Validate and align the prompts; serialised (the tokenizer keeps per-call padding
        state, so it must not be shared by two threads at once)."""
        with self._lock:
            return super().plan(source, target, edit)

    def edit(
        self,
        source: str,
        target: str,
        edit: EditConfig = EditConfig(),
        sampler: SamplerConfig = SamplerConfig(),
        **kwargs,
    ) -> EditResult:
        """Edit ``source`` into ``target`` (see :meth:`EditPipeline.edit`); serialised."""
        self._check_runs("an edit")
        with self._lock, self.on_stream():
            return super().edit(source, target, edit, sampler, **kwargs)

    def generate(
        self, prompt: str, sampler: SamplerConfig = SamplerConfig(), **kwargs
    ) -> GenerationResult:
        """Plain generation of ``prompt``; serialised."""
        self._check_runs("a generation")
        with self._lock, self.on_stream():
            return super().generate(prompt, sampler, **kwargs)
