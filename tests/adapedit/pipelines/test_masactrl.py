"""MasaCtrl (mutual self-attention control): the equation on hand-worked tensors, the layer and
step schedule, the processor on a real attention layer, and the pass on the tiny model (the
source branch is plain generation, bit for bit)."""

from __future__ import annotations

import math

import pytest
import torch

from adapedit.algorithm.layout import EDIT, BatchLayout
from adapedit.config import SamplerConfig
from adapedit.errors import ConfigError, ModelError
from adapedit.pipelines.controller import Controller
from adapedit.pipelines.masactrl import (
    MasaCtrlConfig,
    MasaCtrlSchedule,
    MutualSelfAttnProcessor,
    attention,
    default_start_layer,
    default_start_step,
    edit_rows,
    lender_rows,
    masactrl_edit,
    mutual_self_attention,
    mutual_self_attention_installed,
    transformer_layers,
)
from adapedit.pipelines.processors import ControlSlot, attention_layers

F64 = torch.float64


def test_rows_follow_the_edit_batch_layout():
    # [u_src, u_edt, c_src, c_edt]: uncond edit ← uncond source, cond edit ← cond source
    assert edit_rows(EDIT) == [1, 3] and lender_rows(EDIT) == [0, 2]
    # the rows come from the layout, not from positions: conditional only → [c_src, c_edt]
    cond_only = BatchLayout(("source", "edit"), guided=False)
    assert edit_rows(cond_only) == [1] and lender_rows(cond_only) == [0]


def test_the_schedule_is_a_controller_that_changes_nothing():
    s = MasaCtrlSchedule(0, 0)
    assert isinstance(s, Controller) and s.layout == EDIT
    probs, latents = torch.rand(8, 4, 4), torch.rand(2, 4, 2, 2)
    assert s("x", False, probs, None, 3) is probs
    assert s.after_step(3, latents) is latents


def test_attention_by_hand():
    # one query against two keys: logits [0, ln 3] → weights [1/4, 3/4]; values 4, 8 → 7
    q = torch.tensor([[[1.0]]], dtype=F64)  # [1, P=1, d=1]
    k = torch.tensor([[[0.0], [math.log(3)]]], dtype=F64)  # [1, 2, 1]
    v = torch.tensor([[[4.0], [8.0]]], dtype=F64)
    torch.testing.assert_close(attention(q, k, v, 1.0), torch.tensor([[[7.0]]], dtype=F64))
    # scale 0 → uniform weights → mean of the values
    torch.testing.assert_close(attention(q, k, v, 0.0), torch.tensor([[[6.0]]], dtype=F64))


def _rows(*values):
    """[4, H=1, P, d=1] from four per-row lists of P values."""
    return torch.tensor(values, dtype=F64).reshape(4, 1, -1, 1)


def test_edit_rows_take_their_source_rows_keys_and_values():
    ln3 = math.log(3)
    # rows: u_src, u_edt, c_src, c_edt; P = 2 pixels, d = 1
    q = _rows([9, 9], [1, 0], [9, 9], [0, 2])
    k = _rows([0, ln3], [50, -50], [ln3, 0], [-7, 7])  # the edit rows' own keys are ignored
    v = _rows([4, 8], [100, 200], [2, 10], [-1, -1])  # … and so are their own values
    out = mutual_self_attention(q, k, v, 1.0)  # [2, 1, 2, 1]
    # uncond edit, source keys [0, ln 3], values [4, 8]:
    #   query 1 → weights [1/4, 3/4] → 7;  query 0 → [1/2, 1/2] → 6
    torch.testing.assert_close(out[0, 0, :, 0], torch.tensor([7.0, 6.0], dtype=F64))
    # cond edit, source keys [ln 3, 0], values [2, 10]:
    #   query 0 → [1/2, 1/2] → 6;  query 2 → logits [2 ln 3, 0] → [9/10, 1/10] → 2.8
    torch.testing.assert_close(out[1, 0, :, 0], torch.tensor([6.0, 2.8], dtype=F64))


def test_edit_queries_matter_and_source_rows_are_not_returned():
    q = torch.randn(4, 2, 3, 4, dtype=F64)
    k, v = torch.randn_like(q), torch.randn_like(q)
    out = mutual_self_attention(q, k, v, 0.5)
    assert out.shape == (2, 2, 3, 4)
    q2 = q.clone()
    q2[0] += 1  # a source row's query does not enter the edit rows' output
    torch.testing.assert_close(mutual_self_attention(q2, k, v, 0.5), out)
    q2[1] += 1  # the uncond edit row's own query does
    assert not torch.allclose(mutual_self_attention(q2, k, v, 0.5)[0], out[0])


def test_defaults_are_the_papers_scaled():
    assert default_start_step(50) == 4 and default_start_layer(16) == 10
    assert default_start_step(20) == 2 and default_start_step(6) == 0
    assert default_start_layer(10) == 6
    assert MasaCtrlConfig().resolved(50, 16) == (4, 10)
    assert MasaCtrlConfig(start_step=7, start_layer=3).resolved(50, 16) == (7, 3)
    with pytest.raises(ConfigError, match="start_step"):
        MasaCtrlConfig(start_step=-1)


def test_layers_are_counted_in_call_order(tiny_components):
    layers = transformer_layers(tiny_components.unet)
    # tiny: one transformer per down level (3), the mid block, two per up level (3 × 2)
    assert len(layers) == 10
    assert [name.split(".")[0] for name in layers] == ["down_blocks"] * 3 + ["mid_block"] + [
        "up_blocks"
    ] * 6
    # the scaled default starts at the decoder's second level, as 10 of 16 does on SD
    assert layers[default_start_layer(10)].startswith("up_blocks.2.")


def test_schedule_switches_on_by_step_and_layer():
    s = MasaCtrlSchedule(start_step=2, start_layer=6, layer_index={"a": 5, "b": 6, "c": 9})
    assert not any(s.active(x, step) for x in "abc" for step in (0, 1))
    for step in (2, 7):  # the step is the one passed, nothing is counted
        assert [s.active(x, step) for x in "abcd"] == [False, True, True, False]  # d: not decoder
    assert not s.active("b", 1)


def test_processor_replaces_only_the_edit_rows():
    from diffusers.models.attention_processor import Attention, AttnProcessor

    torch.manual_seed(0)
    attn = Attention(query_dim=8, heads=2, dim_head=4).double()
    hidden = torch.randn(4, 5, 8, dtype=F64)  # [B, P, C]
    plain = AttnProcessor()
    schedule = MasaCtrlSchedule(start_step=0, start_layer=0, layer_index={"x": 0})
    slot = ControlSlot(controller=schedule, step=0)
    hidden_before = hidden.clone()
    out = MutualSelfAttnProcessor(plain, "x", schedule, slot)(attn, hidden)
    assert torch.equal(hidden, hidden_before)  # its input is left as it was
    before = plain(attn, hidden)
    torch.testing.assert_close(out[[0, 2]], before[[0, 2]])  # source rows as they were
    # edit rows: own queries, the source rows' keys and values, then the output projection
    for e, s in zip([1, 3], [0, 2], strict=True):
        q = attn.to_q(hidden[e]).view(5, 2, 4).transpose(0, 1)  # [H, P, d]
        k = attn.to_k(hidden[s]).view(5, 2, 4).transpose(0, 1)
        v = attn.to_v(hidden[s]).view(5, 2, 4).transpose(0, 1)
        o = torch.softmax(q @ k.transpose(1, 2) / 2.0, dim=-1) @ v  # scale 1/√4
        want = attn.to_out[0](o.transpose(0, 1).reshape(5, 8))
        torch.testing.assert_close(out[e], want)
    processor = MutualSelfAttnProcessor(plain, "x", schedule, slot)
    schedule.start_step = 1  # not active yet at step 0 → the inner processor alone
    torch.testing.assert_close(processor(attn, hidden), before)
    slot.step = 1
    torch.testing.assert_close(processor(attn, hidden), out)
    slot.controller = None  # another pass (no MasaCtrl controller) → the inner processor alone
    torch.testing.assert_close(processor(attn, hidden), before)
    slot.controller = schedule
    with pytest.raises(ModelError, match="does not fit its layout"):
        processor(attn, hidden[:2])


def test_processors_are_restored(tiny_pipeline):
    unet = tiny_pipeline.components.unet
    before = {name: m.processor for name, m in attention_layers(unet)}
    schedule = MasaCtrlSchedule(0, 0)
    slot = tiny_pipeline.slot
    with pytest.raises(RuntimeError), mutual_self_attention_installed(unet, schedule, slot):
        wrapped = [m.processor for _, m in attention_layers(unet)]
        assert sum(isinstance(p, MutualSelfAttnProcessor) for p in wrapped) == 6
        raise RuntimeError("interrupted")
    assert {name: m.processor for name, m in attention_layers(unet)} == before


@pytest.fixture(scope="module")
def masactrl_run(tiny_pipeline):
    sampler = SamplerConfig(steps=4, seed=2)
    src, tgt = "a dog standing on the grass", "a dog sitting on the grass"
    run = masactrl_edit(tiny_pipeline, src, tgt, MasaCtrlConfig(), sampler, record_latents=True)
    plain_src = tiny_pipeline.generate(src, sampler, record_latents=True)
    plain_tgt = tiny_pipeline.generate(tgt, sampler, record_latents=True)
    return run, plain_src, plain_tgt


def test_the_source_branch_is_plain_generation_bit_for_bit(masactrl_run):
    run, plain_src, _ = masactrl_run
    assert len(run.latents) == len(plain_src.latents) == 4
    for ours, plain in zip(run.latents, plain_src.latents, strict=True):
        assert torch.equal(ours[0], plain[0])
    assert (run.source_image == plain_src.image).all()


def test_the_edit_branch_reads_the_source(masactrl_run):
    run, _, plain_tgt = masactrl_run
    assert (run.start_step, run.start_layer) == (0, 6)  # 4 of 50 → 0 of 4; 10 of 16 → 6 of 10
    # from the first step on, the edit differs from plain generation of the edit prompt
    assert not torch.equal(run.latents[0][1], plain_tgt.latents[0][0])
    assert not (run.edited_image == plain_tgt.image).all()


def test_masactrl_never_on_is_plain_generation_of_the_edit_prompt(tiny_pipeline, masactrl_run):
    _, _, plain_tgt = masactrl_run
    sampler = SamplerConfig(steps=4, seed=2)
    src, tgt = "a dog standing on the grass", "a dog sitting on the grass"
    late = masactrl_edit(tiny_pipeline, src, tgt, MasaCtrlConfig(start_step=4), sampler)
    assert (late.edited_image == plain_tgt.image).all()
