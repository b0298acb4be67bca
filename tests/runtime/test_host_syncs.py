"""No host round trip inside an edit's steps on the fused path.

On a GPU, an operation that moves data between host and device (a tensor made from Python
values, indexing with a Python list, reading a value back) makes the host wait for the device
(``cudaStreamSynchronize``): once per UNet call, it costs the launch-bound loop its overlap. The
GPU script counts the real syncs with ``torch.cuda.set_sync_debug_mode``; here, on the CPU, every
such operation is caught where it is written: inside the runtime's UNet calls and the
controller's step hook, from the second step of each pass to the last."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from adapedit.config import EditConfig, SamplerConfig
from adapedit.pipelines.controller import EditController
from adapedit.runtime.session import EditSession

#: torch functions that cross between host and device (or read a device value on the host).
HOST_CROSSINGS = {
    "tensor",
    "as_tensor",
    "asarray",
    "from_numpy",
    "item",
    "tolist",
    "numpy",
    "cpu",
    "nonzero",
    "__float__",
    "__int__",
    "__bool__",
    "__index__",
}


class HostCrossings(TorchFunctionMode):
    """Records every host crossing made while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name in HOST_CROSSINGS:
            self.seen.append(name)
        elif name == "__getitem__" and any(
            isinstance(i, list) for i in (args[1] if isinstance(args[1], tuple) else (args[1],))
        ):
            self.seen.append("__getitem__ with a Python list")
        elif name == "to" and any(str(a) == "cpu" for a in (*args[1:], *(kwargs or {}).values())):
            self.seen.append("to cpu")
        return func(*args, **(kwargs or {}))


@pytest.fixture()
def fused_session(tiny_fused_engines):
    with EditSession(tiny_fused_engines, form="fused") as session:
        yield session


def test_a_fused_edit_makes_no_host_crossing_after_its_first_step(fused_session, monkeypatch):
    crossings: dict[tuple[int, int], list[str]] = {}  # (UNet batch, step) → crossings
    unet, after_step = fused_session.unet, EditController.after_step

    def watched_unet(x, t, embeddings, controller, step):
        if step == 0:  # the first step loads the edit's controls onto the device
            return unet(x, t, embeddings, controller, step)
        with HostCrossings() as mode:
            out = unet(x, t, embeddings, controller, step)
        crossings[(x.shape[0], step)] = mode.seen
        return out

    def watched_after_step(self, step, latents):
        with HostCrossings() as mode:
            out = after_step(self, step, latents)
        crossings[(-1, step)] = mode.seen
        return out

    monkeypatch.setattr(fused_session, "unet", watched_unet)
    monkeypatch.setattr(EditController, "after_step", watched_after_step)
    edit = EditConfig(local_blend=("dog", "cat"))  # LocalBlend's maps are recorded every step
    fused_session.edit("a dog on the grass", "a cat on the grass", edit, SamplerConfig(steps=4))
    assert {b for b, _ in crossings} == {2, 4, -1}  # both passes and the step hook watched
    assert {k: v for k, v in crossings.items() if v} == {}


def test_the_watch_sees_a_host_crossing():
    x = torch.arange(6.0)
    with HostCrossings() as mode:
        torch.tensor([1.0])
        x[[0, 2]]
        float(x[1])
        x[1:3].sum()  # stays on the device
    assert mode.seen == ["tensor", "__getitem__ with a Python list", "__float__"]
