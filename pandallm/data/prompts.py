"""Prompt rows for online RL objectives (GRPO): each record's prompt, tokenized exactly as a training row of its
record begins, with what reward functions are given beside the completions.

Any instruction format pandallm reads works (its reply, when present, is kept as the `reference` answer, e.g. a
GSM8K `#### 42`), as does `{"prompt": ...}` (a string or a list of messages). Every field of the record also
reaches the reward functions, as a keyword argument of that name (`pandallm.rl.rewards`).

A prompt longer than `data.max_seq_length` is never cut (a question without its beginning is another question):
with `data.overlong_records: drop` it is left out and counted, otherwise the data is refused, naming the record.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from datasets import Dataset, Features, Value
from datasets import Sequence as ArrowSequence
from transformers import PreTrainedTokenizerBase

from pandallm.data.collate import collate_prompts
from pandallm.data.formats import detect_prompt, parse_prompt
from pandallm.data.records import PromptRecord, iter_values, suffix
from pandallm.data.template import ChatTemplate
from pandallm.data.tokenize import prompt_rows
from pandallm.errors import DataFormatError, DatasetError

PROMPT_FEATURES = Features(
    {
        "input_ids": ArrowSequence(Value("int32")),
        "prompt": Value("string"),  # the prompt's turns as text, what reward functions get as `prompts`
        "reference": Value("string"),  # the record's own reply, if any (null)
        "record": Value("string"),  # the record's fields, as JSON
        "where": Value("string"),  # file:line, for messages about the record
    }
)


def read_rl_prompts(path: Path, skipped: list[DataFormatError] | None) -> list[tuple[PromptRecord, dict]]:
    """The prompt records of one source and each record's own fields; malformed ones raise, or with `skipped` are
    left out and listed there."""
    if suffix(path) == ".txt":
        raise DatasetError(
            f"{path}: plain text; prompts for RL are instruction or {{'prompt': ...}} records (.json, .jsonl, saved "
            "datasets): set data.pretraining_data_dir: null"
        )
    fmt, found = None, []
    for line, value in iter_values(path, skipped):
        try:
            if fmt is None:
                fmt = detect_prompt(value, path, line)
            turns, reference = parse_prompt(fmt, value, path, line)
        except DataFormatError as error:
            if skipped is None:
                raise
            skipped.append(error)
            continue
        found.append((PromptRecord(str(path), line, fmt.name, turns, reference), value))
    if not found and not skipped:
        raise DatasetError(f"{path}: holds no records")
    return found


def prompt_text(record: PromptRecord) -> str:
    """What reward functions get as the prompt: its turns' text (a single-turn prompt's user message as written)."""
    return "\n\n".join(turn.content for turn in record.turns)


def tokenize_rl_prompts(
    records: list[tuple[PromptRecord, dict]],
    template: ChatTemplate | None,
    tokenizer: PreTrainedTokenizerBase,
    max_seq_length: int,
    drop_overlong: bool,
) -> tuple[Dataset, int]:
    """Prompt rows and how many prompts were longer than `max_seq_length` (left out with `drop_overlong`; otherwise
    the first one raises, naming its file and line)."""
    prompts = [prompt for prompt, _ in records]
    # Tokenized as `pandallm predict` tokenizes prompts (as a training row begins); no limit here, checked below.
    rows = prompt_rows(prompts, template, tokenizer, max_seq_length=1 << 30)
    kept, overlong = [], []
    for row, (prompt, value) in zip(rows, records, strict=True):
        if len(row["input_ids"]) > max_seq_length:
            overlong.append((prompt, len(row["input_ids"])))
            continue
        kept.append(
            {
                "input_ids": row["input_ids"],
                "prompt": prompt_text(prompt),
                "reference": prompt.reference,
                # default=str: a saved dataset's row may hold values JSON has no type for (timestamps)
                "record": json.dumps(value, ensure_ascii=False, default=str),
                "where": f"{prompt.path}:{prompt.line}",
            }
        )
    if overlong and not drop_overlong:
        prompt, length = overlong[0]
        raise DataFormatError(
            prompt.path,
            prompt.line,
            None,
            f"the prompt is {length} tokens, longer than data.max_seq_length={max_seq_length} ({len(overlong)} of "
            f"{len(records)} prompts are); RL prompts are never cut: raise data.max_seq_length, or set "
            "data.overlong_records: drop to leave them out",
        )
    columns = {name: [row[name] for row in kept] for name in PROMPT_FEATURES}
    return Dataset.from_dict(columns, features=PROMPT_FEATURES), len(overlong)


def collate_rl_prompts(rows: Sequence[dict], pad_id: int) -> dict:
    """Left-padded prompts for generation (as predict's), with their rows, references and records' fields."""
    return {
        **collate_prompts(rows, pad_id),
        "index": torch.as_tensor([row["index"] for row in rows]),
        "record": [json.loads(row["record"]) for row in rows],
        "where": [row["where"] for row in rows],
    }
