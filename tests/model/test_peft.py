"""LoRA settings are checked against the model; adapters load only onto their base; merging leaves the run alone."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import LlamaConfig, LlamaForCausalLM

from pandallm.errors import ModelError
from pandallm.model import PandaLLM
from pandallm.model.peft import DEFAULT_TARGET_MODULES, LoraSettings, apply_lora, load_adapter, merged_copy
from pandallm.model.presets import llama_tiny
from tests.conftest import TOKENIZER_DIR


def tiny(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**llama_tiny(), "vocab_size": 100, **overrides})).eval()


def lora_module(**kwargs) -> PandaLLM:
    torch.manual_seed(0)
    module = PandaLLM(model_name_or_path="llama-tiny", tokenizer=str(TOKENIZER_DIR), use_lora=True, **kwargs)
    module.configure_model()
    return module


def test_default_targets_are_every_decoder_projection() -> None:
    module = lora_module(lora_r=4)
    adapted = {name.split(".")[-1] for name, m in module.model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == set(DEFAULT_TARGET_MODULES)
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_a_wrong_target_module_names_it_and_lists_the_valid_ones() -> None:
    with pytest.raises(ModelError) as error:
        lora_module(lora_target_modules=["q_proj", "query_key_value"])
    message = str(error.value)
    assert "model.lora_target_modules: 'query_key_value' matches none of the model's linear layers" in message
    assert "valid names: " in message and "down_proj" in message and "q_proj" in message
    with pytest.raises(ModelError, match="model.modules_to_save: 'embeddings' matches none"):
        lora_module(modules_to_save=["embeddings"])


def test_bad_lora_settings_and_quantization_without_lora_are_refused() -> None:
    with pytest.raises(ModelError, match="model.lora_r must be a positive rank"):
        LoraSettings(r=0)
    with pytest.raises(ModelError, match="model.lora_dropout must be in"):
        LoraSettings(dropout=1.5)
    with pytest.raises(ModelError, match="set model.use_lora: true"):
        PandaLLM(model_name_or_path="llama-tiny", tokenizer=str(TOKENIZER_DIR), use_quant=True)
    with pytest.raises(ModelError, match="model.lora_adapter is set, but model.use_lora is false"):
        PandaLLM(model_name_or_path="llama-tiny", tokenizer=str(TOKENIZER_DIR), lora_adapter="adapter/")


def test_dora_adds_a_magnitude_per_output() -> None:
    module = lora_module(lora_r=4, use_dora=True, lora_target_modules=["q_proj"])
    magnitudes = [n for n, p in module.named_parameters() if p.requires_grad and "magnitude" in n]
    assert len(magnitudes) == llama_tiny()["num_hidden_layers"]


def test_an_adapter_from_another_base_is_refused(tmp_path) -> None:
    adapter = apply_lora(tiny(hidden_size=96, intermediate_size=256), LoraSettings(r=4))
    adapter.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ModelError, match="does not fit the base model") as error:
        load_adapter(tiny(), str(tmp_path / "adapter"))
    assert "size mismatch" in str(error.value)
    with pytest.raises(ModelError, match="not a PEFT adapter directory"):
        load_adapter(tiny(), str(tmp_path))
    loaded = load_adapter(tiny(hidden_size=96, intermediate_size=256), str(tmp_path / "adapter"))
    assert any(p.requires_grad for p in loaded.parameters())  # loaded to go on training


def test_merging_leaves_the_trained_model_as_it_is_and_computes_the_same() -> None:
    model = apply_lora(tiny(), LoraSettings(r=4, modules_to_save=("lm_head",)))
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:  # as if trained: LoRA's B starts at zero, which would hide a missed merge
                param.add_(torch.randn_like(param) * 0.05)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.tensor([[1, 5, 9, 23, 42, 7]])
    merged = merged_copy(model)
    model.eval()  # no LoRA dropout
    assert not isinstance(merged, PeftModel)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
