"""The data pipeline: preprocessing tokens/s against `datasets.map` + `group_texts` (as Chinese-LLaMA-Alpaca
prepares pretraining data), the cached re-run, and the share of real (non-pad) tokens in batches.

    python benchmarks/data_pipeline.py [--copies 40]

The shipped sample data is replicated `copies` times (each copy a distinct file, so nothing is deduplicated).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from itertools import chain
from pathlib import Path

from datasets import load_dataset

from benchmarks.common import write_result
from pandallm.data import PandaDataModule
from pandallm.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "dataset" / "tokenizer"


def replicate(work: Path, copies: int) -> tuple[Path, Path]:
    it, pt = work / "it", work / "pt"
    for kind, target in (("instruction_tuning", it), ("pretraining", pt)):
        target.mkdir(parents=True)
        for source in sorted((REPO / "dataset" / kind).iterdir()):
            records = (
                json.loads(source.read_text())
                if source.suffix == ".json"
                else [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
            )
            for copy in range(copies):
                # A marker per copy keeps copies distinct for the content-keyed cache.
                lines = [json.dumps({k: f"{v} ({copy})" for k, v in r.items()}, ensure_ascii=False) for r in records]
                (target / f"{source.stem}_{copy}.jsonl").write_text("\n".join(lines) + "\n")
    return it, pt


def pandallm_prepare(it: Path | None, pt: Path | None, cache: Path, packing: bool = False, batch: int = 8):
    dm = PandaDataModule(
        tokenizer=str(TOKENIZER),
        instruction_tuning_data_dir=str(it) if it else None,
        pretraining_data_dir=str(pt) if pt else None,
        max_seq_length=512,
        num_workers=0,
        cache_dir=str(cache),
        packing=packing,
        per_device_train_batch_size=batch,
    )
    start = time.perf_counter()
    dm.prepare_data()
    dm.setup("fit")
    return dm, time.perf_counter() - start


def group_texts_baseline(pt: Path, cache: Path, block: int = 512) -> tuple[int, float]:
    """Chinese-LLaMA-Alpaca's run_clm_pt preprocessing: tokenize, then concatenate and cut with `group_texts`."""
    tokenizer = load_tokenizer(str(TOKENIZER))
    start = time.perf_counter()
    raw = load_dataset("json", data_files=sorted(str(p) for p in pt.iterdir()), cache_dir=str(cache))["train"]
    tokenized = raw.map(
        lambda b: tokenizer([f"{t}\n{c}" for t, c in zip(b["title"], b["content"], strict=True)]),
        batched=True,
        remove_columns=raw.column_names,
    )

    def group_texts(examples):
        concatenated = {k: list(chain(*examples[k])) for k in examples}
        total = (len(concatenated["input_ids"]) // block) * block  # the remainder of every map batch is dropped
        return {k: [t[i : i + block] for i in range(0, total, block)] for k, t in concatenated.items()}

    blocks = tokenized.map(group_texts, batched=True)
    return sum(len(ids) for ids in blocks["input_ids"]), time.perf_counter() - start


def real_token_share(dm: PandaDataModule) -> float:
    real = total = 0
    for batch in dm.train_dataloader():
        real += int(batch["attention_mask"].sum())
        total += batch["attention_mask"].numel()
    return real / total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--copies", type=int, default=40)
    options = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pandallm-data-bench-"))
    try:
        it, pt = replicate(work, options.copies)
        dm, first = pandallm_prepare(None, pt, work / "cache")
        tokens = sum(len(ids) for ids in dm.datasets["train"]["input_ids"])
        _, cached = pandallm_prepare(None, pt, work / "cache")
        baseline_tokens, baseline = group_texts_baseline(pt, work / "hf-cache")
        padded, _ = pandallm_prepare(it, None, work / "cache-it", packing=False)
        packed, _ = pandallm_prepare(it, None, work / "cache-it", packing=True)
        result = {
            "pretraining_tokens": tokens,
            "pandallm_first_run_tokens_per_s": tokens / first,
            "pandallm_cached_run_s": cached,
            "cached_speedup": first / cached,
            "group_texts_tokens_per_s": baseline_tokens / baseline,
            "group_texts_tokens_kept": baseline_tokens,
            "real_token_share_padded": real_token_share(padded),
            "real_token_share_packed": real_token_share(packed),
        }
        print(f"pretraining corpus: {tokens} tokens ({options.copies} copies of the sample data)")
        print(f"pandallm first run:  {result['pandallm_first_run_tokens_per_s']:,.0f} tokens/s ({first:.2f} s)")
        print(f"pandallm cached run: {cached:.3f} s  ({result['cached_speedup']:.1f}x faster)")
        print(
            f"datasets.map + group_texts: {result['group_texts_tokens_per_s']:,.0f} tokens/s, keeps {baseline_tokens}"
            f" of {tokens} tokens (drops each map batch's remainder)"
        )
        print(
            f"real-token share, instruction batches of 8: padded {result['real_token_share_padded']:.1%}, "
            f"packed {result['real_token_share_packed']:.1%}"
        )
        print("written:", write_result("data_pipeline", result))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
