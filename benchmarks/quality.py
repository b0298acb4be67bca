"""Edit quality on the shapes model (world v2), measured by the attribute reader (no learned
judge), with Prompt-to-Prompt's whole success-vs-preservation frontier.

A fixed suite of 24 edits — hard (colour, shape) and soft (size, position, count), 9 of them
touching one object of a two-object scene while the other must stay — over several seeds, each
run with every method:

- P2P refine over cross τ ∈ {0.2 … 1.0} × self τ ∈ {0.0 … 0.6} (20 points: the frontier);
- AdapEdit over λ_τ × λ_S (9 points, the default among them) and its ablations (without FWT,
  without DPS, without the DPS mask);
- the edit prompt alone from the same seed (no control), SDEdit over its strength, MasaCtrl.

The controlled configurations of one edit and seed run as one pass with one shared
calibration (``benchmarks.sweep``: the same images as separate edits, bit for bit); the source
image is that pass's source branch (plain generation of the source prompt). Per method and
group of edits:

- **success**: the reader finds the asked attribute (of the asked object) changed as asked;
- **preservation**: the share of the other attributes — the other object's included — that
  the edited image keeps, as read on the source image; and the pixel PSNR outside both images'
  objects;
- per group, P2P's Pareto frontier and every method's signed distance to it (percentage
  points, positive above), with a bootstrap interval over seeds for AdapEdit's default;
- and, once, the model's **text fidelity** on random captions of the training distribution.

Writes ``quality.json``, ``quality.md``, the image grid ``quality.png`` and the frontier plot
``quality_frontier.png``::

    python -m benchmarks.quality                      # the committed results
    python -m benchmarks.quality --cases 2 --seeds 0 --steps 3 --out /tmp/q   # smoke run
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from adapedit.algorithm.layout import CALIBRATION
from adapedit.config import ATTENTION_LIMITS, EditConfig, SamplerConfig
from adapedit.pipelines.masactrl import MasaCtrlConfig
from adapedit.shapes.reader import Reading, read_image
from adapedit.shapes.world import Mention, Scene, Thing, caption, with_attribute
from benchmarks.common import machine_info, write_results

RESULTS = Path(__file__).parent / "results"


@dataclass(frozen=True)
class EditCase:
    """One edit of the suite: a source scene and caption, the attribute to change, its new
    value and which object (of a pair) it belongs to."""

    kind: str  # colour | shape | size | position | count
    source: Scene
    mention: Mention
    attribute: str
    value: str | int
    index: int = 0

    @property
    def hard(self) -> bool:
        return self.kind in ("colour", "shape")

    @property
    def target(self) -> Scene:
        return with_attribute(self.source, self.attribute, self.value, self.index)

    @property
    def key(self) -> str:
        """The edited attribute's key (:meth:`Scene.attributes`)."""
        return f"{self.attribute}.{self.index}" if self.source.is_pair else self.attribute

    @property
    def prompts(self) -> tuple[str, str]:
        return caption(self.source, self.mention), caption(self.target, self.mention)

    def preserved(self) -> tuple[str, ...]:
        """The attribute keys the edit must leave alone (a count change re-lays the objects
        out, so it moves them too)."""
        moved = {self.key} | ({"position"} if self.attribute == "count" else set())
        return tuple(k for k in self.source.attribute_keys() if k not in moved)


def _one(shape: str, colour: str, size: str, position: str) -> Scene:
    return Scene.of(Thing(shape, colour, size, position))


def _two(a: tuple[str, ...], b: tuple[str, ...]) -> Scene:
    return Scene.of(Thing(*a), Thing(*b))


_PLAIN = Mention()
_ONE = Mention(article="one", position=False)
SUITE = (
    # hard: colour, on one object and on one object of two
    EditCase("colour", _one("circle", "red", "big", "left"), _PLAIN, "colour", "blue"),
    EditCase("colour", _one("square", "yellow", "small", "right"), _PLAIN, "colour", "green"),
    EditCase("colour", _one("triangle", "purple", "big", "top"), _PLAIN, "colour", "orange"),
    EditCase(
        "colour",
        _two(("circle", "red", "big", "left"), ("square", "blue", "big", "right")),
        _PLAIN,
        "colour",
        "green",
        1,
    ),
    EditCase(
        "colour",
        _two(("triangle", "yellow", "small", "top"), ("circle", "purple", "big", "bottom")),
        _PLAIN,
        "colour",
        "red",
        0,
    ),
    EditCase(
        "colour",
        _two(("square", "green", "big", "left"), ("triangle", "orange", "small", "right")),
        _PLAIN,
        "colour",
        "blue",
        0,
    ),
    # hard: shape
    EditCase("shape", _one("circle", "blue", "big", "centre"), _PLAIN, "shape", "square"),
    EditCase("shape", _one("triangle", "orange", "big", "top"), _PLAIN, "shape", "circle"),
    EditCase(
        "shape",
        _two(("circle", "red", "big", "left"), ("square", "blue", "small", "right")),
        _PLAIN,
        "shape",
        "triangle",
        0,
    ),
    EditCase(
        "shape",
        _two(("square", "yellow", "big", "top"), ("circle", "green", "big", "bottom")),
        _PLAIN,
        "shape",
        "square",
        1,
    ),
    EditCase(
        "shape",
        _two(("triangle", "purple", "small", "left"), ("circle", "orange", "big", "right")),
        _PLAIN,
        "shape",
        "square",
        1,
    ),
    # soft: size
    EditCase("size", _one("square", "red", "small", "centre"), _PLAIN, "size", "big"),
    EditCase("size", _one("triangle", "blue", "small", "left"), _PLAIN, "size", "big"),
    EditCase("size", _one("circle", "green", "big", "right"), _PLAIN, "size", "small"),
    EditCase(
        "size",
        _two(("circle", "red", "small", "left"), ("square", "blue", "big", "right")),
        _PLAIN,
        "size",
        "big",
        0,
    ),
    EditCase(
        "size",
        _two(("triangle", "green", "small", "top"), ("circle", "yellow", "small", "bottom")),
        _PLAIN,
        "size",
        "big",
        1,
    ),
    EditCase(
        "size",
        _two(("square", "purple", "big", "left"), ("circle", "orange", "big", "right")),
        _PLAIN,
        "size",
        "small",
        1,
    ),
    # soft: position
    EditCase("position", _one("circle", "green", "big", "left"), _PLAIN, "position", "right"),
    EditCase("position", _one("square", "purple", "small", "top"), _PLAIN, "position", "bottom"),
    EditCase("position", _one("triangle", "red", "small", "centre"), _PLAIN, "position", "left"),
    EditCase("position", _one("circle", "blue", "small", "right"), _PLAIN, "position", "top"),
    # soft: count
    EditCase("count", _one("circle", "red", "small", "centre"), _ONE, "count", 2),
    EditCase("count", _one("square", "blue", "small", "centre"), _ONE, "count", 2),
    EditCase("count", _one("triangle", "yellow", "small", "centre"), _ONE, "count", 3),
)
KINDS = ("colour", "shape", "size", "position", "count")
#: Groups of edits the summary and the frontier are computed over.
GROUPS = ("all", "hard", "soft", *KINDS, "one of two")


def in_group(group: str, kind: str, pair: bool) -> bool:
    """Whether an edit of ``kind`` (on one object of a pair or not) belongs to ``group``."""
    hard = kind in ("colour", "shape")
    return {"all": True, "hard": hard, "soft": not hard, "one of two": pair}.get(
        group, kind == group
    )


P2P_CROSS = (0.2, 0.4, 0.6, 0.8, 1.0)
P2P_SELF = (0.0, 0.2, 0.4, 0.6)
LAMBDA_TAU = (0.5, 1.0, 2.0)
LAMBDA_S = (0.5, 0.9, 1.0)
SDEDIT_STRENGTHS = (0.4, 0.6, 0.8)
DEFAULT = "adapedit"
#: Methods run through the edit controller (one pass per edit and seed), by name.
CONTROLLED: dict[str, EditConfig] = {
    **{
        f"p2p c{c} s{s}": EditConfig(use_fwt=False, use_dps=False, tau_fixed=c, tau_self_fixed=s)
        for c in P2P_CROSS
        for s in P2P_SELF
    },
    DEFAULT: EditConfig(),
    **{
        f"adapedit lt{lt} ls{ls}": EditConfig(lambda_tau=lt, lambda_s=ls)
        for lt in LAMBDA_TAU
        for ls in LAMBDA_S
        if EditConfig(lambda_tau=lt, lambda_s=ls) != EditConfig()
    },
    "no-fwt": EditConfig(use_fwt=False),
    "no-dps": EditConfig(use_dps=False),
    "no-dps-mask": EditConfig(dps_mask=False),
}
SDEDIT = {f"sdedit {s}": s for s in SDEDIT_STRENGTHS}
#: Run again with LocalBlend on the edits of one object of two: AdapEdit's default and P2P's
#: point nearest the one-of-two frontier's best.
BLENDED = (DEFAULT, "p2p c0.8 s0.0")
METHODS = (*CONTROLLED, "prompt-only", *SDEDIT, "masactrl")


def family(method: str) -> str:
    """p2p | adapedit (the default) | adapedit-sweep | ablation | prompt-only | sdedit |
    masactrl."""
    if method.startswith("p2p"):
        return "p2p"
    if method.startswith("adapedit "):
        return "adapedit-sweep"
    if method.startswith("sdedit"):
        return "sdedit"
    if method.startswith("no-"):
        return "ablation"
    return method


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
    before, after = src.attributes(case.source), got.attributes(case.target)
    kept = [before[k] == after[k] for k in case.preserved()]
    return {
        "success": after[case.key] == case.value,
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


def blend_words(case: EditCase) -> tuple[str, ...]:
    """LocalBlend's words for an edit of one object of two: the edited object's shape, in the
    source caption and (a shape edit) in the edit caption."""
    shapes = (case.source.things[case.index].shape, case.target.things[case.index].shape)
    return tuple(dict.fromkeys(shapes))


def blended(case: EditCase) -> dict[str, EditConfig]:
    """The methods run again with LocalBlend on an edit of one object of two (none else)."""
    if not case.source.is_pair:
        return {}
    words = blend_words(case)
    return {f"{m} + local blend": replace(CONTROLLED[m], local_blend=words) for m in BLENDED}


def edit_all(
    pipe, case: EditCase, sampler: SamplerConfig, attention_limits: str = "scaled"
) -> tuple[np.ndarray, dict]:
    """The source image and every method's edited image of one edit and seed (and, for an
    edit of one object of two, :func:`blended`'s), under ``attention_limits``."""
    from adapedit.pipelines.masactrl import masactrl_edit
    from benchmarks.sweep import sweep_edit

    src_prompt, tgt_prompt = case.prompts
    configs = {**CONTROLLED, **blended(case)}
    rule = [replace(c, attention_limits=attention_limits) for c in configs.values()]
    sweep = sweep_edit(pipe, src_prompt, tgt_prompt, rule, sampler)
    images = dict(zip(configs, sweep.edited_images, strict=True))
    images["prompt-only"] = pipe.generate(tgt_prompt, sampler).image
    for name, strength in SDEDIT.items():
        images[name] = sdedit(pipe, sweep.source_latent, tgt_prompt, sampler, strength)
    masa = masactrl_edit(pipe, src_prompt, tgt_prompt, MasaCtrlConfig(), sampler)
    if not np.array_equal(masa.source_image, sweep.source_image):
        raise AssertionError("MasaCtrl's source branch is not plain generation of the source")
    images["masactrl"] = masa.edited_image
    return sweep.source_image, images


def run(a: argparse.Namespace) -> tuple[dict, list]:
    from tqdm import tqdm

    from adapedit.pipelines.pipeline import ReferencePipeline
    from adapedit.shapes.fidelity import text_fidelity

    pipe = ReferencePipeline.from_model(a.model)
    cases = SUITE[: a.cases]
    rows, grid = [], []
    t0 = time.perf_counter()
    jobs = [(i, c, s) for i, c in enumerate(cases) for s in a.seeds]
    for i, case, seed in tqdm(jobs, desc="quality"):
        sampler = SamplerConfig(steps=a.steps, seed=seed, guidance=a.guidance)
        src_img, images = edit_all(pipe, case, sampler, a.attention_limits)
        src = read_image(src_img)
        got, want = src.attributes(case.source), case.source.attributes()
        fid = {k: got[k] == want[k] for k in case.mention.named(case.source)}
        src_prompt, tgt_prompt = case.prompts
        for name, img in images.items():
            rows.append(
                {
                    "case": i,
                    "kind": case.kind,
                    "hard": case.hard,
                    "pair": case.source.is_pair,
                    "source": src_prompt,
                    "target": tgt_prompt,
                    "seed": seed,
                    "method": name,
                    "source_read": got,
                    "source_fidelity": fid,
                    **score(case, src, img, src_img),
                }
            )
        if seed == a.seeds[0]:
            grid.append((f"{src_prompt} -> {tgt_prompt}", src_img, images))
    edit_s = time.perf_counter() - t0
    fid = text_fidelity(
        pipe, a.fidelity_samples, SamplerConfig(steps=a.steps, guidance=a.guidance), 1
    )
    record = {
        "machine": machine_info(),
        "model": a.model,
        "attention_limits": a.attention_limits,
        "steps": a.steps,
        "guidance": a.guidance,
        "seeds": list(a.seeds),
        "cases": len(cases),
        "methods": {k: v.to_dict() for k, v in CONTROLLED.items()},
        "sdedit_strengths": list(SDEDIT_STRENGTHS),
        "masactrl": "start step 4 of 50 and layer 10 of 16, scaled (adapedit.pipelines.masactrl)",
        "edit_wall_s": round(edit_s, 1),
        "wall_s": round(time.perf_counter() - t0, 1),
        "fidelity": fid,
        "summary": summarise(rows),
        "bootstrap": a.bootstrap,
        "frontier": frontiers(rows, cases, list(a.seeds), a.bootstrap),
        "local_blend": local_blend_effect(rows, a.bootstrap),
        "rows": rows,
    }
    return record, grid


def _mean(rows: list[dict], key: str) -> float:
    vals = [float(r[key]) for r in rows if np.isfinite(float(r[key]))]
    return float(np.mean(vals)) if vals else float("nan")


def summarise(rows: list[dict]) -> dict:
    """Per method and group: n, success, preservation and PSNR outside the objects; and the
    source generations' fidelity to their captions."""
    cases = {r["case"]: r for r in rows}
    out: dict = {}
    for m in METHODS:
        mine = [r for r in rows if r["method"] == m]
        out[m] = {}
        for g in GROUPS:
            rs = [r for r in mine if in_group(g, r["kind"], r["pair"])]
            if rs:
                out[m][g] = {
                    "n": len(rs),
                    "success": _mean(rs, "success"),
                    "preserved": _mean(rs, "preserved"),
                    "psnr_outside_db": _mean(rs, "psnr_outside_db"),
                }
    per: dict[str, list[bool]] = {}
    for r in (r for r in rows if r["method"] == DEFAULT):
        for k, ok in r["source_fidelity"].items():
            per.setdefault(k.split(".")[0], []).append(ok)
    out["source_fidelity"] = {k: float(np.mean(v)) for k, v in sorted(per.items())}
    out["cases_per_group"] = {
        g: sum(in_group(g, r["kind"], r["pair"]) for r in cases.values()) for g in GROUPS
    }
    return out


# -- the frontier ----------------------------------------------------------------------------


def pareto(points: np.ndarray) -> np.ndarray:
    """Indices of the non-dominated points of [n, 2] (success, preservation) — no other point
    is at least as good on both and better on one; of equal points the first — by success
    ascending (so preservation descending)."""
    keep = [
        i
        for i, p in enumerate(points)
        if not any((q >= p).all() and (q > p).any() for q in points)
        and not any((points[j] == p).all() for j in range(i))
    ]
    return np.array(sorted(keep, key=lambda i: (points[i, 0], -points[i, 1])), dtype=int)


def frontier_line(front: np.ndarray) -> np.ndarray:
    """The frontier drawn through Pareto points [m, 2] sorted by success: closed to the
    left at the first point's preservation and down to 0 below the last point's success."""
    return np.concatenate([[[0.0, front[0, 1]]], front, [[front[-1, 0], 0.0]]])  # [m + 2, 2]


def signed_distance(point: np.ndarray, line: np.ndarray) -> float:
    """Euclidean distance of ``point`` (x, y) to the polyline ``line`` [n, 2], positive when
    the point lies above or right of it (not reached by the methods that drew it)."""
    a, b = line[:-1], line[1:]  # segments [n-1, 2]
    ab = b - a
    t = np.clip(((point - a) * ab).sum(-1) / np.maximum((ab**2).sum(-1), 1e-12), 0.0, 1.0)
    dist = float(np.min(np.linalg.norm(a + t[:, None] * ab - point, axis=-1)))
    x_max = line[-1, 0]
    if point[0] > x_max:
        return dist
    height = float(np.interp(point[0], line[:-1, 0], line[:-1, 1]))  # the line's y at x
    return dist if point[1] > height else -dist


def _points(stack: np.ndarray, members: np.ndarray) -> np.ndarray:
    """Mean (success, preservation) per method [M, 2] over the (case, seed) cells selected by
    ``members`` [C, S] (bool) of ``stack`` [M, C, S, 2]."""
    w = members[None, :, :, None]
    return (stack * w).sum((1, 2)) / members.sum()


def frontiers(rows: list[dict], cases, seeds: list[int], resamples: int) -> dict:
    """Per group: P2P's Pareto frontier, every method's signed distance to it (percentage
    points) and, for AdapEdit's default, a 95 % bootstrap interval over seeds (each edit's
    seeds resampled with replacement; the frontier is redrawn in every resample)."""
    index = {(r["method"], r["case"], r["seed"]): r for r in rows}
    n_cases = len(cases)
    stack = np.array(
        [
            [
                [
                    [
                        100 * float(index[m, c, s]["success"]),
                        100 * index[m, c, s]["preserved"],
                    ]
                    for s in seeds
                ]
                for c in range(n_cases)
            ]
            for m in METHODS
        ]
    )  # [M, C, S, 2]
    p2p = np.array([family(m) == "p2p" for m in METHODS])
    default = METHODS.index(DEFAULT)
    rng = np.random.default_rng(0)
    draws = rng.integers(0, len(seeds), size=(resamples, n_cases, len(seeds)))
    out = {}
    for g in GROUPS:
        in_g = np.array([in_group(g, c.kind, c.source.is_pair) for c in cases])
        if not in_g.any():
            continue
        members = np.repeat(in_g[:, None], len(seeds), axis=1)
        pts = _points(stack, members)  # [M, 2]
        front = pts[p2p][pareto(pts[p2p])]
        line = frontier_line(front)
        dist = {m: signed_distance(pts[i], line) for i, m in enumerate(METHODS)}
        boot = []
        cells = stack[:, in_g]  # [M, Cg, S, 2]
        for d in draws[:, in_g]:  # d: [Cg, S] seed indices
            res = np.take_along_axis(cells, d[None, :, :, None], axis=2).mean((1, 2))  # [M, 2]
            res_line = frontier_line(res[p2p][pareto(res[p2p])])
            boot.append(signed_distance(res[default], res_line))
        lo, hi = np.percentile(boot, [2.5, 97.5]) if boot else (float("nan"),) * 2
        out[g] = {
            "points": {m: [float(pts[i, 0]), float(pts[i, 1])] for i, m in enumerate(METHODS)},
            "frontier": [[float(x), float(y)] for x, y in front],
            "frontier_methods": [m for i, m in enumerate(METHODS) if p2p[i] and _on(pts[i], front)],
            "distance": dist,
            "default_ci95": [float(lo), float(hi)],
        }
    return out


def _on(point: np.ndarray, front: np.ndarray) -> bool:
    return bool((np.abs(front - point).sum(-1) < 1e-9).any())


def claim(f: dict) -> str:
    """Above / below / on P2P's frontier, judged by the bootstrap interval."""
    lo, hi = f["default_ci95"]
    if lo > 0:
        return "above"
    if hi < 0:
        return "below"
    return "not separable"


def local_blend_effect(rows: list[dict], resamples: int, seed: int = 0) -> dict:
    """Per method of :data:`BLENDED`, over the edits of one object of two: success and
    preservation without and with LocalBlend, and the change of each with a 95 % bootstrap
    interval over the (edit, seed) pairs."""
    rng = np.random.default_rng(seed)
    out: dict = {}
    for m in BLENDED:
        by = {(r["case"], r["seed"]): r for r in rows if r["method"] == m and r["pair"]}
        lb = {(r["case"], r["seed"]): r for r in rows if r["method"] == f"{m} + local blend"}
        keys = sorted(by.keys() & lb.keys())
        if not keys:
            continue
        res: dict = {"n": len(keys)}
        for metric in ("success", "preserved"):
            a = np.array([float(by[k][metric]) for k in keys])
            b = np.array([float(lb[k][metric]) for k in keys])
            idx = rng.integers(0, len(keys), (resamples, len(keys)))
            boot = (b[idx] - a[idx]).mean(axis=1) * 100
            res[metric] = {
                "without": float(a.mean()),
                "with": float(b.mean()),
                "change_pp": float((b - a).mean() * 100),
                "ci95_pp": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
            }
        out[m] = res
    return out


# -- reports ---------------------------------------------------------------------------------


def verdict(record: dict) -> str:
    """The seed's claim — AdapEdit above P2P's frontier on soft edits — and the other groups."""
    f = record["frontier"]
    if "soft" not in f:
        return "No soft edits were run."
    soft = f["soft"]
    x, y = soft["points"][DEFAULT]
    d = soft["distance"][DEFAULT]
    lo, hi = soft["default_ci95"]
    holds = claim(soft) == "above"
    return (
        f"**The seed's claim — AdapEdit above P2P refine's frontier on soft edits — "
        f"{'holds' if holds else 'does NOT hold'}** here: on soft edits AdapEdit's default "
        f"reaches success {x:.0f} % at preservation {y:.0f} %, {_pp(d)} points from P2P's "
        f"frontier (95 % bootstrap interval over seeds {_pp(lo)} … {_pp(hi)}; "
        f"{claim(soft)})."
    )


def _pp(x: float) -> str:
    """Signed percentage points to one decimal, with no negative zero ("+0.0", not "-0.0")."""
    return f"{round(float(x), 1) + 0.0:+.1f}"


def _fmt_point(p: list[float]) -> str:
    return f"{p[0]:.0f} / {p[1]:.0f}"


def local_blend_markdown(effect: dict) -> str:
    """The LocalBlend section of the report (empty without edits of one object of two)."""
    if not effect:
        return ""
    lines = [
        "## LocalBlend on the edits of one object of two",
        "",
        "The same edits run again with LocalBlend on the edited object's shape word(s); "
        "success and preservation in %, change in percentage points with a 95 % bootstrap "
        "interval over the (edit, seed) pairs.",
        "",
        "| method | n | success without → with | change [95 % CI] | preservation without → "
        "with | change [95 % CI] |",
        "|---|---|---|---|---|---|",
    ]
    for m, e in effect.items():
        s, p = e["success"], e["preserved"]
        lines.append(
            f"| {m} | {e['n']} | {100 * s['without']:.0f} → {100 * s['with']:.0f} | "
            f"{_pp(s['change_pp'])} [{_pp(s['ci95_pp'][0])}, {_pp(s['ci95_pp'][1])}] | "
            f"{100 * p['without']:.0f} → {100 * p['with']:.0f} | {_pp(p['change_pp'])} "
            f"[{_pp(p['ci95_pp'][0])}, {_pp(p['ci95_pp'][1])}] |"
        )
    return "\n".join(lines) + "\n\n"


def markdown(record: dict) -> str:
    s = record["summary"]
    f = record["frontier"]
    fid = record["fidelity"]
    groups = [g for g in GROUPS if g in f]
    pct = lambda v: f"{100 * v:.0f}"  # noqa: E731
    head = "| method | " + " | ".join(groups) + " |\n|---|" + "---|" * len(groups) + "\n"

    def table(methods, cell) -> str:
        lines = [
            f"| {m} | " + " | ".join(cell(m, g) if g in s[m] else "–" for g in groups) + " |"
            for m in methods
        ]
        return head + "\n".join(lines) + "\n"

    both = lambda m, g: f"{pct(s[m][g]['success'])} / {pct(s[m][g]['preserved'])}"  # noqa: E731
    adapedit = [m for m in METHODS if family(m) in ("adapedit", "adapedit-sweep")]
    frontier_rows = []
    for g in groups:
        fg = f[g]
        dist = fg["distance"]
        lo, hi = fg["default_ci95"]
        front = ", ".join(
            f"{m.removeprefix('p2p ')} ({_fmt_point(fg['points'][m])})"
            for m in fg["frontier_methods"]
        )
        best = max(adapedit, key=lambda m: dist[m])
        frontier_rows.append(
            f"| {g} | {s[DEFAULT][g]['n']} | {front} | {_fmt_point(fg['points'][DEFAULT])} | "
            f"{_pp(dist[DEFAULT])} [{_pp(lo)}, {_pp(hi)}] | {claim(fg)} | "
            f"{_pp(dist[best])} ({best.removeprefix('adapedit').strip() or 'default'}) | "
            f"{_pp(dist['masactrl'])} | {_pp(max(dist[m] for m in SDEDIT))} | "
            f"{_pp(dist['prompt-only'])} |"
        )
    key = [
        "p2p c0.8 s0.4",
        DEFAULT,
        "no-fwt",
        "no-dps",
        "no-dps-mask",
        "prompt-only",
        "sdedit 0.6",
        "masactrl",
    ]
    n = len(record["seeds"])
    return (
        f"# Edit quality on the `{record['model']}` model\n\n"
        f"Measured on {record['machine']['description']}; {record['cases']} edits × "
        f"{n} seeds {record['seeds']} × {len(METHODS)} methods, {record['steps']} DDIM steps, "
        f"guidance {record['guidance']}, attention rule `{record.get('attention_limits')}`; "
        "every image read by `adapedit.shapes.reader` (no "
        f"learned weights). Wall time {record['wall_s']:.0f} s ({record['edit_wall_s']:.0f} s "
        "of edits, the rest text fidelity).\n\n"
        f"{verdict(record)}\n\n"
        + local_blend_markdown(record.get("local_blend", {}))
        + "## AdapEdit against P2P refine's frontier\n\n"
        "Success / preservation in %. P2P refine was run at cross τ "
        f"{list(P2P_CROSS)} × self τ {list(P2P_SELF)}; its Pareto frontier (the points no other "
        "P2P point beats on both) is drawn through them, closed to the left and downwards. "
        "Distance: signed Euclidean distance to that line in percentage points (positive: "
        "beyond what P2P reaches); interval: 95 % bootstrap over seeds (each edit's seeds "
        "resampled, frontier redrawn, "
        f"{record['bootstrap']} resamples).\n\n"
        "| edits | n | P2P frontier (c = cross τ, s = self τ) | AdapEdit default | distance "
        "[95 % CI] | verdict | best AdapEdit λ | MasaCtrl | best SDEdit | prompt alone |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(frontier_rows) + "\n\n"
        "## Key methods: success / preservation (%)\n\n"
        + table(key, both)
        + "\n## Edit success (% of edits whose asked attribute reads as asked)\n\n"
        + table(METHODS, lambda m, g: pct(s[m][g]["success"]))
        + "\n## Preservation (% of the other attributes kept)\n\n"
        + table(METHODS, lambda m, g: pct(s[m][g]["preserved"]))
        + "\n## Pixel PSNR outside the objects (dB, source vs edited)\n\n"
        + table(key, lambda m, g: f"{s[m][g]['psnr_outside_db']:.1f}")
        + "\n## Text fidelity\n\n"
        f"Random captions from the training distribution ({fid['samples']} samples, "
        f"{record['steps']} steps): {pct(fid['all'])} % of named attributes read as captioned ("
        + ", ".join(f"{k} {pct(v)} %" for k, v in fid["attributes"].items())
        + ").\n\nThe suite's source generations: "
        + ", ".join(f"{k} {pct(v)} %" for k, v in s["source_fidelity"].items())
        + ".\n\nMethods: `p2p cX sY` = P2P refine (no FWT, no DPS) with cross τ X and self τ Y; "
        "`adapedit` = FWT + DPS at the paper's defaults (λ_τ 1, λ_S 0.9); `adapedit ltX lsY` = "
        "λ_τ X, λ_S Y; `no-fwt` / `no-dps` / `no-dps-mask` = AdapEdit without that part; "
        "`prompt-only` = the edit prompt from the same seed; `sdedit X` = the source latent "
        "noised to strength X and denoised with the edit prompt; `masactrl` = MasaCtrl "
        f"({record['masactrl']}). `quality.png`: the first seed of every edit (source, then "
        "key methods); `quality_frontier.png`: the frontier per group.\n"
    )


def grid_png(grid: list, path: Path, methods: list[str]) -> None:
    """Rows: edits (first seed); columns: source, then ``methods`` (tiles 128 px)."""
    from PIL import Image, ImageDraw

    from adapedit.io import atomic_write_bytes, png_bytes

    side = grid[0][1].shape[0] * max(1, 128 // grid[0][1].shape[0])
    label_h, title_h = 14, 12
    cols = ("source", *methods)
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


_STYLE = {  # family → matplotlib style
    "p2p": {"color": "0.55", "marker": "o", "s": 18, "label": "P2P refine (τ grid)"},
    "adapedit-sweep": {"color": "tab:blue", "marker": ".", "s": 40, "label": "AdapEdit λ_τ × λ_S"},
    "adapedit": {"color": "tab:red", "marker": "*", "s": 160, "label": "AdapEdit (default)"},
    "ablation": {"color": "tab:orange", "marker": "^", "s": 40, "label": "ablations"},
    "prompt-only": {"color": "black", "marker": "x", "s": 50, "label": "edit prompt alone"},
    "sdedit": {"color": "tab:green", "marker": "s", "s": 30, "label": "SDEdit (strength)"},
    "masactrl": {"color": "tab:purple", "marker": "D", "s": 50, "label": "MasaCtrl"},
}


def frontier_png(record: dict, path: Path) -> None:
    """Success (x) against preservation (y) per group: every method, P2P's frontier."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from adapedit.io import atomic_write_bytes

    f = record["frontier"]
    groups = [g for g in GROUPS if g in f]
    cols = 3
    rows = -(-len(groups) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.9 * rows), squeeze=False)
    for ax, g in zip(axes.flat, groups, strict=False):
        pts = f[g]["points"]
        line = frontier_line(np.array(f[g]["frontier"]))
        ax.plot(line[:, 0], line[:, 1], color="0.3", lw=1.2, label="P2P frontier")
        for fam, style in _STYLE.items():
            ms = [m for m in METHODS if family(m) == fam]
            xy = np.array([pts[m] for m in ms])
            ax.scatter(xy[:, 0], xy[:, 1], zorder=3, **style)
        lo, hi = f[g]["default_ci95"]
        n = record["summary"][DEFAULT][g]["n"]
        ax.set_title(
            f"{g} ({n // len(record['seeds'])} edits): AdapEdit {_pp(f[g]['distance'][DEFAULT])}"
            f" [{_pp(lo)}, {_pp(hi)}]",
            fontsize=9,
        )
        ax.set_xlim(-3, 103)
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
        ax.set_xlabel("edit success %", fontsize=8)
        ax.set_ylabel("preservation %", fontsize=8)
    for ax in list(axes.flat)[len(groups) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    fig.suptitle(
        f"Edit success vs preservation on `{record['model']}`: distance of AdapEdit's default "
        "to P2P refine's frontier [95 % bootstrap CI over seeds], percentage points",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.06, 1, 0.96))
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


GRID_METHODS = [
    "prompt-only",
    "p2p c0.2 s0.0",
    "p2p c0.8 s0.4",
    "p2p c1.0 s0.6",
    DEFAULT,
    "no-fwt",
    "no-dps",
    "sdedit 0.6",
    "masactrl",
]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="shapes")
    ap.add_argument("--cases", type=int, default=len(SUITE), help="the first N edits of the suite")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--fidelity-samples", type=int, default=200)
    ap.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    ap.add_argument(
        "--attention-limits", choices=ATTENTION_LIMITS, default="scaled", help="the rule"
    )
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--stem", default="quality", help="<stem>.{json,md,png}, <stem>_frontier.png")
    a = ap.parse_args(argv)
    record, grid = run(a)
    out = Path(a.out)
    write_results(out, a.stem, record, markdown(record))
    grid_png(grid, out / f"{a.stem}.png", GRID_METHODS)
    pairs = [g for g in grid if any(m.endswith("+ local blend") for m in g[2])]
    if pairs:
        columns = [x for m in BLENDED for x in (m, f"{m} + local blend")]
        grid_png(pairs, out / f"{a.stem}_local_blend.png", columns)
    frontier_png(record, out / f"{a.stem}_frontier.png")
    return record


if __name__ == "__main__":
    main()
