"""The attribute reader recovers rendered ground truth, single objects, groups and pairs."""

from __future__ import annotations

import random

import numpy as np

from adapedit.shapes.reader import caption_matches, read_image
from adapedit.shapes.world import BACKGROUND, Mention, Scene, Thing, render, sample_scene


def test_reader_recovers_every_attribute_of_rendered_scenes():
    rng = random.Random(7)
    wrong, pairs = [], 0
    for i in range(600):
        scene, _ = sample_scene(rng)
        pairs += scene.is_pair
        got = read_image(render(scene, seed=i)).attributes(scene)
        wrong += [(scene, k) for k, v in scene.attributes().items() if got[k] != v]
    assert not wrong, wrong[:5]
    assert pairs > 200  # the pairs were read too, every object of them


def test_two_big_objects_of_a_pair_never_touch():
    # the tightest layout: both big, every seed's jitter
    pair = Scene.of(Thing("square", "red", "big", "left"), Thing("square", "blue", "big", "right"))
    for seed in range(200):
        assert read_image(render(pair, seed)).count == 2, seed


def test_reader_reads_a_group_and_its_objects():
    r = read_image(render(Scene.of(Thing("triangle", "purple", "small", None, count=3)), seed=1))
    assert r.count == 3
    assert [o.position for o in sorted(r.objects, key=lambda o: o.bbox[1])] == [
        "left",
        "centre",
        "right",
    ]
    assert r.mask.sum() == sum(o.area for o in r.objects)


def test_a_pair_is_read_object_by_object_matched_by_position():
    left, right = Thing("circle", "red", "big", "left"), Thing("square", "blue", "small", "right")
    pair = Scene.of(left, right)
    got = read_image(render(pair, seed=3)).attributes(pair)
    assert got == pair.attributes()
    # the same image against the caption in the other order: still matched by position
    flipped = Scene.of(right, left)
    assert read_image(render(pair, seed=3)).attributes(flipped) == flipped.attributes()
    # one object only: the other's attributes are None
    alone = read_image(render(Scene.of(left), seed=3)).attributes(pair)
    assert alone["colour.0"] == "red" and alone["colour.1"] is None and alone["count"] == 1


def test_reader_on_an_empty_image_and_caption_matching():
    blank = np.full((64, 64, 3), BACKGROUND, dtype=np.uint8)
    assert read_image(blank).attributes()["count"] == 0
    scene = Scene.of(Thing("square", "green", "big", "right"))
    ok = caption_matches(read_image(render(scene)), scene, Mention(size=False))
    assert ok == {"shape": True, "count": True, "colour": True, "position": True}
    wrong = caption_matches(read_image(blank), scene, Mention())
    assert not any(wrong.values())
    pair = Scene.of(Thing("circle", "red", "big", "top"), Thing("circle", "blue", "big", "bottom"))
    assert not any(caption_matches(read_image(blank), pair, Mention()).values())
