"""Batch layouts: which sample of a UNet call is which branch (prompt × CFG half).

Every place that picks a branch out of a batch — the controllers, the sampling loop, the fused
graph — asks a :class:`BatchLayout` for its index; no code indexes branches by position. A layout
is built from its prompts, so the classifier-free-guidance order holds by construction: the
unconditional half first, then the conditional half, the prompts in the same order in both
(``[u_src, u_edt, c_src, c_edt]`` for an edit, ALGORITHM.md §3).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from adapedit.errors import AdapEditError

PROMPTS = ("source", "edit")
HALVES = ("uncond", "cond")


def numbered_edit(k: int) -> str:
    """The name of the ``k``-th of several edit prompts of one pass (``edit:0``, ``edit:1``, …),
    as in a sweep of many edit configurations of one source."""
    return f"edit:{k}"


def is_prompt(name: str) -> bool:
    """A known prompt name: ``source``, ``edit`` or a :func:`numbered_edit`."""
    head, _, number = name.partition(":")
    return name in PROMPTS or (head == "edit" and number.isdigit())


@dataclass(frozen=True)
class BatchLayout:
    """The branches of one UNet call.

    Attributes:
        prompts: the prompts of the latents, in order (``source``, ``edit``, or numbered edits
            ``edit:k`` when one pass carries several).
        guided: with classifier-free guidance (an unconditional and a conditional half) or
            conditional only (guidance 1, e.g. DDIM inversion).
    """

    prompts: tuple[str, ...]
    guided: bool = True

    def __post_init__(self) -> None:
        if not self.prompts or not all(isinstance(p, str) and is_prompt(p) for p in self.prompts):
            raise AdapEditError(
                "a batch layout needs known prompts",
                where="BatchLayout",
                expected=f"a non-empty tuple of {PROMPTS} or 'edit:k'",
                got=self.prompts,
            )
        if len(set(self.prompts)) != len(self.prompts):
            raise AdapEditError(
                "a batch layout names each prompt once", where="BatchLayout", got=self.prompts
            )

    @property
    def halves(self) -> tuple[str, ...]:
        return HALVES if self.guided else ("cond",)

    @property
    def size(self) -> int:
        """Samples per UNet call."""
        return len(self.halves) * len(self.prompts)

    @property
    def branches(self) -> tuple[tuple[str, str], ...]:
        """``(prompt, half)`` of every sample, in batch order."""
        return tuple((p, h) for h in self.halves for p in self.prompts)

    def index(self, prompt: str, half: str = "cond") -> int:
        """The batch index of a branch.

        Raises:
            AdapEditError: the layout has no such branch.
        """
        try:
            return self.branches.index((prompt, half))
        except ValueError:
            raise AdapEditError(
                "no such branch in the batch",
                where=f"BatchLayout{self.branches}",
                expected=self.branches,
                got=(prompt, half),
            ) from None

    def latent_index(self, prompt: str) -> int:
        """The position of ``prompt``'s latent among the pass's latents (one per prompt)."""
        return self.prompts.index(prompt)

    def stack(
        self,
        uncond: torch.Tensor | None,
        cond: Mapping[str, torch.Tensor],
        uncond_for: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Text embeddings [size, 77, D] in this layout from the unconditional embedding
        [1, 77, D] (None for a layout without guidance) and one conditional embedding
        [1, 77, D] per prompt; ``uncond_for`` gives some prompts an unconditional embedding of
        their own (negative-prompt inversion)."""
        own = uncond_for or {}
        return torch.cat(
            [own.get(p, uncond) if h == "uncond" else cond[p] for p, h in self.branches]
        )

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """A batch-major tensor [size·k, …] (attention probabilities are [B·H, P, K]) viewed as
        [size, k, …], so ``split(x)[index(...)]`` is one branch.

        Raises:
            AdapEditError: the leading dim is not a multiple of the layout's size.
        """
        if x.shape[0] % self.size:
            raise AdapEditError(
                "tensor does not fit the batch layout",
                where=f"BatchLayout{self.branches}",
                expected=f"a leading dim that is a multiple of {self.size}",
                got=tuple(x.shape),
            )
        return x.view(self.size, x.shape[0] // self.size, *x.shape[1:])

    def with_branch(self, x: torch.Tensor, prompt: str, new: torch.Tensor) -> torch.Tensor:
        """A new tensor equal to ``x`` [size·k, …] except the conditional branch of ``prompt``,
        which is ``new`` [k, …]; ``x`` is left as it is."""
        v = self.split(x)  # [size, k, …]
        i = self.index(prompt, "cond")
        parts = [v[:i]] if i else []  # no empty slices: they trace badly
        parts.append(new[None])
        if i + 1 < self.size:
            parts.append(v[i + 1 :])
        return torch.cat(parts).reshape(x.shape)


#: An edit pass: ``[u_src, u_edt, c_src, c_edt]``.
EDIT = BatchLayout(("source", "edit"))
#: The calibration pass (the edit prompt alone, no edit): ``[u_edt, c_edt]``.
CALIBRATION = BatchLayout(("edit",))
#: Plain generation of the source prompt: ``[u_src, c_src]``.
GENERATION = BatchLayout(("source",))
#: DDIM inversion at guidance 1: ``[c_src]``.
INVERSION = BatchLayout(("source",), guided=False)
