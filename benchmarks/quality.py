"""Edit quality on the shapes model, measured by the attribute reader (no learned judge).

A fixed suite of edits — hard (colour swap, shape swap) and soft (small → big, left → right,
one → two, adding a colour) — over several seeds, each run with: P2P refine (fixed τ 0.8),
AdapEdit (FWT + DPS), AdapEdit without FWT, without DPS, without the DPS mask, the edit prompt
alone from the same seed (no control) and an SDEdit-style baseline (the source latent noised to
``--sdedit-strength`` and denoised with the edit prompt). Per method and edit kind:

- **success**: the reader finds the asked attribute changed as asked;
- **preservation**: the share of the other attributes (as read on the source image) that the
  edited image keeps, and the pixel PSNR outside both images' objects;
- and, once, the **text fidelity** of the source generations and of a random sample of
  captions from the training distribution (the model's own accuracy).

Writes ``quality.json``, ``quality.md`` and the image grid ``quality.png``::

    python -m benchmarks.quality                      # the committed table (≈ 10 min, 2 CPUs)
    python -m benchmarks.quality --cases 2 --seeds 0 --steps 4 --out /tmp/q   # smoke run
"""

from __future__ import annotations

import argparse
import random
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from adapedit.config import EditConfig, SamplerConfig
from adapedit.layout import CALIBRATION
from adapedit.shapes.reader import Reading, caption_matches, read_image
from adapedit.shapes.world import ATTRIBUTES, Mention, Scene, caption, sample_scene, with_attribute
from benchmarks.common import machine_info, write_results

RESULTS = Path(__file__).parent / "results"


@dataclass(frozen=True)
class EditCase:
    """One edit of the suite: a source scene and caption, and the attribute to change."""

    kind: str  # colour | shape | size | position | count | add-colour
    source: Scene
    mention: Mention
    attribute: str
    value: str | int

    @property
    def hard(self) -> bool:
        return self.kind in ("colour", "shape")

    @property
    def target(self) -> Scene:
        return with_attribute(self.source, self.attribute, self.value)

    @property
    def prompts(self) -> tuple[str, str]:
        after = replace(self.mention, colour=True)
        return caption(self.source, self.mention), caption(self.target, after)

    def preserved(self) -> tuple[str, ...]:
        """The attributes the edit must leave alone (a count change re-lays the objects out)."""
        moved = {"count", "position"} if self.attribute == "count" else {self.attribute}
        return tuple(a for a in ATTRIBUTES if a not in moved)


_PLAIN = Mention()
_ONE = Mention(article="one", position=False)
_NO_COLOUR = Mention(colour=False)
SUITE = (
    EditCase("colour", Scene("circle", "red", "big", "left"), _PLAIN, "colour", "blue"),
    EditCase("shape", Scene("circle", "blue", "big", "centre"), _PLAIN, "shape", "square"),
    EditCase("size", Scene("square", "red", "small", "centre"), _PLAIN, "size", "big"),
    EditCase("position", Scene("circle", "green", "big", "left"), _PLAIN, "position", "right"),
    EditCase("count", Scene("circle", "red", "small", "centre"), _ONE, "count", 2),
    EditCase("add-colour", Scene("circle", "green", "big", "left"), _NO_COLOUR, "colour", "red"),
    EditCase("colour", Scene("square", "yellow", "small", "right"), _PLAIN, "colour", "green"),
    EditCase("shape", Scene("triangle", "orange", "big", "top"), _PLAIN, "shape", "circle"),
    EditCase("size", Scene("triangle", "blue", "small", "left"), _PLAIN, "size", "big"),
    EditCase("position", Scene("square", "purple", "small", "top"), _PLAIN, "position", "bottom"),
    EditCase("count", Scene("square", "blue", "small", "centre"), _ONE, "count", 2),
    EditCase("add-colour", Scene("square", "blue", "big", "right"), _NO_COLOUR, "colour", "yellow"),
)
KINDS = ("colour", "shape", "size", "position", "count", "add-colour")
#: Edit methods run through the controller, by name.
CONTROLLED = {
    "p2p-refine": EditConfig(use_fwt=False, use_dps=False, tau_fixed=0.8),
    "adapedit": EditConfig(),
    "no-fwt": EditConfig(use_fwt=False),
    "no-dps": EditConfig(use_dps=False),
    "no-dps-mask": EditConfig(dps_mask=False),
}
METHODS = (*CONTROLLED, "prompt-only", "sdedit")


def psnr_outside(a: np.ndarray, b: np.ndarray, ra: Reading, rb: Reading, grow: int = 2) -> float:
    """PSNR (dB) of two uint8 images [H, W, 3] over the pixels outside both images' objects
    (masks grown by ``grow`` pixels); ∞ when they agree there exactly."""
    mask = ra.mask | rb.mask  # [H, W]
    for _ in range(grow):
        m = mask.copy()
        m[1:] |= mask[:-1]
        m[:-1] |= mask[1:]
        m[:, 1:] |= mask[:, :-1]
        m[:, :-1] |= mask[:, 1:]
        mask = m
    keep = ~mask
    if not keep.any():
        return float("nan")
    mse = ((a[keep].astype(np.float64) - b[keep].astype(np.float64)) ** 2).mean()
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def score(case: EditCase, src: Reading, edited: np.ndarray, src_img: np.ndarray) -> dict:
    """Success, attribute preservation and PSNR outside the objects of one edited image."""
    got = read_image(edited)
    before, after = src.attributes(), got.attributes()
    kept = [before[a] == after[a] for a in case.preserved()]
    return {
        "success": after[case.attribute] == case.value,
        "preserved": float(np.mean(kept)),
        "psnr_outside_db": psnr_outside(src_img, edited, src, got),
        "read": after,
    }


def sdedit(pipe, latent, prompt: str, sampler: SamplerConfig, strength: float) -> np.ndarray:
    """SDEdit: the clean source latent [1, 4, h, w] noised to ``strength`` of the schedule
    (noise from the sampler's seed + 1) and denoised with ``prompt``."""
    import torch

    start = round(sampler.steps * (1 - strength))
    gen = torch.Generator().manual_seed(sampler.seed + 1)
    noise = torch.randn(latent.shape, generator=gen).to(latent)
    emb = pipe.encode(["", prompt])
    pipe.prepare(EditConfig(), tuple(latent.shape[-2:]), (CALIBRATION.size,))
    z = pipe.denoise(latent, emb, sampler, start=start, noise=noise, desc="sdedit")
    return pipe.decode(z)[0]


def fidelity(pipe, n: int, sampler: SamplerConfig, seed: int) -> dict:
    """The model's own text fidelity on ``n`` random training-distribution captions."""
    rng = random.Random(seed)
    per: dict[str, list[bool]] = defaultdict(list)
    for i in range(n):
        scene, mention = sample_scene(rng)
        img = pipe.generate(caption(scene, mention), replace(sampler, seed=i))
        for a, ok in caption_matches(read_image(img.image), scene, mention).items():
            per[a].append(ok)
    every = [ok for oks in per.values() for ok in oks]
    return {
        "samples": n,
        "attributes": {a: float(np.mean(v)) for a, v in per.items()},
        "all": float(np.mean(every)) if every else float("nan"),
    }


def run(a: argparse.Namespace) -> tuple[dict, list]:
    from tqdm import tqdm

    from adapedit.pipeline import ReferencePipeline

    pipe = ReferencePipeline.from_model(a.model)
    cases = SUITE[: a.cases]
    rows, grid = [], []
    t0 = time.perf_counter()
    jobs = [(c, s) for c in cases for s in a.seeds]
    for case, seed in tqdm(jobs, desc="quality"):
        sampler = SamplerConfig(steps=a.steps, seed=seed, guidance=a.guidance)
        src_prompt, tgt_prompt = case.prompts
        images, src_latent = {}, None
        for name, edit in CONTROLLED.items():
            # an edit's source branch is the plain generation of the source, bit for bit
            r = pipe.edit(src_prompt, tgt_prompt, edit, sampler, record_latents=src_latent is None)
            if src_latent is None:
                src_img, src_latent = r.source_image, r.latents[-1][:1]  # [1, 4, h, w]
            images[name] = r.edited_image
        src = read_image(src_img)
        images["prompt-only"] = pipe.generate(tgt_prompt, sampler).image
        images["sdedit"] = sdedit(pipe, src_latent, tgt_prompt, sampler, a.sdedit_strength)
        fid = caption_matches(src, case.source, case.mention)
        for name, img in images.items():
            rows.append(
                {
                    "kind": case.kind,
                    "hard": case.hard,
                    "source": src_prompt,
                    "target": tgt_prompt,
                    "seed": seed,
                    "method": name,
                    "source_read": src.attributes(),
                    "source_fidelity": fid,
                    **score(case, src, img, src_img),
                }
            )
        if seed == a.seeds[0]:
            grid.append((f"{src_prompt} -> {tgt_prompt}", src_img, images))
    fid = fidelity(pipe, a.fidelity_samples, SamplerConfig(steps=a.steps, guidance=a.guidance), 1)
    record = {
        "machine": machine_info(),
        "model": a.model,
        "steps": a.steps,
        "guidance": a.guidance,
        "seeds": list(a.seeds),
        "sdedit_strength": a.sdedit_strength,
        "methods": {k: v.to_dict() for k, v in CONTROLLED.items()},
        "wall_s": round(time.perf_counter() - t0, 1),
        "fidelity": fid,
        "summary": summarise(rows),
        "rows": rows,
    }
    return record, grid


def _mean(rows: list[dict], key: str) -> float:
    vals = [float(r[key]) for r in rows if np.isfinite(float(r[key]))]
    return float(np.mean(vals)) if vals else float("nan")


def summarise(rows: list[dict]) -> dict:
    """Per method: success, preservation and PSNR per edit kind, over hard and soft edits."""
    out: dict = {}
    for m in METHODS:
        mine = [r for r in rows if r["method"] == m]
        groups = {k: [r for r in mine if r["kind"] == k] for k in KINDS}
        groups["hard"] = [r for r in mine if r["hard"]]
        groups["soft"] = [r for r in mine if not r["hard"]]
        out[m] = {
            g: {
                "n": len(rs),
                "success": _mean(rs, "success"),
                "preserved": _mean(rs, "preserved"),
                "psnr_outside_db": _mean(rs, "psnr_outside_db"),
            }
            for g, rs in groups.items()
            if rs
        }
    src = [r for r in rows if r["method"] == METHODS[0]]
    per = defaultdict(list)
    for r in src:
        for k, ok in r["source_fidelity"].items():
            per[k].append(ok)
    out["source_fidelity"] = {k: float(np.mean(v)) for k, v in per.items()}
    return out


def verdict(summary: dict) -> str:
    """The issue's goal on soft edits: AdapEdit's success above P2P refine's with preservation
    no more than 2 points lower."""
    ours, p2p = summary["adapedit"].get("soft"), summary["p2p-refine"].get("soft")
    if not ours or not p2p:
        return "no soft edits were run"
    d_s = 100 * (ours["success"] - p2p["success"])
    d_p = 100 * (ours["preserved"] - p2p["preserved"])
    met = d_s > 0 and d_p >= -2
    return (
        f"Soft edits: AdapEdit success {100 * ours['success']:.0f} % vs P2P refine "
        f"{100 * p2p['success']:.0f} % ({d_s:+.0f} points), attribute preservation "
        f"{100 * ours['preserved']:.0f} % vs {100 * p2p['preserved']:.0f} % ({d_p:+.0f} points), "
        f"PSNR outside the objects {ours['psnr_outside_db']:.1f} vs {p2p['psnr_outside_db']:.1f} "
        f"dB. Goal (higher success, preservation at most 2 points lower): "
        f"{'met' if met else 'NOT met'}."
    )


def markdown(record: dict) -> str:
    s = record["summary"]
    fid = record["fidelity"]
    groups = [*KINDS, "hard", "soft"]
    head = "| method | " + " | ".join(groups) + " |\n|---|" + "---|" * len(groups) + "\n"

    def table(key: str, fmt) -> str:
        lines = []
        for m in METHODS:
            cells = [fmt(s[m][g][key]) if g in s[m] else "–" for g in groups]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        return head + "\n".join(lines) + "\n"

    pct = lambda v: f"{100 * v:.0f}"  # noqa: E731
    n = len(record["seeds"])
    return (
        f"# Edit quality on the `{record['model']}` model\n\n"
        f"Measured on {record['machine']['description']}; {record['steps']} DDIM steps, "
        f"guidance {record['guidance']}, seeds {record['seeds']} ({n} per edit), every image "
        f"read by `adapedit.shapes.reader` (no learned weights); {record['wall_s']:.0f} s.\n\n"
        f"{verdict(s)}\n\n"
        f"## Edit success (% of edits whose asked attribute reads as asked)\n\n"
        + table("success", pct)
        + "\n## Preservation (% of the other attributes kept)\n\n"
        + table("preserved", pct)
        + "\n## Pixel PSNR outside the objects (dB, source vs edited)\n\n"
        + table("psnr_outside_db", lambda v: f"{v:.1f}")
        + "\n## Text fidelity\n\n"
        f"Random captions from the training distribution ({fid['samples']} samples): "
        f"{pct(fid['all'])} % of named attributes read as captioned ("
        + ", ".join(f"{k} {pct(v)} %" for k, v in fid["attributes"].items())
        + ").\n\nThe suite's source generations: "
        + ", ".join(f"{k} {pct(v)} %" for k, v in s["source_fidelity"].items())
        + ".\n\nMethods: p2p-refine = no FWT, no DPS, τ 0.8 (self 0.4); adapedit = FWT + DPS; "
        "no-fwt / no-dps / no-dps-mask = AdapEdit without that part; prompt-only = the edit "
        f"prompt from the same seed; sdedit = source latent noised to strength "
        f"{record['sdedit_strength']} and denoised with the edit prompt. `quality.png`: the "
        "first seed of every edit (source, then each method).\n"
    )


def grid_png(grid: list, path: Path) -> None:
    """Rows: edits (first seed); columns: source, then each method (tiles ≥ 192 px)."""
    from PIL import Image, ImageDraw

    from adapedit.io import atomic_write_bytes, png_bytes

    side = grid[0][1].shape[0] * max(1, 192 // grid[0][1].shape[0])
    label_h, title_h = 14, 12
    cols = ("source", *METHODS)
    w = side * len(cols)
    h = label_h + len(grid) * (title_h + side)
    canvas = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(canvas)
    for j, name in enumerate(cols):
        draw.text((j * side + 2, 1), name, fill="black")
    for i, (title, src, images) in enumerate(grid):
        y = label_h + i * (title_h + side)
        draw.text((2, y), title, fill="black")
        for j, name in enumerate(cols):
            img = src if name == "source" else images[name]
            tile = Image.fromarray(img).resize((side, side), Image.Resampling.NEAREST)
            canvas.paste(tile, (j * side, y + title_h))
    atomic_write_bytes(path, png_bytes(canvas))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="shapes")
    ap.add_argument("--cases", type=int, default=len(SUITE), help="the first N edits of the suite")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--sdedit-strength", type=float, default=0.6)
    ap.add_argument("--fidelity-samples", type=int, default=100)
    ap.add_argument("--out", default=str(RESULTS))
    a = ap.parse_args(argv)
    record, grid = run(a)
    out = Path(a.out)
    write_results(out, "quality", record, markdown(record))
    grid_png(grid, out / "quality.png")
    print(markdown(record))
    return record


if __name__ == "__main__":
    main()
