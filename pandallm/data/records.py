"""Reading and validating data sources, with the line of every record.

A source is a `.json` array or `.jsonl` file of records in any format of `pandallm.data.formats`, a `.txt` file
of pretraining text (each of the three may be gzip- or zstd-compressed: `.jsonl.gz`, `.json.zst`, ...), a `.parquet`
file, or a directory written by `datasets.Dataset.save_to_disk` (the "line" of a Parquet or dataset row is its
1-based row number). How their bytes and rows are read is `pandallm.data.readers`'s.

The reader is strict: the first malformed record stops the run before any tokenization, with an error naming
the file, the line and the field. Python's `json` is used for the parsing itself; this module only tracks where
each record starts so that errors (ours and the decoder's) point at a line a user can open.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

from pandallm.data.formats import FORMATS, Format, RecordKind, Turn, detect, detect_prompt, parse, parse_prompt
from pandallm.data.preference_formats import Judged, Pair
from pandallm.data.readers import (
    COMPRESSIONS,
    PARQUET_SUFFIX,
    is_json_lines,
    iter_lines,
    iter_parquet_rows,
    logical_suffix,
    read_bytes,
)
from pandallm.data.seed_formats import OasstPaths, Several
from pandallm.errors import DataFormatError, DatasetError

log = logging.getLogger(__name__)

DATA_SUFFIXES = (".json", ".jsonl", PARQUET_SUFFIX)
TEXT_SUFFIX = ".txt"
TxtSplit = Literal["file", "paragraph"]


@dataclass(frozen=True)
class Record:
    """One validated record, normalized, and where it came from: a conversation (`turns`), a document (`text`), or
    a prompt (`turns`) with continuations: `chosen` and `rejected` (a preference pair), or one `chosen` that is
    `desirable` or not (KTO)."""

    path: str
    line: int
    format: str
    turns: tuple[Turn, ...] = ()
    text: str = ""
    chosen: tuple[Turn, ...] = ()
    rejected: tuple[Turn, ...] = ()
    desirable: bool | None = None

    @property
    def kind(self) -> RecordKind:
        if self.desirable is not None:
            return "unpaired"
        if self.rejected:
            return "preference"
        return "instruction" if self.turns else "pretraining"

    @property
    def texts(self) -> list[str]:
        """Every text the record holds (for tokenizer training and statistics)."""
        if not self.turns:
            return [self.text]
        return [turn.content for turn in (*self.turns, *self.chosen, *self.rejected)]

    @property
    def conversations(self) -> tuple[tuple[Turn, ...], ...]:
        """What is rendered and tokenized: the conversation; a pair's prompt + chosen and prompt + rejected; a
        judged prompt + its continuation."""
        if self.kind == "instruction":
            return (self.turns,)
        return tuple((*self.turns, *side) for side in (self.chosen, self.rejected) if side)


@dataclass(frozen=True)
class PromptRecord:
    """One record to predict from (`data.predict_files`): the turns before its reply, and the reply it holds (its
    reference), with where it came from and its format, which decides its template as in training."""

    path: str
    line: int
    format: str
    turns: tuple[Turn, ...]
    reference: str | None = None

    @property
    def shown(self) -> dict[str, Any]:
        """The prompt as `predictions.jsonl` shows it: a pandallm record's `input` as given, other records' turns as
        `{"role", "content"}` messages."""
        if self.format == "pandallm":
            return {"input": self.turns[0].content}
        return {"prompt": [{"role": turn.role, "content": turn.content} for turn in self.turns]}


def is_saved_dataset(path: Path) -> bool:
    """A directory written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return path.is_dir() and (
        (path / "dataset_dict.json").is_file()
        or ((path / "state.json").is_file() and (path / "dataset_info.json").is_file())
    )


def suffix(path: Path) -> str:
    """A source's suffix, in any case (`A.JSONL` is a `.jsonl` file), through its compression (`a.jsonl.gz` is a
    `.jsonl` file too)."""
    return logical_suffix(path)


def is_hidden(path: Path, root: Path) -> bool:
    # `.ipynb_checkpoints/`, `.git/`, editors' `.swp` copies: never data, and often a duplicate of some.
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def find_data_files(directory: str | Path, option: str, text: bool = False) -> list[Path]:
    """The sources under `directory` (recursively), in a stable order: `.json` / `.jsonl` files, saved datasets
    (directories, not searched further: a `DatasetDict`'s split directories are not sources of their own), and
    with `text` also `.txt` files. Hidden files and directories (a name starting with '.') are left out.

    Symbolic links are followed, to files and to directories (`Path.rglob` follows neither on Python 3.11); a
    directory reached a second time (a link back to a parent, or two links to one directory) is read once. A
    source that cannot be read (a broken link, no permission) is an error naming each one: data a user put in
    the directory is meant to be trained on, and leaving it out would go unnoticed.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise DatasetError(f"{option} '{directory}' is not a directory (set `data.{option}: null` to train without it)")
    if is_saved_dataset(directory):
        return [directory]
    suffixes = (*DATA_SUFFIXES, TEXT_SUFFIX) if text else DATA_SUFFIXES
    found, unreadable = _walk(directory, suffixes)
    if unreadable:
        raise DatasetError(
            f"{option} '{directory}': cannot read {len(unreadable)} source(s): {'; '.join(unreadable[:10])}"
            f"{'; ...' if len(unreadable) > 10 else ''}. Fix or remove them (or move them into a hidden directory)"
        )
    if not found:
        kinds = ".json, .jsonl or .txt files" if text else ".json or .jsonl files"
        raise DatasetError(
            f"{option} '{directory}' holds no {kinds} (plain, .gz or .zst), .parquet files or saved datasets"
        )
    return sorted(found)


def _walk(root: Path, suffixes: tuple[str, ...]) -> tuple[list[Path], list[str]]:
    """The sources under `root`, following links, and what could not be read, each as `path (why)`."""
    found: list[Path] = []
    unreadable: list[str] = []
    # Directories by the file they are (device, inode), not by name: a link to a parent would otherwise loop.
    seen = {_identity(root)}
    pending = [root]
    while pending:
        current = pending.pop()
        try:
            entries = sorted(current.iterdir())
        except OSError as e:
            unreadable.append(f"{current} ({e.strerror or e})")
            continue
        for path in entries:
            if path.name.startswith("."):
                continue
            if path.is_dir():  # follows a link
                if is_saved_dataset(path):
                    found.append(path)
                    continue
                identity = _identity(path)
                if identity in seen:
                    log.info("pandallm data: %s leads to a directory read already (%s)", path, path.resolve())
                    continue
                seen.add(identity)
                pending.append(path)
            elif suffix(path) not in suffixes and path.suffix:
                packed = _unread_compression(path, suffixes)
                if packed:  # `a.jsonl.bz2` beside `b.jsonl.gz`: data, which skipping would drop without a word
                    unreadable.append(f"{path} (compressed as {packed}, which pandallm does not read: use .gz or .zst)")
                continue  # not a source, readable or not
            elif path.is_symlink() and not path.exists():
                # Without a suffix, it may have led to a directory of sources.
                unreadable.append(f"{path} (a broken link to {os.readlink(path)})")
            elif path.is_file() and suffix(path) in suffixes:
                if os.access(path, os.R_OK):
                    found.append(path)
                else:
                    unreadable.append(f"{path} (no permission to read)")
    return found, unreadable


# Compressions of data files that pandallm does not decompress (`readers.COMPRESSIONS` are the ones it does).
UNREAD_COMPRESSIONS = (".bz2", ".xz", ".lzma", ".lz4", ".br", ".zip", ".7z")


def _unread_compression(path: Path, suffixes: tuple[str, ...]) -> str | None:
    """The compression suffix of a source of a wanted kind that pandallm cannot read (`a.jsonl.bz2`, and a
    compressed `.parquet`, whose pages are compressed inside it); None for anything else (`notes.csv.gz`)."""
    names = [s.lower() for s in path.suffixes]
    if len(names) < 2 or names[-2] not in suffixes:
        return None
    if names[-1] in UNREAD_COMPRESSIONS or (names[-2] == PARQUET_SUFFIX and names[-1] in COMPRESSIONS):
        return names[-1]
    return None


def _identity(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_dev, stat.st_ino


def iter_json_values(path: Path, skipped: list[DataFormatError] | None = None) -> Iterator[tuple[int, object]]:
    """Yield `(line, value)` for each record of a `.jsonl` file, each element of a `.json` array, or each row of a
    `.parquet` file (compressed or not, see `pandallm.data.readers`).

    With `skipped`, a `.jsonl` line that is not valid JSON is appended to it instead of raising. A `.json` array
    with a syntax error always raises: nothing after the error can be read reliably.
    """
    if suffix(path) not in DATA_SUFFIXES:
        raise DatasetError(
            f"{path}: unsupported source (expected a .json, .jsonl, .parquet or .txt file, optionally .gz or .zst "
            "compressed, or a directory written by Dataset.save_to_disk)"
        )
    if path.is_dir():  # a partitioned Parquet dataset (`x.parquet/part-0.parquet`) or a misnamed directory
        raise DatasetError(f"{path}: a directory, not a data file (nor a saved dataset): name the files in it")
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    if suffix(path) == PARQUET_SUFFIX:
        yield from iter_parquet_rows(path)
    elif is_json_lines(path):
        yield from _iter_jsonl(path, skipped)
    else:
        yield from _iter_json_array(path, read_utf8(path))


def read_utf8(path: Path) -> str:
    """The file's text, decompressed; a byte-order mark (Windows editors write one) is not part of it."""
    data = read_bytes(path)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataFormatError(path, line, None, "not valid UTF-8") from e


def _line_text(raw: bytes, line_number: int, errors: str = "strict") -> str:
    """A line read as bytes, as text; the first one without a byte-order mark."""
    return raw.decode("utf-8-sig" if line_number == 1 else "utf-8", errors)


def _decode_line(path: Path, line_number: int, raw: bytes) -> str:
    try:
        return _line_text(raw, line_number)
    except UnicodeDecodeError as e:
        raise DataFormatError(path, line_number, None, "not valid UTF-8") from e


# Python's JSON parser recurses once per level of nesting: a line of 100,000 '[' ends in a RecursionError.
TOO_DEEP = "JSON nested more deeply than Python's JSON parser allows (about 1,000 levels; no record needs that)"


def _json_line(path: Path, line_number: int, line: str) -> object:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise DataFormatError(path, line_number, None, f"invalid JSON: {e.msg} (column {e.colno})") from e
    except RecursionError as e:
        raise DataFormatError(path, line_number, None, TOO_DEEP) from e


def _iter_jsonl(path: Path, skipped: list[DataFormatError] | None) -> Iterator[tuple[int, object]]:
    # Lines end at '\n' only: JSON strings may hold U+2028, U+2029 or U+0085 unescaped (`json.dumps` with
    # `ensure_ascii=False` writes them so), which `str.splitlines` would also break at.
    for line_number, raw in iter_lines(path):
        if not raw.strip():
            continue
        try:
            value = _json_line(path, line_number, _decode_line(path, line_number, raw))
        except DataFormatError as error:
            if skipped is None:
                raise
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
    if pos < len(text) and text[pos] == "{":
        raise fail(
            pos,
            "expected a JSON array of records, starting with '['; a file of one record per line is JSON "
            "Lines: name it .jsonl",
        )
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
        except RecursionError as e:
            raise fail(pos, TOO_DEEP) from e
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


def iter_dataset_rows(path: Path) -> Iterator[tuple[int, object]]:
    """The rows of a saved dataset as `(row number, record)`; a `DatasetDict` gives its `train` split (or its only
    split)."""
    from datasets import Dataset, DatasetDict, load_from_disk  # only here: `pandallm data check` starts without it

    saved = load_from_disk(str(path))
    if isinstance(saved, DatasetDict):
        if "train" in saved:
            saved = saved["train"]
        elif len(saved) == 1:
            saved = next(iter(saved.values()))
        else:
            raise DatasetError(f"{path}: a DatasetDict with splits {list(saved)}: save one split, or name it 'train'")
    assert isinstance(saved, Dataset)
    yield from enumerate(saved, start=1)


def iter_text_documents(path: Path, split: TxtSplit) -> Iterator[tuple[int, str]]:
    """A `.txt` file as documents, `(first line, text)`: the whole file, or each blank-line-separated paragraph.
    Paragraphs are read a line at a time, so that a corpus file larger than memory can be streamed."""
    if split == "file":
        yield 1, read_utf8(path).strip()
        return
    block: list[str] = []
    start = 1
    for number, raw in iter_lines(path):
        # `splitlines`: other line breaks (\r, \f, U+2028) inside a \n-line end a line too.
        for line in _decode_line(path, number, raw).splitlines() or [""]:
            if line.strip():
                if not block:
                    start = number
                block.append(line)
            elif block:
                yield start, "\n".join(block)
                block = []
    if block:
        yield start, "\n".join(block)


def ready(record: Record) -> Callable[[], Record]:
    """A loader of a record already read."""
    return lambda: record


def lazy_text_records(
    path: str | Path, split: TxtSplit, skipped: list[DataFormatError] | None = None
) -> Iterator[Callable[[], Record]]:
    """One loader per document of a `.txt` file, in order: with the paragraph split, the file is read a line at a
    time and only one paragraph is held (what streaming needs). An empty document is an error, or with `skipped`
    appended to it and left out."""
    path = Path(path)
    found = False
    for line, text in iter_text_documents(path, split):
        if text.strip():
            found = True
            yield ready(Record(str(path), line, "text", text=text))
        elif skipped is not None:
            skipped.append(DataFormatError(path, line, None, "is empty"))
        else:
            raise DataFormatError(path, line, None, "is empty")
    if not found:
        raise DatasetError(f"{path}: holds no text")


def iter_values(path: Path, skipped: list[DataFormatError] | None = None) -> Iterator[tuple[int, object]]:
    """`(line, record)` of a `.json` / `.jsonl` file or a saved dataset."""
    if is_saved_dataset(path):
        return iter_dataset_rows(path)
    return iter_json_values(path, skipped)


def _of_another_format(
    error: DataFormatError, fmt: Format, value: object, path: Path, line: int, first_line: int | None, prompt: bool
) -> DataFormatError:
    """A record of another format in a file whose first record fixed the format: say so, rather than name a field
    that the record was never meant to have."""
    if first_line is None or not isinstance(value, dict) or fmt.matches(value):
        return error  # a record of the file's own format: its own error says what is wrong
    other = next(
        (f for f in FORMATS.values() if f is not fmt and (f.matches(value) or (prompt and f.is_prompt(value)))),
        None,
    )
    if other is None:
        return error
    return DataFormatError(
        path,
        line,
        None,
        f"a {other.name} record {list(other.fields)} in a file of {fmt.name} records (detected from line "
        f"{first_line}); a file holds one format",
    )


def _as_records(fmt: Format, value: object, path: Path, line: int, first_line: int | None) -> list[Record]:
    """The records of one value: one, or one per conversation of a record that holds several (`Several`)."""
    try:
        parsed = parse(fmt, value, path, line)
    except DataFormatError as error:
        raise _of_another_format(error, fmt, value, path, line, first_line, prompt=False) from error
    if isinstance(parsed, Several):
        return [Record(str(path), line, fmt.name, turns=turns) for turns in parsed]
    return [_record(fmt, parsed, path, line)]


def _as_record(fmt: Format, value: object, path: Path, line: int, first_line: int | None) -> Record:
    (record,) = _as_records(fmt, value, path, line, first_line)  # streamed documents: one per value
    return record


def _record(fmt: Format, parsed: object, path: Path, line: int) -> Record:
    if isinstance(parsed, str):
        return Record(str(path), line, fmt.name, text=parsed)
    if isinstance(parsed, Pair):
        return Record(str(path), line, fmt.name, parsed.prompt, chosen=parsed.chosen, rejected=parsed.rejected)
    if isinstance(parsed, Judged):
        return Record(str(path), line, fmt.name, parsed.prompt, chosen=parsed.completion, desirable=parsed.desirable)
    return Record(str(path), line, fmt.name, turns=parsed)


def lazy_records(
    path: str | Path, kind: RecordKind | None = None, format: str = "auto"
) -> Iterator[Callable[[], Record]]:
    """One loader per record of a JSON Lines file (`.jsonl`, compressed or not) or a `.parquet` file, in order,
    reading the file a line (a row group) at a time: a record is decoded, parsed and validated (strictly) only when
    its loader is called. Streaming numbers every record of the corpus on every worker but parses only its own share.
    The format is fixed by the file's first record, as `read_records` fixes it."""
    path = Path(path)
    fmt = None if format == "auto" else FORMATS[format]
    first_line = None

    def load(line_number: int, raw: bytes) -> Record:
        line = _decode_line(path, line_number, raw)
        return _as_record(fmt, _json_line(path, line_number, line), path, line_number, first_line)

    if suffix(path) == PARQUET_SUFFIX:
        for row, value in iter_parquet_rows(path):
            if fmt is None:
                fmt, first_line = detect(value, path, row, kind), row
            yield partial(_as_record, fmt, value, path, row, first_line)
        return
    for line_number, raw in iter_lines(path):
        if not raw.strip():
            continue
        if fmt is None:
            value = _json_line(path, line_number, _line_text(raw, line_number, errors="replace"))
            fmt, first_line = detect(value, path, line_number, kind), line_number
        yield partial(load, line_number, raw)


def is_lazy(path: Path) -> bool:
    """Whether `lazy_records` reads the file a record at a time (other sources are read whole)."""
    return suffix(path) == PARQUET_SUFFIX or (suffix(path) in DATA_SUFFIXES and is_json_lines(path))


def read_records(
    path: str | Path,
    kind: RecordKind | None = None,
    skipped: list[DataFormatError] | None = None,
    format: str = "auto",
    txt_split: TxtSplit = "file",
    oasst_paths: OasstPaths = "all",
) -> tuple[RecordKind, list[Record]]:
    """Read and validate every record of one source; return the kind of its records and the records.

    With `format="auto"` the format is detected from the first record's fields (among the formats of `kind`, if
    given), and every later record must be of the same format. Strict by default: the first malformed record
    raises. With `skipped`, malformed records are appended to it and left out (see `iter_json_values` for the one
    exception). `oasst_paths` chooses the conversations of an OpenAssistant tree (`seed_formats.oasst_paths`).
    """
    path = Path(path)
    if suffix(path) == TEXT_SUFFIX and path.is_file():
        return "pretraining", _read_text(path, kind, skipped, txt_split)
    fixed = None if format == "auto" else FORMATS[format]
    if fixed is not None and kind is not None and fixed.kind != kind:
        raise DatasetError(f"{path}: format '{format}' holds {fixed.kind} records, where {kind} records are expected")
    fmt, first_line = fixed, None
    records: list[Record] = []
    skipped_before = len(skipped) if skipped is not None else 0
    for line, value in iter_values(path, skipped):
        try:
            if fmt is None:
                fmt, first_line = detect(value, path, line, kind), line
            if fmt.name == "oasst" and oasst_paths == "best":
                fmt = FORMATS["oasst_best"]
            records += _as_records(fmt, value, path, line, first_line)
        except DataFormatError as error:
            if skipped is None:
                raise
            skipped.append(error)
    if fmt is None:
        # Every record of this file was malformed: they are in `skipped`, which the caller reports and counts.
        if skipped is not None and len(skipped) > skipped_before:
            return kind or "instruction", records
        raise DatasetError(f"{path}: holds no records")
    return fmt.kind, records


def _read_text(
    path: Path, kind: RecordKind | None, skipped: list[DataFormatError] | None, split: TxtSplit
) -> list[Record]:
    if kind == "instruction":
        raise DatasetError(f"{path}: a .txt file holds pretraining text; put it under data.pretraining_data_dir")
    return [load() for load in lazy_text_records(path, split, skipped)]


def read_prompts(path: str | Path) -> list[PromptRecord]:
    """The records of one `data.predict_files` source, as prompts: the format of each is detected as in training
    (from the file's first record; every later one must be of the same format), except that the reply may be left
    out. Strict: the first malformed record raises, naming its file, line and field."""
    path = Path(path)
    if suffix(path) == TEXT_SUFFIX:
        raise DatasetError(f"{path}: predict files hold instruction or chat records (.json, .jsonl, saved datasets)")
    if not path.exists():
        raise DatasetError(f"data.predict_files: '{path}': no such file or saved dataset")
    fmt, first_line = None, None
    prompts: list[PromptRecord] = []
    for line, value in iter_values(path):
        if fmt is None:
            fmt, first_line = detect_prompt(value, path, line), line
        try:
            turns, reference = parse_prompt(fmt, value, path, line)
        except DataFormatError as error:
            raise _of_another_format(error, fmt, value, path, line, first_line, prompt=True) from error
        prompts.append(PromptRecord(str(path), line, fmt.name, turns, reference))
    if fmt is None:
        raise DatasetError(f"{path}: holds no records")
    return prompts
