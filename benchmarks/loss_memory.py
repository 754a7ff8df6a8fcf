"""The chunked loss against the full logits: peak memory and time of a training step, side by side in one run.

    python -m benchmarks.loss_memory [--vocab 128256] [--seq 2048] [--batch 1] [--steps 4] [--rounds 2]

A llama-tiny (hidden 64, 2 layers) with a Llama 3-sized vocabulary of 128,256 trains AdamW steps on one row of
`--seq` tokens, every token trained (pretraining), through `PandaLLM` and the SFT objective with `model.loss_impl`
`full` and then `chunked`, each in its own process, the order alternating between rounds. Measured per process: the
peak resident memory of the steps above what the process holds after a first (warm-up) step, which is the memory of
the step's transient tensors (logits, activations, gradients), and the median step time, wall and CPU (the process's
CPU time over every thread, which other work on a shared machine disturbs least). glibc's mmap threshold is
fixed as in `benchmarks.memory_estimate`, so that freed tensors do not stay resident.

`step_peak` (one step) is also used by `benchmarks.longest_sequence`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from benchmarks.common import CHILD_ENV, REPO, reset_peak_rss, rss_mib, write_result

TOKENIZER = REPO / "dataset" / "tokenizer"


def step_peak(
    loss_impl: str, vocab: int, batch: int, seq: int, steps: int, checkpointing: bool = False, seed: int = 0
) -> dict:
    """In this process: `steps` AdamW steps after a warm-up one; the step memory above the warm process, times."""
    from pandallm.model.module import PandaLLM

    torch.manual_seed(seed)
    module = PandaLLM(
        model_name_or_path="llama-tiny",
        tokenizer=str(TOKENIZER),
        config_overrides={"vocab_size": vocab},
        loss_impl=loss_impl,
        gradient_checkpointing=checkpointing,
    )
    module.configure_model()
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, vocab, (batch, seq))
    train_batch = {"input_ids": ids, "labels": ids, "position_ids": torch.arange(seq).expand(batch, seq)}

    def step() -> float:
        terms = module.objective.terms(module, train_batch, "train")
        (terms.loss_sum / terms.count).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(terms.loss_sum / terms.count)

    first_loss = step()  # optimizer state created, allocator warm
    held, first_peak = rss_mib("VmRSS"), rss_mib("VmHWM")
    reset_peak_rss()
    times, cpu_times = [], []
    for _ in range(steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return {
        "loss_impl": module.loss_path,
        "checkpointing": checkpointing,
        "seq": seq,
        "first_loss": first_loss,
        "held_mib": round(held),
        "step_peak_above_held_mib": round(rss_mib("VmHWM") - held) if steps else None,
        "process_peak_mib": round(max(first_peak, rss_mib("VmHWM"))),  # the first step's included
        "step_s": [round(t, 4) for t in times],
        "step_cpu_s": [round(t, 4) for t in cpu_times],  # every thread's: what other work on the machine disturbs least
    }


def run_child(loss_impl: str, options: argparse.Namespace, seq: int, checkpointing: bool = False) -> dict:
    """`step_peak` in a fresh process (its own peak memory), with glibc's mmap threshold fixed."""
    env = {**CHILD_ENV, "MALLOC_MMAP_THRESHOLD_": "65536"}
    args = [sys.executable, "-m", "benchmarks.loss_memory", "--child", loss_impl, "--seq", str(seq)]
    args += ["--vocab", str(options.vocab), "--batch", str(options.batch), "--steps", str(options.steps)]
    if checkpointing:
        args.append("--checkpointing")
    done = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"loss_impl": loss_impl, "seq": seq, "failed": done.returncode, "stderr": done.stderr[-2000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def logits_mib(options: argparse.Namespace) -> float:
    """One fp32 batch x seq x vocab tensor."""
    return options.batch * options.seq * options.vocab * 4 / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=128_256)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--results-dir", default=None, help="default benchmarks/results")
    parser.add_argument("--child", choices=["full", "chunked"], help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child:
        result = step_peak(
            options.child, options.vocab, options.batch, options.seq, options.steps, options.checkpointing
        )
        print(json.dumps(result))
        return
    load_at_start = round(os.getloadavg()[0], 2)
    runs: dict[str, list[dict]] = {"full": [], "chunked": []}
    for round_index in range(options.rounds):
        order = ["full", "chunked"] if round_index % 2 == 0 else ["chunked", "full"]
        for impl in order:
            run = run_child(impl, options, options.seq)
            if "failed" in run:
                raise SystemExit(f"{impl} failed: {run['stderr']}")
            runs[impl].append(run)
            print(
                f"round {round_index + 1} {impl:8s} step peak above the warm process "
                f"{run['step_peak_above_held_mib']:>6,} MiB, step {statistics.median(run['step_s']) * 1000:,.0f} ms"
            )
    summary = {}
    for impl, found in runs.items():
        peaks = [r["step_peak_above_held_mib"] for r in found]
        times = [t for r in found for t in r["step_s"]]
        summary[impl] = {
            "step_peak_mib_min": min(peaks),
            "step_peak_mib_median": statistics.median(peaks),
            "step_ms_min": round(min(times) * 1000, 1),
            "step_ms_median": round(statistics.median(times) * 1000, 1),
            "step_cpu_ms_median": round(statistics.median(t for r in found for t in r["step_cpu_s"]) * 1000, 1),
            "first_loss": found[0]["first_loss"],
        }
    memory_ratio = summary["full"]["step_peak_mib_median"] / summary["chunked"]["step_peak_mib_median"]
    time_ratio = summary["chunked"]["step_ms_median"] / summary["full"]["step_ms_median"]
    cpu_ratio = summary["chunked"]["step_cpu_ms_median"] / summary["full"]["step_cpu_ms_median"]
    print(
        f"one fp32 logits tensor: {logits_mib(options):,.0f} MiB; step peak full / chunked: {memory_ratio:.1f}x "
        f"smaller; step time chunked / full: {time_ratio:.3f} wall, {cpu_ratio:.3f} CPU (medians); first losses "
        f"{summary['full']['first_loss']:.6f} / {summary['chunked']['first_loss']:.6f}"
    )
    write_result(
        f"loss_memory_v{options.vocab}_s{options.seq}",
        {
            "options": {k: v for k, v in vars(options).items() if k not in ("child", "results_dir")},
            "load_average_at_start": load_at_start,
            "logits_fp32_mib": round(logits_mib(options)),
            "summary": summary,
            "memory_ratio_full_over_chunked": round(memory_ratio, 2),
            "time_ratio_chunked_over_full": round(time_ratio, 3),
            "cpu_time_ratio_chunked_over_full": round(cpu_ratio, 3),
            "runs": runs,
        },
        options.results_dir,
    )


if __name__ == "__main__":
    main()
