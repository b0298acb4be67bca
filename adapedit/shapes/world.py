"""The shapes world (v2): procedural scenes of flat objects on a plain background, their
captions, and a deterministic renderer.

A :class:`Scene` holds one :class:`Thing` — a single object (shape, colour, size, position) or a
row of 2–3 identical objects ("two red circles") — or two *different* single objects at
opposite positions ("a red circle on the left and a blue square on the right"). A caption
names the shape and the count always and the colour, size and position optionally
(:class:`Mention`; the two objects of a pair are always named with their positions, which say
which is which); what a caption leaves out is still drawn, at random. ``render(scene, seed)``
draws the same pixels for the same scene and seed, so the scene an edit asks for can be
rendered too.

Attributes are named by :meth:`Scene.attributes`: ``shape``, ``colour``, ``size``,
``position``, ``count`` for one thing; ``count`` and ``shape.0`` … ``position.1`` (per object,
in caption order) for a pair.
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
#: The positions two objects of a pair take: opposite sides, so that two big objects never
#: touch.
OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
NUMBERS = {1: "one", 2: "two", 3: "three"}
#: Where the objects of a group go: a row across the middle, x as fractions of the side (a
#: count > 1 has no position word).
GROUP_LAYOUT = {2: (0.25, 0.75), 3: (0.2, 0.5, 0.8)}
BACKGROUND = (232, 232, 228)
IMAGE_SIZE = 64
#: Half the object's extent, in pixels of a 64-px image: (low, high) per size word.
HALF_EXTENT = {"small": (5.0, 7.0), "big": (12.0, 14.0)}
#: Jitter of an object's centre (pixels at 64 px); a pair's objects jitter less along the axis
#: that separates them (two big ones keep ≥ 2 px apart).
JITTER, PAIR_JITTER = 3.0, 1.0
#: Caption templates; ``{}`` is the object phrase(s).
TEMPLATES = ("{}", "a picture of {}", "{} on a grey background")
THING_ATTRIBUTES = ("shape", "colour", "size", "position")
ATTRIBUTES = (*THING_ATTRIBUTES, "count")


@dataclass(frozen=True)
class Thing:
    """``count`` identical objects; ``position`` only for a single object."""

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
                    where="Thing",
                    expected=" | ".join(map(str, allowed)),
                    got=value,
                )
        if self.count == 1 and self.position not in POSITIONS:
            raise ConfigError(
                "unknown position",
                where="Thing",
                expected=" | ".join(POSITIONS),
                got=self.position,
            )
        if self.count > 1 and self.position is not None:
            raise ConfigError(
                "a group of objects has no position",
                where="Thing",
                expected="position=None for count > 1",
                got=self.position,
            )
        if self.count == 3 and self.size != "small":
            raise ConfigError(
                "three objects must be small to fit",
                where="Thing",
                expected="small",
                got=self.size,
            )


@dataclass(frozen=True)
class Scene:
    """One thing, or two different single objects at opposite positions."""

    things: tuple[Thing, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "things", tuple(self.things))
        n = len(self.things)
        if n not in (1, 2):
            raise ConfigError("a scene has one or two things", where="Scene", got=n)
        if n == 2:
            a, b = self.things
            if a.count != 1 or b.count != 1:
                raise ConfigError(
                    "the things of a pair are single objects",
                    where="Scene",
                    expected="count=1 for both",
                    got=(a.count, b.count),
                )
            if OPPOSITE.get(a.position) != b.position:
                raise ConfigError(
                    "the objects of a pair stand on opposite sides",
                    where="Scene",
                    expected="left/right or top/bottom",
                    got=(a.position, b.position),
                )
            if (a.shape, a.colour) == (b.shape, b.colour):
                raise ConfigError(
                    "the objects of a pair differ in shape or colour",
                    where="Scene",
                    expected="different shapes or colours",
                    got=(a.shape, a.colour),
                )

    @classmethod
    def of(cls, *things: Thing) -> Scene:
        """``Scene.of(Thing(...))`` or ``Scene.of(left_thing, right_thing)``."""
        return cls(things)

    @property
    def is_pair(self) -> bool:
        return len(self.things) == 2

    @property
    def count(self) -> int:
        """How many objects are drawn."""
        return sum(t.count for t in self.things)

    def attribute_keys(self) -> tuple[str, ...]:
        """The attribute names of this scene (see the module docstring)."""
        if not self.is_pair:
            return ATTRIBUTES
        return (*(f"{a}.{i}" for i in range(2) for a in THING_ATTRIBUTES), "count")

    def attributes(self) -> dict[str, str | int | None]:
        if not self.is_pair:
            t = self.things[0]
            return {a: getattr(t, a) for a in ATTRIBUTES}
        out: dict[str, str | int | None] = {
            f"{a}.{i}": getattr(t, a) for i, t in enumerate(self.things) for a in THING_ATTRIBUTES
        }
        out["count"] = 2
        return out


def base_attribute(key: str) -> str:
    """``"colour.1"`` → ``"colour"``."""
    return key.split(".")[0]


@dataclass(frozen=True)
class Mention:
    """Which optional attributes a caption names (shape and count always; a pair's positions
    always)."""

    colour: bool = True
    size: bool = True
    position: bool = True
    #: "a" or "one" for a single object
    article: str = "a"
    template: int = 0

    def named(self, scene: Scene) -> tuple[str, ...]:
        """The attribute keys a caption of ``scene`` names."""
        optional = [a for a in ("colour", "size") if getattr(self, a)]
        if scene.is_pair:
            per = ["shape", *optional, "position"]
            return (*(f"{a}.{i}" for i in range(2) for a in per), "count")
        names = ["shape", "count", *optional]
        if self.position and scene.things[0].count == 1:
            names.append("position")
        return tuple(names)


def _phrase(thing: Thing, mention: Mention, position: bool) -> str:
    words = [mention.article if thing.count == 1 else NUMBERS[thing.count]]
    if mention.size:
        words.append(thing.size)
    if mention.colour:
        words.append(thing.colour)
    words.append(thing.shape + ("s" if thing.count > 1 else ""))
    if position and thing.count == 1:
        words.append(POSITION_PHRASES[thing.position])
    return " ".join(words)


def caption(scene: Scene, mention: Mention = Mention()) -> str:
    """The caption of ``scene``, e.g. ``"a big red circle on the left"``, ``"two small blue
    squares"``, ``"a red circle on the left and a blue square on the right"``."""
    position = mention.position or scene.is_pair
    phrases = " and ".join(_phrase(t, mention, position) for t in scene.things)
    return TEMPLATES[mention.template].format(phrases)


def _thing(rng: random.Random, position: str | None, count: int = 1) -> Thing:
    size = "small" if count == 3 else rng.choice(SIZES)
    return Thing(rng.choice(SHAPES), rng.choice(tuple(COLOURS)), size, position, count)


def sample_scene(rng: random.Random) -> tuple[Scene, Mention]:
    """A random scene and how its caption names it (the training distribution): one object
    (45 %), a group of two or three (7.5 % each) or a pair of different objects (40 %)."""
    kind = rng.choices(("one", "group", "pair"), weights=(0.45, 0.15, 0.40))[0]
    if kind == "one":
        scene = Scene.of(_thing(rng, rng.choice(tuple(POSITIONS))))
    elif kind == "group":
        scene = Scene.of(_thing(rng, None, rng.choice((2, 3))))
    else:
        first = rng.choice(tuple(OPPOSITE))
        a = _thing(rng, first)
        b = _thing(rng, OPPOSITE[first])
        while (b.shape, b.colour) == (a.shape, a.colour):
            b = _thing(rng, OPPOSITE[first])
        scene = Scene.of(a, b)
    mention = Mention(
        colour=rng.random() < 0.85,
        size=rng.random() < 0.7,
        position=rng.random() < 0.7,
        article=rng.choice(("a", "one")) if rng.random() < 0.3 else "a",
        template=rng.choices(range(len(TEMPLATES)), weights=(0.6, 0.2, 0.2))[0],
    )
    return scene, mention


def with_attribute(scene: Scene, attribute: str, value: str | int, index: int = 0) -> Scene:
    """``scene`` with one attribute of its ``index``-th thing changed (a count change re-lays a
    single thing out)."""
    things = list(scene.things)
    t = things[index]
    if attribute == "count":
        position = "centre" if value == 1 else None
        size = "small" if value == 3 else t.size
        things[index] = replace(t, count=int(value), position=position, size=size)
    else:
        things[index] = replace(t, **{attribute: value})
    return Scene(tuple(things))


_SUPERSAMPLE = 4


def render(scene: Scene, seed: int = 0, size: int = IMAGE_SIZE) -> np.ndarray:
    """Draw ``scene`` as uint8 [size, size, 3]; positions and extents jitter with ``seed``."""
    rng = random.Random(seed)
    s = size * _SUPERSAMPLE
    img = Image.new("RGB", (s, s), BACKGROUND)
    draw = ImageDraw.Draw(img)
    k = s / IMAGE_SIZE
    for thing in scene.things:
        if thing.count > 1:  # a row: little sideways jitter, so neighbours never touch
            anchors = tuple((x, 0.5) for x in GROUP_LAYOUT[thing.count])
            jx, jy = 1.0, JITTER
        else:
            anchors = (POSITIONS[thing.position],)
            jx = jy = JITTER
            if scene.is_pair:  # less jitter along the axis that separates the pair
                jx, jy = (
                    (PAIR_JITTER, JITTER)
                    if thing.position in ("left", "right")
                    else (
                        JITTER,
                        PAIR_JITTER,
                    )
                )
        for ax, ay in anchors:
            cx = ax * s + rng.uniform(-jx, jx) * k
            cy = ay * s + rng.uniform(-jy, jy) * k
            r = rng.uniform(*HALF_EXTENT[thing.size]) * k
            fill = COLOURS[thing.colour]
            if thing.shape == "circle":
                draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
            elif thing.shape == "square":
                draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
            else:
                draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    return np.asarray(img.resize((size, size), Image.Resampling.BOX))
