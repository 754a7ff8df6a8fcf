"""Turning records into training rows: pure functions of token ids, so the label rules can be tested exactly.

Instruction rows: `[BOS] prompt target [EOS]`; labels are -100 over `[BOS] prompt` and equal to the ids over
`target [EOS]`. Conversations generalize this: a row is a sequence of segments, each trained (an assistant reply
and its end token) or masked (everything else). Labels come from these explicit spans, never from the pad id: a
pad id equal to `<unk>` or EOS must not remove real tokens from the loss.

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
    """`[BOS] prompt target [EOS]`, with target and EOS trained; returns `(row, truncated)`.

    Over-long records are cut as `conversation_row` cuts a single exchange.
    """
    head = [] if bos_id is None else [bos_id]
    return conversation_row(head, [(prompt_ids, False), ([*target_ids, eos_id], True)], max_seq_length)


def conversation_row(head: list[int], segments: list[tuple[list[int], bool]], max_seq_length: int) -> tuple[Row, bool]:
    """`head` (masked: BOS, if any) then each segment, trained or masked; returns `(row, truncated)`.

    Over-long conversations keep their first exchange (the turns up to and including the first trained segment):
    - if it fits, the row is cut on the right, so that later turns are lost but every kept token is as it was;
    - if not, its prompt is cut from the left (the head kept), so that the reply and its end token stay whole and the
      model still learns where to stop. If the reply alone does not fit, the prompt keeps at most half of the row
      and the reply is cut on the right.
    Either way at least one trained token stays, so no row ever has every label masked.
    """
    room = max_seq_length - len(head)
    if room < 2:
        raise ValueError(f"max_seq_length={max_seq_length} leaves no room for a prompt and a target")
    truncated = sum(len(ids) for ids, _ in segments) > room
    if truncated:
        first = next((i for i, (ids, trained) in enumerate(segments) if trained and ids), None)
        prompt = [t for ids, _ in segments[: first or 0] for t in ids]
        reply = segments[first][0] if first is not None else []
        if first is not None and len(prompt) + len(reply) > room:
            keep_prompt = room - len(reply) if len(reply) < room else min(len(prompt), room // 2)
            prompt = prompt[len(prompt) - keep_prompt :]
            segments = [(prompt, False), (reply[: room - len(prompt)], True)]
        else:
            segments = _cut_right(segments, room)
    input_ids = list(head)
    labels = [IGNORE_INDEX] * len(head)
    for ids, trained in segments:
        input_ids += ids
        labels += ids if trained else [IGNORE_INDEX] * len(ids)
    return Row(input_ids, labels, list(range(len(input_ids)))), truncated


def _cut_right(segments: list[tuple[list[int], bool]], room: int) -> list[tuple[list[int], bool]]:
    kept = []
    for ids, trained in segments:
        if room <= 0:
            break
        kept.append((ids[:room], trained))
        room -= len(ids)
    return kept


def document_ids(text_ids: list[int], bos_id: int | None, eos_id: int) -> list[int]:
    """`[BOS] text [EOS]`: the unit that pretraining packs."""
    return ([] if bos_id is None else [bos_id]) + text_ids + [eos_id]


def pack_documents(documents: Iterable[list[int]], max_seq_length: int) -> Iterator[Row]:
    """Concatenate documents and cut them into blocks of `max_seq_length` tokens, in order.

    Every token of every document lands in exactly one block. A document longer than the space left in a block
    continues in the next one, where its positions restart at 0 (it cannot attend across blocks anyway).
    """
    return (row for row, _ in pack_with_positions(documents, max_seq_length))


def pack_with_positions(
    documents: Iterable[list[int]], max_seq_length: int, skip: int = 0
) -> Iterator[tuple[Row, tuple[int, int]]]:
    """`pack_documents`, each block with where the next one starts: `(k, t)`, token t of the k-th document. The
    first `skip` tokens of the first document are left out (a resumed stream, `pandallm.data.streaming`)."""
    if max_seq_length < 1:
        raise ValueError(f"max_seq_length must be positive, got {max_seq_length}")
    ids: list[int] = []
    positions: list[int] = []
    k = -1
    for k, document in enumerate(documents):
        start = skip if k == 0 else 0
        while start < len(document):
            take = min(max_seq_length - len(ids), len(document) - start)
            ids.extend(document[start : start + take])
            positions.extend(range(take))
            start += take
            if len(ids) == max_seq_length:
                yield Row(ids, list(ids), positions), (k, start)
                ids, positions = [], []
    if ids:
        yield Row(ids, list(ids), positions), (k + 1, 0)
