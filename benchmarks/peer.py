"""The peer a user would pick instead of our engines: the PyTorch UNet with the edit inside
(``adapedit.pipelines.fused``, the processor the fused ONNX graph is traced from), eager, replayed
as a CUDA graph, and compiled with ``torch.compile(mode="reduce-overhead")``; beside the plain
SDPA UNet eager and as a CUDA graph; then both again with ``torch.backends.cudnn.benchmark`` on
(``-cudnn-benchmark``: cuDNN times each convolution's algorithms, as ONNX Runtime chooses its
own). One UNet call at batch 4 (the edit pass), median of repeats. CUDA graphs, compilation and
cuDNN's tuning run on a GPU only (on the CPU the eager rows run, as a dry run).
Writes JSON + markdown:

    python -m benchmarks.peer --model sd14-random --height 512 --precision fp16 --compile
"""

from __future__ import annotations

import argparse
import copy
import time
import traceback
from pathlib import Path

from benchmarks.common import machine_info, write_results
from benchmarks.latency import JsonLines, timed


def _graphed(fn, args):
    """``fn(*args)`` captured as a CUDA graph (warmed up on a side stream); returns a replay."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn(*args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(*args)
    return graph.replay


def run(a: argparse.Namespace) -> dict:
    """Every row of the peer, each appended to ``a.jsonl`` as it is measured."""
    import torch
    from diffusers.models.attention_processor import AttnProcessor2_0

    from adapedit.pipelines.fused import FusedUNet, example_controls
    from adapedit.pipelines.models import load_model
    from adapedit.pipelines.processors import controlled_layers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if a.precision == "fp16" else torch.float32
    c = load_model(a.model).to(device, dtype)
    latent_hw = c.latent_hw(a.height, a.height)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 4, *latent_hw, generator=g).to(device, dtype)
    t = torch.tensor([501.0], device=device)
    ctx = torch.randn(4, 77, c.unet.config.cross_attention_dim, generator=g).to(device, dtype)
    rec: dict = {
        "machine": machine_info(),
        "model": a.model,
        "height": a.height,
        "precision": a.precision,
        "device": device,
        "unet_call_s": {},
        "notes": [],
    }
    sdpa = copy.deepcopy(c.unet)
    sdpa.set_attn_processor(AttnProcessor2_0())
    fused = FusedUNet(c.unet, controlled_layers(c.unet, latent_hw), "edit", latent_hw)
    controls = example_controls(fused, dtype, device)

    def plain(x, t, ctx):
        return sdpa(x, t, encoder_hidden_states=ctx).sample

    def edit(x, t, ctx):
        return fused(x, t, ctx, *controls)

    out = JsonLines(a.jsonl)

    def row(name: str, fn) -> None:
        rec["unet_call_s"][name] = timed(fn, device, a.warmup, a.repeats)
        out.emit("peer_call", path=name, batch=4, seconds=rec["unet_call_s"][name])

    rows = {"torch-sdpa": plain, "torch-fused": edit}

    def eager_and_graphed(suffix: str = "") -> None:
        for name, fn in rows.items():
            with torch.no_grad():
                row(f"{name}{suffix}", lambda f=fn: f(x, t, ctx))
                if device == "cuda":
                    try:
                        replay = _graphed(fn, (x, t, ctx))
                        row(f"{name}{suffix}-cudagraph", replay)
                    except Exception as e:  # one row failing must not lose the others
                        rec["notes"].append(
                            f"{name}{suffix}-cudagraph failed: {type(e).__name__}: {e}"
                        )
                        traceback.print_exc()

    eager_and_graphed()  # cuDNN at torch's default: heuristic convolution algorithms
    if a.compile and device == "cuda":
        try:
            t0 = time.perf_counter()
            compiled = torch.compile(edit, mode="reduce-overhead")
            with torch.no_grad():
                for _ in range(3):
                    compiled(x, t, ctx)
                rec["compile_s"] = time.perf_counter() - t0
                row("torch-fused-compiled", lambda: compiled(x, t, ctx))
        except Exception as e:
            rec["notes"].append(f"torch.compile failed: {type(e).__name__}: {e}")
            traceback.print_exc()
    elif a.compile:
        rec["notes"].append("torch.compile and CUDA graphs measured on a GPU only")
    if device == "cuda":
        # last, as a user tuning PyTorch would: each convolution's algorithm timed by cuDNN
        # on its first call (ONNX Runtime picks its own): how much of a gap is algorithm choice
        torch.backends.cudnn.benchmark = True
        eager_and_graphed("-cudnn-benchmark")
    return rec


def markdown(rec: dict) -> str:
    lines = [
        f"# The PyTorch peer: {rec['model']} at {rec['height']}², {rec['precision']}, "
        f"{rec['device']}",
        "",
        f"Machine: {rec['machine']['description']}. One UNet call at batch 4, median (p90) s.",
        "",
        "| UNet call | median s | p90 s |",
        "|---|---|---|",
    ]
    for k, v in rec["unet_call_s"].items():
        lines.append(f"| {k} | {v['median']:.4f} | {v['p90']:.4f} |")
    if "compile_s" in rec:
        lines.append(f"\ntorch.compile (incl. CUDA graph capture): {rec['compile_s']:.0f} s.")
    lines += [f"Note: {n}" for n in rec["notes"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="sd14-random")
    ap.add_argument("--height", type=int, default=512)
    ap.add_argument("--precision", choices=("fp32", "fp16"), default="fp16")
    ap.add_argument("--compile", action="store_true", help="also torch.compile (GPU)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--results", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--tag", default=None)
    ap.add_argument("--jsonl", default=None, help="append each row here as it is measured")
    a = ap.parse_args()
    rec = run(a)
    stem = a.tag or f"peer_{a.model}_{a.height}_{a.precision}_{rec['device']}"
    write_results(Path(a.results), stem, rec, markdown(rec))


if __name__ == "__main__":
    main()
