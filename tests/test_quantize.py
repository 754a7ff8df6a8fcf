"""`pandallm quantize --method gptq`: calibration from the run's data or files, the checks before any work, and
(where llm-compressor is installed) a tiny model quantized on the CPU that plain transformers loads and generates
from, with its held-out perplexity before and after."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

from pandallm.errors import ConfigError, ModelError
from pandallm.model.export import PARTIAL_MARK, check_export_target, replace_directory
from pandallm.tokenizer import load_tokenizer
from pandallm.tools.quantize import calibration_texts, quantize
from tests.conftest import DOCUMENTS, INSTRUCTIONS, REPO, TOKENIZER_DIR, write_jsonl

HAS_LLMCOMPRESSOR = importlib.util.find_spec("llmcompressor") is not None


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """A tiny LLaMA with the demo tokenizer, saved as pandallm's export saves one."""
    tokenizer = load_tokenizer(str(TOKENIZER_DIR))
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=len(tokenizer))  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def test_calibration_texts_come_from_the_runs_data_or_from_files(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    from_run = calibration_texts(None, "recipes/tiny.yaml")
    assert len(from_run) > 100 and any("\n" in text for text in from_run)  # instruction records: turns joined
    files = [str(write_jsonl(tmp_path / "a.jsonl", INSTRUCTIONS)), str(write_jsonl(tmp_path / "d.jsonl", DOCUMENTS))]
    texts = calibration_texts(files, None)
    assert (
        texts[0] == "What is the capital of France?\nParis."
        and texts[-1] == DOCUMENTS[-1]["title"] + "\n" + (DOCUMENTS[-1]["content"])
    )
    with pytest.raises(ConfigError, match="give --calibration"):
        calibration_texts(None, None)


def test_bad_input_is_refused_before_any_work(tmp_path: Path, checkpoint: Path) -> None:
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(ModelError, match="is a LoRA adapter: merge it first"):
        quantize(str(tmp_path / "adapter"), str(tmp_path / "q"))
    with pytest.raises(ModelError, match="not a Hugging Face checkpoint directory"):
        quantize(str(tmp_path), str(tmp_path / "q"))
    with pytest.raises(ConfigError, match="--group_size 0: a positive number"):
        quantize(str(checkpoint), str(tmp_path / "q"), group_size=0)
    with pytest.raises(ConfigError, match="--damp_percent 1.5: a fraction"):
        quantize(str(checkpoint), str(tmp_path / "q"), damp_percent=1.5)
    # The export's own directory passes the export-target check: quantizing into it deleted the unquantized model.
    with pytest.raises(ConfigError, match="is --model's directory; write the quantized model elsewhere"):
        quantize(str(checkpoint), str(checkpoint) + "/")
    with pytest.raises(ConfigError, match="--num_samples 0: at least 1"):
        quantize(str(checkpoint), str(tmp_path / "q"), num_samples=0)
    with pytest.raises(ConfigError, match="--max_seq_length 1: at least 2"):  # one token predicts nothing
        quantize(str(checkpoint), str(tmp_path / "q"), max_seq_length=1)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds more than an earlier export"):
        quantize(str(checkpoint), str(tmp_path / "taken"))


def test_what_is_at_the_outputs_temporary_name_is_removed_only_if_a_killed_write_left_it(
    tmp_path: Path, checkpoint: Path
) -> None:
    # The quantized model is written into `<output>.tmp` first; whatever was there was deleted without a look.
    (tmp_path / "q.tmp").write_text("a user's file")
    (tmp_path / "r.tmp").mkdir()
    (tmp_path / "r.tmp" / "notes.txt").write_text("mine")
    for output in ("q", "r"):
        with pytest.raises(ConfigError, match=rf"'{tmp_path / output}.tmp' is in the way .* move or remove it"):
            quantize(str(checkpoint), str(tmp_path / output))  # before calibrating
    assert (tmp_path / "q.tmp").read_text() == "a user's file" and (tmp_path / "r.tmp" / "notes.txt").is_file()

    def write(tmp: Path) -> None:
        (tmp / "config.json").write_text("{}")

    with pytest.raises(ConfigError, match="is in the way"):
        replace_directory(tmp_path / "r", write)
    assert (tmp_path / "r.tmp" / "notes.txt").is_file()
    # A write a kill interrupted is replaced: it holds the mark `replace_directory` puts in it first.
    (tmp_path / "s.tmp").mkdir()
    (tmp_path / "s.tmp" / PARTIAL_MARK).touch()
    (tmp_path / "s.tmp" / "model-00001-of-00002.safetensors").write_bytes(b"half a shard")
    assert replace_directory(tmp_path / "s", write) == tmp_path / "s"
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["config.json"] and not (tmp_path / "s.tmp").exists()


@pytest.mark.skipif(HAS_LLMCOMPRESSOR, reason="llm-compressor is installed here")
def test_without_llm_compressor_the_error_says_what_to_install(tmp_path: Path, checkpoint: Path) -> None:
    with pytest.raises(ConfigError, match=r"needs llm-compressor: pip install 'pandallm\[gptq\]'"):
        quantize(str(checkpoint), str(tmp_path / "q"), calibration=[str(TOKENIZER_DIR.parent / "pretraining")])


@pytest.mark.skipif(not HAS_LLMCOMPRESSOR, reason="needs llm-compressor (pip install 'pandallm[gptq]')")
@pytest.mark.parametrize(("bits", "group_size", "desc_act"), [(4, 32, False), (3, -1, True)])
def test_a_tiny_model_quantized_on_the_cpu_loads_and_generates_in_plain_transformers(
    tmp_path: Path, checkpoint: Path, bits: int, group_size: int, desc_act: bool
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = [str(REPO / "dataset" / "pretraining")]
    report = quantize(str(checkpoint), str(tmp_path / "q"), bits=bits, group_size=group_size, desc_act=desc_act,
                      calibration=data, num_samples=16, eval_samples=8, max_seq_length=64)  # fmt: skip
    assert json.loads((tmp_path / "q" / "quantization.json").read_text()) == report
    assert 0.5 < report["perplexity_after"] / report["perplexity_before"] < 2.0
    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    (group,) = config["config_groups"].values()
    assert (group["weights"]["num_bits"], config["quant_method"]) == (bits, "compressed-tensors")
    with safe_open(tmp_path / "q" / "model.safetensors", "pt") as f:
        packed = [k for k in f.keys() if k.endswith("q_proj.weight_packed")]  # noqa: SIM118 (not a dict)
        assert packed and f.get_tensor(packed[0]).dtype == torch.int32  # stored packed, not as floats
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "q")
    out = model.generate(**tokenizer("The river", return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert out.shape[1] > 2


def test_an_earlier_quantized_output_may_be_replaced(tmp_path: Path) -> None:
    # What `pandallm quantize` writes beside the weights (its report, llm-compressor's recipe) is part of an export.
    earlier = tmp_path / "q"
    earlier.mkdir()
    for name in ("config.json", "model.safetensors", "quantization.json", "recipe.yaml", "tokenizer.json"):
        (earlier / name).write_text("{}")
    check_export_target(earlier)
