"""RoPE scaling through `model.config_overrides: {rope_scaling: {type, factor, ...}}` (LLMBox's `--rope_scaling_type`
/ `--rope_scaling_factor`): each type builds a model whose rotary frequencies are the ones transformers defines for
it, and a type without the keys it needs is refused naming the option and the keys."""

from __future__ import annotations

import pytest
import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from pandallm.errors import ModelError
from pandallm.model.build import build_model, model_config

VOCAB = 100
LONG = {"original_max_position_embeddings": 64}
SCALINGS = {
    "linear": {"type": "linear", "factor": 4.0},
    "dynamic": {"type": "dynamic", "factor": 4.0},
    "yarn": {"type": "yarn", "factor": 4.0, **LONG},
    "llama3": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, **LONG},
}


def rotary(scaling: dict | None, **overrides):
    model = build_model("llama-tiny", VOCAB, {**overrides, **({"rope_scaling": scaling} if scaling else {})})
    return model, model.model.rotary_emb


@pytest.mark.parametrize("name", list(SCALINGS))
def test_each_rope_scaling_type_gives_the_frequencies_transformers_defines(name: str) -> None:
    model, scaled = rotary(SCALINGS[name], max_position_embeddings=256)
    _, plain = rotary(None, max_position_embeddings=256)
    assert model.config.rope_parameters["rope_type"] == name
    expected, attention_scaling = ROPE_INIT_FUNCTIONS[name](model.config, None)
    torch.testing.assert_close(scaled.inv_freq, expected)
    assert scaled.attention_scaling == pytest.approx(attention_scaling)
    ratio = scaled.inv_freq / plain.inv_freq
    if name == "linear":  # positions divided by the factor: every frequency too
        torch.testing.assert_close(ratio, torch.full_like(ratio, 1 / 4))
    elif name == "dynamic":  # unchanged within the trained length: NTK scaling starts past it (below)
        torch.testing.assert_close(ratio, torch.ones_like(ratio))
    else:  # YaRN and Llama 3: the highest frequencies kept, the lowest interpolated by the factor
        assert ratio[0] == pytest.approx(1.0) and ratio[-1] == pytest.approx(1 / SCALINGS[name]["factor"], rel=0.2)
        assert name != "yarn" or attention_scaling > 1  # YaRN's temperature
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, VOCAB)


def test_dynamic_ntk_scaling_changes_the_frequencies_past_the_trained_length() -> None:
    model, scaled = rotary(SCALINGS["dynamic"], max_position_embeddings=16)
    _, plain = rotary(None, max_position_embeddings=16)
    x = torch.zeros(1, 40, model.config.hidden_size)
    positions = torch.arange(40)[None]
    cos, _ = scaled(x, positions)
    plain_cos, _ = plain(x, positions)
    expected, _ = ROPE_INIT_FUNCTIONS["dynamic"](model.config, None, seq_len=40)
    torch.testing.assert_close(scaled.inv_freq, expected)  # recomputed for 40 positions, as transformers does
    assert not torch.allclose(cos, plain_cos)


@pytest.mark.parametrize(
    ("scaling", "missing"),
    [({"type": "linear"}, "factor"), ({"type": "llama3", "factor": 8}, "high_freq_factor")],
)
def test_a_scaling_without_its_keys_is_refused_naming_them(scaling: dict, missing: str) -> None:
    with pytest.raises(ModelError, match=rf"model.config_overrides .*Missing required keys .*{missing}"):
        model_config("llama-tiny", VOCAB, {"rope_scaling": scaling})


def test_a_saved_model_keeps_its_scaling_in_plain_transformers(tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    model, scaled = rotary(SCALINGS["llama3"], max_position_embeddings=256)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.rope_parameters["rope_type"] == "llama3"
    torch.testing.assert_close(loaded.model.rotary_emb.inv_freq, scaled.inv_freq)
