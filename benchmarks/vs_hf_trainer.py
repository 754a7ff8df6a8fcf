"""pandallm against the Hugging Face Trainer on the same model, data order, batch and optimizer (CPU fp32).

    python -m benchmarks.vs_hf_trainer [--models llama-tiny smollm2-lora] [--rounds 3] [--steps N --warmup W]
    python -m benchmarks.vs_hf_trainer --models smollm2-lora --batch 8 --seq 512 --rounds 1   # Alpaca-like padding
    python -m benchmarks.vs_hf_trainer --models llama-tiny --with-full-loss   # also pandallm with model.loss_impl full

Two models: `llama-tiny` (the preset, random init, every weight trained) and `smollm2-lora` (SmolLM2-135M-Instruct
from the GGUF file the tests fetch, LoRA r=16 on every projection, on both sides through peft). The data is a
seeded synthetic instruction set with Alpaca-like lengths (`common.alpaca_like_records`). Three runs per model,
each in its own process: pandallm unpacked, the HF Trainer (padded), pandallm packed. Round r starts with run
r mod 3 (over three rounds, each run goes first, second and last once), so that machine noise and the advantage of
a position cancel in the ratios.

Reports (1) per-step loss parity with packing off: the external check that pandallm trains what the HF Trainer
trains; (2) steady-state tokens/s (non-pad tokens, start-up and the first `warmup` steps excluded) and each
process's peak RSS; (3) the ratios to the HF Trainer. pandallm's runs use `model.loss_impl` (`--loss-impl`, default
auto: the chunked loss on the CPU); `--with-full-loss` adds a fourth run, pandallm unpacked with the full logits, so
that the loss paths are compared in the same rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

from benchmarks.common import alpaca_like_records, prepare_model, smollm2_gguf, tiny_checkpoint, write_result
from benchmarks.sides import Setup, prepare_rows, run_side, steady_tokens_per_second
from pandallm.tokenizer import load_tokenizer

# Per model: batch, max_seq_length, steps (timed after `warmup`). 512 tokens keep all but Alpaca's longest records
# whole. SmolLM2 trains about 50 tokens/s on two CPU cores: its runs are kept short (256 tokens truncate the
# longest ~8% of the records) so that three rounds fit in about a quarter of an hour.
MODELS = {
    "llama-tiny": {"batch": 8, "seq": 512, "steps": 16, "warmup": 4},
    "smollm2-lora": {"batch": 2, "seq": 256, "steps": 6, "warmup": 1, "lora_r": 16, "lora_alpha": 32.0},
}
RUNS = (("pandallm", False), ("hf", False), ("pandallm", True))  # (side, packing)
FULL_LOSS_RUN = ("pandallm_full", False)  # pandallm with `model.loss_impl: full` (`--with-full-loss`)


def build_setup(name: str, work: Path, model_dir: Path, overrides: dict[str, int], num_records: int) -> Setup:
    """The checkpoint, the synthetic records and the tokenized rows of model `name`, under `work / name`, with the
    model's settings (MODELS) changed by `overrides` (steps, batch, seq)."""
    root = work / name
    if name == "llama-tiny":
        init = root / "init"
        tokenizer = tiny_checkpoint(init)
    else:
        init = Path(prepare_model(str(smollm2_gguf()), model_dir))
        tokenizer = load_tokenizer(str(init))
    (root / "it").mkdir(parents=True)
    with (root / "it" / "records.jsonl").open("w") as out:
        for record in alpaca_like_records(tokenizer, num_records, seed=0):
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    settings = {key: value for key, value in MODELS[name].items() if key != "warmup"}
    setup = Setup(
        init=str(init),
        cache_dir=str(root / "cache"),
        rows_file=str(root / "rows.json"),
        instruction_dir=str(root / "it"),
        **{**settings, **overrides},
    )
    prepare_rows(setup)
    return setup


def pad_share(setup: Setup) -> float:
    """Share of the HF Trainer's batch positions that are padding, over the steps timed."""
    lengths = [len(r["input_ids"]) for r in json.loads(Path(setup.rows_file).read_text())]
    real = padded = 0
    for i in range(setup.steps * setup.accumulate):
        batch = lengths[i * setup.batch : (i + 1) * setup.batch]
        real, padded = real + sum(batch), padded + max(batch) * len(batch)
    return 1 - real / padded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--steps", type=int, default=None, help="per run; default: the model's (MODELS)")
    parser.add_argument("--warmup", type=int, default=None, help="first steps left out of the throughput")
    parser.add_argument("--batch", type=int, default=None, help="per run; default: the model's (MODELS)")
    parser.add_argument("--seq", type=int, default=None, help="max_seq_length; default: the model's (MODELS)")
    parser.add_argument("--accumulate", type=int, default=None, help="micro-batches of --batch rows per step")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--records", type=int, default=1500)
    parser.add_argument("--model-dir", default=".cache/benchmarks", help="where the GGUF checkpoint is exported")
    parser.add_argument(
        "--in-process", action="store_true", help="no process per run (quicker; peak RSS is then not per side)"
    )
    parser.add_argument("--results-dir", default=None, help="where vs_hf_trainer.json goes; default benchmarks/results")
    parser.add_argument("--loss-impl", default="auto", choices=["auto", "full", "chunked"], help="pandallm's loss")
    parser.add_argument("--with-full-loss", action="store_true", help="a fourth run: pandallm with the full logits")
    options = parser.parse_args()
    runs = (*RUNS, FULL_LOSS_RUN) if options.with_full_loss else RUNS
    load_at_start = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="pandallm-bench-"))
    chosen = {"steps": options.steps, "batch": options.batch, "seq": options.seq, "accumulate": options.accumulate}
    overrides = {key: value for key, value in chosen.items() if value is not None}
    overrides["loss_impl"] = options.loss_impl
    try:
        setups = {
            name: build_setup(name, work, Path(options.model_dir), overrides, options.records)
            for name in options.models
        }
        reports: dict[str, dict[str, list[dict]]] = {name: {} for name in setups}
        for round_index in range(options.rounds):
            shift = round_index % len(runs)  # the first run of a round was measured slower: rotate the positions
            order = runs[shift:] + runs[:shift]
            for name, setup in setups.items():
                for side, packing in order:
                    label = side + ("_packed" if packing else "")
                    run = replace(setup, packing=packing)
                    if side == "pandallm_full":
                        side, run = "pandallm", replace(run, loss_impl="full")
                    report = run_side(side, run, in_process=options.in_process)
                    reports[name].setdefault(label, []).append(report)
        results = {
            name: summarize(setups[name], runs, options.warmup or MODELS[name]["warmup"])
            for name, runs in reports.items()
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_table(results)
    result = {
        "setting": "CPU fp32, AdamW (0.9, 0.99, eps 1e-6), constant LR, no warmup, clip 1.0, same init and order",
        "data": (
            f"{options.records} synthetic records, Alpaca-like lengths (log-normal; prompt median 25 tokens, "
            "response median 65, long tail): an assumption, see common.alpaca_like_records"
        ),
        "rounds": options.rounds,
        "pandallm_loss_impl": options.loss_impl,
        "load_average_at_start": round(load_at_start, 2),
        "models": results,
    }
    print("written:", write_result("vs_hf_trainer", result, options.results_dir))


def summarize(setup: Setup, runs: dict[str, list[dict]], warmup: int) -> dict:
    rates = {label: [steady_tokens_per_second(r, warmup) for r in reports] for label, reports in runs.items()}
    cpu_rates = {
        label: [steady_tokens_per_second(r, warmup, "step_end_cpu_s") for r in reports]
        for label, reports in runs.items()
    }
    # Each round's ratio compares runs that were measured next to each other: their median is the figure.
    ratios = {
        label: statistics.median(a / b for a, b in zip(rates[label], rates["hf"], strict=True))
        for label in ("pandallm", "pandallm_packed", "pandallm_full")
        if label in rates
    }
    parity = max(
        max(abs(a - b) for a, b in zip(p["losses"], h["losses"], strict=True))
        for p, h in zip(runs["pandallm"], runs["hf"], strict=True)
    )
    return {
        "batch": setup.batch,
        "accumulate": setup.accumulate,
        "max_seq_length": setup.seq,
        "steps": setup.steps,
        "warmup_steps_excluded": warmup,
        "lora_r": setup.lora_r,
        "loss_parity_max_abs_diff": parity,
        "losses": {"pandallm": runs["pandallm"][0]["losses"], "hf_trainer": runs["hf"][0]["losses"]},
        "hf_padding_share": pad_share(setup),
        "tokens_per_second": rates,
        "tokens_per_second_median": {label: statistics.median(values) for label, values in rates.items()},
        # Per second of the process's CPU time: what other work on a shared machine disturbs least.
        "tokens_per_cpu_second": cpu_rates,
        "tokens_per_cpu_second_median": {label: statistics.median(values) for label, values in cpu_rates.items()},
        "cpu_ratio_vs_hf": {
            label: statistics.median(a / b for a, b in zip(values, cpu_rates["hf"], strict=True))
            for label, values in cpu_rates.items()
            if label != "hf"
        },
        "peak_rss_mib": {label: max(r["peak_rss_mib"] for r in reports) for label, reports in runs.items()},
        "ratio_unpacked_vs_hf": ratios["pandallm"],
        "ratio_packed_vs_hf_padded": ratios["pandallm_packed"],
        **({"ratio_unpacked_full_loss_vs_hf": ratios["pandallm_full"]} if "pandallm_full" in ratios else {}),
    }


def print_table(results: dict) -> None:
    print(f"{'model':<14}{'run':<17}{'tokens/s':>10}{'vs HF':>8}{'per CPU s':>11}{'vs HF':>8}{'peak RSS MiB':>14}")
    for name, r in results.items():
        for label, rate in r["tokens_per_second_median"].items():
            ratio = {"pandallm": r["ratio_unpacked_vs_hf"], "pandallm_packed": r["ratio_packed_vs_hf_padded"]}
            ratio["pandallm_full"] = r.get("ratio_unpacked_full_loss_vs_hf", 1.0)
            per_cpu, cpu_ratio = r["tokens_per_cpu_second_median"][label], r["cpu_ratio_vs_hf"].get(label, 1.0)
            print(
                f"{name:<14}{label:<17}{rate:>10.0f}{ratio.get(label, 1.0):>8.2f}{per_cpu:>11.0f}{cpu_ratio:>8.2f}"
                f"{r['peak_rss_mib'][label]:>14,}"
            )
        print(
            f"{'':<14}loss parity (unpacked): max |pandallm - HF| = {r['loss_parity_max_abs_diff']:.1e}; "
            f"HF batches {r['hf_padding_share']:.0%} padding"
        )


if __name__ == "__main__":
    main()
