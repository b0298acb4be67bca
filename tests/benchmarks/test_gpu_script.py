"""The GPU commands' dry run: every step a lent GPU machine runs (install from carried files,
backends, static exports, latency, parity, the peer, the TensorRT step) on the CPU with the tiny
model, so a GPU loan cannot die on what a CPU can catch; and the limits a loan sets: the time of
one command, the files that come back, a run killed part-way."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import onnx
import pytest

from benchmarks import gpu_run

ROOT = Path(__file__).resolve().parents[2]


def test_each_command_fits_one_call_of_the_machine(tmp_path):
    for dry in ("0", "1"):
        env = {"GPU_DRY_RUN": dry, "OUT_DIR": str(tmp_path), "WORK": str(tmp_path / "w")}
        commands = gpu_run.commands(gpu_run.Settings.from_env(env))
        for number, steps in commands.items():
            total = sum(s.limit_s for s in steps)
            assert total <= gpu_run.COMMAND_LIMIT_S <= 600 - 30, (number, total)
            assert steps[0].name == "install"
            assert all(0 < s.min_s <= s.limit_s for s in steps)
            names = [s.name for s in steps]
            kept = {x.name for n, c in commands.items() if n < number for x in c if x.done}
            for s in steps:  # a step needs steps before it, or a result an earlier one keeps
                assert set(s.needs) <= set(names[: names.index(s.name)]) | kept, s.name
    assert len({gpu_run.RESULTS, gpu_run.SUMMARY, gpu_run.LOGS, gpu_run.PLOT}) <= gpu_run.MAX_FILES


def test_a_real_command_needs_its_output_folder():
    with pytest.raises(SystemExit, match="OUT_DIR"):
        gpu_run.Settings.from_env({"GPU_DRY_RUN": "0"})


def test_the_smoke_graph_names_a_provider_that_cannot_run_and_passes_one_that_can(tmp_path):
    """The probe's smoke graph, through the runtime's runner: on this machine the CPU provider
    runs it right, and the CUDA provider is refused by name (as a CUDA provider whose libraries
    do not load would be on the GPU machine) — a record, not a crash of the probe."""
    from adapedit.engines.ort import OrtOptions
    from benchmarks.common import Backend

    cpu = gpu_run.smoke(Backend("ort-cpu", "ort"), tmp_path)
    assert cpu["ok"] and cpu["providers"] == ["CPUExecutionProvider"] and not cpu["cuda_graph"]
    assert cpu["shared_weight"] == "used in place" and cpu["input"] == "in place"
    assert (
        onnx.load(tmp_path / "smoke.onnx").ir_version == 10
    )  # as the exports: ORT 1.31 reads ≤ 13
    cuda = gpu_run.smoke(Backend("ort-cuda", "ort", OrtOptions(providers=("cuda",))), tmp_path)
    assert not cuda["ok"] and cuda["cuda_graph"]
    assert "EngineError" in cuda["error"] and "CUDAExecutionProvider" in cuda["error"]
    out = tmp_path / "out"
    out.mkdir()
    for check in (cpu, cuda):
        gpu_run.emit(out / gpu_run.RESULTS, "smoke", **check)
    gpu_run.write_summary(gpu_run.Settings.from_env({"GPU_DRY_RUN": "1", "OUT_DIR": str(out)}), 1)
    summary = (out / gpu_run.SUMMARY).read_text()
    assert "Smoke graph on ort-cpu (asked ['cpu'], got ['CPUExecutionProvider'], " in summary
    assert "CUDA graph False): ok, shared weight used in place, input read in place." in summary
    assert (
        "Smoke graph on ort-cuda (asked ['cuda'], got None, CUDA graph True): FAILED (" in summary
    )


@pytest.mark.parametrize(
    ("mutation", "state"),
    [("not handed to the session", "not used"), ("copied by the pool", "copied")],
)
def test_the_smoke_graph_names_a_shared_weight_that_is_not_read_in_place(
    tmp_path, monkeypatch, mutation, state
):
    """ONNX Runtime keeps the graph's own copy of a weight whose buffer is not on the device it
    planned, with a warning only: the smoke graph tells that (and a weight copied at session
    creation) from the weight read in place, before the export."""
    from adapedit.engines.weights import WeightPool
    from benchmarks.common import Backend

    if mutation == "not handed to the session":
        monkeypatch.setattr(WeightPool, "initializers", lambda self, graph_file: {})
    else:
        import onnxruntime

        def copies(self, graph_file):  # a copy of each buffer, not the buffer itself
            return {
                name: onnxruntime.OrtValue.from_dlpack(self.buffer(key).clone())
                for name, key in self.graphs[graph_file].items()
            }

        monkeypatch.setattr(WeightPool, "initializers", copies)
    check = gpu_run.smoke(Backend("ort-cpu", "ort"), tmp_path)
    assert not check["ok"] and check["shared_weight"] == state


def test_the_smoke_graph_names_an_input_read_once_at_binding(tmp_path, monkeypatch):
    """ONNX Runtime copies an input bound on a device it does not take as its kernels' when it
    is bound: a runner that binds each fixed buffer once (the fused UNet's inputs) would then
    replay its first values. The smoke graph writes new values at the bound address and names
    it (here the binding is made to copy, as that would)."""
    import ctypes

    import numpy as np
    import onnxruntime

    from benchmarks.common import Backend

    real, kept = onnxruntime.IOBinding.bind_input, []

    def copying(self, name, device_type, device_id, element_type, shape, buffer_ptr):
        if name != "x":
            return real(self, name, device_type, device_id, element_type, shape, buffer_ptr)
        n = int(np.prod(shape))
        now = np.ctypeslib.as_array((ctypes.c_float * n).from_address(buffer_ptr))
        kept.append(now.reshape(shape).copy())  # the values at binding time
        return self.bind_cpu_input(name, kept[-1])

    monkeypatch.setattr(onnxruntime.IOBinding, "bind_input", copying)
    check = gpu_run.smoke(Backend("ort-cpu", "ort"), tmp_path)
    assert kept and not check["ok"]
    assert check["input"] == "stale" and check["shared_weight"] == "used in place"


@pytest.mark.parametrize("value", ["0", "600", "ten", ""])
def test_a_deadline_beyond_one_command_is_refused(value, tmp_path):
    with pytest.raises(SystemExit, match=f"GPU_DEADLINE_S.*from 1 to 540.*got: '{value}'"):
        gpu_run.Settings.from_env({"OUT_DIR": str(tmp_path), "GPU_DEADLINE_S": value})


def test_the_exports_write_attention_as_the_environment_says(tmp_path):
    """Both commands' exports write ONNX Runtime's fused attention unless ``GPU_ATTENTION_OP``
    says ``onnx`` (what to run again with, should the fused operator fail on a card), each into
    a folder of its own: a command run again with the other choice on a warm machine exports
    again rather than keeping (and measuring) the first one's export. Another value is refused
    before any step."""

    def exports(env: dict[str, str]) -> set[tuple[str, str]]:
        s = gpu_run.Settings.from_env({"OUT_DIR": str(tmp_path), **env})
        steps = [x for c in gpu_run.commands(s).values() for x in c if "export" in x.argv]
        assert [x.name for x in steps] == ["export-fused", "export-segmented"]
        return {
            (x.argv[x.argv.index("--attention-op") + 1], Path(x.argv[x.argv.index("--out") + 1]))
            for x in steps
        }

    ort, onnx = exports({}), exports({"GPU_ATTENTION_OP": "onnx"})
    assert {op for op, _ in ort} == {"ort"} and {op for op, _ in onnx} == {"onnx"}
    assert not {folder for _, folder in ort} & {folder for _, folder in onnx}
    with pytest.raises(SystemExit, match=r"GPU_ATTENTION_OP.*onnx ort.*got: 'flash'"):
        gpu_run.Settings.from_env({"OUT_DIR": str(tmp_path), "GPU_ATTENTION_OP": "flash"})


def test_pack_and_unpack_round_trip_and_refuse_a_missing_part(tmp_path):
    src = tmp_path / "wheel"
    (src / "pkg").mkdir(parents=True)
    (src / "pkg" / "__init__.py").write_text("VALUE = 1\n")
    (src / "pkg" / "blob.bin").write_bytes(os.urandom(3 << 20))  # does not compress
    parts = gpu_run.pack(src, tmp_path / "kit", part_kib=1024, level=0)
    assert len(parts) == 4 and all(p.stat().st_size <= 1 << 20 for p in parts)
    site = gpu_run.unpack(tmp_path / "kit")
    assert (site / "pkg" / "blob.bin").read_bytes() == (src / "pkg" / "blob.bin").read_bytes()
    assert gpu_run.unpack(tmp_path / "kit") == site  # unpacked once per archive
    shutil.rmtree(site)
    # cut again for a grown working tree: the same archive in fewer, larger parts
    parts = gpu_run.recut(tmp_path / "kit", part_kib=2048)
    sizes = [p.stat().st_size for p in parts]
    assert len(parts) == 2 and sizes[0] == 2 << 20 and 0 < sizes[1] <= 2 << 20
    assert sorted((tmp_path / "kit").glob("part-*")) == parts
    site = gpu_run.unpack(tmp_path / "kit")
    assert (site / "pkg" / "blob.bin").read_bytes() == (src / "pkg" / "blob.bin").read_bytes()
    shutil.rmtree(site)
    parts[1].unlink()
    for broken in (gpu_run.unpack, lambda kit: gpu_run.recut(kit, 1024)):
        with pytest.raises(SystemExit, match="do not add up"):
            broken(tmp_path / "kit")
    assert not site.exists()


def test_the_latency_steps_log_onnx_runtimes_warnings(tmp_path):
    """What ONNX Runtime does silently at its default level (a shared weight copied rather than
    used in place, Memcpy nodes) reaches the logs a GPU run brings back."""
    s = gpu_run.Settings.from_env({"GPU_DRY_RUN": "1", "OUT_DIR": str(tmp_path)})
    steps = [x for c in gpu_run.commands(s).values() for x in c if "benchmarks.latency" in x.argv]
    assert len(steps) == 3
    for step in steps:
        i = step.argv.index("--ort-log-severity")
        assert step.argv[i + 1] == "2", step.name


def test_the_kit_leaves_out_what_no_step_loads_and_keeps_the_rest(tmp_path):
    """The C API library and the model tools stay behind; the binding, every provider library
    (``libonnxruntime_providers_*`` is not ``libonnxruntime.so*``) and the metadata travel."""
    src = tmp_path / "wheel"
    kept = [
        "onnxruntime/__init__.py",
        "onnxruntime/capi/onnxruntime_pybind11_state.cpython-312-x86_64-linux-gnu.so",
        "onnxruntime/capi/libonnxruntime_providers_cuda.so",
        "onnxruntime/capi/libonnxruntime_providers_shared.so",
        "onnxruntime/capi/libonnxruntime_providers_tensorrt.so",
        "onnxruntime/tools_of_our_own.py",
        "onnxruntime_gpu-1.31.1.dist-info/METADATA",
    ]
    left = [
        "onnxruntime/capi/libonnxruntime.so.1.31.1",
        "onnxruntime/tools/symbolic_shape_infer.py",
        "onnxruntime/transformers/models/gpt2/convert.py",
        "onnxruntime/quantization/quantize.py",
    ]
    for name in kept + left:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(name)
    gpu_run.pack(src, tmp_path / "kit", part_kib=1024, level=0)
    site = gpu_run.unpack(tmp_path / "kit")
    got = {str(p.relative_to(site)) for p in site.rglob("*") if p.is_file()} - {".installed"}
    assert got == set(kept)


@pytest.mark.slow
def test_a_step_that_ends_early_gives_its_time_to_the_next(tmp_path, monkeypatch):
    """A step runs within its own limit and what the steps before it left unused, never past
    the time the plan ends it (the limits so far): the export may use what a quick install
    left, and a step that hangs takes nothing from those after it."""

    def sleeping(seconds: float) -> tuple[str, ...]:
        return (sys.executable, "-c", f"import time; time.sleep({seconds})")

    steps = [
        gpu_run.Step("quick", 8, 1, sleeping(0)),  # leaves about 8 s
        gpu_run.Step("long", 3, 1, sleeping(6)),  # 6 s: its own 3 and what "quick" left
        gpu_run.Step("hung", 2, 1, sleeping(60)),  # ends when the plan ends it, at 13 s
        gpu_run.Step("after", 3, 1, sleeping(0)),
    ]
    monkeypatch.setattr(gpu_run, "commands", lambda s: {1: steps})
    env = {"GPU_DRY_RUN": "1", "OUT_DIR": str(tmp_path / "out"), "WORK": str(tmp_path / "w")}
    handlers = {x: signal.getsignal(x) for x in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    t0 = time.monotonic()
    try:
        assert gpu_run.run_command(1, gpu_run.Settings.from_env(env)) == 1  # "hung" failed
    finally:
        for x, handler in handlers.items():
            signal.signal(x, handler)
    took = time.monotonic() - t0
    done = {x["name"]: x for x in _check_out_folder(tmp_path / "out") if x["kind"] == "step"}
    assert [done[n]["status"] for n in ("quick", "long", "after")] == ["ok"] * 3
    assert done["long"]["granted_s"] > 6 and done["long"]["seconds"] >= 6  # more than its 3 s
    assert done["hung"]["status"].startswith("timeout after ")
    assert 2 <= done["hung"]["granted_s"] <= 13 - 6  # the plan's 13 s, less what ran before
    assert done["after"]["granted_s"] >= 3 and took < 16 + 3  # the plan's 16 s, and packing


@pytest.fixture(scope="module")
def carried(tmp_path_factory):
    """What travels to a GPU machine, made here offline: a wheel in ``whl/`` (a probe package)
    and the onnxruntime installed here as the xz parts the transfer kit makes (``ort/``): the
    machine has a CPU onnxruntime of its own, the carried one must be the one imported."""
    import onnxruntime

    root = tmp_path_factory.mktemp("carried")
    project = root / "probe"
    (project / "adapedit_carried_probe").mkdir(parents=True)
    (project / "adapedit_carried_probe" / "__init__.py").write_text("CARRIED = True\n")
    (project / "pyproject.toml").write_text(
        '[project]\nname = "adapedit-carried-probe"\nversion = "1.0"\n'
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
    )
    pip = [sys.executable, "-m", "pip", "wheel", "-q", "--no-index", "--no-deps"]
    subprocess.run(
        [*pip, "--no-build-isolation", "-w", str(root / "whl"), str(project)],
        check=True,
        env=_offline(os.environ),
    )
    package = Path(onnxruntime.__file__).parent
    wheel = root / "ort-wheel"
    wheel.mkdir()
    shutil.copytree(package, wheel / "onnxruntime")
    gpu_run.pack(wheel, root / "ort", part_kib=16 << 10, level=0)
    return root


def _offline(env) -> dict[str, str]:
    """No network for what runs in it: pip's index off, every proxy a closed local port."""
    dead = "http://127.0.0.1:9"
    return {
        **env,
        "PIP_NO_INDEX": "1",
        "PIP_NO_CACHE_DIR": "1",
        "http_proxy": dead,
        "https_proxy": dead,
        "HTTP_PROXY": dead,
        "HTTPS_PROXY": dead,
        "PYTHONDONTWRITEBYTECODE": "1",
    }


def _dry_env(tmp: Path, carried: Path) -> dict[str, str]:
    return _offline(
        {
            **os.environ,
            "GPU_DRY_RUN": "1",
            "OUT_DIR": str(tmp / "out"),
            "WORK": str(tmp / "work"),
            "ADAPEDIT_SITE": str(tmp / "site"),
            "WHL_DIR": str(carried / "whl"),
            "ORT_DIR": str(tmp / "ort"),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "OMP_NUM_THREADS": "1",
        }
    )


def _command(number: int, env: dict[str, str], **kw):
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_run", str(number)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        **kw,
    )


def _start(number: int, env: dict[str, str], **kw) -> subprocess.Popen:
    """Command ``number`` started in the background (stderr with its stdout)."""
    return subprocess.Popen(
        [sys.executable, "-m", "benchmarks.gpu_run", str(number)],
        cwd=ROOT,
        env=env,
        stderr=subprocess.STDOUT,
        **kw,
    )


def _check_out_folder(out: Path) -> list[dict]:
    """What would come back: at most 8 files, none deeper than two folders; the JSON lines."""
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= gpu_run.MAX_FILES, files
    assert all(len(p.relative_to(out).parts) <= 3 for p in files)
    return gpu_run.read_lines(out / gpu_run.RESULTS)


@pytest.mark.slow
def test_both_commands_run_dry_from_carried_files_and_record_everything(tmp_path, carried):
    shutil.copytree(carried / "ort", tmp_path / "ort")
    env = _dry_env(tmp_path, carried)
    r = _command(1, env)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = _check_out_folder(tmp_path / "out")
    kinds = {x["kind"] for x in lines}
    assert {"command", "step", "backends", "edit", "parity", "unet_call", "memory"} <= kinds
    assert [x["status"] for x in lines if x["kind"] == "step"] == ["ok"] * 5
    # installed from the carried files alone: the carried onnxruntime is the one imported
    (probe,) = [x for x in lines if x["kind"] == "backends"]
    assert probe["onnxruntime_file"].startswith(str(tmp_path / "ort" / "site"))
    (check,) = [x for x in lines if x["kind"] == "smoke"]  # a graph run through that onnxruntime
    assert check["ok"] and check["providers"] == ["CPUExecutionProvider"]
    assert (tmp_path / "site" / "adapedit_carried_probe" / "__init__.py").is_file()
    assert (tmp_path / "site" / "adapedit" / "runtime" / "session.py").is_file()
    edits = {(x["path"], x["steps"]) for x in lines if x["kind"] == "edit"}
    assert {(p, n) for p in ("reference", "ort-cpu-fused") for n in (2, 3)} <= edits
    assert all(x["meets_goal"] for x in lines if x["kind"] == "parity")
    calls = {x["path"] for x in lines if x["kind"] == "unet_call"}
    assert {"torch-reference", "ort-cpu-fused"} <= calls
    assert any(x["kind"] == "syncs" and x["measured"] is False for x in lines)  # CUDA only
    summary = (tmp_path / "out" / gpu_run.SUMMARY).read_text()
    assert "| ort-cpu-fused vs reference | 3 |" in summary and "## Goals" in summary
    assert "Smoke graph on ort-cpu (asked ['cpu'], got ['CPUExecutionProvider']" in summary
    with tarfile.open(tmp_path / "out" / gpu_run.LOGS) as tar:
        names = set(tar.getnames())
    ran = ("install", "onnxruntime-gpu", "backends", "export-fused", "latency")
    assert {f"logs/1-{s}.log" for s in ran} <= names

    (tmp_path / "out").rename(tmp_path / "out-1")  # the machine empties OUT between commands
    r = _command(2, env)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = _check_out_folder(tmp_path / "out")
    steps = {x["name"]: x["status"] for x in lines if x["kind"] == "step"}
    ran = ("install", "onnxruntime-gpu", "presets", "export-segmented", "latency-segmented")
    assert steps == dict.fromkeys((*ran, "peer", "tensorrt"), "ok")
    (fused,) = [x for x in lines if x["kind"] == "presets"]  # the fused export of command 1
    assert fused["path"].endswith(":fused:ort-cpu") and {"paper", "fast"} <= set(fused)
    assert any(x["kind"] == "cached" for x in lines)
    summary = (tmp_path / "out" / gpu_run.SUMMARY).read_text()
    assert "| presets | paper median s |" in summary and "calibration cache — build:" in summary
    assert any(x["kind"] == "edit" and x["path"] == "ort-cpu-segmented" for x in lines)
    # the reference is command 1's; the UNet calls come before the segmented edits' minutes
    assert not any(x["kind"] in ("edit", "unet_call") and "torch" in x["path"] for x in lines)
    assert not any(x["kind"] == "edit" and x["path"] == "reference" for x in lines)
    kinds = [x["kind"] for x in lines if x.get("path", "").startswith("ort-cpu-")]
    assert kinds.index("unet_call") < kinds.index("edit")
    calls = {x["path"] for x in lines if x["kind"] == "unet_call"}
    assert {"ort-cpu-segmented", "ort-cpu-whole"} <= calls  # the whole UNet, with the segments
    # the fused UNet's call (command 1) against the whole UNet's (command 2), same machine
    assert "ort-cpu-fused UNet call" in summary and "measured by command 1" in summary
    assert {"torch-sdpa", "torch-fused"} <= {x["path"] for x in lines if x["kind"] == "peer_call"}
    assert any(x["kind"] == "skipped" and "trt" in x["path"] for x in lines)  # no TensorRT here
    assert not (ROOT / "build").exists()


@pytest.mark.slow
def test_a_run_killed_at_a_random_moment_keeps_what_it_wrote(tmp_path, carried):
    seed = random.randrange(1 << 30)
    k = random.Random(seed).randint(1, 12)  # JSON lines to wait for, then kill
    env = _dry_env(tmp_path, carried)
    results = tmp_path / "out" / gpu_run.RESULTS
    proc = _start(1, env, stdout=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 600
    seen: list[str] = []
    while proc.poll() is None and time.monotonic() < deadline:
        seen = results.read_text().splitlines() if results.is_file() else []
        if len(seen) >= k:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    after = results.read_text().splitlines()
    assert after[: len(seen)] == seen, f"seed {seed}: lines written before the kill changed"
    assert all(json.loads(line) for line in after[: len(seen)])
    lines = _check_out_folder(tmp_path / "out")
    if any(x["kind"] == "step" for x in lines):  # a finished step left its summary and logs
        assert (tmp_path / "out" / gpu_run.SUMMARY).read_text().startswith("# GPU run")
        with tarfile.open(tmp_path / "out" / gpu_run.LOGS) as tar:
            assert tar.getnames()


@pytest.mark.slow
def test_the_install_takes_a_clean_copy_of_the_sources(tmp_path):
    """A module removed from the sources is gone from the install, and nothing is built inside
    the tree (``pip install .`` from the repository wrote build/ and reused a stale build/lib)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("pyproject.toml", "README.md", "adapedit", "export", "engines", "runtime"):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy2
        copy(ROOT / name, repo / name)
    shutil.copytree(ROOT / "benchmarks", repo / "benchmarks")
    (repo / "adapedit" / "stale_probe.py").write_text("HERE = True\n")
    env = _offline(
        {
            **os.environ,
            "ADAPEDIT_SITE": str(tmp_path / "site"),
            "WHL_DIR": str(tmp_path / "none"),
            "ORT_DIR": str(tmp_path / "none"),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        }
    )
    install = ["bash", "benchmarks/gpu/install.sh"]
    imports = [sys.executable, "-c", "import adapedit.stale_probe"]
    site_env = {**env, "PYTHONPATH": str(tmp_path / "site"), "PYTHONSAFEPATH": "1"}
    subprocess.run(install, cwd=repo, env=env, check=True, capture_output=True)
    assert subprocess.run(imports, env=site_env, capture_output=True).returncode == 0
    (repo / "adapedit" / "stale_probe.py").unlink()
    subprocess.run(install, cwd=repo, env=env, check=True, capture_output=True)
    gone = subprocess.run(imports, env=site_env, capture_output=True, text=True)
    assert gone.returncode != 0 and "stale_probe" in gone.stderr
    assert not (repo / "build").exists() and not list(repo.glob("*.egg-info"))


@pytest.mark.slow
def test_a_command_started_late_runs_what_fits_and_ends_before_its_deadline(tmp_path, carried):
    """With 30 s left of the loan (``GPU_DEADLINE_S``) the install may run; the export and the
    latency step, which cannot bring a result in what is left, are skipped and say why, and the
    command ends before its deadline with its summary and logs."""
    shutil.copytree(carried / "ort", tmp_path / "ort")
    env = {**_dry_env(tmp_path, carried), "GPU_DEADLINE_S": "30"}
    t0 = time.monotonic()
    r = _command(1, env)
    took = time.monotonic() - t0
    assert r.returncode == 1, r.stdout + r.stderr
    assert took < 30 + 5, took  # the interpreter's start and the last summary
    lines = _check_out_folder(tmp_path / "out")
    steps = {x["name"]: x["status"] for x in lines if x["kind"] == "step"}
    assert list(steps) == ["install", "onnxruntime-gpu", "backends", "export-fused", "latency"]
    assert (
        steps["export-fused"].startswith("skipped: ")
        and "before the deadline" in (steps["export-fused"])
    )
    assert steps["latency"] == "skipped: needs export-fused"
    assert (tmp_path / "out" / gpu_run.SUMMARY).is_file()
    assert (tmp_path / "out" / gpu_run.LOGS).is_file()


def _processes_naming(text: str) -> list[int]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().decode(errors="replace"):
                found.append(int(cmdline.parent.name))
        except OSError:
            continue
    return found


@pytest.mark.slow
def test_a_command_stopped_mid_step_records_it_and_brings_back_its_log(tmp_path, carried):
    """The device tool stopping a command (SIGTERM) mid-export: the export's processes are
    killed, the step is recorded as killed, and its log so far comes back in the logs."""
    shutil.copytree(carried / "ort", tmp_path / "ort")
    env = _dry_env(tmp_path, carried)
    proc = _start(1, env, stdout=subprocess.PIPE, text=True)
    export_dir = str(tmp_path / "work" / "export-fused-ort")
    deadline = time.monotonic() + 300
    while not _processes_naming(export_dir) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    assert _processes_naming(export_dir), "the export never started"
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    time.sleep(0.5)
    assert not _processes_naming(export_dir), "the stopped step's processes live on"
    lines = _check_out_folder(tmp_path / "out")
    steps = {x["name"]: x["status"] for x in lines if x["kind"] == "step"}
    assert steps["export-fused"] == f"killed by signal {int(signal.SIGTERM)}"
    with tarfile.open(tmp_path / "out" / gpu_run.LOGS) as tar:
        assert "logs/1-export-fused.log" in tar.getnames()
    assert "killed by signal" in (tmp_path / "out" / gpu_run.SUMMARY).read_text()


@pytest.mark.slow
def test_the_install_works_where_pip_cannot(tmp_path, carried):
    """On a bare Python without pip (or without setuptools) the install unzips the wheels and
    copies the sources in the installed layout, says so, and the project imports."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(
        "#!/bin/sh\n"
        'if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then echo "No module named pip" >&2; exit 1; fi\n'
        f'exec {sys.executable} "$@"\n'
    )
    (bin_dir / "python3").chmod(0o755)
    env = _offline(
        {
            **os.environ,
            "ADAPEDIT_SITE": str(tmp_path / "site"),
            "WHL_DIR": str(carried / "whl"),
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        }
    )
    r = subprocess.run(
        ["bash", "benchmarks/gpu/install.sh"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "pip could not install the project" in r.stdout
    assert (tmp_path / "site" / "adapedit_carried_probe" / "__init__.py").is_file()
    code = "import adapedit.runtime.session, adapedit.pipelines.models as m; print(m.SHAPES_DIR)"
    site_env = {**env, "PYTHONPATH": str(tmp_path / "site"), "PYTHONSAFEPATH": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=site_env, capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == str(tmp_path / "site" / "adapedit" / "data" / "shapes")
    assert not (ROOT / "build").exists()
