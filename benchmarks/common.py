"""Shared pieces of the benchmark scripts: the machine, the backends available here, and writing
results (JSON + markdown) atomically."""

from __future__ import annotations

import ctypes.util
import importlib.util
import json
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from adapedit.engines.ort import OrtOptions
from adapedit.io import atomic_write_bytes


@dataclass(frozen=True)
class Backend:
    """A runtime backend: its name in results, the ``adapedit build`` backend, ORT options."""

    name: str
    build: str
    ort: OrtOptions = OrtOptions()


def available_backends() -> list[Backend]:
    """Every backend this machine can run: ONNX Runtime CPU always; ONNX Runtime CUDA and
    TensorRT execution providers when that onnxruntime has them (and, for TensorRT, its
    libraries are found); native TensorRT when
    ``tensorrt`` imports and a GPU is present."""
    import onnxruntime as ort
    import torch

    providers = ort.get_available_providers()
    if "CUDAExecutionProvider" in providers and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()  # CUDA and cuDNN libraries from the pip packages beside torch
    out = [Backend("ort-cpu", "ort")]
    if torch.cuda.is_available() and "CUDAExecutionProvider" in providers:
        out.append(Backend("ort-cuda", "ort", OrtOptions(providers=("cuda",))))
    # onnxruntime-gpu lists the TensorRT EP even where TensorRT's libraries are missing
    has_nvinfer = ctypes.util.find_library("nvinfer") is not None
    if torch.cuda.is_available() and "TensorrtExecutionProvider" in providers and has_nvinfer:
        out.append(Backend("ort-trt", "ort", OrtOptions(providers=("tensorrt", "cuda"))))
    if torch.cuda.is_available() and importlib.util.find_spec("tensorrt") is not None:
        out.append(Backend("trt", "trt"))
    return out


def machine_info() -> dict:
    """Where a number was measured: CPU, cores, GPU (if any) and library versions."""
    import onnxruntime
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
    }
    for mod in ("diffusers", "transformers", "onnx", "tensorrt"):
        if importlib.util.find_spec(mod) is not None:
            versions[mod] = getattr(__import__(mod), "__version__", "?")
    desc = f"{cpu}, {os.cpu_count()} CPUs" + (f", GPU {gpu}" if gpu else ", no GPU")
    return {
        "description": desc,
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "gpu": gpu,
        "platform": platform.platform(),
        "versions": versions,
    }


def write_results(folder: Path, stem: str, record: dict, md: str) -> None:
    """``<stem>.json`` and ``<stem>.md`` under ``folder``."""
    atomic_write_bytes(folder / f"{stem}.json", (json.dumps(record, indent=2) + "\n").encode())
    atomic_write_bytes(folder / f"{stem}.md", md.encode())
    print(md)


def export_cli(
    model: str,
    folder: Path,
    *,
    precision: str,
    shapes: str,
    size: int,
    forms: Sequence[str] = ("segmented", "whole"),
    batches: Sequence[int] = (2, 4),
    jobs: int = 1,
) -> None:
    """``adapedit export`` in a child process (the command users run; its memory is gone when
    it ends, so the measuring process holds only what it measures)."""
    cmd = [
        sys.executable,
        "-m",
        "adapedit.cli",
        "export",
        "--model",
        model,
        "--out",
        str(folder),
        "--precision",
        precision,
        "--shapes",
        shapes,
        "--height",
        str(size),
        "--width",
        str(size),
        "--form",
        *forms,
        "--batches",
        *map(str, batches),
        "--jobs",
        str(jobs),
        "--quiet",
    ]
    subprocess.run(cmd, check=True)
