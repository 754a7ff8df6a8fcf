"""`pandallm estimate`: its counts against what autograd saves on the CPU, against the GPU peaks recorded in
benchmarks/RESULTS.md, and the command on the shipped recipes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from pandallm.errors import ConfigError, ModelError
from pandallm.model.memory import PROJECTIONS, Run, Shape, activation_bytes_per_token, estimate
from pandallm.tools.estimate import main

RESULTS = Path(__file__).parents[2] / "benchmarks" / "results"
TINY = {"hidden_size": 64, "intermediate_size": 176, "num_attention_heads": 4, "vocab_size": 300}


def saved_bytes(model: torch.nn.Module, ids: torch.Tensor) -> int:
    """Bytes of the tensors autograd saves for the backward pass of one forward, parameters left out."""
    parameters = {p.data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids)
    return sum(saved.values())


def model(layers: int, lora_r: int | None, dropout: float, **config) -> torch.nn.Module:
    torch.manual_seed(0)
    built = LlamaForCausalLM(LlamaConfig(**TINY, num_hidden_layers=layers, attn_implementation="sdpa", **config))
    if lora_r is not None:
        built = get_peft_model(built, LoraConfig(r=lora_r, lora_dropout=dropout, target_modules=list(PROJECTIONS)))
    return built.train()


@pytest.mark.parametrize(("lora_r", "dropout"), [(None, 0.0), (4, 0.0), (4, 0.1)])
def test_activations_per_layer_are_what_autograd_saves_on_the_cpu(lora_r: int | None, dropout: float) -> None:
    """The difference between a 4-layer and a 2-layer model is two decoder layers' saved tensors, exactly what the
    estimate counts, but for the norms' 1/rms and the attention's log-sum-exp (a few floats per token)."""
    ids = torch.randint(0, 300, (2, 32))
    measured = (saved_bytes(model(4, lora_r, dropout), ids) - saved_bytes(model(2, lora_r, dropout), ids)) / 2 / 64
    shape = Shape.of(LlamaConfig(**TINY, num_hidden_layers=2))
    run = Run(shape, 2, 32, "32-true", lora_r=lora_r, lora_dropout=dropout, device="cpu")
    assert activation_bytes_per_token(run) == pytest.approx(measured, rel=0.01)


def test_parameters_and_adapters_are_counted_as_transformers_and_peft_build_them() -> None:
    grouped = {"num_key_value_heads": 2, "tie_word_embeddings": True}
    built = model(3, None, 0.0, **grouped)
    shape = Shape.of(built.config)
    assert shape.parameters == sum(p.numel() for p in built.parameters())
    adapters = model(3, 8, 0.0, **grouped)
    trainable = sum(p.numel() for p in adapters.parameters() if p.requires_grad)
    state = estimate(Run(shape, 1, 8, "32-true", lora_r=8, device="cpu")).parts["optimizer state"]
    assert state == trainable * 8  # AdamW's two fp32 moments of each adapter weight


def recorded(name: str, *keys: str) -> int:
    value = json.loads((RESULTS / f"gpu_h100_{name}.json").read_text())
    for key in keys:
        value = value[key]
    return value["peak_memory_mib"]


ONE_B = Shape(2048, 5632, 22, 32000, 16, 16, 128)  # benchmarks/gpu.py's 1.1B config
SEVEN_B = Shape(4096, 11008, 32, 32000, 32, 32, 128)
GPU_RUNS = {
    "single device": (Run(ONE_B, 4, 2048), ("mfu", "mfu_1b")),
    "ZeRO-2": (Run(ONE_B, 4, 2048, sharding="zero2", deepspeed=True), ("zero2", "strategy_zero2")),
    "ZeRO-3": (Run(ONE_B, 4, 2048, sharding="zero3", deepspeed=True), ("zero3", "strategy_zero3")),
    "ZeRO-3 offload": (
        Run(ONE_B, 4, 2048, sharding="zero3", deepspeed=True, offload_optimizer=True, offload_parameters=True),
        ("zero3_offload", "strategy_zero3_offload"),
    ),
    "FSDP": (Run(ONE_B, 4, 2048, sharding="fsdp_full", half_compute=True), ("fsdp", "strategy_fsdp")),
    "FSDP2": (Run(ONE_B, 4, 2048, sharding="fsdp_full"), ("fsdp2", "strategy_fsdp2")),
    "7B LoRA b8": (Run(SEVEN_B, 8, 1024, "bf16-true", lora_r=16), ("lora_b8", "lora_7b", "pandallm_packed")),
    "7B LoRA b4": (Run(SEVEN_B, 4, 1024, "bf16-true", lora_r=16), ("lora_b4", "lora_7b", "pandallm_packed")),
    "7B QLoRA b8": (
        Run(SEVEN_B, 8, 1024, "bf16-true", lora_r=16, quant_bits=4),
        ("qlora_b8", "qlora_7b", "pandallm_packed"),
    ),
}


@pytest.mark.parametrize("name", list(GPU_RUNS))
def test_the_estimate_is_within_10_percent_of_every_gpu_peak_recorded(name: str) -> None:
    run, where = GPU_RUNS[name]
    assert estimate(run).total / 2**20 == pytest.approx(recorded(*where), rel=0.10)


def test_the_command_reads_a_recipe_and_says_whether_it_fits(capsys) -> None:
    recipe = ["--config", "recipes/llama65b_qlora.yaml", "--architecture", "llama-65b"]
    result = main([*recipe, "--gpu_memory_gib", "80"])
    out = capsys.readouterr().out
    assert "65.29B parameters" in out and "LoRA r=64, 4-bit base" in out and "fits in 80 GiB per device" in out
    assert 40 < result.total / 2**30 < 80
    main([*recipe, "--gpu_memory_gib", "24", "--data.per_device_train_batch_size", "8"])
    assert "does NOT fit in 24 GiB per device" in capsys.readouterr().out
    sharded = main(["--config", "recipes/llama65b.yaml", "--architecture", "llama-65b"])
    assert sharded.cpu > 0 and "optimizer state" not in sharded.parts  # ZeRO-3 offload: on the host


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        (["--architecture", "llama-8b"], ConfigError, r"--architecture 'llama-8b': expected one of"),
        (["--gpu_memory_gib", "0"], ConfigError, r"--gpu_memory_gib 0: give the memory of one GPU"),
        (["--devices", "-2"], ConfigError, r"--devices -2: give the number of devices per node, at least 1"),
        (["--model.model_name_or_path", "./absent"], ModelError, r"model.model_name_or_path '\./absent'"),
    ],
)
def test_bad_options_are_named(args: list[str], error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        main(["--config", "recipes/llama7b.yaml", *args])


def test_a_misspelled_fit_option_is_named_under_this_command(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--config", "recipes/tiny.yaml", "--trainer.max_step", "3"])
    err = capsys.readouterr().err
    assert err.startswith("pandallm estimate: error: unrecognized arguments: --trainer.max_step 3")
    assert "did you mean `trainer.max_steps`?" in err


def test_the_chunked_loss_counts_one_chunk_of_logits_and_falls_back_where_pandallm_does() -> None:
    from pandallm.model.memory import logits_and_loss
    from pandallm.tools.estimate import _loss_chunk_tokens

    shape = Shape.of(LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=2, vocab_size=128_256))
    full = logits_and_loss(Run(shape, 1, 2048, "32-true"))
    chunked = logits_and_loss(Run(shape, 1, 2048, "32-true", loss_chunk_tokens=256))
    assert full / chunked > 5  # 2,048 tokens' logits against 256 tokens' and the head's gradient
    assert _loss_chunk_tokens({"loss_impl": "auto"}, {"sharding": "none"}, 128_256) == 256
    assert _loss_chunk_tokens({"loss_impl": "full"}, {"sharding": "none"}, 128_256) is None
    assert _loss_chunk_tokens({}, {"sharding": "fsdp_full", "half_compute": True}, 128_256) is None  # FSDP1
    assert _loss_chunk_tokens({}, {"sharding": "fsdp_full"}, 128_256) == 256  # FSDP2
    assert _loss_chunk_tokens({"lora_target_modules": ["lm_head"]}, {}, 128_256) is None
