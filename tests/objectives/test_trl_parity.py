"""DPO, IPO and SimPO train as TRL's trainers do: the same checkpoint, pair tokens, order, batch and optimizer give the
same per-step losses and rewards (`benchmarks.preference_sides` runs both sides).

The tolerance is TRL's own precision, measured: its fused log-probability head gives gradients 2.9e-4 (relative to
each tensor's largest element) away from an fp64 computation of the same loss on the same batch, where pandallm's are
7e-7 away (`test_dpo_gradient_is_the_fp64_gradient` checks pandallm's). Over four AdamW steps at lr 1e-3 that puts the
two trainers' losses up to 1.5e-3 apart (IPO, whose squared loss is the most sensitive) and rewards up to 8e-4.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks.common import alpaca_like_records
from benchmarks.preference_sides import PairSetup, prepare_rows, run_side
from pandallm.model.presets import llama_tiny
from pandallm.tokenizer import load_tokenizer
from tests.conftest import TOKENIZER_DIR

pytestmark = pytest.mark.integration
pytest.importorskip("trl", reason="TRL is the reference implementation (pip install -e '.[test]')")


def setup(tmp_path: Path, loss: str) -> PairSetup:
    tokenizer = load_tokenizer(str(TOKENIZER_DIR))
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**llama_tiny(), vocab_size=len(tokenizer))).save_pretrained(tmp_path / "init")
    tokenizer.save_pretrained(tmp_path / "init")
    records = alpaca_like_records(tokenizer, 48, seed=0)
    (tmp_path / "pairs").mkdir()
    with (tmp_path / "pairs" / "a.jsonl").open("w") as f:
        for a, b in zip(records[::2], records[1::2], strict=True):
            f.write(json.dumps({"prompt": a["input"], "chosen": a["target"], "rejected": b["target"]}) + "\n")
    s = PairSetup(
        init=str(tmp_path / "init"),
        pairs_dir=str(tmp_path / "pairs"),
        cache_dir=str(tmp_path / "cache"),
        rows_file=str(tmp_path / "rows.json"),
        batch=4,
        seq=64,
        steps=4,
        loss=loss,
        beta=2.0 if loss == "simpo" else 0.1,
    )
    prepare_rows(s)
    return s


@pytest.mark.parametrize(("loss", "lora_r"), [("sigmoid", 0), ("ipo", 0), ("simpo", 0), ("sigmoid", 8)])
def test_per_step_losses_and_rewards_equal_trls(tmp_path: Path, loss: str, lora_r: int) -> None:
    # With LoRA, both sides seed the same adapters (`benchmarks.common.seeded_adapters`) and score the reference with
    # them disabled. (At a larger learning rate both sides drift apart, the full model's too: see the README.)
    s = dataclasses.replace(setup(tmp_path, loss), lora_r=lora_r)
    ours, trl = run_side("pandallm", s, in_process=True), run_side("trl", s, in_process=True)
    assert len(ours["losses"]) == len(trl["losses"]) == 4
    torch.testing.assert_close(ours["losses"], trl["losses"], rtol=0, atol=2e-3)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        torch.testing.assert_close(ours["metrics"][name], trl["metrics"][name], rtol=0, atol=1e-3)
    # The curves move: the comparison is not between two runs that did nothing.
    assert abs(ours["losses"][-1] - ours["losses"][0]) > (4e-3 if lora_r else 1e-2)
