"""Token alignment and the EditPlan (ALGORITHM.md §4).

Token positions index the padded 77-token sequence: 0 is the start token, words begin at 1.
CLIP ids used below (vendored tokenizer): start 49406, end 49407, "a" 320, "dog" 1929,
"photorealistic" → 1153 ("photo") + 16157 ("realistic").
"""

from __future__ import annotations

import pytest
import torch

from adapedit.algorithm.alignment import (
    MAX_TOKENS,
    TokenizedPrompt,
    equalizer,
    refine_alignment,
    refine_map,
    replace_map,
    swapped_words,
    tokenize,
)
from adapedit.algorithm.plan import build_plan
from adapedit.config import EditConfig
from adapedit.errors import PromptError
from adapedit.pipelines.models import load_tokenizer

START, END = 49406, 49407

SRC = "A dog standing on the grass"  # S A dog standing on the grass E → positions 0..7
EDT = "A dog sitting on the grass"  # S A dog sitting on the grass E → positions 0..7


def fake(ids: tuple[int, ...], max_length: int = MAX_TOKENS) -> TokenizedPrompt:
    """A TokenizedPrompt with chosen ids (start and end included) and no words."""
    return TokenizedPrompt(text=str(ids), ids=ids, words=(), max_length=max_length)


# --------------------------------------------------------------------------- word → tokens


def test_multi_token_word_gets_all_its_tokens(tokenizer):
    tp = tokenize(tokenizer, "A photorealistic dog")
    # S(0) A(1) photo(2) realistic(3) dog(4) E(5)
    assert tp.ids == (START, 320, 1153, 16157, 1929, END)
    assert tp.length == 6
    assert tp.positions("photorealistic") == (2, 3)
    assert tp.positions("dog") == (4,)
    assert [w.text for w in tp.words] == ["A", "photorealistic", "dog"]


def test_punctuation_is_not_part_of_the_word(tokenizer):
    tp = tokenize(tokenizer, "A dog standing on the grass, green grass")
    # S(0) A(1) dog(2) standing(3) on(4) the(5) grass(6) ,(7) green(8) grass(9) E(10)
    assert tp.length == 11
    assert tokenizer.decode([tp.ids[7]]).strip() == ","
    assert [w.text for w in tp.words] == [
        "A",
        "dog",
        "standing",
        "on",
        "the",
        "grass",
        "green",
        "grass",
    ]
    assert tp.words[5].tokens == (6,)  # "grass," → only the grass token, not the comma
    assert all(7 not in w.tokens for w in tp.words)  # the comma belongs to no word
    # repeated word: every occurrence
    assert tp.positions("grass") == (6, 9)


def test_repeated_words_and_case_insensitivity(tokenizer):
    tp = tokenize(tokenizer, "A Dog and a dog")
    # S(0) A(1) Dog(2) and(3) a(4) dog(5) E(6)
    assert tp.positions("dog") == (2, 5)
    assert tp.positions("DOG") == (2, 5)
    assert tp.positions("a") == (1, 4)
    assert tp.find(" Dog ") == (2, 5)  # surrounding spaces ignored


def test_absent_word_finds_nothing_and_positions_raises(tokenizer):
    tp = tokenize(tokenizer, "A dog")
    assert tp.find("cat") == ()
    with pytest.raises(PromptError, match="cat"):
        tp.positions("cat")


def test_prompt_of_77_tokens_is_accepted(tokenizer):
    tp = tokenize(tokenizer, " ".join(["a"] * 75))  # 75 words + start + end = 77
    assert tp.length == 77


def test_prompt_over_77_tokens_raises_with_token_count(capfd):
    prompt = " ".join(["a"] * 76)  # 76 words + start + end = 78 tokens
    fresh = load_tokenizer()  # transformers warns once per tokenizer: one that never has
    with pytest.raises(PromptError, match="78 tokens") as info:
        tokenize(fresh, prompt, where="source prompt")
    assert "77" in str(info.value)
    assert "source prompt" in str(info.value)
    assert capfd.readouterr().err == ""  # the error alone, no library warning before it


# --------------------------------------------------------------------------- refine, raw ids


def test_refine_tie_left_before_diagonal_on_raw_ids():
    # x = S a E (source), y = S a a E (edit); "a" = 7, S = 100, E = 101.
    # Score matrix (rows i = 0..3 over x, cols j = 0..4 over y; gap 0, match +1, mismatch -1):
    #   i=0: 0 0 0 0 0
    #   i=1: 0 1 1 1 1
    #   i=2: 0 1 2 2 2      (2,3): left = 2, up = 1, diag = score[1,2] + 1 = 2 → tie → LEFT
    #   i=3: 0 1 2 2 3
    # Traceback from (3,4): diag (E↔E) → (2,3) left (y[2] inserted) → (2,2) diag → (1,1) diag.
    # So the *second* "a" is the inserted one: [0, 1, -1, 2].
    # (With diagonal preferred at (2,3) it would be [0, -1, 1, 2].)
    src, edt = fake((100, 7, 101)), fake((100, 7, 7, 101))
    assert refine_alignment(src, edt) == [0, 1, -1, 2]


def test_refine_tie_up_before_diagonal_on_raw_ids():
    # x = S a a E (source), y = S a E (edit): the transpose of the case above.
    # At (i=3, j=2): left = score[3,1] = 1, up = score[2,2] = 2, diag = score[2,1] + 1 = 2
    # → tie up/diag → UP: the second source "a" is dropped and y's "a" maps to source 1.
    # Traceback: (4,3) diag E↔E → (3,2) up → (2,2) diag a↔a → (1,1) diag → [0, 1, 3].
    # (With diagonal preferred it would be [0, 2, 3].)
    src, edt = fake((100, 7, 7, 101)), fake((100, 7, 101))
    assert refine_alignment(src, edt) == [0, 1, 3]


def test_refine_tie_left_before_up_on_raw_ids():
    # x = S a b E, y = S b a E (two words swapped); a = 7, b = 8.
    # Score matrix (rows over x, cols over y):
    #   i=0: 0 0 0 0 0
    #   i=1: 0 1 1 1 1
    #   i=2: 0 1 1 2 2
    #   i=3: 0 1 2 2 2     (3,3): left = score[3,2] = 2, up = score[2,3] = 2, diag = 1 - 1 = 0
    #   i=4: 0 1 2 2 3
    # Traceback: (4,4) diag E↔E → (3,3) tie left/up → LEFT: y[2]="a" inserted
    #   → (3,2) diag: y[1]="b" ↔ x[2]="b" → (2,1) up (x "a" dropped) → (1,1) diag S↔S.
    # Result [0, 2, -1, 3]. (Up first would give [0, -1, 1, 3].)
    src, edt = fake((100, 7, 8, 101)), fake((100, 8, 7, 101))
    assert refine_alignment(src, edt) == [0, 2, -1, 3]


def test_refine_map_on_raw_ids_pads_with_identity():
    # Same as the left/diagonal tie case, with max_length 6: edit positions 4 and 5 lie past
    # the edit prompt (length 4) and map to themselves with alpha 1.
    src, edt = fake((100, 7, 101), 6), fake((100, 7, 7, 101), 6)
    tm = refine_map(src, edt)
    assert tm.index is not None  # one-hot columns
    assert tm.alphas.tolist() == [1.0, 1.0, 0.0, 1.0, 1.0, 1.0]
    assert [tm.index[j].item() for j in (0, 1, 3, 4, 5)] == [0, 1, 2, 4, 5]


# --------------------------------------------------------------------------- refine, prompts


def _check_padding(tm, start: int) -> None:
    n = MAX_TOKENS
    torch.testing.assert_close(tm.index[start:], torch.arange(start, n))
    torch.testing.assert_close(tm.alphas[start:], torch.ones(n - start))


def test_refine_inserted_word(tokenizer):
    # "a dog" = S a dog E; "a big dog" = S a big dog E. Unique best alignment (score 4):
    # S↔S, a↔a, big inserted, dog↔dog, E↔E.
    tm = refine_map(tokenize(tokenizer, "a dog"), tokenize(tokenizer, "a big dog"))
    assert tm.alphas[:5].tolist() == [1.0, 1.0, 0.0, 1.0, 1.0]
    assert [tm.index[j].item() for j in (0, 1, 3, 4)] == [0, 1, 2, 3]
    _check_padding(tm, 5)


def test_refine_dropped_word(tokenizer):
    # "a big dog" = S a big dog E → "a dog" = S a dog E: big dropped, every edit token aligned:
    # index [0, 1, 3, 4] (dog ↔ source 3, E ↔ source 4).
    tm = refine_map(tokenize(tokenizer, "a big dog"), tokenize(tokenizer, "a dog"))
    assert tm.index[:4].tolist() == [0, 1, 3, 4]
    assert tm.alphas[:4].tolist() == [1.0, 1.0, 1.0, 1.0]
    _check_padding(tm, 4)


def test_refine_substitution_is_insertion_plus_drop(tokenizer):
    # standing ↔ sitting mismatch (−1) loses against the gaps (0): at that cell
    # left = up = 2 > diag = 1 → left, so "sitting" (edit position 3) is inserted.
    tm = refine_map(tokenize(tokenizer, SRC), tokenize(tokenizer, EDT))
    assert tm.alphas[:8].tolist() == [1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    assert [tm.index[j].item() for j in (0, 1, 2, 4, 5, 6, 7)] == [0, 1, 2, 4, 5, 6, 7]
    _check_padding(tm, 8)


def test_refine_carry_selects_source_columns(tokenizer):
    tm = refine_map(tokenize(tokenizer, "a big dog"), tokenize(tokenizer, "a dog"))
    src = torch.arange(77, dtype=torch.float32).reshape(1, 1, 77)  # value = column index
    carried = src @ tm.matrix
    # edit columns 0..3 take source columns 0, 1, 3, 4; column 10 takes column 10.
    assert carried[0, 0, :4].tolist() == [0.0, 1.0, 3.0, 4.0]
    assert carried[0, 0, 10].item() == 10.0


# --------------------------------------------------------------------------- replace


def test_replace_same_token_count_is_identity(tokenizer):
    src, edt = tokenize(tokenizer, SRC), tokenize(tokenizer, "A cat standing on the grass")
    assert swapped_words(src, edt) == [1]
    tm = replace_map(src, edt)
    torch.testing.assert_close(tm.matrix, torch.eye(77))
    assert torch.equal(tm.index, torch.arange(77))  # one-hot: it reads as an index too
    torch.testing.assert_close(tm.alphas, torch.ones(77))


def test_replace_word_split_into_two_target_tokens(tokenizer):
    # source: S(0) a(1) cat(2) on(3) grass(4) E(5)
    # target: S(0) a(1) photo(2) realistic(3) on(4) grass(5) E(6)
    src = tokenize(tokenizer, "a cat on grass")
    edt = tokenize(tokenizer, "a photorealistic on grass")
    tm = replace_map(src, edt)
    expected = torch.zeros(77, 77)
    expected[0, 0] = expected[1, 1] = 1.0
    expected[2, 2] = expected[2, 3] = 0.5  # k = 2 target tokens → 1/2 each
    for i in range(3, 76):  # on, grass, E and padding shift by one
        expected[i, i + 1] = 1.0
    torch.testing.assert_close(tm.matrix, expected)
    # carry: M @ matrix
    src_probs = torch.arange(1, 78, dtype=torch.float32).reshape(1, 1, 77)  # column i → i+1
    carried = (src_probs @ tm.matrix)[0, 0]
    # target 2 and 3: 0.5 · 3 = 1.5 (source "cat" has value 3); target 4 ("on"): source 3 → 4
    assert carried[:5].tolist() == [1.0, 2.0, 1.5, 1.5, 4.0]


def test_replace_two_source_tokens_onto_one_target_token(tokenizer):
    # source: S a photo realistic on grass E; target: S a cat on grass E.
    src = tokenize(tokenizer, "a photorealistic on grass")
    edt = tokenize(tokenizer, "a cat on grass")
    tm = replace_map(src, edt)
    expected = torch.zeros(77, 77)
    expected[0, 0] = expected[1, 1] = 1.0
    expected[2, 2] = expected[3, 2] = 1.0  # k = 1 target token → weight 1/1
    for j in range(3, 76):  # source j+1 → target j
        expected[j + 1, j] = 1.0
    torch.testing.assert_close(tm.matrix, expected)


def test_replace_unequal_word_counts_raise(tokenizer):
    src, edt = tokenize(tokenizer, "a dog"), tokenize(tokenizer, "a big dog")
    with pytest.raises(PromptError, match="2 and 3 words"):
        replace_map(src, edt)
    with pytest.raises(PromptError, match="same number of words"):
        build_plan(tokenizer, "a dog", "a big dog", EditConfig(edit_type="replace"))


# --------------------------------------------------------------------------- equalizer


def test_equalizer_sets_factors_on_word_tokens(tokenizer):
    tp = tokenize(tokenizer, "A photorealistic dog on the grass")
    # S(0) A(1) photo(2) realistic(3) dog(4) on(5) the(6) grass(7) E(8)
    eq = equalizer(tp, (("photorealistic", 0.5), ("GRASS", 2.0)))
    expected = torch.ones(77)
    expected[2] = expected[3] = 0.5
    expected[7] = 2.0
    torch.testing.assert_close(eq, expected)


def test_equalizer_absent_word_raises(tokenizer):
    with pytest.raises(PromptError, match="cat"):
        equalizer(tokenize(tokenizer, "A dog"), (("cat", 2.0),))


# --------------------------------------------------------------------------- EditPlan


def test_plan_refine_keywords(tokenizer):
    plan = build_plan(tokenizer, SRC, EDT, EditConfig())
    assert plan.keywords == (3,)  # "sitting"
    assert plan.keyword_words == ["sitting"]
    assert plan.equalizer is None
    assert plan.token_map.index is not None


def test_plan_refine_multi_token_keyword(tokenizer):
    plan = build_plan(tokenizer, "a dog", "a photorealistic dog", EditConfig())
    assert plan.keywords == (2, 3)
    assert plan.keyword_words == ["photorealistic"]


def test_plan_identical_prompts_have_no_keyword(tokenizer):
    plan = build_plan(tokenizer, SRC, SRC, EditConfig())
    assert plan.keywords == ()
    assert plan.keyword_words == []


def test_plan_replace_keywords(tokenizer):
    plan = build_plan(
        tokenizer, SRC, "A cat standing on the grass", EditConfig(edit_type="replace")
    )
    assert plan.keywords == (2,)
    assert plan.keyword_words == ["cat"]
    assert plan.token_map.matrix is not None
    torch.testing.assert_close(plan.token_map.alphas, torch.ones(77))  # every token aligned
    plan2 = build_plan(
        tokenizer, "a cat on grass", "a photorealistic on grass", EditConfig(edit_type="replace")
    )
    assert plan2.keywords == (2, 3)


def test_plan_reweight_equalizer(tokenizer):
    plan = build_plan(
        tokenizer, SRC, SRC, EditConfig(edit_type="reweight", reweight=(("grass", 2.0),))
    )
    expected = torch.ones(77)
    expected[6] = 2.0
    torch.testing.assert_close(plan.equalizer, expected)
    assert plan.keywords == ()


def test_plan_reweight_word_absent_raises(tokenizer):
    cfg = EditConfig(edit_type="reweight", reweight=(("cat", 2.0),))
    with pytest.raises(PromptError, match="cat"):
        build_plan(tokenizer, SRC, SRC, cfg)


def test_plan_local_blend_tokens(tokenizer):
    plan = build_plan(tokenizer, SRC, EDT, EditConfig(local_blend=("standing", "sitting")))
    assert plan.blend_source == (3,)  # "standing" only in the source
    assert plan.blend_target == (3,)  # "sitting" only in the edit prompt
    plan = build_plan(tokenizer, SRC, EDT, EditConfig(local_blend=("Dog",)))
    assert plan.blend_source == (2,)
    assert plan.blend_target == (2,)


def test_plan_local_blend_word_in_neither_prompt_raises(tokenizer):
    with pytest.raises(PromptError, match="cat"):
        build_plan(tokenizer, SRC, EDT, EditConfig(local_blend=("cat",)))


def test_plan_prompt_over_77_tokens_raises(tokenizer):
    with pytest.raises(PromptError, match="78 tokens"):
        build_plan(tokenizer, SRC, " ".join(["a"] * 76), EditConfig())
