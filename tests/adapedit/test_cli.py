"""The ``adapedit edit`` command: outputs, and bad input that leaves nothing behind."""

from __future__ import annotations

import json

import pytest

from adapedit.cli import main
from adapedit.pipelines.pipeline import ReferencePipeline
from adapedit.spec import Manifest
from tests.adapedit.test_image_io import png_declaring

SRC, TGT = "a dog standing on the grass", "a dog sitting on the grass"


@pytest.fixture(autouse=True)
def _reuse_tiny(monkeypatch, tiny_pipeline):
    monkeypatch.setattr(
        ReferencePipeline, "from_model", classmethod(lambda cls, *a, **k: tiny_pipeline)
    )


def test_edit_writes_images_attention_and_json(tmp_path, tiny_pipeline):
    out = tmp_path / "o"
    assert (
        main(
            [
                "edit",
                SRC,
                TGT,
                "--model",
                "tiny",
                "--steps",
                "4",
                "--quiet",
                "--alpha-m",
                "0",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "attention.png",
        "edited.png",
        "result.json",
        "source.png",
    ]
    doc = json.loads((out / "result.json").read_text())
    assert [t["word"] for t in doc["tau"]] == ["a", "dog", "sitting", "on", "the", "grass"]
    assert doc["tau"][2] == {"word": "sitting", "tokens": [3], "tau": 0.0}
    assert doc["keywords"] == ["sitting"]
    assert 0.0 <= doc["tau_self"] <= 1.0
    assert doc["config"]["sampler"]["steps"] == 4 and doc["config"]["edit"]["alpha_m"] == 0.0
    side = tiny_pipeline.default_size  # no --height or --width: the size that ran, recorded
    assert (doc["config"]["sampler"]["height"], doc["config"]["sampler"]["width"]) == (side, side)
    assert set(doc["timings_s"]) >= {"calibration", "edit", "decode", "total"}


LONG = " ".join(["dog"] * 80)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([LONG, TGT], "prompt is too long"),
        (["a red dog", "a blue big dog", "--edit-type", "replace"], "same number of words"),
        ([SRC, TGT, "--local-blend", "cat"], "local-blend word 'cat'"),
        ([SRC, SRC, "--edit-type", "reweight", "--reweight", "cat=2"], "word 'cat' is not in"),
        ([SRC, TGT, "--height", "100"], "multiple of 8"),
        ([SRC, TGT, "--height", "72"], "multiple of 64"),
        ([SRC, TGT, "--lambda-s", "1.5"], "lambda_s is out of range"),
        ([SRC, TGT, "--calibration-steps", "3"], "calibration_steps exceeds the edit's steps"),
        ([SRC, TGT, "--calibration-steps", "0"], "calibration_steps must be a positive"),
        ([SRC, TGT, "--device", "cdua"], "unknown device | where: adapedit edit --device"),
        ([SRC, TGT, "--device", "cuda:99"], "device cuda:99 is not available"),
        ([SRC, TGT, "--device", "meta"], "unsupported device"),
    ],
)
def test_bad_input_is_a_clear_error_with_no_output(
    tmp_path, capsys, forbid_model_work, args, message
):
    out = tmp_path / "o"
    assert main(["edit", *args, "--steps", "2", "--quiet", "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
    assert forbid_model_work == []  # refused before any model work


@pytest.mark.parametrize("command", ["edit", "demo"])
def test_an_output_folder_that_cannot_be_made_is_refused_before_model_work(
    tmp_path, capsys, forbid_model_work, command
):
    """A file where the output folder would be (or above it) is exit 2 before any model loads
    or runs, not an internal error once the edit is done."""
    (tmp_path / "afile").write_text("mine")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    prompts = [SRC, TGT] if command == "edit" else []
    for out, got in (
        ("afile", "afile is a file"),
        ("afile/sub", "afile is a file"),
        ("dangling", "dangling is a link to nothing"),
    ):
        args = [command, *prompts, "--steps", "2", "--quiet", "--out", str(tmp_path / out)]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "the output folder cannot be made" in err and str(tmp_path / got) in err
        assert f"where: adapedit {command} --out" in err
    assert (tmp_path / "afile").read_text() == "mine" and not (tmp_path / "nowhere").exists()
    assert forbid_model_work == []


@pytest.mark.parametrize("where", ["before", "after"])
def test_an_internal_error_is_exit_1_with_its_traceback_under_debug(
    tmp_path, capsys, monkeypatch, tiny_pipeline, where
):
    def boom(*a, **k):
        raise ValueError("not an input problem")  # a bug, not bad input

    monkeypatch.setattr(tiny_pipeline, "edit", boom)
    args = ["edit", SRC, TGT, "--quiet", "--out", str(tmp_path / "o")]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "internal error: ValueError: not an input problem" in err and "--debug" in err
    assert "Traceback" not in err
    assert main(["--debug", *args] if where == "before" else [*args, "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_an_engine_folder_under_another_rule_is_exit_2_naming_both(
    tmp_path, capsys, tiny_engines, forbid_model_work
):
    out = tmp_path / "o"
    args = ["edit", SRC, TGT, "--engine-dir", str(tiny_engines), "--steps", "2", "--quiet"]
    assert main([*args, "--attention-limits", "p2p-literal", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "exported under another attention rule" in err
    assert "'scaled' (the folder's)" in err and "'p2p-literal' (the edit's)" in err
    assert not out.exists() and forbid_model_work == []
    with pytest.raises(SystemExit):
        main([*args, "--attention-limits", "p2p", "--out", str(out)])
    assert "invalid choice: 'p2p'" in capsys.readouterr().err


def test_bad_reweight_syntax_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        main(["edit", SRC, SRC, "--edit-type", "reweight", "--reweight", "grass"])
    assert "WORD=FACTOR" in capsys.readouterr().err


def test_build_then_edit_through_the_engine_folder(tiny_export, tmp_path, monkeypatch):
    monkeypatch.undo()  # the runtime does not use the reference pipeline
    engines = tmp_path / "engines"
    assert main(["build", str(tiny_export[0]), "--out", str(engines), "--quiet"]) == 0
    assert (engines / "engine.json").is_file()
    assert main(["build", str(tiny_export[0]), "--out", str(engines), "--quiet"]) == 2
    out = tmp_path / "o"
    assert (
        main(
            [
                "edit",
                SRC,
                TGT,
                "--engine-dir",
                str(engines),
                "--steps",
                "3",
                "--quiet",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    doc = json.loads((out / "result.json").read_text())
    assert doc["model"] == "tiny" and doc["keywords"] == ["sitting"]
    bad = tmp_path / "o2"
    assert (
        main(
            [
                "edit",
                SRC,
                TGT,
                "--engine-dir",
                str(engines),
                "--steps",
                "2",
                "--quiet",
                "--height",
                "256",
                "--out",
                str(bad),
            ]
        )
        == 2
    )
    assert not bad.exists()


@pytest.mark.slow
def test_demo_writes_both_edits_and_a_parity_summary(tmp_path, capsys, monkeypatch):
    monkeypatch.undo()
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "3", "--quiet"]) == 0
    for side in ("runtime", "reference"):
        assert sorted(p.name for p in (out / side).iterdir()) == [
            "attention.png",
            "edited.png",
            "result.json",
            "source.png",
        ]
    doc = json.loads((out / "demo.json").read_text())
    assert doc["model"] == "shapes"  # the embedded default, read back by the attribute reader
    assert set(doc["read_back"]) == {"source", "edited"}
    assert doc["parity"]["latents_max_abs"] <= 1e-4
    assert doc["parity"]["psnr_edited_db"] >= 50
    std = capsys.readouterr()
    assert "Parity" in (out / "demo.md").read_text() and "Parity" in std.out
    assert "Loading weights" not in std.err  # --quiet: no library's progress bar either
    # the engines it keeps edit given images too (their inversion runs at batch 1)
    assert Manifest.load(out / "engines").batches == (1, 2, 4)


@pytest.fixture()
def images(tmp_path, photo, png):
    """Image files for ``--image``: a good one, and one of each kind of bad one."""
    good = png(photo(128))
    files = {
        "good.png": good,
        "text.png": b"just some text",
        "cut.png": good[: len(good) // 2],
        "bomb.png": png_declaring(10**5, 10**5),  # 10¹⁰ pixels declared
        "small.png": png(photo(48)),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return tmp_path


IMG_SRC, IMG_TGT = "a big red circle on the left", "a big blue circle on the left"


def test_edit_of_a_given_image_writes_it_at_the_models_size_and_records_it(images):
    out = images / "o"
    args = ["edit", IMG_SRC, IMG_TGT, "--image", str(images / "good.png"), "--inversion", "npi"]
    assert main([*args, "--resize", "pad", "--steps", "2", "--quiet", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "attention.png",
        "edited.png",
        "input.png",
        "result.json",
        "source.png",
    ]
    doc = json.loads((out / "result.json").read_text())
    assert doc["image"]["inversion"] == "npi" and doc["image"]["resize"] == "pad"
    assert doc["image"]["format"] == "PNG" and doc["image"]["out_size"] == [128, 128]
    assert "inversion" in doc["timings_s"]


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--image", "text.png"], "not a PNG, JPEG or WebP image"),
        (["--image", "cut.png"], "the image is truncated or corrupt"),
        (["--image", "bomb.png"], "decompression bomb"),
        (["--image", "small.png"], "the image is too small"),
        (["--image", "missing.png"], "cannot read the image file"),
        (["--image", "."], "cannot read the image file"),
        (["--image", "good.png", "--inversion", "null-text"], "unknown inversion"),
        (["--image", "good.png", "--resize", "zoom"], "unknown resize"),
        (["--image", "good.png", "--scheduler", "pndm"], "needs the DDIM scheduler"),
        (  # a preset's scheduler, not one asked for: the message names the preset
            ["--image", "good.png", "--preset", "fast", "--calibration-steps", "2"],
            "preset 'fast' samples with dpmpp",
        ),
        (["--inversion", "ddim"], "--inversion is only for an edit of a given image"),
    ],
)
def test_bad_image_input_is_a_clear_error_with_no_output(
    images, capsys, monkeypatch, forbid_model_work, args, message
):
    monkeypatch.chdir(images)
    out = images / "o"
    assert (
        main(["edit", IMG_SRC, IMG_TGT, *args, "--steps", "2", "--quiet", "--out", str(out)]) == 2
    )
    err = capsys.readouterr().err
    assert message in err and "where: " in err and "got: " in err
    assert not out.exists()
    assert forbid_model_work == []  # no text encoder, VAE or UNet ran before the refusal


def test_a_preset_sets_steps_scheduler_and_calibration_and_options_override_it(tmp_path):
    from adapedit.config import PRESETS

    fast = PRESETS["fast"]
    out = tmp_path / "fast"
    assert main(["edit", SRC, TGT, "--preset", "fast", "--quiet", "--out", str(out)]) == 0
    doc = json.loads((out / "result.json").read_text())
    assert doc["config"]["sampler"]["steps"] == fast.steps
    assert doc["config"]["sampler"]["scheduler"] == fast.scheduler
    assert doc["config"]["edit"]["calibration_steps"] == fast.calibration_steps
    out = tmp_path / "over"
    args = ["--preset", "fast", "--steps", "3", "--calibration-steps", "2", "--scheduler", "ddim"]
    assert main(["edit", SRC, TGT, *args, "--quiet", "--out", str(out)]) == 0
    doc = json.loads((out / "result.json").read_text())
    assert doc["config"]["sampler"]["steps"] == 3
    assert doc["config"]["sampler"]["scheduler"] == "ddim"
    assert doc["config"]["edit"]["calibration_steps"] == 2
    assert doc["calibration"] in ("computed", "cached")


def test_an_unknown_preset_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as e:
        main(["edit", SRC, TGT, "--preset", "fastest"])
    assert e.value.code == 2 and "invalid choice: 'fastest'" in capsys.readouterr().err
