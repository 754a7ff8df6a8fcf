"""pandallm's DPO against TRL's DPOTrainer on the same model, pairs, order, batch and optimizer (CPU fp32).

    python -m benchmarks.dpo_vs_trl [--models llama-tiny smollm2-lora] [--rounds 3] [--steps N --warmup W]

Two models: `llama-tiny` (random init, every weight trained; TRL loads a second copy as the reference, pandallm
scores the reference once before training) and `smollm2-lora` (SmolLM2-135M-Instruct from the GGUF file the tests
fetch, LoRA r=16 on every projection; both use the base with the adapters disabled as the reference, TRL at every
step, pandallm once). The pairs are synthetic with Alpaca-like lengths (`common.alpaca_like_records`: a record's
prompt and answer, and another record's answer as the rejected side). Each run is its own process, pandallm and TRL
alternating first across rounds.

Reports per-step loss parity, steady-state tokens/s (non-pad tokens of both sides of every pair; start-up and the
first `warmup` steps excluded, so pandallm's scoring pass before training is not counted: it is reported apart, as
`reference_scoring_s`), and each process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
from pathlib import Path

from benchmarks.common import alpaca_like_records, prepare_model, smollm2_gguf, tiny_checkpoint, write_result
from benchmarks.preference_sides import PairSetup, prepare_rows, run_side
from benchmarks.sides import steady_tokens_per_second
from pandallm.tokenizer import load_tokenizer

MODELS = {
    "llama-tiny": {"batch": 8, "seq": 512, "steps": 12, "warmup": 3},
    "smollm2-lora": {"batch": 2, "seq": 256, "steps": 6, "warmup": 1, "lora_r": 16},
}


def build_setup(name: str, work: Path, model_dir: Path, overrides: dict, num_pairs: int) -> PairSetup:
    root = work / name
    if name == "llama-tiny":
        init = root / "init"
        tokenizer = tiny_checkpoint(init)
    else:
        init = Path(prepare_model(str(smollm2_gguf()), model_dir))
        tokenizer = load_tokenizer(str(init))
    records = alpaca_like_records(tokenizer, 2 * num_pairs, seed=0)
    (root / "pairs").mkdir(parents=True)
    with (root / "pairs" / "pairs.jsonl").open("w") as out:
        for a, b in zip(records[::2], records[1::2], strict=True):
            out.write(json.dumps({"prompt": a["input"], "chosen": a["target"], "rejected": b["target"]}) + "\n")
    settings = {key: value for key, value in MODELS[name].items() if key != "warmup"}
    setup = PairSetup(
        init=str(init),
        pairs_dir=str(root / "pairs"),
        cache_dir=str(root / "cache"),
        rows_file=str(root / "rows.json"),
        **{**settings, **overrides},
    )
    prepare_rows(setup)
    return setup


def summarize(setup: PairSetup, runs: dict[str, list[dict]], warmup: int) -> dict:
    rates = {side: [steady_tokens_per_second(r, warmup) for r in reports] for side, reports in runs.items()}
    ratio = statistics.median(a / b for a, b in zip(rates["pandallm"], rates["trl"], strict=True))
    parity = max(
        max(abs(a - b) for a, b in zip(p["losses"], t["losses"], strict=True))
        for p, t in zip(runs["pandallm"], runs["trl"], strict=True)
    )
    return {
        "pairs_per_step": setup.batch,
        "max_seq_length": setup.seq,
        "steps": setup.steps,
        "warmup_steps_excluded": warmup,
        "lora_r": setup.lora_r,
        "loss_parity_max_abs_diff": parity,
        "losses": {"pandallm": runs["pandallm"][0]["losses"], "trl": runs["trl"][0]["losses"]},
        "tokens_per_second": rates,
        "tokens_per_second_median": {side: statistics.median(values) for side, values in rates.items()},
        "reference_scoring_s": statistics.median(r["reference_scoring_s"] for r in runs["pandallm"]),
        "peak_rss_mib": {side: max(r["peak_rss_mib"] for r in reports) for side, reports in runs.items()},
        "ratio_pandallm_vs_trl": ratio,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None, help="pairs per step")
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=400)
    parser.add_argument("--model-dir", default=".cache/benchmarks")
    parser.add_argument("--in-process", action="store_true", help="no process per run (peak RSS is then not per side)")
    parser.add_argument("--results-dir", default=None)
    options = parser.parse_args()
    load_at_start = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="pandallm-dpo-bench-"))
    chosen = {"steps": options.steps, "batch": options.batch, "seq": options.seq}
    overrides = {key: value for key, value in chosen.items() if value is not None}
    try:
        setups = {
            name: build_setup(name, work, Path(options.model_dir), overrides, options.pairs) for name in options.models
        }
        results = {}
        for name, setup in setups.items():
            runs: dict[str, list[dict]] = {"pandallm": [], "trl": []}
            for round_index in range(options.rounds):
                order = ("pandallm", "trl") if round_index % 2 == 0 else ("trl", "pandallm")
                for side in order:
                    runs[side].append(run_side(side, setup, in_process=options.in_process))
            results[name] = summarize(setup, runs, options.warmup or MODELS[name]["warmup"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for name, r in results.items():
        rates = r["tokens_per_second_median"]
        print(
            f"{name:<14} pandallm {rates['pandallm']:>8.0f} tok/s   TRL {rates['trl']:>8.0f} tok/s   "
            f"ratio {r['ratio_pandallm_vs_trl']:.2f}   peak RSS {r['peak_rss_mib']['pandallm']:,} / "
            f"{r['peak_rss_mib']['trl']:,} MiB   loss parity {r['loss_parity_max_abs_diff']:.1e}   "
            f"reference scoring {r['reference_scoring_s']:.1f} s"
        )
    result = {
        "setting": "CPU fp32, DPO sigmoid beta 0.1, AdamW (0.9, 0.99, eps 1e-6), constant LR, clip 1.0, same init, "
        "pairs and order",
        "data": f"{options.pairs} synthetic pairs, Alpaca-like lengths (common.alpaca_like_records)",
        "rounds": options.rounds,
        "load_average_at_start": round(load_at_start, 2),
        "models": results,
    }
    print("written:", write_result("dpo_vs_trl", result, options.results_dir))


if __name__ == "__main__":
    main()
