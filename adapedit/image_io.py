"""The images people edit: PNG, JPEG and WebP read through Pillow, made upright and RGB, and
brought to the model's resolution by a resize policy.

- Formats: PNG, JPEG and WebP only (Pillow parses nothing else, which keeps its rarer decoders
  away from a server's input). An animated file gives its first frame.
- Orientation: the EXIF orientation tag is applied (a phone's portrait photo stays portrait).
- Modes: palette, grey, CMYK and the like become RGB; transparent pixels are composited over
  white; 16-bit grey is scaled to 8 bits (``round(v / 257)``); 16-bit colour PNGs arrive as 8-bit
  from Pillow already.
- Limits: Pillow's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``, about 89 M pixels)
  and a smallest side of :data:`MIN_SIDE` pixels.
- Resize (:func:`fit_image`): ``crop`` scales the image to cover the target and cuts the
  middle out, ``pad`` scales it to fit and fills the rest with mid grey (the zero of the model's
  [-1, 1] pixel range), ``stretch`` scales each side on its own. An image already at the target
  size is used as it is, pixel for pixel.

Every refusal is an :class:`~adapedit.errors.InputError` with ``field`` ``image``.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from adapedit.errors import InputError

#: The smallest side accepted, in pixels.
MIN_SIDE = 64
#: What Pillow may decode.
FORMATS = ("PNG", "JPEG", "WEBP")
#: The fill of ``pad``: mid grey, the zero of the model's pixel range.
PAD_FILL = (128, 128, 128)
#: What transparent pixels are composited over.
ALPHA_BACKGROUND = (255, 255, 255)
_SIXTEEN_BIT = ("I", "I;16", "I;16B", "I;16L", "I;16N")
_ORIENTATION = 0x0112  # the EXIF tag


@dataclass(frozen=True, eq=False)
class InputImage:
    """An image read for editing.

    Attributes:
        pixels: uint8 [H, W, 3], C-contiguous, upright (EXIF orientation applied).
        info: where it came from: ``format``, ``mode`` and ``size`` ([width, height]) as
            stored, ``orientation`` (the EXIF tag, or None).
    """

    pixels: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)


def _error(what: str, where: str, expected: Any, got: Any) -> InputError:
    return InputError(what, where=where, expected=expected, got=got, field="image")


def _check_side(height: int, width: int, where: str) -> None:
    if min(height, width) < MIN_SIDE:
        raise _error(
            "the image is too small",
            where,
            f"at least {MIN_SIDE} pixels on each side",
            f"{width}×{height}",
        )


def _to_rgb(im) -> np.ndarray:
    """A decoded Pillow image of any mode → uint8 [H, W, 3]."""
    from PIL import Image

    if im.mode in _SIXTEEN_BIT:  # 16-bit grey (or 32-bit integer grey read as 16-bit)
        v = np.asarray(im).astype(np.float64)  # [H, W]
        grey = np.clip(np.round(v / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        im.mode == "P" and "transparency" in im.info
    )
    if has_alpha:
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        im = Image.alpha_composite(canvas, rgba)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def decode_image(data: bytes, where: str = "image", *, max_pixels: int | None = None) -> InputImage:
    """Decode an encoded PNG, JPEG or WebP image.

    ``max_pixels`` lowers the limit on width × height below Pillow's decompression-bomb limit
    (``PIL.Image.MAX_IMAGE_PIXELS``, the default), e.g. for a server's memory per request.

    Raises:
        InputError: not one of those formats, a truncated or corrupt file, more pixels than
            the limit, a side under :data:`MIN_SIDE` pixels.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    got = f"{len(data)} bytes"
    try:
        with warnings.catch_warnings():  # an image over the limit is refused below, by name
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as e:
        raise _error(
            "the image has too many pixels (decompression bomb)",
            where,
            f"at most {Image.MAX_IMAGE_PIXELS} pixels (Pillow's limit)",
            str(e),
        ) from None
    except UnidentifiedImageError:
        head = data[:8]
        raise _error(
            "not a PNG, JPEG or WebP image", where, " | ".join(FORMATS), f"{got}: {head!r}…"
        ) from None
    except Exception as e:  # a header cut short or broken: the file's fault
        raise _error(
            "the image is truncated or corrupt",
            where,
            f"a complete {' | '.join(FORMATS)} file",
            f"{got}: {type(e).__name__}: {e}",
        ) from None
    w, h = im.size
    limits = [x for x in (Image.MAX_IMAGE_PIXELS, max_pixels) if x]  # None or 0: no limit
    limit = min(limits) if limits else None
    if limit and w * h > limit:  # Pillow only warns between its limit and twice it
        raise _error(
            "the image has too many pixels (decompression bomb)",
            where,
            f"at most {limit} pixels",
            f"{w}×{h} = {w * h} pixels",
        )
    _check_side(h, w, where)
    info = {
        "format": im.format,
        "mode": im.mode,
        "size": [w, h],
        "orientation": None,
    }
    try:
        im.load()
        orientation = im.getexif().get(_ORIENTATION)
        upright = ImageOps.exif_transpose(im)
        pixels = _to_rgb(upright)
    except Exception as e:  # truncated data, a broken stream, a corrupt chunk
        raise _error(
            "the image is truncated or corrupt",
            where,
            f"a complete {im.format} file",
            f"{got}: {type(e).__name__}: {e}",
        ) from None
    info["orientation"] = orientation
    return InputImage(np.ascontiguousarray(pixels), info)


def load_image(image: str | Path | bytes | np.ndarray | InputImage) -> InputImage:
    """An image to edit from a file path, encoded bytes (PNG, JPEG, WebP), a uint8 array
    [H, W, 3] (taken as it is) or an :class:`InputImage` (returned as it is).

    Raises:
        InputError: a file that cannot be read, or anything :func:`decode_image` refuses; an
            array that is not uint8 [H, W, 3].
    """
    if isinstance(image, InputImage):
        return image
    if isinstance(image, np.ndarray):
        where = "image array"
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise _error(
                "an image array must be RGB bytes",
                where,
                "uint8 [H, W, 3]",
                f"{image.dtype} {list(image.shape)}",
            )
        _check_side(image.shape[0], image.shape[1], where)
        h, w = image.shape[:2]
        info = {"format": "array", "mode": "RGB", "size": [w, h], "orientation": None}
        return InputImage(np.ascontiguousarray(image), info)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return decode_image(bytes(image), "image bytes")
    if isinstance(image, (str, Path)):
        path = Path(image)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise _error(
                "cannot read the image file", str(path), "a readable file", e.strerror or repr(e)
            ) from None
        return decode_image(data, str(path))
    raise _error(
        "unsupported image value",
        "image",
        "a path, encoded bytes or a uint8 array [H, W, 3]",
        type(image).__name__,
    )


def fit_image(
    image: InputImage, height: int, width: int, policy: str
) -> tuple[np.ndarray, dict[str, Any]]:
    """``image`` at ``height`` × ``width`` by ``policy`` (``crop``, ``pad`` or ``stretch``).

    Returns:
        pixels: uint8 [height, width, 3].
        record: what was done, for ``result.json``: the input's ``format``, ``mode``,
            ``size`` and ``orientation``, ``upright_size``, ``resize`` (the policy),
            ``resized_to`` ([w, h] after scaling), ``box`` ([left, top, right, bottom]: for
            ``crop`` the part of the scaled image kept, for ``pad`` where it sits in the
            output) and ``out_size`` ([width, height]).
    """
    from PIL import Image

    pixels = image.pixels
    h0, w0 = pixels.shape[:2]
    if policy == "crop":
        s = max(height / h0, width / w0)
        sw, sh = max(width, round(w0 * s)), max(height, round(h0 * s))
    elif policy == "pad":
        s = min(height / h0, width / w0)
        sw, sh = min(width, max(1, round(w0 * s))), min(height, max(1, round(h0 * s)))
    else:
        sw, sh = width, height
    scaled = Image.fromarray(pixels)
    if (sw, sh) != (w0, h0):
        scaled = scaled.resize((sw, sh), Image.Resampling.LANCZOS)
    left, top = abs(sw - width) // 2, abs(sh - height) // 2
    if policy == "pad":
        canvas = Image.new("RGB", (width, height), PAD_FILL)
        canvas.paste(scaled, (left, top))
        box = [left, top, left + sw, top + sh]
    else:
        box = [left, top, left + width, top + height]
        canvas = scaled.crop(box)
    out = np.ascontiguousarray(np.asarray(canvas, dtype=np.uint8))
    record = {
        **image.info,
        "upright_size": [w0, h0],
        "resize": policy,
        "resized_to": [sw, sh],
        "box": box,
        "out_size": [width, height],
    }
    return out, record
