"""Starting points beyond a checkpoint directory: delta weights on a base, GGUF files, quantized loading."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pandallm.errors import ModelError
from pandallm.model import PandaLLM
from pandallm.model.build import load_model
from pandallm.model.presets import llama_tiny
from pandallm.tokenizer import load_tokenizer
from tests.conftest import TOKENIZER_DIR


def tiny(seed: int, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**llama_tiny(), "vocab_size": 100, **overrides}))


def write_delta(released: LlamaForCausalLM, base: LlamaForCausalLM, path) -> None:
    """PandaLLM's layout: every tensor as released - base, except embed_tokens / lm_head, stored whole."""
    delta = copy.deepcopy(released)
    base_params = dict(base.named_parameters())
    with torch.no_grad():
        for name, param in delta.named_parameters():
            if "embed_tokens" not in name and "lm_head" not in name:
                param.sub_(base_params[name])
    delta.save_pretrained(path)


def test_base_plus_delta_is_the_released_model(tmp_path) -> None:
    base, released = tiny(0), tiny(1, vocab_size=104)  # the released model added 4 tokens
    base.save_pretrained(tmp_path / "base")
    write_delta(released, base, tmp_path / "delta")
    built = load_model(str(tmp_path / "delta"), 104, delta_from=str(tmp_path / "base"))
    expected = dict(released.named_parameters())
    for name, param in built.named_parameters():
        torch.testing.assert_close(param, expected[name], rtol=0, atol=1e-6)
    quantized = load_model(str(tmp_path / "delta"), 104, delta_from=str(tmp_path / "base"), quant_bits=4)
    assert type(quantized.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    assert quantized.config.name_or_path == str(tmp_path / "delta")


def test_a_delta_on_another_base_names_the_mismatched_tensors(tmp_path) -> None:
    tiny(0, intermediate_size=192).save_pretrained(tmp_path / "other")
    write_delta(tiny(1), tiny(0), tmp_path / "delta")
    with pytest.raises(ModelError) as error:
        load_model(str(tmp_path / "delta"), 100, delta_from=str(tmp_path / "other"))
    message = str(error.value)
    assert f"model.delta_from '{tmp_path / 'other'}' is not the base" in message
    assert "model.layers.0.mlp.gate_proj.weight [176, 64] in the delta vs [192, 64] in the base" in message
    with pytest.raises(ModelError, match="could not be loaded"):
        load_model(str(tmp_path / "delta"), 100, delta_from=str(tmp_path / "absent"))


def test_a_missing_gguf_file_is_named(tmp_path) -> None:
    missing = str(tmp_path / "models" / "SmolLM2.gguf")
    with pytest.raises(ModelError, match=f"model.model_name_or_path '{missing}': no such GGUF file"):
        PandaLLM(model_name_or_path=missing)
    with pytest.raises(ModelError, match=f"tokenizer '{missing}': no such GGUF file"):
        load_tokenizer(missing)
    with pytest.raises(ModelError, match="no such GGUF file"):
        load_model(missing, 100)


@pytest.mark.parametrize("bits", [4, 8])
def test_a_checkpoint_loads_quantized(tmp_path, bits: int) -> None:
    tiny(0).save_pretrained(tmp_path)
    model = load_model(str(tmp_path), 100, quant_bits=bits)
    expected = {4: "Linear4bit", 8: "Linear8bitLt"}[bits]
    assert {type(m).__name__ for n, m in model.named_modules() if n.endswith("_proj")} == {expected}
    assert type(model.lm_head).__name__ == "Linear"  # the output layer stays dense, as bitsandbytes leaves it


def test_a_preset_quantizes_from_its_fresh_weights() -> None:
    torch.manual_seed(0)
    module = PandaLLM(
        model_name_or_path="llama-tiny", tokenizer=str(TOKENIZER_DIR), use_lora=True, use_quant=True, lora_r=4
    )
    module.configure_model()
    layer = module.model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer.base_layer).__name__ == "Linear4bit"
