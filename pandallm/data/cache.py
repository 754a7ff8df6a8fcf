"""A tokenized-dataset cache keyed by content: the bytes of the data files, the tokenizer and the settings.

A second run with the same inputs loads Arrow files (memory-mapped) instead of tokenizing again; changing any
data file, the tokenizer or a setting gives a new key. Entries are written under a temporary name and renamed
last, so a run killed while tokenizing never leaves a half-written entry that a later run would trust. An entry also
keeps the counts of its building (`NOTES_FILE`: records read, over-long and malformed ones), so that a run that
reuses it reports what the data became as the run that built it did.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from datasets import DatasetDict, load_from_disk
from transformers import PreTrainedTokenizerBase

from pandallm.console import no_progress_bars
from pandallm.writable import full_disk, size, write_error

# Bump when the encoding rules change, so that caches built by an older pandallm are not reused.
# 3: entries keep their notes (`NOTES_FILE`).
FORMAT_VERSION = 3
NOTES_FILE = "pandallm_notes.json"


def file_digest(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def source_digest(path: str | Path) -> str:
    """`file_digest` of a file; of a directory (a saved dataset), a digest of every file's name and bytes."""
    path = Path(path)
    if not path.is_dir():
        return file_digest(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(path)}\0{file_digest(file)}\0".encode())
    return digest.hexdigest()


def tokenizer_digest(tokenizer: PreTrainedTokenizerBase) -> str:
    """A digest of everything that decides how text becomes ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        vocabulary = backend.to_str()
    else:  # a Python-only tokenizer: its vocabulary is the best description we have
        vocabulary = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    described = {
        "class": type(tokenizer).__name__,
        "vocabulary": hashlib.sha256(vocabulary.encode()).hexdigest(),
        "special": {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id},
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def cache_key(parts: dict) -> str:
    described = json.dumps({"format": FORMAT_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(described.encode()).hexdigest()[:24]


def _bytes_under(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file()) if directory.is_dir() else 0


def load_or_build(cache_dir: str | Path, key: str, build: Callable[[Path], DatasetDict]) -> DatasetDict:
    """Load the entry `key`, building it with `build(scratch_dir)` first if it is not there."""
    return load_or_build_with_notes(cache_dir, key, lambda scratch: (build(scratch), {}))[0]


def load_or_build_with_notes(
    cache_dir: str | Path, key: str, build: Callable[[Path], tuple[DatasetDict, dict]]
) -> tuple[DatasetDict, dict]:
    """Load the entry `key` and the notes stored with it, building both with `build(scratch_dir)` first if it is not
    there. The notes (a JSON object) come back with `"built": True` from the run that built the entry."""
    cache_dir = Path(cache_dir)
    entry = cache_dir / key
    if (entry / "dataset_dict.json").is_file():
        return load_from_disk(str(entry)), _read_notes(entry)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".{key}.tmp-{os.getpid()}"
    scratch = cache_dir / f".{key}.scratch-{os.getpid()}"
    try:
        datasets, notes = build(scratch)
        with no_progress_bars():  # a bar per split of a cache entry, for a step of a second
            datasets.save_to_disk(str(tmp))
        (tmp / NOTES_FILE).write_text(json.dumps(notes, sort_keys=True), encoding="utf-8")
        try:
            tmp.rename(entry)
        except OSError:
            if not (entry / "dataset_dict.json").is_file():  # not a concurrent writer that got there first
                raise
    except Exception as e:
        # `datasets` reports a full disk as `DatasetGenerationError: An error occurred while generating the dataset`.
        full = full_disk(e)
        if full is None:
            raise
        written = _bytes_under(tmp) + _bytes_under(scratch)
        needed = f"the tokenized data needs more than the {size(written)} written" if written else None
        raise write_error("data.cache_dir", cache_dir, full, needed) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)
    return load_from_disk(str(entry)), {**_read_notes(entry), "built": True}


def _read_notes(entry: Path) -> dict:
    try:
        return json.loads((entry / NOTES_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # written by `load_or_build`, without notes
        return {}
