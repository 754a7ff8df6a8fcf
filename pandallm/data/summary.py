"""What the data became, in words: the lines `PandaDataModule.setup` logs at the start of every run.

They come from the notes stored with the cache entry (`pandallm.data.cache.NOTES_FILE`, written by
`PandaDataModule._build`), so a run that reuses the cache reports the same counts as the run that built it:

    pandallm data: training on 2 sources, 348 rows and 62,768 tokens per epoch (44 batches of 8 rows)
      dataset/instruction_tuning: 222 instruction records -> 222 rows, 30,512 tokens; 63.8% of each epoch's rows
      dataset/pretraining: 80 documents -> 126 blocks of up to 256 tokens, 32,256 tokens; 36.2% of each epoch's rows
    pandallm data: dataset/instruction_tuning: 14 of 222 instruction records are longer than max_seq_length=256; ...

A group's notes: `records` (records read of each kind, malformed ones left out), `overlong` (records of each kind
longer than `max_seq_length`), `rows` and `tokens` (rows stored, and their tokens).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from pandallm.data.sources import held

if TYPE_CHECKING:
    from pandallm.data.sampling import TrainingOrder


def _n(value: float) -> str:
    return f"{round(value):,}"


# How a record of each kind is named in the lines.
LABELS = {
    "instruction": "instruction records",
    "pretraining": "documents",
    "preference": "preference pairs",
    "prompts": "prompts",
    "unpaired": "judged completions",
}


def _records(note: dict) -> str:
    counts = note.get("records", {})
    return " and ".join(f"{_n(n)} {LABELS.get(kind, kind)}" for kind, n in counts.items() if n) or "no records"


def _rows(note: dict, max_seq_length: int, packed: bool) -> str:
    rows = _n(note.get("rows", 0))
    if note.get("records", {}).get("pretraining") or packed:
        return f"{rows} blocks of up to {max_seq_length} tokens"
    return f"{rows} rows"


def training_lines(
    notes: dict,
    files: Mapping[str, Sequence[str]],
    order: TrainingOrder,
    max_seq_length: int,
    packing: bool,
    batch_rows: int,
    mix_unit: str = "rows",
) -> list[str]:
    """The training sources (name -> their files) with their records, rows, tokens and share of each epoch, and the
    epoch's size."""
    names = list(files)
    groups = [notes.get("groups", {}).get(f"train_{i}", {}) for i in range(len(names))]
    counts = order.source_counts(0)
    per_row = [note.get("tokens", 0) / note["rows"] if note.get("rows") else 0.0 for note in groups]
    tokens = sum(count * mean for count, mean in zip(counts, per_row, strict=True))
    mixed = order.ratios is not None
    about = "about " if mixed else ""  # a mixed epoch draws a different subset of each source's rows
    header = (
        f"pandallm data: training on {len(names)} source{'s' if len(names) != 1 else ''}, {_n(order.length)} rows "
        f"and {about}{_n(tokens)} tokens per epoch ({_n(math.ceil(order.length / batch_rows))} batches of "
        f"{batch_rows} rows)"
    )
    lines = [header]
    # With `data.mix_unit: records` or `tokens`, the share of that unit too: what the ratios were given as.
    per_row_held = [held(note, mix_unit) / note["rows"] if note.get("rows") else 0.0 for note in groups]
    unit_total = sum(count * per_row for count, per_row in zip(counts, per_row_held, strict=True))
    for name, note, count, per_row in zip(names, groups, counts, per_row_held, strict=True):
        share = count / order.length if order.length else 0.0
        drawn = f"; {share:.1%} of each epoch's rows"
        if mixed and mix_unit != "rows" and unit_total:
            drawn += f", about {count * per_row / unit_total:.1%} of its {mix_unit}"
        if mixed:
            drawn += f" ({_n(count)} drawn per epoch)"
        lines.append(
            f"  {name}: {_records(note)} -> {_rows(note, max_seq_length, packing)}, {_n(note.get('tokens', 0))} "
            f"tokens{drawn}"
        )
        if [name] != list(files[name]):  # a directory: which files it held (it may hold more, or fewer, than meant)
            shown = ", ".join(files[name][:5]) + (f", ... ({len(files[name])} files)" if len(files[name]) > 5 else "")
            lines.append(f"    files: {shown}")
    if packing and mixed and mix_unit == "rows":
        lines.append(
            "  with data.packing, data.mix_ratios are shares of packed blocks, not of records: "
            "data.mix_unit: records (or tokens) mixes by those"
        )
    return lines


def evaluation_line(notes: dict, split: str) -> str | None:
    """`validation` or `test`: its rows and tokens, if it has any."""
    note = notes.get("groups", {}).get(split)
    if not note or not note.get("rows"):
        return None
    return f"pandallm data: {split}: {_records(note)} -> {_n(note['rows'])} rows, {_n(note.get('tokens', 0))} tokens"


def warning_lines(notes: dict, names: Sequence[str], max_seq_length: int, overlong_records: str) -> list[str]:
    """What a run must know on every start, cache reused or not: over-long records and malformed ones left out."""
    lines = []
    labels = {f"train_{i}": name for i, name in enumerate(names)}
    what = "they are dropped" if overlong_records == "drop" else "their prompts are cut from the left"
    for group, note in notes.get("groups", {}).items():
        for kind, overlong in note.get("overlong", {}).items():
            if overlong:
                lines.append(
                    f"pandallm data: {labels.get(group, group)}: {_n(overlong)} of {_n(note['records'][kind])} "
                    f"{LABELS.get(kind, kind)} are longer than max_seq_length={max_seq_length}; {what} "
                    f"(data.overlong_records: {overlong_records})"
                )
    if notes.get("skipped"):
        examples = "\n  ".join(notes.get("skipped_examples", []))
        more = notes["skipped"] - len(notes.get("skipped_examples", []))
        lines.append(
            f"pandallm data: skipped {_n(notes['skipped'])} of {_n(notes['records'])} records as malformed "
            f"(data.bad_records: skip):\n  {examples}" + (f"\n  ... and {_n(more)} more" if more > 0 else "")
        )
    return lines
