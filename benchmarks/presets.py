"""The presets side by side: end-to-end edit time of ``paper`` against ``fast`` on each path
(the PyTorch reference on a model, the runtime on an engine folder in one UNet form), timed
interleaved in one run; a re-edit served by the calibration cache against the first edit of
the same target; and each path's peak memory in a process of its own.

Paths are ``reference:MODEL``, ``runtime:ENGINE_DIR:FORM[:FLAG…]`` (FORM ``fused`` |
``segmented``; FLAG ``noprepack``: ONNX Runtime's CPU kernels keep no packed weight copies,
``arena-shared`` / ``arena-off``: one CPU arena for all sessions / none,
``extended``, ``basic`` or ``disable``: that graph optimisation level instead of the folder's) or
``build:EXPORT_DIR:FORM:BACKEND`` (engines built from an export for a backend of
:func:`benchmarks.common.available_backends`, e.g. ``ort-cuda``, in a temporary folder)::

    OMP_NUM_THREADS=1 python -m benchmarks.presets --paths reference:shapes \\
        runtime:ENGINES:fused runtime:ENGINES:segmented --repeats 3 --cached --memory

Writes ``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` (seconds per edit per path and preset).
"""

from __future__ import annotations

import argparse
import atexit
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from adapedit.config import DEFAULT_CACHE_BYTES, PRESETS, EditConfig, SamplerConfig
from benchmarks.common import available_backends, machine_info, write_results
from benchmarks.gpu_run import emit
from benchmarks.latency import stats

SOURCE, TARGET = "a red circle on the left", "a blue circle on the left"
RESULTS = Path(__file__).parent / "results"


def load(path: str, *, cache: bool):
    """The pipeline of ``reference:MODEL`` or ``runtime:DIR:FORM`` (calibration cache on or
    off)."""
    kind, _, rest = path.partition(":")
    bound = DEFAULT_CACHE_BYTES if cache else None
    if kind == "reference":
        from adapedit.pipelines.pipeline import ReferencePipeline

        return ReferencePipeline.from_model(rest, calibration_cache=bound)
    if kind == "runtime":
        from adapedit.engines.folder import load_engine_folder
        from adapedit.runtime.session import EditSession

        folder, form, *flags = rest.split(":")
        ort = load_engine_folder(Path(folder))[1].ort
        if "noprepack" in flags:  # CPU kernels keep no packed copy of their weights
            ort = replace(ort, prepacking=False)
        for arena in ("shared", "off"):  # CPU activations: one arena for all, or none
            if f"arena-{arena}" in flags:
                ort = replace(ort, cpu_arena=arena)
        for level in ("disable", "basic", "extended"):  # below "all": no NCHWc weight copies
            if level in flags:
                ort = replace(ort, optimization=level)
        return EditSession(folder, form=form, calibration_cache=bound, ort=ort)
    if kind == "build":
        from adapedit.engines.folder import build_engines
        from adapedit.runtime.session import EditSession

        export, form, name = rest.split(":")
        backends = {b.name: b for b in available_backends()}
        if name not in backends:
            raise SystemExit(f"backend {name!r} is not available here: {sorted(backends)}")
        folder = Path(tempfile.mkdtemp(prefix="adapedit-presets-")) / "engines"
        atexit.register(shutil.rmtree, folder.parent, True)
        b = backends[name]
        build_engines(Path(export), folder, backend=b.build, ort=b.ort, progress=False)
        return EditSession(folder, form=form, calibration_cache=bound)
    raise SystemExit(
        f"unknown path {path!r}: expected reference:MODEL, runtime:DIR:FORM or "
        "build:EXPORT:FORM:BACKEND"
    )


def edit_seconds(
    pipe, preset: str, seed: int, edit: EditConfig = EditConfig(), calibration: str = "computed"
) -> float:
    """One edit at ``preset`` (its steps, scheduler and calibration steps); seconds.

    Raises:
        RuntimeError: its calibration pass was not ``calibration`` (``computed`` or ``cached``):
            the time would not be what it is reported as.
    """
    config, sampler = PRESETS[preset].apply(edit, SamplerConfig(seed=seed))
    t = time.perf_counter()
    result = pipe.edit(SOURCE, TARGET, config, sampler)
    seconds = time.perf_counter() - t
    if result.calibration != calibration:
        raise RuntimeError(f"calibration {result.calibration}, timed as {calibration}")
    return seconds


def time_presets(pipe, repeats: int, names: tuple[str, ...] = tuple(PRESETS)) -> dict:
    """Warm-up (one fast edit), then ``repeats`` rounds of the presets ``names``, alternating
    which goes first."""
    edit_seconds(pipe, "fast", 0)
    times: dict[str, list[float]] = {p: [] for p in names}
    for r in range(repeats):
        order = list(names) if r % 2 == 0 else list(reversed(names))
        for p in order:
            times[p].append(edit_seconds(pipe, p, r + 1))
    return {p: stats(v) for p, v in times.items()}


def time_cached(pipe, repeats: int, preset: str) -> dict:
    """Per round: the first edit of a new target (seed) and a re-edit changing only λ_S."""
    first, again = [], []
    for r in range(repeats):
        first.append(edit_seconds(pipe, preset, 1000 + r))
        again.append(edit_seconds(pipe, preset, 1000 + r, EditConfig(lambda_s=0.5), "cached"))
    return {"first": stats(first), "cached": stats(again)}


def peak_rss_child(path: str) -> dict:
    """``path`` loaded and one short edit run in a process of its own: its peak RSS."""
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.presets", "--child-memory", path],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def child_memory(path: str) -> None:
    """Load ``path`` and run one short edit (2 steps, calibration at 1: both UNet batches run,
    and memory does not grow with steps); print the process's peak RSS."""
    pipe = load(path, cache=False)
    pipe.edit(SOURCE, TARGET, EditConfig(calibration_steps=1), SamplerConfig(steps=2))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"peak_rss_gb": peak}))


def markdown(rec: dict) -> str:
    m = rec["machine"]
    lines = [
        "# Presets side by side",
        "",
        f"Measured on {m['cpu']}, {m['cpus']} CPUs, GPU: {m['gpu'] or 'none'}; "
        f"torch {m['versions']['torch']}, onnxruntime {m['versions']['onnxruntime']}; "
        f"OMP_NUM_THREADS={rec['omp_threads']}. Median (p90) seconds of {rec['repeats']} "
        "interleaved edits after one warm-up; calibration cache off for the preset timings.",
    ]
    if rec["presets"]:
        lines += [
            "",
            "| path | " + " | ".join(f"{p} s" for p in PRESETS) + " | paper / fast (goal ≥ 2.5) |",
            "|---|" + "---|" * (len(PRESETS) + 1),
        ]
    for path, t in rec["presets"].items():
        cells = [f"{t[p]['median']:.2f} ({t[p]['p90']:.2f})" if p in t else "–" for p in PRESETS]
        ratio = f"{t['paper']['median'] / t['fast']['median']:.2f}" if len(t) == 2 else "–"
        lines.append(f"| {path} | " + " | ".join(cells) + f" | {ratio} |")
    if rec["cached"]:
        lines += [
            "",
            f"Calibration cache ({rec['cached_preset']} preset): the first edit of a target, "
            "then a re-edit changing only λ_S.",
            "",
            "| path | first edit s | cached re-edit s | cached / first (goal ≤ 0.7) |",
            "|---|---|---|---|",
        ]
        for path, t in rec["cached"].items():
            f, c = t["first"]["median"], t["cached"]["median"]
            lines.append(f"| {path} | {f:.2f} | {c:.2f} | {c / f:.2f} |")
    if rec["memory"]:
        ref = [v["peak_rss_gb"] for k, v in rec["memory"].items() if k.startswith("reference")]
        lines += [
            "",
            "Peak resident memory, each path in a process of its own (load + one 2-step edit).",
            "",
            "| path | peak RSS GB | / reference (goal ≤ 1.3) |",
            "|---|---|---|",
        ]
        for path, v in rec["memory"].items():
            r = f"{v['peak_rss_gb'] / ref[0]:.2f}" if ref else "–"
            lines.append(f"| {path} | {v['peak_rss_gb']:.2f} | {r} |")
    return "\n".join(lines) + "\n"


def plot(rec: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    paths = list(rec["presets"])
    x = np.arange(len(paths))
    fig, ax = plt.subplots(figsize=(1.8 + 2.2 * len(paths), 4))
    width = 0.8 / len(PRESETS)
    for i, p in enumerate(PRESETS):
        ys = [rec["presets"][k].get(p, {}).get("median", 0.0) for k in paths]
        ax.bar(x + i * width, ys, width, label=f"{p}: {PRESETS[p].description}")
    ax.set_xticks(x + width * (len(PRESETS) - 1) / 2, paths, fontsize=7)
    ax.set_ylabel("seconds per edit (median)")
    ax.set_title(f"Presets on {rec['machine']['gpu'] or rec['machine']['cpu']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict | None:
    import os

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--paths", nargs="+", default=["reference:shapes"])
    ap.add_argument("--repeats", type=int, default=3, help="0: no timing (with --memory)")
    ap.add_argument(
        "--presets", nargs="+", choices=tuple(PRESETS), default=list(PRESETS), help="to time"
    )
    ap.add_argument("--cached", action="store_true", help="time the calibration cache too")
    ap.add_argument("--cached-preset", choices=tuple(PRESETS), default="paper")
    ap.add_argument("--memory", action="store_true", help="peak RSS, one process per path")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--stem", default="presets")
    ap.add_argument("--jsonl", default=None, help="append each path's record here as it is taken")
    ap.add_argument("--child-memory", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child_memory:
        child_memory(a.child_memory)
        return None
    rec: dict = {
        "machine": machine_info(),
        "omp_threads": os.environ.get("OMP_NUM_THREADS"),
        "repeats": a.repeats,
        "presets_defined": {k: vars(v) for k, v in PRESETS.items()},
        "presets": {},
        "cached": {},
        "cached_preset": a.cached_preset,
        "memory": {},
    }
    for path in a.paths if a.repeats > 0 else ():  # --repeats 0: memory alone
        pipe = load(path, cache=False)
        rec["presets"][path] = time_presets(pipe, a.repeats, tuple(a.presets))
        if a.jsonl:
            emit(Path(a.jsonl), "presets", path=path, **rec["presets"][path])
        if a.cached:
            pipe.use_calibration_cache()
            rec["cached"][path] = time_cached(pipe, a.repeats, a.cached_preset)
            if a.jsonl:
                emit(Path(a.jsonl), "cached", path=path, **rec["cached"][path])
        del pipe
    if a.memory:
        for path in a.paths:
            rec["memory"][path] = peak_rss_child(path)
    out = Path(a.out)
    write_results(out, a.stem, rec, markdown(rec))
    if rec["presets"]:
        plot(rec, out / f"{a.stem}.png")
    return rec


if __name__ == "__main__":
    main()
