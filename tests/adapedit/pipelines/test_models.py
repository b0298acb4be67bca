"""Built-in models and local diffusers folders."""

from __future__ import annotations

import shutil
import time

import pytest
import torch

from adapedit.config import EditConfig, SamplerConfig
from adapedit.errors import ConfigError, ModelError
from adapedit.pipelines.models import build_random, load_model, load_tokenizer
from adapedit.pipelines.pipeline import ReferencePipeline
from adapedit.pipelines.processors import attention_layers


@pytest.fixture(scope="module")
def tiny_folder(tiny_components, tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny"
    tiny_components.save(path)
    return path


def test_tiny_is_deterministic_from_its_seed():
    a, b, c = build_random("tiny", 0), build_random("tiny", 0), build_random("tiny", 1)
    wa, wb, wc = (next(m.unet.parameters()) for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_tiny_has_sd_structure(tiny_components):
    ids = [name for name, _ in attention_layers(tiny_components.unet)]
    cross = [i for i in ids if i.endswith("attn2")]
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2" in cross
    assert "mid_block.attentions.0.transformer_blocks.0.attn2" in cross
    assert len({i.split(".attentions")[0] for i in cross}) >= 3  # several resolutions
    assert tiny_components.default_size == 128 and tiny_components.size_multiple == 64


def test_folder_round_trip(tiny_components, tiny_folder):
    loaded = load_model(str(tiny_folder))
    x, t = torch.randn(1, 4, 16, 16), torch.tensor(10)
    e = torch.randn(1, 77, 32)
    with torch.no_grad():
        a = tiny_components.unet(x, t, encoder_hidden_states=e).sample
        b = loaded.unet(x, t, encoder_hidden_states=e).sample
    torch.testing.assert_close(a, b)
    assert loaded.tokenizer("a dog").input_ids == tiny_components.tokenizer("a dog").input_ids
    assert loaded.config_hash() == tiny_components.config_hash()


def test_the_default_model_tokenizes_as_the_vendored_clip_tokenizer():
    """``shapes`` was trained over the vendored tokenizer; its folder ships that vocabulary as
    ``vocab.json`` + ``merges.txt`` (1.5 MB, where ``tokenizer.json`` takes 3.6 MB)."""
    shapes, vendored = load_model("shapes").tokenizer, load_tokenizer()
    assert shapes.get_vocab() == vendored.get_vocab()
    for prompt in ("a small red circle on the left", "A Dog, sitting!  on the grass…", "x" * 300):
        got = shapes(prompt, padding="max_length", truncation=True, return_offsets_mapping=True)
        want = vendored(prompt, padding="max_length", truncation=True, return_offsets_mapping=True)
        assert got == want


@pytest.mark.parametrize("component", ["unet", "text_encoder", "vae", "tokenizer", "scheduler"])
def test_folder_missing_a_component_is_a_clear_error(tiny_folder, tmp_path, component):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_folder, broken)
    shutil.rmtree(broken / component)
    with pytest.raises(ModelError, match=f"missing its {component}") as e:
        load_model(str(broken))
    assert str(broken / component) in str(e.value)


@pytest.mark.parametrize("component", ["unet", "text_encoder", "vae"])
def test_folder_missing_a_models_weights_is_a_clear_error(tiny_folder, tmp_path, component):
    """A config without its weights is refused by name, not left to diffusers' loader (which
    raised an OSError about a ``.bin`` file)."""
    broken = tmp_path / "broken"
    shutil.copytree(tiny_folder, broken)
    for weights in (broken / component).glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(ModelError, match=f"missing its {component} weights") as e:
        load_model(str(broken))
    assert str(broken / component) in str(e.value) and "config.json" in str(e.value)


@pytest.mark.parametrize(
    ("device", "message"),
    [("cdua", "unknown device"), ("meta", "unsupported device"), ("cuda:99", "not available")],
)
def test_a_device_torch_cannot_use_is_refused_before_the_model_loads(device, message, monkeypatch):
    monkeypatch.setattr(
        "adapedit.pipelines.pipeline.load_model", lambda *a: pytest.fail("the model loaded")
    )
    with pytest.raises(ConfigError, match=message) as e:
        ReferencePipeline.from_model("tiny", device=device)
    assert e.value.field == "device"


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="model not found"):
        load_model(str(tmp_path / "nowhere"))


@pytest.mark.slow
def test_sd14_random_edit_runs_through_every_controlled_layer():
    t0 = time.perf_counter()
    pipe = ReferencePipeline.from_model("sd14-random")
    assert sum(p.numel() for p in pipe.components.unet.parameters()) == 859_520_964
    seen: dict[str, set[str]] = {}

    class Spy:
        def __init__(self, controller):
            self.inner, self.layout = controller, controller.layout

        def __call__(self, layer_id, is_cross, probs, hidden, step):
            seen.setdefault(type(self.inner).__name__, set()).add(layer_id)
            return self.inner(layer_id, is_cross, probs, hidden, step)

        def after_step(self, step, latents):
            return self.inner.after_step(step, latents)

    def spy(controller):
        return Spy(controller)

    original = pipe.denoise
    pipe.denoise = lambda lat, emb, s, ctrl=None, **kw: original(lat, emb, s, spy(ctrl), **kw)
    r = pipe.edit(
        "a dog standing on the grass",
        "a dog sitting on the grass",
        EditConfig(),
        SamplerConfig(steps=2, height=256, width=256),
    )
    ids = [name for name, _ in attention_layers(pipe.components.unet)]
    cross = {i for i in ids if i.endswith("attn2")}
    # the scaled rule: the self-attention layers at 1/4 of the latent and coarser (8×8 and 4×4
    # at 256 px; 16×16 and 8×8 at 512 px, P2P's), whatever the resolution
    small_self = {
        i
        for i in ids
        if i.endswith("attn1") and i.startswith(("down_blocks.2", "mid_block", "up_blocks.1"))
    }
    assert len(cross) == 16 and len(small_self) == 6
    assert seen["CalibrationRecorder"] == seen["EditController"]
    assert seen["EditController"] == cross | small_self
    assert r.edited_image.shape == (256, 256, 3)
    print(
        f"sd14-random 256×256, 2 steps: {time.perf_counter() - t0:.1f} s incl. build; "
        f"timings {r.timings}"
    )
