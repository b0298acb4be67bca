"""The embedding surface: ``from adapedit import EditSession``, plain options and plain results."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from adapedit.config import EditConfig, SamplerConfig
from adapedit.errors import ConfigError, InputError, PromptError
from adapedit.runtime.api import (
    OPTION_FIELDS,
    Validator,
    parse_edit_request,
    parse_options,
    parse_request,
    plain_edit,
)

SRC, TGT = "a dog standing on the grass", "a dog sitting on the grass"
LONG = " ".join(["dog"] * 80)


def test_import_is_lazy_and_gives_the_session_class():
    code = (
        "import sys, adapedit; assert 'torch' not in sys.modules, 'torch imported'; "
        "assert 'adapedit.runtime.session' not in sys.modules; "
        "from adapedit import EditSession; "
        "from adapedit.runtime.session import EditSession as S; assert EditSession is S"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    import adapedit

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        adapedit.nope  # noqa: B018


def test_parse_options_maps_plain_values_onto_the_configs():
    edit, sampler = parse_options(
        {
            "steps": 3,
            "seed": 7,
            "guidance": 5,
            "scheduler": "pndm",
            "height": None,
            "lambda_s": 0.5,
            "use_fwt": False,
            "local_blend": ["dog"],
        }
    )
    assert sampler == SamplerConfig(steps=3, seed=7, guidance=5.0, scheduler="pndm")
    assert edit == EditConfig(lambda_s=0.5, use_fwt=False, local_blend=("dog",))
    assert isinstance(sampler.guidance, float)
    for reweight in ({"grass": 2}, [["grass", 2.0]]):
        edit, _ = parse_options({"edit_type": "reweight", "reweight": reweight})
        assert edit.reweight == (("grass", 2.0),)
    assert parse_options({}) == (EditConfig(), SamplerConfig())


def test_a_preset_gives_steps_scheduler_and_calibration_and_fields_override_it():
    from adapedit.config import PRESETS

    for name, p in PRESETS.items():
        edit, sampler = parse_options({"preset": name, "lambda_s": 0.5})
        assert (sampler.steps, sampler.scheduler) == (p.steps, p.scheduler)
        assert edit == EditConfig(lambda_s=0.5, calibration_steps=p.calibration_steps)
    edit, sampler = parse_options({"preset": "fast", "steps": 8, "calibration_steps": None})
    assert sampler.steps == 8 and edit.calibration_steps is None


@pytest.mark.parametrize(
    ("options", "field", "match"),
    [
        ({"stepz": 3}, "stepz", "unknown field 'stepz'"),
        ({"steps": "four"}, "steps", "field 'steps' has the wrong type"),
        ({"steps": True}, "steps", "wrong type"),
        ({"use_dps": 1}, "use_dps", "expected: true or false"),
        ({"local_blend": "dog"}, "local_blend", "a list of words"),
        ({"reweight": {"grass": "2"}}, "reweight", "word: factor"),
        ({"lambda_s": 3.0}, "lambda_s", "lambda_s is out of range"),
        ({"steps": 0}, "steps", "steps out of range"),
        ({"scheduler": "no-such"}, "scheduler", "unknown scheduler"),
        ({"width": 100}, "width", "multiple of 8"),
        ({"edit_type": "reweight"}, "edit_type", "needs at least one word"),
        ({"reweight": {"grass": 2.0}}, "reweight", "edit_type is not 'reweight'"),
        ({"calibration_steps": 0}, "calibration_steps", "must be a positive integer"),
        ({"calibration_steps": 51}, "calibration_steps", r"≤ steps \(50\)"),
        ({"calibration_steps": "5"}, "calibration_steps", "an integer or null"),
        ({"preset": "fastest"}, "preset", "unknown preset"),
        ({"preset": 1}, "preset", "wrong type"),
        ({"preset": "fast", "steps": 2}, "calibration_steps", "exceeds the edit's steps"),
    ],
)
def test_bad_options_raise_config_errors_naming_the_field(options, field, match):
    with pytest.raises(ConfigError, match=match) as e:
        parse_options(options)
    assert e.value.field == field


def test_an_unknown_fields_error_lists_every_field_the_caller_takes():
    """The image's fields beside the options where the request may carry an image, the prompts
    wherever it has them (the list named the options alone)."""
    request = {"source": SRC, "target": TGT, "stepz": 3}
    for parse, fields in (
        (parse_edit_request, {"image", "inversion", "resize"}),
        (parse_request, set()),
    ):
        with pytest.raises(ConfigError, match="unknown field 'stepz'") as e:
            parse(request)
        listed = set(ast.literal_eval(e.value.expected.removeprefix("one of ")))
        assert listed == {*OPTION_FIELDS, "source", "target", *fields}


def test_parse_request_needs_both_prompts_as_strings():
    assert parse_request({"source": SRC, "target": TGT})[:2] == (SRC, TGT)
    for request, field in (({"source": SRC}, "target"), ({"source": 1, "target": TGT}, "source")):
        with pytest.raises(ConfigError, match=f"field '{field}'") as e:
            parse_request(request)
        assert e.value.field == field


@pytest.mark.parametrize(
    ("source", "target", "options", "error", "field"),
    [
        (LONG, TGT, {}, PromptError, "source"),
        (SRC, LONG, {}, PromptError, "target"),
        (SRC, TGT, {"local_blend": ["cat"]}, PromptError, "local_blend"),
        (SRC, TGT, {"edit_type": "reweight", "reweight": {"cat": 2}}, PromptError, "reweight"),
        (SRC, "a cat", {"edit_type": "replace"}, PromptError, "source"),
        (SRC, TGT, {"height": 256}, ConfigError, "height"),  # outside the engines' profile
        (SRC, TGT, {"width": 120}, ConfigError, "width"),  # not a multiple of the model's 64
    ],
)
def test_bad_input_is_refused_before_model_work(
    tiny_session, source, target, options, error, field, forbid_model_work
):
    edit, sampler = parse_options(options)
    with pytest.raises(error) as e:
        Validator(tiny_session)(source, target, edit, sampler)
    assert isinstance(e.value, InputError)
    assert e.value.field == field
    with pytest.raises(error):
        plain_edit(tiny_session, source, target, **options)
    assert forbid_model_work == []


def test_plain_edit_equals_the_session_result(tiny_session):
    options = {"steps": 2, "seed": 4, "lambda_s": 0.8, "local_blend": ["dog"]}
    plain = plain_edit(tiny_session, SRC, TGT, **options)
    edit, sampler = parse_options(options)
    ref = tiny_session.edit(SRC, TGT, edit, sampler)
    for key, image in (("source_image", ref.source_image), ("edited_image", ref.edited_image)):
        assert plain[key].dtype == np.uint8 and plain[key].flags.c_contiguous
        assert plain[key].shape == (128, 128, 3)
        assert np.array_equal(plain[key], image)
    assert plain["tau"] == [
        {"word": w.word, "tokens": list(w.tokens), "tau": w.tau} for w in ref.tau.words
    ]
    assert plain["tau_self"] == ref.tau.tau_self and plain["keywords"] == ref.keywords
    assert (plain["source"], plain["target"], plain["model"]) == (SRC, TGT, "tiny")
    assert plain["config"]["sampler"]["steps"] == 2
    assert set(plain["timings_s"]) >= {"text", "calibration", "edit", "decode", "total"}
    rest = {k: v for k, v in plain.items() if not k.endswith("_image")}
    assert json.loads(json.dumps(rest)) == rest  # JSON-able as it is


def test_plain_edit_from_threads_is_serialised(tiny_session):
    jobs = [(SRC, TGT, 1), ("a cat on a mat", "a black cat on a mat", 2)]
    alone = [plain_edit(tiny_session, s, t, steps=1, seed=k) for s, t, k in jobs]
    with ThreadPoolExecutor(4) as pool:
        futures = [
            pool.submit(plain_edit, tiny_session, s, t, steps=1, seed=k) for s, t, k in jobs * 2
        ]
        results = [f.result() for f in futures]  # re-raises what a thread raised
    assert len(results) == 4
    for i, r in enumerate(results):
        assert np.array_equal(r["edited_image"], alone[i % 2]["edited_image"])
        assert r["tau"] == alone[i % 2]["tau"]


def test_validator_beside_an_edit_disturbs_neither(tiny_session, monkeypatch):
    """The validator has its own tokenizer: one shared with the session between threads would
    mix padding and truncation settings (a long prompt read as 77 tokens, an edit's token ids
    unpadded). The interleaving is forced, not left to thread timing: each side is held inside
    its own tokenization, after the tokenizer took that call's settings and before it encodes,
    while the other side tokenizes in full. Mutation check: a validator on the session's
    tokenizer fails each half of this test, every time."""
    validate = Validator(tiny_session)
    prompts = ["", SRC, TGT]
    expected = tiny_session.tokens(prompts)
    assert expected.shape == (3, 77)
    tokenizer_class = type(tiny_session.tokenizer)
    assert type(validate.tokenizer) is tokenizer_class
    settle = tokenizer_class.set_truncation_and_padding  # what the encoding then reads
    held: dict[str, threading.Thread | None] = {"thread": None}
    inside, other_done = threading.Event(), threading.Event()

    def set_and_hold(self, *args, **kwargs):
        settle(self, *args, **kwargs)
        if threading.current_thread() is held["thread"] and not inside.is_set():
            inside.set()  # this side's settings are in place; the other side runs now
            assert other_done.wait(30), "the other side did not finish"

    monkeypatch.setattr(tokenizer_class, "set_truncation_and_padding", set_and_hold)

    def validate_long() -> str:
        try:
            validate(LONG, TGT, *parse_options({}))
        except PromptError as e:
            return "ok" if "got: 82 tokens" in str(e) else str(e)
        return "long prompt accepted"

    def beside(held_side, other_side) -> list:
        """``held_side`` in a thread, held inside its tokenization while ``other_side`` runs
        in full; the outcomes of both."""
        inside.clear()
        other_done.clear()
        out: list = [None, None]

        def run_held() -> None:
            try:
                out[0] = held_side()
            except BaseException as e:  # re-raised below, in the test's thread
                out[0] = e

        th = threading.Thread(target=run_held)
        held["thread"] = th
        th.start()
        try:
            assert inside.wait(30), "the held side never reached its tokenization"
            out[1] = other_side()
        finally:
            other_done.set()
            th.join(60)
            held["thread"] = None
        assert not th.is_alive()
        if isinstance(out[0], BaseException):
            raise out[0]
        return out

    # an edit's tokenization held while the validator checks prompts (its own settings: no
    # padding, no truncation) ...
    ids, outcome = beside(lambda: tiny_session.tokens(prompts), validate_long)
    assert outcome == "ok", outcome
    assert ids.shape == expected.shape and bool((ids == expected).all()), ids.shape
    # ... and the validator's held while an edit tokenizes (padding, truncation at 77)
    outcome, ids = beside(validate_long, lambda: tiny_session.tokens(prompts))
    assert outcome == "ok", outcome
    assert ids.shape == expected.shape and bool((ids == expected).all()), ids.shape
    validate(SRC, TGT, *parse_options({}))  # the validator is unharmed
