"""Measure the exporter on the SD 1.4-shaped random-weight model (issue: exporter).

For each precision: export ``sd14-random`` at 512×512 (segmented and whole), count boundaries,
time the export, list file sizes; then time one ONNX Runtime CPU UNet call, whole versus
segmented (the segments chained, tensors handed over by name). The export runs in a child
process so the timing process holds nothing but ONNX Runtime (24 GB is tight for SD 1.4 in
fp32). Writes ``benchmarks/results/export_sd14.{json,md}``:

    python -m benchmarks.export_sd14 --precisions fp32 fp16
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import shutil
import statistics
import time
from pathlib import Path

import numpy as np

from benchmarks.common import machine_info, write_results


def _sizes(folder: Path) -> dict[str, int]:
    return {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and ("onnx" in p.name or p.name.endswith(".bin"))
    }


def _export_all(scratch: str, precisions: list[str], height: int, out_json: str) -> None:
    """Child process: build the model, export each precision, record times and sizes."""
    from adapedit.export.api import ExportOptions, export_model
    from adapedit.pipelines.models import build_random

    t = time.perf_counter()
    model = build_random("sd14-random")
    runs: dict[str, dict] = {"model_build_s": time.perf_counter() - t}
    for precision in precisions:
        out = Path(scratch) / precision
        t = time.perf_counter()
        m = export_model(
            model, out, ExportOptions(precision=precision), height=height, width=height
        )
        sizes = _sizes(out)
        runs[precision] = {
            "export_s": time.perf_counter() - t,
            "boundaries": len(m.boundaries),
            "cross": sum(b.kind == "cross" for b in m.boundaries),
            "self": sum(b.kind == "self" for b in m.boundaries),
            "segments": len(m.unet[0].segments),
            "bytes_segments": sum(v for k, v in sizes.items() if "segment_" in k),
            "bytes_whole_unet": sum(v for k, v in sizes.items() if "whole" in k),
            "bytes_unet_weights": sum(v for k, v in sizes.items() if "weights" in k),
            "bytes_all": sum(sizes.values()),
            "files": sizes,
        }
    Path(out_json).write_text(json.dumps(runs))


def _time_unet(folder: Path, batch: int, repeats: int) -> dict[str, object]:
    """Whole, then segmented (one form loaded at a time): one warm-up, then ``repeats`` runs."""
    import onnxruntime as ort

    from adapedit.spec import Manifest

    manifest = Manifest.load(folder)
    dtype = np.float16 if manifest.precision == "fp16" else np.float32
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.enable_cpu_mem_arena = False  # the arena's growth does not fit 24 GB with SD 1.4 fp32
    # As the runtime does (engines.ort.OrtOptions): idle threads of one session must not spin
    # while the next segment's session runs.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    lat = manifest.height // manifest.vae_scale_factor, manifest.width // manifest.vae_scale_factor
    rng = np.random.default_rng(0)
    feeds = {
        "sample": rng.standard_normal((batch, 4, *lat)).astype(dtype),
        "timestep": np.array([501.0], np.float32),
        "encoder_hidden_states": rng.standard_normal((batch, 77, manifest.text_hidden)).astype(
            dtype
        ),
    }

    def time_form(specs) -> tuple[list[float], np.ndarray]:
        sessions = [
            ort.InferenceSession(str(folder / s.file), so, providers=["CPUExecutionProvider"])
            for s in specs
        ]

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

    (unet,) = manifest.unet
    whole_t, whole_out = time_form([unet.whole])
    seg_t, seg_out = time_form(list(unet.segments))
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


def markdown(record: dict) -> str:
    lines = [
        "# Exporter on sd14-random",
        "",
        f"Machine: {record['machine']['description']} (CPU only). "
        f"Resolution {record['height']}×{record['height']}, ONNX Runtime CPU.",
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
    timed = [r["ort_cpu"] for r in record["runs"].values() if "ort_cpu" in r]
    if timed:
        o = timed[0]
        lines += [
            "",
            f"UNet calls: batch {o['batch']}, median of {o['repeats']} runs after one warm-up, "
            "whole then segmented (one form loaded at a time), CPU memory arena off, intra-op "
            "spinning off. Segments exchange numpy arrays through `InferenceSession.run`.",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--precisions", nargs="+", default=["fp32", "fp16"])
    ap.add_argument("--height", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--time-precisions",
        nargs="*",
        default=["fp32"],
        help="precisions whose ORT CPU time is measured (fp16 on a CPU is slow)",
    )
    ap.add_argument("--scratch", default="/tmp/adapedit-export-bench")
    ap.add_argument(
        "--reuse",
        action="store_true",
        help="time the exports already in --scratch instead of exporting again",
    )
    ap.add_argument("--results", default=str(Path(__file__).parent / "results"))
    a = ap.parse_args()

    scratch = Path(a.scratch)
    if not (a.reuse and (scratch / "x.json").is_file()):
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        child = multiprocessing.get_context("spawn").Process(
            target=_export_all,
            args=(str(scratch), a.precisions, a.height, str(scratch / "x.json")),
        )
        child.start()
        child.join()
        if child.exitcode != 0:
            raise SystemExit(f"export failed (exit code {child.exitcode})")
    runs = json.loads((scratch / "x.json").read_text())
    record = {
        "machine": machine_info(),
        "model": "sd14-random",
        "height": a.height,
        "model_build_s": runs.pop("model_build_s"),
        "runs": runs,
    }
    for precision in a.time_precisions:
        runs[precision]["ort_cpu"] = _time_unet(scratch / precision, a.batch, a.repeats)
        print(json.dumps(runs[precision]["ort_cpu"], indent=1))
    write_results(Path(a.results), "export_sd14", record, markdown(record))
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
