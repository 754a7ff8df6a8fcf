"""The longest sequence a tiny model trains on in a given amount of CPU memory, with the full logits and with the
chunked loss (with and without gradient checkpointing).

    python -m benchmarks.longest_sequence [--budget-gib 8] [--vocab 128256] [--start 2048] [--max-seq 65536]

One row of `seq` tokens, a llama-tiny with a 128,256-entry vocabulary, one AdamW step through `PandaLLM`
(`benchmarks.loss_memory.step_peak`, each length in its own process). The length doubles from `--start` while the
whole process's peak resident memory stays within the budget; the search stops at `--max-seq` (a step's time grows
with the length, and attention's with its square: on two cores a step at 32,768 tokens takes about a minute).
Reported per setting: the longest length measured within the budget, and the peak at each length tried.
"""

from __future__ import annotations

import argparse
import os

from benchmarks.common import write_result
from benchmarks.loss_memory import run_child

SETTINGS = {"full": ("full", False), "chunked": ("chunked", False), "chunked_checkpointing": ("chunked", True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-gib", type=float, default=8.0)
    parser.add_argument("--vocab", type=int, default=128_256)
    parser.add_argument("--start", type=int, default=2048)
    parser.add_argument("--max-seq", type=int, default=32_768)
    parser.add_argument("--results-dir", default=None, help="default benchmarks/results")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    options = parser.parse_args()
    child = argparse.Namespace(vocab=options.vocab, batch=1, steps=0)  # the first step's peak is the process's
    load_at_start = round(os.getloadavg()[0], 2)
    budget_mib = options.budget_gib * 1024
    results = {}
    for name in options.settings:
        impl, checkpointing = SETTINGS[name]
        tried, longest, seq = [], None, options.start
        while seq <= options.max_seq:
            run = run_child(impl, child, seq, checkpointing)
            peak = run.get("process_peak_mib")
            tried.append({"seq": seq, "process_peak_mib": peak, "step_s": run.get("step_s"), "failed": "failed" in run})
            print(f"{name:26s} seq {seq:>7,}: peak {peak if peak is not None else 'failed':>7} MiB")
            if peak is None or peak > budget_mib:
                break
            longest, seq = seq, seq * 2
        capped = longest == options.max_seq
        results[name] = {"longest_within_budget": longest, "search_capped_at_max_seq": capped, "tried": tried}
        print(f"{name}: longest within {options.budget_gib:g} GiB: {longest}{' (search capped)' if capped else ''}")
    write_result(
        f"longest_sequence_cpu_{options.budget_gib:g}gib",
        {"options": vars(options), "load_average_at_start": load_at_start, "results": results},
        options.results_dir,
    )


if __name__ == "__main__":
    main()
