"""TensorRT plumbing that runs without TensorRT (plan cache, keys, profile shapes, lazy import)
and the real build, marked ``trt``."""

from __future__ import annotations

import importlib.util
import logging
import types
from dataclasses import replace

import pytest
import torch

from adapedit.engines.base import Profile
from adapedit.engines.cache import PlanCache, PlanKey, file_digest
from adapedit.engines.trt import TrtRunner, profile_shapes
from adapedit.errors import EngineError, ManifestError
from adapedit.spec import GraphSpec, TensorSpec

KEY = PlanKey(
    "a" * 64, "10.9.0", "NVIDIA H100 sm90", '{"sample": [[1,4,16,16]]}', '{"workspace_gib": 8}'
)


def test_cache_builds_once_then_loads(tmp_path):
    cache = PlanCache(tmp_path)
    calls = []

    def build():
        calls.append(1)
        return b"PLAN-BYTES"

    path, built = cache.get_or_build(KEY, build)
    assert built and path.read_bytes() == b"PLAN-BYTES"
    path2, built2 = cache.get_or_build(KEY, build)
    assert not built2 and path2 == path and len(calls) == 1
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".plan"]  # no temp files


def test_corrupt_or_stale_plan_is_rebuilt_with_a_message(tmp_path, caplog):
    cache = PlanCache(tmp_path)
    path, _ = cache.get_or_build(KEY, lambda: b"GOOD")
    path.write_bytes(b"GOOX")  # corrupted on disk
    with caplog.at_level(logging.WARNING, logger="adapedit.engines"):
        _, built = cache.get_or_build(KEY, lambda: b"GOOD")
    assert built and "corrupt" in caplog.text and path.read_bytes() == b"GOOD"
    meta = path.with_suffix(".json")
    meta.write_text(meta.read_text().replace("10.9.0", "10.8.0"))  # built by another TRT
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="adapedit.engines"):
        _, built = cache.get_or_build(KEY, lambda: b"GOOD")
    assert built and "stale" in caplog.text
    meta.unlink()
    assert cache.load(KEY) is None


def test_plan_keys_differ_by_every_part():
    variants = [
        KEY,
        replace(KEY, onnx_sha256="b" * 64),
        replace(KEY, backend_version="10.10.0"),
        replace(KEY, gpu="NVIDIA A100 sm80"),
        replace(KEY, profile="{}"),
        replace(KEY, recipe='{"workspace_gib": 4}'),
    ]
    assert len({k.digest for k in variants}) == len(variants)


def test_file_digest_covers_external_data(tmp_path):
    f = tmp_path / "m.onnx"
    f.write_bytes(b"graph")
    d1 = file_digest(f)
    (tmp_path / "m.onnx.data").write_bytes(b"weights")
    assert file_digest(f) != d1


def test_profile_shapes_of_every_segment(tiny_export):
    _, m = tiny_export
    p = Profile(batch=(1, 2, 4), height=(128, 128, 256), width=(128, 192, 256))
    unet_multiple = m.size_multiple // m.vae_scale_factor
    first = profile_shapes(m.unet[0].segments[0], p, m.vae_scale_factor, unet_multiple)
    assert first["sample"] == ((1, 4, 16, 16), (2, 4, 16, 24), (4, 4, 32, 32))
    # the scaled rule controls no full-resolution self-attention: the first boundary is
    # down_blocks.0's cross-attention, probs [B*H, P, 77]
    b = m.boundaries[0]
    assert b.layer == "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    nxt = profile_shapes(m.unet[0].segments[1], p, m.vae_scale_factor, unet_multiple)
    assert nxt[b.probs] == ((2, 256, 77), (4, 384, 77), (8, 1024, 77))
    for seg in m.unet[0].segments:  # every input of every segment evaluates
        shapes = profile_shapes(seg, p, m.vae_scale_factor, unet_multiple)
        assert set(shapes) == {t.name for t in seg.inputs}


@pytest.mark.skipif(
    importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed"
)
def test_without_tensorrt_the_runner_says_so(tiny_export):
    _, m = tiny_export
    with pytest.raises(EngineError, match="TensorRT is not installed"):
        TrtRunner("x.plan", m.graphs["vae_decoder"]).activate()


@pytest.mark.trt
@pytest.mark.gpu
def test_tensorrt_engines_match_onnxruntime(tiny_static_export, tmp_path):
    from adapedit.engines.folder import build_engines
    from adapedit.engines.ort import OrtRunner

    folder, m = tiny_static_export
    # plans in this test's own cache, never the user's ~/.cache
    build_engines(folder, tmp_path / "trt", backend="trt", cache_dir=tmp_path / "plans")
    spec = m.graphs["vae_decoder"]
    z = torch.randn(1, 4, 16, 16)
    with (
        OrtRunner(folder / spec.file, spec) as ort_r,
        TrtRunner(tmp_path / "trt" / "plans" / "vae_decoder.plan", spec) as trt_r,
    ):
        a = ort_r.infer({"latent": z})["image"]
        b = trt_r.infer({"latent": z.cuda()})["image"].cpu()
    assert (a - b).abs().max() < 1e-2


# -- the runner's plain-Python logic, with a fake engine where no GPU and no TensorRT exist ----


class FakeContext:
    """What ``IExecutionContext`` does for the runner: shapes, addresses, enqueues (each
    enqueue copies the bound input to the bound output, as an identity engine would)."""

    def __init__(self, refuse: set[str] = frozenset()) -> None:
        self.shapes: dict[str, tuple] = {}
        self.addresses: dict[str, int] = {}
        self.tensors: dict[int, torch.Tensor] = {}  # address → tensor, to run the "engine"
        self.enqueued = 0
        self.refuse = refuse

    def set_input_shape(self, name, shape):
        if name in self.refuse:
            return False
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        return self.dynamic_output if name == "y" and self.dynamic_output else self.shapes["x"]

    dynamic_output: tuple | None = None  # an output whose size only the run decides

    def set_tensor_address(self, name, address):
        if name in self.refuse or address % 256:
            return False  # TensorRT refuses misaligned addresses
        self.addresses[name] = address
        return True

    def execute_async_v3(self, stream_handle):
        self.enqueued += 1
        self.tensors[self.addresses["y"]].copy_(self.tensors[self.addresses["x"]])
        return True


class FakeGraph:
    """A captured enqueue: replaying it runs what was captured, at the captured addresses."""

    def __init__(self, enqueue, context: FakeContext) -> None:
        self.addresses = dict(context.addresses)
        self.context, self.enqueue, self.replays = context, enqueue, 0

    def replay(self):
        self.replays += 1
        live = dict(self.context.addresses)
        self.context.addresses.update(self.addresses)
        self.enqueue()
        self.context.addresses.update(live)


SPEC = GraphSpec(
    "g.onnx", (TensorSpec("x", "float32", (2, 8)),), (TensorSpec("y", "float32", (2, 8)),)
)


def _runner(monkeypatch, context: FakeContext, *, cuda_graph: bool = False):
    """A TrtRunner on the CPU over ``context``: tensors it allocates are registered with the
    fake engine, and CUDA graph capture makes a :class:`FakeGraph`."""
    from adapedit.engines import trt

    graphs: list[FakeGraph] = []

    def capture(enqueue, stream):
        graphs.append(FakeGraph(enqueue, context))
        return graphs[-1]

    real_empty = trt.aligned_empty

    def registered_empty(shape, dtype, device):
        t = real_empty(shape, dtype, device)
        context.tensors[t.data_ptr()] = t
        return t

    monkeypatch.setattr(trt, "capture_graph", capture)
    monkeypatch.setattr(trt, "aligned_empty", registered_empty)
    r = TrtRunner(
        "g.plan",
        SPEC,
        stream=types.SimpleNamespace(cuda_stream=7),
        cuda_graph=cuda_graph,
        device="cpu",
    )
    r.engine, r.context, r.is_active = object(), context, True
    return r, graphs


def _aligned(x: torch.Tensor, context: FakeContext) -> torch.Tensor:
    from adapedit.engines.trt import aligned_empty

    t = aligned_empty(tuple(x.shape), x.dtype, x.device).copy_(x)
    context.tensors[t.data_ptr()] = t
    return t


def test_aligned_buffers_start_on_256_bytes():
    from adapedit.engines.trt import aligned_empty

    for shape in ((1,), (3, 77), (2, 4, 5)):
        for dtype in (torch.float16, torch.float32, torch.int64):
            t = aligned_empty(shape, dtype, torch.device("cpu"))
            assert t.data_ptr() % 256 == 0 and t.shape == shape and t.is_contiguous()


def test_a_misaligned_input_is_staged_never_bound_as_it_is(monkeypatch):
    context = FakeContext()
    r, _ = _runner(monkeypatch, context)
    flat = torch.randn(2 * 8 + 64)
    # A view starting 4 bytes past a 256-byte boundary, wherever the allocator put `flat`.
    start = (-flat.data_ptr() % 256) // 4 + 1
    x = flat[start : start + 16].view(2, 8)
    assert x.data_ptr() % 256 == 4
    out = r.infer({"x": x})["y"]
    assert context.addresses["x"] % 256 == 0 and context.addresses["x"] != x.data_ptr()
    assert torch.equal(out, x)


def test_what_tensorrt_refuses_is_an_error_naming_the_tensor(monkeypatch):
    r, _ = _runner(monkeypatch, FakeContext(refuse={"x"}))
    with pytest.raises(EngineError, match="'x'") as e:
        r.infer({"x": torch.randn(2, 8)})
    assert "shape" in e.value.what
    with pytest.raises(EngineError, match="wrong shape"):
        r.infer({"x": torch.randn(2, 9)})  # the manifest's shape, checked first


def test_an_output_whose_shape_only_the_run_decides_is_an_error(monkeypatch):
    context = FakeContext()
    context.dynamic_output = (-1, 8)
    r, _ = _runner(monkeypatch, context)
    with pytest.raises(EngineError, match="'y' a shape known only at run time"):
        r.infer({"x": torch.randn(2, 8)})


class FakeEngine:
    """A loaded plan as the runner asks it: its tensors' names, roles, dtypes and locations
    (by default those of ``SPEC``: x in, y out, float32, on the device)."""

    def __init__(self, **tensors: tuple[str, str, str]) -> None:
        self.tensors = {"x": ("INPUT", "FLOAT", "DEVICE"), "y": ("OUTPUT", "FLOAT", "DEVICE")}
        self.tensors = tensors or self.tensors
        self.num_io_tensors = len(self.tensors)

    def get_tensor_name(self, i):
        return list(self.tensors)[i]

    def get_tensor_mode(self, name):
        return self.tensors[name][0]

    def get_tensor_dtype(self, name):
        return self.tensors[name][1]

    def get_tensor_location(self, name):
        return self.tensors[name][2]

    def create_execution_context(self):
        return FakeContext()


def _loading(monkeypatch, tmp_path, engine: FakeEngine, **runner) -> TrtRunner:
    """A runner of ``SPEC`` (on the CPU unless ``runner`` says otherwise) whose plan loads as
    ``engine`` (a fake ``tensorrt`` whose enums are their members' names)."""
    from adapedit.engines import trt

    names = types.SimpleNamespace
    fake = names(
        Logger=type("Logger", (), {"WARNING": 0, "__init__": lambda self, level: None}),
        Runtime=lambda logger: names(deserialize_cuda_engine=lambda b: engine),
        TensorIOMode=names(INPUT="INPUT", OUTPUT="OUTPUT"),
        DataType=names(FLOAT="FLOAT", HALF="HALF", INT64="INT64", INT32="INT32", BOOL="BOOL"),
        TensorLocation=names(DEVICE="DEVICE", HOST="HOST"),
    )
    monkeypatch.setattr(trt, "_trt", lambda: fake)
    (tmp_path / "g.plan").write_bytes(b"plan")
    return TrtRunner(tmp_path / "g.plan", SPEC, **({"device": "cpu"} | runner))


def test_a_plan_of_other_tensors_than_the_graph_is_refused_on_load(monkeypatch, tmp_path):
    """A plan whose tensors are not the manifest's graph's (built from another export): named
    when it is loaded, not as a KeyError or a failed enqueue later."""
    engine = FakeEngine(x=("INPUT", "FLOAT", "DEVICE"), noise_pred=("OUTPUT", "FLOAT", "DEVICE"))
    r = _loading(monkeypatch, tmp_path, engine)
    with pytest.raises(EngineError, match="not the graph's") as e:
        r.activate()
    assert e.value.expected == ["x", "y"] and e.value.got == ["noise_pred", "x"]
    assert not r.is_active and r.engine is None and r.context is None


@pytest.mark.parametrize(
    ("tensor", "got"),
    [
        ("x", ("INPUT", "HALF", "DEVICE")),  # an fp16 plan for an fp32 manifest
        ("y", ("OUTPUT", "FLOAT", "HOST")),  # read from the host: a device pointer is wrong
        ("y", ("INPUT", "FLOAT", "DEVICE")),  # an output the plan takes as an input
    ],
)
def test_a_plan_tensor_of_another_dtype_location_or_role_is_refused_on_load(
    monkeypatch, tmp_path, tensor, got
):
    """Same names, but a tensor TensorRT would read or write otherwise than the runner binds
    it: named on load, never a run over buffers of the wrong size or kind."""
    tensors = {"x": ("INPUT", "FLOAT", "DEVICE"), "y": ("OUTPUT", "FLOAT", "DEVICE")}
    want = tensors[tensor]
    tensors[tensor] = got
    r = _loading(monkeypatch, tmp_path, FakeEngine(**tensors))
    with pytest.raises(EngineError, match=f"tensor '{tensor}' is not the graph's") as e:
        r.activate()
    assert e.value.expected == ", ".join(want) and e.value.got == ", ".join(got)
    assert not r.is_active and r.engine is None


def test_a_plan_as_the_graph_has_it_loads(monkeypatch, tmp_path):
    r = _loading(monkeypatch, tmp_path, FakeEngine())
    r.activate()
    assert r.is_active and isinstance(r.context, FakeContext)


def test_a_plan_loads_and_runs_on_the_runner_s_device_whatever_is_current(monkeypatch, tmp_path):
    """TensorRT binds an engine to the device current when it loads, and runs it there: a
    runner on cuda:1 makes cuda:1 current for both, whatever device its caller has current."""
    from contextlib import contextmanager

    from adapedit.engines import trt

    current: list[torch.device] = []

    @contextmanager
    def device(d):
        current.append(torch.device(d))
        yield
        current.pop()

    seen = {}

    class Engine(FakeEngine):
        def create_execution_context(self):
            seen["load"] = list(current)
            return Context()

    class Context(FakeContext):
        def set_input_shape(self, name, shape):
            return True

        def get_tensor_shape(self, name):
            return (2, 8)

        def set_tensor_address(self, name, address):
            return True

        def execute_async_v3(self, stream_handle):
            seen["run"] = list(current)
            return True

    @contextmanager
    def ordered(stream):
        yield

    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(trt, "ordered_with_caller", ordered)
    monkeypatch.setattr(trt, "aligned_empty", lambda shape, dtype, dev: torch.zeros(shape))
    stream = types.SimpleNamespace(cuda_stream=7)
    r = _loading(monkeypatch, tmp_path, Engine(), device="cuda:1", stream=stream)
    r.activate()
    r._input = lambda name, x: x  # the CPU tensor as it is: no staging copy to cuda:1
    r.infer({"x": torch.zeros(2, 8)})
    assert seen == {"load": [torch.device("cuda:1")], "run": [torch.device("cuda:1")]}


def test_cuda_graph_replays_new_data_at_the_same_address_and_recaptures_elsewhere(monkeypatch):
    context = FakeContext()
    r, graphs = _runner(monkeypatch, context, cuda_graph=True)
    a = _aligned(torch.randn(2, 8), context)
    b = _aligned(torch.randn(2, 8), context)
    r.infer({"x": a})  # warm-up: a plain enqueue
    assert (context.enqueued, len(graphs)) == (1, 0)
    out = r.infer({"x": a})["y"]  # captured, then replayed
    assert len(graphs) == 1 and graphs[0].replays == 1 and torch.equal(out, a)
    a.copy_(torch.randn(2, 8))  # new data, same address: a replay
    assert torch.equal(r.infer({"x": a})["y"], a) and graphs[0].replays == 2 and len(graphs) == 1
    assert torch.equal(r.infer({"x": b})["y"], b) and len(graphs) == 1  # another address: warm-up
    assert torch.equal(r.infer({"x": b})["y"], b) and len(graphs) == 2  # … then its own graph
    assert graphs[1].addresses["x"] == b.data_ptr() != graphs[0].addresses["x"]
    a.copy_(torch.randn(2, 8))
    assert torch.equal(r.infer({"x": a})["y"], a) and graphs[0].replays == 3  # the first again


# -- the build, with a fake ``tensorrt`` module where the real one cannot be installed ----------


class FakeTensorRT(types.ModuleType):
    """The part of TensorRT's builder API ``build_plan`` uses: parsing always succeeds, a plan
    names its graph, and the timing cache grows by one entry per build."""

    __version__ = "10.9.0"

    def __init__(self) -> None:
        super().__init__("tensorrt")
        self.caches_seen: list[bytes] = []  # what each build's timing cache started from
        self.built: list[str] = []
        self.workspaces: list[int] = []  # each build's workspace pool, bytes
        self.refuse_cache = False  # set_timing_cache's answer to a cache of another TensorRT
        self.refuse_profile = False  # add_optimization_profile's -1 for an invalid profile
        fake = self

        class Logger:
            WARNING = 0

            def __init__(self, level):
                pass

        class Network:
            num_inputs = 0

        class Cache:
            def __init__(self, data: bytes) -> None:
                self.data = data

            def serialize(self):
                return self.data

        class Config:
            def set_memory_pool_limit(self, pool, size):
                fake.workspaces.append(size)

            def create_timing_cache(self, data):
                fake.caches_seen.append(bytes(data))
                return Cache(bytes(data))

            def set_timing_cache(self, cache, ignore_mismatch):
                self.cache = cache
                return not fake.refuse_cache

            def get_timing_cache(self):
                return self.cache

            def add_optimization_profile(self, p):
                return -1 if fake.refuse_profile else 0

        class Profile:
            def set_shape(self, *a):
                pass

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                return Network()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                config.cache.data += b"timing;"
                return f"plan of {network.path}".encode()

        class OnnxParser:
            def __init__(self, network, logger):
                self.network = network

            def parse_from_file(self, path):
                self.network.path = path
                fake.built.append(path)
                return True

        self.Logger, self.Builder, self.OnnxParser = Logger, Builder, OnnxParser
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE=0)
        self.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=0)


@pytest.fixture
def fake_tensorrt(monkeypatch):
    import sys

    fake = FakeTensorRT()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    return fake


def test_a_dynamic_export_is_refused_before_any_tensorrt_build(
    tiny_export, tmp_path, fake_tensorrt
):
    from adapedit.engines.folder import build_engines

    with pytest.raises(EngineError, match="static exports only") as e:
        build_engines(tiny_export[0], tmp_path / "eng", backend="trt", cache_dir=tmp_path / "c")
    assert "--shapes static" in str(e.value) and e.value.field == "shapes"
    assert fake_tensorrt.built == [] and not (tmp_path / "eng").exists()


def test_native_tensorrt_refuses_an_export_of_onnx_runtime_operators(
    tiny_ort_attention_export, tmp_path, fake_tensorrt
):
    from adapedit.engines.folder import build_engines

    with pytest.raises(EngineError, match="TensorRT builds standard ONNX operators only") as e:
        build_engines(
            tiny_ort_attention_export[0], tmp_path / "eng", backend="trt", cache_dir=tmp_path
        )
    assert "--attention-op onnx" in str(e.value) and e.value.field == "attention_op"
    assert fake_tensorrt.built == [] and not (tmp_path / "eng").exists()


def test_every_graph_of_a_build_shares_one_timing_cache(
    tiny_static_export, tmp_path, fake_tensorrt
):
    from adapedit.engines.folder import build_engines, session_graphs

    folder, m = tiny_static_export
    build_engines(folder, tmp_path / "eng", backend="trt", cache_dir=tmp_path / "c", progress=False)
    n = len(session_graphs(m).all_graphs())
    assert len(fake_tensorrt.built) == n
    # each build started from what the builds before it had timed
    assert fake_tensorrt.caches_seen == [b"timing;" * i for i in range(n)]
    (cache,) = (tmp_path / "c").glob("timing-*.cache")
    assert cache.read_bytes() == b"timing;" * n


@pytest.mark.parametrize(
    ("refused", "message", "where"),
    [
        ("refuse_cache", "refused the timing cache", "timing-"),
        ("refuse_profile", "refused the optimization profile", ".onnx"),
    ],
)
def test_what_the_tensorrt_builder_refuses_is_an_error_naming_it(
    tiny_static_export, tmp_path, fake_tensorrt, refused, message, where
):
    """A timing cache of another TensorRT or GPU (``set_timing_cache`` False), a profile it
    cannot take (``add_optimization_profile`` -1): named before any plan is written."""
    from adapedit.engines.folder import build_engines

    setattr(fake_tensorrt, refused, True)
    with pytest.raises(EngineError, match=message) as e:
        build_engines(
            tiny_static_export[0], tmp_path / "e", backend="trt", cache_dir=tmp_path / "c"
        )
    assert where in e.value.where and not (tmp_path / "e").exists()


@pytest.mark.parametrize("enqueued", [True, False])
def test_a_failed_capture_says_what_failed(monkeypatch, enqueued):
    """An enqueue TensorRT refuses inside a capture, or a capture CUDA invalidated: torch's
    error at the capture's end would hide the enqueue's; the runner names both, its own way."""
    from adapedit.engines import trt

    class Capture:  # torch.cuda.graph, ending as an invalidated capture does
        def __init__(self, graph, stream=None, capture_error_mode="global"):
            assert capture_error_mode == "thread_local"

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            assert exc == (None, None, None)  # nothing raised inside the capture
            raise RuntimeError("CUDA error: operation failed due to a previous error")

    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: object())
    monkeypatch.setattr(torch.cuda, "graph", Capture)
    with pytest.raises(EngineError, match="could not be captured") as e:
        trt.capture_graph(lambda: enqueued, stream=None)
    assert e.value.got.startswith(f"enqueue returned {enqueued}; CUDA error")


def test_a_built_folder_of_plans_loads(tiny_static_export, tmp_path, fake_tensorrt):
    """A TensorRT engine folder holds plans and no ONNX file: it loads (the manifest's own
    check for its ONNX files refused every one), and a missing plan is still named."""
    from adapedit.engines.folder import build_engines, load_engine_folder

    folder, _ = tiny_static_export
    eng = tmp_path / "eng"
    build_engines(folder, eng, backend="trt", cache_dir=tmp_path / "c", progress=False)
    assert not list(eng.rglob("*.onnx"))
    manifest, config = load_engine_folder(eng)
    assert config.backend == "trt" and set(config.plans) == {g.file for g in manifest.all_graphs()}
    plan = eng / next(iter(config.plans.values()))
    plan.unlink()
    with pytest.raises(ManifestError, match="an engine file is missing"):
        load_engine_folder(eng)


def test_a_plan_is_stale_when_the_shared_weights_change(tiny_static_export, tmp_path):
    import shutil

    from adapedit.engines.trt import plan_key

    folder, m = tiny_static_export
    copy = tmp_path / "export"
    shutil.copytree(folder, copy)
    segment = copy / m.unet[0].segments[1].file
    before = plan_key(segment, {}, "10.9.0", "gpu")
    (weights,) = (copy / "unet").glob("weights-*.bin")
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one weight changed by a re-export; the graph file is the same
    weights.write_bytes(bytes(data))
    assert plan_key(segment, {}, "10.9.0", "gpu") != before


def test_a_plan_built_by_another_recipe_is_rebuilt(tiny_static_export, tmp_path, fake_tensorrt):
    """The plan's key holds how it was built: the same graph, TensorRT, GPU and profile built
    with another workspace is built again (and the builder is given that workspace), never
    loaded from the cache."""
    from adapedit.engines.folder import default_profile
    from adapedit.engines.trt import BuildRecipe, build_cached

    folder, m = tiny_static_export
    spec = m.graphs["vae_decoder"]
    unet_multiple = m.size_multiple // m.vae_scale_factor
    cache = PlanCache(tmp_path / "c")
    args = (folder / spec.file, spec, default_profile(m), m.vae_scale_factor, unet_multiple, cache)
    first = build_cached(*args)
    assert build_cached(*args) == first and len(fake_tensorrt.built) == 1  # cached
    other = build_cached(*args, BuildRecipe(workspace_gib=2.0))
    assert other != first and len(fake_tensorrt.built) == 2
    assert fake_tensorrt.workspaces == [8 << 30, 2 << 30]


def test_a_recipe_without_workspace_is_refused():
    from adapedit.engines.trt import BuildRecipe
    from adapedit.errors import ConfigError

    with pytest.raises(ConfigError, match="workspace must be positive"):
        BuildRecipe(workspace_gib=0)
