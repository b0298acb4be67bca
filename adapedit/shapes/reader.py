"""Read a shapes-world image back into attributes, with no learned weights.

The background is the median of the border pixels; a pixel belongs to an object where it
differs from it clearly. Each 4-connected blob of object pixels is one object: its colour is
the palette colour nearest to the median of its core pixels, its shape comes from how much of
its bounding box it fills (square ≈ 1, circle ≈ π/4, triangle ≈ 1/2) and how much of it lies in
its top half, its size from its extent, its position from the anchor nearest its centroid.
:meth:`Reading.attributes` names what was read under the keys of the scene the image should
show (a pair's objects are matched to its two positions).
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass
from itertools import permutations

import numpy as np

from adapedit.shapes.world import (
    COLOURS,
    IMAGE_SIZE,
    POSITIONS,
    THING_ATTRIBUTES,
    Mention,
    Scene,
)

#: A pixel differs from the background by more than this (max over channels, 0–255).
FOREGROUND_DIFF = 60
#: Blobs smaller than this share of the image are noise.
MIN_AREA_FRACTION = 12 / IMAGE_SIZE**2
#: Extents (pixels at 64 px) above this are "big".
BIG_EXTENT = 20 / IMAGE_SIZE


@dataclass(frozen=True)
class ObjectReading:
    """One blob: its attributes and geometry (pixels of the read image)."""

    shape: str
    colour: str
    size: str
    position: str
    area: int
    bbox: tuple[int, int, int, int]  # (y0, x0, y1, x1), exclusive ends
    centre: tuple[float, float]  # (x, y) centroid as fractions of the image side


@dataclass(frozen=True)
class Reading:
    """What an image shows: its objects (largest first) and their foreground mask."""

    objects: tuple[ObjectReading, ...]
    mask: np.ndarray  # [H, W] bool

    @property
    def count(self) -> int:
        return len(self.objects)

    def attributes(self, like: Scene | None = None) -> dict[str, str | int | None]:
        """What was read, under the attribute keys of ``like`` (:meth:`Scene.attribute_keys`;
        those of a single thing if not given).

        For one thing: the single object's attributes, or the majority over a group (no
        position for a group); all None but the count when nothing was found. For a pair:
        the count, and per object of ``like`` the attributes of the read object assigned to
        it — the two read objects nearest its two positions (least total squared distance),
        None where fewer than two objects were read."""
        if like is not None and like.is_pair:
            return self._pair_attributes(like)
        if not self.objects:
            return {"shape": None, "colour": None, "size": None, "position": None, "count": 0}

        def major(name: str) -> str:
            return Counter(getattr(o, name) for o in self.objects).most_common(1)[0][0]

        return {
            "shape": major("shape"),
            "colour": major("colour"),
            "size": major("size"),
            "position": self.objects[0].position if self.count == 1 else None,
            "count": self.count,
        }

    def _pair_attributes(self, like: Scene) -> dict[str, str | int | None]:
        anchors = [np.array(POSITIONS[t.position]) for t in like.things]  # [2] of (x, y)
        options = [*self.objects, None, None]  # an unread object costs more than any distance

        def cost(o: ObjectReading | None, anchor: np.ndarray) -> float:
            return 4.0 if o is None else float(((np.array(o.centre) - anchor) ** 2).sum())

        slots = min(
            permutations(options, 2),
            key=lambda pair: cost(pair[0], anchors[0]) + cost(pair[1], anchors[1]),
        )
        out: dict[str, str | int | None] = {
            f"{a}.{i}": None if o is None else getattr(o, a)
            for i, o in enumerate(slots)
            for a in THING_ATTRIBUTES
        }
        out["count"] = self.count
        return out


def _blobs(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of ``mask`` [H, W] as arrays of (y, x)."""
    seen = np.zeros_like(mask)
    h, w = mask.shape
    out = []
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        queue, pixels = deque([(y0, x0)]), []
        while queue:
            y, x = queue.popleft()
            pixels.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        out.append(np.array(pixels))
    return out


_COLOUR_NAMES, _POSITION_NAMES = tuple(COLOURS), tuple(POSITIONS)
_PALETTE = np.array(list(COLOURS.values()), dtype=np.float64)  # [6, 3]
_ANCHORS = np.array(list(POSITIONS.values()))  # [5, 2] (x, y)


def _classify_shape(pixels: np.ndarray, bbox: tuple[int, int, int, int]) -> str:
    y0, x0, y1, x1 = bbox
    fill = len(pixels) / ((y1 - y0) * (x1 - x0))
    top = np.count_nonzero(pixels[:, 0] < (y0 + y1) / 2) / len(pixels)
    if fill < 0.66 or top < 0.38:
        return "triangle"
    return "square" if fill > 0.88 else "circle"


def read_image(image: np.ndarray) -> Reading:
    """Read a uint8 image [H, W, 3] of the shapes world."""
    img = image.astype(np.int32)
    h, w, _ = img.shape
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])  # [4·side, 3]
    bg = np.median(border, axis=0)
    diff = np.abs(img - bg).max(axis=-1)  # [H, W]
    mask = diff > FOREGROUND_DIFF
    objects = []
    for pixels in _blobs(mask):
        if len(pixels) < MIN_AREA_FRACTION * h * w:
            mask[pixels[:, 0], pixels[:, 1]] = False
            continue
        ys, xs = pixels[:, 0], pixels[:, 1]
        bbox = (int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1)
        d = diff[ys, xs]
        core = pixels[d >= np.quantile(d, 0.5)]
        rgb = np.median(img[core[:, 0], core[:, 1]], axis=0)
        colour = _COLOUR_NAMES[int(np.argmin(((_PALETTE - rgb) ** 2).sum(-1)))]
        extent = max(bbox[2] - bbox[0], bbox[3] - bbox[1]) / max(h, w)
        centre = np.array([xs.mean() / w, ys.mean() / h])
        position = _POSITION_NAMES[int(np.argmin(((_ANCHORS - centre) ** 2).sum(-1)))]
        objects.append(
            ObjectReading(
                shape=_classify_shape(pixels, bbox),
                colour=colour,
                size="big" if extent > BIG_EXTENT else "small",
                position=position,
                area=len(pixels),
                bbox=bbox,
                centre=(float(centre[0]), float(centre[1])),
            )
        )
    objects.sort(key=lambda o: -o.area)
    return Reading(tuple(objects), mask)


def caption_matches(reading: Reading, scene: Scene, mention: Mention) -> dict[str, bool]:
    """For each attribute key the caption names: does the image show it?"""
    got = reading.attributes(scene)
    want = scene.attributes()
    return {a: got[a] == want[a] for a in mention.named(scene)}
