"""AdapEdit: training-free text-based image editing on Stable Diffusion v1.4.

``adapedit.algorithm`` holds the equations (alignment, EditPlan, FWT, DPS, the per-step edit,
LocalBlend), ``adapedit.pipelines`` the torch wiring (controllers, the fused UNet, the pipeline and
its PyTorch reference); ``adapedit.export``, ``adapedit.engines`` and ``adapedit.runtime`` hold
the exporter, the engines and the low-latency runtime.

``from adapedit import EditSession`` (the runtime session, see ``adapedit.runtime.session``) is
resolved lazily, so ``import adapedit`` stays cheap.
"""

import importlib
from typing import TYPE_CHECKING, Any

from adapedit.config import EditConfig, SamplerConfig
from adapedit.errors import (
    AdapEditError,
    ConfigError,
    EngineError,
    ExportError,
    InputError,
    ManifestError,
    ModelError,
    PromptError,
)

if TYPE_CHECKING:
    from adapedit.runtime.session import EditSession

__version__ = "0.1.0"

__all__ = [
    "AdapEditError",
    "ConfigError",
    "EditConfig",
    "EditSession",
    "EngineError",
    "ExportError",
    "InputError",
    "ManifestError",
    "ModelError",
    "PromptError",
    "SamplerConfig",
    "__version__",
]

_LAZY = {"EditSession": "adapedit.runtime.session"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'adapedit' has no attribute {name!r}")
