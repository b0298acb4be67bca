"""The cost axis of edit quality: AdapEdit's default at fewer sampling steps and shorter
calibration passes, against the paper's setting (DDIM 50 steps, a full calibration pass), on the
quality suite of :mod:`benchmarks.quality` (the same edits, seeds and attribute reader).

For each setting — (scheduler, steps, calibration steps K) — every edit and seed is run with
``EditConfig(calibration_steps=K)`` and scored against its own source image (the source branch
of the same setting): success, preservation and UNet samples per edit (``4·N + 2·K``, counted in
calls: PNDM's extra call included). Per group (all, hard, soft, one of two), each setting's
difference from the paper's with a 95 % paired bootstrap interval over seeds (each edit's seeds
resampled, 1000 times; the first setting given is the baseline). A setting *holds* on a group
when neither its success nor its preservation is below the paper's beyond its interval (the
interval of the difference reaches 0). For every short calibration, τ against the full pass of
the same sampler: mean and max ``|Δτ|`` over the edit prompt's words, and whether the protected
set (the words under τ = 0.1, those FWT counts as "low") is unchanged.

Writes ``quality_cost.json``, ``quality_cost.md`` and ``quality_cost.png`` (quality against UNet
samples)::

    python -m benchmarks.quality_cost                  # the committed results
    python -m benchmarks.quality_cost --cases 2 --seeds 0 --settings ddim:4:4 ddim:4:2 \\
        --out /tmp/qc                                  # smoke run
"""

from __future__ import annotations

import argparse
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from adapedit.config import EditConfig, SamplerConfig
from benchmarks.common import machine_info, write_results
from benchmarks.quality import GROUPS, RESULTS, SUITE, in_group, read_image, score

LOW_TAU = 0.1  # FWT's "low" words (docs/algorithm.md: τ_default counts them)


@dataclass(frozen=True)
class Setting:
    """One point of the cost axis: ``scheduler`` at ``steps``, calibration at ``k`` steps
    (``k == steps``: the full pass)."""

    scheduler: str
    steps: int
    k: int

    @property
    def name(self) -> str:
        return f"{self.scheduler} {self.steps}, K {'full' if self.k == self.steps else self.k}"

    @property
    def spec(self) -> str:
        """``scheduler:steps:k``, as :meth:`parse` reads it."""
        return f"{self.scheduler}:{self.steps}:{self.k}"

    @classmethod
    def parse(cls, text: str) -> Setting:
        """``scheduler:steps:k`` (``k`` may be ``full``)."""
        scheduler, steps, k = text.split(":")
        return cls(scheduler, int(steps), int(steps) if k == "full" else int(k))


PAPER = Setting("ddim", 50, 50)
SETTINGS = (
    PAPER,
    Setting("ddim", 50, 10),
    Setting("ddim", 50, 5),
    Setting("ddim", 20, 20),
    Setting("ddim", 20, 10),
    Setting("ddim", 20, 5),
    Setting("dpmpp", 20, 20),
    Setting("dpmpp", 20, 10),
    Setting("dpmpp", 20, 5),
    Setting("dpmpp", 15, 5),
    Setting("dpmpp", 10, 10),
    Setting("dpmpp", 10, 5),
)


def unet_samples(pipe, s: Setting) -> int:
    """UNet samples of one edit: the edit pass at batch 4, the calibration pass at batch 2."""
    n = pipe.num_steps(SamplerConfig(steps=s.steps, scheduler=s.scheduler))
    k = pipe.num_steps(SamplerConfig(steps=s.k, scheduler=s.scheduler))
    return 4 * n + 2 * k


def tau_deviation(short: dict[str, float], full: dict[str, float]) -> dict:
    """τ per word of a short calibration against the full one: mean and max |Δτ| and whether
    the protected set (τ < :data:`LOW_TAU`) is the same."""
    d = [abs(short[w] - full[w]) for w in full]
    low = {w for w, t in full.items() if t < LOW_TAU}
    return {
        "mean_abs": float(np.mean(d)),
        "max_abs": float(np.max(d)),
        "protected_kept": low == {w for w, t in short.items() if t < LOW_TAU},
    }


def run(a: argparse.Namespace) -> dict:
    from tqdm import tqdm

    from adapedit.pipelines.pipeline import ReferencePipeline

    settings = [Setting.parse(s) for s in a.settings] if a.settings else list(SETTINGS)
    pipe = ReferencePipeline.from_model(a.model)  # the cache shares equal calibration passes
    cases = SUITE[: a.cases]
    rows = []
    t0 = time.perf_counter()
    for i, case in enumerate(tqdm(cases, desc="quality cost")):
        src_prompt, tgt_prompt = case.prompts
        for seed in a.seeds:
            taus: dict[tuple[str, int], dict[str, float]] = {}
            for s in settings:
                sampler = SamplerConfig(
                    steps=s.steps, scheduler=s.scheduler, seed=seed, guidance=a.guidance
                )
                t = time.perf_counter()
                r = pipe.edit(src_prompt, tgt_prompt, EditConfig(calibration_steps=s.k), sampler)
                seconds = time.perf_counter() - t
                tau = {
                    f"{j}:{w.word}": float(w.tau) for j, w in enumerate(r.tau.words)
                }  # position-tagged: a word may repeat
                if s.k == s.steps:
                    taus[s.scheduler, s.steps] = tau
                src = read_image(r.source_image)
                rows.append(
                    {
                        "case": i,
                        "kind": case.kind,
                        "pair": case.source.is_pair,
                        "seed": seed,
                        "setting": s.name,
                        "unet_samples": unet_samples(pipe, s),
                        "seconds": seconds,
                        "calibration": r.calibration,
                        "tau": tau,
                        **score(case, src, r.edited_image, r.source_image),
                    }
                )
            for row in rows[-len(settings) :]:
                s = next(x for x in settings if x.name == row["setting"])
                full = taus.get((s.scheduler, s.steps))
                if s.k != s.steps and full is not None:
                    row["tau_deviation"] = tau_deviation(row["tau"], full)
    wall = time.perf_counter() - t0
    return {
        "machine": machine_info(),
        "model": a.model,
        "guidance": a.guidance,
        "seeds": list(a.seeds),
        "cases": len(cases),
        "settings": [s.name for s in settings],
        "setting_specs": [s.spec for s in settings],
        "paper": settings[0].name,
        "bootstrap": a.bootstrap,
        "wall_s": round(wall, 1),
        "summary": summarise(rows, cases, list(a.seeds), settings, a.bootstrap),
        "rows": rows,
    }


def summarise(rows: list[dict], cases, seeds: list[int], settings, resamples: int) -> dict:
    """Per setting: UNet samples, mean seconds, and per group success and preservation (%)
    with the paired bootstrap interval of the difference from the first setting (the paper's);
    τ deviation of short calibrations."""
    index = {(r["setting"], r["case"], r["seed"]): r for r in rows}
    names = [s.name for s in settings]
    stack = np.array(
        [
            [
                [
                    [100 * float(index[n, c, s]["success"]), 100 * index[n, c, s]["preserved"]]
                    for s in seeds
                ]
                for c in range(len(cases))
            ]
            for n in names
        ]
    )  # [M, C, S, 2]
    rng = np.random.default_rng(0)
    draws = rng.integers(0, len(seeds), size=(resamples, len(cases), len(seeds)))
    out: dict = {}
    for m, name in enumerate(names):
        mine = [r for r in rows if r["setting"] == name]
        entry: dict = {
            "unet_samples": mine[0]["unet_samples"],
            "seconds_mean": float(np.mean([r["seconds"] for r in mine])),
            "calibration_cached": float(np.mean([r.get("calibration") == "cached" for r in mine])),
            "groups": {},
        }
        devs = [r["tau_deviation"] for r in mine if "tau_deviation" in r]
        if devs:
            entry["tau_deviation"] = {
                "mean_abs": float(np.mean([d["mean_abs"] for d in devs])),
                "max_abs": float(np.max([d["max_abs"] for d in devs])),
                "protected_kept": float(np.mean([d["protected_kept"] for d in devs])),
                "n": len(devs),
            }
        for g in GROUPS:
            in_g = np.array([in_group(g, c.kind, c.source.is_pair) for c in cases])
            if not in_g.any():
                continue
            cells = stack[:, in_g]  # [M, Cg, S, 2]
            point = cells[m].mean((0, 1))  # [2]
            group = {"n": int(in_g.sum() * len(seeds)), "success": float(point[0])}
            group["preserved"] = float(point[1])
            diff = cells[m] - cells[0]  # [Cg, S, 2] paired by edit and seed
            boot = np.array(
                [
                    np.take_along_axis(diff, d[:, :, None], axis=1).mean((0, 1))
                    for d in draws[:, in_g]
                ]
            )  # [R, 2]
            lo, hi = np.percentile(boot, [2.5, 97.5], axis=0)  # [2] each
            d = diff.mean((0, 1))
            group["diff"] = [float(d[0]), float(d[1])]
            group["diff_ci95"] = [[float(lo[0]), float(hi[0])], [float(lo[1]), float(hi[1])]]
            group["holds"] = bool(hi[0] >= 0 and hi[1] >= 0)
            entry["groups"][g] = group
        out[name] = entry
    return out


def resummarise(record: dict, resamples: int) -> dict:
    """``record`` (a ``quality_cost.json``) with its summary computed again from its rows."""
    specs = record.get("setting_specs") or [
        re.sub(r"^(\w+) (\d+), K (\w+)$", r"\1:\2:\3", n) for n in record["settings"]
    ]  # records written before the specs were
    settings = [Setting.parse(x) for x in specs]
    cases = SUITE[: record["cases"]]
    summary = summarise(record["rows"], cases, record["seeds"], settings, resamples)
    return {**record, "setting_specs": [x.spec for x in settings], "summary": summary}


def fast_setting(summary: dict) -> str | None:
    """The cheapest setting that holds on hard and on soft edits (None if none does)."""
    ok = [
        (v["unet_samples"], n)
        for n, v in summary.items()
        if all(v["groups"].get(g, {}).get("holds", False) for g in ("hard", "soft"))
    ]
    return min(ok)[1] if ok else None


def holds_everywhere(summary: dict, name: str) -> bool:
    """Whether setting ``name`` holds on every group of the suite (kinds included)."""
    return all(g.get("holds", False) for g in summary[name]["groups"].values())


#: The groups of the main table; the others (each kind) have a table of their own.
MAIN_GROUPS = ("all", "hard", "soft", "one of two")


def markdown(record: dict) -> str:
    s = record["summary"]
    paper = s.get(record["paper"])
    fast = fast_setting(s)
    lines = [
        f"# Edit quality against UNet work on the `{record['model']}` model",
        "",
        f"Measured on {record['machine']['cpu']}, {record['machine']['cpus']} CPUs; "
        f"{record['cases']} edits × seeds {record['seeds']}, guidance {record['guidance']}, "
        f"AdapEdit's default; {record['wall_s']:.0f} s in all. Differences from the paper's "
        f"setting ({record['paper']}) in percentage points with a 95 % paired bootstrap interval "
        f"over seeds; ✓: neither success nor preservation below the paper's beyond the interval. "
        "Seconds per edit are wall time with one calibration cache over the run: a setting whose "
        "calibration pass equals an earlier one's (same scheduler, K and start) reuses it, and the "
        "share of its edits that did is in brackets; the UNet samples count every pass.",
        "",
        f"**Cheapest setting that holds on hard and soft edits: {fast or 'none'}**"
        + (
            f" — {s[fast]['unet_samples']} UNet samples against {paper['unet_samples']} "
            f"({100 * s[fast]['unet_samples'] / paper['unet_samples']:.0f} %)."
            if fast and paper
            else "."
        ),
        "",
        "It holds on every group, each kind included: "
        + ("yes." if fast and holds_everywhere(s, fast) else "no."),
        "",
        "| setting | UNet samples | s/edit (CPU; cached calibrations) | "
        + " | ".join(f"{g}: success / preservation (Δ [95 % CI])" for g in MAIN_GROUPS)
        + " |",
        "|---|---|---|" + "---|" * len(MAIN_GROUPS),
    ]
    for name, v in s.items():
        cells = []
        for g in MAIN_GROUPS:
            x = v["groups"].get(g)
            if x is None:
                cells.append("–")
                continue
            cell = f"{x['success']:.0f} / {x['preserved']:.0f}"
            if "diff" in x and name != record["paper"]:
                (sl, sh), (pl, ph) = x["diff_ci95"]
                cell += (
                    f" ({x['diff'][0]:+.1f} [{sl:+.1f}, {sh:+.1f}] / "
                    f"{x['diff'][1]:+.1f} [{pl:+.1f}, {ph:+.1f}])" + (" ✓" if x["holds"] else " ✗")
                )
            cells.append(cell)
        lines.append(
            f"| {name} | {v['unet_samples']} | "
            f"{v['seconds_mean']:.2f} ({100 * v['calibration_cached']:.0f} %) | "
            + " | ".join(cells)
            + " |"
        )
    kinds = [g for g in GROUPS if g not in MAIN_GROUPS and paper and g in paper["groups"]]
    lines += [
        "",
        "## Per kind of edit: Δ success / Δ preservation from the paper's setting (✓ holds)",
        "",
        "| setting | " + " | ".join(f"{g} (n = {paper['groups'][g]['n']})" for g in kinds) + " |",
        "|---|" + "---|" * len(kinds),
    ]
    for name, v in list(s.items())[1:]:
        cells = []
        for g in kinds:
            x = v["groups"].get(g)
            cells.append(
                "–"
                if x is None
                else f"{x['diff'][0]:+.1f} / {x['diff'][1]:+.1f} {'✓' if x['holds'] else '✗'}"
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## τ of a short calibration against the full pass of the same sampler",
        "",
        "| setting | edits | mean abs Δτ | max abs Δτ | protected set (τ < 0.1) kept |",
        "|---|---|---|---|---|",
    ]
    for name, v in s.items():
        d = v.get("tau_deviation")
        if d:
            lines.append(
                f"| {name} | {d['n']} | {d['mean_abs']:.3f} | {d['max_abs']:.3f} | "
                f"{100 * d['protected_kept']:.0f} % |"
            )
    return "\n".join(lines) + "\n"


def plot(record: dict, path: Path) -> None:
    """Success and preservation (hard, soft) against UNet samples, one point per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = record["summary"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    metrics = (("success", "success %"), ("preserved", "preservation %"))
    for ax, (metric, label) in zip(axes, metrics, strict=True):
        for g, marker in (("hard", "o"), ("soft", "s")):
            xs = [v["unet_samples"] for v in s.values()]
            ys = [v["groups"][g][metric] for v in s.values() if g in v["groups"]]
            if len(ys) != len(xs):
                continue
            ax.scatter(xs, ys, marker=marker, label=g)
            for x, y, n in zip(xs, ys, s, strict=True):
                ax.annotate(n, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("UNet samples per edit")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"AdapEdit default on {record['model']}: quality against UNet work")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="shapes")
    ap.add_argument("--cases", type=int, default=len(SUITE), help="the first N edits of the suite")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument(
        "--settings",
        nargs="+",
        default=None,
        metavar="SCHEDULER:STEPS:K",
        help="settings to run (default: the committed axis; the paper's must be among them "
        "for the intervals)",
    )
    ap.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument(
        "--from-json",
        default=None,
        metavar="PATH",
        help="no edits: summarise the rows of an earlier run's quality_cost.json again",
    )
    a = ap.parse_args(argv)
    record = (
        resummarise(json.loads(Path(a.from_json).read_text()), a.bootstrap)
        if a.from_json
        else run(a)
    )
    out = Path(a.out)
    write_results(out, "quality_cost", record, markdown(record))
    plot(record, out / "quality_cost.png")
    return record


if __name__ == "__main__":
    main()
