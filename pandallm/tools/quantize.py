"""`pandallm quantize --method gptq`: a trained model quantized for inference with GPTQ (LLMBox's GPTQ options),
through llm-compressor, into a compressed-tensors checkpoint that plain transformers loads and generates from.

    pandallm quantize --model runs/llama7b/version_0/hf --output runs/llama7b/gptq-4bit --bits 4 --group_size 128 \\
        --config recipes/llama7b.yaml

Calibration samples are texts of the run's own data (`--config`: its data directories and `train_files`) or of
`--calibration` files and directories, in any format pandallm reads; a seeded draw of them calibrates, and others,
held out, measure the perplexity of the model before and after quantization (printed, and written to
`quantization.json` in the output). auto-gptq, which LLMBox used, is unmaintained; llm-compressor is the maintained
library that runs GPTQ on the CPU as well as on GPUs (`pip install 'pandallm[gptq]'`).
"""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path
from typing import Literal

import torch

from pandallm.errors import ConfigError, DatasetError, ModelError
from pandallm.suggest import tool_cli

Bits = Literal[2, 3, 4, 8]


def calibration_texts(calibration: list[str] | None, config: str | None) -> list[str]:
    """Every text of the calibration sources: a conversation's turns joined, a document whole."""
    from pandallm.data.records import read_records
    from pandallm.data.sources import training_sources

    if calibration:
        sources = training_sources({}, calibration)
    elif config:
        from pandallm.tools.estimate import _parsed_fit_config

        data = _parsed_fit_config(["--config", config])["data"]
        directories = {
            "instruction": data.get("instruction_tuning_data_dir"),
            "pretraining": data.get("pretraining_data_dir"),
        }
        sources = training_sources(directories, data.get("train_files") or [])
    else:
        raise ConfigError("give --calibration (files or directories of records) or --config (the run's data)")
    texts = []
    for files in sources.values():
        for kind, path in files:
            texts += ["\n".join(record.texts) for record in read_records(path, kind)[1]]
    return [text for text in texts if text.strip()]


def perplexity(model, tokenizer, texts: list[str], max_seq_length: int) -> float:
    """exp of the mean next-token loss over every token of `texts` (each cut at `max_seq_length`)."""
    from pandallm.model.loss import causal_lm_loss_sum

    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, truncation=True, max_length=max_seq_length, return_tensors="pt").input_ids
            loss_sum, n = causal_lm_loss_sum(model(input_ids=ids).logits, ids)
            total, count = total + float(loss_sum), count + int(n)
    return math.exp(total / max(count, 1))


def _recipe(bits: int, group_size: int, damp_percent: float, desc_act: bool):
    try:
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
        from llmcompressor.modifiers.quantization import GPTQModifier
    except ImportError as e:
        raise ConfigError(
            "--method gptq needs llm-compressor: pip install 'pandallm[gptq]' (it pins its own transformers version; "
            "a separate environment for quantizing keeps the training one as it is)"
        ) from e
    grouping = {"strategy": "channel"} if group_size == -1 else {"strategy": "group", "group_size": group_size}
    weights = QuantizationArgs(
        num_bits=bits, type="int", symmetric=True, actorder="weight" if desc_act else None, **grouping
    )
    scheme = QuantizationScheme(targets=["Linear"], weights=weights)
    return GPTQModifier(config_groups={"gptq": scheme}, ignore=["lm_head"], dampening_frac=damp_percent)


def quantize(
    model: str,
    output: str,
    method: Literal["gptq"] = "gptq",
    bits: Bits = 4,
    group_size: int = 128,
    damp_percent: float = 0.01,
    desc_act: bool = False,
    calibration: list[str] | None = None,
    config: str | None = None,
    num_samples: int = 128,
    eval_samples: int = 32,
    max_seq_length: int = 512,
    seed: int = 42,
) -> dict:
    """Quantize a Hugging Face checkpoint with GPTQ and report its perplexity before and after.

    Args:
        model: A Hugging Face checkpoint directory (pandallm's `hf/` export; merge a LoRA run's adapters first with
            `pandallm export --adapter_save_type merge`).
        output: Directory of the quantized checkpoint (new, empty, or an earlier export).
        method: `gptq` (llm-compressor's GPTQModifier).
        bits: Bits per weight: 2, 3, 4 or 8.
        group_size: Weights that share a scale (-1: one scale per output channel).
        damp_percent: Dampening of the Hessian's diagonal, as a fraction of its mean.
        desc_act: Quantize columns in order of decreasing activation (GPTQ's act-order).
        calibration: Files or directories of records (any format) to calibrate on.
        config: A run's config: calibrate on its training data (its data directories and `train_files`).
        num_samples: Texts to calibrate on, drawn with `seed`.
        eval_samples: Further texts, held out from calibration, to measure the perplexity on.
        max_seq_length: Tokens per text, for calibration and perplexity.
        seed: The draw of the calibration and held-out texts.
    """
    from pandallm.model.export import check_export_target, replace_directory

    source = Path(model)
    if (source / "adapter_config.json").is_file():
        raise ModelError(f"--model '{model}' is a LoRA adapter: merge it first (pandallm export --adapter_save_type "
                         "merge) and quantize the merged model")  # fmt: skip
    if not (source / "config.json").is_file():
        raise ModelError(f"--model '{model}': not a Hugging Face checkpoint directory (no config.json)")
    if group_size != -1 and group_size < 1:
        raise ConfigError(f"--group_size {group_size}: a positive number of weights, or -1 for one per channel")
    if not 0 < damp_percent < 1:
        raise ConfigError(f"--damp_percent {damp_percent}: a fraction between 0 and 1 (GPTQ's default 0.01)")
    if Path(output).resolve() == source.resolve():
        # An export passes `check_export_target`, and the output replaces its directory: the unquantized model would
        # be deleted once the quantized one is written.
        raise ConfigError(f"--output '{output}' is --model's directory; write the quantized model elsewhere")
    for option, value, least in (("num_samples", num_samples, 1), ("eval_samples", eval_samples, 1),
                                 ("max_seq_length", max_seq_length, 2)):  # fmt: skip
        if value < least:
            raise ConfigError(f"--{option} {value}: at least {least}")
    check_export_target(output)
    recipe = _recipe(bits, group_size, damp_percent, desc_act)
    texts = calibration_texts(calibration, config)
    random.Random(seed).shuffle(texts)
    held_out = texts[num_samples : num_samples + eval_samples] or texts[-max(1, len(texts) // 4) :]
    calibrate = texts[:num_samples] if len(texts) > num_samples else texts[: len(texts) - len(held_out)]
    if not calibrate:
        raise DatasetError(f"the calibration data holds {len(texts)} text(s): too few to calibrate and hold some out")

    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    from pandallm.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model)
    original = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, trust_remote_code=False).eval()
    before = perplexity(original, tokenizer, held_out, max_seq_length)
    rows = Dataset.from_dict(
        {"input_ids": [tokenizer(t, truncation=True, max_length=max_seq_length)["input_ids"] for t in calibrate]}
    )
    oneshot(
        model=original, dataset=rows, recipe=recipe, max_seq_length=max_seq_length, num_calibration_samples=len(rows)
    )
    target = replace_directory(
        Path(output), lambda tmp: (original.save_pretrained(tmp, save_compressed=True), tokenizer.save_pretrained(tmp))
    )
    quantized = AutoModelForCausalLM.from_pretrained(target, trust_remote_code=False).eval()  # as a user loads it
    after = perplexity(quantized, tokenizer, held_out, max_seq_length)
    report = {
        "method": method,
        "bits": bits,
        "group_size": group_size,
        "damp_percent": damp_percent,
        "desc_act": desc_act,
        "calibration_texts": len(calibrate),
        "held_out_texts": len(held_out),
        "perplexity_before": before,
        "perplexity_after": after,
    }
    (target / "quantization.json").write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"pandallm quantize: {bits}-bit GPTQ of {model} -> {output}; held-out perplexity {before:.3f} -> {after:.3f} "
        f"({len(held_out)} texts)",
        file=sys.stderr,
    )
    return report


def main(args: list[str] | None = None) -> dict:
    return tool_cli(quantize, args, "pandallm quantize", as_positional=False)
