"""Exact rows for known inputs: which tokens are trained, and where documents start."""

from __future__ import annotations

import random

import pytest
import torch

from pandallm.data.collate import collate_rows
from pandallm.data.encode import IGNORE_INDEX, conversation_row, document_ids, instruction_row, pack_documents

BOS, EOS, PAD = 1, 2, 0
M = IGNORE_INDEX


def test_instruction_labels_mask_the_prompt_and_train_target_and_eos() -> None:
    row, truncated = instruction_row([10, 11, 12], [20, 21], BOS, EOS, max_seq_length=16)
    assert row.input_ids == [1, 10, 11, 12, 20, 21, 2]
    assert row.labels == [M, M, M, M, 20, 21, 2]
    assert row.position_ids == [0, 1, 2, 3, 4, 5, 6]
    assert not truncated


def test_labels_do_not_depend_on_the_pad_id() -> None:
    # The target contains the pad id (0 = <unk> in LLaMA) and EOS: both stay trained.
    row, _ = instruction_row([10], [0, 2, 21], BOS, EOS, max_seq_length=16)
    assert row.labels == [M, M, 0, 2, 21, 2]


def test_padding_is_masked_and_batches_pad_to_the_longest_row() -> None:
    short, _ = instruction_row([10], [20], BOS, EOS, max_seq_length=64)
    long, _ = instruction_row([10, 11, 12], [20, 21], BOS, EOS, max_seq_length=64)
    batch = collate_rows([short.__dict__, long.__dict__], pad_id=PAD)
    assert batch["input_ids"].tolist() == [[1, 10, 20, 2, 0, 0, 0], [1, 10, 11, 12, 20, 21, 2]]
    assert batch["labels"].tolist() == [[M, M, 20, 2, M, M, M], [M, M, M, M, 20, 21, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0, 0], [1] * 7]
    # Padding continues the last document's positions: it never looks like the start of a new document.
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 3, 4, 5, 6]]


def test_overlong_prompt_is_cut_from_the_left_and_the_target_stays_whole() -> None:
    row, truncated = instruction_row([10, 11, 12, 13, 14, 15], [20, 21], BOS, EOS, max_seq_length=6)
    assert truncated
    assert row.input_ids == [1, 14, 15, 20, 21, 2]
    assert row.labels == [M, M, M, 20, 21, 2]


def test_overlong_target_keeps_half_the_row_for_the_prompt_and_some_labels() -> None:
    row, truncated = instruction_row([10, 11, 12, 13, 14, 15], list(range(20, 30)), BOS, EOS, max_seq_length=7)
    assert truncated
    assert row.input_ids == [1, 13, 14, 15, 20, 21, 22]
    assert row.labels == [M, M, M, M, 20, 21, 22]


def test_no_row_is_ever_fully_masked() -> None:
    rng = random.Random(0)
    for _ in range(500):
        prompt = [rng.randrange(3, 99) for _ in range(rng.randrange(0, 40))]
        target = [rng.randrange(3, 99) for _ in range(rng.randrange(0, 40))]
        length = rng.randrange(3, 50)
        row, _ = instruction_row(prompt, target, rng.choice([BOS, None]), EOS, length)
        assert len(row.input_ids) <= length
        assert any(label != M for label in row.labels)


def test_pretraining_blocks_hold_every_token_once_in_order() -> None:
    rng = random.Random(0)
    documents = [document_ids([rng.randrange(3, 99) for _ in range(rng.randrange(0, 30))], BOS, EOS) for _ in range(40)]
    blocks = list(pack_documents(documents, max_seq_length=16))
    stream = [token for block in blocks for token in block.input_ids]
    assert stream == [token for document in documents for token in document]
    assert all(len(b.input_ids) == 16 for b in blocks[:-1]) and 0 < len(blocks[-1].input_ids) <= 16
    assert all(b.labels == b.input_ids for b in blocks)


def test_pretraining_positions_restart_at_every_document_and_continuation() -> None:
    documents = [[1, 5, 6, 2], [1, 7, 8, 9, 10, 11, 2], [1, 12, 2]]
    blocks = list(pack_documents(documents, max_seq_length=6))
    assert [b.input_ids for b in blocks] == [[1, 5, 6, 2, 1, 7], [8, 9, 10, 11, 2, 1], [12, 2]]
    assert [b.position_ids for b in blocks] == [[0, 1, 2, 3, 0, 1], [0, 1, 2, 3, 4, 0], [0, 1]]


def test_collated_blocks_keep_document_starts() -> None:
    blocks = [b.__dict__ for b in pack_documents([[1, 5, 2], [1, 6, 7, 2]], max_seq_length=5)]
    batch = collate_rows(blocks, pad_id=PAD)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]]
    assert torch.equal(batch["labels"][1], torch.tensor([7, 2, M, M, M]))


def test_row_too_short_for_any_target_is_refused() -> None:
    with pytest.raises(ValueError, match="max_seq_length=2"):
        instruction_row([10], [20], BOS, EOS, max_seq_length=2)


def test_conversation_rows_train_every_reply_and_cut_later_turns_first() -> None:
    segments = [([10, 11], False), ([20, 2], True), ([12], False), ([21, 22, 2], True)]
    row, truncated = conversation_row([BOS], segments, max_seq_length=16)
    assert row.input_ids == [1, 10, 11, 20, 2, 12, 21, 22, 2]
    assert row.labels == [M, M, M, 20, 2, M, 21, 22, 2]
    assert not truncated
    # Too long, but the first exchange fits: the end of the conversation is cut, nothing else changes.
    row, truncated = conversation_row([BOS], segments, max_seq_length=7)
    assert (row.input_ids, row.labels, truncated) == ([1, 10, 11, 20, 2, 12, 21], [M, M, M, 20, 2, M, 21], True)
    # The first exchange alone is too long: its prompt is cut from the left, as for a single record.
    row, _ = conversation_row([BOS], segments, max_seq_length=4)
    assert (row.input_ids, row.labels) == ([1, 11, 20, 2], [M, M, 20, 2])
