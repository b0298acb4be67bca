"""The GPU script's dry run: every step it runs on a GPU (install layout, static export, graph
check, latency, parity, result files) on the CPU with the tiny model, so the GPU run cannot die
on what a CPU can catch."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_script_dry_run_completes_and_records_everything(tmp_path):
    env = {
        **os.environ,
        "GPU_DRY_RUN": "1",
        "OUT_DIR": str(tmp_path / "out"),
        "WORK": str(tmp_path / "work"),
        "ADAPEDIT_SITE": str(tmp_path / "site"),
        "STEPS": "2",
    }
    r = subprocess.run(
        ["bash", "benchmarks/gpu.sh"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr
    out = tmp_path / "out"
    for name in ("graph_check", "latency", "parity", "peer"):
        assert (out / f"{name}.json").is_file() and (out / f"{name}.md").is_file()
    assert (out / "latency.png").is_file() and (out / "backends.txt").is_file()
    # the install layout: the installed package, not the repo's folder, was imported
    assert (tmp_path / "site" / "adapedit" / "runtime" / "session.py").is_file()
    graphs = json.loads((out / "graph_check.json").read_text())
    assert graphs["shapes"] == "static"
    assert graphs["unet_memcpy_nodes"] == 0 and graphs["unet_integer_cut_inputs"] == 0
    latency = json.loads((out / "latency.json").read_text())
    rows = {"ort-cpu-whole", "ort-cpu-segmented", "ort-cpu-fused", "torch-reference"}
    assert rows <= set(latency["unet_call_s"])
    assert {"ort-cpu-segmented", "ort-cpu-fused"} <= set(latency["goals"])
    fused_vs_segmented = latency["parity"]["ort-cpu-segmented vs ort-cpu-fused"]
    assert fused_vs_segmented["latents_max_abs"] <= 1e-4
    assert latency["parity"]["ort-cpu-fused vs reference"]["tau_max_abs"] <= 1e-6
    peer = json.loads((out / "peer.json").read_text())
    assert {"torch-sdpa", "torch-fused"} <= set(peer["unet_call_s"])
    parity = json.loads((out / "parity.json").read_text())
    assert parity["cases"] and all(c["pass"] for c in parity["cases"])
    assert not (tmp_path / "work").exists()  # the scratch export is removed
