"""The bytes and rows of a data file as it ships: plain, gzip- or zstd-compressed, or Parquet.

Hugging Face dataset repositories ship `.parquet` files, C4's shards are `.json.gz`, OpenAssistant's trees are
`.jsonl.gz`, large corpora are often `.jsonl.zst`. A compressed file is read through a decompressing stream, a line
at a time (of at most `MAX_LINE_BYTES`), never decompressed whole onto disk or into memory (except a `.json` array,
which is one value, and a `.txt` file read as one document). A Parquet file is read a row group at a time. A damaged
or truncated file is an error that names it and the line (or row) it stopped at: the decompressors report
truncation, and zstd's, which does not, is checked for the end of its frame.
"""

from __future__ import annotations

import gzip
import io
import json
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from pandallm.errors import DataFormatError, DatasetError

COMPRESSIONS = (".gz", ".zst")
# The suffixes whose files may be compressed: the text kinds. Parquet compresses its own pages.
COMPRESSIBLE = (".json", ".jsonl", ".txt")
PARQUET_SUFFIX = ".parquet"
# The longest line read, in bytes (its b'\n' aside). No record comes near it (a long book is a few MiB); a file
# without line breaks, or a decompression bomb (a few KiB of gzip or zstd that decompress to GiB of one line), would
# otherwise be read whole into memory before any record is looked at. Lines are read at most this much at a time.
MAX_LINE_BYTES = 64 << 20


def compression(path: Path) -> str | None:
    """`.gz` or `.zst` for a compressed text file (`a.jsonl.gz`), else None."""
    suffixes = [s.lower() for s in path.suffixes]
    if len(suffixes) >= 2 and suffixes[-1] in COMPRESSIONS and suffixes[-2] in COMPRESSIBLE:
        return suffixes[-1]
    return None


def logical_suffix(path: Path) -> str:
    """The suffix that says what a file holds, in lower case: `a.JSONL.gz` holds `.jsonl`."""
    suffixes = [s.lower() for s in path.suffixes]
    return suffixes[-2] if compression(path) else path.suffix.lower()


class _ZstdRaw(io.RawIOBase):
    """A zstd file's decompressed bytes. zstandard's own reader ends quietly at a truncated frame, which would drop
    the records after the cut without a word: this one checks that every frame it started was complete."""

    CHUNK = 1 << 16  # compressed bytes read from the file at a time
    # Compressed bytes decompressed at a time: zstd's densest block is 4 bytes for 128 KiB, so a slice gives 32 MiB
    # at most. A whole chunk of a decompression bomb would give 2 GiB in one call.
    SLICE = 1 << 10

    def __init__(self, path: Path) -> None:
        import zstandard

        self._file = open(path, "rb")  # noqa: SIM115 (closed in close())
        self._context = zstandard.ZstdDecompressor()
        self._frame = self._context.decompressobj()
        self._input = memoryview(b"")  # compressed bytes read, not yet decompressed
        self._pending = b""  # decompressed bytes, handed out from `_offset` on
        self._offset = 0
        self._started = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._offset == len(self._pending):
            if not self._input:
                self._input = memoryview(self._file.read(self.CHUNK))
                if not self._input:
                    if not self._frame.eof and self._started:
                        raise EOFError("the zstd stream ends inside a frame")
                    return 0
            if self._frame.eof:
                # The last slice ended exactly where a frame did (no `unused_data` to start the next one from): a
                # finished decompressobj refuses more input, and a valid file would read as damaged.
                self._frame = self._context.decompressobj()
            self._started = True
            piece, self._input = self._input[: self.SLICE], self._input[self.SLICE :]
            self._pending, self._offset = self._frame.decompress(piece), 0
            while self._frame.eof and self._frame.unused_data:  # concatenated frames (zstd -c a b > c)
                rest = self._frame.unused_data
                self._frame = self._context.decompressobj()
                self._pending += self._frame.decompress(rest)
        size = min(len(buffer), len(self._pending) - self._offset)
        buffer[:size] = self._pending[self._offset : self._offset + size]
        self._offset += size
        return size

    def close(self) -> None:
        self._file.close()
        super().close()


def _decompression_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [EOFError, gzip.BadGzipFile, zlib.error]
    try:
        import zstandard

        errors.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(errors)


@contextmanager
def open_binary(path: Path) -> Iterator[BinaryIO]:
    """The file's bytes, decompressed by its last suffix."""
    kind = compression(path)
    if kind == ".gz":
        stream: BinaryIO = gzip.open(path, "rb")  # noqa: SIM115 (closed below)
    elif kind == ".zst":
        try:
            stream = io.BufferedReader(_ZstdRaw(path))
        except ImportError as e:
            raise DatasetError(f"{path}: reading .zst files needs the zstandard package (pip install zstandard)") from e
    else:
        stream = open(path, "rb")  # noqa: SIM115 (closed below)
    with stream:
        yield stream


def _damaged(path: Path, line: int, error: BaseException) -> DataFormatError:
    detail = str(error) or type(error).__name__
    return DataFormatError(
        path, line, None, f"cannot decompress ({detail}): the file is damaged or truncated here; lines before it read"
    )


def iter_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """`(line number, raw line)` of a text file, plain or compressed, a line at a time; lines end at b'\\n' only. A
    line longer than `MAX_LINE_BYTES` is an error, found having read that much of it, not the whole line."""
    line_number = 0
    try:
        with open_binary(path) as stream:
            while raw := stream.readline(MAX_LINE_BYTES + 1):
                line_number += 1
                if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                    raise DatasetError(
                        f"{path}:{line_number}: a line longer than {MAX_LINE_BYTES >> 20} MiB, longer than any "
                        "record: a file without line breaks, or a damaged one"
                    )
                yield line_number, raw
    except _decompression_errors() as error:
        raise _damaged(path, line_number + 1, error) from error


def read_bytes(path: Path) -> bytes:
    """The whole file, decompressed (a `.json` array or a whole-file `.txt` document)."""
    chunks: list[bytes] = []
    try:
        with open_binary(path) as stream:
            while chunk := stream.read(1 << 20):
                chunks.append(chunk)
    except _decompression_errors() as error:
        raise _damaged(path, b"".join(chunks).count(b"\n") + 1, error) from error
    return b"".join(chunks)


def first_byte(path: Path) -> bytes:
    """The first byte of the file's content that is not white space or a byte-order mark (b'' if none)."""
    try:
        with open_binary(path) as stream:
            head = stream.read(4096)
            while head:
                stripped = head.removeprefix(b"\xef\xbb\xbf").lstrip()
                if stripped:
                    return stripped[:1]
                head = stream.read(4096)
    except _decompression_errors() as error:
        raise _damaged(path, 1, error) from error
    return b""


def holds_nothing(path: Path) -> bool:
    """Whether a data file is empty: nothing but white space once decompressed, or a Parquet file of no rows. Reads
    the file's head only (the rest of a file of white space). A saved dataset (a directory) is not checked."""
    if path.is_dir():
        return False
    if logical_suffix(path) == PARQUET_SUFFIX:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            return pq.read_metadata(path).num_rows == 0
        except (pa.ArrowException, OSError) as e:
            raise DatasetError(f"{path}: not a readable Parquet file ({e})") from e
    return first_byte(path) == b""


def is_json_lines(path: Path) -> bool:
    """A `.jsonl` file, or a compressed `.json` file of one record per line: C4's shards and many dataset
    repositories name their JSON Lines files `.json.gz`. A compressed `.json` whose first line is not a whole JSON
    object (a pretty-printed document) is one JSON value, read as `.json` files are: read as JSON Lines, each of its
    lines would be an error of its own, none saying what the file is."""
    suffix = logical_suffix(path)
    if suffix == ".jsonl":
        return True
    if suffix != ".json" or compression(path) is None or first_byte(path) != b"{":
        return False
    for _, raw in iter_lines(path):
        if raw.strip():
            try:
                return isinstance(json.loads(raw.removeprefix(b"\xef\xbb\xbf")), dict)
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
                return False
    return False


def iter_parquet_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """`(row number, record)` of a Parquet file, 1-based, read one row group at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DatasetError(f"{path}: not a readable Parquet file ({e})") from e
    row = 0
    with parquet:
        for group in range(parquet.num_row_groups):
            try:
                rows = parquet.read_row_group(group).to_pylist()
            except (pa.ArrowException, OSError) as e:
                raise DataFormatError(path, row + 1, None, f"cannot read row group {group} ({e})") from e
            for record in rows:
                row += 1
                yield row, record
