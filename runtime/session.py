"""The public runtime API: a session loaded once from an engine folder, called many times."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import torch

from adapedit.config import EditConfig, SamplerConfig
from adapedit.controller import Controller
from adapedit.engines.folder import load_engine_folder, make_runner
from adapedit.engines.ort import OrtOptions
from adapedit.errors import EngineError
from adapedit.models import load_tokenizer
from adapedit.pipeline import EditPipeline, EditResult, GenerationResult
from adapedit.runtime.segmented import SegmentedUNet

ENGINE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


class EditSession(EditPipeline):
    """AdapEdit from an engine folder: text encoder, segmented UNet and VAE decoder engines, the
    controller from ``adapedit`` applied between UNet segments.

    Build once, call :meth:`edit` many times; calls from several threads are serialised (one
    edit at a time per session), so engine buffers are never shared between two edits.

    Args:
        engine_dir: a folder written by ``adapedit build``.
        ort: override the ONNX Runtime options recorded at build time (providers, threads).
        model_hash / precision: refuse a folder of another model or precision.
    """

    def __init__(
        self,
        engine_dir: str | Path,
        *,
        ort: OrtOptions | None = None,
        model_hash: str | None = None,
        precision: str | None = None,
    ) -> None:
        folder = Path(engine_dir)
        manifest, config = load_engine_folder(folder, model_hash=model_hash, precision=precision)
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
        options = ort or config.ort
        self.device = options.device if config.backend == "ort" else torch.device("cuda")
        self.text_encoder = make_runner(folder, config, manifest.graphs["text_encoder"], ort)
        self.vae_decoder = make_runner(folder, config, manifest.graphs["vae_decoder"], ort)
        if not manifest.segments:
            raise EngineError(
                "the engine folder has no segmented UNet",
                where=str(folder),
                expected="an export with --form segmented or both",
                got="whole UNet only",
            )
        self.segmented = SegmentedUNet(
            manifest, [make_runner(folder, config, s, ort) for s in manifest.segments]
        )
        self._lock = threading.RLock()

    @property
    def runners(self):
        return [self.text_encoder, self.vae_decoder, *self.segmented.runners]

    def close(self) -> None:
        """Release every engine (the session can be used again; engines reload lazily)."""
        for r in self.runners:
            r.deactivate()

    def __enter__(self) -> EditSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- backend hooks -----------------------------------------------------------------------
    def prepare(self, edit: EditConfig, latent_hw: tuple[int, int]) -> None:
        h, w = (x * self.vae_scale_factor for x in latent_hw)
        self.config.profile.check(4, h, w, where=f"engine folder {self.folder}")

    def encode(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokens(prompts).to(self.device)
        out = self.text_encoder.infer({"input_ids": ids})["text_embeddings"]
        return out.to(self.dtype).clone()

    def unet(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        embeddings: torch.Tensor,
        controller: Controller | None,
        step: int,
    ) -> torch.Tensor:
        timestep = torch.tensor([float(t)], dtype=torch.float32, device=self.device)
        eps = self.segmented(
            x.to(self.engine_dtype),
            timestep,
            embeddings.to(self.engine_dtype),
            controller,
            step,
        )
        return eps.to(self.dtype)

    def decode_one(self, latent: torch.Tensor) -> torch.Tensor:
        out = self.vae_decoder.infer({"latent": latent.to(self.engine_dtype)})["image"]
        return out[0].clone()

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
        with self._lock:
            return super().edit(source, target, edit, sampler, **kwargs)

    def generate(
        self, prompt: str, sampler: SamplerConfig = SamplerConfig(), **kwargs
    ) -> GenerationResult:
        """Plain generation of ``prompt``; serialised."""
        with self._lock:
            return super().generate(prompt, sampler, **kwargs)
