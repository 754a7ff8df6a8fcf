"""`pandallm estimate` against the memory a CPU training step really takes.

    python -m benchmarks.memory_estimate [--layers 8] [--hidden 512] [--batch 4] [--seq 256]

A LLaMA of the given shape trains a few AdamW steps in fp32 on the CPU, in this process (the loop pandallm's
step runs: forward, `causal_lm_loss_sum`, backward, optimizer step). Measured: the peak resident memory during the
steps above the memory held once the model is built (`VmHWM` after resetting it), which is what the estimate
counts less the weights (already resident before).

The process runs with glibc's mmap threshold fixed (`MALLOC_MMAP_THRESHOLD_=65536`, set by re-executing itself):
with glibc's default sliding threshold, memory that torch has freed stays resident in the heap, and the resident
peak overstates the live tensors by up to 1.6x at these sizes (measured), which no estimate of tensors can follow.
The GPU side of the check is tests/model/test_memory.py, against the peaks of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks.common import environment, reset_peak_rss, rss_mib, write_result
from pandallm.model.loss import causal_lm_loss_sum
from pandallm.model.memory import GIB, Run, Shape, estimate


def main() -> None:
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks.memory_estimate", *sys.argv[1:]], env)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1376)
    parser.add_argument("--vocab", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    options = parser.parse_args()
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=options.hidden,
        intermediate_size=options.intermediate,
        num_hidden_layers=options.layers,
        num_attention_heads=options.hidden // 64,
        vocab_size=options.vocab,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, options.vocab, (options.batch, options.seq))
    before = rss_mib("VmRSS")
    reset_peak_rss()
    for _ in range(options.steps):
        loss_sum, count = causal_lm_loss_sum(model(input_ids=ids).logits, ids)
        (loss_sum / count).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    measured = rss_mib("VmHWM") - before
    predicted = estimate(Run(Shape.of(config), options.batch, options.seq, "32-true", device="cpu"))
    expected = (predicted.total - predicted.parts["weights"]) / 2**20
    result = {
        **environment(),
        "shape": vars(options),
        "parameters": Shape.of(config).parameters,
        "estimate_mib": {name: round(size / 2**20, 1) for name, size in predicted.parts.items()},
        "estimate_beyond_weights_mib": round(expected, 1),
        "measured_peak_beyond_weights_mib": round(measured, 1),
        "ratio": round(expected / measured, 3),
        "malloc_mmap_threshold": os.environ["MALLOC_MMAP_THRESHOLD_"],
    }
    print(f"estimate beyond the weights: {expected:,.0f} MiB; measured peak above the built model: {measured:,.0f} MiB")
    print(f"ratio {expected / measured:.3f}; whole estimate {predicted.total / GIB:.2f} GiB")
    write_result(f"memory_estimate_cpu_b{options.batch}x{options.seq}", result)


if __name__ == "__main__":
    main()
