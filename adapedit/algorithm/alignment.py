"""Token alignment between the source and the edit prompt (ALGORITHM.md §4, after P2P).

Works with any Hugging Face CLIP-style tokenizer that has a start and an end token and reports
character offsets. A *word* is a run of letters/digits (apostrophes inside kept) of the prompt
text; its tokens are the BPE tokens whose character span lies in it, so multi-token words
("photorealistic" → ``photo``, ``realistic``) and punctuation ("grass," → ``grass``, ``,``) are
handled. Token positions are indices into the padded 77-token sequence: 0 is the start token,
words begin at 1.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from adapedit.errors import PromptError

MAX_TOKENS = 77
_WORD_RE = re.compile(r"\w+(?:['’]\w+)*")


@dataclass(frozen=True)
class Word:
    """One word of a prompt: its text (as written) and its token positions."""

    text: str
    tokens: tuple[int, ...]


@dataclass(frozen=True)
class TokenizedPrompt:
    """A prompt with its token ids (start and end included, unpadded) and its words."""

    text: str
    ids: tuple[int, ...]
    words: tuple[Word, ...]
    max_length: int = MAX_TOKENS

    @property
    def length(self) -> int:
        """Number of real tokens, start and end included."""
        return len(self.ids)

    def find(self, word: str) -> tuple[int, ...]:
        """Token positions of every occurrence of ``word`` (case-insensitive); empty if absent."""
        key = word.strip().lower()
        return tuple(t for w in self.words if w.text.lower() == key for t in w.tokens)

    def positions(
        self, word: str, *, where: str = "prompt", field: str | None = None
    ) -> tuple[int, ...]:
        """Token positions of every occurrence of ``word`` (case-insensitive).

        Raises:
            PromptError: the word is not a word of this prompt (``field`` names the option that
                asked for it).
        """
        found = self.find(word)
        if not found:
            raise PromptError(
                f"word {word!r} is not in the {where}",
                where=f"{where} {self.text!r}",
                expected=f"one of {[w.text for w in self.words]}",
                got=word,
                field=field,
            )
        return found


def tokenize(
    tokenizer,
    prompt: str,
    *,
    where: str = "prompt",
    field: str | None = None,
    max_length: int = MAX_TOKENS,
) -> TokenizedPrompt:
    """Tokenize ``prompt`` without truncation and split it into words.

    Raises:
        PromptError: the prompt needs more than ``max_length`` tokens (start and end included);
            ``field`` (``source``/``target``) names the prompt.
    """
    if not isinstance(prompt, str):
        raise PromptError(
            "prompt must be a string", where=where, got=type(prompt).__name__, field=field
        )
    # verbose=False: a prompt over the length is refused below, without transformers' warning
    enc = tokenizer(
        prompt,
        add_special_tokens=True,
        truncation=False,
        return_offsets_mapping=True,
        verbose=False,
    )
    ids = tuple(int(i) for i in enc["input_ids"])
    if len(ids) > max_length:
        raise PromptError(
            "prompt is too long",
            where=f"{where} {prompt[:60]!r}{'…' if len(prompt) > 60 else ''}",
            expected=f"at most {max_length} tokens, start and end tokens included",
            got=f"{len(ids)} tokens",
            field=field,
        )
    offsets = enc["offset_mapping"]
    words = []
    for m in _WORD_RE.finditer(prompt):
        toks = tuple(
            i for i, (a, b) in enumerate(offsets) if b > a and a < m.end() and b > m.start()
        )
        if toks:
            words.append(Word(m.group(0), toks))
    return TokenizedPrompt(prompt, ids, tuple(words), max_length)


@dataclass(frozen=True)
class TokenMap:
    """How source probabilities are carried onto edit tokens (``M_src→edt``) and which edit
    tokens are aligned (``a_j``).

    ``matrix`` [77, 77]: ``M_src→edt = M @ matrix`` — column ``j`` weighs the source tokens that
    edit token ``j`` takes: one-hot for refine (P2P's ``M[..., mapper]``, exactly: products with
    exact 0s and 1s), ``1/k`` spreads for replace. ``alphas`` [77]: 1 aligned, 0 inserted.
    """

    alphas: torch.Tensor
    matrix: torch.Tensor

    @property
    def index(self) -> torch.Tensor | None:
        """[77] the source position of each edit token when every column is one-hot (refine:
        P2P's mapper), else None."""
        one_hot = ((self.matrix == 1).sum(dim=0) == 1) & ((self.matrix != 0).sum(dim=0) == 1)
        return self.matrix.argmax(dim=0) if bool(one_hot.all()) else None


def _global_align(x: tuple[int, ...], y: tuple[int, ...]) -> np.ndarray:
    """Needleman–Wunsch traceback matrix (gap 0, match +1, mismatch −1) with P2P's ties:
    left (1, edit token inserted) before up (2, source token dropped) before diagonal (3)."""
    gap, match, mismatch = 0, 1, -1
    nx, ny = len(x), len(y)
    score = np.zeros((nx + 1, ny + 1), dtype=np.int64)
    score[0, 1:] = np.arange(1, ny + 1) * gap
    score[1:, 0] = np.arange(1, nx + 1) * gap
    trace = np.zeros((nx + 1, ny + 1), dtype=np.int64)
    trace[0, 1:], trace[1:, 0], trace[0, 0] = 1, 2, 4
    for i in range(1, nx + 1):
        for j in range(1, ny + 1):
            left = score[i, j - 1] + gap
            up = score[i - 1, j] + gap
            diag = score[i - 1, j - 1] + (match if x[i - 1] == y[j - 1] else mismatch)
            best = max(left, up, diag)
            score[i, j] = best
            trace[i, j] = 1 if best == left else 2 if best == up else 3
    return trace


def refine_alignment(source: TokenizedPrompt, target: TokenizedPrompt) -> list[int]:
    """For each edit token ``j < target.length``: its source position, or -1 if inserted."""
    trace = _global_align(source.ids, target.ids)
    i, j = source.length, target.length
    mapped: list[int] = []
    while i > 0 or j > 0:
        move = trace[i, j]
        if move == 3:
            i, j = i - 1, j - 1
            mapped.append(i)
        elif move == 1:
            j -= 1
            mapped.append(-1)
        elif move == 2:
            i -= 1
        else:  # pragma: no cover - (0, 0) is only reached by the loop condition
            break
    mapped.reverse()
    return mapped


def refine_map(source: TokenizedPrompt, target: TokenizedPrompt) -> TokenMap:
    """The refine mapper: P2P's global alignment; positions past the edit prompt map to
    themselves (padding) and count as aligned."""
    n = target.max_length
    mapped = refine_alignment(source, target)
    index = torch.arange(n, dtype=torch.long)
    alphas = torch.ones(n)
    for j, m in enumerate(mapped):
        if m >= 0:
            index[j] = m
        else:
            alphas[j] = 0.0
    matrix = torch.zeros(n, n)
    matrix[index, torch.arange(n)] = 1.0  # column j: the source token edit token j takes
    return TokenMap(alphas=alphas, matrix=matrix)


def swapped_words(source: TokenizedPrompt, target: TokenizedPrompt) -> list[int]:
    """Indices of the words that differ between equal-length prompts (replace edits).

    Raises:
        PromptError: the prompts do not have the same number of words.
    """
    if len(source.words) != len(target.words):
        raise PromptError(
            "replace needs prompts with the same number of words",
            where=f"source {source.text!r} / target {target.text!r}",
            expected=f"{len(source.words)} words in both",
            got=f"{len(source.words)} and {len(target.words)} words",
            field="source",
        )
    return [
        k
        for k, (a, b) in enumerate(zip(source.words, target.words, strict=True))
        if a.text.lower() != b.text.lower()
    ]


def replace_map(source: TokenizedPrompt, target: TokenizedPrompt) -> TokenMap:
    """The replace mapper: a [77, 77] matrix, identity except at swapped words; a swapped word of
    ``k`` target tokens spreads each of its source tokens over them with weight ``1/k``.

    Raises:
        PromptError: unequal word counts, or the prompts differ outside the swapped words.
    """
    n = target.max_length
    matrix = torch.zeros(n, n)
    i = j = 0
    for k in swapped_words(source, target):
        s_toks, t_toks = source.words[k].tokens, target.words[k].tokens
        if s_toks[0] - i != t_toks[0] - j:
            raise PromptError(
                "replace needs prompts that differ only in whole words",
                where=f"before word {k} ({source.words[k].text!r} → {target.words[k].text!r})",
                expected="identical tokens outside the swapped words",
                got=f"source {source.text!r} / target {target.text!r}",
                field="target",
            )
        while i < s_toks[0]:
            matrix[i, j] = 1.0
            i, j = i + 1, j + 1
        if len(s_toks) == len(t_toks):
            matrix[list(s_toks), list(t_toks)] = 1.0
        else:
            matrix[np.ix_(s_toks, t_toks)] = 1.0 / len(t_toks)
        i, j = i + len(s_toks), j + len(t_toks)
    while i < n and j < n:
        matrix[i, j] = 1.0
        i, j = i + 1, j + 1
    return TokenMap(alphas=torch.ones(n), matrix=matrix)


def equalizer(target: TokenizedPrompt, weights: tuple[tuple[str, float], ...]) -> torch.Tensor:
    """P2P's equalizer [77]: 1 everywhere, ``factor`` at the tokens of each reweighted word.

    Raises:
        PromptError: a reweighted word is not a word of the edit prompt.
    """
    eq = torch.ones(target.max_length)
    for word, factor in weights:
        eq[list(target.positions(word, where="edit prompt (reweight)", field="reweight"))] = factor
    return eq
