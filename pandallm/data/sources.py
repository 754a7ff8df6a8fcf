"""Which files each split reads, grouped into sources: the unit that `data.mix_ratios` weighs."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from pandallm.data.records import RecordKind, find_data_files
from pandallm.errors import DatasetError

# A source's files, each with its kind where the option that names it says it (None: detected from the fields).
Files = list[tuple[RecordKind | None, Path]]
DIR_OPTIONS: dict[RecordKind, str] = {
    "instruction": "instruction_tuning_data_dir",
    "pretraining": "pretraining_data_dir",
}


def training_sources(data_dirs: Mapping[RecordKind, str | None], train_files: Iterable[str]) -> dict[str, Files]:
    """The training sources, by the name `mix_ratios` knows them by (as written in the config), with their files:
    each data directory, then each `train_files` entry (a file, a directory, or a saved dataset)."""
    sources: dict[str, Files] = {}
    for kind, directory in data_dirs.items():
        if directory is not None:
            found = find_data_files(directory, DIR_OPTIONS[kind], text=kind == "pretraining")
            sources[directory] = [(kind, path) for path in found]
    for entry in train_files:
        if entry in sources:
            raise DatasetError(f"data.train_files: '{entry}' is listed twice")
        path = Path(entry)
        if path.is_dir():
            sources[entry] = [(None, found) for found in find_data_files(path, "train_files", text=True)]
        elif path.is_file():
            sources[entry] = [(None, path)]
        else:
            raise DatasetError(f"data.train_files: '{entry}': no such file or directory")
    return sources


def evaluation_files(option: str, names: Iterable[str]) -> Files:
    """`val_files` / `test_files`: files or saved datasets of either kind."""
    for name in names:
        if not Path(name).exists():
            raise DatasetError(f"data.{option}: '{name}': no such file or saved dataset")
    return [(None, Path(name)) for name in names]


def ordered_ratios(mix_ratios: Mapping[str, float] | None, names: list[str]) -> tuple[float, ...] | None:
    """`mix_ratios` in the order of the training sources `names`, checked against them."""
    if mix_ratios is None:
        return None
    unknown = [key for key in mix_ratios if key not in names]
    missing = [name for name in names if name not in mix_ratios]
    if unknown or missing:
        raise DatasetError(
            f"data.mix_ratios must name each training source once: unknown {unknown}, missing {missing} "
            f"(the sources: {names})"
        )
    return tuple(float(mix_ratios[name]) for name in names)


def held(note: dict, unit: str) -> float:
    """What a source's rows hold in `unit` (`data.mix_unit`), from its notes (`pandallm.data.summary`): its records
    (of every kind, as read), its tokens, or its rows."""
    if unit == "records":
        return sum(note.get("records", {}).values())
    return note.get("tokens", 0) if unit == "tokens" else note.get("rows", 0)


def row_ratios(ratios: tuple[float, ...] | None, unit: str, groups: list[dict]) -> tuple[float, ...] | None:
    """`ratios` of `unit` as shares of rows, which the training order draws. A source whose rows hold k records
    (packed rows, or pretraining blocks) on average needs 1/k rows per record: `records` shares become row shares
    ratio_i * rows_i / records_i, and `tokens` shares ratio_i * rows_i / tokens_i. `groups`: the sources' notes."""
    if ratios is None or unit == "rows":
        return ratios
    return tuple(
        ratio * note.get("rows", 0) / held(note, unit) if held(note, unit) else 0.0
        for ratio, note in zip(ratios, groups, strict=True)
    )
