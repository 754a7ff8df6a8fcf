"""Fixtures of the objectives' tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pandallm.data.collate import collate_rows
from pandallm.data.datamodule import PandaDataModule
from pandallm.model.loss import causal_lm_loss_sum
from pandallm.model.module import PandaLLM
from tests.conftest import TOKENIZER_DIR, write_jsonl
from tests.objectives.online import WORDS, prompts


@pytest.fixture(scope="session")
def sft_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """llama-tiny taught by SFT to reply with one of WORDS and a full stop, 'water' in 1 reply of 16: the starting
    point a policy needs for a reward to be found by sampling. A plain loop over pandallm's rows (the prompts are
    rendered as GRPO renders them), not a `fit`: the fixture is not what is tested, and a loop is ten times faster."""
    root = tmp_path_factory.mktemp("sft")
    others = [word for word in WORDS if word != "water"]
    endings = ["water" if i % 16 == 5 else others[i % 7] for i in range(64)]
    records = [{"input": p["input"], "target": f"{end}."} for p, end in zip(prompts(64), endings, strict=True)]
    write_jsonl(root / "sft" / "a.jsonl", records)
    data = PandaDataModule(
        str(TOKENIZER_DIR),
        instruction_tuning_data_dir=str(root / "sft"),
        pretraining_data_dir=None,
        cache_dir=str(root / "cache"),
    )
    data.setup("fit")
    torch.manual_seed(0)
    module = PandaLLM("llama-tiny", str(TOKENIZER_DIR))
    module.configure_model()
    optimizer = torch.optim.AdamW(module.parameters(), lr=2e-2)
    rows = list(data.datasets["train"])
    for step in range(30):
        batch = collate_rows([rows[(8 * step + i) % len(rows)] for i in range(8)], data.pad_id)
        loss_sum, count = causal_lm_loss_sum(module(batch["input_ids"], batch["position_ids"]), batch["labels"])
        (loss_sum / count).backward()
        optimizer.step()
        optimizer.zero_grad()
    return module.export_hf(root / "hf")
