"""Latency: the PyTorch reference against the runtime, stage by stage.

Warm-up, then timed repeats; median and p90 of: one UNet call (reference with explicit
attention everywhere — what a P2P-style reference needs —, the reference as shipped (explicit
attention in controlled layers, SDPA elsewhere), diffusers' SDPA, the whole engine, the
segmented engine), the controller's time between segments, the calibration pass, the edit loop,
the VAE, the end-to-end edit; peak memory. GPU timings are device-synchronised. Writes JSON,
markdown and a plot (per-stage bars, reference vs runtime):

    python -m benchmarks.latency --model sd14-random --height 256 --steps 3 --shapes static
    python -m benchmarks.latency --export-dir EXPORT --device cuda --precision fp16 --steps 50
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

from benchmarks.common import available_backends, export_cli, machine_info, write_results

STAGES = ("text", "calibration", "edit", "decode", "total")
SOURCE, TARGET = "a dog standing on the grass", "a dog sitting on the grass"


def stats(xs: list[float]) -> dict[str, float]:
    s = sorted(xs)
    p90 = s[min(len(s) - 1, round(0.9 * (len(s) - 1)))]
    return {"median": statistics.median(s), "p90": p90, "n": len(s), "all": xs}


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def timed(fn, device: str, warmup: int, repeats: int) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t)
    return stats(out)


def interleaved(calls: dict, device: str, warmup: int, repeats: int) -> dict[str, dict]:
    """Time several callables round-robin (so a slow spell of the machine hits all alike)."""
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(repeats):
        for k, fn in calls.items():
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            times[k].append(time.perf_counter() - t)
    return {k: stats(v) for k, v in times.items()}


def peak_memory(device: str) -> dict[str, float]:
    mem = {"cpu_peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if device == "cuda":
        import torch

        mem["gpu_peak_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return mem


def run(a: argparse.Namespace) -> dict:
    import torch
    from diffusers.models.attention_processor import AttnProcessor2_0

    from adapedit.config import EditConfig, SamplerConfig
    from adapedit.engines.folder import build_engines
    from adapedit.engines.ort import OrtRunner
    from adapedit.engines.weights import WeightPool
    from adapedit.models import load_model
    from adapedit.pipeline import ReferencePipeline
    from adapedit.processors import install_processors
    from adapedit.runtime.session import EditSession
    from adapedit.spec import Manifest

    device = a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if a.precision == "fp16" else torch.float32
    edit = EditConfig()
    backends = [b for b in available_backends() if a.backends is None or b.name in a.backends]
    notes = []
    if device == "cuda" and a.backends is None:
        backends = [b for b in backends if b.name != "ort-cpu"]
        if not backends:
            notes.append(
                "no GPU backend (onnxruntime-gpu or tensorrt) importable on this "
                "machine: only the PyTorch reference was measured"
            )
    work = tempfile.mkdtemp(prefix="adapedit-latency-", dir=a.work)
    export_dir = Path(a.export_dir) if a.export_dir else Path(work) / "export"
    export_s = None
    if backends and not a.export_dir:  # in a child process: its memory is gone afterwards
        t = time.perf_counter()
        forms = ("segmented", "whole", "fused") if a.shapes == "static" else ("segmented", "whole")
        export_cli(
            a.model, export_dir, precision=a.precision, shapes=a.shapes, size=a.height, forms=forms
        )
        export_s = time.perf_counter() - t
    given = Manifest.load(export_dir) if backends else None
    model = given.model if given else a.model
    components = load_model(model).to(device, dtype)
    size = given.height if given else (a.height or components.default_size)
    sampler = SamplerConfig(steps=a.steps, seed=0, height=size, width=size)
    lat = size // components.vae_scale_factor
    rec: dict = {
        "machine": machine_info(),
        "model": model,
        "shapes": given.shapes if given else a.shapes,
        "height": size,
        "width": size,
        "steps": a.steps,
        "batch": a.batch,
        "precision": a.precision,
        "device": device,
        "warmup": a.warmup,
        "repeats": a.repeats,
        "export_s": export_s,
        "unet_call_s": {},
        "stages_s": {},
        "notes": notes,
    }

    # -- the reference ---------------------------------------------------------------------
    ref = ReferencePipeline(components, device=device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.batch, 4, lat, lat, generator=g).to(device, dtype)
    text_hidden = int(components.unet.config.cross_attention_dim)
    ctx = torch.randn(a.batch, 77, text_hidden, generator=g).to(device, dtype)
    tt = torch.tensor(501, device=device)
    unet = components.unet

    def call():
        with torch.no_grad():
            unet(x, tt, encoder_hidden_states=ctx)

    ref.slot.self_max_queries = 10**9  # explicit attention everywhere
    rec["unet_call_s"]["torch-explicit"] = timed(call, device, a.warmup, a.repeats)
    ref.slot.self_max_queries = edit.self_max_queries  # the reference as shipped
    rec["unet_call_s"]["torch-reference"] = timed(call, device, a.warmup, a.repeats)
    unet.set_attn_processor(AttnProcessor2_0())
    rec["unet_call_s"]["torch-sdpa"] = timed(call, device, a.warmup, a.repeats)
    install_processors(unet, ref.slot)

    edits, last = [], a.warmup + a.repeats - 1
    finals = {}  # the last edit of each path, latents recorded: parity beside the timings
    for i in range(a.warmup + a.repeats):
        _sync(device)
        r = ref.edit(SOURCE, TARGET, edit, sampler, record_latents=i == last)
        if i >= a.warmup:
            edits.append(r.timings)
    finals["reference"] = r
    rec["stages_s"]["reference"] = {s: stats([e[s] for e in edits]) for s in STAGES}
    rec["memory_reference"] = peak_memory(device)
    del ref, components, call
    unet = None
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    # -- the runtime -------------------------------------------------------------------------
    manifest = given
    np_x = x.float().cpu()
    np_ctx = ctx.float().cpu()

    def measure(backend) -> None:
        tdev = "cuda" if backend.ort.device.type == "cuda" or backend.build == "trt" else "cpu"
        edt = torch.float16 if manifest.precision == "fp16" else torch.float32
        feeds = {
            "sample": np_x.to(tdev, edt),
            "timestep": torch.tensor([501.0], device=tdev),
            "encoder_hidden_states": np_ctx.to(tdev, edt),
        }
        engines = Path(work) / f"engines-{backend.name}"
        build_engines(export_dir, engines, backend=backend.build, ort=backend.ort, progress=False)
        has = {"fused": manifest.has_fused, "segmented": manifest.has_segments}
        for form in (f for f, yes in has.items() if yes):
            name = f"{backend.name}-{form}"
            with EditSession(engines, form=form) as session:
                unets = [
                    session.fused(b) if form == "fused" else session.segmented(b)
                    for b in session.edit_batches(edit)
                ]
                free0 = torch.cuda.mem_get_info()[0] if tdev == "cuda" else None
                for u in unets:  # every UNet session an edit loads
                    for r in getattr(u, "runners", None) or [u.runner]:
                        r.activate()
                if free0 is not None and session.weights is not None:
                    used = free0 - torch.cuda.mem_get_info()[0]
                    rec[f"unet_weights_{name}"] = {
                        "one_copy_gb": session.weights.loaded_bytes / 2**30,
                        "gpu_used_by_sessions_gb": used / 2**30,
                        "ratio": used / max(session.weights.loaded_bytes, 1),
                        "goal_ratio": 1.15,
                    }
                calls = {name: _unet_call(session, form, a.batch, feeds, size)}
                whole = None
                u = manifest.unet_graphs(a.batch)
                if backend.build == "ort" and u.whole is not None:
                    pool = WeightPool(export_dir, manifest.weights, session.device)
                    whole = OrtRunner(
                        export_dir / u.whole.file,
                        u.whole,
                        backend.ort,
                        stream=session.stream,
                        weights=pool,
                    )
                    calls[f"{backend.name}-whole"] = lambda w=whole, f=feeds: w.infer(f)
                with session.on_stream():
                    rec["unet_call_s"].update(interleaved(calls, tdev, a.warmup, a.repeats))
                if whole is not None:
                    whole.deactivate()
                edits, ctrl = [], []
                for i in range(a.warmup + a.repeats):
                    session.reset_clocks()
                    r = session.edit(SOURCE, TARGET, edit, sampler, record_latents=i == last)
                    if i >= a.warmup:
                        edits.append(r.timings)
                        ctrl.append(session.controller_seconds())
                finals[name] = r
                n_calls = 2 * session.num_steps(sampler)  # calibration + edit passes
                rec["stages_s"][name] = {s: stats([e[s] for e in edits]) for s in STAGES}
                rec["stages_s"][name]["controller"] = stats(ctrl)
                rec["stages_s"][name]["controller_per_call"] = stats([c / n_calls for c in ctrl])
            rec[f"memory_{name}"] = peak_memory(tdev)

    for backend in backends:
        try:
            measure(backend)
        except Exception as e:  # one backend failing must not lose the others' numbers
            notes.append(f"{backend.name} failed: {type(e).__name__}: {e}")
            print(f"{backend.name} failed", file=sys.stderr)
            traceback.print_exc()
    rec["goals"] = goals(rec)
    rec["parity"] = parity(finals)
    shutil.rmtree(work, ignore_errors=True)
    return rec


def _unet_call(session, form: str, batch: int, feeds: dict, size: int):
    """One UNet call of ``form`` at ``batch`` (the fused edit graph runs an edit's controls)."""
    from adapedit.config import EditConfig
    from adapedit.controller import EditController
    from adapedit.fwt import fixed_tau

    args = (feeds["sample"], feeds["timestep"], feeds["encoder_hidden_states"])
    if form == "segmented":
        unet = session.segmented(batch)
        return lambda: unet(*args)
    plan = session.plan(SOURCE, TARGET, EditConfig())
    hw = (size // session.vae_scale_factor,) * 2
    ctrl = EditController(plan, fixed_tau(plan, plan.config, None), None, 50, hw)
    unet = session.fused(batch)
    return lambda: unet(*args, ctrl, 0)


def parity(finals: dict) -> dict:
    """Each runtime path's last timed edit against the reference's, and the fused form against
    the segmented one of the same backend: per-step latents, τ, images."""
    from adapedit.parity import compare_edits

    keys = ("latents_max_abs", "tau_max_abs", "tau_self_abs", "psnr_source_db", "psnr_edited_db")
    pairs = [("reference", n) for n in finals if n != "reference"]
    pairs += [
        (n, n.removesuffix("-fused") + "-segmented")
        for n in finals
        if n.endswith("-fused") and n.removesuffix("-fused") + "-segmented" in finals
    ]
    out = {}
    for x, y in pairs:
        p = compare_edits(finals[x], finals[y])
        out[f"{y} vs {x}"] = {k: p[k] for k in keys}
    return out


def goals(rec: dict) -> dict:
    """The issues' goals, for every backend and UNet form measured: static segmented ≤ 1.10×
    the whole UNet (CPU); fused ≤ 1.15× (GPU) or 1.05× (CPU) the whole UNet; end to end ≤ 0.80×
    the reference on the CPU, ≥ 3× faster and ≤ 1.3 s at 50 steps on a GPU."""
    out = {}
    ref = rec["stages_s"]["reference"]["total"]["median"]
    gpu = rec["device"] == "cuda"
    for name, st in rec["stages_s"].items():
        if name == "reference":
            continue
        backend, form = name.rsplit("-", 1)
        call = rec["unet_call_s"].get(name, {}).get("median")
        whole = rec["unet_call_s"].get(f"{backend}-whole", {}).get("median")
        step = st["edit"]["median"] / rec["steps"]
        out[name] = {
            "end_to_end_s": st["total"]["median"],
            "end_to_end_over_reference": st["total"]["median"] / ref,
            "goal_end_to_end": 1 / 3 if gpu else 0.80,
            "unet_call_over_whole": call / whole if call and whole else None,
            "goal_unet_call": {"segmented": 1.10, "fused": 1.15 if gpu else 1.05}[form],
            "controller_share_of_step": st["controller_per_call"]["median"] / step,
        }
    return out


def markdown(rec: dict) -> str:
    m = rec["machine"]
    lines = [
        f"# Latency: {rec['model']} at {rec['height']}×{rec['width']}, {rec['steps']} steps, "
        f"{rec['precision']}, {rec['device']}",
        "",
        f"Machine: {m['description']}; torch {m['versions']['torch']}, onnxruntime "
        f"{m['versions']['onnxruntime']}. {rec['warmup']} warm-up + {rec['repeats']} timed "
        f"runs; median (p90) seconds. UNet calls at batch {rec['batch']}.",
        "",
        "| one UNet call | median s | p90 s |",
        "|---|---|---|",
    ]
    for k, v in rec["unet_call_s"].items():
        lines.append(f"| {k} | {v['median']:.3f} | {v['p90']:.3f} |")
    names = list(rec["stages_s"])
    lines += ["", "| stage | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for s in (*STAGES, "controller", "controller_per_call"):
        cells = [
            f"{rec['stages_s'][n][s]['median']:.3f} ({rec['stages_s'][n][s]['p90']:.3f})"
            if s in rec["stages_s"][n]
            else "–"
            for n in names
        ]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| runtime | end to end s | / reference (goal) | UNet call / whole UNet (goal) | "
        "controller / step |",
        "|---|---|---|---|---|",
    ]
    for name, g in rec["goals"].items():
        call = f"{g['unet_call_over_whole']:.3f}" if g["unet_call_over_whole"] else "–"
        lines.append(
            f"| {name} | {g['end_to_end_s']:.3f} | {g['end_to_end_over_reference']:.3f} "
            f"(≤ {g['goal_end_to_end']:.2f}) | {call} (≤ {g['goal_unet_call']}) | "
            f"{g['controller_share_of_step']:.4f} |"
        )
    if rec.get("parity"):
        lines += [
            "",
            "| parity (last timed edit) | latents max abs | τ max abs | PSNR source / edited dB |",
            "|---|---|---|---|",
        ]
        for name, p in rec["parity"].items():
            tau = max(p["tau_max_abs"], p["tau_self_abs"])
            lines.append(
                f"| {name} | {p['latents_max_abs']:.2e} | {tau:.1e} | "
                f"{p['psnr_source_db']:.1f} / {p['psnr_edited_db']:.1f} |"
            )
    mem = {k: v for k, v in rec.items() if k.startswith("memory_")}
    lines += [
        "",
        "Peak memory: "
        + "; ".join(
            f"{k[7:]} " + ", ".join(f"{kk} {vv:.1f}" for kk, vv in v.items())
            for k, v in mem.items()
        ),
    ]
    for k, v in rec.items():
        if k.startswith("unet_weights_"):
            lines.append(
                f"UNet weights on the GPU ({k.removeprefix('unet_weights_')}, every session of "
                f"an edit): one copy {v['one_copy_gb']:.2f} GB, the sessions use "
                f"{v['gpu_used_by_sessions_gb']:.2f} GB → {v['ratio']:.2f}× (goal ≤ "
                f"{v['goal_ratio']})."
            )
    if rec["export_s"] is not None:
        lines += [f"Export (not timed above): {rec['export_s']:.0f} s."]
    lines += [f"Note: {n}" for n in rec["notes"]]
    return "\n".join(lines) + "\n"


def plot(rec: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(rec["stages_s"])
    stages = ["text", "calibration", "edit", "decode", "total"]
    xs = np.arange(len(stages))
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, n in enumerate(names):
        vals = [rec["stages_s"][n][s]["median"] for s in stages]
        ax.bar(xs + i * width, vals, width, label=n)
    ax.set_xticks(xs + width * (len(names) - 1) / 2, stages)
    ax.set_ylabel("seconds (median)")
    ax.set_title(
        f"{rec['model']} {rec['height']}px, {rec['steps']} steps, {rec['precision']}, "
        f"{rec['device']}: reference vs runtime"
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="sd14-random")
    ap.add_argument("--export-dir", default=None, help="an existing export (else one is made)")
    ap.add_argument("--shapes", choices=("dynamic", "static"), default="static")
    ap.add_argument("--height", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--precision", choices=("fp32", "fp16"), default="fp32")
    ap.add_argument("--device", default="auto", help="reference device: auto | cpu | cuda")
    ap.add_argument("--backends", nargs="*", default=None)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", default=None)
    ap.add_argument("--results", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--tag", default=None)
    a = ap.parse_args()
    rec = run(a)
    stem = a.tag or f"latency_{a.model}_{a.height}_{a.precision}_{rec['device']}"
    results = Path(a.results)
    results.mkdir(parents=True, exist_ok=True)
    plot(rec, results / f"{stem}.png")
    write_results(results, stem, rec, markdown(rec))
    print(json.dumps(rec["goals"], indent=1))


if __name__ == "__main__":
    main()
