"""A cache of serialized engine plans keyed by (ONNX hash, backend version, GPU, profile,
build recipe).

Writes are atomic (temporary file, then rename). A plan whose sidecar metadata is missing, does
not match its key, or whose bytes do not match the recorded checksum is stale or corrupt: it is
rebuilt with a message, never loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

from adapedit.io import atomic_write_bytes

log = logging.getLogger("adapedit.engines")


def file_digest(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file, and of its external-data file ``<file>.data`` if there is one."""
    h = hashlib.sha256()
    for p in (Path(path), Path(f"{path}.data")):
        if p.is_file():
            _feed(h, p, chunk)
    return h.hexdigest()


def _feed(h, path: str | Path, chunk: int) -> None:
    """A file's bytes into the hash ``h``, ``chunk`` bytes at a time."""
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)


def graph_digest(path: str | Path) -> str:
    """sha256 of an ONNX graph and of every external-data file it reads — ``<file>.data`` or
    the weights file a static export's UNet graphs share (``unet/weights-*.bin``) — so a graph
    whose weights changed on disk has another digest."""
    import onnx

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    files = {
        entry.value
        for init in model.graph.initializer
        if init.data_location == onnx.TensorProto.EXTERNAL
        for entry in init.external_data
        if entry.key == "location"
    }
    h = hashlib.sha256(_sha256(path).encode())
    for name in sorted(files):
        h.update(f"{name}:{_sha256(path.parent / name)}".encode())
    return h.hexdigest()


def _sha256(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of one file, remembered for as long as its size and modification time hold (the
    segments of a folder share one large weights file: hashed once per build, not per graph)."""
    st = path.stat()
    return _sha256_of(str(path.resolve()), st.st_size, st.st_mtime_ns, chunk)


@lru_cache(maxsize=256)
def _sha256_of(path: str, size: int, mtime_ns: int, chunk: int) -> str:
    h = hashlib.sha256()
    _feed(h, path, chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class PlanKey:
    """What a plan depends on."""

    onnx_sha256: str
    backend_version: str
    gpu: str
    profile: str
    recipe: str  # how the backend built it (flags, workspace), as JSON

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:24]


class PlanCache:
    """Plans under ``root``: ``<digest>.plan`` and ``<digest>.json`` (key + sha256 of the plan)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def timing_cache(self, version: str, gpu: str) -> Path:
        """The TensorRT timing cache every build under ``root`` for one TensorRT version and
        GPU shares (kernel timings; TensorRT refuses a cache of another version or GPU)."""
        tag = hashlib.sha256(f"{version}|{gpu}".encode()).hexdigest()[:16]
        return self.root / f"timing-{tag}.cache"

    def paths(self, key: PlanKey) -> tuple[Path, Path]:
        return self.root / f"{key.digest}.plan", self.root / f"{key.digest}.json"

    def load(self, key: PlanKey) -> bytes | None:
        """The cached plan, or None (with a message) if absent, stale or corrupt."""
        plan_path, meta_path = self.paths(key)
        if not plan_path.is_file():
            return None
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            log.warning("engine plan %s has no readable metadata: rebuilding", plan_path)
            return None
        if meta.get("key") != asdict(key):
            log.warning(
                "engine plan %s is stale (built for %s): rebuilding", plan_path, meta.get("key")
            )
            return None
        data = plan_path.read_bytes()
        if hashlib.sha256(data).hexdigest() != meta.get("plan_sha256"):
            log.warning("engine plan %s is corrupt (checksum mismatch): rebuilding", plan_path)
            return None
        return data

    def store(self, key: PlanKey, plan: bytes) -> Path:
        plan_path, meta_path = self.paths(key)
        atomic_write_bytes(plan_path, plan)
        meta = {"key": asdict(key), "plan_sha256": hashlib.sha256(plan).hexdigest()}
        atomic_write_bytes(meta_path, json.dumps(meta, indent=2).encode())
        return plan_path

    def get_or_build(self, key: PlanKey, build: Callable[[], bytes]) -> tuple[Path, bool]:
        """The plan's path, building (and storing) it unless a valid one is cached; the flag
        says whether it was built."""
        if self.load(key) is not None:
            return self.paths(key)[0], False
        return self.store(key, build()), True
