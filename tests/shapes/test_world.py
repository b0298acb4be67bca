"""The shapes world: scenes, captions, rendering."""

from __future__ import annotations

import random

import numpy as np
import pytest

from adapedit.errors import ConfigError
from adapedit.shapes.world import (
    BACKGROUND,
    COLOURS,
    Mention,
    Scene,
    caption,
    render,
    sample_scene,
    with_attribute,
)


def test_captions_name_what_the_mention_asks():
    s = Scene("circle", "red", "big", "left")
    assert caption(s) == "a big red circle on the left"
    assert caption(s, Mention(size=False, position=False)) == "a red circle"
    assert caption(s, Mention(colour=False, article="one", template=1)) == (
        "a picture of one big circle on the left"
    )
    group = Scene("square", "blue", "small", None, count=3)
    assert caption(group) == "three small blue squares"  # a group has no position word
    assert Mention().named(group) == ("shape", "count", "colour", "size")


def test_render_is_deterministic_from_the_seed():
    s = Scene("triangle", "orange", "small", "top")
    a, b, c = render(s, 3), render(s, 3), render(s, 4)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert tuple(a[0, 0]) == BACKGROUND
    # the object's colour is there
    assert (np.abs(a.astype(int) - COLOURS["orange"]).max(-1) < 8).sum() > 30


def test_with_attribute_relays_a_count_change():
    s = Scene("circle", "red", "big", "left")
    assert with_attribute(s, "colour", "blue") == Scene("circle", "blue", "big", "left")
    assert with_attribute(s, "count", 2) == Scene("circle", "red", "big", None, 2)
    assert with_attribute(s, "count", 3).size == "small"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"shape": "hexagon", "colour": "red", "size": "big"},
        {"shape": "circle", "colour": "pink", "size": "big"},
        {"shape": "circle", "colour": "red", "size": "big", "position": "corner"},
        {"shape": "circle", "colour": "red", "size": "big", "position": "left", "count": 2},
        {"shape": "circle", "colour": "red", "size": "big", "position": None, "count": 3},
    ],
)
def test_bad_scenes_are_refused(kwargs):
    with pytest.raises(ConfigError):
        Scene(**kwargs)


def test_sampling_covers_the_world():
    rng = random.Random(0)
    drawn = [sample_scene(rng)[0] for _ in range(400)]
    assert {s.count for s in drawn} == {1, 2, 3}
    assert {s.colour for s in drawn} == set(COLOURS)
    assert {s.position for s in drawn if s.count == 1} == {
        "left",
        "right",
        "top",
        "bottom",
        "centre",
    }
