"""Independent oracles of the edit glue, written from Prompt-to-Prompt's code and ALGORITHM.md,
not from ``adapedit``'s controllers:

- P2P's ``AttentionRefine``, ``AttentionReplace`` and ``AttentionReweight`` (with
  ``AttentionControlEdit``'s step counting and its ``[u_src, u_edt, c_src, c_edt]`` batch),
  against which the reference pipeline with FWT and DPS off must agree bit for bit at every step;
- AdapEdit for one small case computed by straight-line code (calibration → τ and ``E_k`` → one
  edit step at two cross-attention layers and a self-attention layer), against which the
  :class:`CalibrationRecorder` and :class:`EditController` must agree exactly.

The oracles hard-code their inputs (token positions, mappers, the batch order) for the prompts
they use, so a wrong branch index or token map in ``adapedit`` cannot hide in a shared helper.
"""

from __future__ import annotations

import pytest
import torch

from adapedit.algorithm.layout import EDIT
from adapedit.config import EditConfig, SamplerConfig
from adapedit.pipelines.controller import CalibrationRecorder, EditController

SRC, TGT = "a dog standing on the grass", "a dog sitting on the grass"
# S a dog standing/sitting on the grass E: the words sit at tokens 1…6
SITTING, N_WORDS = 3, 6


class P2PEdit:
    """``AttentionControlEdit``: the edit branch of the conditional half ``[c_src, c_edt]`` is
    edited; cross-attention inside each token's window ``cross_replace_alpha``, self-attention
    with ≤ 16² queries in the first ``int(N · self_replace_steps)`` steps. Counts its own steps,
    as P2P does (``cur_step`` advances after each scheduler step)."""

    layout = EDIT  # only read by the pipeline's batch-size check

    def __init__(self, num_steps, cross_replace_steps, self_replace_steps):
        self.cross_replace_alpha = torch.zeros(num_steps + 1, 77)
        self.cross_replace_alpha[: int(cross_replace_steps * (num_steps + 1))] = 1
        self.num_self_replace = (0, int(num_steps * self_replace_steps))
        self.cur_step = 0

    def replace_cross_attention(self, attn_base, att_replace):
        raise NotImplementedError

    def __call__(self, layer_id, is_cross, attn, hidden, step):
        h = attn.shape[0]
        attn = attn.clone()
        cond = attn[h // 2 :]
        heads = cond.shape[0] // 2
        cond = cond.reshape(2, heads, *cond.shape[1:])
        attn_base, attn_replace = cond[0], cond[1:]
        if is_cross:
            alpha_words = self.cross_replace_alpha[self.cur_step].reshape(1, 1, 1, -1)
            new = self.replace_cross_attention(attn_base, attn_replace)
            cond[1:] = new * alpha_words + (1 - alpha_words) * attn_replace
        elif (
            self.num_self_replace[0] <= self.cur_step < self.num_self_replace[1]
            and attn_replace.shape[2] <= 16**2
        ):
            cond[1:] = attn_base.unsqueeze(0).expand(attn_replace.shape[0], *attn_base.shape)
        attn[h // 2 :] = cond.reshape(-1, *cond.shape[2:])
        return attn

    def after_step(self, step, latents):
        self.cur_step += 1
        return latents


class P2PRefine(P2PEdit):
    def __init__(self, mapper, alphas, *args):
        super().__init__(*args)
        self.mapper, self.alphas = mapper, alphas.reshape(1, 1, 1, -1)

    def replace_cross_attention(self, attn_base, att_replace):
        attn_base_replace = attn_base[:, :, self.mapper.reshape(1, -1)].permute(2, 0, 1, 3)
        return attn_base_replace * self.alphas + att_replace * (1 - self.alphas)


class P2PReplace(P2PEdit):
    def __init__(self, mapper, *args):
        super().__init__(*args)
        self.mapper = mapper[None]  # [1, 77, 77]

    def replace_cross_attention(self, attn_base, att_replace):
        return torch.einsum("hpw,bwn->bhpn", attn_base, self.mapper)


class P2PReweight(P2PEdit):
    def __init__(self, equalizer, prev, *args):
        super().__init__(*args)
        self.equalizer, self.prev = equalizer[None], prev

    def replace_cross_attention(self, attn_base, att_replace):
        if self.prev is not None:
            attn_base = self.prev.replace_cross_attention(attn_base, att_replace)[0]
        return attn_base[None, :, :, :] * self.equalizer[:, None, None, :]


def _p2p_latents(pipe, src, tgt, sampler, oracle):
    x0 = pipe.initial_latent(sampler)
    u, c_src, c_edt = pipe.encode(["", src, tgt]).split(1)
    out: list[torch.Tensor] = []
    pipe.denoise(torch.cat([x0, x0]), torch.cat([u, u, c_src, c_edt]), sampler, oracle, record=out)
    return out


def _assert_same_steps(ours, theirs, n):
    assert len(ours) == len(theirs) == n
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(theirs[-1][0], theirs[-1][1])  # the edit did something


def _refine_mapper():
    """P2P's refine mapper for SRC → TGT: every token to itself; "sitting" inserted."""
    alphas = torch.ones(77)
    alphas[SITTING] = 0.0
    return torch.arange(77), alphas


@pytest.mark.parametrize("scheduler", ["ddim", "pndm"])
def test_refine_with_every_switch_off_is_p2p_refine(tiny_pipeline, scheduler):
    pipe, sampler = tiny_pipeline, SamplerConfig(steps=6, seed=1, scheduler=scheduler)
    cfg = EditConfig(use_fwt=False, use_dps=False, tau_fixed=0.6, tau_self_fixed=0.4)
    ours = pipe.edit(SRC, TGT, cfg, sampler, record_latents=True)
    n = pipe.num_steps(sampler)
    theirs = _p2p_latents(pipe, SRC, TGT, sampler, P2PRefine(*_refine_mapper(), n, 0.6, 0.4))
    _assert_same_steps(ours.latents, theirs, n)


def test_replace_with_every_switch_off_is_p2p_replace(tiny_pipeline):
    # "a red dog …" → "a blue cat …": one token per word, so P2P's mapper is the identity
    src, tgt = "a red dog on the grass", "a blue cat on the grass"
    pipe, sampler = tiny_pipeline, SamplerConfig(steps=6, seed=2)
    cfg = EditConfig(edit_type="replace", use_fwt=False, use_dps=False, tau_fixed=0.5)
    ours = pipe.edit(src, tgt, cfg, sampler, record_latents=True)
    n = pipe.num_steps(sampler)
    theirs = _p2p_latents(pipe, src, tgt, sampler, P2PReplace(torch.eye(77), n, 0.5, 0.4))
    _assert_same_steps(ours.latents, theirs, n)


def test_replace_of_a_word_split_in_two_is_p2p_replace(tiny_pipeline):
    # "photorealistic" is two tokens (3, 4): P2P's mapper spreads "cat" (3) over both, ½ each
    src, tgt = "a cat on grass", "a photorealistic on grass"
    mapper = torch.zeros(77, 77)
    mapper[0, 0] = mapper[1, 1] = 1.0
    mapper[2, 2] = mapper[2, 3] = 0.5
    for i in range(3, 76):
        mapper[i, i + 1] = 1.0
    pipe, sampler = tiny_pipeline, SamplerConfig(steps=5, seed=5)
    cfg = EditConfig(edit_type="replace", use_fwt=False, use_dps=False, tau_fixed=0.8)
    ours = pipe.edit(src, tgt, cfg, sampler, record_latents=True)
    n = pipe.num_steps(sampler)
    theirs = _p2p_latents(pipe, src, tgt, sampler, P2PReplace(mapper, n, 0.8, 0.4))
    _assert_same_steps(ours.latents, theirs, n)


@pytest.mark.parametrize("target", [SRC, TGT])
def test_reweight_with_every_switch_off_is_p2p_reweight(tiny_pipeline, target):
    pipe, sampler = tiny_pipeline, SamplerConfig(steps=6, seed=3)
    cfg = EditConfig(
        edit_type="reweight",
        reweight=(("grass", 3.0), ("dog", 0.5)),
        use_fwt=False,
        use_dps=False,
        tau_fixed=0.7,
    )
    ours = pipe.edit(SRC, target, cfg, sampler, record_latents=True)
    n = pipe.num_steps(sampler)
    equalizer = torch.ones(77)
    equalizer[6], equalizer[2] = 3.0, 0.5  # grass, dog
    # identical prompts: no previous controller; else P2P chains AttentionRefine first
    prev = None if target == SRC else P2PRefine(*_refine_mapper(), n, 0.7, 0.4)
    theirs = _p2p_latents(pipe, SRC, target, sampler, P2PReweight(equalizer, prev, n, 0.7, 0.4))
    _assert_same_steps(ours.latents, theirs, n)


# --------------------------------------------------------------------------- AdapEdit oracle
#
# One edit with N = 3 UNet calls per pass at a latent of 8×8: two cross-attention layers at the
# calibration resolution (1/2: 4×4 = 16 queries, 2 heads, C = 8), one at the LocalBlend
# resolution (1/4: 2×2), and a self-attention layer at 1/2. Probabilities are seeded softmaxes.

N, HEADS, C, LATENT = 3, 2, 8, (8, 8)
A1 = "down_blocks.1.attentions.0.transformer_blocks.0.attn2"
B = "down_blocks.2.attentions.0.transformer_blocks.0.attn2"
A2 = "up_blocks.2.attentions.0.transformer_blocks.0.attn2"
SELF = "up_blocks.2.attentions.0.transformer_blocks.0.attn1"
CROSS = {A1: 16, B: 4, A2: 16}  # in call order (down, up) with their query counts


def _probs(batch, queries, keys, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(3 * torch.randn(batch * HEADS, queries, keys, generator=g), dim=-1)


def _hidden(batch, queries, seed):
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.randn(batch, queries, C, generator=g)


def _normalize(x):
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _embeddings(maps, hidden, alpha_m):
    """Eq. 5–6 by hand: mask, column-normalise, ``M̄ᵀ E_V``, rows L2-normalised."""
    if alpha_m is not None:
        maps = torch.where(maps < alpha_m, torch.zeros_like(maps), maps)
    col = maps.sum(dim=0, keepdim=True)
    maps = torch.where(col > 0, maps / col.clamp_min(torch.finfo(maps.dtype).tiny), 0.0)
    return _normalize(maps.transpose(0, 1) @ hidden)


def _calibration_inputs():
    """(layer, step) → (probs [2·H, P, 77], hidden [2, P, C]) of the pass ``[u_edt, c_edt]``."""
    return {
        (layer, s): (_probs(2, p, 77, 10 * s + k), _hidden(2, p, 10 * s + k))
        for s in range(N)
        for k, (layer, p) in enumerate(CROSS.items())
    }


def _oracle_calibration(cfg):
    """τ per token, τ_self and E_k per layer, straight from ALGORITHM.md §6–7."""
    inputs = _calibration_inputs()
    # c_edt is the second sample of [u_edt, c_edt]; head-mean of its probabilities
    cond = {k: v[0][HEADS:].float().mean(dim=0) for k, v in inputs.items()}
    # M̄: mean over steps and the 1/2-resolution layers (A1, A2), in call order
    calib = [cond[(layer, s)] for s in range(N) for layer in (A1, A2)]
    mean_map = sum(calib[1:], calib[0]) / len(calib)
    e_v = inputs[(A2, N - 1)][1][1]  # the last such layer (up block), final step, c_edt
    emb = _embeddings(mean_map, e_v, cfg.alpha_m)  # [77, C]
    e_k = _normalize(emb[SITTING])  # the keyword "sitting" alone
    tau = torch.full((77,), 0.0, dtype=torch.float64)
    word_tau = {}
    for tok in range(1, N_WORDS + 1):
        if tok == SITTING:
            word_tau[tok] = 0.0
            continue
        a = torch.dot(_normalize(emb[tok]), e_k)
        word_tau[tok] = float((cfg.lambda_tau * (1 - torch.exp(a - 1))).clamp(0, 1))
    n_low = sum(t < 0.1 for t in word_tau.values())
    tau_default = min(max(cfg.tau_fixed - n_low / N_WORDS, 0.0), 1.0)
    tau[:] = tau_default
    for tok, t in word_tau.items():
        tau[tok] = t
    keys = {
        layer: _normalize(
            _embeddings(cond[(layer, N - 1)], inputs[(layer, N - 1)][1][1], cfg.alpha_m)[SITTING]
        )
        for layer in CROSS
    }
    return tau, tau_default, keys


def _oracle_cross(probs, hidden, tau, e_k, cfg, step):
    """One cross-attention layer of the edit pass, token by token (§5, Eq. 8–9)."""
    out = probs.clone()
    src = probs[2 * HEADS : 3 * HEADS]  # c_src (third sample of [u_src, u_edt, c_src, c_edt])
    edt = probs[3 * HEADS :]  # c_edt
    lam_s, lam_sv = torch.tensor(cfg.lambda_s), torch.tensor(cfg.lambda_sv)
    s = (lam_sv * (_normalize(hidden[3]) @ e_k)).clamp(0, 1)[None, :]  # [1, P]
    for j in range(77):
        injected = step < int(float(tau[j]) * (N + 1))
        mc, mc_star = src[..., j], edt[..., j]  # refine: token j takes source token j
        if j == SITTING:  # inserted: a_j = 0
            out[3 * HEADS :, :, j] = mc_star
        elif injected:
            out[3 * HEADS :, :, j] = mc
        else:
            out[3 * HEADS :, :, j] = lam_s * (s * mc_star + (1 - s) * mc) + (1 - lam_s) * mc
    return out


def test_adapedit_controllers_equal_the_straight_line_oracle(tiny_pipeline):
    cfg = EditConfig(alpha_m=0.01, lambda_s=0.9, lambda_sv=1.0)
    plan = tiny_pipeline.plan(SRC, TGT, cfg)
    tau_ref, tau_default_ref, keys_ref = _oracle_calibration(cfg)

    recorder = CalibrationRecorder(LATENT, N, cfg)
    inputs = _calibration_inputs()
    for s in range(N):
        for layer in CROSS:
            probs, hidden = inputs[(layer, s)]
            assert recorder(layer, True, probs, hidden, s) is probs
    tau, keys = recorder.stats().finish(plan, cfg)
    assert torch.equal(tau.token_tau, tau_ref)
    assert tau.tau_default == tau.tau_self == tau_default_ref
    assert keys.keys() == keys_ref.keys()
    for layer in CROSS:
        assert torch.equal(keys[layer], keys_ref[layer]), layer
    # some words are injected at step 1 and some are not: the case covers both branches
    step = 1
    injected = [int(float(tau_ref[j]) * (N + 1)) > step for j in range(1, N_WORDS + 1)]
    assert any(injected) and not all(injected)

    ctrl = EditController(plan, tau, keys, N, LATENT)
    for layer in (A1, B):
        p = CROSS[layer]
        probs, hidden = _probs(4, p, 77, 50 + p), _hidden(4, p, 50 + p)
        expected = _oracle_cross(probs, hidden, tau_ref, keys_ref[layer], cfg, step)
        assert torch.equal(ctrl(layer, True, probs, hidden, step), expected), layer
    # self-attention: the source's probabilities while s < ⌊τ_self · N⌋
    probs = _probs(4, 16, 16, 99)
    n_self = int(tau_default_ref * N)
    for s in range(N):
        expected = probs.clone()
        if s < n_self:
            expected[3 * HEADS :] = probs[2 * HEADS : 3 * HEADS]
        assert torch.equal(ctrl(SELF, False, probs, None, s), expected), s
