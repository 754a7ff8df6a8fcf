"""Reading and validating record files (`.json` arrays and `.jsonl`), with the line of every record.

The reader is strict: the first malformed record stops the run before any tokenization, with an error naming
the file, the line and the field. Python's `json` is used for the parsing itself; this module only tracks where
each record starts so that errors (ours and the decoder's) point at a line a user can open.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pandallm.errors import DataFormatError, DatasetError

RecordKind = Literal["instruction", "pretraining"]

# The fields of each record kind, in the order they are documented. All are strings.
FIELDS: dict[RecordKind, tuple[str, ...]] = {
    "instruction": ("input", "target"),
    "pretraining": ("title", "content"),
}
DATA_SUFFIXES = (".json", ".jsonl")


@dataclass(frozen=True)
class Record:
    """One validated record and where it came from."""

    path: str
    line: int
    fields: dict[str, str]


def find_data_files(directory: str | Path, option: str) -> list[Path]:
    """The `.json` / `.jsonl` files under `directory` (recursively), in a stable order."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DatasetError(f"{option} '{directory}' is not a directory (set `data.{option}: null` to train without it)")
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix in DATA_SUFFIXES)
    if not files:
        raise DatasetError(f"{option} '{directory}' holds no .json or .jsonl files")
    return files


def iter_json_values(path: Path, skipped: list[DataFormatError] | None = None) -> Iterator[tuple[int, object]]:
    """Yield `(line, value)` for each record of a `.jsonl` file or each element of a `.json` array.

    With `skipped`, a `.jsonl` line that is not valid JSON is appended to it instead of raising. A `.json` array
    with a syntax error always raises: nothing after the error can be read reliably.
    """
    if path.suffix not in DATA_SUFFIXES:
        raise DatasetError(f"{path}: unsupported file type '{path.suffix}' (expected .json or .jsonl)")
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise DataFormatError(path, line, None, "not valid UTF-8") from e
    if path.suffix == ".jsonl":
        yield from _iter_jsonl(path, text, skipped)
    else:
        yield from _iter_json_array(path, text)


def _iter_jsonl(path: Path, text: str, skipped: list[DataFormatError] | None) -> Iterator[tuple[int, object]]:
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            error = DataFormatError(path, line_number, None, f"invalid JSON: {e.msg} (column {e.colno})")
            if skipped is None:
                raise error from e
            skipped.append(error)
            continue
        yield line_number, value


def _iter_json_array(path: Path, text: str) -> Iterator[tuple[int, object]]:
    decoder = json.JSONDecoder()
    # Line numbers are counted incrementally: `text.count` from the start for every element would be quadratic.
    line, counted_to = 1, 0

    def line_at(pos: int) -> int:
        nonlocal line, counted_to
        line += text.count("\n", counted_to, pos)
        counted_to = pos
        return line

    def skip_space(pos: int) -> int:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        return pos

    def fail(pos: int, problem: str) -> DataFormatError:
        return DataFormatError(path, line_at(pos), None, problem)

    pos = skip_space(0)
    if pos == len(text) or text[pos] != "[":
        raise fail(pos, "expected a JSON array of records, starting with '['")
    pos = skip_space(pos + 1)
    if pos < len(text) and text[pos] == "]":
        return
    while True:
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataFormatError(path, e.lineno, None, f"invalid JSON: {e.msg} (column {e.colno})") from e
        yield line_at(pos), value
        pos = skip_space(end)
        if pos < len(text) and text[pos] == ",":
            pos = skip_space(pos + 1)
        elif pos < len(text) and text[pos] == "]":
            break
        else:
            raise fail(pos, "invalid JSON: expected ',' or ']' after a record")
    if skip_space(pos + 1) != len(text):
        raise fail(skip_space(pos + 1), "invalid JSON: extra data after the closing ']'")


def validate(value: object, kind: RecordKind, path: Path, line: int) -> Record:
    """Check one decoded value against the fields of `kind`; return it as a `Record`."""
    fields = FIELDS[kind]
    if not isinstance(value, dict):
        raise DataFormatError(
            path, line, None, f"expected an object with fields {list(fields)}, got {type(value).__name__}"
        )
    for field in fields:
        if field not in value:
            raise DataFormatError(path, line, field, f"missing (a {kind} record needs {list(fields)})")
        if not isinstance(value[field], str):
            raise DataFormatError(path, line, field, f"expected a string, got {type(value[field]).__name__}")
    # A record with nothing to learn from is almost always a bug upstream (an export that lost a column).
    learned = "target" if kind == "instruction" else "content"
    if not value[learned].strip():
        raise DataFormatError(path, line, learned, "is empty")
    return Record(str(path), line, {field: value[field] for field in fields})


def detect_kind(value: object, path: Path, line: int) -> RecordKind:
    """The record kind whose fields `value` has (used for explicitly listed files such as validation files)."""
    if isinstance(value, dict):
        for kind, fields in FIELDS.items():
            if all(field in value for field in fields):
                return kind
    expected = " or ".join(str(list(f)) for f in FIELDS.values())
    keys = list(value) if isinstance(value, dict) else type(value).__name__
    raise DataFormatError(path, line, None, f"cannot tell the record kind: expected fields {expected}, got {keys}")


def read_records(
    path: str | Path, kind: RecordKind | None = None, skipped: list[DataFormatError] | None = None
) -> tuple[RecordKind, list[Record]]:
    """Read and validate every record of one file. With `kind=None` the kind is detected from the first record.

    Strict by default: the first malformed record raises. With `skipped`, malformed records are appended to it
    and left out (see `iter_json_values` for the one exception).
    """
    path = Path(path)
    records: list[Record] = []
    for line, value in iter_json_values(path, skipped):
        try:
            if kind is None:
                kind = detect_kind(value, path, line)
            records.append(validate(value, kind, path, line))
        except DataFormatError as error:
            if skipped is None:
                raise
            skipped.append(error)
    if kind is None:
        raise DatasetError(f"{path}: holds no records")
    return kind, records
