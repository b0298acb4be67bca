"""The embedding surface in plain values: options, validation and results without torch objects.

For callers that hold no ``EditConfig``/``EditResult`` (an HTTP request, a C++ program through
pybind11): options are a flat mapping of JSON values named after the fields of
:class:`~adapedit.config.EditConfig` and :class:`~adapedit.config.SamplerConfig`, and a result is
a dict of JSON values plus the two images as C-contiguous ``uint8`` arrays [H, W, 3].

    from adapedit import EditSession
    from adapedit.runtime.api import plain_edit

    session = EditSession("engines")
    r = plain_edit(session, "a dog standing on the grass", "a dog sitting on the grass",
                   steps=20, seed=3, lambda_s=0.8, local_blend=["dog"])
    r["edited_image"]                        # numpy uint8 [H, W, 3]
    [(t["word"], t["tau"]) for t in r["tau"]], r["tau_self"], r["keywords"], r["timings_s"]

An edit of a given image takes ``image`` — encoded PNG/JPEG/WebP bytes, the same as a base64
string (JSON; a ``data:image/…;base64,`` URL too), or a uint8 array [H, W, 3] — and optionally
``inversion`` (``direct`` | ``ddim`` | ``npi``) and ``resize`` (``crop`` | ``pad`` |
``stretch``), see :class:`~adapedit.config.ImageConfig`; the result's ``image`` records how it
was read and resized::

    r = plain_edit(session, "a red circle", "a blue circle", image=open("in.png", "rb").read())

Every error is an :class:`~adapedit.errors.AdapEditError`; bad options and prompts are
:class:`~adapedit.errors.InputError` (``ConfigError``/``PromptError``), raised before any model
work; an input error's ``field`` names the option or prompt it is about. A :class:`Validator`
makes the same checks up front, from any thread, without waiting for an edit in progress (a
server answers invalid requests at once with it).
"""

from __future__ import annotations

import base64
import binascii
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import numpy as np

from adapedit.algorithm.inversion import check_model, check_sampler
from adapedit.algorithm.plan import build_plan
from adapedit.config import (
    PRESETS,
    EditConfig,
    ImageConfig,
    SamplerConfig,
    check_calibration_steps,
    preset,
)
from adapedit.errors import AdapEditError, ConfigError, EngineError
from adapedit.image_io import InputImage, decode_image, load_image
from adapedit.pipelines.models import load_tokenizer

if TYPE_CHECKING:
    from adapedit.pipelines.pipeline import EditResult
    from adapedit.runtime.session import EditSession

PROMPT_FIELDS = ("source", "target")
#: The fields of an edit of a given image: the image and the fields of ImageConfig.
IMAGE_FIELDS = ("image", *(f.name for f in fields(ImageConfig)))
EDIT_FIELDS = tuple(f.name for f in fields(EditConfig))
SAMPLER_FIELDS = tuple(f.name for f in fields(SamplerConfig))
#: ``preset``: a name of :data:`~adapedit.config.PRESETS`, the defaults of ``steps``,
#: ``scheduler`` and ``calibration_steps``.
OPTION_FIELDS = ("preset", *EDIT_FIELDS, *SAMPLER_FIELDS)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return _is_int(v) or isinstance(v, float)


def _is_reweight(v: Any) -> bool:
    pairs = v.items() if isinstance(v, Mapping) else v
    return isinstance(v, (Mapping, list, tuple)) and all(
        isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[0], str) and _is_number(p[1])
        for p in pairs
    )


def _to_reweight(v: Any) -> tuple[tuple[str, float], ...]:
    return tuple((w, f) for w, f in (v.items() if isinstance(v, Mapping) else v))


# JSON kind of each field annotation: (description, check, conversion to the config's type)
_KINDS: dict[str, tuple[str, Callable[[Any], bool], Callable[[Any], Any]]] = {
    "bool": ("true or false", lambda v: isinstance(v, bool), bool),
    "int": ("an integer", _is_int, int),
    "float": ("a number", _is_number, float),
    "str": ("a string", lambda v: isinstance(v, str), str),
    "int | None": ("an integer or null", lambda v: v is None or _is_int(v), lambda v: v),
    "tuple[str, ...]": (
        "a list of words",
        lambda v: isinstance(v, (list, tuple)) and all(isinstance(w, str) for w in v),
        tuple,
    ),
    "tuple[tuple[str, float], ...]": (
        "an object {word: factor} or a list of [word, factor] pairs",
        _is_reweight,
        _to_reweight,
    ),
}
_FIELD_KINDS = {f.name: _KINDS[f.type] for cls in (EditConfig, SamplerConfig) for f in fields(cls)}


def parse_options(
    options: Mapping[str, Any], *, where: str = "edit options", others: tuple[str, ...] = ()
) -> tuple[EditConfig, SamplerConfig]:
    """Edit and sampler configurations from plain options named after their fields.

    Omitted fields take the configurations' defaults, or the ``preset``'s for ``steps``,
    ``scheduler`` and ``calibration_steps``; ``local_blend`` is a list of words, ``reweight``
    an object ``{word: factor}`` (or ``[word, factor]`` pairs). ``others``: the caller's own
    fields beside these (the prompts, the image's), named with them in an unknown field's error.

    Raises:
        ConfigError: an unknown field, a value of the wrong JSON type, one the configurations
            refuse, or ``calibration_steps`` over ``steps``; the message names the field.
    """
    edit: dict[str, Any] = {}
    sampler: dict[str, Any] = {}
    if "preset" in options:
        name = options["preset"]
        if not isinstance(name, str):
            raise ConfigError(
                "field 'preset' has the wrong type",
                where=where,
                expected=f"one of {sorted(PRESETS)}",
                got=f"{name!r} ({type(name).__name__})",
                field="preset",
            )
        chosen = preset(name, where)
        edit["calibration_steps"] = chosen.calibration_steps
        sampler.update(steps=chosen.steps, scheduler=chosen.scheduler)
    for name, value in options.items():
        if name == "preset":
            continue
        if name not in _FIELD_KINDS:
            raise ConfigError(
                f"unknown field {name!r}",
                where=where,
                expected=f"one of {sorted(OPTION_FIELDS + others)}",
                got=name,
                field=name,
            )
        description, check, convert = _FIELD_KINDS[name]
        if not check(value):
            raise ConfigError(
                f"field {name!r} has the wrong type",
                where=where,
                expected=description,
                got=f"{value!r} ({type(value).__name__})",
                field=name,
            )
        (edit if name in EDIT_FIELDS else sampler)[name] = convert(value)
    edit_config, sampler_config = EditConfig(**edit), SamplerConfig(**sampler)
    check_calibration_steps(edit_config, sampler_config)
    return edit_config, sampler_config


def check_resolution(
    session: EditSession, edit: EditConfig, sampler: SamplerConfig, *, image: bool = False
) -> None:
    """The sampler's resolution and the UNet batch sizes (with the inversion's for an edit of
    a given ``image``) against the model and the engines (no tokenizer: safe beside an edit in
    progress).

    Raises:
        ConfigError: a height or width the model or the engine folder cannot run.
    """
    latent_hw = session.latent_hw(sampler)
    try:
        batches = session.edit_batches(edit, image=image)
        session.prepare(edit, latent_hw, batches)  # EditSession.prepare checks the engines only
    except EngineError as e:  # the resolution asked for is the caller's input
        raise ConfigError(
            e.what, where=e.where, expected=e.expected, got=e.got, field=e.field
        ) from e


class Validator:
    """Every check :meth:`EditSession.edit` makes before model work, without waiting for an edit
    in progress: prompts and words (on a tokenizer of its own, loaded from the engine folder,
    behind a lock of its own: a tokenizer's padding and truncation settings are state of the
    instance, so one tokenizer must not serve two threads at once), then the resolution.
    """

    def __init__(self, session: EditSession) -> None:
        self.session = session
        self.tokenizer = load_tokenizer(session.folder / "tokenizer")
        self._lock = threading.Lock()

    def __call__(
        self,
        source: str,
        target: str,
        edit: EditConfig,
        sampler: SamplerConfig,
        image: InputImage | None = None,
    ) -> None:
        """Check one edit (of ``image``, already decoded, if given).

        Raises:
            PromptError: a prompt over 77 tokens, a word in neither prompt, replace prompts that
                do not pair up.
            ConfigError: a resolution the model or the engine folder cannot run; an image with
                a scheduler other than DDIM, or for engines that cannot edit images (no VAE
                encoder, a prediction type the inversion cannot read).
        """
        with self._lock:
            build_plan(self.tokenizer, source, target, edit)
        check_resolution(self.session, edit, sampler, image=image is not None)
        if image is not None:
            check_sampler(sampler)
            try:
                check_model(self.session.scheduler_config, self.session.name)
                self.session.check_image_encoder()
            except AdapEditError as e:  # the request asks what these engines cannot do
                raise ConfigError(
                    e.what, where=e.where, expected=e.expected, got=e.got, field="image"
                ) from e


def to_plain(result: EditResult, model: str) -> dict[str, Any]:
    """An edit's result as plain values: the ``result.json`` document (``source``, ``target``,
    ``model``, ``tau`` as ``[{word, tokens, tau}]``, ``tau_self``, ``tau_default``,
    ``keywords``, ``config``, ``timings_s``, ``notes``) plus ``source_image`` and
    ``edited_image``, C-contiguous ``uint8`` arrays [H, W, 3]."""
    return {
        **result.to_json(model),
        "source_image": np.ascontiguousarray(result.source_image, dtype=np.uint8),
        "edited_image": np.ascontiguousarray(result.edited_image, dtype=np.uint8),
    }


@dataclass(frozen=True, eq=False)
class EditRequest:
    """One edit in plain terms, parsed: the prompts, the configurations and, for an edit of a
    given image, the decoded image and how to take it in."""

    source: str
    target: str
    edit: EditConfig
    sampler: SamplerConfig
    image: InputImage | None = None
    image_config: ImageConfig = ImageConfig()


def parse_image(
    value: Any, *, where: str = "edit request", max_pixels: int | None = None
) -> InputImage:
    """The ``image`` field: encoded PNG/JPEG/WebP bytes, the same as a base64 string (a
    ``data:image/…;base64,`` URL too) or a uint8 array [H, W, 3], decoded (at most
    ``max_pixels`` pixels if given, else Pillow's decompression-bomb limit).

    Raises:
        InputError: not base64, not an image, truncated, too large or too small (``field``
            ``image``).
    """
    if isinstance(value, str):
        text = value.partition(";base64,")[2] if value.startswith("data:") else value
        try:
            value = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as e:
            raise ConfigError(
                "field 'image' is not base64",
                where=where,
                expected="a PNG, JPEG or WebP file, base64-encoded",
                got=f"{len(text)} characters: {e}",
                field="image",
            ) from None
    if not isinstance(value, (bytes, bytearray, memoryview, np.ndarray)):
        raise ConfigError(
            "field 'image' has the wrong type",
            where=where,
            expected="a base64 string, bytes or a uint8 array [H, W, 3]",
            got=type(value).__name__,
            field="image",
        )
    if isinstance(value, np.ndarray):
        return load_image(value)
    return decode_image(bytes(value), f"{where}: field 'image'", max_pixels=max_pixels)


def parse_edit_request(
    request: Mapping[str, Any], *, where: str = "edit request", max_pixels: int | None = None
) -> EditRequest:
    """An :class:`EditRequest` from one mapping: the prompts ``source`` and ``target``
    (required strings), ``image`` (:func:`parse_image`) with ``inversion`` and ``resize``
    (strings; only with an image) and the options of :func:`parse_options`. The image is
    decoded here (``max_pixels``: see :func:`parse_image`), so a bad one is refused before any
    model work.

    Raises:
        InputError: a missing prompt, an option :func:`parse_options` refuses, a bad image, an
            unknown inversion or resize policy, either of them without an image, an image with
            a scheduler other than DDIM.
    """
    source, target = _prompts(request, where)
    image_options = {}
    for name in IMAGE_FIELDS[1:]:
        if name not in request:
            continue
        value = request[name]
        if not isinstance(value, str):
            raise ConfigError(
                f"field {name!r} has the wrong type",
                where=where,
                expected="a string",
                got=f"{value!r} ({type(value).__name__})",
                field=name,
            )
        if request.get("image") is None:
            raise ConfigError(
                f"field {name!r} is only for an edit of a given image",
                where=where,
                expected="an 'image' field beside it",
                got="no image",
                field=name,
            )
        image_options[name] = value
    options = {k: v for k, v in request.items() if k not in PROMPT_FIELDS + IMAGE_FIELDS}
    edit, sampler = parse_options(options, where=where, others=PROMPT_FIELDS + IMAGE_FIELDS)
    image_config = ImageConfig(**image_options)
    image = None
    if request.get("image") is not None:
        # named by the preset when its scheduler is the one refused
        check_sampler(sampler, where, None if "scheduler" in request else request.get("preset"))
        image = parse_image(request["image"], where=where, max_pixels=max_pixels)
    return EditRequest(source, target, edit, sampler, image, image_config)


def parse_request(
    request: Mapping[str, Any], *, where: str = "edit request"
) -> tuple[str, str, EditConfig, SamplerConfig]:
    """``(source, target, edit, sampler)`` from one mapping without an image: the prompts
    ``source`` and ``target`` (required strings) and the options of :func:`parse_options`.
    A caller that edits given images uses :func:`parse_edit_request`.

    Raises:
        ConfigError: a missing prompt, an option :func:`parse_options` refuses, or an image
            field (``field`` named), which this caller cannot pass on.
    """
    image_fields = sorted(set(IMAGE_FIELDS) & set(request))
    if image_fields:
        raise ConfigError(
            "this endpoint does not edit given images",
            where=where,
            expected="source, target and edit options",
            got=f"field {image_fields[0]!r}",
            field=image_fields[0],
        )
    source, target = _prompts(request, where)
    options = {k: v for k, v in request.items() if k not in PROMPT_FIELDS}
    return source, target, *parse_options(options, where=where, others=PROMPT_FIELDS)


def _prompts(request: Mapping[str, Any], where: str) -> tuple[str, str]:
    prompts = []
    for name in PROMPT_FIELDS:
        value = request.get(name)
        if not isinstance(value, str):
            raise ConfigError(
                f"field {name!r} is {'missing' if value is None else 'not a string'}",
                where=where,
                expected="a prompt (string)",
                got="nothing" if value is None else f"{value!r} ({type(value).__name__})",
                field=name,
            )
        prompts.append(value)
    return prompts[0], prompts[1]


def plain_edit(session: EditSession, source: str, target: str, **options: Any) -> dict[str, Any]:
    """Edit ``source`` into ``target`` on ``session`` with plain options (see
    :func:`parse_options`; ``image``, ``inversion`` and ``resize`` for an edit of a given
    image, see :func:`parse_edit_request`); returns :func:`to_plain` of the result. Serialised
    like :meth:`EditSession.edit` (the prompts are checked inside it, before any model work).

    Raises:
        InputError: bad options, prompts or image, before any model work.
        AdapEditError: an engine folder without a VAE encoder for an image, an engine that
            fails while running.
    """
    r = parse_edit_request({"source": source, "target": target, **options}, where="plain_edit")
    check_resolution(session, r.edit, r.sampler, image=r.image is not None)
    result = session.edit(
        r.source, r.target, r.edit, r.sampler, image=r.image, image_config=r.image_config
    )
    return to_plain(result, session.manifest.model)
