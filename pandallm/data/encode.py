"""Turning records into training rows: pure functions of token ids, so the label rules can be tested exactly.

Instruction rows: `[BOS] prompt target [EOS]`; labels are -100 over `[BOS] prompt` and equal to the ids over
`target [EOS]`. Labels come from these explicit spans, never from the pad id: a pad id equal to `<unk>` or EOS
must not remove real tokens from the loss.

Pretraining rows: every document is `[BOS] text [EOS]`; documents are concatenated and cut into blocks of
`max_seq_length`. `position_ids` restart at 0 where a document (or a document's continuation) starts, which is
what makes attention stop at document boundaries (see `pandallm.model.module`). Only the very last block may be
shorter; no token is dropped.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Row:
    """One training row; all three lists have the same length."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]


def instruction_row(
    prompt_ids: list[int], target_ids: list[int], bos_id: int | None, eos_id: int, max_seq_length: int
) -> tuple[Row, bool]:
    """Build one instruction row; returns `(row, truncated)`.

    Over-long records: the prompt is cut from the left (BOS kept), so that the target and its EOS stay whole
    and the model still learns where to stop. If the target alone does not fit, the prompt keeps at most half of
    the row and the target is cut on the right. Either way at least one target token stays trained, so no row
    ever has every label masked.
    """
    head = [] if bos_id is None else [bos_id]
    target = [*target_ids, eos_id]
    room = max_seq_length - len(head)
    if room < 2:
        raise ValueError(f"max_seq_length={max_seq_length} leaves no room for a prompt and a target")
    truncated = len(prompt_ids) + len(target) > room
    if truncated:
        keep_prompt = max(room - len(target), 0) if len(target) < room else min(len(prompt_ids), room // 2)
        prompt_ids = prompt_ids[len(prompt_ids) - keep_prompt :]
        target = target[: room - len(prompt_ids)]
    prompt = head + prompt_ids
    input_ids = prompt + target
    labels = [IGNORE_INDEX] * len(prompt) + target
    return Row(input_ids, labels, list(range(len(input_ids)))), truncated


def document_ids(text_ids: list[int], bos_id: int | None, eos_id: int) -> list[int]:
    """`[BOS] text [EOS]`: the unit that pretraining packs."""
    return ([] if bos_id is None else [bos_id]) + text_ids + [eos_id]


def pack_documents(documents: Iterable[list[int]], max_seq_length: int) -> Iterator[Row]:
    """Concatenate documents and cut them into blocks of `max_seq_length` tokens, in order.

    Every token of every document lands in exactly one block. A document longer than the space left in a block
    continues in the next one, where its positions restart at 0 (it cannot attend across blocks anyway).
    """
    if max_seq_length < 1:
        raise ValueError(f"max_seq_length must be positive, got {max_seq_length}")
    ids: list[int] = []
    positions: list[int] = []
    for document in documents:
        start = 0
        while start < len(document):
            take = min(max_seq_length - len(ids), len(document) - start)
            ids.extend(document[start : start + take])
            positions.extend(range(take))
            start += take
            if len(ids) == max_seq_length:
                yield Row(ids, list(ids), positions)
                ids, positions = [], []
    if ids:
        yield Row(ids, list(ids), positions)
