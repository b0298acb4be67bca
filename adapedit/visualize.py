"""Pictures people look at: per-token attention maps of the edit prompt, labelled."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

CELL = 128
LABEL_H = 20


def heat(values: np.ndarray) -> np.ndarray:
    """[h, w] in [0, 1] → [h, w, 3] uint8 through matplotlib's ``inferno`` colour map."""
    from matplotlib import colormaps

    return (colormaps["inferno"](values)[..., :3] * 255).astype(np.uint8)


def stretch(m: torch.Tensor) -> np.ndarray:
    """A map [h, w] stretched to its own [min, max] → [0, 1] (all zeros if flat), float32."""
    m = m.float()
    span = m.max() - m.min()
    return ((m - m.min()) / span if span > 0 else torch.zeros_like(m)).numpy()


def token_heat(maps: torch.Tensor) -> list[np.ndarray]:
    """Per-token maps [n, h, w], each stretched to its own [min, max] and coloured: n images
    [h, w, 3] uint8 at the maps' own resolution (what the server's page lays over the edit)."""
    return [heat(stretch(m)) for m in maps]


def attention_grid(
    maps: torch.Tensor, labels: list[str], image: np.ndarray | None = None, per_row: int = 8
) -> Image.Image:
    """A grid of per-token maps [n, h, w], each stretched to its own [min, max], upsampled to
    128×128, blended over ``image`` [H, W, 3] if given, with its token's text underneath."""
    n = maps.shape[0]
    rows = max(1, -(-n // per_row))
    cols = min(max(n, 1), per_row)
    grid = Image.new("RGB", (cols * CELL, rows * (CELL + LABEL_H)), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    base = None
    if image is not None:
        base = np.asarray(Image.fromarray(image).resize((CELL, CELL)), dtype=np.float32)
    for k in range(n):
        m = maps[k].float()[None, None]  # [1, 1, h, w]
        m = F.interpolate(m, size=(CELL, CELL), mode="bilinear", align_corners=False)[0, 0]
        cell = heat(stretch(m)).astype(np.float32)
        if base is not None:
            cell = 0.6 * cell + 0.4 * base
        x, y = (k % per_row) * CELL, (k // per_row) * (CELL + LABEL_H)
        grid.paste(Image.fromarray(cell.astype(np.uint8)), (x, y))
        text = labels[k] if k < len(labels) else str(k)
        draw.text((x + 4, y + CELL + 3), text[:18], fill="black", font=font)
    return grid
