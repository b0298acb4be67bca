"""Train the built-in ``shapes`` model: ``python -m adapedit.shapes.train`` (CPU by default,
``--device cuda`` on a GPU; resumable).

An SD v1.x model at toy scale — a 3-level ``AutoencoderKL`` (64 px ↔ 4×16×16), a small
``CLIPTextModel`` over the real CLIP tokenizer and a 4-level ``UNet2DConditionModel`` with
cross-attention at three resolutions plus the mid block — trained on freshly rendered scenes of
the shapes world. Stage 1 trains the VAE (L1 + L2 + a small KL term) and fixes the latent
scaling factor; stage 2 trains the UNet and the text encoder together: v-prediction on a noise
schedule whose last step leaves almost no signal (SD's scaled-linear betas rescaled so that
√ᾱ_T = ``terminal_signal``; sampled with trailing timesteps), a min-SNR-style weighting that
keeps the noisiest steps, 10 % empty captions for classifier-free guidance and EMA weights, with
the text fidelity of the EMA weights measured every ``eval_every`` steps; stage 3 fine-tunes the
VAE decoder alone on the frozen encoder's latents (the UNet's latent space stays as it is), its
loss weighted towards object pixels, so that small objects keep their colour and shape; stage 4
is a second cycle of stage 2 (a warm restart from stage 2's EMA weights with a fresh optimiser).
``--from FOLDER`` runs the later stages a trained folder did not run on its weights (stage 3 on
a folder of stages 1–2, stage 4 on one of stages 1–3). Everything is seeded;
a checkpoint beside the output folder lets an interrupted run continue where it stopped; the
folder gets fp16 safetensors, ``training.json`` (config, wall times, loss and fidelity curves)
and a model card.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import math
import os
import platform
import random
import textwrap
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from adapedit.config import SamplerConfig
from adapedit.errors import ConfigError
from adapedit.io import atomic_folder, atomic_write_bytes
from adapedit.pipelines.models import SD_SCHEDULER_CONFIG, Components, load_tokenizer
from adapedit.shapes.reader import read_image
from adapedit.shapes.world import (
    BACKGROUND,
    base_attribute,
    caption,
    render,
    sample_scene,
)

UNET_CONFIG = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": (48, 96, 96, 96),
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "cross_attention_dim": 64,
    "attention_head_dim": 4,
    "norm_num_groups": 16,
}
TEXT_CONFIG = {
    "vocab_size": 49408,
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 64,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}
VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 3,
    "up_block_types": ("UpDecoderBlock2D",) * 3,
    "block_out_channels": (16, 32, 64),
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 16,
    "sample_size": 64,
}


PREDICTIONS = ("v_prediction", "epsilon")
#: The attributes of the card's fidelity table.
FIDELITY_COLUMNS = ("shape", "colour", "size", "position", "count")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the trained weights (with the machine's float arithmetic)."""

    seed: int = 0
    vae_steps: int = 500
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_kl: float = 1e-5
    steps: int = 4000
    batch: int = 16
    lr: float = 6e-4
    warmup: int = 100
    ema: float = 0.999
    uncond_fraction: float = 0.1
    min_snr: float = 5.0
    #: what the UNet predicts: v = √ᾱ·ε − √(1−ᾱ)·x0, or ε
    prediction: str = "v_prediction"
    #: the base schedule: SD's scaled-linear betas from 0.00085 up to this
    beta_end: float = 0.012
    #: √ᾱ at the last timestep after rescaling the base schedule (SD v1.4's own: 0.068); 0 or
    #: the base value keeps the base schedule
    terminal_signal: float = 0.005
    #: measure text fidelity (EMA weights) every this many steps (0: only at the end)
    eval_every: int = 1000
    eval_samples: int = 50
    eval_steps: int = 20
    #: write the resumable checkpoint every this many steps
    checkpoint_every: int = 250
    #: stage 3, the VAE decoder fine-tuned on the frozen encoder's latents (0: no stage 3)
    decoder_steps: int = 1000
    decoder_lr: float = 5e-4
    #: stage 3's loss weight of object pixels against background pixels (1: all alike)
    decoder_object_weight: float = 5.0
    #: stage 4, a second cycle of stage 2 (a warm restart): UNet and text encoder from the
    #: weights as the folder keeps them (fp16), a fresh AdamW and EMA, warm-up and cosine to 10 %
    #: of ``refine_lr`` again, its own random streams (0: no stage 4)
    refine_steps: int = 6000
    refine_lr: float = 3e-4

    def __post_init__(self) -> None:
        for name in ("vae_steps", "vae_batch", "steps", "batch", "eval_steps", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(
                    f"{name} must be ≥ 1", where="TrainConfig", got=getattr(self, name)
                )
        for name in ("eval_every", "eval_samples", "decoder_steps", "refine_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(
                    f"{name} must be ≥ 0", where="TrainConfig", got=getattr(self, name)
                )
        if self.decoder_object_weight < 1:
            raise ConfigError(
                "decoder_object_weight must be ≥ 1",
                where="TrainConfig",
                got=self.decoder_object_weight,
            )
        if self.prediction not in PREDICTIONS:
            raise ConfigError(
                "unknown prediction",
                where="TrainConfig",
                expected=" | ".join(PREDICTIONS),
                got=self.prediction,
            )
        if not 0 <= self.terminal_signal < 1:
            raise ConfigError(
                "terminal_signal out of range",
                where="TrainConfig",
                expected="0 ≤ terminal_signal < 1",
                got=self.terminal_signal,
            )


def noise_schedule(cfg: TrainConfig) -> dict:
    """The model's scheduler config: SD's scaled-linear betas (up to ``beta_end``) rescaled
    (Lin et al. 2024, with a small floor instead of 0) so that √ᾱ falls to
    ``terminal_signal`` at the last timestep while its first value stays, written out as
    ``trained_betas`` so every diffusers scheduler (DDIM, PNDM, Euler, DPM-Solver++) samples
    the schedule that was trained; trailing timesteps, so that sampling starts at that last
    timestep."""
    n = SD_SCHEDULER_CONFIG["num_train_timesteps"]
    betas = (
        torch.linspace(
            SD_SCHEDULER_CONFIG["beta_start"] ** 0.5, cfg.beta_end**0.5, n, dtype=torch.float64
        )
        ** 2
    )  # [1000]
    root = torch.cumprod(1 - betas, 0).sqrt()  # √ᾱ_t
    first, last = root[0].item(), root[-1].item()
    if 0 < cfg.terminal_signal < last:
        root = cfg.terminal_signal + (root - last) * (first - cfg.terminal_signal) / (first - last)
        abar = root**2
        betas = 1 - abar / torch.cat([torch.ones(1, dtype=abar.dtype), abar[:-1]])
    return {
        **SD_SCHEDULER_CONFIG,
        "beta_end": cfg.beta_end,
        "trained_betas": [float(b) for b in betas],
        "prediction_type": cfg.prediction,
        "timestep_spacing": "trailing",
    }


def loss_weights(abar: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """Per-timestep loss weights [1000]. In terms of the error of the implied x0, min-SNR-γ
    weights a step by min(SNR, γ), which vanishes at the noisy end — where only the caption
    can say where an object goes. For ε-prediction that is the weight min(SNR, γ)/SNR (the
    v1 model's); for v-prediction this uses (min(SNR, γ) + 1)/(SNR + 1), an x0 weight of
    min(SNR, γ) + 1 that keeps the noisiest steps at 1."""
    snr = abar / (1 - abar)
    if cfg.prediction == "epsilon":
        return snr.clamp(max=cfg.min_snr) / snr
    return (snr.clamp(max=cfg.min_snr) + 1) / (snr + 1)


def _images(scenes: list, rng: random.Random) -> torch.Tensor:
    """Render scenes to [B, 3, 64, 64] in [-1, 1]."""
    arr = np.stack([render(s, rng.randrange(2**31)) for s in scenes])  # [B, 64, 64, 3]
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1


def _posterior_sample(vae, x: torch.Tensor) -> torch.Tensor:
    """A sample of the VAE posterior [B, 4, h, w], its noise drawn from the CPU generator (so
    the CPU and CUDA runs draw the same numbers)."""
    post = vae.encode(x).latent_dist
    return post.mean + post.std * torch.randn(post.mean.shape).to(post.mean)


def _lr(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    p = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def train_vae(vae, cfg: TrainConfig, rng: random.Random, log: list, device) -> float:
    """Stage 1; returns the latent scaling factor (1 / std of the latents)."""
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr)
    vae.train()
    for step in tqdm(range(cfg.vae_steps), desc="vae"):
        x = _images([sample_scene(rng)[0] for _ in range(cfg.vae_batch)], rng).to(device)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape).to(x)
        rec = vae.decode(z).sample
        l1 = (rec - x).abs().mean()
        loss = l1 + (rec - x).pow(2).mean() + cfg.vae_kl * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == cfg.vae_steps - 1:
            log.append({"step": step, "l1": round(l1.item(), 5), "loss": round(loss.item(), 5)})
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        x = _images([sample_scene(rng)[0] for _ in range(256)], rng).to(device)
        z = _posterior_sample(vae, x)
    return float(1.0 / z.std())


def _object_mask(x: torch.Tensor) -> torch.Tensor:
    """Pixels of rendered images [B, 3, H, W] in [-1, 1] that are not background → [B, 1, H, W]."""
    bg = torch.tensor(BACKGROUND, dtype=x.dtype, device=x.device) / 127.5 - 1  # [3]
    return (x - bg[:, None, None]).abs().amax(1, keepdim=True) > 4 / 127.5


def finetune_decoder(vae, cfg: TrainConfig, state: dict, checkpoint: Path, device) -> None:
    """Stage 3: the VAE's decoder (and ``post_quant_conv``) trained on posterior samples of the
    frozen encoder, so the latents the UNet learnt keep their meaning (how SD's "ft-MSE" decoder
    was made). Loss L1 + L2 per pixel, object pixels weighted ``decoder_object_weight``: a small
    object is a few dozen of 4096 pixels, and stage 1 left their colours off (a small red circle
    decoded orange). Its random streams are its own (seeded from ``cfg.seed``), so it runs the
    same after stage 2 or from a saved folder; ``state`` collects the log and checkpoints."""
    rng = random.Random(cfg.seed + 3)
    gen = torch.Generator().manual_seed(cfg.seed + 3)
    params = [p for m in (vae.decoder, vae.post_quant_conv) for p in m.parameters()]
    vae.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.decoder_lr)
    if "decoder_opt" in state:
        vae.load_state_dict(state["decoder_vae"])
        opt.load_state_dict(state["decoder_opt"])
        rng.setstate(state["decoder_rng"])
        gen.set_state(state["decoder_torch_rng"])
    state.setdefault("decoder_log", [])
    t_start = time.perf_counter() - state.get("decoder_s", 0.0)
    first = state.get("decoder_step", 0)
    vae.decoder.train()
    for step in tqdm(range(first, cfg.decoder_steps), desc="decoder", initial=first):
        x = _images([sample_scene(rng)[0] for _ in range(cfg.vae_batch)], rng).to(device)
        with torch.no_grad():
            post = vae.encode(x).latent_dist
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen).to(x)
        err = vae.decode(z).sample - x  # [B, 3, 64, 64]
        weight = 1 + (cfg.decoder_object_weight - 1) * _object_mask(x)  # [B, 1, 64, 64]
        loss = (weight * (err.abs() + err.pow(2))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        done = step + 1
        if done % 50 == 0 or done == cfg.decoder_steps:
            l1 = round(err.abs().mean().item(), 5)
            state["decoder_log"].append({"step": done, "l1": l1, "loss": round(loss.item(), 5)})
        if done % cfg.checkpoint_every == 0 and done < cfg.decoder_steps:
            state.update(
                decoder_step=done,
                decoder_s=time.perf_counter() - t_start,
                decoder_vae=vae.state_dict(),
                decoder_opt=opt.state_dict(),
                decoder_rng=rng.getstate(),
                decoder_torch_rng=gen.get_state(),
            )
            _save_checkpoint(checkpoint, state)
    state["decoder_s"] = time.perf_counter() - t_start
    vae.eval().requires_grad_(False)


def round_trip_reading(vae, samples: int = 100, seed: int = 2) -> float:
    """The share of the shape and colour attributes that the reader reads right on the VAE's
    round trip (decode ∘ encode, posterior mean) of ``samples`` random renders — the ceiling
    the decoder puts on any image the model makes."""
    from adapedit.pipelines.pipeline import to_uint8

    rng = random.Random(seed)
    scenes = [sample_scene(rng)[0] for _ in range(samples)]
    with torch.no_grad():
        x = _images(scenes, rng).to(vae.device, vae.dtype)
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample  # [n, 3, 64, 64]
    right = [
        read_image(to_uint8(img)).attributes(scene)[key] == value
        for scene, img in zip(scenes, rec, strict=True)
        for key, value in scene.attributes().items()
        if base_attribute(key) in ("shape", "colour")
    ]
    return float(np.mean(right))


def evaluate(components: Components, ema: list[torch.Tensor], cfg: TrainConfig) -> dict:
    """Text fidelity of the EMA weights (on copies: the training modules stay as they are)."""
    from adapedit.pipelines.pipeline import ReferencePipeline
    from adapedit.shapes.fidelity import text_fidelity

    unet, text = copy.deepcopy(components.unet), copy.deepcopy(components.text_encoder)
    with torch.no_grad():
        params = [p for m in (unet, text) for p in m.parameters()]
        for p, e in zip(params, ema, strict=True):
            p.copy_(e)
    for m in (unet, text):
        m.eval().requires_grad_(False)
    comps = Components(
        components.name,
        unet,
        text,
        components.vae,
        components.tokenizer,
        components.scheduler_config,
    )
    pipe = ReferencePipeline(comps, components.vae.device)
    return text_fidelity(pipe, cfg.eval_samples, SamplerConfig(steps=cfg.eval_steps), 1)


def _save_checkpoint(path: Path, state: dict) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def train_denoiser(
    components: Components,
    cfg: TrainConfig,
    rng: random.Random,
    stage: dict,
    save: Callable[[], None],
) -> None:
    """Stage 2 (and stage 4, with its own ``cfg``): UNet + text encoder from the progress in
    ``stage`` (a fresh one or a checkpoint's: the caller loads its weights and random states) to
    ``cfg.steps``, with EMA weights copied in at the end; ``stage`` collects the logs and the
    checkpoint fields, ``save`` writes the checkpoint."""
    from diffusers import DDPMScheduler

    unet, text, vae, tok = (
        components.unet,
        components.text_encoder,
        components.vae,
        components.tokenizer,
    )
    device = vae.device
    sched = DDPMScheduler.from_config(components.scheduler_config)
    weight = loss_weights(sched.alphas_cumprod, cfg).to(device)  # [1000]
    for m in (unet, text):
        m.requires_grad_(True)
    params = [p for m in (unet, text) for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    if "opt" in stage:
        opt.load_state_dict(stage["opt"])
        ema = [e.to(device) for e in stage["ema"]]
    else:
        ema = [p.detach().clone() for p in params]
    unet.train()
    text.train()
    sf = vae.config.scaling_factor
    running: list[float] = []
    t_start = time.perf_counter() - stage["unet_text_s"]
    bar = tqdm(range(stage["step"], cfg.steps), desc="unet+text", initial=stage["step"])
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = _lr(step, cfg)
        drawn = [sample_scene(rng) for _ in range(cfg.batch)]
        with torch.no_grad():
            z = _posterior_sample(vae, _images([s for s, _ in drawn], rng).to(device)) * sf
        caps = ["" if rng.random() < cfg.uncond_fraction else caption(s, m) for s, m in drawn]
        ids = tok(caps, padding="max_length", max_length=77, return_tensors="pt").input_ids
        emb = text(ids.to(device)).last_hidden_state  # [B, 77, 64]
        t = torch.randint(0, 1000, (cfg.batch,))
        noise = torch.randn(z.shape).to(z)
        target = noise if cfg.prediction == "epsilon" else sched.get_velocity(z, noise, t)
        pred = unet(sched.add_noise(z, noise, t), t.to(device), emb).sample
        per = (pred - target).pow(2).mean(dim=(1, 2, 3))  # [B]
        loss = (weight[t.to(device)] * per).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(cfg.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        running.append(per.mean().item())
        done = step + 1
        if done % 50 == 0 or done == cfg.steps:
            mse = float(np.mean(running))
            stage["log"].append({"step": done, "mse": round(mse, 5), "lr": _lr(step, cfg)})
            bar.set_postfix(mse=f"{mse:.4f}")
            running = []
        if (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps:
            fid = evaluate(components, ema, cfg)
            stage["fidelity"].append({"step": done, **fid})
            bar.write(f"step {done}: text fidelity {fid['all']:.3f} {fid['attributes']}")
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            stage.update(
                step=done,
                unet_text_s=time.perf_counter() - t_start,
                unet=unet.state_dict(),
                text=text.state_dict(),
                ema=[e.cpu() for e in ema],
                opt=opt.state_dict(),
                rng=rng.getstate(),
                torch_rng=torch.get_rng_state(),
            )
            save()
    stage["unet_text_s"] = time.perf_counter() - t_start
    with torch.no_grad():
        for p, e in zip(params, ema, strict=True):
            p.copy_(e)
    unet.eval().requires_grad_(False)
    text.eval().requires_grad_(False)


def build_untrained(seed: int) -> Components:
    """The shapes architecture with fresh (seeded) weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return Components(
        "shapes",
        UNet2DConditionModel(**UNET_CONFIG),
        CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG)),
        AutoencoderKL(**VAE_CONFIG),
        load_tokenizer(),
        dict(SD_SCHEDULER_CONFIG),
    )


def checkpoint_path(out: str | Path) -> Path:
    """Where a run into ``out`` keeps its resumable checkpoint (beside the folder)."""
    out = Path(out)
    return out.with_name(out.name + ".ckpt.pt")


def _decoder_stage(
    comps: Components, cfg: TrainConfig, state: dict, checkpoint: Path, device, threads: int
) -> None:
    """Stage 3 on the weights as the folder keeps them (fp16, computed in fp32), the VAE round
    trip's reading before and after, and the text fidelity after it, all into ``state``; leaves
    ``comps`` on the CPU in fp16."""
    comps.to("cpu", torch.float16)
    if cfg.decoder_steps == 0:
        return
    if state.get("decoder_done"):  # done before a checkpoint of stage 4, or by the source folder
        if "decoder_vae" in state:  # loading into the fp16 VAE rounds it as the folder does
            comps.vae.load_state_dict(state["decoder_vae"])
        return
    comps.to(device, torch.float32)
    if "round_trip" not in state:  # measured once, before stage 3 (a checkpoint keeps it)
        state["round_trip"] = {"before": round_trip_reading(comps.vae)}
    state["decoder_threads"] = threads
    finetune_decoder(comps.vae, cfg, state, checkpoint, device)
    state["round_trip"]["after"] = round_trip_reading(comps.vae)
    weights = [p.detach() for m in (comps.unet, comps.text_encoder) for p in m.parameters()]
    fid = evaluate(comps, weights, cfg)
    state["fidelity"].append({"step": cfg.steps, "after": "decoder", **fid})
    state.update(decoder_done=True, decoder_vae=comps.vae.state_dict())
    comps.to("cpu", torch.float16)


def _resume(comps: Components, progress: dict, rng: random.Random) -> None:
    """The UNet and text encoder weights a checkpoint of a denoiser stage holds (if it has
    them yet) and its random states, into ``comps``, ``rng`` and torch's generator."""
    if "unet" in progress:
        comps.unet.load_state_dict(progress["unet"])
        comps.text_encoder.load_state_dict(progress["text"])
    rng.setstate(progress["rng"])
    torch.set_rng_state(progress["torch_rng"])


def _refine_stage(
    comps: Components, cfg: TrainConfig, state: dict, checkpoint: Path, device, threads: int
) -> None:
    """Stage 4 on the weights as the folder keeps them (fp16, computed in fp32), or continued
    from a checkpoint of it; its progress is ``state["refine"]``. Leaves ``comps`` on the CPU in
    fp16."""
    if cfg.refine_steps == 0:
        return
    comps.to(device, torch.float32)
    stage = state.setdefault(
        "refine", {"step": 0, "unet_text_s": 0.0, "log": [], "fidelity": [], "threads": threads}
    )
    rng = random.Random(cfg.seed + 4)
    if "rng" in stage:
        _resume(comps, stage, rng)
    else:
        torch.manual_seed(cfg.seed + 4)
    stage_cfg = replace(cfg, steps=cfg.refine_steps, lr=cfg.refine_lr)
    train_denoiser(comps, stage_cfg, rng, stage, lambda: _save_checkpoint(checkpoint, state))
    comps.to("cpu", torch.float16)


def _stages_1_2(out: Path, cfg: TrainConfig, device, threads: int) -> tuple[Components, dict]:
    """Stages 1 and 2, or as far as a checkpoint of ``out`` got, continued."""
    checkpoint = checkpoint_path(out)
    rng = random.Random(cfg.seed)
    comps = build_untrained(cfg.seed).to(device)
    comps.scheduler_config = noise_schedule(cfg)
    state = _load_checkpoint(checkpoint, cfg)
    if state is not None:
        comps.vae.load_state_dict(state["vae"])
        comps.vae.register_to_config(scaling_factor=state["scaling_factor"])
        comps.vae.eval().requires_grad_(False)
        _resume(comps, state, rng)
    else:
        t0 = time.perf_counter()
        vae_log: list = []
        sf = train_vae(comps.vae, cfg, rng, vae_log, device)
        comps.vae.register_to_config(scaling_factor=sf)
        state = {
            "config": asdict(cfg),
            "vae": comps.vae.state_dict(),
            "scaling_factor": sf,
            "vae_log": vae_log,
            "vae_s": time.perf_counter() - t0,
            "vae_threads": threads,
            "unet_threads": threads,
            "step": 0,
            "unet_text_s": 0.0,
            "log": [],
            "fidelity": [],
            "rng": rng.getstate(),
            "torch_rng": torch.get_rng_state(),
        }
        _save_checkpoint(checkpoint, state)
    train_denoiser(comps, cfg, rng, state, lambda: _save_checkpoint(checkpoint, state))
    return comps, state


#: The settings of stages 3 and 4 (those ``--from`` takes from the command line for the stages
#: the folder did not run).
DECODER_FIELDS = ("decoder_steps", "decoder_lr", "decoder_object_weight")
REFINE_FIELDS = ("refine_steps", "refine_lr")


def _from_folder(src: Path, out: Path, cfg: TrainConfig) -> tuple[Components, TrainConfig, dict]:
    """A trained folder; the config of the stages it ran with ``cfg``'s settings for the later
    ones it did not (stage 3 and 4, or 4); and the state its ``training.json`` gives, those
    stages done, or the checkpoint of an interrupted run from it."""
    from adapedit.pipelines.models import load_folder

    if not (src / "training.json").is_file():
        raise ConfigError(
            "not a folder written by this script",
            where=str(src),
            expected="a model folder with training.json",
            got="no training.json",
            field="from_folder",
        )
    record = json.loads((src / "training.json").read_text())
    ran = TrainConfig(**{**asdict(TrainConfig()), **record["config"]})
    if ran.refine_steps:
        raise ConfigError(
            "the folder ran every stage",
            where=str(src),
            expected="a folder without stage 4 (refine_steps 0)",
            got=f"refine_steps {ran.refine_steps}",
            field="from_folder",
        )
    later = REFINE_FIELDS if ran.decoder_steps else DECODER_FIELDS + REFINE_FIELDS
    cfg = replace(ran, **{k: getattr(cfg, k) for k in later})
    stages = [
        n for n, k in ((3, "decoder_steps"), (4, "refine_steps")) if k in later and getattr(cfg, k)
    ]
    if not stages:
        raise ConfigError(
            "nothing to run on the folder",
            where=str(src),
            expected="--decoder-steps or --refine-steps > 0 for a stage the folder did not run",
            got={k: getattr(cfg, k) for k in later},
            field="from_folder",
        )
    comps = load_folder(src, name="shapes")
    state = _load_checkpoint(checkpoint_path(out), cfg)
    if state is None:
        state = {
            "config": asdict(cfg),
            "vae_threads": record["machine"]["vae_threads"],
            "unet_threads": record["machine"]["threads"],
            "continued": [*record.get("continued", []), {"from": str(src), "stages": stages}],
            **{k: record[k] for k in ("scaling_factor", "vae_s", "unet_text_s", "vae_log", "log")},
            "fidelity": [f for f in record["fidelity"] if ran.decoder_steps or "after" not in f],
        }
        if ran.decoder_steps:
            state.update(
                decoder_done=True,
                decoder_threads=record["machine"]["decoder_threads"],
                decoder_s=record["decoder_s"],
                decoder_log=record["decoder_log"],
                round_trip=record["final"]["round_trip_reading"],
            )
    return comps, cfg, state


def _load_checkpoint(checkpoint: Path, cfg: TrainConfig) -> dict | None:
    if not checkpoint.is_file():
        return None
    state = torch.load(checkpoint, weights_only=False)
    if state["config"] != asdict(cfg):
        raise ConfigError(
            "a checkpoint of another training config is in the way",
            where=str(checkpoint),
            expected=asdict(cfg),
            got=state["config"],
        )
    print(f"continuing from {checkpoint}")
    return state


def train(
    out: str | Path,
    cfg: TrainConfig = TrainConfig(),
    device: str = "cpu",
    threads: int = 1,
    from_folder: str | Path | None = None,
) -> dict:
    """Train and write the model folder ``out`` (atomically) with ``threads`` CPU threads;
    returns the training record. A checkpoint left by an interrupted run with the same config
    is continued (its RNG states restored, so the weights are those of an uninterrupted run
    with the same thread counts, which the record keeps per stage) and removed at the end.
    With ``from_folder`` (a folder this function wrote), only the later stages it did not run
    (3 and 4, or 4) run, on its weights, with its config and ``cfg``'s settings for them; a
    whole run gives the same weights."""
    out = Path(out)
    if out.exists():
        raise ConfigError(
            "the output folder exists",
            where=str(out),
            expected="a new folder (the run writes it whole at the end)",
            got="an existing path",
        )
    torch.set_num_threads(threads)
    checkpoint = checkpoint_path(out)
    if from_folder is None:
        comps, state = _stages_1_2(out, cfg, device, threads)
    else:
        comps, cfg, state = _from_folder(Path(from_folder), out, cfg)
    _decoder_stage(comps, cfg, state, checkpoint, device, threads)
    _refine_stage(comps, cfg, state, checkpoint, device, threads)
    refine = state.get("refine", {})
    fidelity = [*state["fidelity"], *({"stage": 4, **f} for f in refine.get("fidelity", []))]
    record = {
        "config": asdict(cfg),
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "threads": state.get("unet_threads", threads),
            "vae_threads": state["vae_threads"],
            "decoder_threads": state.get("decoder_threads"),
            "refine_threads": refine.get("threads"),
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "torch": torch.__version__,
        },
        "vae_s": round(state["vae_s"], 1),
        "unet_text_s": round(state["unet_text_s"], 1),
        "decoder_s": round(state.get("decoder_s", 0.0), 1),
        "refine_s": round(refine.get("unet_text_s", 0.0), 1),
        "continued": state.get("continued", []),
        "scaling_factor": state["scaling_factor"],
        "final": {
            "vae_l1": state["vae_log"][-1]["l1"],
            "diffusion_mse": (refine.get("log") or state["log"])[-1]["mse"],
            "fidelity": fidelity[-1],
            "round_trip_reading": state.get("round_trip"),
        },
        "vae_log": state["vae_log"],
        "log": state["log"],
        "decoder_log": state.get("decoder_log", []),
        "refine_log": refine.get("log", []),
        "fidelity": fidelity,
    }
    with atomic_folder(out) as tmp:
        comps.save(tmp)
        (tmp / "training.json").write_text(json.dumps(record, indent=1))
        write_card(tmp)
    if checkpoint.exists():
        os.remove(checkpoint)
    return record


def _command(c: dict) -> str:
    """The command line that reproduces a run with config ``c``."""
    default = asdict(TrainConfig())
    args = [f"--{k.replace('_', '-')} {v}" for k, v in c.items() if v != default[k]]
    return " ".join(["python -m adapedit.shapes.train --out DIR", *args])


def _pct(v: float) -> str:
    return f"{100 * v:.0f} %"


#: What the card says about positions: what was changed from v1 and the control run that shows
#: it mattered (both runs on the same machine, numbers from their ``training.json``).
POSITIONS_NOTE = """\
v1 ignored position words (18 % of position edits read back right): on SD v1.4's schedule the
last timestep keeps √ᾱ = 0.068 of the image, and at 16×16 latents a 64-px object's blob is
already visible in the initial noise, so the model learnt to put the object where the noise
suggests it and not where the caption says. v2 changes three things so that the first step has
nothing to go on but the text:

- the schedule is rescaled so that √ᾱ at the last timestep is 0.005 (SNR 2.5·10⁻⁵ instead of
  4.7·10⁻³);
- the UNet predicts v instead of ε (at almost zero SNR an ε prediction says almost nothing
  about the image, v says "the image");
- sampling uses trailing timesteps, so it starts at that last timestep.

A control run with everything else the same — `--prediction epsilon --terminal-signal 0.0`:
ε-prediction with the min-SNR ε weight, SD's own schedule, trailing timesteps, 4000 steps of
batch 16, 93.5 min of stage 2 on the same machine — reached 56 % overall and **40 %** on
position at step 4000 (colour 55 %, shape 54 %, size 55 %, count 78 %), against 72 % and
**92 %** here. The control changes the prediction, its loss weight and the schedule together,
so it shows that the combination makes positions work, not which of the three does it."""

#: The issue's text-fidelity goal (issue 15): overall and on every attribute.
FIDELITY_GOAL = {"all": 0.90, "attribute": 0.75}


def _stage_3(r: dict) -> str:
    """The card's item on stage 3 (empty for a record without one)."""
    c, trip = r["config"], r["final"].get("round_trip_reading")
    if not c.get("decoder_steps") or not trip:
        return ""
    lines = [
        "3. VAE decoder alone, the encoder frozen (the latents the UNet learnt keep their",
        f"   meaning): {c['decoder_steps']} steps of batch {c['vae_batch']}, AdamW lr "
        f"{c['decoder_lr']}, L1 + L2 per pixel with object",
        f"   pixels weighted {c['decoder_object_weight']:g}, "
        f"{r['machine']['decoder_threads']} threads — {r['decoder_s'] / 60:.1f} min. Stage 1 had "
        "left small",
        "   objects off colour (a small red circle decoded orange, a small blue one green): on",
        "   the VAE round trip of 100 renders the reader reads shape and colour right",
        f"   {_pct(trip['before'])} of the time before stage 3 and {_pct(trip['after'])} after — "
        "a ceiling on every image",
        "   the model makes.",
    ]
    return "\n" + "\n".join(lines)


def _stage_4(r: dict) -> str:
    """The card's item on stage 4 (empty for a record without one)."""
    c = r["config"]
    if not c.get("refine_steps"):
        return ""
    text = (
        "UNet + text encoder again, a warm restart from the EMA weights of stage 2 (as the "
        f"folder keeps them, fp16) with a fresh AdamW and EMA: {c['refine_steps']} steps of "
        f"batch {c['batch']}, lr {c['refine_lr']} (warm-up {c['warmup']}, cosine to 10 %), the "
        f"loss of stage 2, {r['machine']['refine_threads']} threads — "
        f"{r['refine_s'] / 60:.1f} min; final MSE {r['refine_log'][-1]['mse']:.4f}. Stage 2 "
        "ends with its learning rate at 10 %; a second cycle lets the denoiser learn on at a "
        "useful rate."
    )
    return "\n" + textwrap.fill(
        text, 95, initial_indent="4. ", subsequent_indent="   ", break_on_hyphens=False
    )


def _continued(r: dict) -> str:
    """What the card says about stages run on their own (``--from``) on an earlier folder."""
    if not r.get("continued"):
        return ""
    runs = "; ".join(
        f"stage{'s' if len(c['stages']) > 1 else ''} {' and '.join(map(str, c['stages']))} "
        f"with `--from {c['from']}`"
        for c in r["continued"]
    )
    text = (
        f"This folder was made in steps, each on the folder of the stages before it (as that "
        f"folder was then): {runs}. "
        "A whole run does the same stages on the same fp16 weights (a test checks it)."
    )
    return "\n\n" + textwrap.fill(text, 95, break_long_words=False, break_on_hyphens=False)


def _row_label(f: dict) -> str:
    """A fidelity table row's step: stage 2's, after stage 3, or stage 4's."""
    if f.get("stage") == 4:
        return f"stage 4: {f['step']}"
    return f"{f['step']}{' + stage 3' if f.get('after') else ''}"


def write_card(folder: str | Path) -> None:
    """The model card ``README.md`` of a trained folder, from its ``training.json``."""
    folder = Path(folder)
    r = json.loads((folder / "training.json").read_text())
    c, fin, m = r["config"], r["final"], r["machine"]
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    u, t, v = (
        json.loads((folder / part / "config.json").read_text())
        for part in ("unet", "text_encoder", "vae")
    )
    where = f"{m['device']} ({m['processor']}), torch {m['torch']}"
    curve = "\n".join(
        f"| {_row_label(f)} | {_pct(f['all'])} | "
        + " | ".join(_pct(f["attributes"].get(a, float("nan"))) for a in FIDELITY_COLUMNS)
        + " |"
        for f in r["fidelity"]
    )
    last = (
        r["fidelity"][-1] if r["fidelity"] else {"step": c["steps"], "all": 0.0, "attributes": {}}
    )
    missed = [
        f"{a} {_pct(v)}"
        for a, v in sorted(last["attributes"].items())
        if v < FIDELITY_GOAL["attribute"]
    ]
    met = last["all"] >= FIDELITY_GOAL["all"] and not missed
    goal_line = (
        f"overall {_pct(last['all'])}, "
        + ("**met**" if met else "**not met**")
        + (f" (below {_pct(FIDELITY_GOAL['attribute'])}: {', '.join(missed)})" if missed else "")
    )
    hours = sum(r.get(k, 0.0) for k in ("vae_s", "unet_text_s", "decoder_s", "refine_s")) / 3600
    card = f"""# shapes — a small Stable Diffusion v1.x model of the shapes world (v2)

The embedded default model of adapedit (`--model shapes`): it draws flat objects on a plain
background from captions such as "a big red circle on the left", "two small blue squares" or
"a red circle on the left and a blue square on the right", so that an edit's result can be read
back and checked (`adapedit.shapes.reader`).

## Architecture (SD v1.x, diffusers folder, fp16 safetensors, {size / 1e6:.1f} MB in all)

- `unet`: `UNet2DConditionModel`, 4 levels of widths {tuple(u["block_out_channels"])},
  cross-attention at three resolutions (16×16, 8×8, 4×4) plus the mid block (2×2),
  {u["attention_head_dim"]} heads, context width {u["cross_attention_dim"]}; **v-prediction**.
- `text_encoder`: `CLIPTextModel`, {t["num_hidden_layers"]} layers of width {t["hidden_size"]},
  over the real CLIP BPE tokenizer (`tokenizer`, vocabulary 49408, 77 tokens).
- `vae`: `AutoencoderKL`, 3 levels of widths {tuple(v["block_out_channels"])}: 64×64 pixels ↔
  4×16×16 latents, scaling factor {r["scaling_factor"]:.4f}.
- `scheduler`: SD v1.4's scaled-linear betas (0.00085–{c["beta_end"]}) rescaled so that
  √ᾱ falls to {c["terminal_signal"]} at the last of 1000 steps (SD's own: 0.068), stored as
  `trained_betas`; `prediction_type` `{c["prediction"]}`; `timestep_spacing` `trailing` (sampling
  starts at step 999). Every sampler of adapedit (DDIM, PNDM, Euler, DPM-Solver++) reads it.

## Data

Scenes rendered on the fly by `adapedit.shapes.world` (deterministic from a seed): one object
(45 %), a row of two or three identical ones (7.5 % each), or two *different* objects (shape or
colour differ) on opposite sides, left/right or top/bottom (40 %); shapes circle, square,
triangle; colours red, green, blue, yellow, purple, orange; sizes small, big; positions left,
right, top, bottom, centre. Captions always name the shape and the count, and the colour
(85 %), the size (70 %) and, for one object, the position (70 %) optionally; a pair's two
phrases always carry their positions ("… on the left and … on the right"), which say which
object is which. Articles "a" or "one", three templates ("…", "a picture of …", "… on a grey
background"); what a caption leaves out is drawn at random; 10 % of captions are empty
(classifier-free guidance).

## Training

`{_command(c)}` on {where}:

1. VAE: {c["vae_steps"]} steps of batch {c["vae_batch"]}, AdamW lr {c["vae_lr"]}, L1 + L2 +
   {c["vae_kl"]}·KL, {m["vae_threads"]} threads — {r["vae_s"] / 60:.1f} min; final L1
   {fin["vae_l1"]:.4f} (pixels in [-1, 1]).
2. UNet + text encoder together: {c["steps"]} steps of batch {c["batch"]}, AdamW lr {c["lr"]}
   (warm-up {c["warmup"]}, cosine to 10 %), {c["prediction"]} with loss weight
   (min(SNR, {c["min_snr"]:g}) + 1) / (SNR + 1), EMA {c["ema"]}, {m["threads"]} threads —
   {r["unet_text_s"] / 60:.1f} min; final MSE {r["log"][-1]["mse"]:.4f} (mean over the
   last 50 steps).{_stage_3(r)}{_stage_4(r)}{_continued(r)}

Text fidelity of the EMA weights during training (`adapedit.shapes.fidelity`: {c["eval_samples"]}
random captions of the training distribution, {c["eval_steps"]} DDIM steps, guidance 7.5, every
named attribute read back by the reader; a pair's attributes count per object):

| step | all | {" | ".join(FIDELITY_COLUMNS)} |
|---|---|{"---|" * len(FIDELITY_COLUMNS)}
{curve}

Loss and fidelity curves: `training.json`. The same command on the same machine with the same
thread counts gives the same weights; an interrupted run continues from its checkpoint
(`DIR.ckpt.pt`, written every {c["checkpoint_every"]} steps) to the same weights.

## Positions

{POSITIONS_NOTE}

## Against the goal

The goal was ≥ {_pct(FIDELITY_GOAL["all"])} text fidelity overall and ≥
{_pct(FIDELITY_GOAL["attribute"])} on every attribute. At the last measurement
({_row_label(last)}): {goal_line}. These measurements take {c["eval_samples"]} captions each;
`python -m benchmarks.quality` measures the model on 200 (`benchmarks/results/quality.md`).

## Limits

- 64×64 pixels only (the UNet has seen 16×16 latents and nothing else); the background is
  always the same grey.
- Groups are always a row across the middle (a count has no position); a pair's objects
  stand on opposite sides only, never "on the left and at the top", and never two identical
  objects.
- Trained for {hours:.1f} h on two CPU cores: shapes are
  soft-edged and sometimes wrong; measured text fidelity and edit quality are in
  `benchmarks/results/quality.md`.
- Not a model of anything but this toy world; it exists so that edits can be seen and measured
  where no real Stable Diffusion weights can be downloaded.
"""
    (folder / "README.md").write_text(card)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(Path(__file__).parents[1] / "data" / "shapes"))
    for name, value in asdict(TrainConfig()).items():
        p.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    p.add_argument(
        "--from",
        dest="from_folder",
        metavar="FOLDER",
        help="run only the later stages (3 and 4, or 4) that FOLDER (a folder this script "
        "wrote) did not run, on its weights",
    )
    args = vars(p.parse_args(argv))
    out, device, threads = args.pop("out"), args.pop("device"), args.pop("threads")
    src = args.pop("from_folder")
    record = train(out, TrainConfig(**args), device, threads, src)
    times = ("vae_s", "unet_text_s", "decoder_s", "refine_s")
    print(json.dumps({k: record[k] for k in (*times, "final")}))


if __name__ == "__main__":
    main()
