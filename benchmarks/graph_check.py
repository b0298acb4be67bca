"""What ONNX Runtime makes of an export's graphs on a provider: every UNet graph (and the text
encoder and VAE) is loaded with the provider and saved as ONNX Runtime optimised it; the script
counts the Memcpy nodes left (host↔device copies inside a UNet call) and the nodes placed on the
CPU, per graph. A static export on the CUDA provider should have none. Writes JSON + markdown:

    python -m benchmarks.graph_check --export-dir EXPORT --providers cuda
"""

from __future__ import annotations

import argparse
import collections
import tempfile
from pathlib import Path

from benchmarks.common import machine_info, write_results


def check(export_dir: Path, providers: tuple[str, ...]) -> dict:
    import onnx

    from adapedit.engines.ort import OrtOptions, OrtRunner
    from adapedit.spec import Manifest

    m = Manifest.load(export_dir)
    graphs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="adapedit-graphs-") as work:
        options = OrtOptions(providers=providers, optimized_model_prefix=f"{work}/")
        for spec in m.all_graphs():
            with OrtRunner(export_dir / spec.file, spec, options):
                pass  # creating the session writes the optimised graph
            optimised = onnx.load(f"{work}/{Path(spec.file).name}", load_external_data=False)
            ops = collections.Counter(n.op_type for n in optimised.graph.node)
            graphs[spec.file] = {
                "memcpy_nodes": sum(v for k, v in ops.items() if k.startswith("Memcpy")),
                "nodes": sum(ops.values()),
                "integer_inputs": [t.name for t in spec.inputs if t.dtype.startswith("int")],
            }
    unet = [g for f, g in graphs.items() if f.startswith("unet/")]
    return {
        "machine": machine_info(),
        "model": m.model,
        "shapes": m.shapes,
        "precision": m.precision,
        "providers": list(providers),
        "graphs": graphs,
        "unet_memcpy_nodes": sum(g["memcpy_nodes"] for g in unet),
        "unet_integer_cut_inputs": sum(len(g["integer_inputs"]) for g in unet),
    }


def markdown(rec: dict) -> str:
    lines = [
        f"# Graph check: {rec['model']} ({rec['shapes']}, {rec['precision']}) on "
        f"{', '.join(rec['providers'])}",
        "",
        f"Machine: {rec['machine']['description']}.",
        "",
        f"Memcpy nodes left in the optimised UNet graphs: **{rec['unet_memcpy_nodes']}**; "
        f"integer inputs of UNet graphs: **{rec['unet_integer_cut_inputs']}**.",
        "",
        "| graph | nodes | Memcpy | integer inputs |",
        "|---|---|---|---|",
    ]
    for f, g in rec["graphs"].items():
        ints = ", ".join(g["integer_inputs"]) or "–"
        lines.append(f"| {f} | {g['nodes']} | {g['memcpy_nodes']} | {ints} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--export-dir", required=True)
    ap.add_argument("--providers", nargs="+", default=["cpu"])
    ap.add_argument("--results", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--tag", default=None)
    a = ap.parse_args()
    rec = check(Path(a.export_dir), tuple(a.providers))
    stem = a.tag or f"graph_check_{rec['model']}_{rec['shapes']}_{a.providers[0]}"
    write_results(Path(a.results), stem, rec, markdown(rec))


if __name__ == "__main__":
    main()
