"""`pandallm extend-vocab`: a LLaMA tokenizer extended with pieces learned from a corpus (Chinese-LLaMA-Alpaca's
vocabulary extension) and with user-defined symbols, saved in Hugging Face format.

    pandallm extend-vocab --base_tokenizer dataset/tokenizer --vocab_size 4000 --output runs/tokenizer_zh \
        --inputs '[dataset/pretraining/baike_zh.jsonl, dataset/instruction_tuning/belle_style_zh.json]'

Training with the result (`model.tokenizer`) grows the embeddings to it before any LoRA wrapping; see README,
"Extending the vocabulary".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pandallm.data.records import find_data_files, read_utf8, suffix
from pandallm.errors import ConfigError, DatasetError
from pandallm.suggest import tool_cli
from pandallm.tokenizer import load_tokenizer
from pandallm.tools.sentencepiece_merge import (
    append_added_tokens,
    append_pieces,
    append_symbols,
    load_model_proto,
    read_symbols,
    sentencepiece_file,
    train_like,
)
from pandallm.tools.train_tokenizer import corpus_lines

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TEXT_SUFFIXES = (".txt",)
RECORD_SUFFIXES = (".json", ".jsonl", ".parquet")  # and compressed: `suffix` sees through .gz / .zst
# Files a previous export may have left in the output directory, which would shadow the new tokenizer.model.
_HF_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def _corpus_files(name: str, option: str) -> list[Path]:
    path = Path(name)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DatasetError(f"{option} '{name}': no such file or directory")
    # The walk training uses: links followed, unreadable sources named. Saved datasets are not corpus files.
    files = [p for p in find_data_files(path, option, text=True) if p.is_file()]
    if not files:
        raise DatasetError(f"{option} '{name}': the directory holds no .txt, .json or .jsonl files")
    return files


def corpus_texts(inputs: list[str], option: str = "--inputs") -> list[str]:
    """The lines of text of `inputs`: plain `.txt` files (each non-blank line) and pandallm record files (each
    paragraph of every field), given as files or directories of them."""
    if not inputs:
        raise DatasetError(f"{option} is empty; give text or record files, or directories of them")
    lines: list[str] = []
    for name in inputs:
        for file in _corpus_files(name, option):
            if suffix(file) in RECORD_SUFFIXES:
                lines += corpus_lines([str(file)])
            elif suffix(file) in TEXT_SUFFIXES:
                lines += [line for line in read_utf8(file).splitlines() if line.strip()]
            else:
                raise DatasetError(
                    f"{file}: unsupported file type '{file.suffix}' (expected .txt, .json, .jsonl or .parquet)"
                )
    if not lines:
        raise DatasetError(f"{option}: no text found in {inputs}")
    return lines


def tokens_per_char(tokenizer: PreTrainedTokenizerBase, lines: list[str]) -> float:
    """Tokens per character of `lines`, without BOS / EOS."""
    num_tokens = sum(len(ids) for ids in tokenizer(lines, add_special_tokens=False)["input_ids"])
    return num_tokens / sum(len(line) for line in lines)


@dataclass(frozen=True)
class VocabReport:
    base_size: int
    merged_size: int
    pieces_added: int
    duplicates_skipped: int
    symbols_added: int
    symbols_skipped: int
    eval_chars: int
    tokens_per_char_before: float
    tokens_per_char_after: float

    def lines(self) -> list[str]:
        change = self.tokens_per_char_after / self.tokens_per_char_before - 1
        return [
            f"vocabulary: {self.base_size} -> {self.merged_size} tokens",
            f"corpus pieces added: {self.pieces_added} ({self.duplicates_skipped} already in the base, skipped)",
            f"user-defined symbols added: {self.symbols_added} ({self.symbols_skipped} already in the base, skipped)",
            f"tokens per character on {self.eval_chars} characters: {self.tokens_per_char_before:.4f} -> "
            f"{self.tokens_per_char_after:.4f} ({change:+.1%})",
        ]


def _save_hf(proto_bytes: bytes, base: PreTrainedTokenizerBase, output: Path, special: dict[str, str]) -> None:
    output.mkdir(parents=True, exist_ok=True)
    for name in _HF_FILES:
        (output / name).unlink(missing_ok=True)
    (output / "tokenizer.model").write_bytes(proto_bytes)
    from transformers import LlamaTokenizer  # here: `--help` answers without transformers

    merged = LlamaTokenizer.from_pretrained(str(output), **special)
    # What the base tokenizer says beyond its vocabulary, kept: its chat template and padding token.
    if getattr(base, "chat_template", None):
        merged.chat_template = base.chat_template
    if base.pad_token is not None and base.pad_token in merged.get_vocab():
        merged.pad_token = base.pad_token
    merged.save_pretrained(str(output))


def extend_vocab(
    inputs: list[str],
    output: str,
    base_tokenizer: str = "dataset/tokenizer",
    vocab_size: int = 20000,
    user_symbols: str | None = None,
    eval_inputs: list[str] | None = None,
) -> VocabReport:
    """Train a sentencepiece BPE model on a corpus, append its new pieces (and user-defined symbols) to a LLaMA
    tokenizer, save the result in Hugging Face format and report tokens per character before and after.

    Every piece of the base keeps its id; a piece already in the base is skipped, never duplicated.

    Args:
        inputs: The corpus: `.txt` files (one sentence or paragraph per line), pandallm record files, or
            directories of them.
        output: Directory to write: `tokenizer.model` plus the Hugging Face tokenizer files.
        base_tokenizer: The sentencepiece-based tokenizer to extend: a directory with a `tokenizer.model` (LLaMA's
            layout), or a `.model` file.
        vocab_size: Pieces of the model trained on the corpus (Chinese-LLaMA-Alpaca: 20000); those the base
            already has are skipped, so fewer are added.
        user_symbols: A JSON file with a list of strings, each added as one token that is never split (e.g.
            `["<tool>", "深度学习"]`).
        eval_inputs: Text (files or directories, as `inputs`) to measure tokens per character on; default: the
            corpus.
    """
    out = Path(output)
    model_file = sentencepiece_file(base_tokenizer)
    if out.resolve() == model_file.parent.resolve():
        raise ConfigError(f"--output '{output}' is the base tokenizer's directory; write the merged one elsewhere")
    symbols = read_symbols(user_symbols) if user_symbols else []
    lines = corpus_texts(inputs)
    eval_lines = corpus_texts(eval_inputs, "--eval_inputs") if eval_inputs else lines

    proto = load_model_proto(model_file)
    special = {
        "unk_token": proto.pieces[proto.trainer_spec.unk_id].piece,
        "bos_token": proto.pieces[proto.trainer_spec.bos_id].piece,
        "eos_token": proto.pieces[proto.trainer_spec.eos_id].piece,
    }
    base = load_tokenizer(str(model_file) if base_tokenizer.endswith(".model") else base_tokenizer)
    base_size = len(base)
    beyond = [(i, t.content, t.special) for i, t in base.added_tokens_decoder.items() if i >= len(proto.pieces)]
    append_added_tokens(proto, beyond, base_tokenizer)

    # Symbols before the corpus pieces: a symbol is skipped only when the base has it, and a corpus piece equal
    # to a symbol is a duplicate, not a second entry.
    symbol_counts = append_symbols(proto, symbols)
    pieces = append_pieces(proto, train_like(proto, lines, vocab_size))
    _save_hf(proto.SerializeToString(), base, out, special)

    merged = load_tokenizer(str(out))
    assert len(merged) == len(proto.pieces), (len(merged), len(proto.pieces))
    report = VocabReport(
        base_size=base_size,
        merged_size=len(merged),
        pieces_added=pieces.added,
        duplicates_skipped=pieces.duplicates,
        symbols_added=symbol_counts.added,
        symbols_skipped=symbol_counts.duplicates,
        eval_chars=sum(len(line) for line in eval_lines),
        tokens_per_char_before=tokens_per_char(base, eval_lines),
        tokens_per_char_after=tokens_per_char(merged, eval_lines),
    )
    print("\n".join(["pandallm extend-vocab: " + str(out), *("  " + line for line in report.lines())]))
    return report


def main(args: list[str] | None = None) -> None:
    tool_cli(extend_vocab, args, "pandallm extend-vocab", as_positional=False)
