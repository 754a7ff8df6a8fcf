"""LoRA and QLoRA runs end to end on CPU: what trains, that loss falls, and that both exports reproduce the model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from pandallm.cli import cli, main
from pandallm.model.presets import llama_tiny
from tests.conftest import TOKENIZER_DIR, metric_column, tiny_fit_args

pytestmark = pytest.mark.integration

MERGE = ["--adapter_save_type=merge"]
IDS = torch.tensor([[1, 17, 250, 2999, 2995, 600, 42, 2]])  # 2995 and 2999: rows the tokenizer added


def logits(model: torch.nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_lora_trains_the_adapters_and_modules_to_save_and_leaves_the_base_bit_equal(tmp_path) -> None:
    args = tiny_fit_args(tmp_path, "--model.use_lora=true", "--model.lora_r=4", "--model.modules_to_save=[lm_head]")
    built = cli([*args, "--trainer.max_steps=6", "--export.enabled=false"], run=False)
    module = built.model
    module.configure_model()
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    built.trainer.fit(module, built.datamodule)
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    changed = {name for name, p in module.named_parameters() if not torch.equal(p, before[name])}
    assert trainable and all("lora_" in n or "lm_head.modules_to_save" in n for n in trainable)
    assert changed == trainable  # every adapter moved; every frozen weight is bit-equal
    assert len(before) - len(trainable) == 21  # the tiny base's 21 tensors (lm_head's original among them) are frozen


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_lora_trains_on_cpu_and_its_merged_export_computes_the_same(tmp_path, bits: int) -> None:
    args = [
        "--model.use_lora=true",
        "--model.use_quant=true",
        f"--model.bit_training={bits}",
        "--model.lora_r=8",
        "--model.lora_dropout=0.0",
        "--model.gradient_checkpointing=true",
        "--trainer.max_steps=16",
        "--export.adapter_save_type=merge",
    ]
    fit = cli(["fit", *tiny_fit_args(tmp_path, *args)])
    losses = metric_column(Path(fit.trainer.log_dir), "train/loss")
    assert len(losses) == 16
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.3  # measured: 8.0 -> 7.4 (4 and 8 bits)
    merged = AutoModelForCausalLM.from_pretrained(Path(fit.trainer.log_dir) / "hf")
    assert not any("bitsandbytes" in type(m).__module__ for m in merged.modules())  # dense: dequantized, then merged
    ours = logits(fit.model.model)
    # The quantized model computes in bf16 (4-bit) or fp16 (int8) on its way; the merged one in fp32.
    torch.testing.assert_close(logits(merged), ours, rtol=0, atol=0.02 * ours.abs().max().item())


@pytest.fixture(scope="module")
def lora_on_a_checkpoint(tmp_path_factory) -> dict:
    """LoRA with modules_to_save [embed_tokens, lm_head] on a checkpoint whose vocabulary the tokenizer grows."""
    root = tmp_path_factory.mktemp("lora_export")
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**llama_tiny(), vocab_size=2990))  # the tokenizer has 3000 tokens
    base.save_pretrained(root / "base")
    args = tiny_fit_args(
        root,
        f"--model.model_name_or_path={root / 'base'}",
        "--model.use_lora=true",
        "--model.lora_r=4",
        "--model.modules_to_save=[embed_tokens, lm_head]",
        "--trainer.max_steps=8",
    )
    fit = cli(["fit", *args])
    return {"root": root, "fit": fit, "args": args, "run_dir": Path(fit.trainer.log_dir)}


def test_the_adapter_export_loads_with_plain_peft(lora_on_a_checkpoint) -> None:
    run = lora_on_a_checkpoint
    base = AutoModelForCausalLM.from_pretrained(run["root"] / "base")
    base.resize_token_embeddings(3000)  # as the run did before adding adapters
    adapter = PeftModel.from_pretrained(base, run["run_dir"] / "hf")
    trained = run["fit"].model.model
    assert logits(trained)[0, :, 2990:].abs().sum() > 0  # the grown rows are part of the model
    torch.testing.assert_close(logits(adapter), logits(trained), rtol=0, atol=1e-6)


def test_the_merged_export_loads_with_plain_transformers(lora_on_a_checkpoint) -> None:
    run = lora_on_a_checkpoint
    trained = run["fit"].model
    directory = trained.export_hf(run["root"] / "merged", "merge")
    merged = AutoModelForCausalLM.from_pretrained(directory)
    assert merged.get_input_embeddings().num_embeddings == 3000
    assert not any("lora" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged), logits(trained.model), rtol=0, atol=1e-5)
    assert trained.is_adapter_run  # merging worked on a copy


def test_the_export_command_exports_a_finished_runs_checkpoint(lora_on_a_checkpoint) -> None:
    run = lora_on_a_checkpoint
    [checkpoint] = (run["run_dir"] / "checkpoints").glob("*.ckpt")
    trained = logits(run["fit"].model.model)
    merged_dir, adapter_dir = run["root"] / "tool_merged", run["root"] / "tool_adapter"
    config = run["run_dir"] / "config.yaml"  # the run's resolved config; a recipe works the same way
    main(["export", "--config", str(config), f"--ckpt_path={checkpoint}", f"--output={merged_dir}"] + MERGE)
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(merged_dir)), trained, rtol=0, atol=1e-5)
    main(["export", f"--ckpt_path={checkpoint}", f"--output={adapter_dir}"])  # settings from the checkpoint
    base = AutoModelForCausalLM.from_pretrained(run["root"] / "base")
    base.resize_token_embeddings(3000)
    torch.testing.assert_close(logits(PeftModel.from_pretrained(base, adapter_dir)), trained, rtol=0, atol=1e-6)
    # One setting given, the rest from the checkpoint (not from the defaults): the same merged model.
    again = run["root"] / "tool_merged_again"
    main(["export", f"--ckpt_path={checkpoint}", f"--output={again}", f"--model.tokenizer={TOKENIZER_DIR}", *MERGE])
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(again)), trained, rtol=0, atol=1e-5)
