"""The shapes world: procedural scenes of 1–3 flat objects on a plain background, their
captions, and a deterministic renderer.

A :class:`Scene` is one object (shape, colour, size, position) or a row of 2–3 identical
objects ("two red circles"). A caption mentions the shape and the count always and the colour,
size and position optionally (:class:`Mention`); what a caption leaves out is still drawn, at
random. ``render(scene, seed)`` draws the same pixels for the same scene and seed, so the scene
an edit asks for can be rendered too.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

from adapedit.errors import ConfigError

SHAPES = ("circle", "square", "triangle")
#: Colour words and their RGB.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 90, 220),
    "yellow": (235, 205, 35),
    "purple": (135, 60, 185),
    "orange": (245, 135, 30),
}
SIZES = ("small", "big")
#: Position words and their anchor (x, y) as fractions of the image side.
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "centre": (0.5, 0.5),
}
POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "centre": "in the centre",
}
NUMBERS = {1: "one", 2: "two", 3: "three"}
#: Where the objects of a group go: a row across the middle, x as fractions of the side (a
#: count > 1 has no position word).
GROUP_LAYOUT = {2: (0.25, 0.75), 3: (0.2, 0.5, 0.8)}
BACKGROUND = (232, 232, 228)
IMAGE_SIZE = 64
#: Half the object's extent, in pixels of a 64-px image: (low, high) per size word.
HALF_EXTENT = {"small": (5.0, 7.0), "big": (12.0, 14.0)}
#: Caption templates; ``{}`` is the object phrase (with its position phrase).
TEMPLATES = ("{}", "a picture of {}", "{} on a grey background")
ATTRIBUTES = ("shape", "colour", "size", "position", "count")


@dataclass(frozen=True)
class Scene:
    """What is drawn: ``count`` identical objects; ``position`` only for a single object."""

    shape: str
    colour: str
    size: str
    position: str | None = "centre"
    count: int = 1

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("shape", self.shape, SHAPES),
            ("colour", self.colour, tuple(COLOURS)),
            ("size", self.size, SIZES),
            ("count", self.count, tuple(NUMBERS)),
        ):
            if value not in allowed:
                raise ConfigError(
                    f"unknown {name}",
                    where="Scene",
                    expected=" | ".join(map(str, allowed)),
                    got=value,
                )
        if self.count == 1 and self.position not in POSITIONS:
            raise ConfigError(
                "unknown position",
                where="Scene",
                expected=" | ".join(POSITIONS),
                got=self.position,
            )
        if self.count > 1 and self.position is not None:
            raise ConfigError(
                "a group of objects has no position",
                where="Scene",
                expected="position=None for count > 1",
                got=self.position,
            )
        if self.count == 3 and self.size != "small":
            raise ConfigError(
                "three objects must be small to fit",
                where="Scene",
                expected="small",
                got=self.size,
            )

    def attributes(self) -> dict[str, str | int | None]:
        return {a: getattr(self, a) for a in ATTRIBUTES}


@dataclass(frozen=True)
class Mention:
    """Which optional attributes a caption names (shape and count are always named)."""

    colour: bool = True
    size: bool = True
    position: bool = True
    #: "a" or "one" for a single object
    article: str = "a"
    template: int = 0

    def named(self, scene: Scene) -> tuple[str, ...]:
        """The attributes a caption of ``scene`` names."""
        names = ["shape", "count"]
        names += [a for a in ("colour", "size") if getattr(self, a)]
        if self.position and scene.count == 1:
            names.append("position")
        return tuple(names)


def caption(scene: Scene, mention: Mention = Mention()) -> str:
    """The caption of ``scene``, e.g. ``"a big red circle on the left"``,
    ``"two small blue squares"``."""
    words = [mention.article if scene.count == 1 else NUMBERS[scene.count]]
    if mention.size:
        words.append(scene.size)
    if mention.colour:
        words.append(scene.colour)
    words.append(scene.shape + ("s" if scene.count > 1 else ""))
    if mention.position and scene.count == 1:
        words.append(POSITION_PHRASES[scene.position])
    return TEMPLATES[mention.template].format(" ".join(words))


def sample_scene(rng: random.Random) -> tuple[Scene, Mention]:
    """A random scene and how its caption names it (the training distribution)."""
    count = rng.choices((1, 2, 3), weights=(0.7, 0.15, 0.15))[0]
    size = "small" if count == 3 else rng.choice(SIZES)
    scene = Scene(
        shape=rng.choice(SHAPES),
        colour=rng.choice(tuple(COLOURS)),
        size=size,
        position=rng.choice(tuple(POSITIONS)) if count == 1 else None,
        count=count,
    )
    mention = Mention(
        colour=rng.random() < 0.85,
        size=rng.random() < 0.7,
        position=rng.random() < 0.7,
        article=rng.choice(("a", "one")) if rng.random() < 0.3 else "a",
        template=rng.choices(range(len(TEMPLATES)), weights=(0.6, 0.2, 0.2))[0],
    )
    return scene, mention


def with_attribute(scene: Scene, attribute: str, value: str | int) -> Scene:
    """``scene`` with one attribute changed (a count change re-lays the objects out)."""
    if attribute == "count":
        position = "centre" if value == 1 else None
        size = "small" if value == 3 else scene.size
        return replace(scene, count=int(value), position=position, size=size)
    return replace(scene, **{attribute: value})


_SUPERSAMPLE = 4


def render(scene: Scene, seed: int = 0, size: int = IMAGE_SIZE) -> np.ndarray:
    """Draw ``scene`` as uint8 [size, size, 3]; positions and extents jitter with ``seed``."""
    rng = random.Random(seed)
    s = size * _SUPERSAMPLE
    img = Image.new("RGB", (s, s), BACKGROUND)
    draw = ImageDraw.Draw(img)
    k = s / IMAGE_SIZE
    if scene.count == 1:
        anchors, jitter_x = (POSITIONS[scene.position],), 3.0
    else:  # a row: little sideways jitter, so neighbours never touch
        anchors, jitter_x = tuple((x, 0.5) for x in GROUP_LAYOUT[scene.count]), 1.0
    for ax, ay in anchors:
        cx = ax * s + rng.uniform(-jitter_x, jitter_x) * k
        cy = ay * s + rng.uniform(-3, 3) * k
        r = rng.uniform(*HALF_EXTENT[scene.size]) * k
        fill = COLOURS[scene.colour]
        if scene.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif scene.shape == "square":
            draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    return np.asarray(img.resize((size, size), Image.Resampling.BOX))
