"""Streaming pretraining: documents read, tokenized and packed on the fly, for corpora too large to tokenize into the
Arrow cache first (`data.streaming: true`).

Who reads what: the corpus's documents are numbered in file order, and document i belongs to consumer i mod C, where
the C = world_size x num_workers consumers are the data-loader workers of all ranks. Every document of an epoch is
therefore read by exactly one consumer, once. Each consumer packs its own documents into `max_seq_length` blocks as
`pandallm.data.encode.pack_documents` does (positions restart per document, so attention stays inside it) and
batches them in the worker.

The stream is endless: a consumer that finishes its share of the corpus starts the next epoch of it. DDP ranks may
hold different numbers of blocks per epoch, and a finite stream would leave the longer ranks waiting in a collective
for the shorter ones; the run's length is `trainer.max_steps` instead.

Resume: every batch carries its consumer's position after it, `(epoch, document, token offset)`. The data module
takes it off the batch just before the batch is trained (`on_before_batch_transfer`), so a checkpoint holds the
position of every consumer after the last batch the model has seen, not after those the workers fetched ahead. A
resumed consumer skips the documents before its position without tokenizing them, and the workers are rotated so
that the one whose batch came next comes next again (PyTorch's loader takes batches from its workers in turn).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import IterableDataset, get_worker_info

from pandallm.data.collate import collate_rows
from pandallm.data.encode import document_ids, pack_with_positions
from pandallm.data.readers import holds_nothing
from pandallm.data.records import (
    TEXT_SUFFIX,
    Record,
    TxtSplit,
    is_lazy,
    lazy_records,
    lazy_text_records,
    read_records,
    ready,
    suffix,
)
from pandallm.data.tokenize import AS_TEXT, special_ids
from pandallm.errors import DatasetError
from pandallm.special_tokens import SpecialTokens
from pandallm.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

POSITION_KEY = "stream_position"
# (epoch, document index, tokens of that document already packed)
Position = tuple[int, int, int]
START: Position = (0, 0, 0)


@dataclass(frozen=True)
class StreamLayout:
    """How the corpus is split among the consumers, and where each one resumes."""

    rank: int
    world_size: int
    num_workers: int
    positions: dict[int, Position] | None = None
    """Consumer -> its position; consumers missing from it start at the beginning."""
    batches_read: int = 0
    """Batches this rank has trained on: which of its workers' batches comes next."""

    @property
    def workers_per_rank(self) -> int:
        return max(self.num_workers, 1)

    @property
    def num_consumers(self) -> int:
        return self.world_size * self.workers_per_rank

    def consumer(self, worker: int) -> int:
        slot = (worker + self.batches_read) % self.workers_per_rank
        return self.rank * self.workers_per_rank + slot


def with_content(files: Sequence[Path]) -> list[Path]:
    """`files` without the empty ones, found when the stream is built, before training. An empty file holds no
    document: a corpus of nothing but empty files would stream no batch (an error from a worker mid-training, and on
    one rank of several, the others waiting for it), and an empty `.txt` file would fail its worker ("holds no
    text"). All empty is an error naming them; some empty, a warning naming them (they hold nothing to train on)."""
    empty = [path for path in files if holds_nothing(path)]
    if len(empty) == len(files):
        raise DatasetError(f"data.streaming: no document to stream: every file is empty ({_names(empty)})")
    if empty:
        log.warning("pandallm data: data.streaming leaves out %d empty file(s): %s", len(empty), _names(empty))
    left_out = set(empty)
    return [path for path in files if path not in left_out]


def _names(paths: list[Path]) -> str:
    return ", ".join(str(path) for path in paths[:10]) + (", ..." if len(paths) > 10 else "")


class DocumentStream(IterableDataset):
    """Endless batches of packed pretraining blocks, this worker's share of the corpus (see the module docstring)."""

    def __init__(
        self,
        files: Sequence[Path],
        tokenizer: str,
        max_seq_length: int,
        batch_size: int,
        pad_id: int,
        layout: StreamLayout,
        pretraining_format: str = "auto",
        txt_split: TxtSplit = "file",
        epochs: int | None = None,
        special_tokens: SpecialTokens | None = None,
    ) -> None:
        """`epochs`: stop after that many passes (tests and tools); None: endless, as training reads it."""
        if not files:
            raise DatasetError("data.streaming: no pretraining files to stream")
        self.files = with_content(files)
        self.tokenizer_name = tokenizer
        self.max_seq_length = max_seq_length
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.layout = layout
        self.format = pretraining_format
        self.txt_split = txt_split
        self.epochs = epochs
        self.special_tokens = special_tokens

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        consumer = self.layout.consumer(info.id if info is not None else 0)
        position = (self.layout.positions or {}).get(consumer, START)
        rows, after = [], position
        for row, after in self._blocks(consumer, position):
            rows.append(row)
            if len(rows) == self.batch_size:
                yield self._batch(rows, consumer, after)
                rows = []
        if rows:  # only with a finite number of epochs
            yield self._batch(rows, consumer, after)

    def _batch(self, rows: list[dict], consumer: int, after: Position) -> dict[str, torch.Tensor]:
        batch = collate_rows(rows, self.pad_id)
        batch[POSITION_KEY] = torch.tensor([consumer, *after], dtype=torch.long)
        return batch

    def _blocks(self, consumer: int, position: Position) -> Iterator[tuple[dict, Position]]:
        """This consumer's blocks from `position` on, each with the position right after it."""
        tokenizer = load_tokenizer(self.tokenizer_name, self.special_tokens)
        bos_id, eos_id = special_ids(tokenizer)
        stride = self.layout.num_consumers
        epoch, first, offset = position
        while self.epochs is None or epoch < self.epochs:
            # This consumer's k-th document from `first` on is document `base + k * stride` of the corpus.
            base = first + (consumer - first) % stride
            documents = (
                document_ids(tokenizer(text, **AS_TEXT)["input_ids"], bos_id, eos_id)
                for text in self._documents(consumer, first)
            )
            blocks = pack_with_positions(documents, self.max_seq_length, skip=offset if base == first else 0)
            read_any = False
            for row, (k, start) in blocks:
                read_any = True
                full = len(row.input_ids) == self.max_seq_length
                after = (epoch, base + k * stride, start) if full else (epoch + 1, 0, 0)
                yield {"input_ids": row.input_ids, "labels": row.labels, "position_ids": row.position_ids}, after
            if not read_any and first == 0:
                raise DatasetError(
                    f"data.streaming: consumer {consumer} of {stride} got no document; the corpus has fewer "
                    "documents than ranks x data.num_workers"
                )
            epoch, first, offset = epoch + 1, 0, 0

    def _documents(self, consumer: int, first: int) -> Iterator[str]:
        """The texts of this consumer's documents from index `first` on, in corpus order. Every worker numbers every
        document, but only its own are parsed (JSON Lines files, compressed or not, are read a line at a time and a
        line is parsed only by the worker that owns it; `.parquet` files a row group at a time; `.txt` paragraphs a
        line at a time; `.json` arrays and saved datasets are read whole, one file at a time) and tokenized."""
        stride = self.layout.num_consumers
        index = 0
        for path in self.files:
            for load in self._records(path):
                if index >= first and index % stride == consumer:
                    yield load().text
                index += 1

    def _records(self, path: Path) -> Iterator[Callable[[], Record]]:
        if is_lazy(path):
            return lazy_records(path, "pretraining", self.format)
        if suffix(path) == TEXT_SUFFIX:
            return lazy_text_records(path, self.txt_split)
        _, records = read_records(path, "pretraining", None, self.format, self.txt_split)
        return (ready(record) for record in records)
