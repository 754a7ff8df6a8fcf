"""`pandallm train-tokenizer`: a sentencepiece tokenizer trained on record files, saved in Hugging Face format.

This is how the demo tokenizer in `dataset/tokenizer/` is built:

    pandallm train-tokenizer --inputs '[dataset/instruction_tuning, dataset/pretraining]' --output dataset/tokenizer
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import sentencepiece as spm

from pandallm.data.records import find_data_files, read_records
from pandallm.errors import DatasetError
from pandallm.suggest import tool_cli
from pandallm.tokenizer import load_tokenizer


def corpus_lines(inputs: list[str]) -> list[str]:
    """Every text of every record in `inputs` (files or directories), one line per paragraph."""
    lines: list[str] = []
    for name in inputs:
        path = Path(name)
        files = find_data_files(path, "--inputs") if path.is_dir() else [path]
        for file in files:
            _, records = read_records(file)
            for record in records:
                lines += [line for text in record.texts for line in text.splitlines() if line.strip()]
    if not lines:
        raise DatasetError(f"no text found in {inputs}")
    return lines


def train_tokenizer(
    inputs: list[str] = ["dataset/instruction_tuning", "dataset/pretraining"],  # noqa: B006 (jsonargparse reads it)
    output: str = "dataset/tokenizer",
    vocab_size: int = 3000,
    model_type: str = "bpe",
) -> Path:
    """Train a LLaMA-style sentencepiece tokenizer (BOS 1, EOS 2, UNK 0, byte fallback, no normalization) and save
    it: sentencepiece and transformers' `LlamaTokenizer` read it alike.

    Args:
        inputs: Record files or directories of them (instruction and pretraining records).
        output: Directory to write: `tokenizer.model` plus the Hugging Face tokenizer files.
        vocab_size: Number of pieces.
        model_type: sentencepiece model type (`bpe`, as LLaMA, or `unigram`).
    """
    output_dir = Path(output)
    output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("\n".join(corpus_lines(inputs)), encoding="utf-8")
        spm.SentencePieceTrainer.train(
            input=str(corpus),
            model_prefix=str(output_dir / "tokenizer"),
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=0.9995,
            byte_fallback=True,  # any character still encodes, as bytes
            # LLaMA's normalizer: none. transformers' LlamaTokenizer applies no sentencepiece normalization, so
            # pieces learned on NFKC text (sentencepiece's default) would miss in it: every full-width `，` of
            # Chinese text would become three byte tokens there, and the two tokenizers would disagree.
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            split_digits=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            num_threads=1,  # one thread: the same pieces on every machine
            minloglevel=2,
        )
    (output_dir / "tokenizer.vocab").unlink(missing_ok=True)
    for name in ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json"):
        (output_dir / name).unlink(missing_ok=True)
    load_tokenizer(str(output_dir)).save_pretrained(str(output_dir))
    return output_dir


def main(args: list[str] | None = None) -> None:
    tool_cli(train_tokenizer, args, "pandallm train-tokenizer")
