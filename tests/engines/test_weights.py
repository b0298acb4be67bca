"""Shared UNet weights: every ONNX Runtime session of a folder reads the one torch-owned buffer
of each stored weight (``WeightPool``), measured by what the sessions read and hold, not by the
pool's own count."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from adapedit.engines.ort import OrtOptions, OrtRunner
from adapedit.engines.weights import WeightPool
from adapedit.spec import GraphSpec, TensorSpec

N = 8 << 20  # one stored weight of 32 MiB (fp32)
STRIDE = 1024  # one element per 4 KiB page: a call reads every page of the weight


@pytest.fixture(scope="module")
def gather_folder(tmp_path_factory):
    """A folder as the exporter writes it for one graph: ``y = W[:, x]`` whose weight W [1, N]
    lives in ``weights-0.bin``, indexed by ``weights.json``."""
    folder = tmp_path_factory.mktemp("shared-weights")
    w = (np.arange(N, dtype=np.float32) % 7) + 1  # [N], no zeros
    (folder / "weights-0.bin").write_bytes(w.tobytes())
    init = numpy_helper.from_array(w.reshape(1, N), "W")
    init.ClearField("raw_data")
    init.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "weights-0.bin"), ("offset", "0"), ("length", str(w.nbytes))):
        entry = init.external_data.add()
        entry.key, entry.value = key, value
    k = N // STRIDE
    graph = helper.make_graph(
        [helper.make_node("Gather", ["W", "x"], ["y"], axis=1)],
        "gather",
        [helper.make_tensor_value_info("x", TensorProto.INT64, [k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, k])],
        [init],
    )
    # IR 10, as torch's exporter writes: onnx 1.23 writes 14 unless told, and onnxruntime 1.31
    # (the GPU machine's, where the gpu test below runs) reads up to 13
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.save(model, folder / "g.onnx")
    entry = {"file": "weights-0.bin", "offset": 0, "length": w.nbytes, "dtype": "float32"}
    index = {"tensors": {"w": {**entry, "shape": [1, N]}}, "graphs": {"g.onnx": {"W": "w"}}}
    (folder / "weights.json").write_text(json.dumps(index))
    spec = GraphSpec(
        "g.onnx", (TensorSpec("x", "int64", (k,)),), (TensorSpec("y", "float32", (1, k)),)
    )
    return folder, spec


def _resident_bytes() -> int:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_the_pool_hands_onnx_runtime_torch_owned_buffers(gather_folder):
    folder, _ = gather_folder
    pool = WeightPool(folder, "weights.json", torch.device("cpu"))
    (value,) = pool.initializers("g.onnx").values()
    buf = pool.buffer("w")
    # no copy between the torch tensor and what ONNX Runtime is given
    assert isinstance(buf, torch.Tensor) and value.data_ptr() == buf.data_ptr()
    assert pool.loaded_bytes == N * 4


def test_sessions_read_the_one_buffer_in_place(gather_folder):
    folder, spec = gather_folder
    pool = WeightPool(folder, "weights.json", torch.device("cpu"))
    x = torch.arange(0, N, STRIDE)
    runners = [OrtRunner(folder / "g.onnx", spec, weights=pool) for _ in range(2)]
    before = [r.infer({"x": x})["y"].clone() for r in runners]
    assert all((b > 0).all() for b in before)
    pool.buffer("w").zero_()  # a session with a copy of its own would not see this
    assert all((r.infer({"x": x})["y"] == 0).all() for r in runners)


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads /proc/self/maps")
def test_the_pool_holds_its_own_copy_and_never_maps_the_file(gather_folder):
    """The pool reads the file into its own buffer: the file is not mapped into the process
    besides (a mapping read in full counts the weights a second time in resident memory)."""
    folder, _ = gather_folder
    pool = WeightPool(folder, "weights.json", torch.device("cpu"))
    buf = pool.buffer("w")
    assert buf[0, :7].tolist() == [1, 2, 3, 4, 5, 6, 7]
    maps = Path("/proc/self/maps").read_text()
    assert str(folder / "weights-0.bin") not in maps


def test_a_weights_file_shorter_than_its_index_is_a_clear_error(gather_folder, tmp_path):
    import shutil

    from adapedit.errors import EngineError

    folder, _ = gather_folder
    for name in ("weights.json", "g.onnx"):
        shutil.copy(folder / name, tmp_path / name)
    (tmp_path / "weights-0.bin").write_bytes((folder / "weights-0.bin").read_bytes()[:1000])
    pool = WeightPool(tmp_path, "weights.json", torch.device("cpu"))
    with pytest.raises(EngineError, match="ends before") as e:
        pool.buffer("w")
    assert e.value.got == "1000 bytes" and "weights-0.bin" in e.value.where


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads /proc/self/statm")
def test_more_sessions_hold_no_more_weight_memory(gather_folder):
    """Four sessions of one graph: after the first, each adds under a tenth of the weight to
    the process; the same sessions without the pool add a whole copy each (the control shows
    the measure sees copies)."""
    folder, spec = gather_folder
    x = torch.arange(0, N, STRIDE)

    def growth(pool: WeightPool | None) -> list[int]:
        runners, sizes = [], []
        for _ in range(4):
            # no arena: memory another test's sessions left in the shared one is not reused here
            options = OrtOptions(cpu_arena="off")
            runners.append(OrtRunner(folder / "g.onnx", spec, options, weights=pool))
            runners[-1].infer({"x": x})  # every page of the weight read
            sizes.append(_resident_bytes())
        for r in runners:
            r.deactivate()
        return [b - a for a, b in itertools.pairwise(sizes)]

    shared = growth(WeightPool(folder, "weights.json", torch.device("cpu")))
    own = growth(None)
    weight = N * 4
    assert all(g < weight / 10 for g in shared), [g / weight for g in shared]
    assert all(g > weight / 2 for g in own), [g / weight for g in own]


def test_the_exports_whole_unet_reads_the_engine_folders_buffers(
    tiny_static_session, tiny_static_export, gather_folder
):
    """The latency benchmark's whole UNet (in the export, not the engine folder) shares the
    session's pool instead of loading a second copy."""
    from adapedit.errors import EngineError

    folder, m = tiny_static_export
    pool = WeightPool(tiny_static_session.folder, m.weights, torch.device("cpu"))
    whole, segments = m.unet_graphs(4).whole, m.unet_graphs(4).segments
    assert pool.initializers(whole.file) == {}  # the engine folder indexes what a session loads
    pool.adopt(folder, m.weights)
    got = {v.data_ptr() for v in pool.initializers(whole.file).values()}
    seen = {v.data_ptr() for s in segments for v in pool.initializers(s.file).values()}
    assert got and got == seen  # the same buffers, one copy
    with pytest.raises(EngineError, match="not this pool's"):
        pool.adopt(gather_folder[0], "weights.json")


@pytest.mark.gpu
def test_on_cuda_the_sessions_read_the_pools_device_buffer(gather_folder):
    """The same ownership path on the GPU: the pool's buffers are torch CUDA tensors that
    ONNX Runtime's CUDA provider accepts as initializers and reads in place."""
    import onnxruntime as ort

    from adapedit.engines.ort import OrtOptions

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-gpu")
    folder, spec = gather_folder
    pool = WeightPool(folder, "weights.json", torch.device("cuda"))
    options = OrtOptions(providers=("cuda",))
    x = torch.arange(0, N, STRIDE, device="cuda")
    runners = [OrtRunner(folder / "g.onnx", spec, options, weights=pool) for _ in range(2)]
    assert all((r.infer({"x": x})["y"] > 0).all() for r in runners)
    assert pool.buffer("w").is_cuda
    pool.buffer("w").zero_()
    assert all((r.infer({"x": x})["y"] == 0).all() for r in runners)


def test_a_buffer_onnx_runtime_owns_is_a_clear_error(gather_folder, monkeypatch):
    """What the CUDA path did before (``ortvalue_from_numpy(array, "cuda")``: ONNX Runtime
    allocates, and ``add_initializer`` refuses): an EngineError naming the graph, not a raw
    RuntimeError from session creation."""
    import onnxruntime as ort

    from adapedit.errors import EngineError

    folder, spec = gather_folder
    pool = WeightPool(folder, "weights.json", torch.device("cpu"))
    owned = ort.OrtValue.ortvalue_from_shape_and_type([1, N], np.float32, "cpu", 0)
    monkeypatch.setattr(pool, "initializers", lambda graph: {"W": owned})
    with pytest.raises(EngineError, match="could not load") as e:
        OrtRunner(folder / "g.onnx", spec, weights=pool).activate()
    assert "g.onnx" in e.value.where and "owned by the user" in e.value.got
