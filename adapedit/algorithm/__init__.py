"""The equations of AdapEdit (docs/algorithm.md), as pure tensor functions and plain
arithmetic: token alignment and the edit plan, FWT's τ and gates, DPS's spatial weight, the
per-layer edit, LocalBlend, which layers are controlled, the batch layouts, DDIM inversion.

Nothing here knows diffusers, a model file or a backend: the PyTorch reference
(:mod:`adapedit.pipelines`), the segmented runtime and the fused graph all call these same
functions.
"""
