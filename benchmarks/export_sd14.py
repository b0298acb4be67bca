"""Measure the exporter on the SD 1.4-shaped random-weight model (issue: exporter).

For each precision: export ``sd14-random`` at 512×512 (segmented and whole), count boundaries,
time the export, list file sizes, and time one ONNX Runtime CPU UNet call, segmented (the
segments chained, tensors handed over by name) versus whole. Writes JSON and markdown under
``benchmarks/results/``. A measurement script, not a test:

    python benchmarks/export_sd14.py --precisions fp32 fp16
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import time
from pathlib import Path

import numpy as np


def _sizes(folder: Path) -> dict[str, int]:
    return {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and "onnx" in p.name
    }


def _time_unet(folder: Path, manifest, batch: int, repeats: int, dtype) -> dict[str, object]:
    """One form at a time (both at once do not fit 24 GB with the SD 1.4 UNet in fp32)."""
    import gc

    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    lh, lw = manifest.height // 8, manifest.width // 8
    rng = np.random.default_rng(0)
    feeds = {
        "sample": rng.standard_normal((batch, 4, lh, lw)).astype(dtype),
        "timestep": np.array([501.0], np.float32),
        "encoder_hidden_states": rng.standard_normal((batch, 77, manifest.text_hidden)).astype(
            dtype
        ),
    }

    def time_form(files: list[str]) -> tuple[list[float], np.ndarray]:
        sessions = [ort.InferenceSession(str(folder / f), so) for f in files]
        specs = manifest.segments if len(files) > 1 else [manifest.graphs["unet"]]

        def run():
            env = dict(feeds)
            for spec, sess in zip(specs, sessions, strict=True):
                outs = sess.run(None, {t.name: env[t.name] for t in spec.inputs})
                env.update(zip([t.name for t in spec.outputs], outs, strict=True))
            return env["noise_pred"]

        out = run()  # warm-up
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            run()
            times.append(time.perf_counter() - t)
        sessions.clear()
        gc.collect()
        return times, out.astype(np.float32)

    whole_t, whole_out = time_form([manifest.graphs["unet"].file])
    seg_t, seg_out = time_form([s.file for s in manifest.segments])
    times = {"whole": whole_t, "segmented": seg_t}
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "batch": batch,
        "repeats": repeats,
        "times_s": times,
        "median_s": med,
        "segmented_over_whole": med["segmented"] / med["whole"],
        "max_abs_diff_chain_vs_whole": float(np.abs(whole_out - seg_out).max()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--precisions", nargs="+", default=["fp32", "fp16"])
    ap.add_argument("--height", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--time-precisions",
        nargs="*",
        default=["fp32"],
        help="precisions whose ORT CPU time is measured (fp16 on a CPU is slow)",
    )
    ap.add_argument("--scratch", default="/tmp/adapedit-export-bench")
    ap.add_argument("--results", default=str(Path(__file__).parent / "results"))
    a = ap.parse_args()

    import onnx
    import onnxruntime
    import torch

    from adapedit.export.api import export_model
    from adapedit.models import build_random

    scratch = Path(a.scratch)
    shutil.rmtree(scratch, ignore_errors=True)
    t = time.perf_counter()
    model = build_random("sd14-random")
    build_s = time.perf_counter() - t
    record: dict[str, object] = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": __import__("os").cpu_count(),
            "device": "CPU",
        },
        "versions": {
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
        "model": "sd14-random",
        "height": a.height,
        "width": a.height,
        "model_build_s": build_s,
        "runs": {},
    }
    exports = {}
    for precision in a.precisions:
        out = scratch / precision
        t = time.perf_counter()
        m = export_model(
            model, out, precision=precision, form="both", height=a.height, width=a.height
        )
        export_s = time.perf_counter() - t
        sizes = _sizes(out)
        exports[precision] = (out, m)
        record["runs"][precision] = {
            "export_s": export_s,
            "boundaries": len(m.boundaries),
            "cross": sum(b.kind == "cross" for b in m.boundaries),
            "self": sum(b.kind == "self" for b in m.boundaries),
            "segments": len(m.segments),
            "bytes_segments": sum(v for k, v in sizes.items() if "segment_" in k),
            "bytes_whole_unet": sum(v for k, v in sizes.items() if "whole" in k),
            "bytes_all": sum(sizes.values()),
            "files": sizes,
        }
    del model  # the timing below needs the memory
    for precision, (out, m) in exports.items():
        run = record["runs"][precision]
        if precision in a.time_precisions:
            dtype = np.float16 if precision == "fp16" else np.float32
            run["ort_cpu"] = _time_unet(out, m, a.batch, a.repeats, dtype)
        print(json.dumps({k: v for k, v in run.items() if k != "files"}, indent=1))
        shutil.rmtree(out, ignore_errors=True)

    results = Path(a.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / "export_sd14.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        "# Exporter on sd14-random",
        "",
        f"Machine: {record['machine']['platform']}, {record['machine']['cpus']} CPUs (CPU only). "
        f"torch {torch.__version__}, onnx {onnx.__version__}, onnxruntime "
        f"{onnxruntime.__version__}. Resolution {a.height}×{a.height}.",
        "",
        "| precision | boundaries (cross + self) | segments | export s | segments MB "
        "| whole UNet MB | ORT CPU whole s | ORT CPU segmented s | segmented / whole "
        "| max abs diff |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for precision, run in record["runs"].items():
        o = run.get("ort_cpu")
        timing = (
            f"{o['median_s']['whole']:.2f} | {o['median_s']['segmented']:.2f} | "
            f"{o['segmented_over_whole']:.3f} | {o['max_abs_diff_chain_vs_whole']:.2e}"
            if o
            else "– | – | – | –"
        )
        lines.append(
            f"| {precision} | {run['boundaries']} ({run['cross']} + {run['self']}) | "
            f"{run['segments']} | {run['export_s']:.0f} | {run['bytes_segments'] / 1e6:.0f} | "
            f"{run['bytes_whole_unet'] / 1e6:.0f} | {timing} |"
        )
    if any("ort_cpu" in r for r in record["runs"].values()):
        o = next(r["ort_cpu"] for r in record["runs"].values() if "ort_cpu" in r)
        lines += [
            "",
            f"UNet calls: batch {o['batch']}, median of {o['repeats']} interleaved "
            "runs after one warm-up each.",
        ]
    (results / "export_sd14.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
