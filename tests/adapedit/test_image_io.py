"""Reading images to edit: formats, orientation, modes, 16 bits, the resize policies, and every
bad input refused with a clear error naming the image."""

from __future__ import annotations

import io
import re
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from adapedit.errors import InputError
from adapedit.image_io import PAD_FILL, InputImage, decode_image, fit_image, load_image

RNG = np.random.default_rng(0)
PIXELS = RNG.integers(0, 256, (72, 96, 3), dtype=np.uint8)  # [H, W, 3]


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_png_and_lossless_webp_read_back_exactly_and_say_what_they_were():
    for fmt, kw in (("PNG", {}), ("WEBP", {"lossless": True})):
        img = decode_image(encode(Image.fromarray(PIXELS), fmt, **kw))
        assert img.pixels.dtype == np.uint8 and img.pixels.flags.c_contiguous
        assert np.array_equal(img.pixels, PIXELS), fmt
        assert img.info == {"format": fmt, "mode": "RGB", "size": [96, 72], "orientation": None}


def test_jpeg_reads_close_to_its_pixels():
    smooth = np.repeat(np.linspace(0, 255, 96, dtype=np.uint8)[None, :, None], 72, 0)
    smooth = np.repeat(smooth, 3, 2)
    img = decode_image(encode(Image.fromarray(smooth), "JPEG", quality=95))
    assert img.info["format"] == "JPEG" and img.pixels.shape == (72, 96, 3)
    assert np.abs(img.pixels.astype(int) - smooth).max() <= 6


def test_exif_orientation_is_applied():
    stored = np.zeros((64, 80, 3), np.uint8)  # 80 wide, 64 high; red block at the top left
    stored[:8, :8] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90° clockwise
    img = decode_image(encode(Image.fromarray(stored), "PNG", exif=exif))
    assert img.info["orientation"] == 6 and img.info["size"] == [80, 64]
    assert img.pixels.shape == (80, 64, 3)  # upright: 64 wide, 80 high
    assert tuple(img.pixels[0, -1]) == (255, 0, 0)  # the top left went to the top right
    assert tuple(img.pixels[0, 0]) == (0, 0, 0)


def test_alpha_palette_grey_and_cmyk_become_rgb():
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, 32:, 3] = 255  # left half transparent
    img = decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert img.info["mode"] == "RGBA"
    assert tuple(img.pixels[0, 0]) == (255, 255, 255) and tuple(img.pixels[0, 63]) == (200, 0, 0)

    la = Image.fromarray(np.stack([np.full((64, 64), 40, np.uint8), rgba[..., 3]], -1), "LA")
    img = decode_image(encode(la, "PNG"))
    assert tuple(img.pixels[0, 0]) == (255, 255, 255) and tuple(img.pixels[0, 63]) == (40,) * 3

    p = Image.new("P", (64, 64), 1)
    p.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    p.paste(0, (0, 0, 32, 64))
    img = decode_image(encode(p, "PNG", transparency=0))
    assert img.info["mode"] == "P"
    assert tuple(img.pixels[0, 0]) == (255, 255, 255) and tuple(img.pixels[0, 63]) == (10, 200, 30)

    grey = decode_image(encode(Image.new("L", (64, 64), 77), "PNG"))
    assert (grey.pixels == 77).all() and grey.pixels.shape == (64, 64, 3)

    cmyk = decode_image(encode(Image.new("CMYK", (64, 64), (0, 255, 255, 0)), "JPEG"))
    assert cmyk.info["mode"] == "CMYK"
    assert np.abs(cmyk.pixels[32, 32].astype(int) - (255, 0, 0)).max() <= 8  # red


def test_sixteen_bit_grey_is_scaled_to_eight_bits():
    v = np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    img = decode_image(encode(Image.fromarray(v), "PNG"))
    assert img.info["mode"].startswith("I")
    expected = np.round(v / 257.0).astype(np.uint8)
    assert np.array_equal(img.pixels[..., 0], expected) and img.pixels.max() == 255
    assert (img.pixels[..., 0] == img.pixels[..., 2]).all()


def test_arrays_files_and_read_images_are_accepted(tmp_path):
    assert np.array_equal(load_image(PIXELS).pixels, PIXELS)
    path = tmp_path / "in.png"
    path.write_bytes(encode(Image.fromarray(PIXELS), "PNG"))
    from_file = load_image(path)
    assert np.array_equal(from_file.pixels, PIXELS)
    assert load_image(str(path)).info["format"] == "PNG"
    assert load_image(from_file) is from_file


def png_declaring(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` × ``height`` and holds a few bytes of data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 8))


GOOD_PNG = encode(Image.fromarray(PIXELS), "PNG")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"hello, not an image", "not a PNG, JPEG or WebP image"),
        (encode(Image.fromarray(PIXELS), "GIF"), "not a PNG, JPEG or WebP image"),
        (encode(Image.fromarray(PIXELS), "BMP"), "not a PNG, JPEG or WebP image"),
        (GOOD_PNG[: len(GOOD_PNG) // 2], "the image is truncated or corrupt"),
        (encode(Image.fromarray(PIXELS), "JPEG")[:400], "the image is truncated or corrupt"),
        (png_declaring(100_000, 100_000), "too many pixels (decompression bomb)"),
        (png_declaring(12_000, 12_000), "too many pixels (decompression bomb)"),
        (encode(Image.fromarray(PIXELS[:63]), "PNG"), "the image is too small"),
        (encode(Image.fromarray(PIXELS[:, :40]), "PNG"), "got: 40×72"),
    ],
)
@pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")  # the error alone
def test_bad_bytes_are_clear_input_errors(data, message):
    with pytest.raises(InputError, match=re.escape(message)) as e:
        decode_image(data, "upload")
    assert e.value.field == "image" and e.value.where == "upload"
    assert "expected: " in str(e.value) and "got: " in str(e.value)


def test_bad_files_and_arrays_are_clear_input_errors(tmp_path):
    with pytest.raises(InputError, match="cannot read the image file") as e:
        load_image(tmp_path / "missing.png")
    assert e.value.where == str(tmp_path / "missing.png") and e.value.field == "image"
    with pytest.raises(InputError, match="cannot read the image file"):
        load_image(tmp_path)  # a folder
    for array in (PIXELS.astype(np.float32), PIXELS[..., 0], PIXELS[:60]):
        with pytest.raises(InputError, match=r"RGB bytes|too small"):
            load_image(array)
    with pytest.raises(InputError, match="unsupported image value"):
        load_image(3)


SQUARE = InputImage(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8))
WIDE = InputImage(RNG.integers(0, 256, (64, 128, 3), dtype=np.uint8), {"format": "PNG"})


def test_an_image_at_the_target_size_is_used_pixel_for_pixel():
    for policy in ("crop", "pad", "stretch"):
        out, record = fit_image(SQUARE, 64, 64, policy)
        assert np.array_equal(out, SQUARE.pixels), policy
        assert record["resized_to"] == [64, 64] and record["box"] == [0, 0, 64, 64]


def test_crop_pad_and_stretch_bring_a_wide_image_to_the_target():
    out, record = fit_image(WIDE, 64, 64, "crop")
    assert out.shape == (64, 64, 3) and np.array_equal(out, WIDE.pixels[:, 32:96])
    assert record == {
        "format": "PNG",
        "upright_size": [128, 64],
        "resize": "crop",
        "resized_to": [128, 64],
        "box": [32, 0, 96, 64],
        "out_size": [64, 64],
    }
    out, record = fit_image(WIDE, 64, 64, "pad")
    assert record["resized_to"] == [64, 32] and record["box"] == [0, 16, 64, 48]
    assert (out[:16] == PAD_FILL).all() and (out[48:] == PAD_FILL).all()
    assert not (out[16:48] == PAD_FILL).all()
    out, record = fit_image(WIDE, 64, 64, "stretch")
    assert record["resized_to"] == [64, 64] and out.shape == (64, 64, 3)
    big, record = fit_image(WIDE, 128, 192, "crop")  # upscaled to cover 192 × 128
    assert big.shape == (128, 192, 3) and record["resized_to"] == [256, 128]
