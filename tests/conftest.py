"""Shared fixtures: the CLIP tokenizer and the tiny random SD model, built once per session.
(Fixtures are added here, never replaced: several test modules rely on them.)"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

#: Written by tools, not by tests: byte code, caches of pytest and ruff, the install's metadata,
#: the virtual environment, git, and the GPU transfer kit a developer made (benchmarks/README.md).
_TOOL_PATHS = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", ".whl", ".ortgpu"}
_ROOT = Path(__file__).resolve().parents[1]
_HOME_CACHE = Path.home() / ".cache"


def _files(root: Path, depth: int | None = None) -> set[str]:
    """Paths under ``root`` (to ``depth`` levels), tool folders left out."""
    out = set()
    for folder, dirs, files in os.walk(root):
        rel = Path(folder).relative_to(root)
        dirs[:] = [d for d in dirs if d not in _TOOL_PATHS and not d.endswith(".egg-info")]
        if depth is not None and len(rel.parts) >= depth:
            out.update(str(rel / d) for d in dirs)
            dirs[:] = []
        out.update(str(rel / f) for f in files)
    return out


def pytest_configure(config):
    # matplotlib's font cache goes to a folder of the run's, not ~/.cache/matplotlib; removed
    # when the run ends (pytest_unconfigure)
    if "MPLCONFIGDIR" not in os.environ:
        config._mpl_dir = os.environ["MPLCONFIGDIR"] = tempfile.mkdtemp(prefix="adapedit-mpl-")
    # onnxruntime ≥ 1.32 writes a device id and a database under ~/.cache/Microsoft on import
    # and on its first session unless its telemetry is off (set before any test imports it,
    # inherited by the processes tests start)
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    config._written_before = (_files(_ROOT), _files(_HOME_CACHE, 2))


def pytest_sessionfinish(session, exitstatus):
    """The test of the tests: nothing new in the repository tree or in ~/.cache after the run
    (tests write under their tmp_path; the GPU kit and tool caches apart)."""
    tree, home = session.config._written_before
    new = sorted(_files(_ROOT) - tree) + sorted(
        str(_HOME_CACHE / p) for p in _files(_HOME_CACHE, 2) - home
    )
    if new:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        reporter.ensure_newline()
        reporter.write_line(f"tests wrote outside their tmp_path: {new[:20]}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_unconfigure(config):
    mpl_dir = getattr(config, "_mpl_dir", None)
    if mpl_dir is not None:
        shutil.rmtree(mpl_dir, ignore_errors=True)
        del os.environ["MPLCONFIGDIR"]


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    has_trt = importlib.util.find_spec("tensorrt") is not None
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "trt" in item.keywords and not has_trt:
            item.add_marker(pytest.mark.skip(reason="needs TensorRT"))


@pytest.fixture(scope="session")
def tokenizer():
    """The vendored CLIP BPE tokenizer, loaded once per test session (no model needed)."""
    from adapedit.pipelines.models import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="session")
def tiny_components():
    from adapedit.pipelines.models import build_random

    return build_random("tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_components):
    from adapedit.pipelines.pipeline import ReferencePipeline

    return ReferencePipeline(tiny_components)


@pytest.fixture(scope="session")
def tiny_export(tiny_components, tmp_path_factory):
    """The tiny model exported (fp32, segmented and whole, 128×128): (folder, manifest)."""
    from adapedit.export.api import export_model

    out = tmp_path_factory.mktemp("exports") / "tiny-fp32"
    manifest = export_model(tiny_components, out, progress=False)
    return out, manifest


@pytest.fixture(scope="session")
def tiny_engines(tiny_export, tmp_path_factory):
    """ONNX Runtime (CPU) engines of the tiny export."""
    from adapedit.engines.folder import build_engines

    out = tmp_path_factory.mktemp("engines") / "tiny-ort"
    build_engines(tiny_export[0], out, backend="ort", progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_session(tiny_engines):
    from adapedit.runtime.session import EditSession

    return EditSession(tiny_engines)


@pytest.fixture(scope="session")
def tiny_static_export(tiny_components, tmp_path_factory):
    """The tiny model exported static (fp32, 128×128, UNet batches 2 and 4, both forms)."""
    from adapedit.export.api import ExportOptions, export_model

    out = tmp_path_factory.mktemp("exports") / "tiny-static"
    manifest = export_model(tiny_components, out, ExportOptions(shapes="static"), progress=False)
    return out, manifest


@pytest.fixture(scope="session")
def tiny_static_session(tiny_static_export, tmp_path_factory):
    """A session on ONNX Runtime (CPU) engines of the static tiny export."""
    from adapedit.engines.folder import build_engines
    from adapedit.runtime.session import EditSession

    out = tmp_path_factory.mktemp("engines") / "tiny-static-ort"
    build_engines(tiny_static_export[0], out, backend="ort", progress=False)
    return EditSession(out)


@pytest.fixture(scope="session")
def tiny_fused_engines(tiny_components, tmp_path_factory):
    """ONNX Runtime (CPU) engines of the tiny model's static export with the fused UNet and
    the segmented one (batches 2 and 4, 128×128)."""
    from adapedit.engines.folder import build_engines
    from adapedit.export.api import ExportOptions, export_model

    export = tmp_path_factory.mktemp("exports") / "tiny-fused"
    options = ExportOptions(shapes="static", forms=("fused", "segmented"))
    export_model(tiny_components, export, options, progress=False)
    out = tmp_path_factory.mktemp("engines") / "tiny-fused-ort"
    build_engines(export, out, backend="ort", progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_ort_attention_export(tiny_components, tmp_path_factory):
    """The tiny model exported static at batch 4 (fp32, 128×128, segmented and whole) with the
    attention no edit reads as ONNX Runtime's MultiHeadAttention: (folder, manifest)."""
    from adapedit.export.api import ExportOptions, export_model

    out = tmp_path_factory.mktemp("exports") / "tiny-ort-attention"
    options = ExportOptions(shapes="static", batches=(4,), attention_op="ort")
    return out, export_model(tiny_components, out, options, progress=False)


@pytest.fixture(scope="session")
def tiny_fp16_fused_export(tmp_path_factory):
    """The tiny model exported as the GPU script exports SD 1.4: static, fp16, the fused UNet at
    batches 2 (calibration) and 4 (edit), the attention no edit reads as ONNX Runtime's
    MultiHeadAttention, the variants traced in two processes (``jobs=2``, the model loaded there
    by name). Returns (folder, options)."""
    from adapedit.export.api import ExportOptions, export_model

    out = tmp_path_factory.mktemp("exports") / "tiny-fp16-fused"
    options = ExportOptions(precision="fp16", forms=("fused",), shapes="static", attention_op="ort")
    export_model("tiny", out, options, jobs=2, progress=False)
    return out, options


@pytest.fixture(scope="session")
def tiny_fused_session(tiny_fused_engines):
    from adapedit.runtime.session import EditSession

    return EditSession(tiny_fused_engines)


@pytest.fixture(scope="session")
def photo():
    """``photo(size)``: an image no model made, uint8 [size, size, 3] — a big red disc on the
    left of a light grey background (what "a big red circle on the left" says in the shapes
    world), drawn with Pillow."""
    import numpy as np
    from PIL import Image, ImageDraw

    def draw(size: int) -> np.ndarray:
        img = Image.new("RGB", (4 * size, 4 * size), (232, 232, 228))
        r, cx, cy = 0.8 * size, size, 2 * size  # radius 1/5 of the side, at (1/4, 1/2)
        ImageDraw.Draw(img).ellipse((cx - r, cy - r, cx + r, cy + r), fill=(220, 40, 40))
        return np.asarray(img.resize((size, size), Image.Resampling.BOX))

    return draw


@pytest.fixture(scope="session")
def png():
    """``png(pixels)``: a uint8 image [H, W, 3] as PNG bytes (``adapedit.io.png_bytes``)."""
    from PIL import Image

    from adapedit.io import png_bytes

    return lambda pixels: png_bytes(Image.fromarray(pixels))


@pytest.fixture()
def forbid_model_work(monkeypatch):
    """Any model work from here on raises ``AssertionError`` and is recorded in the list this
    returns: every engine run (``Runner.infer``, the class every runner subclasses, so runners
    that exist now and runners made later, such as a session's VAE encoder on its first image)
    and every PyTorch module call (``torch.nn.Module.__call__``: the reference pipeline's text
    encoder, UNet and VAE). A test of a refusal "before model work" uses it and asserts the
    list is empty at the end (the raise alone may be caught, e.g. by the CLI's exit code 1)."""
    from adapedit.engines.base import Runner

    ran: list[str] = []

    def engine_run(self, *args, **kwargs):
        ran.append(f"engine {self.name}")
        raise AssertionError(f"engine {self.name!r} ran before the input was refused")

    def module_call(self, *args, **kwargs):
        ran.append(f"module {type(self).__name__}")
        raise AssertionError(f"{type(self).__name__} ran before the input was refused")

    classes, todo = [Runner], [Runner]
    while todo:  # a backend that overrides ``infer`` is guarded too
        for sub in todo.pop().__subclasses__():
            classes.append(sub)
            todo.append(sub)
    for cls in classes:
        if "infer" in vars(cls):
            monkeypatch.setattr(cls, "infer", engine_run)
    monkeypatch.setattr(torch.nn.Module, "__call__", module_call)
    return ran
