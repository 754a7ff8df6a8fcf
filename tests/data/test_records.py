"""Malformed data fails before training, naming the file, the line and the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pandallm.data.formats import Turn
from pandallm.data.records import find_data_files, read_records
from pandallm.errors import DataFormatError, DatasetError
from tests.conftest import write_jsonl


def test_jsonl_records_carry_their_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"input": "a", "target": "b"}\n\n{"input": "c", "target": "d"}\n')
    kind, records = read_records(path)
    assert kind == "instruction"
    assert [(r.line, r.format, r.turns) for r in records] == [
        (1, "pandallm", (Turn("user", "a"), Turn("assistant", "b"))),
        (3, "pandallm", (Turn("user", "c"), Turn("assistant", "d"))),
    ]


def test_json_array_records_carry_their_line(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"title": "t", "content": "x"}, {"title": "", "content": "y"}], indent=2))
    kind, records = read_records(path)
    assert kind == "pretraining"
    assert [r.line for r in records] == [2, 6]


@pytest.mark.parametrize(
    ("text", "line", "field", "problem"),
    [
        ('{"input": "a", "target": "b"}\n{"input": "a", "target": }\n', 2, None, "invalid JSON"),
        ('{"input": "a", "target": "b"}\n{"input": "a"}\n', 2, "target", "missing"),
        ('{"input": "a", "target": "b"}\n\n{"input": 3, "target": "b"}\n', 3, "input", "expected a string, got int"),
        ('{"input": "a", "target": "b"}\n["a", "b"]\n', 2, None, "expected an object"),
        ('{"input": "a", "target": "  "}\n', 1, "target", "is empty"),
    ],
)
def test_malformed_jsonl_names_file_line_and_field(tmp_path: Path, text, line, field, problem) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    with pytest.raises(DataFormatError) as error:
        read_records(path, "instruction")
    assert (error.value.path, error.value.line, error.value.field) == (str(path), line, field)
    assert str(error.value).startswith(f"{path}:{line}: ")
    assert problem in str(error.value)


def test_malformed_json_array_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"title": "a", "content": "b"},\n  {"title": "c", "content": "d"\n]\n')
    with pytest.raises(DataFormatError, match=r"bad.json:4: invalid JSON"):
        read_records(path, "pretraining")
    path.write_text('[\n  {"title": "a", "content": "b"},\n  {"title": "c", "content": 7}\n]\n')
    with pytest.raises(DataFormatError, match=r"bad.json:3: field 'content': expected a string, got int"):
        read_records(path, "pretraining")
    path.write_text('{"title": "a", "content": "b"}\n{"title": "c", "content": "d"}\n')
    with pytest.raises(DataFormatError, match=r"bad.json:1: expected a JSON array.*JSON Lines: name it .jsonl"):
        read_records(path, "pretraining")


def test_files_as_editors_and_exporters_write_them(tmp_path: Path) -> None:
    """A byte-order mark, Windows line ends, and line separators inside strings (`json.dumps(ensure_ascii=False)`
    leaves U+2028, U+2029 and U+0085 unescaped) are all valid records."""
    records = [{"input": "line\u2028sep\u2029para\x85next", "target": "ok"}, {"input": "b", "target": "c"}]
    lines = "\r\n".join(json.dumps(r, ensure_ascii=False) for r in records)
    (tmp_path / "a.jsonl").write_bytes(b"\xef\xbb\xbf" + lines.encode())
    (tmp_path / "b.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(records, ensure_ascii=False).encode())
    (tmp_path / "c.txt").write_bytes(b"\xef\xbb\xbfFirst paragraph.\n\nSecond.\n")
    for name in ("a.jsonl", "b.json"):
        _, read = read_records(tmp_path / name)
        assert [(r.line, r.turns[0].content) for r in read] == [
            (1, records[0]["input"]),
            (2 if name == "a.jsonl" else 1, "b"),
        ]
    for split, texts in (("file", ["First paragraph.\n\nSecond."]), ("paragraph", ["First paragraph.", "Second."])):
        _, read = read_records(tmp_path / "c.txt", txt_split=split)
        assert [r.text for r in read] == texts


def test_sources_are_found_in_any_case_and_hidden_copies_are_not(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "it" / "UPPER.JSONL", [{"input": "a", "target": "b"}])
    write_jsonl(tmp_path / "it" / ".ipynb_checkpoints" / "UPPER-checkpoint.jsonl", [{"input": "a", "target": "b"}])
    write_jsonl(tmp_path / "it" / ".hidden.jsonl", [{"input": "a", "target": "b"}])
    assert find_data_files(tmp_path / "it", "instruction_tuning_data_dir") == [tmp_path / "it" / "UPPER.JSONL"]
    assert len(read_records(tmp_path / "it" / "UPPER.JSONL")[1]) == 1


def test_a_file_of_only_malformed_records_is_skipped_and_reported_in_skip_mode(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{bad\n{"question": "x"}\n')
    skipped: list[DataFormatError] = []
    assert read_records(path, "instruction", skipped) == ("instruction", [])
    assert [(e.line, "invalid JSON" in str(e) or "cannot tell" in str(e)) for e in skipped] == [(1, True), (2, True)]
    with pytest.raises(DataFormatError, match=r"bad.jsonl:1: invalid JSON"):
        read_records(path, "instruction")  # strict mode: the first one stops the run
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(DatasetError, match="empty.json: holds no records"):  # not excused by other files' errors
        read_records(tmp_path / "empty.json", "instruction", skipped)


def test_unknown_record_kind_lists_the_expected_fields(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "v.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataFormatError, match=r"v.jsonl:1: cannot tell the record kind.*\['input', 'target'\]"):
        read_records(path)


def test_missing_and_empty_directories(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="instruction_tuning_data_dir '.*nope' is not a directory"):
        find_data_files(tmp_path / "nope", "instruction_tuning_data_dir")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="holds no .json or .jsonl files"):
        find_data_files(tmp_path / "empty", "instruction_tuning_data_dir")


def test_linked_directories_are_followed_once_and_cycles_end(tmp_path: Path) -> None:
    record = [{"input": "a", "target": "b"}]
    write_jsonl(tmp_path / "elsewhere" / "shared.jsonl", record)
    write_jsonl(tmp_path / "it" / "own.jsonl", record)
    (tmp_path / "it" / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "it" / "again").symlink_to(tmp_path / "elsewhere", target_is_directory=True)  # read once
    (tmp_path / "elsewhere" / "up").symlink_to(tmp_path / "it", target_is_directory=True)  # a cycle
    (tmp_path / "it" / "file.jsonl").symlink_to(tmp_path / "elsewhere" / "shared.jsonl")
    found = find_data_files(tmp_path / "it", "instruction_tuning_data_dir")
    # The second link to `elsewhere` ("linked" sorts after "again") is not searched again.
    assert found == [tmp_path / "it" / name for name in ("again/shared.jsonl", "file.jsonl", "own.jsonl")]


def test_sources_that_cannot_be_read_are_named(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "it" / "own.jsonl", [{"input": "a", "target": "b"}])
    (tmp_path / "it" / "gone.jsonl").symlink_to(tmp_path / "moved" / "gone.jsonl")
    (tmp_path / "it" / "corpus").symlink_to(tmp_path / "unmounted")  # no suffix: it may have been a directory
    (tmp_path / "it" / "notes.md").symlink_to(tmp_path / "nowhere.md")  # not a source: no matter
    with pytest.raises(DatasetError) as caught:
        find_data_files(tmp_path / "it", "instruction_tuning_data_dir")
    assert str(caught.value) == (
        f"instruction_tuning_data_dir '{tmp_path / 'it'}': cannot read 2 source(s): "
        f"{tmp_path / 'it' / 'corpus'} (a broken link to {tmp_path / 'unmounted'}); "
        f"{tmp_path / 'it' / 'gone.jsonl'} (a broken link to {tmp_path / 'moved' / 'gone.jsonl'}). "
        "Fix or remove them (or move them into a hidden directory)"
    )


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_json_nested_past_the_parsers_limit_names_the_file_and_line(tmp_path: Path, suffix: str) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    path = tmp_path / f"d{suffix}"
    good = '{"input": "a", "target": "b"}'
    path.write_text(f"{good}\n{deep}\n" if suffix == ".jsonl" else f"[{good},\n{deep}]")
    with pytest.raises(DataFormatError, match=rf"d{suffix}:2: JSON nested more deeply than Python's JSON parser"):
        read_records(path)
    skipped: list[DataFormatError] = []
    if suffix == ".jsonl":  # a line can be skipped as any malformed line is
        assert len(read_records(path, skipped=skipped)[1]) == 1 and len(skipped) == 1
