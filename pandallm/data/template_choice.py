"""Several prompt templates for one data set (universal-llm-trainer's multi-template augmentation): each record is
rendered with one of `data.template` and `data.template_choices`, drawn by a seeded rule.

The draw is a pure function of `data.seed` and the record itself (its file's name, its line and its text), not of
a random stream or of the other sources: the same record gets the same template in every run, whatever else the
data holds and in whatever order the sources are read; two copies of a record on different lines may differ. A
resumed run (which rebuilds its rows, or reloads them from the cache
keyed by the templates and the seed) therefore trains on exactly the rows the interrupted run did.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

from pandallm.data.records import Record

T = TypeVar("T")


def draw(record: Record, choices: Sequence[T], seed: int) -> T:
    """The choice for `record`: uniform over `choices`, fixed by `seed` and the record."""
    identity = "\0".join([str(seed), Path(record.path).name, str(record.line), *record.texts])
    digest = hashlib.sha256(identity.encode()).digest()
    return choices[int.from_bytes(digest[:8], "big") % len(choices)]
