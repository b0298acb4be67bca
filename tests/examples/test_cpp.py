"""examples/cpp: built with CMake against this Python, run on the tiny engines (CPU)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adapedit.runtime.api import plain_edit

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "cpp"
SRC, TGT = "a dog standing on the grass", "a dog sitting on the grass"
CXX = next((c for c in ("c++", "g++", "clang++") if shutil.which(c)), None)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake"),
    pytest.mark.skipif(CXX is None and "CXX" not in os.environ, reason="needs a C++ compiler"),
]


def bare_env() -> dict[str, str]:
    """The environment without any hint of the virtualenv: the program finds it by itself."""
    drop = ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "ADAPEDIT_PYTHON")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PATH"] = "/usr/bin:/bin"
    return env


@pytest.fixture(scope="module")
def program(tmp_path_factory) -> Path:
    build = tmp_path_factory.mktemp("cpp-build")
    subprocess.run(
        ["cmake", "-S", EXAMPLE, "-B", build, f"-DPython_EXECUTABLE={sys.executable}"],
        check=True,
        capture_output=True,
    )
    subprocess.run(["cmake", "--build", build, "-j", "2"], check=True, capture_output=True)
    return build / "adapedit_cpp"


def run(program: Path, *args: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [program, *map(str, args)], capture_output=True, text=True, env=bare_env(), timeout=120
    )


def test_cpp_images_equal_the_python_api(program, tiny_engines, tiny_session, tmp_path):
    p = run(program, tiny_engines, SRC, TGT, tmp_path, 2, 5)
    assert p.returncode == 0, p.stderr
    assert "τ: a=" in p.stdout and "128×128 px" in p.stdout
    ref = plain_edit(tiny_session, SRC, TGT, steps=2, seed=5)
    for name in ("source", "edited"):
        with Image.open(tmp_path / f"{name}.png") as im:
            assert im.mode == "RGB"
            assert np.array_equal(np.asarray(im), ref[f"{name}_image"]), name


def test_cpp_turns_a_python_error_into_a_message_and_exit_code(program, tiny_engines, tmp_path):
    p = run(program, tiny_engines, " ".join(["dog"] * 80), TGT, tmp_path / "out", 2)
    assert p.returncode == 2
    assert "adapedit_cpp: error: PromptError: prompt is too long | where: source prompt" in p.stderr
    assert "expected: at most 77 tokens, start and end tokens included | got: 82 tokens" in p.stderr
    assert not (tmp_path / "out").exists()
    p = run(program, tmp_path / "no-engines", SRC, TGT, tmp_path / "out")
    assert p.returncode == 1 and "ManifestError: not an engine folder" in p.stderr
    p = run(program, tiny_engines, SRC, TGT, tmp_path / "out", "two")
    assert p.returncode == 2 and "STEPS must be an integer, got 'two'" in p.stderr


def test_cpp_edits_an_image_file_like_the_python_api(
    program, tiny_engines, tiny_session, tmp_path, photo
):
    src, tgt = "a big red circle on the left", "a big blue circle on the left"
    image = tmp_path / "in.png"
    Image.fromarray(photo(128)).save(image)
    out = tmp_path / "out"
    p = run(program, tiny_engines, src, tgt, out, 2, 5, "--image", image, "--inversion", "npi")
    assert p.returncode == 0, p.stderr
    assert "128×128 px" in p.stdout
    ref = plain_edit(
        tiny_session, src, tgt, steps=2, seed=5, image=image.read_bytes(), inversion="npi"
    )
    for name in ("source", "edited"):
        with Image.open(out / f"{name}.png") as im:
            assert np.array_equal(np.asarray(im), ref[f"{name}_image"]), name


def test_cpp_refuses_a_bad_image_with_exit_2_and_writes_nothing(program, tiny_engines, tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    out = tmp_path / "out"
    p = run(program, tiny_engines, SRC, TGT, out, 2, "--image", tmp_path / "notes.png")
    assert p.returncode == 2
    assert (
        "InputError: not a PNG, JPEG or WebP image | where: plain_edit: field 'image'" in p.stderr
    )
    p = run(program, tiny_engines, SRC, TGT, out, 2, "--image", tmp_path / "missing.png")
    assert p.returncode == 2 and "cannot read the image file" in p.stderr
    p = run(program, tiny_engines, SRC, TGT, out, "--inversion", "ddim")
    assert p.returncode == 2 and "usage:" in p.stderr
    assert not out.exists()


def test_cpp_passes_calibration_steps_and_its_refusal(
    program, tiny_engines, tiny_session, tmp_path
):
    p = run(program, tiny_engines, SRC, TGT, tmp_path, 3, 5, "--calibration-steps", 1)
    assert p.returncode == 0, p.stderr
    assert "calibration computed" in p.stdout
    ref = plain_edit(tiny_session, SRC, TGT, steps=3, seed=5, calibration_steps=1)
    with Image.open(tmp_path / "edited.png") as im:
        assert np.array_equal(np.asarray(im), ref["edited_image"])
    p = run(program, tiny_engines, SRC, TGT, tmp_path / "out", 3, "--calibration-steps", 4)
    assert p.returncode == 2 and "calibration_steps exceeds the edit's steps" in p.stderr
    assert not (tmp_path / "out").exists()
    p = run(program, tiny_engines, SRC, TGT, tmp_path / "out", 3, "--calibration-steps", 0)
    assert p.returncode == 2 and "calibration_steps must be a positive integer" in p.stderr
