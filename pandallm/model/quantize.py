"""Quantized bases through bitsandbytes: 4-bit NF4 (QLoRA) and 8-bit (LLM.int8()).

The quantized weights are frozen; LoRA adapters on top of them are what trains. bitsandbytes 0.45+ runs both
kinds on the CPU as well as on CUDA GPUs.
"""

from __future__ import annotations

from typing import Literal

import torch
from transformers import BitsAndBytesConfig, PreTrainedModel

QuantBits = Literal[4, 8]


def bnb_config(bits: QuantBits) -> BitsAndBytesConfig:
    """QLoRA's recipe for 4 bits (NF4 weights, double-quantized scales, bf16 compute), or LLM.int8() for 8."""
    if bits == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"bits must be 4 or 8, got {bits}")


def is_quantized(model: torch.nn.Module) -> bool:
    """Whether `model` (or the model inside a PeftModel) holds bitsandbytes layers."""
    return any(type(m).__module__.startswith("bitsandbytes") for m in model.modules())


def prepare_quantized(model: PreTrainedModel, gradient_checkpointing: bool) -> PreTrainedModel:
    """peft's k-bit preparation: freeze the base, upcast its unquantized weights (norms, embeddings, `lm_head`)
    to fp32, and checkpoint activations if asked. Non-reentrant checkpointing needs no inputs that require grad.
    """
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    _keep_cpu_training_kernel(model)
    return model


def _keep_cpu_training_kernel(model: torch.nn.Module) -> None:
    # bitsandbytes 0.50 repacks a 4-bit layer's weight in place for an AVX512-BF16 CPU kernel the first time the
    # layer runs in eval mode without gradients (validation). That kernel asserts out_features % 32 == 0, gives
    # results slightly different from the training kernel, and `state_dict()` unpacks the weight again with its
    # double quantization undone. Evaluating with the kernel that trains keeps the numbers and the weights stable.
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def dequantize(model: PreTrainedModel) -> PreTrainedModel:
    """Make a quantized model dense, in place: every bitsandbytes layer becomes an `nn.Linear` holding the weights
    that the quantized layer computes with (not the weights before quantization, which it no longer has).
    """
    return model.dequantize()
