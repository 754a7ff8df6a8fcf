"""Shared fixtures: the shipped demo tokenizer, tiny record files, tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
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
