"""Parity: the PyTorch reference against each available backend on the same seeds and prompts.

For every (backend, prompt pair, seed): per-step latent max abs and relative difference, τ
difference, final image PSNR and max pixel difference, per-layer attention agreement (the
probabilities leaving the controller at the edit pass's first step, every controlled layer);
pass/fail against the tolerances stated per precision. Writes JSON + markdown:

    python -m benchmarks.parity --model tiny --steps 10
    python -m benchmarks.parity --model sd14-random --height 256 --steps 3 --tag sd14-256
    python -m benchmarks.parity --export-dir EXPORT --device cuda --reference-precision fp16
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from benchmarks.common import available_backends, export_cli, machine_info, write_results

#: Tolerances per engine precision (against a reference on the same device).
TOLERANCES = {
    "fp32": {"latents_max_abs": 1e-3, "tau_max_abs": 1e-5, "psnr_db": 50.0},
    "fp16": {"latents_max_abs": 5e-2, "tau_max_abs": 1e-2, "psnr_db": 30.0},
}
PAIRS = [
    ("a dog standing on the grass", "a dog sitting on the grass"),
    ("a photo of a cat on a sofa", "a photo of a black cat on a sofa"),
]


def run(a: argparse.Namespace) -> dict:
    import torch

    from adapedit.config import EditConfig, SamplerConfig
    from adapedit.engines.folder import build_engines
    from adapedit.parity import compare_edits
    from adapedit.pipelines.models import load_model
    from adapedit.pipelines.pipeline import ReferencePipeline
    from adapedit.runtime.session import EditSession
    from adapedit.spec import Manifest

    device = (
        "cuda"
        if torch.cuda.is_available() and a.device == "auto"
        else ("cpu" if a.device == "auto" else a.device)
    )
    given = Manifest.load(a.export_dir) if a.export_dir else None
    model = given.model if given else a.model
    dtype = torch.float16 if a.reference_precision == "fp16" else torch.float32
    components = load_model(model).to("cpu", dtype)
    reference = ReferencePipeline(components, device=device)
    size = given.height if given else (a.height or components.default_size)
    precisions = [given.precision] if given else a.precisions
    edit = EditConfig(alpha_m=a.alpha_m)
    record = {
        "machine": machine_info(),
        "model": model,
        "shapes": given.shapes if given else a.shapes,
        "reference_precision": a.reference_precision,
        "height": size,
        "width": size,
        "steps": a.steps,
        "reference_device": device,
        "edit": edit.to_dict(),
        "tolerances": TOLERANCES,
        "cases": [],
    }
    backends = [b for b in available_backends() if not a.backends or b.name in a.backends]
    with tempfile.TemporaryDirectory(prefix="adapedit-parity-", dir=a.work) as work:
        exports = {given.precision: Path(a.export_dir)} if given else {}
        for backend in backends:
            for precision in precisions:
                if precision not in exports:
                    t = time.perf_counter()
                    folder = Path(work) / f"export-{precision}"
                    export_cli(  # in a child process: a fresh CPU copy of the model
                        model, folder, precision=precision, shapes=a.shapes, size=size
                    )
                    exports[precision] = folder
                    print(f"exported {precision} in {time.perf_counter() - t:.0f} s")
                engines = Path(work) / f"engines-{backend.name}-{precision}"
                build_engines(
                    exports[precision],
                    engines,
                    backend=backend.build,
                    ort=backend.ort,
                    progress=False,
                )
                with EditSession(engines) as session:
                    # the per-layer maps of step 0 need the layers one by one: a folder with
                    # the fused form alone is compared on latents, τ and images only
                    observe = 0 if session.manifest.has_segments else None
                    for source, target in PAIRS[: a.pairs]:
                        for seed in a.seeds:
                            sampler = SamplerConfig(
                                steps=a.steps, seed=seed, height=size, width=size
                            )
                            ref, out = (
                                pipe.edit(
                                    source,
                                    target,
                                    edit,
                                    sampler,
                                    record_latents=True,
                                    observe_step=observe,
                                )
                                for pipe in (reference, session)
                            )
                            p = compare_edits(ref, out)
                            tol = TOLERANCES[precision]
                            p["pass"] = bool(
                                p["latents_max_abs"] <= tol["latents_max_abs"]
                                and p["tau_max_abs"] <= tol["tau_max_abs"]
                                and min(p["psnr_source_db"], p["psnr_edited_db"]) >= tol["psnr_db"]
                            )
                            case = {
                                "backend": backend.name,
                                "precision": precision,
                                "source": source,
                                "target": target,
                                "seed": seed,
                                "time_reference_s": ref.timings["total"],
                                "time_backend_s": out.timings["total"],
                                **p,
                            }
                            record["cases"].append(case)
                            print(
                                f"{backend.name} {precision} seed {seed}: latents "
                                f"{p['latents_max_abs']:.2e}, τ {p['tau_max_abs']:.1e}, PSNR "
                                f"{min(p['psnr_source_db'], p['psnr_edited_db']):.1f} dB, "
                                f"{'PASS' if p['pass'] else 'FAIL'}"
                            )
    return record


def markdown(record: dict) -> str:
    m = record["machine"]
    lines = [
        f"# Parity: {record['model']} at {record['height']}×{record['width']}, "
        f"{record['steps']} steps",
        "",
        f"Machine: {m['description']}. Reference (PyTorch {record['reference_precision']}) on "
        f"{record['reference_device']}; engines from a {record['shapes']} export.",
        "",
        "| backend | precision | seed | latents max abs | latents max rel | τ max abs | PSNR src / "
        "edit dB | max px diff | worst layer max abs | ref s | backend s | result |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in record["cases"]:
        layers = c["per_layer_probs_max_abs"]
        worst = f"{max(layers.values()):.1e}" if layers else "– (fused)"
        lines.append(
            f"| {c['backend']} | {c['precision']} | {c['seed']} | {c['latents_max_abs']:.2e} | "
            f"{c['latents_max_rel']:.2e} | {c['tau_max_abs']:.1e} | {c['psnr_source_db']:.1f} / "
            f"{c['psnr_edited_db']:.1f} | {c['max_pixel_diff']} | {worst} | "
            f"{c['time_reference_s']:.1f} | {c['time_backend_s']:.1f} | "
            f"{'pass' if c['pass'] else 'FAIL'} |"
        )
    tol = ", ".join(
        f"{k}: latents ≤ {v['latents_max_abs']}, τ ≤ {v['tau_max_abs']}, PSNR ≥ {v['psnr_db']} dB"
        for k, v in record["tolerances"].items()
    )
    lines += ["", f"Tolerances — {tol}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--export-dir", default=None, help="an existing export (else one is made)")
    ap.add_argument("--shapes", choices=("dynamic", "static"), default="dynamic")
    ap.add_argument("--reference-precision", choices=("fp32", "fp16"), default="fp32")
    ap.add_argument("--height", type=int, default=None)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--alpha-m", type=float, default=0.03)
    ap.add_argument("--precisions", nargs="+", default=["fp32"])
    ap.add_argument("--backends", nargs="*", default=None, help="default: every available one")
    ap.add_argument("--device", default="auto", help="reference device: auto | cpu | cuda")
    ap.add_argument("--work", default=None, help="scratch folder for exports and engines")
    ap.add_argument("--results", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--tag", default=None, help="file name stem (default parity_<model>)")
    a = ap.parse_args()
    record = run(a)
    stem = a.tag or f"parity_{a.model}"
    write_results(Path(a.results), stem, record, markdown(record))


if __name__ == "__main__":
    main()
