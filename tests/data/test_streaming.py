"""Streaming pretraining data: every document read by exactly one consumer per epoch, and exact resume."""

from __future__ import annotations

import gzip
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from torch.utils.data import DataLoader
from transformers import AutoTokenizer

from pandallm.data import PandaDataModule
from pandallm.data.streaming import POSITION_KEY, DocumentStream, StreamLayout
from pandallm.errors import DataFormatError, DatasetError
from tests.conftest import TOKENIZER_DIR, write_jsonl

NUM_DOCUMENTS = 23


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """23 documents over two files (one `.jsonl`, one `.txt` per paragraph), each naming its own number."""
    words = ["river", "tea", "mountain", "city"]
    documents = [f"document {i}: " + " ".join(words[: 1 + i % 4] * (1 + i % 5)) for i in range(NUM_DOCUMENTS)]
    write_jsonl(tmp_path / "corpus" / "a.jsonl", [{"title": "", "content": d} for d in documents[:15]])
    (tmp_path / "corpus" / "b.txt").write_text("\n\n".join(documents[15:]), encoding="utf-8")
    return tmp_path / "corpus"


def stream(corpus: Path, rank: int, world_size: int, num_workers: int, **layout) -> DocumentStream:
    files = sorted(corpus.iterdir())
    layout = StreamLayout(rank, world_size, num_workers, **layout)
    return DocumentStream(files, str(TOKENIZER_DIR), 16, 3, 0, layout, txt_split="paragraph", epochs=1)


def documents_read(batches) -> list[list[int]]:
    """Each consumer's token stream, cut at BOS into the documents it holds."""
    by_consumer: dict[int, list[int]] = {}
    for batch in batches:
        consumer = int(batch[POSITION_KEY][0])
        for ids, mask in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist(), strict=True):
            by_consumer.setdefault(consumer, []).extend(i for i, m in zip(ids, mask, strict=True) if m)
    bos = AutoTokenizer.from_pretrained(TOKENIZER_DIR).bos_token_id
    documents = []
    for tokens in by_consumer.values():
        starts = [i for i, t in enumerate(tokens) if t == bos] + [len(tokens)]
        documents += [tokens[a:b] for a, b in zip(starts, starts[1:], strict=False)]
    return documents


def test_two_ranks_with_two_workers_each_read_every_document_exactly_once(corpus: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    texts = [f"document {i}:" for i in range(NUM_DOCUMENTS)]
    batches = [
        batch
        for rank in range(2)
        for batch in DataLoader(stream(corpus, rank, 2, num_workers=2), batch_size=None, num_workers=2)
    ]
    assert {int(b[POSITION_KEY][0]) for b in batches} == {0, 1, 2, 3}  # four consumers, all of them busy
    read = [tokenizer.decode(d, skip_special_tokens=True) for d in documents_read(batches)]
    assert len(read) == NUM_DOCUMENTS
    assert sorted(text.split(":")[0] + ":" for text in read) == sorted(texts)


def test_a_resumed_stream_continues_with_the_batches_the_uninterrupted_one_would_give(
    corpus: Path, tmp_path: Path
) -> None:
    def datamodule() -> PandaDataModule:
        return PandaDataModule(
            tokenizer=str(TOKENIZER_DIR),
            instruction_tuning_data_dir=None,
            pretraining_data_dir=str(corpus),
            txt_split="paragraph",
            streaming=True,
            max_seq_length=16,
            per_device_train_batch_size=2,
            num_workers=2,
            cache_dir=str(tmp_path / "cache"),
        )

    def take(dm: PandaDataModule, loader: DataLoader, n: int) -> list[list[list[int]]]:
        iterator = iter(loader)
        # As the trainer does: each batch goes through the hook just before it is trained.
        return [dm.on_before_batch_transfer(next(iterator), 0)["input_ids"].tolist() for _ in range(n)]

    straight = datamodule()
    straight.setup("fit")
    expected = take(straight, straight.train_dataloader(), 25)  # past the end of the first epoch
    first = datamodule()
    first.setup("fit")
    head = take(first, first.train_dataloader(), 7)  # 7: the other worker's batch comes next
    state = first._stream_state()
    resumed = datamodule()
    resumed.setup("fit")
    resumed.load_state_dict(state)
    assert head + take(resumed, resumed.train_dataloader(), 18) == expected
    with pytest.raises(DatasetError, match="streamed with 1 ranks x 2 data.num_workers"):
        other = datamodule()
        other.num_workers = 1
        other.load_state_dict(state)


def test_streaming_takes_pretraining_data_alone(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="streams pretraining_data_dir alone"):
        PandaDataModule(tokenizer=str(TOKENIZER_DIR), instruction_tuning_data_dir="x", streaming=True)


def test_a_malformed_line_is_reported_with_its_file_and_line_by_the_worker_that_owns_it(tmp_path: Path) -> None:
    lines = [{"title": "", "content": f"document {i}"} for i in range(5)]
    path = write_jsonl(tmp_path / "corpus" / "a.jsonl", lines)
    path.write_text(path.read_text().replace('"document 3"}', '"document 3"'), encoding="utf-8")  # line 4 broken
    owner, other = (stream(tmp_path / "corpus", rank, 2, num_workers=0) for rank in (1, 0))  # line 4 is document 3
    assert len(list(other)) >= 1  # rank 0 owns documents 0, 2, 4 and never parses line 4
    with pytest.raises(DataFormatError, match=r"a.jsonl:4: invalid JSON"):
        list(owner)


def test_a_paragraph_text_corpus_is_read_a_line_at_a_time(corpus: Path, monkeypatch) -> None:
    expected = documents_read(DataLoader(stream(corpus, 0, 1, num_workers=0), batch_size=None))

    def whole_file_read(self, *args, **kwargs):
        raise AssertionError(f"{self} was read whole")

    monkeypatch.setattr(Path, "read_text", whole_file_read)
    monkeypatch.setattr(Path, "read_bytes", whole_file_read)
    assert documents_read(DataLoader(stream(corpus, 0, 1, num_workers=0), batch_size=None)) == expected

    monkeypatch.undo()
    text = corpus / "b.txt"
    text.write_bytes(text.read_bytes() + b"\n\nbroken \xff paragraph\n")
    lines = text.read_bytes().count(b"\n")
    with pytest.raises(DataFormatError, match=rf"b.txt:{lines}: not valid UTF-8"):
        list(stream(corpus, 0, 1, num_workers=0))


def test_empty_files_are_refused_before_training_or_left_out_with_a_warning(tmp_path: Path, caplog) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.jsonl").write_bytes(b"")
    (empty / "b.jsonl.gz").write_bytes(gzip.compress(b"\n  \n"))  # white space only, once decompressed
    (empty / "c.txt").write_text("\n\n", encoding="utf-8")
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), empty / "d.parquet")  # no rows
    # Read, they gave no document (or an error from a worker, mid-training): refused when the stream is built.
    with pytest.raises(DatasetError, match=r"no document to stream.*a\.jsonl.*b\.jsonl\.gz.*c\.txt.*d\.parquet"):
        stream(empty, 0, 1, num_workers=0)
    with pytest.raises(DatasetError, match=r"a\.jsonl"):
        PandaDataModule(
            tokenizer=str(TOKENIZER_DIR),
            instruction_tuning_data_dir=None,
            pretraining_data_dir=str(empty),
            streaming=True,
            cache_dir=str(tmp_path / "cache"),
        ).train_dataloader()

    mixed = tmp_path / "mixed"
    write_jsonl(mixed / "b.jsonl", [{"title": "", "content": f"document {i}"} for i in range(4)])
    (mixed / "a.jsonl").write_bytes(b"")
    (mixed / "c.txt").write_text(" \n", encoding="utf-8")  # read, it raised "holds no text" in a worker
    with caplog.at_level(logging.WARNING):
        batches = list(DataLoader(stream(mixed, 0, 1, num_workers=0), batch_size=None))
    assert "2 empty file(s)" in caplog.text and "a.jsonl" in caplog.text and "c.txt" in caplog.text
    assert len(documents_read(batches)) == 4
