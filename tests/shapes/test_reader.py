"""The attribute reader recovers rendered ground truth."""

from __future__ import annotations

import random

import numpy as np

from adapedit.shapes.reader import caption_matches, read_image
from adapedit.shapes.world import BACKGROUND, Mention, Scene, render, sample_scene


def test_reader_recovers_every_attribute_of_rendered_scenes():
    rng = random.Random(7)
    wrong = []
    for i in range(300):
        scene, _ = sample_scene(rng)
        got = read_image(render(scene, seed=i)).attributes()
        wrong += [(scene, a) for a, v in scene.attributes().items() if got[a] != v]
    assert not wrong, wrong[:5]


def test_reader_reads_a_group_and_its_objects():
    r = read_image(render(Scene("triangle", "purple", "small", None, count=3), seed=1))
    assert r.count == 3
    assert [o.position for o in sorted(r.objects, key=lambda o: o.bbox[1])] == [
        "left",
        "centre",
        "right",
    ]
    assert r.mask.sum() == sum(o.area for o in r.objects)


def test_reader_on_an_empty_image_and_caption_matching():
    blank = np.full((64, 64, 3), BACKGROUND, dtype=np.uint8)
    assert read_image(blank).attributes()["count"] == 0
    scene = Scene("square", "green", "big", "right")
    ok = caption_matches(read_image(render(scene)), scene, Mention(size=False))
    assert ok == {"shape": True, "count": True, "colour": True, "position": True}
    wrong = caption_matches(read_image(blank), scene, Mention())
    assert not any(wrong.values())
