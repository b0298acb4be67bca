"""How much of the latent LocalBlend's mask covers, step by step, on the quality suite's edits of
one object of two (the case LocalBlend exists for), for each map resolution and max-pool window
— the measurement behind the ``scaled`` attention rule's LocalBlend
(``adapedit.algorithm.geometry``).

    OMP_NUM_THREADS=1 python -m benchmarks.local_blend [--steps 20] [--seeds 0 1 2]

Every edit runs on the PyTorch reference of ``--model`` with LocalBlend on the edited object's
shape word(s) (:func:`benchmarks.quality.blend_words`) at threshold 0.3. The map resolution
(the downscale of the cross-attention layers the maps come from) and the pool window are set
for the study by replacing the controller's constant and mask function; the two rules' own
settings are rows of the table. A mask that is all ones on more than 90 % of the steps does not
localise. Writes ``<stem>.json`` and ``<stem>.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import itertools
import os
from pathlib import Path

import numpy as np

from benchmarks.common import machine_info, write_results

RESULTS = Path(__file__).parent / "results"
DOWNSCALES = (4, 2, 1)
POOLS = (3, 1)


def coverage(pipe, downscale: int, pool: int, steps: int, seeds: list[int]) -> list[float]:
    """The mask's share of the latent at every LocalBlend step of every one-of-two edit."""
    import adapedit.pipelines.controller as controller
    from adapedit.algorithm.blend import local_blend_mask
    from adapedit.config import EditConfig, SamplerConfig
    from benchmarks.quality import SUITE, blend_words

    seen: list[float] = []

    def mask(maps, latent_hw, threshold, _pool):
        m = local_blend_mask(maps, latent_hw, threshold, pool)
        seen.append(float(m.mean()))
        return m

    saved = controller.BLEND_DOWNSCALE, controller.local_blend_mask
    controller.BLEND_DOWNSCALE, controller.local_blend_mask = downscale, mask
    try:
        for case in (c for c in SUITE if c.source.is_pair):
            source, target = case.prompts
            config = EditConfig(local_blend=blend_words(case), local_blend_threshold=0.3)
            for seed in seeds:
                pipe.edit(source, target, config, SamplerConfig(steps=steps, seed=seed))
    finally:
        controller.BLEND_DOWNSCALE, controller.local_blend_mask = saved
    return seen


def markdown(rec: dict) -> str:
    m = rec["machine"]
    side = rec["latent"][0]
    lines = [
        "# LocalBlend's mask coverage on edits of one object of two",
        "",
        f"Measured on {m['description']}; `{rec['model']}` model (a {side}×{side} latent), "
        f"PyTorch reference, the quality suite's {rec['edits']} edits of one object of two × "
        f"seeds {rec['seeds']}, {rec['steps']} DDIM steps, LocalBlend on the edited object's "
        f"shape word(s), threshold 0.3; OMP_NUM_THREADS={rec['omp_threads']}. A row's steps are "
        "every step of every edit where the mask applied.",
        "",
        "| maps (downscale) | max-pool | rule | steps | mask all ones | mask < 70 % | mean |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rec["rows"]:
        lines.append(
            f"| {side // r['downscale']}×{side // r['downscale']} (1/{r['downscale']}) | "
            f"{r['pool']}×{r['pool']} | {r['rule'] or ''} | {r['steps']} | "
            f"{100 * r['all_ones']:.0f} % | {100 * r['below_70']:.0f} % | "
            f"{100 * r['mean']:.0f} % |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="shapes")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--stem", default="local_blend_coverage")
    a = ap.parse_args(argv)
    from adapedit.algorithm.geometry import BLEND_DOWNSCALE, blend_pool
    from adapedit.config import SamplerConfig
    from adapedit.pipelines.pipeline import ReferencePipeline
    from benchmarks.quality import SUITE

    pipe = ReferencePipeline.from_model(a.model)
    pipe.use_calibration_cache(None)  # each edit's own calibration, as in the suite
    latent = pipe.latent_hw(SamplerConfig())
    rules = {
        (BLEND_DOWNSCALE, blend_pool(rule, latent)): rule for rule in ("p2p-literal", "scaled")
    }
    rows = []
    for downscale, pool in itertools.product(DOWNSCALES, POOLS):
        cov = np.array(coverage(pipe, downscale, pool, a.steps, a.seeds))
        rows.append(
            {
                "downscale": downscale,
                "pool": pool,
                "rule": rules.get((downscale, pool)),
                "steps": len(cov),
                "all_ones": float((cov > 0.999).mean()),
                "below_70": float((cov < 0.7).mean()),
                "mean": float(cov.mean()),
            }
        )
        print(rows[-1], flush=True)
    rec = {
        "machine": machine_info(),
        "omp_threads": os.environ.get("OMP_NUM_THREADS"),
        "model": a.model,
        "latent": list(latent),
        "steps": a.steps,
        "seeds": a.seeds,
        "edits": sum(c.source.is_pair for c in SUITE),
        "rows": rows,
    }
    write_results(Path(a.out), a.stem, rec, markdown(rec))
    return rec


if __name__ == "__main__":
    main()
