"""Train the built-in ``shapes`` model on the CPU: ``python -m adapedit.shapes.train``.

An SD v1.x model at toy scale — a 3-level ``AutoencoderKL`` (64 px ↔ 4×16×16), a small
``CLIPTextModel`` over the real CLIP tokenizer and a 4-level ``UNet2DConditionModel`` with
cross-attention at three resolutions plus the mid block — trained on freshly rendered scenes of
the shapes world. Stage 1 trains the VAE (L1 + L2 + a small KL term) and fixes the latent
scaling factor; stage 2 trains the UNet and the text encoder together (ε-prediction on SD v1.4's
noise schedule, min-SNR-5 weighting, 10 % empty captions for classifier-free guidance, EMA
weights). Everything is seeded; the folder gets fp16 safetensors, ``training.json`` (config, wall
times, loss curves, final losses) and a model card.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from adapedit.errors import ConfigError
from adapedit.io import atomic_folder
from adapedit.models import SD_SCHEDULER_CONFIG, Components, load_folder, load_tokenizer
from adapedit.shapes.world import caption, render, sample_scene

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


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the trained weights (with the machine's float arithmetic)."""

    seed: int = 0
    vae_steps: int = 500
    vae_lr: float = 1e-3
    vae_kl: float = 1e-5
    steps: int = 4500
    batch: int = 32
    lr: float = 6e-4
    warmup: int = 100
    ema: float = 0.999
    uncond_fraction: float = 0.1
    min_snr: float = 5.0
    threads: int = 2
    #: the noise schedule's last β (scaled-linear from SD's 0.00085); stored with the model
    beta_end: float = 0.012
    #: a trained model folder to continue from (its VAE is kept; no VAE stage)
    resume: str = ""

    def __post_init__(self) -> None:
        for name in ("vae_steps", "steps", "batch", "threads"):
            if getattr(self, name) < 1:
                raise ConfigError(
                    f"{name} must be ≥ 1", where="TrainConfig", got=getattr(self, name)
                )


def _images(scenes: list, rng: random.Random) -> torch.Tensor:
    """Render scenes to [B, 3, 64, 64] in [-1, 1]."""
    arr = np.stack([render(s, rng.randrange(2**31)) for s in scenes])  # [B, 64, 64, 3]
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1


def _lr(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    p = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def train_vae(vae, cfg: TrainConfig, rng: random.Random, log: list) -> float:
    """Stage 1; returns the latent scaling factor (1 / std of the latents)."""
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr)
    vae.train()
    for step in tqdm(range(cfg.vae_steps), desc="vae"):
        x = _images([sample_scene(rng)[0] for _ in range(cfg.batch)], rng)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        l1 = (rec - x).abs().mean()
        loss = l1 + (rec - x).pow(2).mean() + cfg.vae_kl * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == cfg.vae_steps - 1:
            log.append({"step": step, "l1": round(l1.item(), 5), "loss": round(loss.item(), 5)})
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        x = _images([sample_scene(rng)[0] for _ in range(256)], rng)
        z = vae.encode(x).latent_dist.sample()
    return float(1.0 / z.std())


def train_denoiser(components: Components, cfg: TrainConfig, rng: random.Random, log: list):
    """Stage 2: UNet + text encoder, with EMA weights copied in at the end."""
    from diffusers import DDPMScheduler

    unet, text, vae, tok = (
        components.unet,
        components.text_encoder,
        components.vae,
        components.tokenizer,
    )
    sched = DDPMScheduler.from_config(components.scheduler_config)
    abar = sched.alphas_cumprod  # [1000]
    snr = abar / (1 - abar)
    weight = snr.clamp(max=cfg.min_snr) / snr  # min-SNR-γ for ε-prediction
    for m in (unet, text):
        m.requires_grad_(True)
    params = [p for m in (unet, text) for p in m.parameters()]
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    unet.train()
    text.train()
    sf = vae.config.scaling_factor
    running = []
    bar = tqdm(range(cfg.steps), desc="unet+text")
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = _lr(step, cfg)
        drawn = [sample_scene(rng) for _ in range(cfg.batch)]
        with torch.no_grad():
            z = vae.encode(_images([s for s, _ in drawn], rng)).latent_dist.sample() * sf
        caps = ["" if rng.random() < cfg.uncond_fraction else caption(s, m) for s, m in drawn]
        ids = tok(caps, padding="max_length", max_length=77, return_tensors="pt").input_ids
        emb = text(ids).last_hidden_state  # [B, 77, 64]
        t = torch.randint(0, 1000, (cfg.batch,))
        noise = torch.randn_like(z)
        pred = unet(sched.add_noise(z, noise, t), t, emb).sample
        per = (pred - noise).pow(2).mean(dim=(1, 2, 3))  # [B]
        loss = (weight[t] * per).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(cfg.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        running.append(per.mean().item())
        if step % 50 == 49 or step == cfg.steps - 1:
            mse = float(np.mean(running))
            log.append({"step": step + 1, "mse": round(mse, 5), "lr": _lr(step, cfg)})
            bar.set_postfix(mse=f"{mse:.4f}")
            running = []
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


def train(out: str | Path, cfg: TrainConfig = TrainConfig()) -> dict:
    """Train and write the model folder ``out`` (atomically); returns the training record."""
    torch.set_num_threads(cfg.threads)
    rng = random.Random(cfg.seed)
    vae_log: list = []
    unet_log: list = []
    previous = None
    t0 = time.perf_counter()
    if cfg.resume:
        torch.manual_seed(cfg.seed)
        comps = load_folder(cfg.resume, name="shapes")
        previous = json.loads((Path(cfg.resume) / "training.json").read_text())
        sf = comps.vae.config.scaling_factor
    else:
        comps = build_untrained(cfg.seed)
        sf = train_vae(comps.vae, cfg, rng, vae_log)
        comps.vae.register_to_config(scaling_factor=sf)
    comps.scheduler_config["beta_end"] = cfg.beta_end
    t1 = time.perf_counter()
    train_denoiser(comps, cfg, rng, unet_log)
    t2 = time.perf_counter()
    record = {
        "config": asdict(cfg),
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "vae_s": round(t1 - t0, 1),
        "unet_text_s": round(t2 - t1, 1),
        "scaling_factor": sf,
        "final": {
            "vae_l1": vae_log[-1]["l1"] if vae_log else previous["final"]["vae_l1"],
            "diffusion_mse": unet_log[-1]["mse"],
        },
        "vae_log": vae_log,
        "log": unet_log,
        "previous": previous,
    }
    comps.to("cpu", torch.float16)
    with atomic_folder(Path(out)) as tmp:
        comps.save(tmp)
        (tmp / "training.json").write_text(json.dumps(record, indent=1))
        write_card(tmp)
    return record


def _command(c: dict) -> str:
    """The command line that reproduces a run with config ``c``."""
    default = asdict(TrainConfig())
    args = [
        f"--{k.replace('_', '-')} {'DIR' if k == 'resume' else v}"
        for k, v in c.items()
        if v != default[k]
    ]
    return " ".join(["python -m adapedit.shapes.train --out DIR", *args])


def _training_steps(r: dict) -> str:
    """The card's account of a training record and the records it continued from."""
    c, fin, m = r["config"], r["final"], r["machine"]
    earlier = _training_steps(r["previous"]) + "\n\n" if r.get("previous") else ""
    where = f"on {m['processor']} with {m['threads']} threads, torch {m['torch']}"
    denoiser = (
        f"{c['steps']} steps of batch {c['batch']}, AdamW lr {c['lr']} (warm-up {c['warmup']}, "
        f"cosine to 10 %), min-SNR-{c['min_snr']:g} weighting, EMA {c['ema']}, noise schedule "
        f"β up to {c['beta_end']} — {r['unet_text_s'] / 60:.1f} min; final ε-MSE "
        f"{fin['diffusion_mse']:.4f} (mean over the last 50 steps)"
    )
    if c["resume"]:
        return (
            f"{earlier}Then, continuing from that model (UNet and text encoder; the VAE kept): "
            f"`{_command(c)}` {where}: {denoiser}."
        )
    return (
        f"`{_command(c)}` {where}:\n\n"
        f"1. VAE: {c['vae_steps']} steps of batch {c['batch']}, AdamW lr {c['vae_lr']}, L1 + L2 + "
        f"{c['vae_kl']}·KL — {r['vae_s'] / 60:.1f} min; final L1 {fin['vae_l1']:.4f} (pixels in "
        f"[-1, 1]).\n2. UNet + text encoder together: {denoiser}."
    )


def write_card(folder: str | Path) -> None:
    """The model card ``README.md`` of a trained folder, from its ``training.json``."""
    folder = Path(folder)
    r = json.loads((folder / "training.json").read_text())
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    u, t, v = (
        json.loads((folder / part / "config.json").read_text())
        for part in ("unet", "text_encoder", "vae")
    )
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    card = f"""# shapes — a small Stable Diffusion v1.x model of the shapes world

The embedded default model of adapedit (`--model shapes`): it draws 1–3 flat objects on a plain
background from captions such as "a big red circle on the left" or "two small blue squares",
so that an edit's result can be read back and checked (`adapedit.shapes.reader`).

## Architecture (SD v1.x, diffusers folder, fp16 safetensors, {size / 1e6:.1f} MB in all)

- `unet`: `UNet2DConditionModel`, 4 levels of widths {tuple(u["block_out_channels"])},
  cross-attention at three resolutions (16×16, 8×8, 4×4) plus the mid block (2×2),
  {u["attention_head_dim"]} heads, context width {u["cross_attention_dim"]}; ε-prediction.
- `text_encoder`: `CLIPTextModel`, {t["num_hidden_layers"]} layers of width {t["hidden_size"]},
  over the real CLIP BPE tokenizer (`tokenizer`, vocabulary 49408, 77 tokens).
- `vae`: `AutoencoderKL`, 3 levels of widths {tuple(v["block_out_channels"])}: 64×64 pixels ↔
  4×16×16 latents, scaling factor {r["scaling_factor"]:.4f}.
- `scheduler`: Stable Diffusion v1.4's, scaled-linear betas 0.00085–{sched["beta_end"]} over 1000
  steps{"" if sched["beta_end"] == 0.012 else " (SD: 0.012; see Training)"}.

## Data

Scenes rendered on the fly by `adapedit.shapes.world` (deterministic from a seed): one object
(70 %) or a row of two or three identical ones (15 % each); shapes circle, square, triangle;
colours red, green, blue, yellow, purple, orange; sizes small, big; positions left, right, top,
bottom, centre (single objects only). Captions always name the shape and the count and name the
colour (85 %), size (70 %) and position (70 %) optionally, with the article "a" or "one" and
three templates ("…", "a picture of …", "… on a grey background"); what a caption leaves out is
drawn at random. 10 % of captions are empty (classifier-free guidance).

## Training

{_training_steps(r)}

Loss curves: `training.json`. The same command on the same machine and thread count gives the
same weights.

## Limits

- 64×64 pixels only (the UNet has seen 16×16 latents and nothing else); the background is
  always the same grey.
- Groups are always a row across the middle: a count has no position, and "two red circles
  on the left" is outside the training distribution, as are scenes with different objects.
- Position words are not followed: where a single object lands is decided by the initial
  noise, not by "on the left" (position fidelity is at chance in
  `benchmarks/results/quality.md`). At 16×16 latents SD's schedule leaves the object's blob
  visible in the noise at the first step, and a convolutional UNet without positional inputs
  learns positions from padding only, slowly. A continuation with a noisier schedule (β up to
  0.02, 2500 more steps, `--resume`) did not fix it and was not kept.
- Trained for about an hour on two CPU cores: shapes are soft-edged and sometimes wrong;
  measured text fidelity and edit quality are in `benchmarks/results/quality.md`.
- Not a model of anything but this toy world; it exists so that edits can be seen and measured
  where no real Stable Diffusion weights can be downloaded.
"""
    (folder / "README.md").write_text(card)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(Path(__file__).parents[1] / "data" / "shapes"))
    for name, value in asdict(TrainConfig()).items():
        p.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    args = vars(p.parse_args(argv))
    out = args.pop("out")
    record = train(out, TrainConfig(**args))
    print(json.dumps({k: record[k] for k in ("vae_s", "unet_text_s", "final")}))


if __name__ == "__main__":
    main()
