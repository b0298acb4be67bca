"""AdapEdit: training-free text-based image editing on Stable Diffusion v1.4.

``adapedit`` holds the algorithm (alignment, EditPlan, FWT, DPS, the per-step edit) and the
PyTorch reference pipeline; ``adapedit.export``, ``adapedit.engines`` and ``adapedit.runtime``
hold the exporter, the engines and the low-latency runtime.
"""

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

__version__ = "0.1.0"

__all__ = [
    "AdapEditError",
    "ConfigError",
    "EditConfig",
    "EngineError",
    "ExportError",
    "InputError",
    "ManifestError",
    "ModelError",
    "PromptError",
    "SamplerConfig",
    "__version__",
]
