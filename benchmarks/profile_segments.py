"""Where the segmented UNet's extra time goes: ONNX Runtime's own profiler on the whole graph and
on the segments, same inputs; time per operator type (summed over nodes), the sum of node times
versus the wall time of a call (the gap is session/threading/binding overhead). Writes
``benchmarks/results/profile_segments_<model>_<size>.{json,md}``:

    python -m benchmarks.profile_segments --model sd14-random --height 256 --batch 4
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import export_cli, machine_info, write_results


def profile(runners, run, repeats: int) -> dict:
    """Run ``run`` ``repeats`` times with every runner's profiler on (an ORT session profiles
    from its creation until ``end_profiling``; the first run's allocations count for both
    forms alike)."""
    walls = []
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        walls.append(time.perf_counter() - t)
    by_op: collections.Counter = collections.Counter()
    for r in runners:
        path = r.session.end_profiling()
        for ev in json.loads(Path(path).read_text()):
            if ev.get("cat") == "Node" and ev["name"].endswith("_kernel_time"):
                by_op[ev["args"]["op_name"]] += ev["dur"] / 1e6 / repeats
        Path(path).unlink(missing_ok=True)
    return {
        "wall_s": sum(walls) / repeats,
        "nodes_s": sum(by_op.values()),
        "by_op_s": dict(by_op.most_common()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="sd14-random")
    ap.add_argument("--height", type=int, default=256)
    ap.add_argument("--shapes", choices=("dynamic", "static"), default="static")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--results", default=str(Path(__file__).parent / "results"))
    a = ap.parse_args()

    from adapedit.engines.ort import OrtOptions, OrtRunner
    from adapedit.runtime.segmented import SegmentedUNet
    from adapedit.spec import Manifest

    work = Path(tempfile.mkdtemp(prefix="adapedit-profile-"))
    export_cli(a.model, work / "export", precision="fp32", shapes=a.shapes, size=a.height)
    m = Manifest.load(work / "export")
    u = m.unet_graphs(a.batch)
    lat = m.height // m.vae_scale_factor
    g = torch.Generator().manual_seed(0)
    feeds = {
        "sample": torch.randn(a.batch, 4, lat, lat, generator=g),
        "timestep": torch.tensor([501.0]),
        "encoder_hidden_states": torch.randn(a.batch, 77, m.text_hidden, generator=g),
    }

    options = OrtOptions(profile_prefix=str(work / "prof"))

    def runner(spec):
        r = OrtRunner(work / "export" / spec.file, spec, options)
        r.activate()
        return r

    whole = runner(u.whole)
    rec_whole = profile([whole], lambda: whole.infer(feeds), a.repeats)
    whole.deactivate()
    segs = [runner(s) for s in u.segments]
    unet = SegmentedUNet(m, u, segs)
    rec_seg = profile(
        segs,
        lambda: unet(feeds["sample"], feeds["timestep"], feeds["encoder_hidden_states"]),
        a.repeats,
    )
    ops = sorted(
        set(rec_whole["by_op_s"]) | set(rec_seg["by_op_s"]),
        key=lambda k: -abs(rec_seg["by_op_s"].get(k, 0) - rec_whole["by_op_s"].get(k, 0)),
    )
    record = {
        "machine": machine_info(),
        "model": a.model,
        "height": m.height,
        "batch": a.batch,
        "whole": rec_whole,
        "segmented": rec_seg,
    }
    lines = [
        f"# Segmented vs whole UNet, ONNX Runtime CPU profile ({a.model}, {m.height} px, batch "
        f"{a.batch})",
        "",
        f"Machine: {record['machine']['description']}. Mean of {a.repeats} profiled calls.",
        "",
        "| | whole | segmented |",
        "|---|---|---|",
        f"| wall s | {rec_whole['wall_s']:.3f} | {rec_seg['wall_s']:.3f} |",
        f"| sum of node times s | {rec_whole['nodes_s']:.3f} | {rec_seg['nodes_s']:.3f} |",
        f"| wall − nodes s | {rec_whole['wall_s'] - rec_whole['nodes_s']:.3f} | "
        f"{rec_seg['wall_s'] - rec_seg['nodes_s']:.3f} |",
        "",
        "| op type (largest differences) | whole s | segmented s |",
        "|---|---|---|",
    ]
    for k in ops[:12]:
        lines.append(
            f"| {k} | {rec_whole['by_op_s'].get(k, 0):.3f} | {rec_seg['by_op_s'].get(k, 0):.3f} |"
        )
    write_results(
        Path(a.results), f"profile_segments_{a.model}_{m.height}", record, "\n".join(lines) + "\n"
    )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
