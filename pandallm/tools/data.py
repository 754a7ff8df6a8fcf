"""`pandallm data check` and `pandallm data stats`: look at data files before training on them.

    pandallm data check dataset/instruction_tuning dataset/formats/sharegpt_en_zh.jsonl
    pandallm data check --kind instruction dataset/instruction_tuning    # as data.instruction_tuning_data_dir reads it
    pandallm data stats dataset/instruction_tuning --tokenizer dataset/tokenizer --template chatml

`check` reads every record as training would, and lists every error (file:line, field), not just the first; it
exits with status 1 if there is any. With `--tokenizer`, it also renders every conversation with the template, as
some templates refuse some conversations (llama-2 needs alternating turns). With `--kind`, a record of the other
kind is an error too, as training reports it for a file in the wrong data directory. `stats` counts records per format
and reports token lengths as training would encode them (template included, before truncation): min, mean,
median, 95th percentile, max, and the share over `--max_seq_length` of instruction records (which training cuts) and
of documents (which it packs across blocks) apart; `--histogram FILE` saves a PNG of the lengths. Its figures are
those of the valid records; like `check`, it lists every error and exits with status 1 if there is any.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections import Counter
from pathlib import Path
from typing import get_args

from pandallm.data.formats import FORMATS, RecordKind
from pandallm.data.records import Record, find_data_files, is_saved_dataset, read_records
from pandallm.data.summary import LABELS
from pandallm.data.template import render_record, resolve_template
from pandallm.errors import ConfigError, DataFormatError, DatasetError, PandaError


def expand(names: list[str], errors: list[PandaError]) -> list[Path]:
    """Files as given; directories (other than saved datasets) as the sources under them. A path that does not exist,
    and a directory with no sources or with unreadable ones, is an error among the others (`errors`), not the end of
    the check."""
    paths: list[Path] = []
    for name in names:
        path = Path(name)
        if not path.exists():
            errors.append(DatasetError(f"{path}: no such file or directory"))
            print(f"{path}: missing", file=sys.stderr)
            continue
        if not path.is_dir() or is_saved_dataset(path):
            paths.append(path)
            continue
        try:
            paths += find_data_files(path, "data", text=True)
        except DatasetError as error:  # a directory without sources, or with unreadable ones: listed, as above
            errors.append(error)
            print(f"{path}: unreadable", file=sys.stderr)
    return paths


def read_all(
    files: list[str], format: str, txt_split: str, kind: RecordKind | None, tokenizer, chosen, errors: list[PandaError]
) -> list[Record]:
    """The valid records of `files`, as training reads them (and renders them, with a tokenizer); every error goes to
    `errors`, and a summary line per file to stderr."""
    valid: list[Record] = []
    for path in expand(files, errors):
        found: list[DataFormatError] = []
        try:
            _, records = read_records(path, kind, found, format, txt_split)
        except PandaError as error:  # a broken .json array, a file with no records: nothing more can be read
            errors += found  # the records' own errors, which may be why no record is left
            errors.append(error)
            print(f"{path}: unreadable", file=sys.stderr)
            continue
        if tokenizer is not None:
            rendered = []
            for record in records:
                try:
                    if record.kind == "preference":
                        from pandallm.data.pairs import render_pair  # torch and datasets: only for pairs

                        render_pair(record, chosen, tokenizer)
                    elif record.turns:
                        render_record(record, chosen, tokenizer)
                    rendered.append(record)
                except DataFormatError as error:
                    found.append(error)
            records = rendered
        errors += found
        valid += records
        formats = Counter(r.format for r in records)
        print(f"{path}: {len(records)} valid records ({_counts(formats)}), {len(found)} errors", file=sys.stderr)
    return valid


def _print_errors(errors: list[PandaError]) -> None:
    for error in errors:
        print(error)
    print(f"{len(errors)} errors", file=sys.stderr)


def check(
    files: list[str],
    format: str = "auto",
    txt_split: str = "file",
    kind: RecordKind | None = None,
    tokenizer: str | None = None,
    template: str = "auto",
    template_dir: str | None = None,
) -> list[PandaError]:
    """Every error in `files`, each printed with its file and line; a per-file summary of the valid records."""
    errors: list[PandaError] = []
    chosen, loaded = None, None
    if tokenizer is None and (template != "auto" or template_dir is not None):
        raise ConfigError("--template and --template_dir render records with a tokenizer: give --tokenizer too")
    if tokenizer is not None:
        from pandallm.tokenizer import load_tokenizer  # transformers: only where a tokenizer is used

        loaded = load_tokenizer(tokenizer)
        chosen = resolve_template(template, loaded, template_dir)
    read_all(files, format, txt_split, kind, loaded, chosen, errors)
    _print_errors(errors)
    return errors


def token_lengths(records: list[Record], tokenizer, chosen) -> dict[str, list[int]]:
    """The length of each record as training encodes it, before truncation, by kind (`instruction`, `preference`: a
    pair's longer side, `pretraining`; judged completions under their own kind)."""
    from pandallm.data.tokenize import AS_TEXT, encode_segments, special_ids  # `datasets`: only where it is needed

    def encoded(rendered: list) -> list[int]:
        return [
            len(head) + sum(len(ids) for ids, _ in segments)
            for head, segments, _ in encode_segments(rendered, tokenizer)
        ]

    lengths: dict[str, list[int]] = {}
    for kind in sorted({r.kind for r in records if r.turns and r.kind != "preference"}):
        lengths[kind] = encoded([render_record(r, chosen, tokenizer) for r in records if r.turns and r.kind == kind])
    pairs = [r for r in records if r.kind == "preference"]
    if pairs:
        from pandallm.data.pairs import render_pair

        sides = encoded([side for r in pairs for side in render_pair(r, chosen, tokenizer)])
        lengths["preference"] = [max(pair) for pair in zip(sides[::2], sides[1::2], strict=True)]
    documents = [r.text for r in records if not r.turns]
    if documents:
        bos_id, _ = special_ids(tokenizer)
        extra = 1 if bos_id is None else 2  # [BOS] text [EOS]
        lengths["pretraining"] = [len(ids) + extra for ids in tokenizer(documents, **AS_TEXT)["input_ids"]]
    return lengths


def stats(
    files: list[str],
    tokenizer: str,
    template: str = "auto",
    template_dir: str | None = None,
    format: str = "auto",
    txt_split: str = "file",
    kind: RecordKind | None = None,
    max_seq_length: int = 2048,
    histogram: str | None = None,
) -> dict:
    """Record counts per format and token-length statistics of the valid records of `files`, the share longer than
    `max_seq_length` of each kind, and the errors; the length histogram is saved to `histogram` if given."""
    from pandallm.tokenizer import load_tokenizer

    if histogram is not None and (Path(histogram).is_dir() or Path(histogram).suffix.lower() != ".png"):
        # matplotlib appends `.png` to a path without a suffix (`--histogram runs/x` wrote `runs/x.png` and printed
        # `runs/x`) and refuses other suffixes with a traceback, after every record was read.
        raise ConfigError(f"--histogram '{histogram}': give the path of a .png file to write")
    loaded = load_tokenizer(tokenizer)
    chosen = resolve_template(template, loaded, template_dir)
    errors: list[PandaError] = []
    records = read_all(files, format, txt_split, kind, loaded, chosen, errors)
    by_kind = token_lengths(records, loaded, chosen)
    lengths = [n for of_kind in by_kind.values() for n in of_kind]
    report: dict = {"records": len(records), "formats": dict(Counter(r.format for r in records)), "errors": errors}
    print(f"records: {len(records)} ({_counts(Counter(report['formats']))})")
    if lengths:
        ordered = sorted(lengths)
        report.update(
            min=ordered[0],
            mean=statistics.fmean(ordered),
            median=statistics.median(ordered),
            p95=ordered[math.ceil(0.95 * len(ordered)) - 1],  # nearest rank
            max=ordered[-1],
        )
        print(
            f"tokens per record: min {report['min']}, mean {report['mean']:.1f}, median {report['median']:g}, "
            f"p95 {report['p95']}, max {report['max']}"
        )
    # What training does with a record longer than a row differs by kind: an instruction record (or a pair) is cut or
    # dropped, a document is packed across blocks and loses nothing.
    cut = "training cuts their prompts from the left (data.overlong_records: truncate) or leaves them out (drop)"
    packed = "documents are packed into blocks of max_seq_length: these span several blocks, nothing is cut"
    for name, of_kind in by_kind.items():
        over = sum(n > max_seq_length for n in of_kind)
        report[f"{name}_over_max_seq_length"] = over / len(of_kind)
        print(
            f"{LABELS.get(name, name)} over max_seq_length={max_seq_length}: {over} of {len(of_kind)} "
            f"({over / len(of_kind):.1%})" + (f"; {packed if name == 'pretraining' else cut}" if over else "")
        )
    if histogram is not None and lengths:
        report["histogram"] = str(save_histogram(sorted(lengths), max_seq_length, Path(histogram)))
        print(f"histogram: {report['histogram']}")
    if errors:
        _print_errors(errors)
    return report


def save_histogram(lengths: list[int], max_seq_length: int, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display: write the file only
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    axes.hist(lengths, bins=min(50, max(len(set(lengths)), 1)), color="#4c72b0")
    axes.axvline(max_seq_length, color="#c44e52", linestyle="--", label=f"max_seq_length={max_seq_length}")
    axes.set_xlabel("tokens per record")
    axes.set_ylabel("records")
    axes.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)
    return path


def _counts(counter: Counter) -> str:
    return ", ".join(f"{name} {n}" for name, n in sorted(counter.items())) or "none"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pandallm data", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, function in (("check", check), ("stats", stats)):
        sub = commands.add_parser(name, help=function.__doc__.split("\n")[0])
        sub.add_argument("files", nargs="+", help="Data files, saved datasets, or directories of them.")
        sub.add_argument("--format", choices=["auto", *FORMATS], default="auto", help="Record format of every file.")
        sub.add_argument("--txt_split", choices=["file", "paragraph"], default="file")
        sub.add_argument(
            "--kind",
            choices=list(get_args(RecordKind)),
            default=None,
            help="The records every file must hold (default: either kind, per file).",
        )
        sub.add_argument("--tokenizer", required=name == "stats", default=None)
        sub.add_argument("--template", default="auto", help="As data.template.")
        sub.add_argument("--template_dir", default=None)
        if name == "stats":
            sub.add_argument("--max_seq_length", type=int, default=2048)
            sub.add_argument("--histogram", default=None, help="Save a histogram of the lengths to this PNG file.")
    return parser


def main(args: list[str] | None = None) -> None:
    options = vars(build_parser().parse_args(args))
    command = options.pop("command")
    if command == "check":
        if check(**options):
            sys.exit(1)
    elif stats(**options)["errors"]:
        sys.exit(1)
