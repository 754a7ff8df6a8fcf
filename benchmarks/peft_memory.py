"""Peak memory and step time of full fine-tuning vs LoRA vs QLoRA (4-bit) vs LoRA on an 8-bit base.

Same model, same batch (the shipped English instruction records as plain text, every token trained), AdamW,
each mode in its own process so that its memory figures are its own. On CPU, memory is the resident set (RSS):
its high-water mark while training (reset after loading, freed heap handed back first, so the load's own peak
is reported apart); on a GPU, torch's peak allocation.

    pandallm fetch-smollm2 --output checkpoints
    python benchmarks/peft_memory.py --model checkpoints/SmolLM2-135M-Instruct.Q4_1.gguf --batch 4 --seq 128

A GGUF model is exported once as a plain Hugging Face checkpoint (`pandallm export`) into `--workdir`, so that
every mode loads the same safetensors rather than dequantizing the GGUF file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# This checkout's pandallm, for this process and the ones it starts, whatever else is installed.
sys.path.insert(0, str(REPO))

from benchmarks.common import CHILD_ENV as ENV  # noqa: E402 (after the path is set)
from benchmarks.common import prepare_model, reset_peak_rss, rss_mib  # noqa: E402

MODES = {
    "full": {},
    "lora": {"use_lora": True},
    "qlora_4bit": {"use_lora": True, "use_quant": True, "bit_training": 4},
    "lora_8bit": {"use_lora": True, "use_quant": True, "bit_training": 8},
}


def sample_batch(tokenizer, batch: int, seq: int):
    """`batch` rows of `seq` tokens of the shipped English instruction records, one after another."""
    import torch

    records = [json.loads(line) for line in (REPO / "dataset/instruction_tuning/alpaca_style_en.jsonl").open()]
    text = "\n".join(r["input"] + " " + r["target"] for r in records)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) >= batch * seq, "not enough sample text for this batch"
    return torch.tensor(ids[: batch * seq]).view(batch, seq)


def worker(args: argparse.Namespace) -> dict:
    import torch

    from pandallm.model import PandaLLM
    from pandallm.optim.optimizers import build_optimizer

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    settings = {"lora_r": args.lora_r, "gradient_checkpointing": args.gradient_checkpointing, **MODES[args.mode]}
    module = PandaLLM(model_name_or_path=args.model, **settings)
    load_start = time.perf_counter()
    module.configure_model()
    model = module.model.to(device).train()
    load_s = time.perf_counter() - load_start
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer("adamw", [{"params": trainable, "weight_decay": 0.0}], 1e-4, (0.9, 0.99), 1e-6, device)
    ids = sample_batch(module.tokenizer, args.batch, args.seq).to(device)
    after_load_rss, load_peak_rss = rss_mib("VmRSS"), rss_mib("VmHWM")
    reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, cpu_times, losses = [], [], []
    for _ in range(args.warmup + args.steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        losses.append(loss.item())
    result = {
        "mode": args.mode,
        "trainable_params": sum(p.numel() for p in trainable),
        "total_params": sum(p.numel() for p in model.parameters()),
        "load_s": round(load_s, 1),
        "rss_after_load_mib": round(after_load_rss),
        "load_peak_rss_mib": round(load_peak_rss),
        "train_peak_rss_mib": round(rss_mib("VmHWM")),
        "step_s_median": round(statistics.median(times[args.warmup :]), 2),
        # CPU seconds of the cheapest timed step: on a shared machine, the least disturbed measure of the work.
        "step_cpu_s_min": round(min(cpu_times[args.warmup :]), 2),
        "first_loss": round(losses[0], 3),
        "last_loss": round(losses[-1], 3),
    }
    if device.type == "cuda":
        result["gpu_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
    return result


def table(results: list[dict], args: argparse.Namespace, load_before: float) -> str:
    gpu = "gpu_peak_mib" in results[0]
    header = (
        "| mode | trainable params | peak RSS training (MiB) | peak RSS loading (MiB) | step wall s (median) "
        "| step CPU s (min) |"
    )
    header += " GPU peak (MiB) |" if gpu else ""
    lines = [header, "|" + "---|" * (7 if gpu else 6)]
    for r in results:
        row = (
            f"| {r['mode']} | {r['trainable_params']:,} of {r['total_params']:,} | {r['train_peak_rss_mib']:,} "
            f"| {r['load_peak_rss_mib']:,} | {r['step_s_median']} | {r['step_cpu_s_min']} |"
        )
        lines.append(row + (f" {r['gpu_peak_mib']:,} |" if gpu else ""))
    setting = (
        f"batch {args.batch} x {args.seq} tokens, AdamW, LoRA r={args.lora_r} on q/k/v/o/gate/up/down, "
        f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, {args.steps} timed steps after "
        f"{args.warmup} warm-up, device {args.device}, {args.threads or 'default'} torch threads, {os.cpu_count()} "
        f"CPUs, {platform.machine()}, load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
    )
    return "\n".join([f"Model {args.model}; {setting}.", "", *lines])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint directory, hub id or .gguf file")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--lora_r", type=int, default=64)
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0: torch's default")
    parser.add_argument("--workdir", default=".cache/benchmarks")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    load_before = os.getloadavg()[0]  # other processes on the machine skew the wall times
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    model = prepare_model(args.model, workdir)
    results = []
    for mode in args.modes:
        command = [sys.executable, __file__, "--worker", "1", "--mode", mode, "--model", model]
        command += [f"--batch={args.batch}", f"--seq={args.seq}", f"--steps={args.steps}", f"--warmup={args.warmup}"]
        command += [f"--lora_r={args.lora_r}", f"--device={args.device}", f"--threads={args.threads}"]
        command += ["--gradient_checkpointing"] if args.gradient_checkpointing else []
        done = subprocess.run(command, check=True, capture_output=True, text=True, env=ENV)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), file=sys.stderr)
    print(table(results, args, load_before))


if __name__ == "__main__":
    main()
