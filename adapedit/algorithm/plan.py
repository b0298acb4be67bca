"""The EditPlan: everything about an edit that follows from the prompts and the config alone
(alignment, keywords, equalizer, LocalBlend tokens), built and validated before any UNet call."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from adapedit.algorithm.alignment import (
    TokenizedPrompt,
    TokenMap,
    equalizer,
    refine_map,
    replace_map,
    swapped_words,
    tokenize,
)
from adapedit.config import EditConfig
from adapedit.errors import PromptError


@dataclass(frozen=True, eq=False)
class EditPlan:
    """A validated edit of ``source`` into ``target``.

    Attributes:
        token_map: carries source probabilities onto edit tokens, with ``a_j``.
        keywords: edit-token positions of the keywords ``c*_k`` (§4).
        equalizer: [77] reweight factors (ones unless ``edit_type == 'reweight'``).
        blend_source / blend_target: LocalBlend token positions in each prompt.
    """

    source: TokenizedPrompt
    target: TokenizedPrompt
    config: EditConfig
    token_map: TokenMap
    keywords: tuple[int, ...]
    equalizer: torch.Tensor | None
    blend_source: tuple[int, ...] = field(default=())
    blend_target: tuple[int, ...] = field(default=())

    @property
    def keyword_words(self) -> list[str]:
        """The edit prompt's words that hold at least one keyword token."""
        kw = set(self.keywords)
        return [w.text for w in self.target.words if kw.intersection(w.tokens)]


def build_plan(tokenizer, source: str, target: str, config: EditConfig) -> EditPlan:
    """Tokenize, align and validate. Every error about prompts and words is raised here.

    Raises:
        PromptError: a prompt over 77 tokens, replace with unequal word counts, a LocalBlend or
            reweight word that is not in its prompt.
    """
    src = tokenize(tokenizer, source, where="source prompt", field="source")
    tgt = tokenize(tokenizer, target, where="edit prompt", field="target")
    if config.edit_type == "replace":
        token_map = replace_map(src, tgt)
        keywords = tuple(t for k in swapped_words(src, tgt) for t in tgt.words[k].tokens)
    else:
        token_map = refine_map(src, tgt)
        keywords = tuple(j for j in range(1, tgt.length - 1) if token_map.alphas[j] == 0)
    eq = equalizer(tgt, config.reweight) if config.edit_type == "reweight" else None
    blend_src: tuple[int, ...] = ()
    blend_tgt: tuple[int, ...] = ()
    all_words = sorted({w.text for w in src.words + tgt.words})
    for word in config.local_blend:
        in_src, in_tgt = src.find(word), tgt.find(word)
        if not in_src and not in_tgt:
            raise PromptError(
                f"local-blend word {word!r} is in neither prompt",
                where=f"source {src.text!r} / edit {tgt.text!r}",
                expected=f"a word of either prompt: {all_words}",
                got=word,
                field="local_blend",
            )
        blend_src += in_src
        blend_tgt += in_tgt
    return EditPlan(src, tgt, config, token_map, keywords, eq, blend_src, blend_tgt)
