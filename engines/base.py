"""The one ``Runner`` interface over every backend, symbolic shapes, and build profiles.

A runner wraps one graph of an export (its manifest :class:`GraphSpec`), takes and returns
torch tensors on the runner's device, and is a context manager (``activate`` on enter,
``deactivate`` on exit), in the manner of Polygraphy's runners.

The hot path is static: the first call with given input shapes checks the feeds against the
manifest, evaluates the output shapes once and lets the backend plan for them (output buffers,
bindings); later calls with the same shapes, dtypes and devices only run.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache

import sympy
import torch

from adapedit.errors import EngineError
from adapedit.spec import GraphSpec, TensorSpec

TORCH_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
}
_SYMBOL = re.compile(r"^[A-Za-z_]\w*$")


@lru_cache(maxsize=4096)
def _expr(text: str) -> sympy.Expr:
    return sympy.sympify(text)


def eval_dim(dim: int | str, symbols: dict[str, int]) -> int:
    """A manifest dim (an int, or an expression of ``batch``, ``lh``, ``lw``) as an int."""
    if isinstance(dim, int):
        return dim
    value = _expr(dim).subs(symbols)
    if not value.is_Integer:
        raise EngineError(
            "cannot evaluate a symbolic dim",
            where=dim,
            expected=f"values for {sorted(map(str, _expr(dim).free_symbols))}",
            got=symbols,
        )
    return int(value)


def eval_shape(spec: TensorSpec, symbols: dict[str, int]) -> tuple[int, ...]:
    return tuple(eval_dim(d, symbols) for d in spec.shape)


def solve_symbols(spec: GraphSpec, shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """The values of the symbols of a graph's input dims from concrete input shapes. Dims of the
    form ``k*x`` or ``x`` fix ``x``; the others are then checked against the result."""
    symbols: dict[str, int] = {}
    for t in spec.inputs:
        for dim, n in zip(t.shape, shapes.get(t.name, ()), strict=False):
            if isinstance(dim, int):
                continue
            e = _expr(dim)
            free = e.free_symbols
            if len(free) == 1:
                (x,) = free
                coef = e / x
                if coef.is_Integer and n % int(coef) == 0:
                    symbols.setdefault(str(x), n // int(coef))
    return symbols


class Runner(ABC):
    """One graph on one backend: ``infer(feeds) -> outputs`` with torch tensors."""

    def __init__(self, spec: GraphSpec, name: str) -> None:
        self.spec = spec
        self.name = name
        self.is_active = False
        self._planned: tuple | None = None  # what the current plan is for

    # lifecycle -------------------------------------------------------------------------------
    def __enter__(self) -> Runner:
        self.activate()
        return self

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def activate(self) -> None:
        if not self.is_active:
            self._activate()
            self.is_active = True

    def deactivate(self) -> None:
        if self.is_active:
            self._deactivate()
            self.is_active = False
            self._planned = None

    # inference -------------------------------------------------------------------------------
    def infer(
        self,
        feeds: dict[str, torch.Tensor],
        symbols: dict[str, int] | None = None,
        *,
        check: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Run the graph. ``feeds`` must hold exactly the graph's inputs, with the manifest's
        dtypes and ranks; ``symbols`` (``batch``, ``lh``, ``lw``) may be given where the inputs
        alone do not fix them (a UNet segment fed only products such as ``64*lh*lw``). Feeds
        are checked when their shapes, dtypes or devices change (always with ``check``).
        Outputs live in buffers the runner reuses on its next call."""
        if not self.is_active:
            self.activate()
        key = (
            tuple((k, x.shape, x.dtype, x.device) for k, x in feeds.items()),
            tuple(sorted(symbols.items())) if symbols else (),
        )
        if key != self._planned or check:
            solved = self.check_feeds(feeds, symbols)
            inputs = {k: tuple(x.shape) for k, x in feeds.items()}
            self._plan(inputs, self.output_shapes(solved))
            self._planned = key
        return self._run(feeds)

    def check_feeds(
        self, feeds: dict[str, torch.Tensor], symbols: dict[str, int] | None = None
    ) -> dict[str, int]:
        """Names, dtypes, ranks and fixed dims against the manifest; returns the symbol values.

        Raises:
            EngineError: naming the input and what was expected.
        """
        names = [t.name for t in self.spec.inputs]
        if set(feeds) != set(names):
            raise EngineError(
                "wrong inputs", where=self.name, expected=sorted(names), got=sorted(feeds)
            )
        for t in self.spec.inputs:
            x = feeds[t.name]
            if x.dtype != TORCH_DTYPES[t.dtype]:
                raise EngineError(
                    f"input {t.name!r} has the wrong dtype",
                    where=self.name,
                    expected=t.dtype,
                    got=str(x.dtype),
                )
            if x.dim() != len(t.shape) or any(
                isinstance(d, int) and d != n for d, n in zip(t.shape, x.shape, strict=True)
            ):
                raise EngineError(
                    f"input {t.name!r} has the wrong shape",
                    where=self.name,
                    expected=list(t.shape),
                    got=list(x.shape),
                )
        solved = solve_symbols(self.spec, {k: tuple(v.shape) for k, v in feeds.items()})
        symbols = {**solved, **(symbols or {})}
        for t in self.spec.inputs:
            want = eval_shape(t, symbols)
            if want != tuple(feeds[t.name].shape):
                raise EngineError(
                    f"input {t.name!r} does not agree with the other inputs",
                    where=self.name,
                    expected=list(want),
                    got=list(feeds[t.name].shape),
                )
        return symbols

    def output_shapes(self, symbols: dict[str, int]) -> dict[str, tuple[int, ...]]:
        return {t.name: eval_shape(t, symbols) for t in self.spec.outputs}

    @abstractmethod
    def _activate(self) -> None: ...

    @abstractmethod
    def _deactivate(self) -> None: ...

    @abstractmethod
    def _plan(
        self,
        input_shapes: dict[str, tuple[int, ...]],
        output_shapes: dict[str, tuple[int, ...]],
    ) -> None:
        """Prepare for feeds of new shapes: output buffers of ``output_shapes``, bindings."""

    @abstractmethod
    def _run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run with checked feeds of the planned shapes; returns the output buffers."""


def require_cuda(what: str, where: str, expected: str) -> None:
    """Raises an :class:`EngineError` when torch sees no CUDA device, which ``what`` needs."""
    if not torch.cuda.is_available():
        raise EngineError(
            f"{what} needs a CUDA device, and torch sees none",
            where=where,
            expected=expected,
            got=f"torch {torch.__version__} without CUDA",
        )


class GraphSlots:
    """Which CUDA graph an engine call replays, by the device addresses it binds.

    A CUDA graph replays the kernels it captured with the addresses it captured them with: new
    data at the same addresses is a replay, but any changed address (an input bound elsewhere,
    output buffers made for new shapes) needs a graph of its own. Each distinct set of bound
    addresses gets a graph id (0, 1, …; at most ``limit``, after which calls run uncaptured,
    id -1), and :meth:`slot` says how many calls that id has run before, so a backend can warm
    up before it captures. Both CUDA-graph paths use it: ONNX Runtime's (the id is the run's
    ``gpu_graph_id``; ONNX Runtime warms up and captures per id) and TensorRT's (the runner
    captures and replays a torch CUDA graph per id).
    """

    def __init__(self, limit: int = 4) -> None:
        if limit < 1:
            raise EngineError("at least one CUDA graph", where="GraphSlots", got=limit)
        self.limit = limit
        self._ids: dict[tuple[int, ...], int] = {}
        self._runs: list[int] = []

    def slot(self, addresses: tuple[int, ...]) -> tuple[int, int]:
        """``(graph id, calls of that id before this one)`` for a call binding ``addresses``;
        ``(-1, 0)`` once ``limit`` graphs exist (run without a graph)."""
        gid = self._ids.get(addresses)
        if gid is None:
            if len(self._ids) >= self.limit:
                return -1, 0
            gid = self._ids[addresses] = len(self._ids)
            self._runs.append(0)
        runs = self._runs[gid]
        self._runs[gid] += 1
        return gid, runs

    def clear(self) -> None:
        """Forget every graph (the engine was released)."""
        self._ids.clear()
        self._runs.clear()


@contextmanager
def ordered_with_caller(stream: torch.cuda.Stream) -> Iterator[None]:
    """Work issued inside runs on ``stream`` (a runner's own), after what the caller's current
    stream has queued (its inputs) and before what the caller queues next (reading the
    outputs), ordered with events: no host wait. A caller already on ``stream`` needs
    nothing."""
    caller = torch.cuda.current_stream(stream.device)
    if caller == stream:
        yield
        return
    stream.wait_stream(caller)
    with torch.cuda.stream(stream):
        try:
            yield
        finally:  # a run that failed may have queued kernels reading the caller's tensors
            caller.wait_stream(stream)


@dataclass(frozen=True)
class Profile:
    """The range of batch sizes and image sizes (pixels) an engine is built for: ``(min, opt,
    max)`` each. TensorRT builds one optimisation profile from it; every backend refuses a
    request outside it."""

    batch: tuple[int, int, int] = (1, 4, 4)
    height: tuple[int, int, int] = (512, 512, 512)
    width: tuple[int, int, int] = (512, 512, 512)

    def __post_init__(self) -> None:
        for name in ("batch", "height", "width"):
            lo, opt, hi = getattr(self, name)
            if not (1 <= lo <= opt <= hi):
                raise EngineError(
                    "invalid profile range",
                    where=f"Profile.{name}",
                    expected="1 ≤ min ≤ opt ≤ max",
                    got=(lo, opt, hi),
                )

    def check(self, batch: int, height: int, width: int, where: str) -> None:
        """Raises EngineError when a request falls outside the profile."""
        for name, v in (("batch", batch), ("height", height), ("width", width)):
            lo, _, hi = getattr(self, name)
            if not lo <= v <= hi:
                raise EngineError(
                    f"{name} is outside the built profile",
                    where=where,
                    expected=f"{lo} ≤ {name} ≤ {hi}",
                    got=v,
                    field=name,
                )

    def symbols(self, which: int, vae_scale: int, unet_multiple: int) -> dict[str, int]:
        """Symbol values (``batch``, ``lh``, ``lw``) at ``which`` = 0 (min), 1 (opt), 2 (max)."""
        f = vae_scale * unet_multiple
        return {
            "batch": self.batch[which],
            "lh": self.height[which] // f,
            "lw": self.width[which] // f,
        }
