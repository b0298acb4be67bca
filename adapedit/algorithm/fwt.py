"""FWT — flexible word-level temporal injection (ALGORITHM.md §6): τ per word from the
calibration pass, ``τ_default``, ``τ_self`` and the per-step injection gates."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from adapedit.algorithm.plan import EditPlan
from adapedit.config import EditConfig


def token_embeddings(
    maps: torch.Tensor, hidden: torch.Tensor, alpha_m: float | None
) -> torch.Tensor:
    """Eq. 5–6: token embeddings ``E_c* = M̄ᵀ E_V`` with rows L2-normalised.

    Args:
        maps: [P, T] cross-attention probabilities (mean over heads, and layers/steps).
        hidden: [P, d] input hidden states of the layer (``E_V``).
        alpha_m: values of ``maps`` below it become 0 first; ``None`` disables the mask.

    Returns:
        [T, d]; a token whose masked column is all zero gets a zero row.
    """
    if alpha_m is not None:
        maps = torch.where(maps < alpha_m, torch.zeros_like(maps), maps)  # [P, T]
    col = maps.sum(dim=0, keepdim=True)  # [1, T]
    maps = torch.where(col > 0, maps / col.clamp_min(torch.finfo(maps.dtype).tiny), 0.0)
    emb = maps.transpose(0, 1) @ hidden  # [T, d]
    return F.normalize(emb, dim=-1)


def mean_embedding(token_emb: torch.Tensor, tokens: Sequence[int]) -> torch.Tensor:
    """L2-normalised mean of the rows ``tokens`` of ``token_emb`` [T, d] → [d]."""
    return F.normalize(token_emb[list(tokens)].mean(dim=0), dim=-1)


def tau_from_similarity(a: torch.Tensor, rule: str, lambda_tau: float) -> torch.Tensor:
    """Eq. 7. ``paper``: ``clamp(λ_τ (1 − exp(A − 1)), 0, 1)``;
    ``released``: ``clamp(exp(1 − A) − 1, 0, 1)``."""
    if rule == "paper":
        return (lambda_tau * (1.0 - torch.exp(a - 1.0))).clamp(0.0, 1.0)
    return (torch.exp(1.0 - a) - 1.0).clamp(0.0, 1.0)


@dataclass(frozen=True)
class WordTau:
    """τ of one word of the edit prompt; ``similarity`` is ``A`` (None for keywords/fixed)."""

    word: str
    tokens: tuple[int, ...]
    tau: float
    similarity: float | None
    keyword: bool


@dataclass(frozen=True, eq=False)
class TauPlan:
    """The temporal plan of an edit: τ per word and per token [77] (float64, so that
    ``⌊τ·(N+1)⌋`` counts steps exactly as P2P's Python floats do), ``τ_self`` and why a fixed
    τ was used (``fallback``), if it was."""

    words: tuple[WordTau, ...]
    token_tau: torch.Tensor
    tau_self: float
    tau_default: float
    fallback: str | None = None


def fixed_tau(plan: EditPlan, config: EditConfig, reason: str | None) -> TauPlan:
    """Every token gets ``tau_fixed`` and self-attention ``tau_self_fixed`` (P2P)."""
    n = plan.target.max_length
    kw = set(plan.keywords)
    words = tuple(
        WordTau(w.text, w.tokens, config.tau_fixed, None, bool(kw & set(w.tokens)))
        for w in plan.target.words
    )
    return TauPlan(
        words,
        torch.full((n,), config.tau_fixed, dtype=torch.float64),
        config.tau_self_fixed,
        config.tau_fixed,
        reason,
    )


def compute_tau(plan: EditPlan, token_emb: torch.Tensor, config: EditConfig) -> TauPlan:
    """§6 steps 5–8: τ per word from the calibration embeddings ``token_emb`` [77, d]."""
    if not plan.keywords:
        return fixed_tau(plan, config, "no keyword: the prompts align token for token")
    e_k = mean_embedding(token_emb, plan.keywords)  # [d]
    kw = set(plan.keywords)
    words: list[WordTau] = []
    for w in plan.target.words:
        if kw & set(w.tokens):
            words.append(WordTau(w.text, w.tokens, 0.0, None, True))
            continue
        a = torch.dot(mean_embedding(token_emb, w.tokens), e_k)
        tau = float(tau_from_similarity(a, config.tau_rule, config.lambda_tau))
        words.append(WordTau(w.text, w.tokens, tau, float(a), False))
    n_low = sum(1 for w in words if w.tau < 0.1)
    tau_default = min(max(config.tau_fixed - n_low / max(len(words), 1), 0.0), 1.0)
    token_tau = torch.full((plan.target.max_length,), tau_default, dtype=torch.float64)
    for w in words:
        token_tau[list(w.tokens)] = w.tau
    return TauPlan(tuple(words), token_tau, tau_default, tau_default)


def cross_gates(token_tau: torch.Tensor, steps: int, calls: int | None = None) -> torch.Tensor:
    """Injection gates [calls, T]: 1 at UNet call ``s`` where ``s < ⌊τ_j · (N + 1)⌋``, else 0.

    ``N`` is the sampler's nominal number of steps, as P2P counts (its alphas have ``N + 1``
    rows, indexed by UNet call); ``calls`` the UNet calls of the pass (``N``, or ``N + 1`` with
    PNDM's PLMS warm-up; default ``N``)."""
    calls = steps if calls is None else calls
    ends = torch.tensor([int(t * (steps + 1)) for t in token_tau.tolist()])  # [T]
    return (torch.arange(calls)[:, None] < ends[None, :]).float()


def self_steps(tau_self: float, steps: int) -> int:
    """Number of leading UNet calls whose edit-branch self-attention is the source's:
    ``⌊τ_self · N⌋`` of the sampler's nominal ``N`` steps (P2P's count)."""
    return int(tau_self * steps)
