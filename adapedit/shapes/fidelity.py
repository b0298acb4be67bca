"""Text fidelity of a model of the shapes world: generate random captions of the training
distribution and read the images back (no learned judge)."""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import replace

import numpy as np
from tqdm.auto import tqdm

from adapedit.config import SamplerConfig
from adapedit.shapes.reader import caption_matches, read_image
from adapedit.shapes.world import base_attribute, caption, sample_scene


def text_fidelity(
    pipe, samples: int, sampler: SamplerConfig, seed: int = 1, *, progress: bool = False
) -> dict:
    """The share of named attributes that read as captioned, per attribute and overall, over
    ``samples`` random captions (drawn from ``random.Random(seed)``; image ``i`` from sampler
    seed ``i``). ``pipe`` is an :class:`adapedit.pipelines.pipeline.EditPipeline`."""
    rng = random.Random(seed)
    per: dict[str, list[bool]] = defaultdict(list)
    for i in tqdm(range(samples), desc="fidelity", disable=not progress, leave=False):
        scene, mention = sample_scene(rng)
        img = pipe.generate(caption(scene, mention), replace(sampler, seed=i))
        for key, ok in caption_matches(read_image(img.image), scene, mention).items():
            per[base_attribute(key)].append(ok)
    every = [ok for oks in per.values() for ok in oks]
    return {
        "samples": samples,
        "attributes": {a: float(np.mean(v)) for a, v in sorted(per.items())},
        "all": float(np.mean(every)) if every else float("nan"),
    }
