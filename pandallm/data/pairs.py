"""Preference pairs (and KTO's judged completions) as training rows: each side is the row instruction tuning would
build from `prompt + side`, with only the side's own replies trained, so a pair trains exactly the tokens the model
produces after the prompt.

A pair row holds `chosen_input_ids` / `chosen_labels` and `rejected_input_ids` / `rejected_labels`; a batch of B
pairs is one batch of 2B sequences, the B chosen then the B rejected (`collate_pairs`), scored in one forward.

A judged completion (KTO) has the same two sequences: its own (`chosen_*`: the prompt and its completion) and a
mismatched one (`rejected_*`: the same prompt with the completion of the record before it in its tokenization batch),
whose log-ratio estimates the policy's KL divergence from the reference (Ethayarajh et al. 2024; TRL pairs them
within each batch too); and `desirable`, the record's label.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from datasets import Dataset, Features, Value
from datasets import Sequence as Column
from transformers import PreTrainedTokenizerBase

from pandallm.data.collate import collate_rows
from pandallm.data.encode import IGNORE_INDEX, Row
from pandallm.data.records import Record
from pandallm.data.template import ChatTemplate, Rendered, TemplateError, render, template_for
from pandallm.data.tokenize import _procs, encode_segments
from pandallm.errors import DataFormatError

log = logging.getLogger(__name__)

SIDES = ("chosen", "rejected")
PAIR_FEATURES = Features(
    {f"{side}_{column}": Column(Value("int32")) for side in SIDES for column in ("input_ids", "labels")}
)


def render_pair(record: Record, chosen: ChatTemplate | None, tokenizer: PreTrainedTokenizerBase) -> list[Rendered]:
    """`prompt + chosen` and `prompt + rejected` (a judged completion: `prompt + completion` alone), rendered by the
    record's template (`template_for`, as training rows and predict prompts), each with only its continuation's replies
    trained: an assistant turn of a multi-turn prompt is context, as a user turn is."""
    template = template_for(chosen, record.format, tokenizer)
    rendered = []
    for side in (record.chosen, record.rejected) if record.rejected else (record.chosen,):
        try:
            segments = render(template, (*record.turns, *side), tokenizer)
        except TemplateError as e:
            raise DataFormatError(record.path, record.line, None, str(e)) from e
        # The continuation's replies are the last trained segments (a reply's text is never empty: it is checked).
        own = sum(1 for turn in side if turn.role == "assistant" and turn.content.strip())
        trained_at = [i for i, (_, trained) in enumerate(segments) if trained]
        context = set(trained_at[: len(trained_at) - own])
        rendered.append(
            Rendered(
                [text for text, _ in segments],
                [trained and i not in context for i, (_, trained) in enumerate(segments)],
                template.source is not None,
            )
        )
    return rendered


def pair_rows(
    head: list[int], sides: list[list[tuple[list[int], bool]]], max_seq_length: int
) -> tuple[list[Row], bool]:
    """The rows of a pair's two sides (`head`, then each side's segments), and whether they were cut to fit.

    Both sides keep the same context: where the longer side does not fit, the prompt (everything before a side's
    first trained segment) is cut from the left by the same number of tokens on both sides, so that the longer
    continuation stays whole; where even that continuation does not fit, the prompt keeps at most half of the row
    and each continuation is cut on the right. (Instruction rows cut each row alone: `conversation_row`.)
    """
    room = max_seq_length - len(head)
    if room < 2:
        raise ValueError(f"max_seq_length={max_seq_length} leaves no room for a prompt and a completion")
    split = []
    for segments in sides:
        first = next((i for i, (ids, trained) in enumerate(segments) if trained and ids), len(segments))
        split.append(([t for ids, _ in segments[:first] for t in ids], segments[first:]))
    longest = max(sum(len(ids) for ids, _ in rest) for _, rest in split)
    prompt_length = max(len(prompt) for prompt, _ in split)
    truncated = prompt_length + longest > room
    keep_prompt = prompt_length
    if truncated:
        keep_prompt = room - longest if longest < room else min(prompt_length, room // 2)
    rows = []
    for prompt, rest in split:
        prompt = prompt[max(len(prompt) - keep_prompt, 0) :]
        input_ids, labels = [*head, *prompt], [IGNORE_INDEX] * (len(head) + len(prompt))
        for ids, trained in rest:
            ids = ids[: max_seq_length - len(input_ids)]
            input_ids += ids
            labels += ids if trained else [IGNORE_INDEX] * len(ids)
        rows.append(Row(input_ids, labels, list(range(len(input_ids)))))
    return rows, truncated


def _encode_pairs(batch: dict, tokenizer: PreTrainedTokenizerBase, max_seq_length: int) -> dict:
    out: dict[str, list] = {name: [] for name in [*PAIR_FEATURES, "truncated", "trains", "same"]}
    fields = ("texts", "trained", "templated")
    sides = {side: [Rendered(*r) for r in zip(*(batch[f"{side}_{k}"] for k in fields), strict=True)] for side in SIDES}
    encoded = {side: encode_segments(rendered, tokenizer) for side, rendered in sides.items()}
    for chosen, rejected in zip(encoded["chosen"], encoded["rejected"], strict=True):
        # The heads (a BOS) are the same: the same prompt, rendered by the same template.
        rows, truncated = pair_rows(chosen[0], [chosen[1], rejected[1]], max_seq_length)
        for side, row in zip(SIDES, rows, strict=True):
            out[f"{side}_input_ids"].append(row.input_ids)
            out[f"{side}_labels"].append(row.labels)
        out["truncated"].append(truncated)
        out["trains"].append(all(any(label != IGNORE_INDEX for label in row.labels) for row in rows))
        out["same"].append(rows[0].input_ids == rows[1].input_ids)
    return out


UNPAIRED_FEATURES = Features({**PAIR_FEATURES, "desirable": Value("bool")})
FLAGS = ("truncated", "trains", "same")


def _split(segments: list[tuple[list[int], bool]]) -> tuple[list, list]:
    """A side's segments as (prompt, completion): the completion starts at the first trained segment."""
    first = next((i for i, (ids, trained) in enumerate(segments) if trained and ids), len(segments))
    return segments[:first], segments[first:]


def _encode_unpaired(batch: dict, tokenizer: PreTrainedTokenizerBase, max_seq_length: int) -> dict:
    out: dict[str, list] = {name: [] for name in [*UNPAIRED_FEATURES, *FLAGS]}
    fields = ("texts", "trained", "templated")
    rendered = [Rendered(*r) for r in zip(*(batch[f"chosen_{k}"] for k in fields), strict=True)]
    encoded = encode_segments(rendered, tokenizer)
    parts = [_split(segments) for _, segments, _ in encoded]
    for i, (head, _, _) in enumerate(encoded):
        prompt, completion = parts[i]
        mismatched = parts[i - 1][1]  # the completion of the record before (the last record's, for the first)
        rows, truncated = pair_rows(head, [[*prompt, *completion], [*prompt, *mismatched]], max_seq_length)
        for side, row in zip(SIDES, rows, strict=True):
            out[f"{side}_input_ids"].append(row.input_ids)
            out[f"{side}_labels"].append(row.labels)
        out["desirable"].append(batch["desirable"][i])
        out["truncated"].append(truncated)
        out["trains"].append(all(any(label != IGNORE_INDEX for label in row.labels) for row in rows))
        out["same"].append(False)
    return out


def tokenize_pairs(
    rendered: list[list[Rendered]],
    tokenizer: PreTrainedTokenizerBase,
    max_seq_length: int,
    num_proc: int,
    drop_overlong: bool,
    name: str,
    desirable: list[bool] | None = None,
) -> tuple[Dataset, int]:
    """Pair rows, and how many pairs did not fit `max_seq_length` (cut as `pair_rows` says; with `drop_overlong`
    left out instead). Pairs whose two sides are the same tokens (nothing to prefer) or that have no trained token are
    left out, counted and named in a warning.

    With `desirable` (KTO), `rendered` holds one side per record, and the rows are `_encode_unpaired`'s."""
    sides = SIDES[:1] if desirable is not None else SIDES
    columns = {
        f"{side}_{key}": [getattr(pair[i], key) for pair in rendered]
        for i, side in enumerate(sides)
        for key in ("texts", "trained", "templated")
    }
    features = PAIR_FEATURES
    if desirable is not None:
        columns["desirable"], features = desirable, UNPAIRED_FEATURES
    rows = Dataset.from_dict(columns).map(
        _encode_unpaired if desirable is not None else _encode_pairs,
        batched=True,
        num_proc=_procs(num_proc, len(rendered)),
        remove_columns=list(columns),
        fn_kwargs={"tokenizer": tokenizer, "max_seq_length": max_seq_length},
        features=Features({**features, **{flag: Value("bool") for flag in FLAGS}}),
        desc="Tokenizing preference records",
    )
    num_overlong = sum(rows["truncated"])
    if drop_overlong and num_overlong:
        rows = rows.filter(lambda truncated: not truncated, input_columns="truncated")
    num_same = sum(rows["same"])
    if num_same:
        log.warning("%s: %d preference pairs have the same chosen and rejected tokens; left out", name, num_same)
    num_untrained = rows.num_rows - sum(rows["trains"])
    if num_untrained:
        log.warning("%s: %d preference records have a side with no trained token; left out", name, num_untrained)
    if num_same or num_untrained:
        rows = rows.filter(lambda same, trains: trains and not same, input_columns=["same", "trains"])
    return rows.remove_columns(list(FLAGS)), num_overlong


def collate_pairs(rows: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """B pairs as one batch of 2B sequences, right-padded: the B chosen, then the B rejected; `index` is each pair's
    row in its dataset (where precomputed reference log-probabilities are looked up)."""
    sequences = [
        {"input_ids": row[f"{side}_input_ids"], "labels": row[f"{side}_labels"]} for side in SIDES for row in rows
    ]
    for sequence in sequences:
        sequence["position_ids"] = list(range(len(sequence["input_ids"])))
    batch = collate_rows(sequences, pad_id)
    if "index" in rows[0]:
        batch["index"] = torch.as_tensor([row["index"] for row in rows])
    if "desirable" in rows[0]:
        batch["desirable"] = torch.as_tensor([row["desirable"] for row in rows])
    return batch


def pair_tokens(rows: Dataset) -> int:
    return sum(len(ids) for side in SIDES for ids in rows[f"{side}_input_ids"])
