"""Engine folders: ``adapedit build`` turns an export folder into a self-contained engine folder
(manifest, engines, tokenizer, scheduler config, ``engine.json``) that the runtime loads with no
model path. Written to a temporary folder and renamed at the end."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from adapedit.engines.base import Profile, Runner
from adapedit.engines.cache import PlanCache, file_digest
from adapedit.engines.ort import OrtOptions, OrtRunner
from adapedit.engines.weights import WeightPool
from adapedit.errors import EngineError, ManifestError
from adapedit.io import atomic_folder, write_json
from adapedit.spec import MANIFEST, GraphSpec, Manifest

ENGINE_JSON = "engine.json"
#: Where TensorRT plans are cached between builds unless ``cache_dir`` says otherwise.
DEFAULT_PLAN_CACHE = Path.home() / ".cache" / "adapedit" / "trt-plans"
BACKENDS = ("ort", "trt")


@dataclass(frozen=True)
class EngineConfig:
    """What ``engine.json`` records: the backend, its options, the profile, and the hash of the
    manifest the engines were built from (a mismatch means a stale folder)."""

    backend: str
    profile: Profile
    manifest_sha256: str
    ort: OrtOptions = field(default_factory=OrtOptions)
    plans: dict[str, str] = field(default_factory=dict)  # graph file → plan file (trt)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> EngineConfig:
        return cls(
            backend=d["backend"],
            profile=Profile(**{k: tuple(v) for k, v in d["profile"].items()}),
            manifest_sha256=d["manifest_sha256"],
            ort=OrtOptions(**{k: tuple(v) if k == "providers" else v for k, v in d["ort"].items()}),
            plans=dict(d.get("plans", {})),
        )


def default_profile(m: Manifest) -> Profile:
    """A static export's own shapes; for a dynamic one, batch 1–4 (an edit runs 4) and sizes
    from the smallest the export accepts up to the export resolution, optimised for the export
    resolution."""
    if m.static:
        return Profile(
            batch=(min(m.batches), max(m.batches), max(m.batches)),
            height=(m.height,) * 3,
            width=(m.width,) * 3,
        )
    lo = 2 * m.size_multiple
    return Profile(
        batch=(1, 4, 4),
        height=(min(lo, m.height), m.height, m.height),
        width=(min(lo, m.width), m.width, m.width),
    )


def session_graphs(m: Manifest) -> Manifest:
    """The manifest of what a session loads: the text encoder, the VAE and the fused and
    segmented UNets of every batch variant (not the whole UNet, which only benchmarks run)."""
    return replace(m, unet=tuple(replace(u, whole=None) for u in m.unet if u.segments or u.fused))


def _place(src: Path, dest: Path) -> None:
    """``src`` at ``dest``: a hard link where the file system allows it, else a copy."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)


def _weights_index(export_dir: Path, m: Manifest, tmp: Path) -> None:
    """The weights index and files of the graphs ``m`` lists, placed under ``tmp``."""
    doc = json.loads((export_dir / m.weights).read_text())
    files = {g.file for g in m.all_graphs()}
    graphs = {f: refs for f, refs in doc["graphs"].items() if f in files}
    keys = {k for refs in graphs.values() for k in refs.values()}
    tensors = {k: t for k, t in doc["tensors"].items() if k in keys}
    folder = Path(m.weights).parent
    for name in sorted({t["file"] for t in tensors.values()}):
        _place(export_dir / folder / name, tmp / folder / name)
    write_json(tmp / m.weights, {"tensors": tensors, "graphs": graphs})


def build_engines(
    export_dir: str | Path,
    out: str | Path,
    *,
    backend: str = "ort",
    ort: OrtOptions = OrtOptions(),
    profile: Profile | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> EngineConfig:
    """Build an engine folder from an export folder: the graphs a session loads (text encoder,
    VAE, segmented UNet), placed (ORT: hard-linked or copied, with their weights file) or
    compiled (TensorRT), with a manifest of exactly those graphs.

    Raises:
        EngineError: ``out`` exists, unknown backend, a profile given for a static export, no
            segmented UNet, a dynamic export for TensorRT, TensorRT missing or failing.
        ManifestError: the export folder is incomplete or not an export.
    """
    export_dir, out = Path(export_dir), Path(out)
    if backend not in BACKENDS:
        raise EngineError(
            "unknown backend", where="build", expected=" | ".join(BACKENDS), got=backend
        )
    if out.exists():
        raise EngineError(
            "output folder exists",
            where=str(out),
            expected="a path that does not exist yet",
            got="an existing path",
        )
    manifest = Manifest.load(export_dir)
    if not (manifest.has_segments or manifest.has_fused):
        raise EngineError(
            "the export has no UNet a session can run",
            where=str(export_dir),
            expected="the segmented or fused form ('adapedit export --form segmented|fused')",
            got="whole UNet only",
        )
    if backend == "trt" and not manifest.static:
        raise EngineError(
            "TensorRT builds static exports only: a dynamic segmented UNet passes shape tensors "
            "between its graphs, which a TensorRT profile cannot describe",
            where=str(export_dir),
            expected="an export made with 'adapedit export --shapes static'",
            got="shapes dynamic",
            field="shapes",
        )
    if backend == "trt" and manifest.attention_op != "onnx":
        raise EngineError(
            "TensorRT builds standard ONNX operators only: this export wrote its attention as "
            "ONNX Runtime's MultiHeadAttention, which TensorRT's parser does not know",
            where=str(export_dir),
            expected="an export made with 'adapedit export --attention-op onnx' (the default)",
            got=f"attention_op {manifest.attention_op}",
            field="attention_op",
        )
    own = default_profile(manifest)
    if manifest.static and profile is not None and profile != own:
        raise EngineError(
            "a static export is built for its own shapes: a profile cannot widen them",
            where=str(export_dir),
            expected=f"no --batch/--height/--width, or exactly {own}",
            got=profile,
        )
    profile = profile or own
    built = session_graphs(manifest)
    with atomic_folder(out) as tmp:
        built.save(tmp)
        shutil.copy2(export_dir / "scheduler_config.json", tmp / "scheduler_config.json")
        shutil.copytree(export_dir / "tokenizer", tmp / "tokenizer")
        if backend == "ort" and built.weights:
            _weights_index(export_dir, built, tmp)
        plans: dict[str, str] = {}
        for g in tqdm(built.all_graphs(), desc=f"build ({backend})", disable=not progress):
            src = export_dir / g.file
            if backend == "ort":
                _place(src, tmp / g.file)
                if Path(f"{src}.data").is_file():
                    _place(Path(f"{src}.data"), Path(f"{tmp / g.file}.data"))
            else:
                from adapedit.engines.trt import build_cached

                cache = PlanCache(cache_dir or DEFAULT_PLAN_CACHE)
                plan = build_cached(
                    src,
                    g,
                    profile,
                    built.vae_scale_factor,
                    built.size_multiple // built.vae_scale_factor,
                    cache,
                )
                dest = tmp / "plans" / f"{Path(g.file).with_suffix('').as_posix()}.plan"
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(plan, dest)
                plans[g.file] = str(dest.relative_to(tmp))
        config = EngineConfig(backend, profile, file_digest(tmp / MANIFEST), ort, plans)
        write_json(tmp / ENGINE_JSON, config.to_json())
    return config


def load_engine_folder(
    folder: str | Path, *, model_hash: str | None = None, precision: str | None = None
) -> tuple[Manifest, EngineConfig]:
    """Read and validate an engine folder.

    Raises:
        ManifestError: not an engine folder, a missing file, a stale engine.json, or another
            model/precision than expected.
    """
    folder = Path(folder)
    path = folder / ENGINE_JSON
    if not path.is_file():
        raise ManifestError(
            "not an engine folder",
            where=str(folder),
            expected=f"{ENGINE_JSON} written by 'adapedit build'",
            got="none",
        )
    # the engine files are checked below, per backend (a TensorRT folder holds plans, no ONNX)
    manifest = Manifest.load(folder, model_hash=model_hash, precision=precision, check_files=False)
    try:
        config = EngineConfig.from_json(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as e:
        raise ManifestError(
            "unreadable engine.json",
            where=str(path),
            expected="a file written by 'adapedit build'",
            got=repr(e),
        ) from None
    if file_digest(folder / MANIFEST) != config.manifest_sha256:
        raise ManifestError(
            "engines are stale: the manifest changed after the build",
            where=str(path),
            expected=config.manifest_sha256[:16],
            got=file_digest(folder / MANIFEST)[:16],
        )
    for g in manifest.all_graphs():
        file = config.plans.get(g.file, g.file) if config.backend == "trt" else g.file
        if not (folder / file).is_file():
            raise ManifestError(
                "an engine file is missing",
                where=str(folder / file),
                expected="every graph of the manifest",
                got="no such file",
            )
    return manifest, config


def make_runner(
    folder: Path,
    config: EngineConfig,
    spec: GraphSpec,
    ort: OrtOptions | None = None,
    *,
    stream: torch.cuda.Stream | None = None,
    weights: WeightPool | None = None,
    cuda_graph: bool = False,
) -> Runner:
    """The runner of one graph of an engine folder, on ``stream`` (GPU backends), replayed as a
    CUDA graph with ``cuda_graph`` (on a GPU) and, for ONNX Runtime, with the folder's shared
    weights."""
    if config.backend == "trt":
        from adapedit.engines.trt import TrtRunner

        return TrtRunner(
            folder / config.plans[spec.file],
            spec,
            name=spec.file,
            stream=stream,
            cuda_graph=cuda_graph,
        )
    ort = ort or config.ort  # CUDA graphs for this runner exactly as asked, whatever ort says
    ort = replace(ort, cuda_graph=cuda_graph and ort.device.type == "cuda")
    return OrtRunner(folder / spec.file, spec, ort, name=spec.file, stream=stream, weights=weights)
