"""ONNX Runtime runner: feed checks against the manifest, providers, buffer reuse, profiles."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from adapedit.engines.base import Profile, eval_dim, solve_symbols
from adapedit.engines.folder import make_runner
from adapedit.engines.ort import OrtOptions, OrtRunner, provider_options
from adapedit.errors import EngineError
from adapedit.spec import GraphSpec, TensorSpec


@pytest.fixture(scope="module")
def text_runner(tiny_export):
    folder, m = tiny_export
    with OrtRunner(folder / m.graphs["text_encoder"].file, m.graphs["text_encoder"]) as r:
        yield r


@pytest.fixture(scope="module")
def decoder_file(tiny_export):
    folder, m = tiny_export
    return folder / m.graphs["vae_decoder"].file, m.graphs["vae_decoder"]


@pytest.fixture(scope="module")
def decoder(tiny_export):
    folder, m = tiny_export
    with OrtRunner(folder / m.graphs["vae_decoder"].file, m.graphs["vae_decoder"]) as r:
        yield r


def test_symbolic_shapes_evaluate():
    assert eval_dim("64*lw*lh", {"lh": 2, "lw": 3}) == 384
    assert eval_dim(77, {}) == 77
    with pytest.raises(EngineError, match="cannot evaluate"):
        eval_dim("2*batch", {})


def test_runner_outputs_match_shapes_and_reuse_buffers(decoder):
    z = torch.randn(1, 4, 16, 24)
    a = decoder.infer({"latent": z})["image"]
    assert a.shape == (1, 3, 128, 192)
    first = a.clone()
    b = decoder.infer({"latent": z})["image"]
    assert b.data_ptr() == a.data_ptr() and torch.equal(b, first)
    syms = solve_symbols(decoder.spec, {"latent": (1, 4, 16, 24)})
    assert syms == {"batch": 1, "lh": 2, "lw": 3}


@pytest.mark.parametrize(
    ("feeds", "message"),
    [
        ({"latent": torch.randn(1, 4, 16, 16, dtype=torch.float64)}, "wrong dtype"),
        ({"latent": torch.randn(1, 4, 16)}, "wrong shape"),
        ({"latent": torch.randn(1, 3, 16, 16)}, "wrong shape"),
        ({"latent": torch.randn(1, 4, 16, 16), "extra": torch.zeros(1)}, "wrong inputs"),
        ({}, "wrong inputs"),
    ],
)
def test_bad_feeds_are_clear_errors(decoder, feeds, message):
    with pytest.raises(EngineError, match=message) as e:
        decoder.infer(feeds)
    assert "vae_decoder" in str(e.value)


def test_text_encoder_takes_token_ids(text_runner, tokenizer):
    ids = tokenizer(
        ["a dog", ""], padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    out = text_runner.infer({"input_ids": ids})["text_embeddings"]
    assert out.shape == (2, 77, 32) and torch.isfinite(out).all()


def test_options_and_providers(tiny_export):
    with pytest.raises(EngineError, match="unknown execution provider"):
        OrtOptions(providers=("rocm",))
    with pytest.raises(EngineError, match="optimisation level"):
        OrtOptions(optimization="max")
    with pytest.raises(EngineError, match="unknown CPU arena"):
        OrtOptions(cpu_arena="pooled")
    with pytest.raises(EngineError, match="unknown log severity"):
        OrtOptions(log_severity=5)
    assert OrtOptions(providers=("cuda", "cpu")).device.type == "cuda"
    folder, m = tiny_export
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        r = OrtRunner(
            folder / m.graphs["vae_decoder"].file,
            m.graphs["vae_decoder"],
            OrtOptions(providers=("cuda",)),
        )
        with pytest.raises(EngineError, match="not available"):
            r.activate()
    missing = OrtRunner(folder / "nope.onnx", m.graphs["vae_decoder"])
    with pytest.raises(EngineError, match="engine file is missing"):
        missing.activate()


def test_integer_tensors_are_bound_in_host_memory(tiny_export):
    # Shapes crossing segment cuts are int64; ONNX Runtime's CUDA Reshape reads them from host
    # memory only (seen on an H100: "Shape must be on CPU").
    folder, m = tiny_export
    spec = m.graphs["vae_decoder"]
    r = OrtRunner(folder / spec.file, spec, OrtOptions(providers=("cuda",)))
    assert r._device("int64").type == "cpu" and r._device("int32").type == "cpu"
    assert r._device("float16").type == "cuda" and r._device("float32").type == "cuda"


def test_profile_checks_and_validates():
    p = Profile(batch=(1, 4, 4), height=(128, 512, 512), width=(128, 512, 512))
    p.check(4, 512, 256, where="x")
    with pytest.raises(EngineError, match="height is outside the built profile"):
        p.check(4, 768, 512, where="x")
    with pytest.raises(EngineError, match="invalid profile"):
        Profile(batch=(4, 1, 8))
    assert p.symbols(2, 8, 8) == {"batch": 4, "lh": 8, "lw": 8}


def test_feeds_are_checked_when_their_shapes_change_not_on_every_call(decoder, monkeypatch):
    checks = []
    original = decoder.check_feeds
    monkeypatch.setattr(
        decoder, "check_feeds", lambda *a, **k: checks.append(1) or original(*a, **k)
    )
    z = torch.randn(1, 4, 16, 16)
    out = decoder.infer({"latent": z})["image"]
    decoder.infer({"latent": torch.randn(1, 4, 16, 16)})
    assert len(checks) == 1  # same shapes: the plan is reused, and so is the output buffer
    assert decoder.infer({"latent": z})["image"].data_ptr() == out.data_ptr()
    decoder.infer({"latent": torch.randn(1, 4, 16, 24)})
    decoder.infer({"latent": z}, check=True)
    assert len(checks) == 3
    with pytest.raises(EngineError, match="wrong dtype"):  # a new dtype is checked again
        decoder.infer({"latent": z.double()})


def test_each_gpu_provider_gets_its_own_option_keys():
    cuda, trt, cpu = "CUDAExecutionProvider", "TensorrtExecutionProvider", "CPUExecutionProvider"
    got = dict(
        (p if isinstance(p, str) else p[0], {} if isinstance(p, str) else p[1])
        for p in provider_options([trt, cuda, cpu], 1, 1234, cuda_graph=True, fp32=True)
    )
    stream = {"device_id": "1", "has_user_compute_stream": "1", "user_compute_stream": "1234"}
    assert got[cuda] == stream | {"enable_cuda_graph": "1", "use_tf32": "0"}  # fp32: exact
    # onnxruntime's Python parser of TensorRT options (onnxruntime_pybind_state.cc) throws on a
    # key it does not know (has_user_compute_stream: the handle sets it) and on a boolean not
    # spelt True/False ("1" included)
    assert got[trt] == {"device_id": "1", "user_compute_stream": "1234"} | {
        "trt_cuda_graph_enable": "True"
    }
    assert got[cpu] == {}
    plain = provider_options([cuda, trt], 0, None, cuda_graph=False, fp32=True)
    assert plain == [
        (cuda, {"device_id": "0", "enable_cuda_graph": "0", "use_tf32": "0"}),
        (trt, {"device_id": "0", "trt_cuda_graph_enable": "False"}),
    ]


@pytest.mark.parametrize(("dtype", "tf32"), [("float32", "0"), ("float16", None)])
def test_tf32_is_turned_off_for_fp32_graphs_only(decoder_file, monkeypatch, dtype, tf32):
    """An fp32 graph's math stays fp32 on CUDA (``use_tf32`` 0); an fp16 graph's is left at
    ONNX Runtime's default, whose cuDNN convolutions without TF32 drop every tensor-core plan,
    fp16 ones included (``conv.cc``: ``deselect_numeric_notes({TENSOR_CORE})``)."""
    file, spec = decoder_file
    spec = GraphSpec(
        spec.file,
        tuple(TensorSpec(t.name, dtype, t.shape) for t in spec.inputs),
        tuple(TensorSpec(t.name, dtype, t.shape) for t in spec.outputs),
    )
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    r = OrtRunner(file, spec, OrtOptions(providers=("cuda",)))
    ((name, options),) = r._providers(["CUDAExecutionProvider"])
    assert name == "CUDAExecutionProvider" and options.get("use_tf32") == tf32


TEXT = GraphSpec(
    "text_encoder.onnx",
    (TensorSpec("input_ids", "int64", (1, 77)),),
    (TensorSpec("last_hidden_state", "float16", (1, 77, 768)),),
)
UNET = GraphSpec(
    "unet/b4_fused.onnx",
    (TensorSpec("sample", "float16", (4, 4, 64, 64)),),
    (TensorSpec("noise_pred", "float16", (4, 4, 64, 64)),),
)


def test_a_cuda_graph_over_inputs_bound_in_host_memory_is_refused():
    """ONNX Runtime copies an int64 input to a new device buffer at every bind, and a captured
    graph replays the address of the first copy: such a runner must never replay a graph."""
    with pytest.raises(EngineError, match=r"host memory.*input_ids"):
        OrtRunner("text_encoder.onnx", TEXT, OrtOptions(providers=("cuda",), cuda_graph=True))
    OrtRunner("text_encoder.onnx", TEXT, OrtOptions(providers=("cuda",)))  # without: fine


def test_a_folder_runner_replays_cuda_graphs_only_where_asked(tmp_path):
    """CUDA graphs are a per-runner choice (the session asks for them on the fused UNet only):
    options saying ``cuda_graph`` never turn them on for the text encoder or the VAE."""
    config = SimpleNamespace(backend="ort", ort=OrtOptions(providers=("cuda",), cuda_graph=True))
    text = make_runner(tmp_path, config, TEXT)  # would be refused with a graph
    assert not text.options.cuda_graph
    assert make_runner(tmp_path, config, UNET, cuda_graph=True).options.cuda_graph
    assert not make_runner(tmp_path, config, UNET).options.cuda_graph
    cpu = SimpleNamespace(backend="ort", ort=OrtOptions())
    assert not make_runner(tmp_path, cpu, UNET, cuda_graph=True).options.cuda_graph


@pytest.mark.filterwarnings("ignore:Specified provider")
def test_a_provider_onnx_runtime_falls_back_from_is_an_error(tiny_export, monkeypatch):
    """ONNX Runtime given a provider it cannot load warns and runs on the CPU; the runner
    compares what the session uses with what was asked and refuses to run elsewhere."""
    import onnxruntime as ort

    folder, m = tiny_export
    spec = m.graphs["vae_decoder"]
    real = ort.get_available_providers()
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", *real])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    r = OrtRunner(folder / spec.file, spec, OrtOptions(providers=("cuda",)))
    with pytest.raises(EngineError, match="did not use the execution providers") as e:
        r.activate()
    assert e.value.expected == ["CUDAExecutionProvider"]
    assert e.value.got == ["CPUExecutionProvider"] and r.session is None


def test_a_session_that_fails_is_an_error_at_once_not_a_retry_elsewhere(
    decoder_file, tmp_path, capfd
):
    """ONNX Runtime's Python wrapper, left to itself, meets a session's creation error (a
    provider option, a CUDA graph over a graph not all on CUDA) by printing it and building the
    session again on the CPU: the runner raises the error itself, nothing rebuilt."""
    _, spec = decoder_file
    broken = tmp_path / spec.file
    broken.write_bytes(b"not an onnx file")
    with pytest.raises(EngineError, match="could not load the graph") as e:
        OrtRunner(broken, spec).activate()
    out = capfd.readouterr().out
    assert "Falling back" not in out and "EP Error" not in out
    assert "Protobuf parsing failed" in e.value.got or "INVALID_PROTOBUF" in e.value.got


def test_an_engine_folder_asked_for_a_missing_provider_is_refused_at_once(
    tiny_engines, monkeypatch, capsys
):
    import onnxruntime as ort

    from adapedit.cli import main
    from adapedit.engines.base import Runner
    from adapedit.runtime.session import EditSession

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    monkeypatch.setattr(Runner, "infer", lambda *a, **k: pytest.fail("an engine ran"))
    with pytest.raises(EngineError, match="not available") as e:
        EditSession(tiny_engines, ort=OrtOptions(providers=("cuda",)))
    assert e.value.expected == ["CUDAExecutionProvider"] and "CPUExecutionProvider" in e.value.got
    args = ["edit", "a dog", "a cat", "--engine-dir", str(tiny_engines), "--providers", "cuda"]
    assert main([*args, "--steps", "2", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "CUDAExecutionProvider" in err and "available" in err


def test_cuda_graphs_follow_the_bound_addresses(decoder_file, monkeypatch):
    """With CUDA graphs a run names its graph (``gpu_graph_id``): the same addresses name the
    same graph (new data there is a replay), other addresses another graph; the outputs stay
    right throughout (on the CPU the id is ignored by ONNX Runtime, the choice is the runner's)."""
    path, spec = decoder_file
    r = OrtRunner(path, spec, OrtOptions(cuda_graph=True))
    reference = OrtRunner(path, spec)
    ids = []
    r.activate()
    run = r.session.run_with_iobinding
    monkeypatch.setattr(
        r.session,
        "run_with_iobinding",
        lambda b, o: ids.append(o.get_run_config_entry("gpu_graph_id")) or run(b, o),
    )
    a, b = torch.randn(1, 4, 16, 16), torch.randn(1, 4, 16, 16)
    for z in (a, a, b):
        r.infer({"latent": z})
    a.copy_(torch.randn(1, 4, 16, 16))  # new data at the first address
    out = r.infer({"latent": a})["image"]
    assert ids == ["0", "0", "1", "0"]
    assert torch.allclose(out, reference.infer({"latent": a})["image"], atol=1e-5)


@pytest.mark.parametrize(
    ("prepacking", "arena"), [(True, "session"), (False, "off"), (False, "shared")]
)
def test_prepacking_and_the_cpu_arena_reach_the_session(decoder_file, prepacking, arena):
    file, spec = decoder_file
    options = OrtOptions(prepacking=prepacking, cpu_arena=arena, optimization="extended")
    with OrtRunner(file, spec, options) as r:
        so = r.session.get_session_options()
        assert so.enable_cpu_mem_arena is (arena != "off")
        if arena == "shared":
            assert so.get_session_config_entry("session.use_env_allocators") == "1"
        assert so.get_session_config_entry("session.disable_prepacking") == (
            "0" if prepacking else "1"
        )
        assert so.graph_optimization_level.name == "ORT_ENABLE_EXTENDED"


@pytest.mark.parametrize("severity", [2, 3])
def test_the_log_severity_reaches_the_session(decoder_file, severity):
    """At 2, ONNX Runtime's warnings (a shared weight copied, not used in place; Memcpy nodes)
    are printed; 3, errors only, is the default."""
    file, spec = decoder_file
    options = OrtOptions(log_severity=severity) if severity != 3 else OrtOptions()
    with OrtRunner(file, spec, options) as r:
        assert r.session.get_session_options().log_severity_level == severity
