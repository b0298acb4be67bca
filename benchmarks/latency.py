"""Latency: the PyTorch reference against the runtime, stage by stage.

Warm-up, then timed repeats; median and p90 of: one UNet call (reference with explicit
attention everywhere — what a P2P-style reference needs —, the reference as shipped (explicit
attention in controlled layers, SDPA elsewhere), diffusers' SDPA, the whole engine, each UNet
form of the engines), the controller's time, the calibration pass, the edit loop, the VAE, the
end-to-end edit, at each step count asked for; parity of each runtime form with the reference;
memory of each path; on a GPU, the host syncs each step makes. GPU timings are
device-synchronised. Every measurement is appended to ``--jsonl`` as soon as it is taken (a run
cut short keeps what it measured); at the end JSON, markdown and a plot (per-stage bars,
reference vs runtime):

    python -m benchmarks.latency --model sd14-random --height 256 --steps 3 --shapes static
    python -m benchmarks.latency --export-dir EXPORT --device cuda --precision fp16 \\
        --steps 20 50 --forms fused --jsonl results.jsonl
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
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from benchmarks.common import available_backends, export_cli, machine_info, write_results
from benchmarks.gpu_run import emit, host_waits

STAGES = ("text", "calibration", "edit", "decode", "total")
SOURCE, TARGET = "a dog standing on the grass", "a dog sitting on the grass"
#: Parity goals of the runtime against the reference in the same precision (GPU, fp16).
PARITY_GOALS = {"latents_max_abs": 5e-3, "tau_max_abs": 1e-3}


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


class JsonLines:
    """The JSON lines file every measurement is appended to as it is taken (one object per
    line, flushed and synced: a run killed later keeps every line written before)."""

    def __init__(self, path: str | None) -> None:
        self.path = path

    def emit(self, kind: str, **data) -> None:
        if self.path:
            emit(Path(self.path), kind, **data)


#: ONNX Runtime's CUDA provider runs a session plainly twice, then captures its CUDA graph on
#: the third run (``min_num_runs_before_cuda_graph_capture_``): a call timed from its fourth run
#: on is a replay.
CAPTURE_RUNS = 3

#: What torch's warning says of a synchronizing operation under ``set_sync_debug_mode("warn")``.
SYNC_WARNING = "called a synchronizing CUDA operation"


def count_syncs(session, edit, sampler) -> dict:
    """One edit under ``torch.cuda.set_sync_debug_mode("warn")``: the host syncs torch makes
    (its :data:`SYNC_WARNING` warnings; any other warning is named apart), attributed to the
    UNet call or the loop body of each step; and, for the waits torch cannot see (ONNX Runtime
    synchronising inside its own run, as its CUDA graph replay did before it honoured
    ``disable_synchronize_execution_providers``), each UNet call's host time against its GPU
    time (CUDA events on the caller's stream). After the first step, a call that does not wait
    returns in a small part of its GPU time; one that waits takes at least all of it
    (``host_over_gpu`` near 1 or more)."""
    import torch

    where = {"now": ("setup", -1, -1)}
    seen: list[tuple[tuple[str, int, int], str]] = []  # torch's sync warnings
    other: set[str] = set()  # any other warning meanwhile: named, not counted
    calls: list[tuple[int, float, object, object]] = []  # step, host seconds, GPU events
    unet = session.unet

    def watched(x, t, embeddings, controller, step):
        where["now"] = ("unet", x.shape[0], step)
        start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        start.record(torch.cuda.current_stream())
        t0 = time.perf_counter()
        out = unet(x, t, embeddings, controller, step)
        host = time.perf_counter() - t0
        end.record(torch.cuda.current_stream())
        calls.append((step, host, start, end))
        where["now"] = ("loop", x.shape[0], step)  # the scheduler step after this call
        return out

    session.unet = watched
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")

            def shown(message, *args, **kwargs) -> None:
                line = str(message).splitlines()[0]
                if SYNC_WARNING in line:
                    seen.append((where["now"], line))
                else:
                    other.add(line)

            warnings.showwarning = shown
            torch.cuda.set_sync_debug_mode("warn")
            try:
                session.edit(SOURCE, TARGET, edit, sampler)
            finally:
                torch.cuda.set_sync_debug_mode(0)
    finally:
        del session.unet
    torch.cuda.synchronize()  # the events' times, read after the edit
    n = session.num_steps(sampler)
    passes = {}
    for batch in sorted({w[1] for w, _ in seen if w[1] > 0} | {2, 4}):
        inside = [
            w
            for w, _ in seen
            if w[1] == batch
            and ((w[0] == "unet" and w[2] >= 1) or (w[0] == "loop" and w[2] < n - 1))
        ]
        passes[f"batch {batch}"] = {
            "between_first_and_last_step": len(inside),
            "per_step": len(inside) / max(n - 1, 1),
            "first_step": sum(1 for w, _ in seen if w[1] == batch and w[2] == 0),
        }
    later = [(host, start.elapsed_time(end) / 1e3) for step, host, start, end in calls if step]
    return {
        "passes": passes,
        "total": len(seen),
        "examples": sorted({f"{w[0]} b{w[1]} step {w[2]}: {m}" for w, m in seen})[:8],
        "other_warnings": sorted(other)[:8],
        "goal_per_step": 0,
        "unet_calls_after_the_first_step": {
            "host_ms": statistics.median(h for h, _ in later) * 1e3 if later else None,
            "gpu_ms": statistics.median(g for _, g in later) * 1e3 if later else None,
            "host_over_gpu": statistics.median(h / max(g, 1e-9) for h, g in later)
            if later
            else None,
        },
    }


def run(a: argparse.Namespace) -> dict:
    import torch
    from diffusers.models.attention_processor import AttnProcessor2_0

    from adapedit.config import EditConfig, SamplerConfig
    from adapedit.engines.folder import build_engines
    from adapedit.pipelines.models import load_model
    from adapedit.pipelines.pipeline import ReferencePipeline
    from adapedit.pipelines.processors import install_processors
    from adapedit.spec import Manifest

    device = a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if a.precision == "fp16" else torch.float32
    edit = EditConfig()
    backends = [
        replace(b, ort=replace(b.ort, log_severity=a.ort_log_severity))
        for b in available_backends()
        if a.backends is None or b.name in a.backends
    ]
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
    if a.backends and not backends:
        notes.append(f"none of the backends asked for is available here: {a.backends}")
        JsonLines(a.jsonl).emit("skipped", path=" ".join(a.backends), reason=notes[-1])
    given = Manifest.load(export_dir) if backends or a.export_dir else None
    model = given.model if given else a.model
    components = load_model(model).to(device, dtype) if a.reference else None
    size = given.height if given else (a.height or components.default_size)
    lat = size // (given.vae_scale_factor if given else components.vae_scale_factor)
    rec: dict = {
        "machine": machine_info(),
        "model": model,
        "shapes": given.shapes if given else a.shapes,
        "height": size,
        "width": size,
        "steps": list(a.steps),
        "batch": a.batch,
        "precision": a.precision,
        "device": device,
        "warmup": a.warmup,
        "repeats": a.repeats,
        "export_s": export_s,
        "unet_call_s": {},
        "runs": {str(n): {"stages_s": {}, "parity": {}} for n in a.steps},
        "memory": {},
        "syncs": {},
        "whole_alike": {},  # a runtime path → the whole UNet's run alike (CUDA graphs or not)
        "notes": notes,
    }
    out = JsonLines(a.jsonl)
    out.emit(
        "latency_setup",
        model=model,
        height=size,
        precision=a.precision,
        device=device,
        steps=list(a.steps),
        machine=rec["machine"],
    )

    def unet_calls(calls: dict[str, dict]) -> None:
        rec["unet_call_s"].update(calls)
        for name, s in calls.items():
            out.emit("unet_call", path=name, batch=a.batch, seconds=s)

    def edits(name: str, run_edit: Callable, steps: int, clock=None) -> object:
        """Timed edits of one path at ``steps``; returns the last (latents recorded)."""
        times, ctrl = [], []
        for i in range(a.warmup + a.repeats):
            if clock is not None:
                clock.reset_clocks()
            r = run_edit(steps, i == a.warmup + a.repeats - 1)
            if i >= a.warmup:
                times.append(r.timings)
                if clock is not None:
                    ctrl.append(clock.controller_seconds())
        st = {s: stats([e[s] for e in times]) for s in STAGES}
        if clock is not None:
            calls = 2 * clock.num_steps(sampler(steps))  # calibration + edit passes
            st["controller"] = stats(ctrl)
            st["controller_per_call"] = stats([c / calls for c in ctrl])
        rec["runs"][str(steps)]["stages_s"][name] = st
        out.emit("edit", path=name, steps=steps, stages_s=st)
        return r

    def sampler(steps: int) -> SamplerConfig:
        return SamplerConfig(steps=steps, seed=0, height=size, width=size)

    # the UNet call's inputs: one draw, the reference's and every engine's
    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.batch, 4, lat, lat, generator=g).to(device, dtype)
    text_hidden = (
        int(components.unet.config.cross_attention_dim)
        if components is not None
        else given.graphs["text_encoder"].outputs[0].shape[-1]
    )
    ctx = torch.randn(a.batch, 77, text_hidden, generator=g).to(device, dtype)

    def reference() -> tuple[dict[int, object], object]:
        """The reference's UNet calls and timed edits: its last edit per step count (parity),
        and with fp16 the fp32 reference's edit at the fewest steps (fp16's own noise)."""
        # every timed edit repeats one target and seed: no calibration cache, each calibrates
        ref = ReferencePipeline(components, device=device, calibration_cache=None)
        tt = torch.tensor(501, device=device)
        unet = components.unet

        def call():
            with torch.no_grad():
                unet(x, tt, encoder_hidden_states=ctx)

        ref.slot.self_max_queries = 10**9  # explicit attention everywhere
        calls = {"torch-explicit": timed(call, device, a.warmup, a.repeats)}
        ref.prepare(edit, (lat, lat), ())  # the reference as shipped
        calls["torch-reference"] = timed(call, device, a.warmup, a.repeats)
        unet.set_attn_processor(AttnProcessor2_0())
        calls["torch-sdpa"] = timed(call, device, a.warmup, a.repeats)
        install_processors(unet, ref.slot)
        unet_calls(calls)

        def ref_edit(steps: int, last: bool):
            return ref.edit(SOURCE, TARGET, edit, sampler(steps), record_latents=last)

        finals = {n: edits("reference", ref_edit, n) for n in a.steps}
        rec["memory"]["reference"] = peak_memory(device)
        out.emit("memory", path="reference", **rec["memory"]["reference"])
        if dtype != torch.float16:
            return finals, None
        n = min(a.steps)
        floor = _fp32_reference_edit(components, device, edit, sampler(n))
        p = parity(floor, finals[n])
        rec["runs"][str(n)]["parity"]["reference vs reference-fp32"] = p
        out.emit("parity", path="reference", against="reference-fp32", steps=n, **p)
        return finals, floor

    # -- the reference (unless asked not to: then no parity, no speed-up) -------------------
    finals, floor = reference() if a.reference else ({}, None)
    components = None  # the reference's memory is gone before the runtime's is measured
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    # -- the runtime -------------------------------------------------------------------------
    np_x, np_ctx = x.float().cpu(), ctx.float().cpu()
    forms = (
        [f for f in a.forms if {"fused": given.has_fused, "segmented": given.has_segments}[f]]
        if given
        else []
    )

    def measure(backend, form: str, cuda_graphs: bool) -> None:
        from adapedit.runtime.session import EditSession

        name = f"{backend.name}-{form}" + ("" if cuda_graphs else "-nograph")
        tdev = "cuda" if backend.ort.device.type == "cuda" or backend.build == "trt" else "cpu"
        gc.collect()  # what an earlier path left (a failed one's sessions) is not counted
        if tdev == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        free0 = torch.cuda.mem_get_info()[0] if tdev == "cuda" else None
        with EditSession(
            engines[backend.name], form=form, cuda_graphs=cuda_graphs, calibration_cache=None
        ) as session:
            with session.on_stream():  # the fused UNet's input buffers are made on it
                for u in _unets(session, form, edit):  # every UNet session an edit loads
                    for r in getattr(u, "runners", None) or [u.runner]:
                        r.activate()
            if free0 is not None and session.weights is not None:
                used = free0 - torch.cuda.mem_get_info()[0]
                weights = {
                    "one_copy_gb": session.weights.loaded_bytes / 2**30,
                    "gpu_used_by_sessions_gb": used / 2**30,
                    "ratio": used / max(session.weights.loaded_bytes, 1),
                    "goal_ratio": 1.15,
                }
                rec["memory"][f"{name} weights"] = weights
                out.emit("weights", path=name, **weights)

            # one UNet call first (seconds): the call against the whole UNet's before
            # the edits' minutes
            feeds = _feeds(np_x, np_ctx, tdev, given.precision)
            calls = {name: _unet_call(session, form, a.batch, feeds, size)}
            wholes = {}
            for suffix, g in whole_runs(form, cuda_graphs, tdev == "cuda").items():
                whole = _whole_runner(session, export_dir, given, a.batch, backend, g)
                if whole is not None:
                    wholes[f"{backend.name}-whole{suffix}"] = whole
            for whole_name, whole in wholes.items():
                calls[whole_name] = lambda w=whole, f=feeds: w.infer(f)
            if wholes:  # the last is the run alike
                rec["whole_alike"][name] = whole_name
            warm = max(a.warmup, CAPTURE_RUNS) if tdev == "cuda" else a.warmup  # replays timed
            try:
                with session.on_stream():
                    timings = interleaved(calls, tdev, warm, a.repeats)
            except Exception as e:  # a whole UNet that fails must not cost this path its edits
                if not wholes:
                    raise
                _failed(out, notes, f"{name}: beside {' and '.join(wholes)}", e)
                for whole in wholes.values():
                    whole.deactivate()
                wholes = {}
                rec["whole_alike"].pop(name, None)
                with session.on_stream():
                    timings = interleaved({name: calls[name]}, tdev, warm, a.repeats)
            unet_calls(timings)
            for whole in wholes.values():
                whole.deactivate()

            def run_edit(steps: int, last: bool):
                return session.edit(SOURCE, TARGET, edit, sampler(steps), record_latents=last)

            for n in a.steps:
                r = edits(name, run_edit, n, clock=session)
                fp32 = floor if n == min(a.steps) else None  # made at the fewest steps
                for against, ref in (("reference", finals.get(n)), ("reference-fp32", fp32)):
                    if ref is not None:
                        p = parity(ref, r)
                        rec["runs"][str(n)]["parity"][f"{name} vs {against}"] = p
                        out.emit("parity", path=name, against=against, steps=n, **p)
            if tdev == "cuda" and a.syncs:
                rec["syncs"][name] = count_syncs(session, edit, sampler(min(a.steps)))
                out.emit("syncs", path=name, steps=min(a.steps), **rec["syncs"][name])
            elif a.syncs:
                out.emit("syncs", path=name, measured=False, note="torch counts syncs on CUDA")
            memory = peak_memory(tdev)
            if free0 is not None:
                memory["gpu_used_by_session_gb"] = (free0 - torch.cuda.mem_get_info()[0]) / 2**30
            rec["memory"][name] = memory
            out.emit("memory", path=name, **memory)

    engines = {}
    for backend in backends:
        try:
            engines[backend.name] = Path(work) / f"engines-{backend.name}"
            build_engines(
                export_dir,
                engines[backend.name],
                backend=backend.build,
                ort=backend.ort,
                progress=False,
            )
        except Exception as e:  # one backend failing must not lose the others' numbers
            _failed(out, notes, backend.name, e)
            continue
        for form in forms:
            gpu = backend.ort.device.type == "cuda" or backend.build == "trt"
            try:
                measure(backend, form, cuda_graphs=True)
                continue
            except Exception as e:
                _failed(out, notes, f"{backend.name}-{form}", e)
            # out of the except: its traceback (and the failed session's GPU memory) is gone
            if not (gpu and form == "fused"):
                continue
            why_not = _why_not_without_graphs(rec, f"{backend.name}-{form}")
            if why_not is not None:  # else the numbers without CUDA graphs, named as such
                notes.append(f"{backend.name}-{form}-nograph not run: {why_not}")
                out.emit("skipped", path=f"{backend.name}-{form}-nograph", reason=why_not)
                continue
            try:
                measure(backend, form, cuda_graphs=False)
            except Exception as e:
                _failed(out, notes, f"{backend.name}-{form}-nograph", e)
    rec["goals"] = goals(rec)
    out.emit("goals", **rec["goals"])
    shutil.rmtree(work, ignore_errors=True)
    return rec


def _why_not_without_graphs(rec: dict, name: str) -> str | None:
    """Why a GPU path whose measurement with CUDA graphs failed is not measured again without
    them, or None to measure it. Not when its timed edits were recorded before the failure (it
    came after them — the syncs, the UNet call — and repeating every edit would spend the
    step's time on numbers already taken), nor when the device no longer answers (after a
    sticky CUDA error, such as an illegal address in a replay, every later call fails too)."""
    import torch

    if any(name in run["stages_s"] for run in rec["runs"].values()):
        return "its timed edits with CUDA graphs were recorded before the failure"
    try:
        torch.cuda.synchronize()
    except Exception as e:  # torch raises its own error types for a broken context
        return f"the device no longer answers ({type(e).__name__}: {e})"
    return None


def _failed(out: JsonLines, notes: list[str], name: str, e: Exception) -> None:
    notes.append(f"{name} failed: {type(e).__name__}: {e}")
    out.emit("failed", path=name, error=f"{type(e).__name__}: {e}")
    print(f"{name} failed", file=sys.stderr)
    traceback.print_exc()


def _unets(session, form: str, edit) -> list:
    return [
        session.fused(b) if form == "fused" else session.segmented(b)
        for b in session.edit_batches(edit)
    ]


def _feeds(x, ctx, device: str, precision: str) -> dict:
    import torch

    dtype = torch.float16 if precision == "fp16" else torch.float32
    return {
        "sample": x.to(device, dtype),
        "timestep": torch.tensor([501.0], device=device),
        "encoder_hidden_states": ctx.to(device, dtype),
    }


def whole_runs(form: str, cuda_graphs: bool, gpu: bool) -> dict[str, bool]:
    """The whole UNet's runs timed beside a path's UNet call: name suffix → replayed as a CUDA
    graph; the last is run as the path's call is (its alike). On a GPU the fused call with CUDA
    graphs is set against the whole UNet replayed (``""``), without them against it run plainly
    (``"-nograph"``); the segmented form, never replayed, against the plain run, and the
    replayed one is timed too, for command 1's fused call (the whole UNet is exported with the
    segmented form, in command 2). On the CPU there are no CUDA graphs: one plain run."""
    if not gpu:
        return {"": False}
    if form == "segmented":
        return {"": True, "-nograph": False}
    return {"": True} if cuda_graphs else {"-nograph": False}


def _whole_runner(session, export_dir: Path, manifest, batch: int, backend, cuda_graph: bool):
    """The export's whole UNet at ``batch`` on the session's stream and its one weight pool
    (ONNX Runtime backends), replayed as a CUDA graph on a GPU when ``cuda_graph``, or None."""
    from adapedit.engines.ort import OrtRunner

    u = manifest.unet_graphs(batch)
    if backend.build != "ort" or u.whole is None:
        return None
    if session.weights is not None:  # the export's index names the whole graph's weights
        session.weights.adopt(export_dir, manifest.weights)
    return OrtRunner(
        export_dir / u.whole.file,
        u.whole,
        replace(backend.ort, cuda_graph=cuda_graph),
        stream=session.stream,
        weights=session.weights,
    )


def _unet_call(session, form: str, batch: int, feeds: dict, size: int):
    """One UNet call of ``form`` at ``batch`` (the fused edit graph runs an edit's controls)."""
    from adapedit.algorithm.fwt import fixed_tau
    from adapedit.config import EditConfig
    from adapedit.pipelines.controller import EditController

    args = (feeds["sample"], feeds["timestep"], feeds["encoder_hidden_states"])
    if form == "segmented":
        unet = session.segmented(batch)
        return lambda: unet(*args)
    plan = session.plan(SOURCE, TARGET, EditConfig())
    hw = (size // session.vae_scale_factor,) * 2
    ctrl = EditController(plan, fixed_tau(plan, plan.config, None), None, 50, hw)
    unet = session.fused(batch)
    return lambda: unet(*args, ctrl, 0)


def _fp32_reference_edit(components, device: str, edit, sampler):
    """The reference's edit with its modules in fp32 (cast in place; cuDNN's TF32 off, so its
    convolutions are fp32 too), the last latents recorded: what an fp16 path's parity is set
    against to tell its own error from fp16's (an fp16 reference differs from it as well)."""
    import torch

    from adapedit.pipelines.pipeline import ReferencePipeline

    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        fp32 = components.to(device, torch.float32)
        ref = ReferencePipeline(fp32, device, calibration_cache=None)
        return ref.edit(SOURCE, TARGET, edit, sampler, record_latents=True)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32


def parity(ref, other) -> dict:
    """A runtime path's last timed edit against the reference's: latents, τ, images, and
    whether the GPU goals hold (latents ≤ 5e-3, τ ≤ 1e-3)."""
    from adapedit.parity import compare_edits

    keys = (
        "latents_max_abs",
        "latents_max_rel",
        "tau_max_abs",
        "tau_self_abs",
        "psnr_source_db",
        "psnr_edited_db",
    )
    p = compare_edits(ref, other)
    out = {k: p[k] for k in keys}
    out["meets_goal"] = (
        out["latents_max_abs"] <= PARITY_GOALS["latents_max_abs"]
        and max(out["tau_max_abs"], out["tau_self_abs"]) <= PARITY_GOALS["tau_max_abs"]
    )
    return out


def goals(rec: dict) -> dict:
    """The goals, for every runtime path and step count measured: end to end against the
    reference (≤ 0.80× on the CPU; ≥ 3.5× faster on a GPU, and ≤ 1.0 s at 50 steps); the UNet
    call against the whole engine's (segmented ≤ 1.10×; fused ≤ 1.10× on a GPU, 1.05× on the
    CPU); the controller's share of a step."""
    out = {}
    gpu = rec["device"] == "cuda"
    for n, run in rec["runs"].items():
        reference = run["stages_s"].get("reference")  # None: run with --no-reference
        ref = reference["total"]["median"] if reference else None
        for name, st in run["stages_s"].items():
            if name == "reference":
                continue
            form = name.removesuffix("-nograph").rsplit("-", 1)[1]
            call = rec["unet_call_s"].get(name, {}).get("median")
            whole_name = rec.get("whole_alike", {}).get(name)  # run as the call was
            whole = rec["unet_call_s"].get(whole_name, {}).get("median")
            step = st["edit"]["median"] / int(n)
            total = st["total"]["median"]
            out[f"{name}@{n}"] = {
                "end_to_end_s": total,
                "end_to_end_over_reference": total / ref if ref else None,
                "goal_end_to_end": 1 / 3.5 if gpu else 0.80,
                "goal_end_to_end_s": 1.0 if gpu and int(n) == 50 else None,
                "unet_call_over_whole": call / whole if call and whole else None,
                "goal_unet_call": {"segmented": 1.10, "fused": 1.10 if gpu else 1.05}[form],
                "controller_share_of_step": st["controller_per_call"]["median"] / step,
            }
    return out


def markdown(rec: dict) -> str:
    m = rec["machine"]
    lines = [
        f"# Latency: {rec['model']} at {rec['height']}×{rec['width']}, "
        f"{'/'.join(map(str, rec['steps']))} steps, {rec['precision']}, {rec['device']}",
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
    for n, run in rec["runs"].items():
        names = list(run["stages_s"])
        lines += [
            "",
            f"| {n} steps: stage | " + " | ".join(names) + " |",
            "|---" * (len(names) + 1) + "|",
        ]
        for s in (*STAGES, "controller", "controller_per_call"):
            cells = [
                f"{run['stages_s'][x][s]['median']:.3f} ({run['stages_s'][x][s]['p90']:.3f})"
                if s in run["stages_s"][x]
                else "–"
                for x in names
            ]
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
        if run["parity"]:
            lines += [
                "",
                f"| {n} steps: parity (last timed edit) | latents max abs | τ max abs | "
                "PSNR source / edited dB |",
                "|---|---|---|---|",
            ]
            for name, p in run["parity"].items():
                tau = max(p["tau_max_abs"], p["tau_self_abs"])
                lines.append(
                    f"| {name} | {p['latents_max_abs']:.2e} | {tau:.1e} | "
                    f"{p['psnr_source_db']:.1f} / {p['psnr_edited_db']:.1f} |"
                )
    lines += [
        "",
        "| runtime @ steps | end to end s | / reference (goal) | UNet call / whole UNet (goal) | "
        "controller / step |",
        "|---|---|---|---|---|",
    ]
    for name, g in rec["goals"].items():
        call = f"{g['unet_call_over_whole']:.3f}" if g["unet_call_over_whole"] else "–"
        speed = g["end_to_end_over_reference"]
        lines.append(
            f"| {name} | {g['end_to_end_s']:.3f} | {f'{speed:.3f}' if speed else '–'} "
            f"(≤ {g['goal_end_to_end']:.2f}) | {call} (≤ {g['goal_unet_call']}) | "
            f"{g['controller_share_of_step']:.4f} |"
        )
    lines += [
        "",
        "Memory: "
        + "; ".join(
            f"{k} " + ", ".join(f"{kk} {vv:.2f}" for kk, vv in v.items() if isinstance(vv, float))
            for k, v in rec["memory"].items()
        ),
    ]
    for name, s in rec["syncs"].items():
        per = ", ".join(f"{k}: {v['per_step']:.1f}" for k, v in s["passes"].items())
        waits = host_waits(s)
        lines.append(
            f"Host syncs per step ({name}, torch's sync debug mode): {per}"
            + (waits and f"; {waits}")
            + "."
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

    n = str(max(rec["steps"]))
    names = list(rec["runs"][n]["stages_s"])
    xs = np.arange(len(STAGES))
    width = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, name in enumerate(names):
        vals = [rec["runs"][n]["stages_s"][name][s]["median"] for s in STAGES]
        ax.bar(xs + i * width, vals, width, label=name)
    ax.set_xticks(xs + width * (len(names) - 1) / 2, STAGES)
    ax.set_ylabel("seconds (median)")
    ax.set_title(
        f"{rec['model']} {rec['height']}px, {n} steps, {rec['precision']}, "
        f"{rec['device']}: reference vs runtime"
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="sd14-random")
    ap.add_argument("--export-dir", default=None, help="an existing export (else one is made)")
    ap.add_argument("--shapes", choices=("dynamic", "static"), default="static")
    ap.add_argument("--height", type=int, default=256)
    ap.add_argument("--steps", type=int, nargs="+", default=[3], help="one or more step counts")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--precision", choices=("fp32", "fp16"), default="fp32")
    ap.add_argument("--device", default="auto", help="reference device: auto | cpu | cuda")
    ap.add_argument("--backends", nargs="*", default=None)
    ap.add_argument(
        "--forms", nargs="+", choices=("fused", "segmented"), default=["fused", "segmented"]
    )
    ap.add_argument("--syncs", action="store_true", help="count host syncs per step (GPU)")
    ap.add_argument(
        "--no-reference",
        dest="reference",
        action="store_false",
        help="the engines alone (an earlier run measured the reference): no parity, no speed-up",
    )
    ap.add_argument(
        "--ort-log-severity",
        type=int,
        choices=range(5),
        default=3,
        help="ONNX Runtime's log level for the engines (2: its warnings too, into the log)",
    )
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", default=None)
    ap.add_argument("--jsonl", default=None, help="append each measurement here as it is taken")
    ap.add_argument("--results", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--tag", default=None)
    ap.add_argument("--plot-to", default=None, help="the plot's path (default: beside the JSON)")
    ap.add_argument(
        "--only-if-available",
        action="store_true",
        help="with --backends: when none of them is available here, record that and stop",
    )
    a = ap.parse_args(argv)
    if not a.reference and not a.export_dir:
        ap.error("--no-reference measures the engines of an export: name it with --export-dir")
    if a.only_if_available and a.backends:
        names = {b.name for b in available_backends()}
        if not names & set(a.backends):
            JsonLines(a.jsonl).emit(
                "skipped", path=" ".join(a.backends), reason=f"not available here: {sorted(names)}"
            )
            print(f"skipped: none of {a.backends} is available ({sorted(names)})")
            return
    rec = run(a)
    stem = a.tag or f"latency_{a.model}_{rec['height']}_{a.precision}_{rec['device']}"
    results = Path(a.results)
    results.mkdir(parents=True, exist_ok=True)
    write_results(results, stem, rec, markdown(rec))  # before the plot, which may fail alone
    print(json.dumps(rec["goals"], indent=1))
    plot(rec, Path(a.plot_to) if a.plot_to else results / f"{stem}.png")


if __name__ == "__main__":
    main()
