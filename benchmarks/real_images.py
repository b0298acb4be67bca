"""Editing given images (issue 14): each inversion on images no model made, read back by the
attribute reader.

The images are renders of the shapes world (``adapedit.shapes.world.render``: what they show
is known) of the edit-quality suite's colour, shape, size and count edits
(``benchmarks.quality.SUITE``), at the model's resolution. For every render and inversion
(``direct``, ``ddim``, ``npi``):

- **reconstruction** (target = source prompt): PSNR and SSIM against the render of the source
  branch and of the edit branch, beside the VAE's own round trip (decode ∘ encode);
- **edit**: success (the asked attribute reads as asked) and preservation (the share of the
  other attributes that keep their value) by ``benchmarks.quality.score``;
- **cost**: UNet calls and UNet samples (calls weighted by batch) and wall time per edit,
  against an edit of a generated image of the same prompts and seed.

Then the I/O path on real photographs that scikit-image ships in its package (public domain or
CC0; nothing is downloaded): format, mode and size as read, each resize policy, and one edit
each. With the ``shapes`` model such edits mean nothing (it knows only flat shapes on grey):
they show that sizes and modes are handled, not how a photo is edited. Without scikit-image
that part is skipped (``pip install scikit-image``, the ``bench`` extra).

Writes ``real_images.json``, ``real_images.md``, ``real_images.png`` (renders) and
``real_images_photos.png``::

    python -m benchmarks.real_images                          # the committed record
    python -m benchmarks.real_images --cases 1 --seeds 0 --steps 3 --out /tmp/r   # smoke run

On a CPU shared with other work, run it with ``OMP_NUM_THREADS=1``: the 64 px model gains
nothing from more threads, and OpenMP threads that outnumber the free cores spin and made one
edit take from 3 s to 270 s on the 2-core machine of the committed record.
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import numpy as np

from adapedit.config import EditConfig, ImageConfig, SamplerConfig
from adapedit.parity import psnr
from adapedit.shapes.reader import read_image
from adapedit.shapes.world import render
from benchmarks.common import machine_info, write_results
from benchmarks.quality import SUITE, score

RESULTS = Path(__file__).parent / "results"
KINDS = ("colour", "shape", "size", "count")
CASES = tuple(c for c in SUITE if c.kind in KINDS)
INVERSIONS = ("direct", "ddim", "npi")
METHODS = (*INVERSIONS, "generated")
#: scikit-image's bundled photographs used here (public domain or CC0 per its docstrings).
PHOTOS = ("astronaut.png", "camera.png", "chelsea.png", "coffee.png", "rocket.jpg")


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM (Wang et al. 2004: 11×11 Gaussian window, σ 1.5, K1 0.01, K2 0.03, L 255, valid
    region) of two uint8 images [H, W, 3], averaged over the channels."""
    import torch

    x = torch.from_numpy(np.stack([a, b]).astype(np.float64)).permute(3, 0, 1, 2)  # [3, 2, H, W]
    g = torch.exp(-((torch.arange(11, dtype=torch.float64) - 5) ** 2) / (2 * 1.5**2))
    w = (g[:, None] * g[None, :] / g.sum() ** 2)[None, None]  # [1, 1, 11, 11]

    def blur(t: torch.Tensor) -> torch.Tensor:  # [3, H, W] → [3, H − 10, W − 10]
        return torch.nn.functional.conv2d(t[:, None], w)[:, 0]

    xa, xb = x[:, 0], x[:, 1]
    mu_a, mu_b = blur(xa), blur(xb)
    var_a = blur(xa * xa) - mu_a**2
    var_b = blur(xb * xb) - mu_b**2
    cov = blur(xa * xb) - mu_a * mu_b
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    )
    return float(s.mean())


class CountingUNet:
    """Counts a pipeline's UNet calls and samples (installed on the instance)."""

    def __init__(self, pipe) -> None:
        self.inner, self.calls, self.samples = pipe.unet, 0, 0
        pipe.unet = self

    def __call__(self, x, *args):
        self.calls += 1
        self.samples += x.shape[0]
        return self.inner(x, *args)

    def take(self) -> tuple[int, int]:
        """(calls, samples) since the last take."""
        out = (self.calls, self.samples)
        self.calls = self.samples = 0
        return out


def measured(counter: CountingUNet, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``'s result, with its UNet calls, samples and wall time."""
    counter.take()
    t = time.perf_counter()
    r = fn(*args, **kwargs)
    seconds = time.perf_counter() - t
    calls, samples = counter.take()
    return r, {"unet_calls": calls, "unet_samples": samples, "seconds": seconds}


def run_renders(pipe, a: argparse.Namespace) -> tuple[list, list]:
    from tqdm import tqdm

    from adapedit.pipelines.pipeline import from_uint8

    counter = CountingUNet(pipe)
    rows, grid = [], []
    jobs = [(c, s) for c in CASES[: a.cases] for s in a.seeds]
    warm = SamplerConfig(steps=2, guidance=a.guidance)  # first calls are slower: not timed
    src_p, tgt_p = jobs[0][0].prompts
    pipe.edit(src_p, tgt_p, EditConfig(), warm)
    pipe.edit(
        src_p, tgt_p, EditConfig(), warm, image=render(jobs[0][0].source, 0, pipe.default_size)
    )
    for case, seed in tqdm(jobs, desc="renders"):
        image = render(case.source, seed, pipe.default_size)
        truth = read_image(image)
        src_p, tgt_p = case.prompts
        sampler = SamplerConfig(steps=a.steps, seed=seed, guidance=a.guidance)
        vae = pipe.decode(pipe.encode_image_one(from_uint8(image).to(pipe.device)))[0]
        base = {"kind": case.kind, "source": src_p, "target": tgt_p, "seed": seed}
        gen, cost = measured(counter, pipe.edit, src_p, tgt_p, EditConfig(), sampler)
        gen_score = score(case, read_image(gen.source_image), gen.edited_image, gen.source_image)
        rows.append({**base, "method": "generated", **gen_score, **cost})
        images = {"VAE round trip": vae, "generated source": gen.source_image}
        images["generated edit"] = gen.edited_image
        for inv in INVERSIONS:
            cfg = ImageConfig(inversion=inv)
            rec = pipe.edit(src_p, src_p, EditConfig(), sampler, image=image, image_config=cfg)
            r, cost = measured(
                counter,
                pipe.edit,
                src_p,
                tgt_p,
                EditConfig(),
                sampler,
                image=image,
                image_config=cfg,
            )
            rows.append(
                {
                    **base,
                    "method": inv,
                    **score(case, truth, r.edited_image, image),
                    **cost,
                    "vae_psnr_db": psnr(image, vae),
                    "vae_ssim": ssim(image, vae),
                    "source_psnr_db": psnr(image, rec.source_image),
                    "source_ssim": ssim(image, rec.source_image),
                    "edit_branch_psnr_db": psnr(image, rec.edited_image),
                    "edit_branch_ssim": ssim(image, rec.edited_image),
                }
            )
            images[f"{inv} edit"] = r.edited_image
            images[f"{inv} target = source"] = rec.edited_image
        if seed == a.seeds[0]:
            grid.append((f"{src_p} -> {tgt_p}", image, images))
    return rows, grid


def _photo_variants(data_dir: Path) -> list[tuple[str, bytes]]:
    """The photographs as shipped, plus variants that exercise the rest of the reader: 16-bit
    grey PNG, an EXIF-rotated JPEG, a WebP, an RGBA PNG with transparency."""
    from PIL import Image

    def encoded(im, fmt: str, **kw) -> bytes:
        buf = io.BytesIO()
        im.save(buf, format=fmt, **kw)
        return buf.getvalue()

    out = [(name, (data_dir / name).read_bytes()) for name in PHOTOS]
    with Image.open(data_dir / "camera.png") as cam:
        grey16 = Image.fromarray(np.asarray(cam, dtype=np.uint16) * 257)
        out.append(("camera.png as 16-bit grey PNG", encoded(grey16, "PNG")))
    with Image.open(data_dir / "chelsea.png") as cat:
        exif = Image.Exif()
        exif[0x0112] = 6  # stored on its side, shown upright
        rotated = cat.transpose(Image.Transpose.ROTATE_90)
        out.append(
            ("chelsea.png as a JPEG with EXIF orientation 6", encoded(rotated, "JPEG", exif=exif))
        )
        out.append(("chelsea.png as WebP", encoded(cat, "WEBP", quality=90)))
        rgba = cat.convert("RGBA")
        rgba.putalpha(Image.linear_gradient("L").resize(cat.size))
        out.append(("chelsea.png as RGBA PNG (alpha gradient)", encoded(rgba, "PNG")))
    return out


def run_photos(pipe, a: argparse.Namespace) -> tuple[list, list, str | None]:
    """The I/O path on scikit-image's photographs (skipped, with the reason, without it)."""
    import importlib.util

    from adapedit.image_io import fit_image, load_image

    spec = importlib.util.find_spec("skimage")
    if spec is None or spec.origin is None:
        return [], [], "scikit-image is not installed (pip install scikit-image): photos skipped"
    data_dir = Path(spec.origin).parent / "data"
    size = pipe.default_size
    rows, grid = [], []
    sampler = SamplerConfig(steps=a.steps, seed=0, guidance=a.guidance)
    for name, data in _photo_variants(data_dir):
        img = load_image(data)
        fits = {p: fit_image(img, size, size, p) for p in ("crop", "pad", "stretch")}
        r = pipe.edit(a.photo_source, a.photo_target, EditConfig(), sampler, image=data)
        crop = fits["crop"][0]
        rows.append(
            {
                "photo": name,
                "bytes": len(data),
                **{k: img.info[k] for k in ("format", "mode", "size", "orientation")},
                "upright_size": list(img.pixels.shape[1::-1]),
                "resize": {
                    p: {k: rec[k] for k in ("resized_to", "box")} for p, (_, rec) in fits.items()
                },
                "source_psnr_db": psnr(crop, r.source_image),
                "source_ssim": ssim(crop, r.source_image),
            }
        )
        images = {p: fits[p][0] for p in ("pad", "stretch")}
        images.update({"direct source": r.source_image, "direct edit": r.edited_image})
        grid.append((name, crop, images))
    return rows, grid, None


def _mean(rows: list[dict], key: str) -> float:
    vals = [float(r[key]) for r in rows if key in r and np.isfinite(float(r[key]))]
    return float(np.mean(vals)) if vals else float("nan")


def summarise(rows: list[dict]) -> dict:
    """Per method: success and preservation per edit kind and over colour + shape ("hard"),
    reconstruction means, cost means."""
    out: dict = {}
    keys = (
        "success",
        "preserved",
        "vae_psnr_db",
        "vae_ssim",
        "source_psnr_db",
        "source_ssim",
        "edit_branch_psnr_db",
        "edit_branch_ssim",
        "unet_calls",
        "unet_samples",
        "seconds",
    )
    for m in METHODS:
        mine = [r for r in rows if r["method"] == m]
        groups = {k: [r for r in mine if r["kind"] == k] for k in KINDS}
        groups["hard"] = [r for r in mine if r["kind"] in ("colour", "shape")]
        groups["all"] = mine
        out[m] = {
            g: {"n": len(rs), **{k: _mean(rs, k) for k in keys}} for g, rs in groups.items() if rs
        }
    return out


def goals(s: dict) -> list[tuple[str, bool, str]]:
    """The issue's goals: (goal, met, the numbers)."""
    d, g = s["direct"]["all"], s["generated"]["all"]
    hard = s["direct"].get("hard", {"success": float("nan"), "preserved": float("nan")})
    gap = d["vae_psnr_db"] - d["source_psnr_db"]
    calls, samples = d["unet_calls"] / g["unet_calls"], d["unet_samples"] / g["unet_samples"]
    return [
        (
            "direct reconstruction PSNR within 0.5 dB of the VAE round trip",
            gap <= 0.5,
            f"source branch {d['source_psnr_db']:.2f} dB vs VAE {d['vae_psnr_db']:.2f} dB "
            f"({gap:+.2f} dB below); the edit branch with target = source "
            f"{d['edit_branch_psnr_db']:.2f} dB",
        ),
        (
            "direct: ≥ 80 % success on colour and shape edits, ≥ 85 % preserved",
            hard["success"] >= 0.8 and hard["preserved"] >= 0.85,
            f"{100 * hard['success']:.0f} % success, {100 * hard['preserved']:.0f} % preserved",
        ),
        (
            "direct ≥ ddim on preservation",
            d["preserved"] >= s["ddim"]["all"]["preserved"],
            f"{100 * d['preserved']:.1f} % vs {100 * s['ddim']['all']['preserved']:.1f} %",
        ),
        (
            "inversion + edit ≤ 1.3× an edit of a generated image, counted in UNet calls",
            calls <= 1.3,
            f"{calls:.2f}× ({d['unet_calls']:.0f} vs {g['unet_calls']:.0f} calls)",
        ),
        (
            "inversion + edit ≤ 1.3× an edit of a generated image, counted in UNet samples "
            "(calls × batch: the UNet's work)",
            samples <= 1.3,
            f"{samples:.2f}× ({d['unet_samples']:.0f} vs {g['unet_samples']:.0f} samples); "
            f"wall time {d['seconds'] / g['seconds']:.2f}× ({d['seconds']:.2f} vs "
            f"{g['seconds']:.2f} s)",
        ),
    ]


def md_table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table."""
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines) + "\n"


def _size(p: dict) -> str:
    """A photo's size as stored, and upright when its EXIF orientation turns it."""
    w, h = p["size"]
    if p["orientation"] in (None, 1):
        return f"{w}×{h}"
    return f"{w}×{h} (EXIF {p['orientation']} → {p['upright_size'][0]}×{p['upright_size'][1]})"


def _placed(fit: dict, word: str) -> str:
    """How a resize policy placed a photo: its scaled size and box."""
    w, h = fit["resized_to"]
    return f"scaled {w}×{h}, {word} {fit['box']}"


def markdown(record: dict) -> str:
    s = record["summary"]
    groups = [*KINDS, "hard", "all"]

    def by_group(key: str) -> str:
        rows = [
            [m, *(f"{100 * s[m][g][key]:.0f}" if g in s[m] else "–" for g in groups)]
            for m in METHODS
        ]
        return md_table(["method", *groups], rows)

    def pair(a: dict, what: str) -> str:
        return f"{a[what + '_psnr_db']:.2f} dB / {a[what + '_ssim']:.3f}"

    rec = md_table(
        ["inversion", "VAE round trip", "source branch", "edit branch, target = source"],
        [
            [m, *(pair(s[m]["all"], w) for w in ("vae", "source", "edit_branch"))]
            for m in INVERSIONS
        ],
    )
    cost = md_table(
        ["method", "UNet calls", "UNet samples", "seconds"],
        [
            [m, f"{a['unet_calls']:.0f}", f"{a['unet_samples']:.0f}", f"{a['seconds']:.2f}"]
            for m, a in ((m, s[m]["all"]) for m in METHODS)
        ],
    )
    verdicts = "\n".join(
        f"- {'MET' if ok else 'NOT met'}: {goal} — {numbers}."
        for goal, ok, numbers in record["goals"]
    )
    photos = record["photos"]
    if photos["skipped"]:
        photo_md = photos["skipped"] + ".\n"
    else:
        photo_md = md_table(
            ["photo", "bytes", "format", "mode", "size", "crop", "pad", "source PSNR"],
            [
                [
                    p["photo"],
                    str(p["bytes"]),
                    p["format"],
                    p["mode"],
                    _size(p),
                    _placed(p["resize"]["crop"], "box"),
                    _placed(p["resize"]["pad"], "at"),
                    f"{p['source_psnr_db']:.2f} dB",
                ]
                for p in photos["rows"]
            ],
        )
    return (
        f"# Editing given images on the `{record['model']}` model\n\n"
        f"Measured on {record['machine']['description']} (the PyTorch reference, fp32, torch "
        f"on {record.get('torch_threads', '?')} thread(s)); "
        f"{record['steps']} DDIM steps, guidance {record['guidance']}; {record['renders']} "
        f"renders of the shapes world ({len(record['cases'])} edits × seeds {record['seeds']}), "
        f"every image read by `adapedit.shapes.reader`; {record['wall_s']:.0f} s.\n\n"
        f"## Goals\n\n{verdicts}\n\n"
        "## Reconstruction (PSNR / SSIM against the render; target = source prompt)\n\n"
        + rec
        + "\nThe source branch is what the edit returns as the source image; the edit branch "
        "with the target equal to the source prompt shows how far an edit's image drifts when "
        "nothing is asked of it.\n\n## Edit success (% of edits whose asked attribute reads "
        "as asked)\n\n"
        + by_group("success")
        + "\n## Preservation (% of the other attributes kept)\n\n"
        + by_group("preserved")
        + "\n## Cost per edit (means)\n\n"
        + cost
        + "\n`generated`: the same prompts and seed with a generated source (no inversion), "
        "scored against its own source image.\n\n## Real photographs (I/O path)\n\n"
        "scikit-image's bundled photographs (public domain or CC0) and variants made from them "
        "in memory, each read, resized to the model's "
        f"{record['size']}×{record['size']} px and edited once (`direct`, crop) with "
        f'"{record["photo_prompts"][0]}" → "{record["photo_prompts"][1]}". **With the '
        f"`{record['model']}` model these edits mean nothing** — it has only seen flat shapes "
        "on grey — they show that formats, modes, orientation and sizes are handled; the "
        "source PSNR is the VAE round trip of a photo at this size.\n\n"
        + photo_md
        + "\n`real_images.png`: per edit (first seed) the render, the VAE round trip, the "
        "generated source and edit, and per inversion the edit and the target = source image. "
        "`real_images_photos.png`: per photo the crop, pad and stretch inputs and the direct "
        "source and edit.\n"
    )


def grid_png(grid: list, path: Path, first: str) -> None:
    """Rows: ``(title, image, {column: image})``; columns: ``first``, then the row's keys."""
    from PIL import Image, ImageDraw

    from adapedit.io import atomic_write_bytes, png_bytes

    cols = (first, *grid[0][2])
    side = grid[0][1].shape[0] * max(1, 128 // grid[0][1].shape[0])
    label_h, title_h = 14, 12
    canvas = Image.new("RGB", (side * len(cols), label_h + len(grid) * (title_h + side)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, name in enumerate(cols):
        draw.text((j * side + 2, 1), name[: side // 6], fill="black")
    for i, (title, image, images) in enumerate(grid):
        y = label_h + i * (title_h + side)
        draw.text((2, y), title, fill="black")
        for j, name in enumerate(cols):
            tile = Image.fromarray(image if j == 0 else images[name])
            canvas.paste(
                tile.resize((side, side), Image.Resampling.NEAREST), (j * side, y + title_h)
            )
    atomic_write_bytes(path, png_bytes(canvas))


def main(argv: list[str] | None = None) -> dict:
    import torch

    from adapedit.pipelines.pipeline import ReferencePipeline

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="shapes", help="a built-in name or a diffusers folder")
    ap.add_argument("--cases", type=int, default=len(CASES), help="the first N edits")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="render seeds")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--photos", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--photo-source", default="a big red circle on the left")
    ap.add_argument("--photo-target", default="a big blue circle on the left")
    ap.add_argument("--out", default=str(RESULTS))
    a = ap.parse_args(argv)

    # each method's cost is measured: no calibration cache shared between them
    pipe = ReferencePipeline.from_model(a.model, calibration_cache=None)
    t0 = time.perf_counter()
    rows, grid = run_renders(pipe, a)
    photo_rows, photo_grid, skipped = run_photos(pipe, a) if a.photos else ([], [], "not run")
    summary = summarise(rows)
    record = {
        "machine": machine_info(),
        "torch_threads": torch.get_num_threads(),
        "model": a.model,
        "size": pipe.default_size,
        "steps": a.steps,
        "guidance": a.guidance,
        "seeds": list(a.seeds),
        "cases": [{"kind": c.kind, "prompts": list(c.prompts)} for c in CASES[: a.cases]],
        "renders": len(CASES[: a.cases]) * len(a.seeds),
        "photo_prompts": [a.photo_source, a.photo_target],
        "wall_s": round(time.perf_counter() - t0, 1),
        "summary": summary,
        "goals": goals(summary),
        "rows": rows,
        "photos": {"skipped": skipped, "rows": photo_rows},
    }
    out = Path(a.out)
    write_results(out, "real_images", record, markdown(record))
    grid_png(grid, out / "real_images.png", "render")
    if photo_grid:
        grid_png(photo_grid, out / "real_images_photos.png", "crop")
    return record


if __name__ == "__main__":
    main()
