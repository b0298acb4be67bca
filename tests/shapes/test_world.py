"""The shapes world (v2): scenes of one thing or two different objects, captions, rendering."""

from __future__ import annotations

import random

import numpy as np
import pytest

from adapedit.errors import ConfigError
from adapedit.shapes.world import (
    BACKGROUND,
    COLOURS,
    OPPOSITE,
    Mention,
    Scene,
    Thing,
    caption,
    render,
    sample_scene,
    with_attribute,
)

RED_LEFT = Thing("circle", "red", "big", "left")
BLUE_RIGHT = Thing("square", "blue", "small", "right")


def test_captions_name_what_the_mention_asks():
    s = Scene.of(RED_LEFT)
    assert caption(s) == "a big red circle on the left"
    assert caption(s, Mention(size=False, position=False)) == "a red circle"
    assert caption(s, Mention(colour=False, article="one", template=1)) == (
        "a picture of one big circle on the left"
    )
    group = Scene.of(Thing("square", "blue", "small", None, count=3))
    assert caption(group) == "three small blue squares"  # a group has no position word
    assert Mention().named(group) == ("shape", "count", "colour", "size")


def test_a_pair_is_captioned_with_both_objects_and_their_positions():
    pair = Scene.of(RED_LEFT, BLUE_RIGHT)
    assert caption(pair) == "a big red circle on the left and a small blue square on the right"
    # positions say which object is which, so a pair names them even when a single would not
    assert caption(pair, Mention(size=False, position=False, template=2)) == (
        "a red circle on the left and a blue square on the right on a grey background"
    )
    assert Mention(size=False).named(pair) == (
        "shape.0",
        "colour.0",
        "position.0",
        "shape.1",
        "colour.1",
        "position.1",
        "count",
    )
    assert pair.count == 2 and pair.attributes()["colour.1"] == "blue"
    assert set(pair.attribute_keys()) == set(pair.attributes())


def test_render_is_deterministic_from_the_seed():
    s = Scene.of(Thing("triangle", "orange", "small", "top"))
    a, b, c = render(s, 3), render(s, 3), render(s, 4)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert tuple(a[0, 0]) == BACKGROUND
    # the object's colour is there
    assert (np.abs(a.astype(int) - COLOURS["orange"]).max(-1) < 8).sum() > 30


def test_with_attribute_changes_one_thing():
    s = Scene.of(RED_LEFT)
    assert with_attribute(s, "colour", "blue") == Scene.of(Thing("circle", "blue", "big", "left"))
    assert with_attribute(s, "count", 2) == Scene.of(Thing("circle", "red", "big", None, 2))
    assert with_attribute(s, "count", 3).things[0].size == "small"
    pair = Scene.of(RED_LEFT, BLUE_RIGHT)
    assert with_attribute(pair, "size", "big", 1).things == (
        RED_LEFT,
        Thing("square", "blue", "big", "right"),
    )


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
def test_bad_things_are_refused(kwargs):
    with pytest.raises(ConfigError):
        Thing(**kwargs)


@pytest.mark.parametrize(
    ("things", "what"),
    [
        ((), "one or two"),
        ((RED_LEFT, BLUE_RIGHT, RED_LEFT), "one or two"),
        ((RED_LEFT, Thing("square", "blue", "big", "top")), "opposite"),
        ((RED_LEFT, Thing("circle", "red", "small", "right")), "differ"),
        ((RED_LEFT, Thing("square", "blue", "small", None, 2)), "single objects"),
    ],
)
def test_bad_scenes_are_refused(things, what):
    with pytest.raises(ConfigError, match=what):
        Scene(things)


def test_sampling_covers_the_world():
    rng = random.Random(0)
    drawn = [sample_scene(rng)[0] for _ in range(600)]
    singles = [s.things[0] for s in drawn if not s.is_pair]
    pairs = [s for s in drawn if s.is_pair]
    assert {t.count for t in singles} == {1, 2, 3}
    assert {t.colour for t in singles} == set(COLOURS)
    assert {t.position for t in singles if t.count == 1} == {
        "left",
        "right",
        "top",
        "bottom",
        "centre",
    }
    assert 0.3 < len(pairs) / len(drawn) < 0.5
    assert {p.things[0].position for p in pairs} == set(OPPOSITE)
    assert all(
        (p.things[0].shape, p.things[0].colour) != (p.things[1].shape, p.things[1].colour)
        for p in pairs
    )
