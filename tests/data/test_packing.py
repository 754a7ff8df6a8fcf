"""Packed instruction rows: every row once, whole, independent of its neighbours, labels still masked."""

from __future__ import annotations

import random
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pandallm.data import PandaDataModule
from pandallm.data.encode import IGNORE_INDEX
from pandallm.data.packing import plan_packs
from pandallm.model.presets import llama_tiny
from tests.conftest import REPO


def test_plan_packs_places_every_row_once_within_capacity() -> None:
    rng = random.Random(0)
    # Alpaca-like: most rows short, a long tail.
    lengths = [min(int(rng.lognormvariate(4.6, 0.7)), 504) + 8 for _ in range(2000)]
    plan = plan_packs(lengths, 512)
    assert sorted(i for members in plan for i in members) == list(range(2000))
    assert all(sum(lengths[i] for i in members) <= 512 for members in plan)
    assert sum(lengths) / (512 * len(plan)) > 0.95  # padding share below 5%


def packed_and_plain(tmp_path: Path) -> tuple[PandaDataModule, PandaDataModule]:
    settings = {
        "tokenizer": str(REPO / "dataset" / "tokenizer"),
        "instruction_tuning_data_dir": str(REPO / "dataset" / "instruction_tuning"),
        "pretraining_data_dir": None,
        "max_seq_length": 256,
        "num_workers": 0,
        "cache_dir": str(tmp_path / "cache"),
    }
    modules = PandaDataModule(**settings, packing=True), PandaDataModule(**settings)
    for dm in modules:
        dm.prepare_data()
        dm.setup("fit")
    return modules


def segments(position_ids: list[int]) -> list[tuple[int, int]]:
    starts = [i for i, p in enumerate(position_ids) if p == 0] + [len(position_ids)]
    return list(zip(starts[:-1], starts[1:], strict=True))


def test_packed_rows_keep_every_sample_whole_with_its_labels(tmp_path: Path) -> None:
    packed, plain = packed_and_plain(tmp_path)
    originals = {tuple(r["input_ids"]): r["labels"] for r in plain.datasets["train"]}
    found = []
    for block in packed.datasets["train"]:
        assert len(block["input_ids"]) <= 256
        for start, end in segments(block["position_ids"]):
            ids = tuple(block["input_ids"][start:end])
            # the sample's own labels; only the first (never a target on its own) is masked
            assert block["labels"][start:end] == [IGNORE_INDEX, *originals[ids][1:]]
            found.append(ids)
    assert sorted(found) == sorted(originals)  # 222 records, each exactly once
    fill = sum(len(b) for b in packed.datasets["train"]["input_ids"]) / (256 * len(packed.datasets["train"]))
    assert fill > 0.95


def test_a_sample_inside_a_pack_has_its_logits_alone(tmp_path: Path) -> None:
    packed, _ = packed_and_plain(tmp_path)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**llama_tiny(), vocab_size=len(packed.tokenizer))).eval()
    block = next(b for b in packed.datasets["train"] if len(segments(b["position_ids"])) >= 3)
    with torch.no_grad():
        logits = model(
            input_ids=torch.tensor([block["input_ids"]]),
            position_ids=torch.tensor([block["position_ids"]]),
            use_cache=False,
        ).logits[0]
        for start, end in segments(block["position_ids"]):
            alone = model(input_ids=torch.tensor([block["input_ids"][start:end]])).logits[0]
            torch.testing.assert_close(logits[start:end], alone, atol=1e-5, rtol=1e-5)
