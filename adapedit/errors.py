"""One exception hierarchy for the whole project.

Every message reads *what / where / expected / got*, so that a user (or a C++ caller through the
Python bridge) can tell what to fix without reading a traceback. An error about one option or
prompt also carries its name as data (``field``: an option of ``EditConfig``/``SamplerConfig``,
or ``source``/``target`` for the prompts), so a server can name it without parsing the text.
"""

from __future__ import annotations

from typing import Any


class AdapEditError(Exception):
    """Base class of every error raised by adapedit."""

    def __init__(
        self,
        what: str,
        *,
        where: str | None = None,
        expected: Any = None,
        got: Any = None,
        field: str | None = None,
    ) -> None:
        parts = [what]
        if where is not None:
            parts.append(f"where: {where}")
        if expected is not None:
            parts.append(f"expected: {expected}")
        if got is not None:
            parts.append(f"got: {got}")
        super().__init__(" | ".join(parts))
        self.what, self.where, self.expected, self.got = what, where, expected, got
        self.field = field


class InputError(AdapEditError, ValueError):
    """Bad user input: prompts, words, sizes, options."""


class PromptError(InputError):
    """A prompt that cannot be used (too long, word not found, mismatched for replace)."""


class ConfigError(InputError):
    """An invalid configuration value."""


class ModelError(AdapEditError):
    """A model that cannot be loaded (missing folder, missing component, unknown name)."""


class ExportError(AdapEditError):
    """An export that cannot be done (unsupported opset, existing output folder, a graph that
    cannot be cut)."""


class ManifestError(AdapEditError):
    """An export or engine folder whose manifest does not fit (other model, other precision,
    missing file, unknown format)."""


class EngineError(AdapEditError):
    """An engine that cannot be built, loaded or run with the given inputs (wrong feeds, a shape
    outside the built profile, a missing backend)."""
