"""The prepared commands for a lent GPU machine, and the dry run that checks them on the CPU.

A lent machine is bare, has no network, runs one command for at most 600 s, and gives back only
the files written into one output folder (at most 8, at most two folders deep); the whole loan
is 15 minutes. So each command here is a list of steps, each with its own time limit (the limits
of a command add up to at most :data:`COMMAND_LIMIT_S`, install included), each run in its own
process, and every result is written into ``OUT_DIR`` as soon as it exists:

- ``results.jsonl`` — one JSON object per measurement, appended by the steps as they take it
  (and one per step by this script: its status and time);
- ``summary.md`` — the measurements and the goals, rewritten after every step;
- ``logs.tar.gz`` — every step's log and full records, rewritten after every step;
- ``latency.png`` — the per-stage plot, when the latency step got that far.

A run killed at any moment keeps every line and file written before. Exports are kept in
``WORK`` (default ``.gpu-work``, git-ignored) for the next command while the machine is warm.

    GPU_DEADLINE_S=400 bash benchmarks/gpu.sh 1   # = python3 -m benchmarks.gpu_run 1
    bash benchmarks/gpu.sh 2                      # deadline: 540 s
    GPU_DRY_RUN=1 OUT_DIR=/tmp/o bash benchmarks/gpu.sh 1   # the same steps on the CPU

Command 1 (what matters most, in this order): install, onnxruntime-gpu, backends and card, the
static fp16 export of the fused UNet (batches 2 and 4; the attention no edit reads as ONNX
Runtime's fused MultiHeadAttention, ``--attention-op ort``), then one latency step: the reference
and the fused runtime with CUDA graphs end to end at 20 and 50 steps, parity with the fp16
reference (and, at 20 steps, both against the reference in fp32), one UNet call, controller time,
GPU memory, host syncs per step. Command 2: the segmented form with the whole UNet (its UNet calls
first — the whole UNet's, replayed, is what the summary sets command 1's fused call against —, its
edits against command 1's reference), the presets on command 1's export, the ``torch.compile``
peer, ONNX Runtime's TensorRT provider and native TensorRT when importable (both refuse
these exports: TensorRT's parser does not know ONNX Runtime's attention).
``GPU_DEADLINE_S`` (at most 540) is what is left of the loan: each step runs within it, and a
step that cannot fit is skipped and named.

Other verbs: ``probe`` (backends and card, run as a step), ``pack`` (the transfer kit: a package
directory as xz parts), ``recut`` (a kit cut again for a grown working tree) and ``unpack``
(their reassembly on the machine). The script imports only the standard library,
``adapedit.io`` and ``adapedit.spec`` (no torch), so it runs before the install.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from adapedit.io import atomic_write_bytes
from adapedit.spec import ATTENTION_OPS

ROOT = Path(__file__).resolve().parents[1]
#: What one command may take on the lent machine (of the 600 s a command may run).
COMMAND_LIMIT_S = 540
#: What a command may leave in ``OUT_DIR`` (the device tool brings back at most 8 files).
MAX_FILES = 8
RESULTS, SUMMARY, LOGS, PLOT = "results.jsonl", "summary.md", "logs.tar.gz", "latency.png"


@dataclass(frozen=True)
class Settings:
    """Where things are and what is measured, from the environment (``GPU_DRY_RUN=1``: the
    tiny model at 128 px in fp32 on the CPU, one timed run of each)."""

    dry: bool
    out: Path
    work: Path
    site: Path
    whl: Path
    ortgpu: Path
    model: str = "sd14-random"
    size: int = 512
    precision: str = "fp16"
    device: str = "cuda"
    backends: tuple[str, ...] = ("ort-cuda",)
    steps: tuple[int, ...] = (20, 50)
    warmup: int = 1
    repeats: int = 3
    jobs: int = 3
    #: How both exports write the attention no edit reads (``GPU_ATTENTION_OP``): ``ort``, ONNX
    #: Runtime's fused MultiHeadAttention, or ``onnx``, standard operators — what to run again
    #: with should the fused operator fail on the card.
    attention_op: str = "ort"
    #: The seconds this command may take from its start (``GPU_DEADLINE_S``; at most
    #: :data:`COMMAND_LIMIT_S`): set it to what is left of the loan, so that a command started
    #: late runs what fits, in order, and skips the rest, rather than being cut mid-step.
    deadline_s: int = 540

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        dry = env.get("GPU_DRY_RUN") == "1"
        deadline = _deadline(env.get("GPU_DEADLINE_S"))
        attention_op = env.get("GPU_ATTENTION_OP", "ort")
        if attention_op not in ATTENTION_OPS:
            raise SystemExit(
                f"GPU_ATTENTION_OP is not a way to write attention | where: the environment | "
                f"expected: one of {' '.join(ATTENTION_OPS)} | got: {attention_op!r}"
            )
        out = env.get("OUT_DIR") or env.get("OUT")
        if not out:
            if not dry:
                raise SystemExit("OUT_DIR (or the device tool's OUT) must name the output folder")
            out = tempfile.mkdtemp(prefix="adapedit-gpu-dry-")
        paths = {
            "out": Path(out),
            "work": Path(env.get("WORK", ROOT / ".gpu-work")),
            "site": Path(env.get("ADAPEDIT_SITE", "/tmp/adapedit-site")),
            "whl": Path(env.get("WHL_DIR", ROOT / ".whl")),
            "ortgpu": Path(env.get("ORT_DIR", ROOT / ".ortgpu")),
        }
        if dry:
            steps = tuple(int(s) for s in env.get("STEPS", "2 3").split())
            return cls(
                True,
                **paths,
                model="tiny",
                size=128,
                precision="fp32",
                device="cpu",
                backends=("ort-cpu",),
                steps=steps,
                warmup=0,
                repeats=1,
                jobs=1,
                attention_op=attention_op,
                deadline_s=deadline,
            )
        return cls(False, **paths, attention_op=attention_op, deadline_s=deadline)

    @property
    def exports(self) -> dict[str, Path]:
        """The exports' folders, named by their attention too: a command run again with another
        ``GPU_ATTENTION_OP`` exports again rather than keeping the other one's."""
        op = self.attention_op
        return {f: self.work / f"export-{f}-{op}" for f in ("fused", "segmented")}


def _deadline(value: str | None) -> int:
    if value is None:
        return COMMAND_LIMIT_S
    try:
        deadline = int(value)
    except ValueError:
        deadline = -1
    if not 1 <= deadline <= COMMAND_LIMIT_S:
        raise SystemExit(
            f"GPU_DEADLINE_S is not a number of seconds a command may take | where: the "
            f"environment | expected: an integer from 1 to {COMMAND_LIMIT_S} | got: {value!r}"
        )
    return deadline


#: The latency steps print ONNX Runtime's warnings into their logs: what it does silently
#: otherwise (a shared weight copied rather than used in place, Memcpy nodes, nodes left to
#: the CPU) is what a first GPU run must show.
ORT_WARNINGS = ("--ort-log-severity", "2")


@dataclass(frozen=True)
class Step:
    """One step of a command: a child process with a time limit; ``min_s``: the least time in
    which it can still bring back a result (with less left before the deadline it is skipped);
    ``needs``: the steps whose success it needs; ``done``: a path whose presence means its
    result is already there (an export kept from the command before)."""

    name: str
    limit_s: int
    min_s: int
    argv: tuple[str, ...]
    needs: tuple[str, ...] = ()
    done: Path | None = None
    env: dict[str, str] = field(default_factory=dict)


def commands(s: Settings) -> dict[int, list[Step]]:
    """The steps of command 1 and command 2."""
    py = sys.executable
    jsonl = str(s.out / RESULTS)
    common = [
        "--device",
        s.device,
        "--precision",
        s.precision,
        "--warmup",
        str(s.warmup),
        "--repeats",
        str(s.repeats),
        "--jsonl",
        jsonl,
    ]

    def export(form: tuple[str, ...], folder: Path, limit: int, min_s: int) -> Step:
        argv = (
            py,
            "-m",
            "adapedit.cli",
            "export",
            "--model",
            s.model,
            "--out",
            str(folder),
            "--precision",
            s.precision,
            "--shapes",
            "static",
            "--batches",
            "2",
            "4",
            "--height",
            str(s.size),
            "--width",
            str(s.size),
            "--form",
            *form,
            # by default the attention no edit reads as ONNX Runtime's fused MultiHeadAttention
            # (flash attention on the GPU); native TensorRT, which cannot build it, is not on
            # the lent machines
            "--attention-op",
            s.attention_op,
            "--jobs",
            str(s.jobs),
            "--quiet",
        )
        return Step(
            f"export-{form[0]}",
            limit,
            min_s,
            argv,
            ("install",),
            done=folder / "manifest.json",
        )

    install = Step(
        "install",
        60,
        20,
        ("bash", str(ROOT / "benchmarks" / "gpu" / "install.sh")),
        env={"WHL_DIR": str(s.whl), "ADAPEDIT_SITE": str(s.site)},
    )
    # nothing needs it: without it the latency step measures the PyTorch reference alone, and
    # the backends step records which providers there are
    ort_gpu = Step(
        "onnxruntime-gpu",
        30,
        10,
        (py, "-m", "benchmarks.gpu_run", "unpack", str(s.ortgpu)),
    )
    fused, segmented = s.exports["fused"], s.exports["segmented"]
    latency = (py, "-m", "benchmarks.latency", *common, *ORT_WARNINGS)
    one = [
        install,
        ort_gpu,
        Step(
            "backends",
            20,
            5,
            (py, "-m", "benchmarks.gpu_run", "probe", "--jsonl", jsonl),
            ("install",),
        ),
        # the fused form alone: with the whole UNet beside it each batch is traced twice
        # (the whole UNet comes with the segmented form in command 2, at no extra trace)
        export(("fused",), fused, 200, 100),
        Step(
            "latency",
            230,
            90,
            (
                *latency,
                "--export-dir",
                str(fused),
                "--forms",
                "fused",
                "--syncs",
                "--steps",
                *map(str, s.steps),
                "--backends",
                *s.backends,
                "--results",
                str(s.work / "records"),
                "--tag",
                "latency",
                "--plot-to",
                str(s.out / PLOT),
            ),
            ("export-fused",),
        ),
    ]
    # in the order of what matters: the whole UNet and the segmented form (one trace; the UNet
    # calls first, the reference left to command 1), the presets on command 1's fused export,
    # the peer, TensorRT where importable
    two = [
        install,
        ort_gpu,
        export(("segmented", "whole"), segmented, 160, 100),
        Step(
            "latency-segmented",
            110,
            60,
            (
                *latency,
                "--no-reference",  # command 1 measured it
                "--export-dir",
                str(segmented),
                "--forms",
                "segmented",
                "--steps",
                str(max(s.steps)),
                "--backends",
                *s.backends,
                "--results",
                str(s.work / "records"),
                "--tag",
                "latency-segmented",
            ),
            ("export-segmented",),
        ),
        Step(
            "presets",
            50,
            30,
            (
                py,
                "-m",
                "benchmarks.presets",
                "--paths",
                f"build:{fused}:fused:{s.backends[0]}",
                "--repeats",
                str(s.repeats),
                "--cached",
                "--jsonl",
                jsonl,
                "--out",
                str(s.work / "records"),
            ),
            ("install", "export-fused"),
        ),
        Step(
            "peer",
            100,
            60,
            (
                py,
                "-m",
                "benchmarks.peer",
                "--model",
                s.model,
                "--height",
                str(s.size),
                "--precision",
                s.precision,
                "--warmup",
                str(s.warmup),
                "--repeats",
                str(3 * s.repeats),
                *(() if s.dry else ("--compile",)),
                "--jsonl",
                jsonl,
                "--results",
                str(s.work / "records"),
                "--tag",
                "peer",
            ),
            ("install",),
        ),
        Step(
            "tensorrt",
            30,
            10,
            (
                *latency,
                "--no-reference",
                "--export-dir",
                str(fused),
                "--forms",
                "fused",
                "--steps",
                str(max(s.steps)),
                "--backends",
                "ort-trt",
                "trt",
                "--only-if-available",
                "--results",
                str(s.work / "records"),
                "--tag",
                "latency-tensorrt",
            ),
            ("install", "export-fused"),
        ),
    ]
    return {1: one, 2: two}


def emit(file: Path, kind: str, /, **data) -> None:
    """One JSON line ``{"kind": kind, "t": …, **data}`` appended to ``file``, flushed and synced
    (``data`` may have any keys, ``path`` among them: the measured path)."""
    with open(file, "a") as f:
        f.write(json.dumps({"kind": kind, "t": time.time(), **data}) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_lines(path: Path) -> list[dict]:
    """The whole JSON lines of ``path`` (a line cut by a kill is skipped)."""
    out = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def pack_logs(s: Settings) -> None:
    """Every log and record of the work folder in ``OUT_DIR/logs.tar.gz`` (atomically)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for folder in (s.work / "logs", s.work / "records"):
            if folder.is_dir():
                for p in sorted(folder.rglob("*")):
                    if p.is_file():
                        tar.add(p, arcname=str(p.relative_to(s.work)))
    atomic_write_bytes(s.out / LOGS, buf.getvalue())


def _env(s: Settings, step: Step) -> dict[str, str]:
    """A step's environment: the installed project first (the repository's own ``adapedit/``
    lacks the subpackages the install maps into it), the carried onnxruntime before any other,
    the repository last (for ``benchmarks``)."""
    paths = [str(s.ortgpu / "site"), str(s.site), str(ROOT)]
    extra = os.environ.get("PYTHONPATH")
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(paths + ([extra] if extra else [])),
        "PYTHONSAFEPATH": "1",
        "PYTHONUNBUFFERED": "1",
        **step.env,
    }


def run_command(number: int, s: Settings) -> int:
    """Run command ``number``: its steps in order, each within what is left of the deadline (a
    step with less than its ``min_s`` left is skipped) and within at least its own limit, more
    when the steps before it left time unused: up to when the plan ends it (the sum of the
    limits so far, from the command's start). A step that finishes early gives its time to the
    next; one that hangs takes none from those after it but the seconds of its bookkeeping.
    Returns 0 if every step succeeded (or its result was already there), 1 otherwise. A SIGTERM
    or SIGINT (the device tool stopping the command) kills the running step, records it and
    packs its log."""
    start = time.monotonic()
    every = commands(s)
    steps = every[number]
    others = {x.name: x for n, c in every.items() if n != number for x in c}
    s.out.mkdir(parents=True, exist_ok=True)
    (s.work / "logs").mkdir(parents=True, exist_ok=True)
    results = s.out / RESULTS
    emit(
        results,
        "command",
        number=number,
        dry=s.dry,
        model=s.model,
        size=s.size,
        precision=s.precision,
        attention_op=s.attention_op,
        steps=list(s.steps),
        limits={x.name: x.limit_s for x in steps},
        deadline_s=s.deadline_s,
    )
    status: dict[str, str] = {}

    def met(need: str) -> bool:
        if need in status:
            return status[need] in ("ok", "kept")
        done = others[need].done if need in others else None
        return done is not None and done.exists()  # kept from the other command

    def finish(step: Step, state: str, t0: float, granted: int | None = None) -> None:
        status[step.name] = state
        emit(
            results,
            "step",
            command=number,
            name=step.name,
            status=state,
            seconds=round(time.monotonic() - t0, 2),
            limit_s=step.limit_s,
            granted_s=granted,  # its limit with what the steps before it left (None: not run)
        )
        print(f"   {step.name}: {state}", flush=True)
        shutil.copy(results, s.work / f"results-{number}.jsonl")  # for the next command's summary
        write_summary(s, number)
        pack_logs(s)

    current: list[tuple[Step, float, int]] = []  # the step running, its start and its limit
    running: list[subprocess.Popen] = []  # its process

    def stopped(signum: int, _frame) -> None:
        _kill(running)
        if current:
            step, t0, granted = current[0]
            finish(step, f"killed by signal {signum}", t0, granted)
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, stopped)
    planned_end = 0  # s from the command's start: when the plan ends the step
    for step in steps:
        planned_end += step.limit_s
        missing = [n for n in step.needs if not met(n)]
        t0, granted = time.monotonic(), None
        left = int(s.deadline_s - (t0 - start) - PACK_RESERVE_S)
        if missing:
            state = f"skipped: needs {', '.join(missing)}"
        elif step.done is not None and step.done.exists():
            state = "kept"
        elif left < step.min_s:
            state = f"skipped: {max(left, 0)} s left before the deadline, needs {step.min_s}"
        else:
            granted = min(max(step.limit_s, int(planned_end - (t0 - start))), left)
            print(f"== {step.name} (limit {granted} s, its own {step.limit_s} s)", flush=True)
            current[:] = [(step, t0, granted)]
            state = _run_step(s, number, step, granted, running)
            current.clear()
        finish(step, state, t0, granted)
    return 0 if all(v in ("ok", "kept") for v in status.values()) else 1


#: What a command keeps of its deadline for its last summary and logs.
PACK_RESERVE_S = 5
#: How often the logs are packed while a step runs, so a command stopped mid-step still
#: brings back that step's log so far.
PACK_EVERY_S = 15


def _kill(running: list[subprocess.Popen]) -> None:
    for proc in running:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _run_step(
    s: Settings, number: int, step: Step, limit_s: int, running: list[subprocess.Popen]
) -> str:
    """Run ``step`` within ``limit_s``, its process in ``running`` while it runs (for a signal
    handler to kill); packs the logs every :data:`PACK_EVERY_S` meanwhile."""
    log = s.work / "logs" / f"{number}-{step.name}.log"
    end = time.monotonic() + limit_s
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            step.argv,
            cwd=ROOT,
            env=_env(s, step),
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        running[:] = [proc]
        rc = None
        while rc is None and time.monotonic() < end:
            try:
                rc = proc.wait(timeout=min(PACK_EVERY_S, max(end - time.monotonic(), 0.01)))
            except subprocess.TimeoutExpired:
                f.flush()
                pack_logs(s)
        _kill(running)
        running.clear()
    if rc is None:
        return f"timeout after {limit_s} s"
    if rc != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        print("\n".join(f"   | {t}" for t in tail), flush=True)
        return f"failed (exit {rc})"
    return "ok"


# -- the summary ------------------------------------------------------------------------------


def _median(x: dict) -> str:
    return f"{x['median']:.3f} ({x['p90']:.3f})" if x else "–"


def write_summary(s: Settings, number: int) -> None:
    """``summary.md`` from ``results.jsonl``: steps, machine, end to end, parity, UNet calls,
    memory, syncs, peer and the goals (atomically). Command 2's goals also read command 1's
    UNet calls, kept in the work folder on the same machine (the fused UNet is measured in
    command 1, the whole UNet in command 2)."""
    lines = read_lines(s.out / RESULTS)
    earlier = [
        x
        for n in range(1, number)
        for x in read_lines(s.work / f"results-{n}.jsonl")
        if x["kind"] in ("unet_call", "edit")
    ]
    by: dict[str, list[dict]] = {}
    for x in lines:
        by.setdefault(x["kind"], []).append(x)
    md = [f"# GPU run{' (dry run on the CPU)' if s.dry else ''}", ""]
    for c in by.get("command", []):
        md.append(
            f"Command {c['number']}: {c['model']} at {c['size']}², {c['precision']}, "
            f"attention {c.get('attention_op', 'onnx')}, "
            f"steps {c['steps']}; step limits {c['limits']} (sum {sum(c['limits'].values())} s)."
        )
    for b in by.get("backends", [])[-1:]:
        md += ["", f"Machine: {b['card']}; {b['versions']}; providers {b['providers']}."]
    for k in by.get("smoke", []):
        seen = f"shared weight {k.get('shared_weight')}, input read {k.get('input')}"
        verdict = f"ok, {seen}" if k["ok"] else f"FAILED ({k.get('error') or seen})"
        md.append(
            f"Smoke graph on {k['backend']} (asked {k['asked']}, got {k.get('providers')}, "
            f"CUDA graph {k['cuda_graph']}): {verdict}."
        )
    md += ["", "| step | status | s | limit: its own, granted |", "|---|---|---|---|"]
    md += [
        f"| {x['command']}: {x['name']} | {x['status']} | {x['seconds']:.0f} | "
        f"{x['limit_s']}, {x.get('granted_s') or '–'} |"
        for x in by.get("step", [])
    ]
    if by.get("edit"):
        md += [
            "",
            "| end to end | steps | total median (p90) s | calibration | edit | "
            "controller / call |",
            "|---|---|---|---|---|---|",
        ]
        for e in by["edit"]:
            st = e["stages_s"]
            md.append(
                f"| {e['path']} | {e['steps']} | {_median(st['total'])} | "
                f"{st['calibration']['median']:.3f} | {st['edit']['median']:.3f} | "
                f"{_median(st.get('controller_per_call', {}))} |"
            )
    if by.get("parity"):
        md += [
            "",
            "| parity | steps | latents max abs | relative | τ max abs | goal met |",
            "|---|---|---|---|---|---|",
        ]
        md += [
            f"| {p['path']} vs {p['against']} | {p['steps']} | {p['latents_max_abs']:.2e} | "
            f"{p.get('latents_max_rel', float('nan')):.1e} | "
            f"{max(p['tau_max_abs'], p['tau_self_abs']):.1e} | "
            + (str(p["meets_goal"]) if p["against"] == "reference" else "(fp16's own noise)")
            + " |"
            for p in by["parity"]
        ]
    calls = [(c["path"], c) for c in by.get("unet_call", [])]
    calls += [(f"peer: {c['path']}", c) for c in by.get("peer_call", [])]
    if calls:
        md += ["", "| one UNet call (batch 4) | median (p90) s |", "|---|---|"]
        md += [f"| {name} | {_median(c['seconds'])} |" for name, c in calls]
    if by.get("presets"):
        md += [
            "",
            "| presets | paper median s | fast median s | paper / fast |",
            "|---|---|---|---|",
        ]
        for x in by["presets"]:
            paper, fast = x["paper"]["median"], x["fast"]["median"]
            md.append(f"| {x['path']} | {paper:.3f} | {fast:.3f} | {paper / fast:.2f} |")
    for x in by.get("cached", []):
        first, cached = x["first"]["median"], x["cached"]["median"]
        md.append(
            f"\ncalibration cache — {x['path']}: first edit {first:.3f} s, cached re-edit "
            f"{cached:.3f} s ({cached / first:.2f}×)"
        )
    for kind in ("memory", "weights", "syncs", "skipped", "failed"):
        for x in by.get(kind, []):
            rest = {k: v for k, v in x.items() if k not in ("kind", "t", "path")}
            md.append(f"\n{kind} — {x.get('path', '')}: `{json.dumps(rest)}`")
    md += ["", "## Goals", ""] + [f"- {g}" for g in goals(lines, earlier)]
    atomic_write_bytes(s.out / SUMMARY, ("\n".join(md) + "\n").encode())


def goals(lines: list[dict], earlier: list[dict] = ()) -> list[str]:
    """The GPU issue's goals against what was measured (those not measured say so);
    ``earlier``: UNet calls and edits an earlier command measured on the same machine (the
    reference, the fused call)."""

    def totals(xs) -> dict[tuple[str, int], float]:
        return {
            (x["path"], x["steps"]): x["stages_s"]["total"]["median"]
            for x in xs
            if x["kind"] == "edit"
        }

    edits, edits_before = totals(lines), totals(earlier)
    calls = {x["path"]: x["seconds"]["median"] for x in lines if x["kind"] == "unet_call"}
    before = {x["path"]: x["seconds"]["median"] for x in earlier if x["kind"] == "unet_call"}
    out = []
    for (path, n), total in sorted(edits.items()):
        if path == "reference" or (n != 50 and not path.endswith("fused")):
            continue
        ref, by = edits.get(("reference", n)), ""
        if ref is None and ("reference", n) in edits_before:  # command 2: command 1's reference
            ref, by = edits_before["reference", n], " measured by command 1"
        speed = f"{ref / total:.2f}× the reference{by} (goal ≥ 3.5×)" if ref else "no reference"
        budget = f"; {total:.3f} s (goal ≤ 1.0 s on an H100)" if n == 50 else ""
        out.append(f"{path} at {n} steps: {speed}{budget}")
    for path, t in {**before, **calls}.items():
        plain = path.removesuffix("-nograph")
        backend, _, form = plain.rpartition("-")
        if form != "fused":
            continue
        # against the whole UNet run as the call was, with CUDA graphs or without
        suffix = path.removeprefix(plain)
        other = "-nograph" if not suffix else ""
        whole, unlike = calls.get(f"{backend}-whole{suffix}"), None
        if whole is None and f"{backend}-whole{other}" in calls:
            whole = calls[f"{backend}-whole{other}"]
            unlike = " (not alike: the whole UNet ran " + (
                "without CUDA graphs)" if other else "with CUDA graphs)"
            )
        if whole:
            where = "" if path in calls else " (measured by command 1, the whole UNet by this one)"
            out.append(
                f"{path} UNet call {t / whole:.2f}× the whole UNet's (goal ≤ 1.1×)"
                f"{unlike or ''}{where}"
            )
    for x in lines:
        if x["kind"] == "syncs" and x.get("passes"):
            per = max(p["per_step"] for p in x["passes"].values())
            waits = host_waits(x)
            out.append(
                f"{x['path']}: {per:.1f} host syncs per step (goal 0)" + (waits and f"; {waits}")
            )
        if x["kind"] == "parity" and x["against"] != "reference":  # the fp32 reference
            out.append(
                f"{x['path']} against the fp32 reference at {x['steps']} steps: latents "
                f"{x['latents_max_abs']:.1e}, relative {x['latents_max_rel']:.1e} (context, "
                "not a goal: how far fp16 itself is from fp32)"
            )
        elif x["kind"] == "parity":
            out.append(
                f"{x['path']} parity at {x['steps']} steps: latents {x['latents_max_abs']:.1e} "
                f"(≤ 5e-3), τ {max(x['tau_max_abs'], x['tau_self_abs']):.1e} (≤ 1e-3): "
                + ("met" if x["meets_goal"] else "NOT met")
            )
    return out or ["nothing measured yet"]


#: A UNet call whose host time is at least this part of its GPU time waited for the GPU.
WAITS_AT = 0.5


def host_waits(syncs: dict) -> str:
    """What a ``syncs`` record says of the waits torch does not count: a UNet call's host time
    against its GPU time after the first step ('' where not measured)."""
    c = syncs.get("unet_calls_after_the_first_step") or {}
    if c.get("host_over_gpu") is None:
        return ""
    verdict = (
        "the host waits for the GPU inside the call (a sync torch does not count)"
        if c["host_over_gpu"] >= WAITS_AT
        else "no wait inside the call"
    )
    return (
        f"a UNet call after the first step takes {c['host_ms']:.2f} ms on the host against "
        f"{c['gpu_ms']:.2f} ms on the GPU ({c['host_over_gpu']:.2f}×): {verdict}"
    )


# -- verbs that run on the machine ------------------------------------------------------------


def probe(jsonl: Path) -> None:
    """Backends and card: versions, the GPU, the execution providers (a JSON line)."""
    import importlib.util

    import onnxruntime
    import torch

    from benchmarks.common import available_backends

    card = "no GPU"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        card = f"{p.name}, sm{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB"
    smi = shutil.which("nvidia-smi")
    driver = (
        subprocess.run(
            [smi, "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        if smi
        else None
    )
    trt = importlib.util.find_spec("tensorrt") is not None
    record = {
        "card": card,
        "gpu": torch.cuda.is_available(),
        "driver": driver,
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "onnxruntime": onnxruntime.__version__,
            "tensorrt": __import__("tensorrt").__version__ if trt else None,
        },
        "onnxruntime_file": onnxruntime.__file__,
        "providers": onnxruntime.get_available_providers(),
        "backends": [b.name for b in available_backends()],
    }
    print(json.dumps(record, indent=1))
    emit(jsonl, "backends", **record)
    for backend in available_backends():
        if backend.build == "ort" and (backend.ort.device.type == "cuda" or not record["gpu"]):
            with tempfile.TemporaryDirectory() as folder:
                check = smoke(backend, Path(folder))
            print(json.dumps(check))
            emit(jsonl, "smoke", **check)


def smoke(backend, folder: Path) -> dict:
    """One tiny graph (``y = x + w``, [2, 8], fp16 on a GPU) through the runtime's own runner
    on ``backend``'s providers, with a CUDA graph where they are on the GPU, and ``w`` shared
    as an export's weights are (a ``WeightPool`` buffer on the runner's device, handed to the
    session with ``add_initializer``): whether ONNX Runtime loads the providers asked
    (``get_providers()``; a CUDA provider whose libraries are missing is listed as available
    all the same), replays the graph with the right values, and reads the shared buffer in
    place (``shared_weight``: the graph's own ``w`` is 3 — not 0, which an optimiser may drop
    as an identity —, the shared one 1, then refilled with 2: ``copied`` if the refill is not
    seen, ``not used`` if ONNX Runtime kept the graph's own copy, as it does, with a warning
    only, when the buffer is not on the device it planned), and reads new values written at
    the bound input's address (``input``: ``stale`` if ONNX Runtime copied the input when it
    was bound, which it does for a device it does not take as its own: every fixed input of the
    fused UNet would then be read once). Seconds, where the export is
    minutes: a provider that cannot load, or weights that would not be shared, are named before
    the export, with ONNX Runtime's reason."""
    import numpy as np
    import onnx
    import torch
    from onnx import TensorProto, helper, numpy_helper

    from adapedit.engines.ort import OrtRunner
    from adapedit.engines.weights import WeightPool
    from adapedit.export.api import graph_spec

    gpu = backend.ort.device.type == "cuda"
    dtype, np_type, onnx_type = (
        (torch.float16, np.float16, TensorProto.FLOAT16)
        if gpu
        else (torch.float32, np.float32, TensorProto.FLOAT)
    )
    x_info, y_info = (helper.make_tensor_value_info(n, onnx_type, [2, 8]) for n in ("x", "y"))
    add = helper.make_node("Add", ["x", "w"], ["y"])
    own = numpy_helper.from_array(np.full((2, 8), 3, np_type), "w")
    graph = helper.make_graph([add], "smoke", [x_info], [y_info], [own])
    # IR 10, as the exports: onnx 1.23 writes 14 unless told, and onnxruntime-gpu 1.31 reads
    # up to 13 (its refusal would read as a provider that cannot run)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    spec = graph_spec(model, "smoke.onnx")
    onnx.save(model, folder / spec.file)
    shared = np.ones((2, 8), np_type)
    (folder / "w.bin").write_bytes(shared.tobytes())
    entry = {"file": "w.bin", "offset": 0, "length": shared.nbytes, "shape": [2, 8]}
    index = {
        "tensors": {"w": entry | {"dtype": shared.dtype.name}},
        "graphs": {spec.file: {"w": "w"}},
    }
    (folder / "weights.json").write_text(json.dumps(index))
    options = replace(backend.ort, cuda_graph=gpu, log_severity=2)  # its warnings into the log
    record = {"backend": backend.name, "cuda_graph": gpu, "asked": list(options.providers)}
    t0 = time.perf_counter()
    try:
        stream = torch.cuda.Stream() if gpu and torch.cuda.is_available() else None
        pool = WeightPool(folder, "weights.json", options.device)
        with OrtRunner(folder / spec.file, spec, options, stream=stream, weights=pool) as runner:
            x = torch.arange(16, dtype=dtype, device=options.device).reshape(2, 8)
            start = x.clone()
            ys = [runner.infer({"x": x})["y"].clone() for _ in range(4)]
            pool.buffer("w").fill_(2)  # the caller's stream: the runner's run is ordered after
            refilled = runner.infer({"x": x})["y"].clone()
            x.add_(16)  # new values at the bound address: the replay must read them
            moved = runner.infer({"x": x})["y"].clone()
            record["providers"] = runner.session.get_providers()
        if gpu:
            torch.cuda.synchronize()
        if all(torch.equal(y, start + 1) for y in ys):
            state = "used in place" if torch.equal(refilled, start + 2) else "copied"
        else:
            state = "not used" if all(torch.equal(y, start + 3) for y in ys) else "wrong values"
        read = "in place" if torch.equal(moved - refilled, torch.full_like(x, 16)) else "stale"
        ok = state == "used in place" and read == "in place"
        record |= {"ok": ok, "shared_weight": state, "input": read}
    except Exception as e:  # recorded: the steps after it say what it means for them
        record |= {"ok": False, "error": f"{type(e).__name__}: {e}"}
    return record | {"seconds": time.perf_counter() - t0}


#: What of an unpacked onnxruntime-gpu wheel no step uses, left out of the kit (patterns on
#: paths inside the archive; a folder goes with its contents): the C API library (neither the
#: Python binding nor the CUDA provider loads it: their ELF ``NEEDED`` lists do not name it,
#: and the provider takes its one ONNX Runtime symbol from ``libonnxruntime_providers_shared``)
#: and the model tools. For 1.31.1: 8.2 MiB of a 193.5 MiB archive, one call fewer today.
LEFT_OUT = (
    "onnxruntime/capi/libonnxruntime.so*",
    "onnxruntime/transformers",
    "onnxruntime/quantization",
    "onnxruntime/tools",
)


def pack(
    source: Path, out: Path, part_kib: int, level: int = 9, left_out: tuple[str, ...] = LEFT_OUT
) -> list[Path]:
    """The transfer kit: ``source``'s contents (an unpacked wheel: the package and its
    ``.dist-info``) but the paths ``left_out`` matches, as one xz tar cut into parts of
    ``part_kib`` KiB (``part-00``, …) and a ``SHA256`` of the whole, under ``out`` (old parts
    removed)."""
    out.mkdir(parents=True, exist_ok=True)

    def kept(member: tarfile.TarInfo) -> tarfile.TarInfo | None:
        return None if any(fnmatch.fnmatchcase(member.name, p) for p in left_out) else member

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz", preset=level) as tar:
        for p in sorted(source.iterdir()):
            tar.add(p, arcname=p.name, filter=kept)
    data = buf.getvalue()
    parts = _cut(data, out, part_kib)
    (out / "SHA256").write_text(hashlib.sha256(data).hexdigest() + "\n")
    return parts


def _cut(data: bytes, out: Path, part_kib: int) -> list[Path]:
    """``data`` in parts of ``part_kib`` KiB under ``out`` (``part-00``, …; old parts removed)."""
    for old in out.glob("part-*"):
        old.unlink()
    size = part_kib << 10
    parts = []
    for i in range(0, len(data), size):
        parts.append(out / f"part-{i // size:02d}")
        parts[-1].write_bytes(data[i : i + size])
    return parts


def _joined(folder: Path) -> bytes:
    """``folder``'s parts joined and checked against its ``SHA256``."""
    parts = sorted(folder.glob("part-*"))
    want = (folder / "SHA256").read_text().strip()
    data = b"".join(p.read_bytes() for p in parts)
    got = hashlib.sha256(data).hexdigest()
    if got != want:
        raise SystemExit(
            f"the carried parts do not add up | where: {folder} | expected: sha256 {want} | "
            f"got: {got} from {len(parts)} parts (send every part, in order)"
        )
    return data


def recut(folder: Path, part_kib: int) -> list[Path]:
    """An existing kit cut again into parts of ``part_kib`` KiB (the same archive, checked:
    seconds, where packing it again takes minutes) — for a working tree that has grown."""
    return _cut(_joined(folder), folder, part_kib)


def unpack(folder: Path) -> Path:
    """Reassemble ``folder``'s parts, check them against ``SHA256`` and extract them into
    ``folder/site`` (replaced as a whole; a stamp records which archive it holds)."""
    want = (folder / "SHA256").read_text().strip()
    site, stamp = folder / "site", folder / "site" / ".installed"
    if stamp.is_file() and stamp.read_text().strip() == want:
        return site
    data = _joined(folder)
    tmp = folder / "site.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:xz") as tar:
        tar.extractall(tmp, filter="data")
    (tmp / ".installed").write_text(want + "\n")
    shutil.rmtree(site, ignore_errors=True)
    os.replace(tmp, site)
    return site


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="verb", required=True)
    for n in ("1", "2"):
        sub.add_parser(n, help=f"run command {n}")
    p = sub.add_parser("probe")
    p.add_argument("--jsonl", required=True)
    p = sub.add_parser("pack")
    p.add_argument("source")
    p.add_argument("--out", required=True)
    p.add_argument("--part-kib", type=int, required=True)
    p.add_argument("--level", type=int, default=9)
    p = sub.add_parser("recut")
    p.add_argument("folder")
    p.add_argument("--part-kib", type=int, required=True)
    p = sub.add_parser("unpack")
    p.add_argument("folder")
    a = ap.parse_args(argv)
    if a.verb in ("1", "2"):
        s = Settings.from_env()
        print(f"results in {s.out}", flush=True)
        return run_command(int(a.verb), s)
    if a.verb == "probe":
        probe(Path(a.jsonl))
    elif a.verb in ("pack", "recut"):
        parts = (
            pack(Path(a.source), Path(a.out), a.part_kib, a.level)
            if a.verb == "pack"
            else recut(Path(a.folder), a.part_kib)
        )
        for part in parts:
            print(f"{part} {part.stat().st_size / 2**20:.1f} MiB")
    else:
        print(unpack(Path(a.folder)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
