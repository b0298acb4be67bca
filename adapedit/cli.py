"""The ``adapedit`` command line."""

from __future__ import annotations

import argparse
import importlib.util
import sys
import traceback
from collections.abc import Sequence

from adapedit.config import ATTENTION_LIMITS, DEFAULT_CACHE_BYTES
from adapedit.defaults import BUILTIN_MODELS, DEFAULT_MODEL, DEMO_SOURCE, DEMO_TARGET
from adapedit.errors import AdapEditError, ConfigError
from adapedit.spec import ATTENTION_OPS


def _reweight(text: str) -> tuple[str, float]:
    word, sep, factor = text.partition("=")
    try:
        if not sep or not word:
            raise ValueError
        return word, float(factor)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WORD=FACTOR, got {text!r}") from None


def _add_sampler_args(p: argparse.ArgumentParser) -> None:
    from adapedit.config import PRESETS

    g = p.add_argument_group("sampler")
    g.add_argument(
        "--preset",
        choices=tuple(PRESETS),
        default="paper",
        help="steps, scheduler and calibration steps: "
        + "; ".join(f"{k}: {v.description}" for k, v in PRESETS.items())
        + " (each of --steps, --scheduler, --calibration-steps overrides it)",
    )
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--steps", type=int, default=None, help="sampling steps (default: the preset's)")
    g.add_argument("--guidance", type=float, default=7.5)
    g.add_argument("--height", type=int, default=None, help="pixels (default: the model's)")
    g.add_argument("--width", type=int, default=None, help="pixels (default: the model's)")
    g.add_argument(
        "--scheduler",
        choices=("ddim", "pndm", "euler", "dpmpp"),
        default=None,
        help="default: the preset's",
    )
    g.add_argument(
        "--calibration-steps",
        type=int,
        default=None,
        metavar="K",
        help="steps of the calibration pass, 1 … --steps (default: the preset's)",
    )


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engines")
    g.add_argument(
        "--providers",
        nargs="+",
        choices=("cpu", "cuda", "tensorrt"),
        default=None,
        help="ONNX Runtime execution providers, in priority order",
    )
    g.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")


_ATTENTION_LIMITS_HELP = (
    "scaled: P2P's resolution constants as fractions of the latent (self-attention control in "
    "the 1/4-resolution layers and coarser, LocalBlend's max-pool a share of its map; P2P's "
    "numbers at 512 px); p2p-literal: P2P's numbers at every size (≤ 256 queries, 3×3)"
)


def _add_edit_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("edit")
    g.add_argument("--edit-type", choices=("refine", "replace", "reweight"), default="refine")
    g.add_argument("--lambda-tau", type=float, default=1.0)
    g.add_argument("--lambda-s", type=float, default=0.9)
    g.add_argument("--lambda-sv", type=float, default=1.0)
    g.add_argument("--alpha-m", type=float, default=0.03)
    g.add_argument("--tau-rule", choices=("paper", "released"), default="paper")
    g.add_argument(
        "--tau",
        type=float,
        default=0.8,
        help="fixed cross-attention τ (without FWT, or with no keyword)",
    )
    g.add_argument("--tau-self", type=float, default=0.4, help="fixed self-attention τ")
    g.add_argument("--calibration", choices=("mean", "last"), default="mean")
    g.add_argument("--no-fwt", action="store_true", help="fixed τ for every word (P2P)")
    g.add_argument("--no-dps", action="store_true", help="no pixel-level blending (P2P)")
    g.add_argument("--no-dps-mask", action="store_true", help="no α_m mask for DPS's E_k")
    g.add_argument("--local-blend", nargs="+", metavar="WORD", default=[])
    g.add_argument("--reweight", nargs="+", metavar="WORD=FACTOR", type=_reweight, default=[])
    g.add_argument(
        "--attention-limits",
        choices=ATTENTION_LIMITS,
        default="scaled",
        help=_ATTENTION_LIMITS_HELP + " (an engine folder runs only its export's rule)",
    )


def configs_from_args(a: argparse.Namespace):
    """The edit and sampler configurations: the preset's, then every option given."""
    from dataclasses import replace

    from adapedit.config import SamplerConfig, check_calibration_steps, preset

    chosen = preset(a.preset)
    edit = replace(
        edit_config_from_args(a),
        calibration_steps=chosen.calibration_steps
        if a.calibration_steps is None
        else a.calibration_steps,
    )
    sampler = SamplerConfig(
        steps=chosen.steps if a.steps is None else a.steps,
        guidance=a.guidance,
        scheduler=a.scheduler or chosen.scheduler,
        seed=a.seed,
        height=a.height,
        width=a.width,
    )
    check_calibration_steps(edit, sampler)
    return edit, sampler


def edit_config_from_args(a: argparse.Namespace):
    from adapedit.config import EditConfig

    return EditConfig(
        edit_type=a.edit_type,
        use_fwt=not a.no_fwt,
        use_dps=not a.no_dps,
        dps_mask=not a.no_dps_mask,
        lambda_tau=a.lambda_tau,
        lambda_s=a.lambda_s,
        lambda_sv=a.lambda_sv,
        alpha_m=a.alpha_m,
        tau_rule=a.tau_rule,
        tau_fixed=a.tau,
        tau_self_fixed=a.tau_self,
        calibration=a.calibration,
        local_blend=tuple(a.local_blend),
        reweight=tuple(a.reweight),
        attention_limits=a.attention_limits,
    )


def _add_image_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("editing a given image (SOURCE describes it)")
    g.add_argument(
        "--image", default=None, metavar="PATH", help="a PNG, JPEG or WebP image to edit"
    )
    g.add_argument(
        "--inversion",
        default=None,
        metavar="direct|ddim|npi",
        help="how the source branch keeps to the image (default: direct)",
    )
    g.add_argument(
        "--resize",
        default=None,
        metavar="crop|pad|stretch",
        help="how the image is brought to the model's resolution (default: crop)",
    )


def image_from_args(a: argparse.Namespace):
    """The image to edit (read and checked, or None without ``--image``) and its
    :class:`~adapedit.config.ImageConfig`.

    Raises:
        InputError: an unreadable or unusable image, an unknown inversion or resize policy,
            either option without ``--image``.
    """
    from adapedit.config import ImageConfig

    if a.image is None:
        for name in ("inversion", "resize"):
            if getattr(a, name) is not None:
                raise ConfigError(
                    f"--{name} is only for an edit of a given image",
                    where="adapedit edit",
                    expected="--image PATH beside it",
                    got="no --image",
                    field=name,
                )
        return None, ImageConfig()
    from adapedit.image_io import load_image

    cfg = ImageConfig(inversion=a.inversion or "direct", resize=a.resize or "crop")
    return load_image(a.image), cfg


def _engine_options(a: argparse.Namespace):
    from adapedit.engines.ort import OrtOptions

    if not a.providers and not a.threads:
        return None
    return OrtOptions(providers=tuple(a.providers or ("cpu",)), threads=a.threads or 0)


def cmd_edit(a: argparse.Namespace) -> int:
    from adapedit.io import check_output_folder, write_edit_outputs

    edit, sampler = configs_from_args(a)
    check_output_folder(a.out, "adapedit edit --out")
    image, image_config = image_from_args(a)  # a bad image fails before any model is loaded
    if image is not None:  # named by the preset when its scheduler is the one refused
        from adapedit.algorithm.inversion import check_sampler

        check_sampler(sampler, "adapedit edit --image", None if a.scheduler else a.preset)
    backend = a.backend or ("engine" if a.engine_dir else "torch")
    if backend == "engine":
        if not a.engine_dir:
            raise ConfigError(
                "--backend engine needs --engine-dir",
                where="adapedit edit",
                expected="--engine-dir DIR",
                got="none",
            )
        from adapedit.runtime.session import EditSession

        pipe = EditSession(a.engine_dir, ort=_engine_options(a), form=a.form)
        model = pipe.manifest.model
    else:
        from adapedit.pipelines.models import torch_device
        from adapedit.pipelines.pipeline import ReferencePipeline

        device = torch_device(a.device, where="adapedit edit --device")  # before the model loads
        pipe = ReferencePipeline.from_model(a.model, device=device)
        model = a.model
    pipe.plan(a.source, a.target, edit)  # every prompt error before any model work
    pipe.latent_hw(sampler)
    result = pipe.edit(
        a.source,
        a.target,
        edit,
        sampler,
        image=image,
        image_config=image_config,
        progress=not a.quiet,
    )
    files = write_edit_outputs(result, a.out, model)
    taus = ", ".join(f"{w.word}={w.tau:.2f}" for w in result.tau.words)
    print(f"τ: {taus}; τ_self={result.tau.tau_self:.2f}; keywords: {result.keywords}")
    for note in result.notes:
        print(f"note: {note}")
    print(f"total {result.timings['total']:.2f} s → {', '.join(str(f) for f in files.values())}")
    return 0


def cmd_build(a: argparse.Namespace) -> int:
    from adapedit.engines.base import Profile
    from adapedit.engines.folder import build_engines
    from adapedit.engines.ort import OrtOptions

    profile = None
    if a.batch or a.height or a.width:
        from adapedit.engines.folder import default_profile
        from adapedit.spec import Manifest

        d = default_profile(Manifest.load(a.export_dir))
        profile = Profile(
            batch=tuple(a.batch or d.batch),
            height=tuple(a.height or d.height),
            width=tuple(a.width or d.width),
        )
    ort = OrtOptions(providers=tuple(a.providers or ("cpu",)), threads=a.threads or 0)
    cfg = build_engines(
        a.export_dir,
        a.out,
        backend=a.backend,
        ort=ort,
        profile=profile,
        cache_dir=a.cache,
        progress=not a.quiet,
    )
    print(
        f"built {a.backend} engines → {a.out} (profile: batch {cfg.profile.batch}, "
        f"height {cfg.profile.height}, width {cfg.profile.width})"
    )
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from adapedit.demo import run_demo

    summary = run_demo(
        a.out,
        model=a.model,
        source=a.source,
        target=a.target,
        steps=a.steps,
        seed=a.seed,
        progress=not a.quiet,
    )
    print(summary)
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from adapedit.export.api import ExportOptions, export_model

    options = ExportOptions(
        precision=a.precision,
        forms=tuple(a.form),
        shapes=a.shapes,
        batches=tuple(a.batches),
        opset=a.opset,
        attention_limits=a.attention_limits,
        attention_op=a.attention_op,
    )
    m = export_model(
        a.model,
        a.out,
        options,
        height=a.height,
        width=a.width,
        jobs=a.jobs,
        progress=not a.quiet,
    )
    n_cross = sum(b.kind == "cross" for b in m.boundaries)
    batches = f"batches {list(m.batches)}" if m.static else "any batch"
    print(
        f"exported {m.model} ({m.precision}, opset {m.opset}, {m.height}×{m.width}, "
        f"{m.shapes}: {batches}) → {a.out}: UNet {', '.join(options.forms)}, "
        f"{len(m.boundaries)} boundaries ({n_cross} cross, {len(m.boundaries) - n_cross} self), "
        f"graphs {sorted(m.graphs)}"
    )
    return 0


#: ``adapedit serve`` options that deploy on Ray Serve (fields of ``ScaleOut``), with --ray-address
SCALE_OPTIONS = ("replicas", "min_replicas", "max_replicas", "gpus_per_replica", "cpus_per_replica")


def _cache_bytes(a: argparse.Namespace) -> int | None:
    """The calibration cache bound of ``--calibration-cache-mb`` (None: ``--no-calibration-cache``);
    the session refuses a bound that is not positive."""
    return None if a.no_calibration_cache else int(a.calibration_cache_mb * 2**20)


def cmd_serve(a: argparse.Namespace) -> int:
    import logging

    if not a.quiet:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from adapedit.runtime.server import HttpOptions

    options = HttpOptions(queue_size=a.queue, timeout=a.timeout, page=not a.no_page)
    scale = {k: v for k in SCALE_OPTIONS if (v := getattr(a, k)) is not None}
    if not scale and a.ray_address is None:
        from adapedit.runtime.server import serve

        serve(
            a.engine_dir,
            host=a.host,
            port=a.port,
            options=options,
            ort=_engine_options(a),
            access_log=not a.quiet,
            calibration_cache=_cache_bytes(a),
        )
        return 0
    if importlib.util.find_spec("ray") is None:
        raise ConfigError(
            "Ray Serve is not installed",
            where="adapedit serve --replicas/--ray-address",
            expected="pip install 'adapedit[serve]'",
            got="no module named 'ray'",
        )
    from adapedit.runtime.rayserve import ScaleOut, serve_ray

    config = ScaleOut(
        a.engine_dir,
        queue_size=options.queue_size,
        timeout=options.timeout,
        ort=_engine_options(a),
        calibration_cache=_cache_bytes(a),
        page=options.page,
        **scale,
    )
    serve_ray(config, address=a.ray_address, host=a.host, port=a.port, quiet=a.quiet)
    return 0


def build_parser() -> argparse.ArgumentParser:
    debug = "show the traceback of an internal error"
    # --debug before or after the command: the sub-commands' copy sets it only when given
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug)
    parser = argparse.ArgumentParser(prog="adapedit", description=__doc__)
    parser.add_argument("--debug", action="store_true", help=debug)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "edit", parents=[common], help="edit SOURCE into TARGET and write both images"
    )
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("target", metavar="TARGET")
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"{' | '.join(BUILTIN_MODELS)} | PATH to a diffusers folder "
        f"(default: {DEFAULT_MODEL})",
    )
    p.add_argument("--device", default="cpu", help="torch backend: cpu | cuda")
    p.add_argument(
        "--engine-dir",
        default=None,
        metavar="DIR",
        help="run through the runtime from an engine folder ('adapedit build')",
    )
    p.add_argument(
        "--backend",
        choices=("torch", "engine"),
        default=None,
        help="torch: the PyTorch reference; engine: the runtime (default: engine "
        "when --engine-dir is given)",
    )
    _add_engine_args(p)
    p.add_argument(
        "--form",
        choices=("auto", "fused", "segmented"),
        default="auto",
        help="UNet form of the engine folder to run (default: fused where it has one)",
    )
    p.add_argument("--out", default="out", metavar="DIR")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_sampler_args(p)
    _add_edit_args(p)
    _add_image_args(p)
    p.set_defaults(func=cmd_edit)

    p = sub.add_parser("build", parents=[common], help="build engines from an export folder")
    p.add_argument("export_dir", metavar="EXPORT_DIR")
    p.add_argument("--out", required=True, metavar="ENGINE_DIR")
    p.add_argument("--backend", choices=("ort", "trt"), default="ort")
    _add_engine_args(p)
    p.add_argument("--batch", type=int, nargs=3, metavar=("MIN", "OPT", "MAX"))
    p.add_argument("--height", type=int, nargs=3, metavar=("MIN", "OPT", "MAX"))
    p.add_argument("--width", type=int, nargs=3, metavar=("MIN", "OPT", "MAX"))
    p.add_argument("--cache", default=None, metavar="DIR", help="TensorRT plan cache")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser(
        "demo", parents=[common], help="export, build, edit through the runtime and the reference"
    )
    p.add_argument("--out", default="out", metavar="DIR")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--source", default=DEMO_SOURCE)
    p.add_argument("--target", default=DEMO_TARGET)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "export", parents=[common], help="export a model to ONNX (segmented and/or whole UNet)"
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"{' | '.join(BUILTIN_MODELS)} | PATH")
    p.add_argument("--out", required=True, metavar="DIR", help="a folder that does not exist")
    p.add_argument("--precision", choices=("fp32", "fp16"), default="fp32")
    p.add_argument(
        "--form",
        nargs="+",
        choices=("segmented", "whole", "fused"),
        default=["segmented", "whole"],
        help="UNet forms (default: segmented whole; fused: the edit inside one graph per pass, "
        "static exports only)",
    )
    p.add_argument(
        "--shapes",
        choices=("dynamic", "static"),
        default="dynamic",
        help="dynamic: any batch and resolution (CPU, many sizes); static: every shape fixed "
        "to --height × --width and the UNet to --batches (GPU engines, CUDA graphs)",
    )
    p.add_argument(
        "--batches",
        type=int,
        nargs="+",
        default=[2, 4],
        help="UNet batch sizes of a static export (default: 2 4 — calibration and edit; add 1, "
        "as in '--batches 1 2 4', to edit given images: their inversion runs at batch 1)",
    )
    p.add_argument(
        "--jobs", type=int, default=1, help="trace the static UNet variants in N processes"
    )
    p.add_argument(
        "--height",
        type=int,
        default=None,
        help="export resolution in pixels: fixes which self-attention layers are cut (and "
        "every shape of a static export)",
    )
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--opset", type=int, default=18)
    p.add_argument(
        "--attention-limits",
        choices=ATTENTION_LIMITS,
        default="scaled",
        help=_ATTENTION_LIMITS_HELP + " (recorded in the manifest; its edits must ask for it)",
    )
    p.add_argument(
        "--attention-op",
        choices=ATTENTION_OPS,
        default="onnx",
        help="the attention layers no edit reads: onnx, standard operators (every backend; "
        "TensorRT fuses them itself); ort, ONNX Runtime's fused MultiHeadAttention (flash or "
        "memory-efficient kernels on CUDA; ONNX Runtime only) (default: onnx)",
    )
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "serve",
        parents=[common],
        help="serve edits over HTTP from an engine folder (uvicorn; Ray Serve with --replicas)",
    )
    p.add_argument("--engine-dir", required=True, metavar="DIR", help="from 'adapedit build'")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument(
        "--port", type=int, default=8000, help="0: any free port (not with Ray) (default: 8000)"
    )
    p.add_argument(
        "--queue",
        type=int,
        default=8,
        help="edits that may wait for an engine; one more gets 503 (default: 8)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="seconds from a request's arrival to its answer; later: 504 (default: 120)",
    )
    p.add_argument(
        "--calibration-cache-mb",
        type=float,
        default=DEFAULT_CACHE_BYTES / 2**20,
        metavar="MB",
        help="bound of each session's calibration cache: a re-edit of the same target, seed "
        "and sampler changing only edit-side options skips the calibration pass (default: "
        f"{DEFAULT_CACHE_BYTES >> 20})",
    )
    p.add_argument("--no-calibration-cache", action="store_true", help="every edit calibrates")
    p.add_argument("--no-page", action="store_true", help="API only: no playground page at GET /")
    g = p.add_argument_group(
        "Ray Serve (any of these deploys on Ray; pip install 'adapedit[serve]')"
    )
    g.add_argument("--replicas", type=int, default=None, help="replicas, one session each")
    g.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDR",
        help="a running Ray cluster (default: start a local one)",
    )
    g.add_argument(
        "--min-replicas", type=int, default=None, help="autoscaling: at least (with --max-replicas)"
    )
    g.add_argument("--max-replicas", type=int, default=None, help="autoscaling: at most")
    g.add_argument(
        "--gpus-per-replica",
        type=float,
        default=None,
        help="default: 1 when the cluster has GPUs, else 0",
    )
    g.add_argument("--cpus-per-replica", type=float, default=None, help="default: 1")
    _add_engine_args(p)
    p.add_argument("--quiet", action="store_true", help="no access log")
    p.set_defaults(func=cmd_serve)
    return parser


def _quiet_libraries() -> None:
    """No progress bars from transformers' and diffusers' model loading either (``--quiet``)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; exit code 0, 2 for an :class:`~adapedit.errors.AdapEditError`
    (bad input, a model or engine that cannot be used), 1 for an internal error (its traceback
    with ``--debug``)."""
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "quiet", False) and args.func in (cmd_edit, cmd_demo, cmd_export):
            _quiet_libraries()  # the commands that load models
        return args.func(args)
    except AdapEditError as e:
        print(f"adapedit: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if args.debug:
            traceback.print_exc()
        hint = "" if args.debug else " (run with --debug for the traceback)"
        print(f"adapedit: internal error: {type(e).__name__}: {e}{hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
