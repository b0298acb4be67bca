"""Models: the built-ins — ``shapes`` (a small SD v1.x model trained on the shapes world, shipped
in ``adapedit/data/shapes``), ``tiny`` and ``sd14-random`` (random weights) — and local
diffusers folders in the layout of ``CompVis/stable-diffusion-v1-4``. Nothing is ever
downloaded.

All built-ins tokenize with the real CLIP BPE tokenizer vendored in ``adapedit/data``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from adapedit.defaults import BUILTIN_MODELS
from adapedit.errors import ConfigError, ModelError

TOKENIZER_DIR = Path(__file__).parents[1] / "data" / "clip-tokenizer"
SHAPES_DIR = Path(__file__).parents[1] / "data" / "shapes"
COMPONENTS = ("unet", "text_encoder", "vae", "tokenizer", "scheduler")

#: Stable Diffusion v1.4's scheduler configuration (shared by DDIM and PNDM).
SD_SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
}

_SD14_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
_SD14_TEXT = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}
_SD14_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
# The tiny model keeps SD's structure (4 levels, cross-attention at 3 resolutions plus the mid
# block, a 4-level VAE with factor 8) at a fraction of its width.
_TINY_UNET = {
    **_SD14_UNET,
    "sample_size": 16,
    "layers_per_block": 1,
    "block_out_channels": (32, 64, 64, 64),
    "cross_attention_dim": 32,
    "attention_head_dim": 2,
}
_TINY_TEXT = {
    **_SD14_TEXT,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "projection_dim": 32,
}
_TINY_VAE = {
    **_SD14_VAE,
    "block_out_channels": (32, 32, 32, 32),
    "layers_per_block": 1,
    "sample_size": 128,
}
#: Config keys that say where or how a model was saved, not what it is.
_VOLATILE = {"transformers_version", "architectures", "dtype", "torch_dtype"}
_BUILTIN_CONFIGS = {
    "tiny": (_TINY_UNET, _TINY_TEXT, _TINY_VAE),
    "sd14-random": (_SD14_UNET, _SD14_TEXT, _SD14_VAE),
}


def torch_device(device: str | torch.device, where: str = "device") -> torch.device:
    """``device`` as a torch device this process can use, checked before any model work.

    Raises:
        ConfigError: a name torch does not know, or a CUDA device torch cannot see.
    """
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        d = None
    if d is None or d.type not in ("cpu", "cuda"):
        raise ConfigError(
            "unknown device" if d is None else "unsupported device",
            where=where,
            expected="cpu | cuda | cuda:N",
            got=device if d is None else str(d),
            field="device",
        )
    if d.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (d.index or 0) >= count:
            raise ConfigError(
                f"device {d} is not available",
                where=where,
                expected="a CUDA build of torch and a visible GPU"
                + (f" (cuda:0 … cuda:{count - 1})" if count else ""),
                got=f"torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}, "
                f"{count} GPU(s) visible",
                field="device",
            )
    return d


@dataclass(eq=False)
class Components:
    """The parts of a Stable Diffusion v1.x model the pipelines use."""

    name: str
    unet: Any
    text_encoder: Any
    vae: Any
    tokenizer: Any
    scheduler_config: dict[str, Any]
    #: False for a folder whose VAE weights lack the encoder (such a model cannot edit images)
    has_vae_encoder: bool = True

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def default_size(self) -> int:
        """The model's native image size in pixels (512 for SD v1.4)."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def size_multiple(self) -> int:
        """Image sizes must be multiples of this (VAE factor × UNet downsampling)."""
        return self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    def latent_hw(self, height: int, width: int) -> tuple[int, int]:
        """The latent size of an image size, which must be a multiple of :attr:`size_multiple`.

        Raises:
            ConfigError: naming the dimension that does not fit.
        """
        return latent_size(height, width, self.size_multiple, self.vae_scale_factor, self.name)

    def config_hash(self) -> str:
        """A short hash of the architecture (configs of UNet, text encoder and VAE)."""
        configs = [
            dict(self.unet.config),
            self.text_encoder.config.to_dict(),
            dict(self.vae.config),
        ]
        arch = [
            {k: v for k, v in c.items() if not k.startswith("_") and k not in _VOLATILE}
            for c in configs
        ]
        blob = json.dumps(arch, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> Components:
        for m in (self.unet, self.text_encoder, self.vae):
            m.to(device) if dtype is None else m.to(device=device, dtype=dtype)
        return self

    def save(self, path: str | Path) -> None:
        """Write a diffusers-format folder that :func:`load_model` reads back."""
        path = Path(path)
        self.unet.save_pretrained(path / "unet")
        self.text_encoder.save_pretrained(path / "text_encoder")
        self.vae.save_pretrained(path / "vae")
        self.tokenizer.save_pretrained(path / "tokenizer")
        (path / "scheduler").mkdir(parents=True, exist_ok=True)
        cfg = {"_class_name": "PNDMScheduler", **self.scheduler_config}
        (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg, indent=2))


def latent_size(
    height: int, width: int, size_multiple: int, vae_scale_factor: int, model: str
) -> tuple[int, int]:
    """(h, w) of the latent for an image of ``height`` × ``width`` pixels.

    Raises:
        ConfigError: a dimension that is not a multiple of ``size_multiple``.
    """
    for name, v in (("height", height), ("width", width)):
        if v % size_multiple:
            raise ConfigError(
                f"{name} does not fit the model",
                where=f"model {model}",
                expected=f"a multiple of {size_multiple}",
                got=v,
                field=name,
            )
    return height // vae_scale_factor, width // vae_scale_factor


def load_tokenizer(path: str | Path = TOKENIZER_DIR):
    """The CLIP BPE tokenizer (the vendored copy by default)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(path))


def build_random(name: str, seed: int = 0) -> Components:
    """A built-in model with random weights, deterministic from ``seed``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet_cfg, text_cfg, vae_cfg = _BUILTIN_CONFIGS[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_cfg)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
        vae = AutoencoderKL(**vae_cfg)
    for m in (unet, text_encoder, vae):
        m.eval().requires_grad_(False)
    return Components(name, unet, text_encoder, vae, load_tokenizer(), dict(SD_SCHEDULER_CONFIG))


_MARKERS = {"tokenizer": ("vocab.json", "tokenizer.json"), "scheduler": ("scheduler_config.json",)}


def _weight_files(component: str) -> tuple[str, ...]:
    """The weight files (no variant) that ``from_pretrained`` loads ``component`` from, one of
    which it must hold, by the libraries' own names (none for the tokenizer and scheduler)."""
    if component == "text_encoder":
        from transformers.utils import (
            SAFE_WEIGHTS_INDEX_NAME,
            SAFE_WEIGHTS_NAME,
            WEIGHTS_INDEX_NAME,
            WEIGHTS_NAME,
        )

        return (SAFE_WEIGHTS_NAME, WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_INDEX_NAME)
    if component in ("unet", "vae"):  # diffusers loads no sharded .bin of these
        from diffusers.utils.constants import (
            SAFE_WEIGHTS_INDEX_NAME,
            SAFETENSORS_WEIGHTS_NAME,
            WEIGHTS_NAME,
        )

        return (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME)
    return ()


def load_folder(path: str | Path, name: str | None = None) -> Components:
    """Load a local diffusers-format Stable Diffusion v1.x folder (as float32, whatever the
    files hold; :meth:`Components.to` casts). ``name`` defaults to the path.

    Raises:
        ModelError: the folder does not exist or lacks a component.
    """
    path = Path(path)
    if not path.is_dir():
        raise ModelError(
            "model not found",
            where=str(path),
            expected=f"a built-in name ({', '.join(BUILTIN_MODELS)}) or a diffusers model folder",
            got="no such folder",
        )
    for comp in COMPONENTS:
        for what, markers in (
            (comp, _MARKERS.get(comp, ("config.json",))),
            (f"{comp} weights", _weight_files(comp)),
        ):
            if markers and not any((path / comp / m).is_file() for m in markers):
                held = path / comp if (path / comp).is_dir() else path
                raise ModelError(
                    f"model folder is missing its {what}",
                    where=str(path / comp),
                    expected=f"{comp}/{' or '.join(markers)} (diffusers layout of "
                    "CompVis/stable-diffusion-v1-4)",
                    got=f"{held.name}/ holds {sorted(p.name for p in held.iterdir())}",
                )
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(path / "unet", low_cpu_mem_usage=False)
    text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder")
    vae, loading = AutoencoderKL.from_pretrained(
        path / "vae", low_cpu_mem_usage=False, output_loading_info=True
    )
    encoder_keys = ("encoder.", "quant_conv.")
    has_encoder = not any(k.startswith(encoder_keys) for k in loading["missing_keys"])
    for m in (unet, text_encoder, vae):
        m.float().eval().requires_grad_(False)
    sched = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    sched = {k: v for k, v in sched.items() if not k.startswith("_")}
    return Components(
        name or str(path),
        unet,
        text_encoder,
        vae,
        load_tokenizer(path / "tokenizer"),
        {**SD_SCHEDULER_CONFIG, **sched},
        has_vae_encoder=has_encoder,
    )


def load_model(spec: str, *, seed: int = 0) -> Components:
    """A built-in model by name (``shapes``, ``tiny``, ``sd14-random``; ``seed`` draws the random
    ones' weights) or a local diffusers folder."""
    if spec == "shapes":
        return load_folder(SHAPES_DIR, name="shapes")
    if spec in _BUILTIN_CONFIGS:
        return build_random(spec, seed)
    return load_folder(spec)


def make_scheduler(kind: str, config: dict[str, Any]):
    """A fresh diffusers scheduler from the model's scheduler config: ``ddim`` (default),
    ``pndm`` (the SD pipeline's own; PLMS with one extra warm-up call), ``euler`` or
    ``dpmpp`` (DPM-Solver++ 2M)."""
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
        PNDMScheduler,
    )

    if kind == "ddim":
        return DDIMScheduler.from_config(config, clip_sample=False, set_alpha_to_one=False)
    if kind == "pndm":
        return PNDMScheduler.from_config(config, skip_prk_steps=True)
    if kind == "euler":
        return EulerDiscreteScheduler.from_config(config)
    return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")
