"""FWT: token embeddings, τ from similarity, τ per word, injection gates (ALGORITHM.md §5–6)."""

from __future__ import annotations

import math

import pytest
import torch

from adapedit.algorithm.fwt import (
    TauPlan,
    compute_tau,
    cross_gates,
    fixed_tau,
    mean_embedding,
    self_steps,
    tau_from_similarity,
    token_embeddings,
)
from adapedit.algorithm.plan import build_plan
from adapedit.config import EditConfig
from adapedit.pipelines.controller import EditSchedule

F64 = torch.float64

# [P=4, T=3] maps and [P=4, d=2] hidden states used by the token_embeddings tests.
MAPS = torch.tensor(
    [
        [0.40, 0.02, 0.02],
        [0.20, 0.00, 0.00],
        [0.20, 0.30, 0.00],
        [0.01, 0.10, 0.01],
    ],
    dtype=F64,
)
HIDDEN = torch.tensor([[2.0, 0.0], [0.0, 4.0], [2.0, 4.0], [6.0, -12.0]], dtype=F64)


# --------------------------------------------------------------------------- token_embeddings


def test_token_embeddings_masked_by_alpha_m():
    emb = token_embeddings(MAPS, HIDDEN, alpha_m=0.03)
    # α_m = 0.03 zeroes 0.01 and 0.02.
    # col 0: [0.4, 0.2, 0.2, 0] / 0.8 = [0.5, 0.25, 0.25, 0]
    #        → 0.5·[2,0] + 0.25·[0,4] + 0.25·[2,4] = [1.5, 2.0]; |·| = 2.5 → [0.6, 0.8]
    # col 1: [0, 0, 0.3, 0.1] / 0.4 = [0, 0, 0.75, 0.25]
    #        → 0.75·[2,4] + 0.25·[6,-12] = [3, 0] → [1, 0]
    # col 2: [0.02, 0, 0, 0.01] all below α_m → zero column → zero row
    expected = torch.tensor([[0.6, 0.8], [1.0, 0.0], [0.0, 0.0]], dtype=F64)
    torch.testing.assert_close(emb, expected)
    assert torch.isfinite(emb).all()


def test_token_embeddings_without_mask():
    emb = token_embeddings(MAPS, HIDDEN, alpha_m=None)
    # col 0 (sum 0.81, direction only matters after L2):
    #   0.4·[2,0] + 0.2·[0,4] + 0.2·[2,4] + 0.01·[6,-12] = [1.26, 1.48]
    # col 1: 0.02·[2,0] + 0.3·[2,4] + 0.1·[6,-12] = [1.24, 0] → [1, 0]
    # col 2: 0.02·[2,0] + 0.01·[6,-12] = [0.1, -0.12] ∝ [5, -6] / √61
    expected = torch.tensor(
        [
            [1.26 / math.hypot(1.26, 1.48), 1.48 / math.hypot(1.26, 1.48)],
            [1.0, 0.0],
            [5 / math.sqrt(61), -6 / math.sqrt(61)],
        ],
        dtype=F64,
    )
    torch.testing.assert_close(emb, expected)


def test_token_embeddings_mask_keeps_values_equal_to_alpha_m():
    maps = torch.tensor([[0.5], [0.25], [0.25], [0.0]], dtype=F64)
    # "below α_m" is strict: with α_m = 0.25 nothing is zeroed
    #   → 0.5·[2,0] + 0.25·[0,4] + 0.25·[2,4] = [1.5, 2] → [0.6, 0.8]
    # (zeroing the 0.25s would give [1, 0])
    emb = token_embeddings(maps, HIDDEN, alpha_m=0.25)
    torch.testing.assert_close(emb, torch.tensor([[0.6, 0.8]], dtype=F64))


def test_token_embeddings_invariant_to_column_scale():
    # Column normalisation: scaling one token's column by 10 changes nothing.
    scaled = MAPS.clone()
    scaled[:, 1] *= 10.0  # [0.2, 0, 3, 1]: nothing below α_m except the 0
    emb = token_embeddings(scaled, HIDDEN, alpha_m=0.03)
    # col 1 now [0.2, 0, 3, 1] / 4.2: 0.2·[2,0] + 3·[2,4] + 1·[6,-12] = [12.4, 0] → [1, 0]
    torch.testing.assert_close(emb[1], torch.tensor([1.0, 0.0], dtype=F64))
    torch.testing.assert_close(emb[0], torch.tensor([0.6, 0.8], dtype=F64))


def test_token_embeddings_all_zero_map_gives_zero_rows_without_nan():
    emb = token_embeddings(torch.zeros(4, 3, dtype=F64), HIDDEN, alpha_m=0.03)
    torch.testing.assert_close(emb, torch.zeros(3, 2, dtype=F64))


def test_mean_embedding_is_normalised_mean():
    rows = torch.tensor([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]], dtype=F64)
    # mean of rows 0 and 1 = [0.5, 0.5] → [1/√2, 1/√2]
    r = 1 / math.sqrt(2)
    torch.testing.assert_close(mean_embedding(rows, [0, 1]), torch.tensor([r, r], dtype=F64))


# --------------------------------------------------------------------------- tau_from_similarity


def test_tau_paper_rule():
    a = torch.tensor([1.0, 0.0, -1.0, 0.5, 1.5], dtype=F64)
    tau = tau_from_similarity(a, "paper", 1.0)
    # 1 − e^(A−1): A=1 → 0; A=0 → 1 − e^−1 ≈ 0.63212; A=−1 → 1 − e^−2 ≈ 0.86466;
    # A=0.5 → 1 − e^−0.5 ≈ 0.39347; A=1.5 → 1 − e^0.5 < 0 → clamped to 0
    expected = torch.tensor(
        [0.0, 1 - math.exp(-1), 1 - math.exp(-2), 1 - math.exp(-0.5), 0.0], dtype=F64
    )
    torch.testing.assert_close(tau, expected)
    torch.testing.assert_close(tau[1], torch.tensor(0.6321205588285577, dtype=F64))


def test_tau_paper_rule_lambda_scaling():
    a = torch.tensor([0.0, 0.5], dtype=F64)
    # λ_τ = 0.5: 0.5·0.63212 ≈ 0.31606, 0.5·0.39347 ≈ 0.19673
    torch.testing.assert_close(
        tau_from_similarity(a, "paper", 0.5),
        torch.tensor([0.5 * (1 - math.exp(-1)), 0.5 * (1 - math.exp(-0.5))], dtype=F64),
    )
    # λ_τ = 2: 2·0.63212 = 1.264 → clamped to 1; 2·0.39347 ≈ 0.78694
    torch.testing.assert_close(
        tau_from_similarity(a, "paper", 2.0),
        torch.tensor([1.0, 2 * (1 - math.exp(-0.5))], dtype=F64),
    )


def test_tau_released_rule():
    a = torch.tensor([1.0, 0.0, 0.5, 0.9], dtype=F64)
    # e^(1−A) − 1: A=1 → 0; A=0 → e − 1 ≈ 1.718 → clamped to 1;
    # A=0.5 → e^0.5 − 1 ≈ 0.64872; A=0.9 → e^0.1 − 1 ≈ 0.10517
    expected = torch.tensor([0.0, 1.0, math.exp(0.5) - 1, math.exp(0.1) - 1], dtype=F64)
    torch.testing.assert_close(tau_from_similarity(a, "released", 1.0), expected)
    # the released rule has no λ_τ
    torch.testing.assert_close(tau_from_similarity(a, "released", 0.5), expected)


# --------------------------------------------------------------------------- compute_tau


def _emb(rows: dict[int, tuple[float, float]]) -> torch.Tensor:
    e = torch.zeros(77, 2)
    for i, v in rows.items():
        e[i] = torch.tensor(v)
    return e


def test_compute_tau_paper(tokenizer):
    plan = build_plan(
        tokenizer, "A dog standing on the grass.", "A dog sitting on the grass.", EditConfig()
    )
    # edit: S(0) A(1) dog(2) sitting(3) on(4) the(5) grass(6) .(7) E(8); keyword: sitting (3)
    assert plan.keywords == (3,)
    emb = _emb(
        {3: (1.0, 0.0), 1: (0.0, 1.0), 2: (1.0, 0.0), 4: (-1.0, 0.0), 5: (0.6, 0.8), 6: (0.8, 0.6)}
    )
    tp = compute_tau(plan, emb, plan.config)
    # E_k = [1, 0]. A: A=0 → 1−e^−1; dog: A=1 → 0; on: A=−1 → 1−e^−2;
    # the: A=0.6 → 1−e^−0.4 ≈ 0.32968; grass: A=0.8 → 1−e^−0.2 ≈ 0.18127; sitting: keyword → 0
    taus = {
        1: 1 - math.exp(-1),
        2: 0.0,
        3: 0.0,
        4: 1 - math.exp(-2),
        5: 1 - math.exp(-0.4),
        6: 1 - math.exp(-0.2),
    }
    # n_low = 2 (sitting, dog) of 6 words → τ_default = 0.8 − 2/6 ≈ 0.46667
    tau_default = 0.8 - 2 / 6
    expected = torch.full((77,), tau_default)
    for i, t in taus.items():
        expected[i] = t
    torch.testing.assert_close(tp.token_tau, expected, check_dtype=False)
    assert tp.token_tau[7].item() == pytest.approx(tau_default)  # "." is no word
    assert tp.tau_default == pytest.approx(tau_default, abs=1e-12)
    assert tp.tau_self == pytest.approx(tau_default, abs=1e-12)
    assert tp.fallback is None
    assert [w.word for w in tp.words] == ["A", "dog", "sitting", "on", "the", "grass"]
    assert [w.keyword for w in tp.words] == [False, False, True, False, False, False]
    assert tp.words[2].similarity is None
    assert tp.words[3].similarity == pytest.approx(-1.0)  # "on"
    assert tp.words[4].similarity == pytest.approx(0.6, abs=1e-6)  # "the"


def test_compute_tau_multi_token_keyword_and_lambda(tokenizer):
    plan = build_plan(tokenizer, "a dog", "a photorealistic dog", EditConfig(lambda_tau=0.5))
    # edit: S(0) a(1) photo(2) realistic(3) dog(4) E(5); keywords 2, 3
    emb = _emb({2: (1.0, 0.0), 3: (0.0, 1.0), 1: (1.0, 0.0), 4: (0.0, -1.0)})
    tp = compute_tau(plan, emb, plan.config)
    # E_k = normalize(mean([1,0],[0,1])) = [1,1]/√2.
    # a: A = 1/√2 → 0.5·(1 − e^(1/√2 − 1)) ≈ 0.5·0.25390 ≈ 0.12695
    # dog: A = −1/√2 → 0.5·(1 − e^(−1/√2 − 1)) ≈ 0.5·0.81859 ≈ 0.40930
    r = 1 / math.sqrt(2)
    # n_low = 1 (photorealistic) of 3 words → τ_default = 0.8 − 1/3
    expected = torch.full((77,), 0.8 - 1 / 3)
    expected[1] = 0.5 * (1 - math.exp(r - 1))
    expected[2] = expected[3] = 0.0
    expected[4] = 0.5 * (1 - math.exp(-r - 1))
    torch.testing.assert_close(tp.token_tau, expected, check_dtype=False)


def test_compute_tau_multi_token_word_uses_mean_of_its_rows(tokenizer):
    plan = build_plan(tokenizer, "A photorealistic cat", "A photorealistic dog", EditConfig())
    # edit: S(0) A(1) photo(2) realistic(3) dog(4) E(5); cat→dog: "dog" inserted → keyword 4
    assert plan.keywords == (4,)
    emb = _emb({4: (1.0, 0.0), 2: (1.0, 0.0), 3: (0.0, 1.0), 1: (1.0, 0.0)})
    tp = compute_tau(plan, emb, plan.config)
    # photorealistic: normalize(mean) = [1,1]/√2, A = 1/√2 → τ = 1 − e^(1/√2 − 1) ≈ 0.25390,
    # on both of its tokens; A (row [1,0]): A = 1 → τ = 0
    t = 1 - math.exp(1 / math.sqrt(2) - 1)
    torch.testing.assert_close(tp.token_tau[1:5], torch.tensor([0.0, t, t, 0.0]), check_dtype=False)
    # n_low = 2 (A, dog) of 3 → τ_default = 0.8 − 2/3 ≈ 0.13333
    assert tp.tau_default == pytest.approx(0.8 - 2 / 3, abs=1e-12)
    assert tp.token_tau[0].item() == pytest.approx(0.8 - 2 / 3)


def test_compute_tau_released_rule_and_tau_default_clamped(tokenizer):
    cfg = EditConfig(tau_rule="released", tau_fixed=0.3)
    plan = build_plan(tokenizer, "A dog standing on the grass", "A dog sitting on the grass", cfg)
    emb = _emb(
        {
            3: (1.0, 0.0),
            1: (0.9, math.sqrt(0.19)),
            2: (1.0, 0.0),
            4: (0.5, math.sqrt(0.75)),
            5: (0.0, 1.0),
            6: (0.95, math.sqrt(0.0975)),
        }
    )
    tp = compute_tau(plan, emb, cfg)
    # released e^(1−A) − 1: A(0.9) → 0.10517; dog(1) → 0; on(0.5) → 0.64872;
    # the(0) → e − 1 → 1; grass(0.95) → e^0.05 − 1 ≈ 0.05127; sitting → 0 (keyword)
    expected = [math.exp(0.1) - 1, 0.0, 0.0, math.exp(0.5) - 1, 1.0, math.exp(0.05) - 1]
    torch.testing.assert_close(tp.token_tau[1:7], torch.tensor(expected), check_dtype=False)
    # n_low = 3 (dog, sitting, grass) of 6 → 0.3 − 0.5 = −0.2 → clamped to 0
    assert tp.tau_default == 0.0
    assert tp.tau_self == 0.0
    assert tp.token_tau[0].item() == 0.0
    assert tp.token_tau[7].item() == 0.0


def test_compute_tau_falls_back_without_keyword(tokenizer):
    cfg = EditConfig(tau_fixed=0.6, tau_self_fixed=0.3)
    plan = build_plan(tokenizer, "A dog", "A dog", cfg)
    tp = compute_tau(plan, torch.randn(77, 2), cfg)
    torch.testing.assert_close(tp.token_tau, torch.full((77,), 0.6, dtype=F64))
    assert tp.tau_self == pytest.approx(0.3)
    assert tp.tau_default == pytest.approx(0.6)
    assert tp.fallback is not None and "keyword" in tp.fallback
    assert all(w.tau == pytest.approx(0.6) and not w.keyword for w in tp.words)


# --------------------------------------------------------------------------- gates


def test_cross_gates():
    tau = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=F64)
    g = cross_gates(tau, 9)
    # ⌊τ·10⌋ = 0, 2 (2.5), 5, 10 → injected steps s < that (at most all 9 steps)
    assert g.shape == (9, 4)
    expected = torch.zeros(9, 4)
    expected[:2, 1] = 1.0
    expected[:5, 2] = 1.0
    expected[:, 3] = 1.0
    torch.testing.assert_close(g, expected)


def test_cross_gates_p2p_default():
    # τ = 0.8, N = 50: ⌊0.8·51⌋ = ⌊40.8⌋ = 40 injected steps (0..39)
    g = cross_gates(torch.tensor([0.8], dtype=F64), 50)
    assert g[:, 0].sum().item() == 40.0
    assert g[39, 0].item() == 1.0 and g[40, 0].item() == 0.0


def test_cross_gates_fixed_tau_window_is_exact(tokenizer):
    cfg = EditConfig(use_fwt=False, tau_fixed=0.7)
    plan = build_plan(tokenizer, "a dog", "a big dog", cfg)
    g = cross_gates(fixed_tau(plan, cfg, "FWT off").token_tau, 9)
    # ⌊0.7·(9+1)⌋ = 7 injected steps for every token, as P2P's int(0.7 * 10)
    assert g.sum(dim=0).tolist() == [7.0] * 77


def test_steps_are_counted_by_the_sampler_as_p2p_counts_them_ddim_and_pndm():
    # 20 steps, τ = 0.8: P2P's alphas have 21 rows, ⌊0.8·21⌋ = 16 injected UNet calls, whether
    # the pass makes 20 calls (DDIM) or 21 (PNDM's warm-up); counting calls would give 17
    tau = torch.tensor([0.8], dtype=F64)
    ddim, pndm = cross_gates(tau, 20), cross_gates(tau, 20, calls=21)
    assert ddim.shape == (20, 1) and pndm.shape == (21, 1)
    assert ddim.sum().item() == pndm.sum().item() == 16.0
    assert cross_gates(tau, 21).sum().item() == 17.0  # the call count, as before
    # self-attention: ⌊0.8·20⌋ = 16 of either pass's calls
    schedule = EditSchedule.build(TauPlan((), tau.expand(77), 0.8, 0.8), 21, steps=20)
    assert schedule.self.sum().item() == 16.0 and schedule.self.shape == (21,)
    assert schedule.cross.shape == (21, 77) and schedule.cross[:, 0].sum().item() == 16.0


def test_self_steps():
    # ⌊τ_self·N⌋
    assert self_steps(0.4, 50) == 20
    assert self_steps(0.5, 9) == 4  # 4.5 → 4
    assert self_steps(0.0, 50) == 0
    assert self_steps(1.0, 10) == 10
    assert self_steps(0.8, 50) == 40
