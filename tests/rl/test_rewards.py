"""Rewards: the ready-made functions, the checks on what a function returns, and a reward model's scores."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from pandallm.errors import ConfigError, RewardError
from pandallm.model.presets import llama_tiny
from pandallm.rewards import answer_match, ends_with, final_answer, format_match, length
from pandallm.rl.rewards import Rewards, checked_values, record_fields


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("3 + 4 = 7\n#### 7", "7"),
        ("Natalia sold 48/2 = 24 clips in May.\n#### 1,072", "1072"),
        ("so the answer is 12.50 dollars", "12.5"),
        ("#### -3", "-3"),
        ("no number here", None),
        (None, None),
    ],
)
def test_final_answer_reads_gsm8k_markers_and_last_numbers(text: str | None, answer: str | None) -> None:
    assert final_answer(text) == answer


def test_ready_made_rewards() -> None:
    completions = ["3 + 4 = 7\n#### 7", "The answer is 8.", "7 indeed", ""]
    assert answer_match(completions, reference=["#### 7", "#### 7", "#### 7", None]) == [1.0, 0.0, 1.0, 0.0]
    assert format_match(completions, pattern=r"#### -?\d+\s*$") == [1.0, 0.0, 0.0, 0.0]
    assert ends_with(completions, word="Indeed") == [0.0, 0.0, 1.0, 0.0]
    assert length(["a" * 10, "a" * 5, "", "a" * 30], chars=10) == [1.0, 0.5, 0.0, 0.0]


def test_function_results_are_checked() -> None:
    where = ["a.jsonl:1", "a.jsonl:2"]
    assert checked_values(torch.tensor([1, 2]), "f", 2, where) == [1.0, 2.0]
    with pytest.raises(RewardError, match="'f' returned 1 values for 2 completions"):
        checked_values([1.0], "f", 2, where)
    with pytest.raises(RewardError, match=r"'f' returned nan for the completion of the prompt at a\.jsonl:2"):
        checked_values([1.0, float("nan")], "f", 2, where)
    with pytest.raises(RewardError, match="'f' returned NoneType"):
        checked_values(None, "f", 2, where)


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        ([], "is empty"),
        ([{"function": "pandallm.rewards:length", "model": "x"}], r"rewards\[0\]: expected"),
        ([{"function": "pandallm.rewards:length", "weight": "high"}], r"rewards\[0\]\.weight must be a finite number"),
        ([{"function": "length"}], "is not an import path"),
        ([{"function": "pandallm.rewards"}], "module .pandallm. has no function .rewards."),
        ([{"function": "pandallm.rewards:length"}, {"function": "pandallm.rewards:length"}], "a second reward"),
    ],
)
def test_bad_reward_entries_are_refused_naming_the_entry(entries: list, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        Rewards(entries)


def test_record_fields_repeat_for_each_completion_of_their_prompt() -> None:
    fields = record_fields([{"input": "a", "n": 1}, {"input": "b"}], ["r1", None], 2)
    assert fields == {"input": ["a", "a", "b", "b"], "n": [1, 1, None, None], "reference": ["r1", "r1", None, None]}


def test_a_reward_model_scores_the_rows_as_transformers_reads_them(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(**llama_tiny(), vocab_size=100, num_labels=1, pad_token_id=0)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    rewards = Rewards([{"model": str(tmp_path / "rm"), "weight": 0.5}])
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    scores = rewards.score(["p", "q"], ["c", "d"], {}, ["x:1", "x:2"], {"input_ids": ids, "attention_mask": mask}, 100)
    model = LlamaForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    with torch.no_grad():
        expected = [
            model(input_ids=row[None, : int(m.sum())]).logits[0, 0].item() for row, m in zip(ids, mask, strict=True)
        ]
    assert torch.allclose(scores[:, 0], torch.tensor(expected, dtype=torch.float64), atol=1e-5)
    assert rewards.weights().tolist() == [0.5] and rewards.names == ["reward_model"]
