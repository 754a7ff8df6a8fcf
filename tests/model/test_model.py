"""The model: packed documents stay independent, the loss is HF's, presets and checkpoints are checked."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, LlamaConfig, LlamaForCausalLM

from pandallm.data.collate import collate_rows
from pandallm.data.encode import pack_documents
from pandallm.errors import ModelError
from pandallm.model.build import build_model, model_config
from pandallm.model.loss import causal_lm_loss_sum
from pandallm.model.presets import llama_tiny


def tiny_model(attn: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(**llama_tiny(), vocab_size=100)
    config._attn_implementation = attn
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_document_logits_inside_a_pack_equal_its_logits_alone(attn: str) -> None:
    model = tiny_model(attn)
    documents = [[1, 5, 6, 7, 2], [1, 8, 9, 10, 11, 12, 2], [1, 13, 14, 2]]
    [packed] = list(pack_documents(documents, max_seq_length=16))
    short = next(iter(pack_documents([[1, 20, 21, 2]], max_seq_length=16)))
    batch = collate_rows([packed.__dict__, short.__dict__], pad_id=0)  # the short row is padded
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        start = 0
        for document in documents:
            alone = model(input_ids=torch.tensor([document])).logits[0]
            torch.testing.assert_close(logits[0, start : start + len(document)], alone, atol=1e-5, rtol=1e-5)
            start += len(document)
        alone = model(input_ids=torch.tensor([[1, 20, 21, 2]])).logits[0]
        torch.testing.assert_close(logits[1, :4], alone, atol=1e-5, rtol=1e-5)


def test_without_position_ids_documents_would_leak_into_each_other() -> None:
    # The check above can fail: plain causal attention over the same pack gives different logits.
    model = tiny_model("sdpa")
    with torch.no_grad():
        packed = model(input_ids=torch.tensor([[1, 5, 6, 2, 1, 8, 9, 2]])).logits[0, 4:]
        alone = model(input_ids=torch.tensor([[1, 8, 9, 2]])).logits[0]
    assert not torch.allclose(packed, alone, atol=1e-3)


def test_loss_matches_transformers_own() -> None:
    model = tiny_model("sdpa")
    input_ids = torch.tensor([[1, 5, 6, 7, 8, 2], [1, 9, 10, 2, 0, 0]])
    labels = torch.tensor([[-100, -100, 6, 7, 8, 2], [-100, 9, 10, 2, -100, -100]])
    with torch.no_grad():
        out = model(input_ids=input_ids, labels=labels)
        loss_sum, count = causal_lm_loss_sum(out.logits, labels)
    assert count == 7  # after the shift: 4 trained positions in row 0, 3 in row 1
    torch.testing.assert_close(loss_sum / count, out.loss)


def test_presets_and_overrides() -> None:
    config = model_config("llama-7b", 32000, None)
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (4096, 32, 11008)
    assert model_config("llama-65b", 32000, {"num_hidden_layers": 2}).num_hidden_layers == 2
    with pytest.raises(ModelError, match="unknown LlamaConfig field"):
        model_config("llama-tiny", 100, {"num_layerz": 2})
    with pytest.raises(ModelError, match="unknown preset|neither a preset"):
        model_config("./llama-8b", 100, None)


def test_rope_overrides_rebuild_the_config_as_transformers_expects(tmp_path) -> None:
    # A checkpoint with a non-default base frequency (Llama 3's is 500000), as a user's would be.
    LlamaForCausalLM(LlamaConfig(**{**llama_tiny(), "vocab_size": 100, "rope_theta": 5e5})).save_pretrained(tmp_path)
    base = build_model(str(tmp_path), 100)
    scaled = build_model(str(tmp_path), 100, {"rope_scaling": {"type": "linear", "factor": 4}})
    # Linear scaling divides the positions by the factor, i.e. every inverse frequency; the base frequency stays.
    torch.testing.assert_close(scaled.model.rotary_emb.inv_freq, base.model.rotary_emb.inv_freq / 4)
    assert scaled.config.rope_parameters == {"rope_type": "linear", "factor": 4, "rope_theta": 5e5}
    assert scaled(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 100)
    assert model_config(str(tmp_path), 100, {"rope_theta": 1e6}).rope_parameters["rope_theta"] == 1e6
    # A derived field follows the fields it derives from.
    assert model_config("llama-tiny", 100, {"hidden_size": 128}).head_dim == 32
    with pytest.raises(ModelError, match="unknown RoPE type 'bogus'"):
        model_config("llama-tiny", 100, {"rope_scaling": {"type": "bogus", "factor": 2}})
    with pytest.raises(ModelError, match="not a valid LlamaConfig"):
        model_config("llama-tiny", 100, {"num_hidden_layers": "two"})


def test_non_llama_checkpoints_are_refused(tmp_path) -> None:
    GPT2Config().save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="is a 'gpt2' model; pandallm trains the LLaMA architecture"):
        build_model(str(tmp_path), 100)
    with pytest.raises(ModelError, match="no config.json"):
        build_model(str(tmp_path / "absent"), 100)


def test_checkpoint_embeddings_grow_to_the_tokenizer(tmp_path) -> None:
    tiny_model("sdpa").save_pretrained(tmp_path)
    model = build_model(str(tmp_path), 104)
    embeddings = model.get_input_embeddings().weight
    assert embeddings.shape[0] == 104
    torch.testing.assert_close(embeddings[100:], embeddings[:100].mean(0, keepdim=True).expand(4, -1))


def test_a_checkpoint_trains_in_training_mode(tmp_path) -> None:
    from pandallm.model import PandaLLM
    from tests.conftest import TOKENIZER_DIR

    tiny_model("sdpa").save_pretrained(tmp_path)  # from_pretrained hands models back in eval mode
    module = PandaLLM(model_name_or_path=str(tmp_path), tokenizer=str(TOKENIZER_DIR), gradient_checkpointing=True)
    module.configure_model()
    assert module.model.training and all(m.training for m in module.model.modules())
    assert module.model.is_gradient_checkpointing
