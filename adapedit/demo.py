"""The main job on the embedded default model: export it, build ONNX Runtime engines, run one
edit through the runtime and through the PyTorch reference, and write both sets of images plus
a parity and latency summary (and, on the ``shapes`` model, what the attribute reader reads in
the source and edited images)."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from adapedit.config import EditConfig, SamplerConfig
from adapedit.defaults import DEFAULT_MODEL, DEMO_SOURCE, DEMO_TARGET
from adapedit.io import atomic_write_bytes, check_output_folder, write_edit_outputs, write_json
from adapedit.parity import compare_edits
from adapedit.pipelines.models import load_model
from adapedit.pipelines.pipeline import ReferencePipeline


def run_demo(
    out: str | Path,
    *,
    model: str = DEFAULT_MODEL,
    source: str = DEMO_SOURCE,
    target: str = DEMO_TARGET,
    steps: int = 50,
    seed: int = 0,
    progress: bool = True,
) -> str:
    """Run the demo into ``out`` (``runtime/`` and ``reference/`` edit outputs, ``demo.json``,
    ``demo.md``, and the engine folder it built, ``engines/``, which ``adapedit serve`` takes);
    returns the markdown summary."""
    from adapedit.engines.folder import build_engines
    from adapedit.export.api import DEFAULT_BATCHES, ExportOptions, export_model
    from adapedit.runtime.session import EditSession

    out = check_output_folder(out, "adapedit demo --out")
    edit, sampler = EditConfig(), SamplerConfig(steps=steps, seed=seed)
    components = load_model(model)
    reference = ReferencePipeline(components)
    reference.plan(source, target, edit)  # bad prompts fail before any work
    reference.latent_hw(sampler)
    times: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="adapedit-demo-") as work:
        t = time.perf_counter()
        # only what the runtime runs: the fused UNet, static at the model's size, at the
        # batches of an edit and at batch 1, on which an edit of a given image inverts it (so
        # the engines kept edit images too, on the command line and on the served page)
        options = ExportOptions(shapes="static", forms=("fused",), batches=(1, *DEFAULT_BATCHES))
        export_model(components, Path(work) / "export", options, progress=progress)
        times["export_s"] = time.perf_counter() - t
        t = time.perf_counter()
        build_engines(
            Path(work) / "export", Path(work) / "engines", backend="ort", progress=progress
        )
        times["build_s"] = time.perf_counter() - t
        with EditSession(Path(work) / "engines") as session:
            run = session.edit(
                source, target, edit, sampler, record_latents=True, progress=progress
            )
        engines = out / "engines"  # kept for `adapedit serve --engine-dir OUT/engines`
        if engines.exists():
            shutil.rmtree(engines)
        out.mkdir(parents=True, exist_ok=True)
        shutil.move(Path(work) / "engines", engines)
    ref = reference.edit(source, target, edit, sampler, record_latents=True, progress=progress)
    parity = compare_edits(ref, run)
    write_edit_outputs(run, out / "runtime", model)
    write_edit_outputs(ref, out / "reference", model)
    reads = None
    if model == "shapes":  # the default model's images can be read back and checked
        from adapedit.shapes.reader import read_image

        reads = {
            "source": read_image(run.source_image).attributes(),
            "edited": read_image(run.edited_image).attributes(),
        }
    doc = {
        "model": model,
        "source": source,
        "target": target,
        "steps": steps,
        "seed": seed,
        "backend": "onnxruntime CPU (fused UNet, static)",
        **times,
        "timings_s": {"runtime": run.timings, "reference": ref.timings},
        "parity": {k: v for k, v in parity.items() if k != "per_step"},
        "tau": {w.word: w.tau for w in run.tau.words},
        "read_back": reads,
    }
    write_json(out / "demo.json", doc)
    rows = "\n".join(
        f"| {stage} | {ref.timings[stage]:.2f} | {run.timings[stage]:.2f} |"
        for stage in ("text", "calibration", "edit", "decode", "total")
    )
    md = (
        f"# adapedit demo ({model}, {steps} steps, seed {seed})\n\n"
        f"`{source}` → `{target}`\n\n"
        f"Export {times['export_s']:.1f} s, ONNX Runtime build {times['build_s']:.1f} s.\n\n"
        "| stage | reference (PyTorch) s | runtime (ONNX Runtime, fused UNet) s |\n"
        f"|---|---|---|\n{rows}\n\n"
        f"Parity: latents max abs {parity['latents_max_abs']:.2e} over {len(run.latents)} "
        f"steps, τ max abs {parity['tau_max_abs']:.2e}, PSNR source "
        f"{parity['psnr_source_db']:.1f} dB / edited {parity['psnr_edited_db']:.1f} dB, max "
        f"pixel difference {parity['max_pixel_diff']}.\n\n"
        "τ per word: " + ", ".join(f"{w.word} {w.tau:.2f}" for w in run.tau.words) + "\n\n"
        f"Images: `{out / 'runtime'}` and `{out / 'reference'}`. Engines: `{engines}` "
        f"(`adapedit serve --engine-dir {engines}`, then open the page it prints).\n"
    )
    if reads:
        md += "\nRead back from the runtime's images (`adapedit.shapes.reader`):\n\n" + "".join(
            f"- {name}: " + ", ".join(f"{k} {v}" for k, v in r.items()) + "\n"
            for name, r in reads.items()
        )
    atomic_write_bytes(out / "demo.md", md.encode())
    return md
