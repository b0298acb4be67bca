"""The calibration cache: recent calibration passes' statistics, so that an edit that changes only
edit-side options (``λ_S``, ``λ_SV``, ``λ_τ``, the τ rule, ``α_m``, LocalBlend, reweight, the
edit type of the same target) runs the edit pass alone.

What is kept is :class:`~adapedit.pipelines.controller.CalibrationStats` — never τ — keyed by
everything the pass depends on (:func:`calibration_key`). The cache is bounded in bytes (least
recently used out first) and safe to share between threads.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from adapedit.config import DEFAULT_CACHE_BYTES, EditConfig, SamplerConfig
from adapedit.errors import ConfigError
from adapedit.pipelines.controller import CalibrationStats


@dataclass(frozen=True)
class CalibrationKey:
    """Everything a calibration pass depends on.

    Attributes:
        model: the model or engine folder's identity (a digest of what it computes with).
        target: the edit prompt (the pass runs ``[u_edt, c_edt]`` alone).
        start: sha256 of the initial latent's bytes (the seed and size, or the inversion's
            last latent for a given image).
        scheduler / steps / guidance: the pass's sampler (``steps`` = the calibration steps).
        calibration / downscale: what the recorder averages (mean or last step, resolution).
    """

    model: str
    target: str
    start: str
    scheduler: str
    steps: int
    guidance: float
    calibration: str
    downscale: int


def calibration_key(
    model: str,
    target: str,
    x0: torch.Tensor,
    edit: EditConfig,
    calib_sampler: SamplerConfig,
) -> CalibrationKey:
    """The key of the calibration pass of ``target`` from ``x0`` [1, 4, h, w] under
    ``calib_sampler`` (its ``steps`` the calibration steps) and ``edit``'s recorder options."""
    start = hashlib.sha256(x0.detach().float().cpu().contiguous().numpy().tobytes())
    start.update(str(tuple(x0.shape)).encode())
    return CalibrationKey(
        model,
        target,
        start.hexdigest(),
        calib_sampler.scheduler,
        calib_sampler.steps,
        float(calib_sampler.guidance),
        edit.calibration,
        edit.calibration_downscale,
    )


class CalibrationCache:
    """A thread-safe LRU of :class:`CalibrationStats`, at most ``max_bytes`` bytes in all.

    An entry larger than the bound is not kept. Tensors stay on the device they were recorded on.

    Raises:
        ConfigError: ``max_bytes`` is not a positive integer.
    """

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
            raise ConfigError(
                "the calibration cache's size must be a positive byte count",
                where="calibration cache",
                expected="an integer > 0 (bytes), or no cache at all",
                got=repr(max_bytes),
                field="calibration_cache_bytes",
            )
        self.max_bytes = max_bytes
        self._entries: OrderedDict[CalibrationKey, CalibrationStats] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        """Bytes held now (≤ :attr:`max_bytes`)."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: CalibrationKey) -> CalibrationStats | None:
        """The statistics stored under ``key`` (now the most recently used), or None."""
        with self._lock:
            stats = self._entries.get(key)
            if stats is not None:
                self._entries.move_to_end(key)
            return stats

    def put(self, key: CalibrationKey, stats: CalibrationStats) -> None:
        """Store ``stats`` under ``key``, dropping the least recently used entries to stay
        within the bound (an entry larger than the bound is not stored)."""
        size = stats.nbytes
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            if size > self.max_bytes:
                return
            while self._entries and self._bytes + size > self.max_bytes:
                _, dropped = self._entries.popitem(last=False)
                self._bytes -= dropped.nbytes
            self._entries[key] = stats
            self._bytes += size
