"""Writing results: atomic file writes (nothing half-written is ever left behind) and the
standard outputs of an edit (``source.png``, ``edited.png``, ``attention.png``, ``result.json``)."""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from PIL import Image

from adapedit.errors import ConfigError


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_output_folder(out: str | Path, where: str) -> Path:
    """``out`` as a folder to write into, refused before any work when it cannot be one: it, or
    the nearest path above it that exists, is a file (or a link to nothing), or cannot be
    written.

    Raises:
        ConfigError: naming the path in the way.
    """
    out = Path(out)
    for p in (out, *out.parents):
        if not os.path.lexists(p):
            continue
        if not p.is_dir():  # a file, or a link to none (which a write would fail on too)
            kind = "a link to nothing" if not p.exists() else "a file"
            raise ConfigError(
                "the output folder cannot be made",
                where=where,
                expected="a folder, or a path that does not exist yet",
                got=f"{p} is {kind}",
            )
        if not os.access(p, os.W_OK | os.X_OK):
            raise ConfigError(
                "the output folder cannot be written",
                where=where,
                expected="a folder this user can write",
                got=f"{p} is not writable",
            )
        break
    return out


@contextmanager
def atomic_folder(out: str | Path) -> Iterator[Path]:
    """A temporary folder beside ``out``, renamed to ``out`` when the block succeeds and removed
    when it fails (or is interrupted): nothing half-written ever looks complete."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    try:
        yield tmp
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def write_json(path: str | Path, doc: Any) -> None:
    atomic_write_bytes(path, (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode())


def write_edit_outputs(result, out_dir: str | Path, model: str) -> dict[str, Path]:
    """Write an :class:`~adapedit.pipelines.pipeline.EditResult`'s four files into ``out_dir`` (five
    for an edit of a given image: ``input.png``, the image at the model's resolution, too)."""
    from adapedit.visualize import attention_grid

    out = Path(out_dir)
    files = {
        name: out / name for name in ("source.png", "edited.png", "attention.png", "result.json")
    }
    grid = attention_grid(result.attention_maps, result.attention_labels, result.edited_image)
    if result.input_image is not None:
        files["input.png"] = out / "input.png"
        atomic_write_bytes(files["input.png"], png_bytes(Image.fromarray(result.input_image)))
    atomic_write_bytes(files["source.png"], png_bytes(Image.fromarray(result.source_image)))
    atomic_write_bytes(files["edited.png"], png_bytes(Image.fromarray(result.edited_image)))
    atomic_write_bytes(files["attention.png"], png_bytes(grid))
    write_json(files["result.json"], result.to_json(model))
    return files
