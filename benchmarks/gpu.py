"""GPU benchmarks (issue 6, item 5): MFU of full bf16 training of a ~1B LLaMA, and 7B LoRA / QLoRA against the HF
Trainer, on one GPU. Random-init models (nothing can be downloaded): throughput does not depend on the weights.

    python -m benchmarks.gpu [--runs mfu lora qlora] [--steps 20] [--warmup 5] [--packing] [--compile]
    python -m benchmarks.gpu --runs zero2 zero3 zero3_offload fsdp fsdp2     # the strategies, on the 1B config
    python -m benchmarks.gpu --runs loss memory_7b longest_1b     # issue 17: the loss paths, Liger, compile
    python -m benchmarks.gpu --dry-run      # CPU, tiny config, 2 steps, in one process: checks the script
    python -m benchmarks.gpu --tiny         # the same tiny config on the GPU (QLoRA included)

- `mfu`: the 1B config at sequence length 2048 (pretraining blocks, every position a real token), bf16-mixed
  (fp32 master weights, as llm-foundry trains), through pandallm's own CLI, LightningModule and Trainer.
  MFU = tokens/s x FLOPs per token / peak, with FLOPs per token = 6 N + 12 x layers x hidden x seq (the
  attention scores and values, forward and backward) and the peak measured: a large bf16 matmul on this GPU.
- `zero2`, `zero3`, `zero3_offload`, `fsdp`, `fsdp2`: the same 1B run under each multi-GPU strategy (DeepSpeed
  ZeRO-2, ZeRO-3, ZeRO-3 with optimizer and parameters offloaded to CPU memory, Lightning's FSDP with one unit per
  decoder layer, FSDP2), on one GPU: what each costs in tokens/s and saves in GPU memory (on one GPU nothing is
  sharded, so the savings shown are the offload's; sharding divides the rest by the number of GPUs).
- `lora`, `qlora`: a 7B config, LoRA r=16 on every projection, bf16 base (`lora`) or NF4 base (`qlora`),
  tokens/s and peak GPU memory of pandallm (packed if `--packing`) against the HF Trainer + peft (padded), on
  Alpaca-like instruction records, each side in its own process.

- `loss`: the `mfu` run once per entry of LOSS_VARIANTS: `model.loss_impl` full, chunked and liger, Liger's other
  kernels (`model.liger_kernels`), `model.compile`; tokens/s, MFU and peak GPU memory of each.
- `memory_7b`: pandallm's 7B LoRA and QLoRA runs (no HF side) once per entry of MEMORY_VARIANTS: the full logits,
  the chunked loss, and the chunked loss with checkpointing and activation offloading; peak GPU memory.
- `longest_1b`: the 1B full fine-tune at batch 1 with checkpointing, offloading and the chunked loss (and with the
  full logits and checkpointing only, for comparison), the sequence doubling from 4,096 until a run fails (out of
  memory) or reaches `--max-seq-1b`: the longest sequence that fits on this GPU.

The `--dry-run` runs every variant on the CPU that can run there, and records the others as skipped with the reason
(Liger's kernels and activation offloading are GPU-only).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks.common import REPO, alpaca_like_records, write_result
from benchmarks.sides import Setup, prepare_rows, run_side, steady_tokens_per_second
from pandallm.model.presets import llama_7b, llama_tiny
from pandallm.tokenizer import load_tokenizer

# ~1.1B parameters (TinyLlama's shape, with full multi-head attention).
LLAMA_1B = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
}
LLAMA_7B = {**llama_7b(), "vocab_size": 32000}
TINY = {**llama_tiny(), "vocab_size": 3000}

_LLAMA_LAYER = "transformers.models.llama.modeling_llama.LlamaDecoderLayer"
# `--trainer.strategy` of each strategy run: the shipped DeepSpeed configs; FSDP without activation checkpointing,
# as every other run here (the model's `gradient_checkpointing` is off in all of them).
STRATEGIES = {
    **{
        name: {
            "class_path": "lightning.pytorch.strategies.DeepSpeedStrategy",
            "init_args": {"config": f"configs/deepspeed/{name}.json"},
        }
        for name in ("zero2", "zero3", "zero3_offload")
    },
    "fsdp": {
        "class_path": "lightning.pytorch.strategies.FSDPStrategy",
        "init_args": {
            "sharding_strategy": "FULL_SHARD",
            "auto_wrap_policy": [_LLAMA_LAYER],
            "state_dict_type": "sharded",
        },
    },
    "fsdp2": {
        "class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
        "init_args": {"data_parallel_size": 1, "tensor_parallel_size": 1},
    },
}


# `Setup` fields of each variant of the `loss` run (the 1B config, bf16-mixed).
LOSS_VARIANTS = {
    "full": {"loss_impl": "full"},
    "chunked": {"loss_impl": "chunked"},
    "liger_ce": {"loss_impl": "liger"},
    "liger_ce_kernels": {"loss_impl": "liger", "liger_kernels": True},
    "chunked_compile": {"loss_impl": "chunked", "compile": True},
    "liger_ce_kernels_compile": {"loss_impl": "liger", "liger_kernels": True, "compile": True},
}
# `Setup` fields of each variant of the `memory_7b` run.
MEMORY_VARIANTS = {
    "full": {"loss_impl": "full"},
    "chunked": {"loss_impl": "chunked"},
    "chunked_checkpointing_offload": {
        "loss_impl": "chunked",
        "gradient_checkpointing": True,
        "activation_offloading": True,
    },
}
# `Setup` fields of each setting of the `longest_1b` search.
LONGEST_VARIANTS = {
    "full_checkpointing": {"loss_impl": "full", "gradient_checkpointing": True},
    "chunked_checkpointing_offload": {
        "loss_impl": "chunked",
        "gradient_checkpointing": True,
        "activation_offloading": True,
    },
}


def skipped_on(device: str, variant: dict) -> str | None:
    """Why `variant` cannot run on `device`, or None."""
    from pandallm.model.head import liger_unavailable

    if variant.get("loss_impl") == "liger" or variant.get("liger_kernels"):
        reason = liger_unavailable(torch.device(device))
        if reason:
            return reason
    if variant.get("activation_offloading") and device != "cuda":
        return "activation offloading moves GPU activations to CPU memory: nothing to offload on the CPU"
    return None


def matmul_peak_flops(device: str, dtype: torch.dtype, n: int, repeats: int) -> float:
    """FLOP/s of an n x n x n matmul, the best of `repeats`: the practical peak that MFU is measured against."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    best = float("inf")
    for _ in range(repeats + 2):  # the first calls pick kernels and warm the clocks
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(10):
            torch.matmul(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) / 10)
    return 2 * n**3 / best


def flops_per_token(config: dict, seq: int) -> float:
    """6 N (forward and backward through every weight) + 12 x layers x hidden x seq (attention: QK^T and AV)."""
    model_config = LlamaConfig(**config)
    with torch.device("meta"):
        num_params = sum(p.numel() for p in LlamaForCausalLM(model_config).parameters())
    return 6 * num_params + 12 * model_config.num_hidden_layers * model_config.hidden_size * seq


def random_checkpoint(config: dict, path: Path, dtype: torch.dtype, device: str) -> Path:
    """A random-init checkpoint with the shipped tokenizer: built on the meta device, materialized on `device`
    (seconds on a GPU for 7B, rather than minutes of CPU init), saved so that both sides load the same weights."""
    if (path / "config.json").is_file():
        return path
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**config))
    model = model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:  # RMSNorm weights
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=generator)
    model.to(dtype).save_pretrained(path)
    # 3,000 tokens under a 32,000-row embedding: ids stay in range and the compute is the full vocabulary's.
    load_tokenizer(str(REPO / "dataset" / "tokenizer")).save_pretrained(path)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return path


def write_documents(directory: Path, tokens_needed: int) -> Path:
    """Pretraining documents (the shipped English corpus, repeated) with at least `tokens_needed` tokens."""
    directory.mkdir(parents=True, exist_ok=True)
    corpus = [json.loads(line) for line in (REPO / "dataset/pretraining/encyclopedia_en.jsonl").open()]
    text = " ".join(r.get("text") or r.get("content", "") for r in corpus)
    copies = max(1, tokens_needed // max(1, len(text) // 6) + 1)  # at least ~1 token per 6 characters
    with (directory / "docs.jsonl").open("w") as out:
        for i in range(copies):
            out.write(json.dumps({"text": f"{i} {text}"}) + "\n")
    return directory


def mfu_run(
    work: Path,
    options: argparse.Namespace,
    peak: float,
    strategy: str | None = None,
    seq: int | None = None,
    batch: int | None = None,
    **variant,
) -> dict:
    """The 1B config's full training (under `strategy`, one of STRATEGIES; default: Lightning's single device), with
    the `Setup` fields of `variant` (loss path, Liger, compile, checkpointing, offloading)."""
    config, default_seq = (TINY, 64) if options.tiny else (LLAMA_1B, 2048)
    seq = seq or default_seq
    batch = batch or options.batch_1b
    dtype = torch.float32  # fp32 master weights: bf16-mixed computes in bf16
    init = random_checkpoint(config, work / "init-1b", dtype, options.device)
    setup = Setup(
        init=str(init),
        cache_dir=str(work / "cache"),
        rows_file=str(work / "rows-1b.json"),
        pretraining_dir=str(write_documents(work / f"docs-{seq}", options.steps * batch * seq * 2)),
        batch=batch,
        seq=seq,
        steps=options.steps,
        device=options.device,
        precision=options.precision,
        compile=options.compile,
        strategy=json.dumps(STRATEGIES[strategy]) if strategy else None,
    )
    setup = replace(setup, **variant)
    prepare_rows(setup)
    report = run_side("pandallm", setup, in_process=options.dry_run)
    tokens_per_s = steady_tokens_per_second(report, options.warmup)
    achieved = tokens_per_s * flops_per_token(config, seq)
    return {
        "config": config,
        "seq": seq,
        "batch": setup.batch,
        "compile": setup.compile,
        "variant": variant,
        "tokens_per_second": tokens_per_s,
        "model_flops_per_second": achieved,
        "mfu": achieved / peak,
        "peak_memory_mib": report.get("gpu_peak_mib", report["peak_rss_mib"]),
        "peak_rss_mib": report["peak_rss_mib"],
    }


def adapter_run(
    work: Path, options: argparse.Namespace, quant_bits: int, variant: dict | None = None, hf_side: bool = True
) -> dict:
    config = TINY if options.tiny else LLAMA_7B
    # The base in bf16 on a GPU (both sides train it so); fp32 on the CPU, where bf16 is not what users run.
    dtype = torch.bfloat16 if options.device == "cuda" else torch.float32
    init = random_checkpoint(config, work / "init-7b", dtype, options.device)
    records = work / "it"
    if not records.is_dir():
        records.mkdir()
        lines = alpaca_like_records(load_tokenizer(str(init)), options.records, seed=0)
        (records / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    setup = Setup(
        init=str(init),
        cache_dir=str(work / "cache"),
        rows_file=str(work / "rows-7b.json"),
        instruction_dir=str(records),
        batch=options.batch_7b,
        seq=options.seq_7b,
        steps=options.steps,
        lr=1e-4,
        lora_r=16,
        quant_bits=quant_bits,
        device=options.device,
        precision="bf16-true" if options.device == "cuda" else "32-true",
        compile=options.compile,
    )
    setup = replace(setup, **(variant or {}))
    prepare_rows(setup)
    result: dict = {}
    sides = (("pandallm", options.packing), ("hf", False)) if hf_side else (("pandallm", options.packing),)
    for side, packing in sides:
        report = run_side(side, replace(setup, packing=packing), in_process=options.dry_run)
        result[side + ("_packed" if packing else "")] = {
            "tokens_per_second": steady_tokens_per_second(report, options.warmup),
            "peak_memory_mib": report.get("gpu_peak_mib", report["peak_rss_mib"]),
        }
    if hf_side:
        mine, theirs = (result[label]["tokens_per_second"] for label in result)
        result["ratio_vs_hf"] = mine / theirs
    return result


def loss_runs(work: Path, options: argparse.Namespace, peak: float) -> dict:
    """The `mfu` run per LOSS_VARIANTS entry (those that cannot run here recorded as skipped)."""
    results = {}
    for name, variant in LOSS_VARIANTS.items():
        reason = skipped_on(options.device, variant)
        if options.dry_run and variant.get("compile"):
            reason = "compiled variants run on the GPU only: on two CPU cores compiling takes minutes"
        if reason:
            results[name] = {"skipped": reason}
            print(f"loss {name:<26} skipped: {reason}")
            continue
        results[name] = r = mfu_run(work, options, peak, **variant)
        print(
            f"loss {name:<26}{r['tokens_per_second']:>10,.0f} tokens/s  MFU {r['mfu']:6.1%}"
            f"{r['peak_memory_mib']:>10,} MiB"
        )
    return results


def memory_runs(work: Path, options: argparse.Namespace) -> dict:
    """pandallm's 7B LoRA and QLoRA per MEMORY_VARIANTS entry: peak memory and tokens/s."""
    results = {}
    for run, bits in (("lora", 0), ("qlora", 4)):
        if bits and options.dry_run:
            results[run] = {"skipped": "bitsandbytes' 4-bit base is not run on the CPU here"}
            continue
        for name, variant in MEMORY_VARIANTS.items():
            reason = skipped_on(options.device, variant)
            if reason:
                results[f"{run}_{name}"] = {"skipped": reason}
                print(f"7B {run} {name:<30} skipped: {reason}")
                continue
            r = adapter_run(work, options, bits, variant, hf_side=False)["pandallm" + ("_packed" * options.packing)]
            results[f"{run}_{name}"] = r
            print(f"7B {run} {name:<30}{r['tokens_per_second']:>10,.0f} tokens/s{r['peak_memory_mib']:>10,} MiB")
    return results


def longest_runs(work: Path, options: argparse.Namespace, peak: float) -> dict:
    """The longest sequence (batch 1, doubling) each LONGEST_VARIANTS setting trains the 1B config on."""
    results = {}
    start, limit = (64, 256) if options.tiny else (4096, options.max_seq_1b)
    for name, variant in LONGEST_VARIANTS.items():
        reason = skipped_on(options.device, variant)
        if reason:
            results[name] = {"skipped": reason}
            print(f"longest {name:<30} skipped: {reason}")
            continue
        tried, longest, seq = [], None, start
        while seq <= limit:
            try:
                r = mfu_run(work, options, peak, seq=seq, batch=1, **variant)
                tried.append({"seq": seq, "tokens_per_second": r["tokens_per_second"], "peak": r["peak_memory_mib"]})
                longest = seq
            except RuntimeError as e:  # the side's process failed: out of memory, as a rule
                tried.append({"seq": seq, "failed": str(e)[-300:]})
                break
            seq *= 2
        results[name] = {"longest": longest, "capped_at": limit if longest == limit else None, "tried": tried}
        print(f"longest {name:<30} {longest} tokens" + (" (search capped)" if longest == limit else ""))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    runs = ["mfu", "lora", "qlora", *STRATEGIES, "loss", "memory_7b", "longest_1b"]
    parser.add_argument("--runs", nargs="+", default=["mfu", "lora", "qlora"], choices=runs)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of the throughput")
    parser.add_argument("--batch-1b", type=int, default=4)
    parser.add_argument("--batch-7b", type=int, default=8)
    parser.add_argument("--seq-7b", type=int, default=1024)
    parser.add_argument("--records", type=int, default=4000)
    parser.add_argument("--precision", default="bf16-mixed", help="of the 1B run (Lightning's names)")
    parser.add_argument("--packing", action="store_true", help="pandallm packs the instruction records")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile: model.compile (each layer) and the HF Trainer's torch_compile",
    )
    parser.add_argument("--max-seq-1b", type=int, default=65536, help="where the longest_1b search stops")
    parser.add_argument("--workdir", default=".cache/benchmarks/gpu", help="random checkpoints are kept here")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny config, 2 timed steps")
    parser.add_argument("--tiny", action="store_true", help="the tiny config and 2 timed steps, on the GPU")
    parser.add_argument("--results-dir", default=None, help="where gpu.json goes; default benchmarks/results")
    options = parser.parse_args()
    options.tiny = options.tiny or options.dry_run
    if options.tiny:
        options.steps, options.warmup, options.batch_1b, options.batch_7b = 3, 1, 2, 2
        options.seq_7b, options.records = 128, 64
    if options.dry_run:
        # bitsandbytes' 4-bit base, DeepSpeed and Lightning's FSDP need a GPU: FSDP2 is the only strategy run here
        cpu_runs = [r for r in options.runs if r not in ("qlora", "fsdp") and not r.startswith("zero")]
        options.steps = 2 if {"loss", "memory_7b", "longest_1b"} & set(cpu_runs) else options.steps
        options.device, options.precision, options.runs = "cpu", "32-true", cpu_runs
    elif not torch.cuda.is_available():
        raise SystemExit("benchmarks.gpu needs a CUDA GPU; --dry-run checks the script on the CPU")
    else:
        options.device = "cuda"
    work = Path(options.workdir) / ("tiny" if options.tiny else "")
    work.mkdir(parents=True, exist_ok=True)
    dtype, size = (torch.float32, 256) if options.dry_run else (torch.bfloat16, 256 if options.tiny else 8192)
    peak = matmul_peak_flops(options.device, dtype, size, repeats=5)
    results: dict = {"matmul_peak_tflops": peak / 1e12, "packing": options.packing, "compile": options.compile}
    label = "tiny" if options.tiny else "1B"
    if "mfu" in options.runs:
        results["mfu_1b"] = mfu_run(work, options, peak)
        r = results["mfu_1b"]
        print(f"{label} full {options.precision}: {r['tokens_per_second']:,.0f} tokens/s, MFU {r['mfu']:.1%} of a")
        print(f"  measured {peak / 1e12:.1f} TFLOP/s matmul peak; peak memory {r['peak_memory_mib']:,} MiB")
    for strategy in STRATEGIES:
        if strategy in options.runs:
            results[f"strategy_{strategy}"] = r = mfu_run(work, options, peak, strategy)
            print(
                f"{label} full {options.precision} {strategy:<14}{r['tokens_per_second']:>10,.0f} tokens/s  MFU "
                f"{r['mfu']:6.1%}{r['peak_memory_mib']:>10,} MiB GPU{r['peak_rss_mib']:>10,} MiB RSS"
            )
    for run, bits in (("lora", 0), ("qlora", 4)):
        if run in options.runs:
            results[f"{run}_7b"] = r = adapter_run(work, options, bits)
            for label, figures in r.items():
                if isinstance(figures, dict):
                    print(
                        f"7B {run} {label:<16}{figures['tokens_per_second']:>10,.0f} tokens/s"
                        f"{figures['peak_memory_mib']:>10,} MiB"
                    )
            print(f"7B {run}: pandallm / HF Trainer = {r['ratio_vs_hf']:.2f}")
    if "loss" in options.runs:
        results["loss_1b"] = loss_runs(work, options, peak)
    if "memory_7b" in options.runs:
        results["memory_7b"] = memory_runs(work, options)
    if "longest_1b" in options.runs:
        results["longest_1b"] = longest_runs(work, options, peak)
    print("written:", write_result("gpu", results, options.results_dir))


if __name__ == "__main__":
    main()
