"""Data as it ships: gzip- and zstd-compressed JSON / JSON Lines / text, and Parquet, read a line or a row group at a
time, with the same records, lines and errors as the plain files."""

from __future__ import annotations

import gzip
import json
import re
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from torch.utils.data import DataLoader

from pandallm.data import PandaDataModule, readers
from pandallm.data.records import find_data_files, lazy_records, read_records
from pandallm.errors import DataFormatError, DatasetError
from tests.conftest import DOCUMENTS, INSTRUCTIONS, TOKENIZER_DIR, write_jsonl
from tests.data.test_streaming import documents_read, stream

CHATS = [
    {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
    {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]},
]


def compress(data: bytes, kind: str) -> bytes:
    return gzip.compress(data) if kind == ".gz" else zstandard.ZstdCompressor().compress(data)


def jsonl_bytes(records: list) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()


def write_parquet(path: Path, records: list, row_group_size: int = 2) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(records), path, row_group_size=row_group_size)
    return path


def summary(records) -> list:
    return [(r.line, r.format, r.turns, r.text) for r in records]


@pytest.mark.parametrize("kind", [".gz", ".zst"])
def test_compressed_files_give_the_records_and_lines_of_the_plain_ones(tmp_path: Path, kind: str) -> None:
    plain = {
        "a.jsonl": jsonl_bytes(INSTRUCTIONS),
        "b.json": json.dumps(CHATS, indent=2).encode(),
        "c.txt": b"First paragraph.\n\nSecond one,\non two lines.\n",
    }
    for name, data in plain.items():
        (tmp_path / name).write_bytes(data)
        (tmp_path / f"{name}{kind}").write_bytes(compress(data, kind))
        for split in ("file", "paragraph"):
            expected = read_records(tmp_path / name, txt_split=split)
            kind_found, records = read_records(tmp_path / f"{name}{kind}", txt_split=split)
            assert (kind_found, summary(records)) == (expected[0], summary(expected[1]))
    assert len(read_records(tmp_path / f"a.jsonl{kind}")[1]) == len(INSTRUCTIONS)


def test_a_gzipped_json_file_of_one_record_per_line_is_json_lines(tmp_path: Path) -> None:
    """C4's shards (`c4-train.00000-of-01024.json.gz`) hold one document per line under a .json name."""
    documents = [{"text": "The first page.", "url": "u1"}, {"text": "The second page.", "url": "u2"}]
    (tmp_path / "c4-train.00000-of-01024.json.gz").write_bytes(gzip.compress(jsonl_bytes(documents)))
    kind, records = read_records(tmp_path / "c4-train.00000-of-01024.json.gz", "pretraining")
    assert (kind, [(r.line, r.text) for r in records]) == (
        "pretraining",
        [(1, "The first page."), (2, "The second page.")],
    )


def test_a_gzipped_json_document_that_is_not_json_lines_is_one_value(tmp_path: Path) -> None:
    # Sniffed as JSON Lines by its first byte '{', a pretty-printed object gave one "invalid JSON" per line.
    path = tmp_path / "squad.json.gz"
    path.write_bytes(gzip.compress(json.dumps({"data": DOCUMENTS}, indent=2).encode()))
    with pytest.raises(DataFormatError, match=r"squad.json.gz:1: expected a JSON array of records"):
        read_records(path)
    records = [{"text": "a"}, {"text": "b"}]
    path.write_bytes(gzip.compress(json.dumps(records, indent=2).encode()))  # a pretty-printed array: read as one
    assert [r.text for r in read_records(path)[1]] == ["a", "b"]


@pytest.mark.parametrize("kind", [".gz", ".zst"])
def test_an_error_inside_a_compressed_file_names_the_file_and_line(tmp_path: Path, kind: str) -> None:
    path = tmp_path / f"bad.jsonl{kind}"
    path.write_bytes(compress(jsonl_bytes([*INSTRUCTIONS[:2], {"input": "a", "target": 3}]), kind))
    with pytest.raises(DataFormatError, match=rf"bad.jsonl\{kind}:3: field 'target': expected a string, got int"):
        read_records(path)


@pytest.mark.parametrize("kind", [".gz", ".zst"])
def test_a_truncated_compressed_file_is_an_error_not_a_shorter_corpus(tmp_path: Path, kind: str) -> None:
    """Cut at a line boundary the records read are all valid: only the decompressor can tell the file is short."""
    data = jsonl_bytes(INSTRUCTIONS * 200)
    whole = compress(data, kind)
    path = tmp_path / f"cut.jsonl{kind}"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataFormatError, match=rf"cut.jsonl\{kind}:\d+: cannot decompress .*damaged or truncated"):
        read_records(path)
    with pytest.raises(DataFormatError, match="damaged or truncated"):
        list(lazy_records(path))
    path.write_bytes(whole + whole)  # two frames / members, concatenated as `cat a.gz b.gz` writes them
    assert len(read_records(path)[1]) == 2 * len(INSTRUCTIONS) * 200


def test_a_zstd_frame_that_ends_exactly_at_a_read_boundary_is_not_damage(tmp_path: Path, monkeypatch) -> None:
    # `zstd -c a b > c` and pzstd write several frames; one ending exactly at the end of a 64 KiB read made the
    # next read fail ("cannot use a decompressobj multiple times"), and the valid file was reported damaged.
    from pandallm.data.readers import _ZstdRaw

    first = compress(jsonl_bytes(INSTRUCTIONS), ".zst")
    monkeypatch.setattr(_ZstdRaw, "CHUNK", len(first))  # the first frame fills the first read exactly
    path = tmp_path / "frames.jsonl.zst"
    path.write_bytes(first + compress(jsonl_bytes(INSTRUCTIONS[:1]), ".zst"))
    assert len(read_records(path)[1]) == len(INSTRUCTIONS) + 1


@pytest.mark.parametrize("kind", ["", ".gz", ".zst"])
def test_a_line_longer_than_the_limit_is_refused_without_being_read_whole(
    tmp_path: Path, monkeypatch, kind: str
) -> None:
    # A decompression bomb: 96 MiB of one line from a few KiB (zstd) or ~100 KiB (gzip). It was read whole, and
    # zstd's reader decompressed all of it at once, before any line was looked at.
    monkeypatch.setattr(readers, "MAX_LINE_BYTES", 1 << 20)
    path = tmp_path / f"bomb.jsonl{kind}"
    data = jsonl_bytes(INSTRUCTIONS[:1]) + b'{"input": "' + b"a" * (96 << 20)
    path.write_bytes(compress(data, kind) if kind else data)
    del data
    tracemalloc.start()
    try:
        with pytest.raises(DatasetError, match=rf"bomb.jsonl{re.escape(kind)}:2: a line longer than 1 MiB"):
            read_records(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 48 << 20  # a line's limit, and for zstd at most 32 MiB from one slice of compressed bytes
    path.write_bytes(compress(jsonl_bytes(INSTRUCTIONS), kind) if kind else jsonl_bytes(INSTRUCTIONS))
    assert len(read_records(path)[1]) == len(INSTRUCTIONS)  # short lines read as before


def test_parquet_rows_are_records_numbered_from_one_with_nested_turns(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "train-00000-of-00001.parquet", CHATS * 3)
    kind, records = read_records(path)
    assert kind == "instruction"
    assert [r.line for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r.format for r in records] == ["sharegpt"] * 6
    assert records[1].turns[1].content == "4"
    bad = write_parquet(tmp_path / "bad.parquet", [*INSTRUCTIONS, {"input": "x", "target": None}])
    with pytest.raises(DataFormatError, match=r"bad.parquet:5: field 'target': missing"):
        read_records(bad)
    (tmp_path / "fake.parquet").write_text("not parquet")
    with pytest.raises(DatasetError, match=r"fake.parquet: not a readable Parquet file"):
        read_records(tmp_path / "fake.parquet")


def test_a_parquet_file_is_read_a_row_group_at_a_time(tmp_path: Path, monkeypatch) -> None:
    path = write_parquet(tmp_path / "docs.parquet", DOCUMENTS * 2, row_group_size=2)  # 3 row groups
    groups_read = []
    read_row_group = pq.ParquetFile.read_row_group
    monkeypatch.setattr(
        pq.ParquetFile, "read_row_group", lambda self, i, **kw: groups_read.append(i) or read_row_group(self, i, **kw)
    )
    monkeypatch.setattr(pq.ParquetFile, "read", lambda *a, **kw: pytest.fail("the whole file was read"))
    loaders = lazy_records(path, "pretraining")
    first = next(loaders)()
    assert (first.line, first.text) == (1, "Rivers\n" + DOCUMENTS[0]["content"])
    assert groups_read == [0]
    assert [load().line for load in loaders] == [2, 3, 4, 5, 6]
    assert groups_read == [0, 1, 2]


def test_a_directory_given_as_a_file_is_named_as_one(tmp_path: Path) -> None:
    # Spark and pandas write a partitioned Parquet dataset as a directory `x.parquet/`: "no such file" misled.
    (tmp_path / "x.parquet").mkdir()
    with pytest.raises(DatasetError, match=r"x.parquet: a directory, not a data file"):
        read_records(tmp_path / "x.parquet")


def test_the_walker_finds_compressed_and_parquet_sources(tmp_path: Path) -> None:
    for name in ("a.jsonl.gz", "b.JSON.GZ", "c.jsonl.zst", "d.parquet", "e.txt.gz", "f.csv.gz", "g.gz"):
        (tmp_path / name).write_bytes(b"")
    found = [p.name for p in find_data_files(tmp_path, "pretraining_data_dir", text=True)]
    assert found == ["a.jsonl.gz", "b.JSON.GZ", "c.jsonl.zst", "d.parquet", "e.txt.gz"]
    assert "e.txt.gz" not in [p.name for p in find_data_files(tmp_path, "instruction_tuning_data_dir")]


def test_a_source_compressed_in_a_way_pandallm_does_not_read_is_named_not_skipped(tmp_path: Path) -> None:
    # It was left out without a word: a directory of .jsonl.gz and .jsonl.bz2 shards trained on half of them.
    for name in ("a.jsonl.gz", "b.jsonl.bz2", "c.json.xz", "d.parquet.gz", "notes.csv.bz2", "e.txt.bz2"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(DatasetError, match=r"cannot read 3 source\(s\)") as error:
        find_data_files(tmp_path, "instruction_tuning_data_dir")
    for name, packed in (("b.jsonl.bz2", ".bz2"), ("c.json.xz", ".xz"), ("d.parquet.gz", ".gz")):
        assert f"{name} (compressed as {packed}, which pandallm does not read" in str(error.value)
    with pytest.raises(DatasetError, match=r"cannot read 4 source\(s\).*e.txt.bz2"):  # a text corpus too
        find_data_files(tmp_path, "pretraining_data_dir", text=True)


def test_a_streamed_corpus_of_compressed_and_parquet_files_reads_every_document_once(tmp_path: Path) -> None:
    """The streaming test's corpus, as .jsonl.gz + .parquet + .txt.zst: the same documents reach the consumers."""
    words = ["river", "tea", "mountain", "city"]
    documents = [f"document {i}: " + " ".join(words[: 1 + i % 4] * (1 + i % 5)) for i in range(23)]
    plain, packed = tmp_path / "plain", tmp_path / "packed"
    write_jsonl(plain / "a.jsonl", [{"title": "", "content": d} for d in documents[:10]])
    write_jsonl(plain / "b.jsonl", [{"title": "", "content": d} for d in documents[10:15]])
    (plain / "c.txt").write_text("\n\n".join(documents[15:]), encoding="utf-8")
    packed.mkdir()
    (packed / "a.jsonl.gz").write_bytes(gzip.compress((plain / "a.jsonl").read_bytes()))
    write_parquet(packed / "b.parquet", [{"title": "", "content": d} for d in documents[10:15]])
    (packed / "c.txt.zst").write_bytes(compress((plain / "c.txt").read_bytes(), ".zst"))

    def read(corpus: Path) -> list:
        return [
            documents_read(DataLoader(stream(corpus, rank, 2, num_workers=0), batch_size=None)) for rank in range(2)
        ]

    assert read(packed) == read(plain)
    assert sum(len(docs) for docs in read(packed)) == 23


def test_a_data_module_trains_on_parquet_and_compressed_sources_as_on_plain_ones(tmp_path: Path) -> None:
    write_parquet(tmp_path / "packed" / "it" / "a.parquet", INSTRUCTIONS * 3)
    (tmp_path / "packed" / "pt").mkdir()
    (tmp_path / "packed" / "pt" / "d.jsonl.zst").write_bytes(compress(jsonl_bytes(DOCUMENTS), ".zst"))
    write_jsonl(tmp_path / "plain" / "it" / "a.jsonl", INSTRUCTIONS * 3)
    write_jsonl(tmp_path / "plain" / "pt" / "d.jsonl", DOCUMENTS)

    def rows(root: Path) -> dict:
        dm = PandaDataModule(
            tokenizer=str(TOKENIZER_DIR),
            instruction_tuning_data_dir=str(root / "it"),
            pretraining_data_dir=str(root / "pt"),
            max_seq_length=32,
            num_workers=0,
            cache_dir=str(tmp_path / "cache" / root.name),
        )
        dm.prepare_data()
        dm.setup("fit")
        return dm.datasets["train"].to_dict()

    assert rows(tmp_path / "packed") == rows(tmp_path / "plain")
