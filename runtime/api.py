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

Every error is an :class:`~adapedit.errors.AdapEditError`; bad options and prompts are
:class:`~adapedit.errors.InputError` (``ConfigError``/``PromptError``), raised before any model
work; an input error's ``field`` names the option or prompt it is about. A :class:`Validator`
makes the same checks up front, from any thread, without waiting for an edit in progress (a
server answers invalid requests at once with it).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import fields
from typing import TYPE_CHECKING, Any

import numpy as np

from adapedit.config import EditConfig, SamplerConfig
from adapedit.errors import ConfigError, EngineError
from adapedit.models import load_tokenizer
from adapedit.plan import build_plan

if TYPE_CHECKING:
    from adapedit.pipeline import EditResult
    from adapedit.runtime.session import EditSession

PROMPT_FIELDS = ("source", "target")
EDIT_FIELDS = tuple(f.name for f in fields(EditConfig))
SAMPLER_FIELDS = tuple(f.name for f in fields(SamplerConfig))
OPTION_FIELDS = EDIT_FIELDS + SAMPLER_FIELDS


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
    options: Mapping[str, Any], *, where: str = "edit options"
) -> tuple[EditConfig, SamplerConfig]:
    """Edit and sampler configurations from plain options named after their fields.

    Omitted fields take the configurations' defaults; ``local_blend`` is a list of words,
    ``reweight`` an object ``{word: factor}`` (or ``[word, factor]`` pairs).

    Raises:
        ConfigError: an unknown field, a value of the wrong JSON type, or one the configurations
            refuse; the message names the field.
    """
    edit: dict[str, Any] = {}
    sampler: dict[str, Any] = {}
    for name, value in options.items():
        if name not in _FIELD_KINDS:
            raise ConfigError(
                f"unknown field {name!r}",
                where=where,
                expected=f"one of {sorted(OPTION_FIELDS)}",
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
    return EditConfig(**edit), SamplerConfig(**sampler)


def check_resolution(session: EditSession, edit: EditConfig, sampler: SamplerConfig) -> None:
    """The sampler's resolution against the model and the engines' profile (no tokenizer: safe
    beside an edit in progress).

    Raises:
        ConfigError: a height or width the model or the engine folder cannot run.
    """
    latent_hw = session.latent_hw(sampler)
    try:
        session.prepare(edit, latent_hw, session.edit_batches(edit))  # checks the engines only
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

    def __call__(self, source: str, target: str, edit: EditConfig, sampler: SamplerConfig) -> None:
        """Check one edit.

        Raises:
            PromptError: a prompt over 77 tokens, a word in neither prompt, replace prompts that
                do not pair up.
            ConfigError: a resolution the model or the engine folder cannot run.
        """
        with self._lock:
            build_plan(self.tokenizer, source, target, edit)
        check_resolution(self.session, edit, sampler)


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


def parse_request(
    request: Mapping[str, Any], *, where: str = "edit request"
) -> tuple[str, str, EditConfig, SamplerConfig]:
    """``(source, target, edit, sampler)`` from one mapping: the prompts ``source`` and
    ``target`` (required strings) and the options of :func:`parse_options`.

    Raises:
        ConfigError: a missing prompt, or an option :func:`parse_options` refuses.
    """
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
    options = {k: v for k, v in request.items() if k not in PROMPT_FIELDS}
    return (*prompts, *parse_options(options, where=where))


def plain_edit(session: EditSession, source: str, target: str, **options: Any) -> dict[str, Any]:
    """Edit ``source`` into ``target`` on ``session`` with plain options (see
    :func:`parse_options`); returns :func:`to_plain` of the result. Serialised like
    :meth:`EditSession.edit` (the prompts are checked inside it, before any model work).

    Raises:
        InputError: bad options or prompts, before any model work.
        AdapEditError: an engine that fails while running.
    """
    source, target, edit, sampler = parse_request(
        {"source": source, "target": target, **options}, where="plain_edit"
    )
    check_resolution(session, edit, sampler)
    return to_plain(session.edit(source, target, edit, sampler), session.manifest.model)
