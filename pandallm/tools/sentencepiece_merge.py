"""Merging sentencepiece models at the level of their `ModelProto`: the base tokenizer's pieces keep their ids, new
pieces and user-defined symbols are appended (the vocabulary extension of Chinese-LLaMA-Alpaca's merge_tokenizers).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm
from google.protobuf.message import DecodeError
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from pandallm.errors import ConfigError, ModelError

Piece = sp_pb2.ModelProto.SentencePiece
# The normalization rules sentencepiece can train with by name; a base with custom rules trains the new model with
# `identity`.
_NAMED_RULES = ("nmt_nfkc", "nfkc", "nmt_nfkc_cf", "nfkc_cf", "identity")


def sentencepiece_file(base: str) -> Path:
    """The sentencepiece model file of a base tokenizer: a `.model` file, or a directory's `tokenizer.model`."""
    path = Path(base)
    if path.suffix == ".model":
        if not path.is_file():
            raise ModelError(f"--base_tokenizer '{base}': no such file")
        return path
    if not path.is_dir():
        raise ModelError(f"--base_tokenizer '{base}': no such directory (give a local tokenizer directory or .model)")
    if (path / "tokenizer.model").is_file():
        return path / "tokenizer.model"
    found = sorted(p.name for p in path.iterdir() if p.name.startswith("tokenizer"))
    raise ModelError(
        f"--base_tokenizer '{base}' is not sentencepiece-based: it has no tokenizer.model (found: "
        f"{', '.join(found) or 'nothing'}). extend-vocab edits the sentencepiece model of LLaMA 1/2, Chinese-LLaMA or "
        "Mistral: give the directory or .model file it came with (transformers 5 does not save it again). "
        "Byte-level BPE tokenizers (Llama 3, SmolLM2, GPT-2) have none and cannot be extended this way"
    )


def load_model_proto(path: Path) -> sp_pb2.ModelProto:
    """A sentencepiece BPE `ModelProto` read from `path`."""
    proto = sp_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except DecodeError as e:
        raise ModelError(f"--base_tokenizer '{path}' is not a sentencepiece model ({e})") from e
    if not proto.pieces:  # protobuf parses many non-model files as an empty message rather than failing
        raise ModelError(f"--base_tokenizer '{path}' is not a sentencepiece model (it holds no pieces)")
    if proto.trainer_spec.model_type != sp_pb2.TrainerSpec.BPE:
        kind = sp_pb2.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type)
        raise ModelError(
            f"--base_tokenizer '{path}' is a sentencepiece {kind} model; extend-vocab merges into BPE models "
            "(LLaMA's), whose merge order the appended pieces can extend"
        )
    return proto


def train_like(base: sp_pb2.ModelProto, lines: list[str], vocab_size: int) -> sp_pb2.ModelProto:
    """A sentencepiece BPE model trained on `lines`, normalizing and splitting text as `base` does, so that its
    pieces are ones the base's encoder can produce."""
    normalizer = base.normalizer_spec
    rule = normalizer.name if normalizer.name in _NAMED_RULES else "identity"
    with tempfile.TemporaryDirectory(prefix="pandallm-extend-vocab-") as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("\n".join(lines), encoding="utf-8")
        try:
            spm.SentencePieceTrainer.train(
                input=str(corpus),
                model_prefix=str(Path(tmp) / "new"),
                vocab_size=vocab_size,
                model_type="bpe",
                character_coverage=0.9995,
                normalization_rule_name=rule,
                add_dummy_prefix=normalizer.add_dummy_prefix,
                remove_extra_whitespaces=normalizer.remove_extra_whitespaces,
                split_digits=base.trainer_spec.split_digits,
                split_by_whitespace=base.trainer_spec.split_by_whitespace,
                max_sentence_length=1 << 20,  # long paragraphs are common in corpora; the default skips them
                num_threads=1,  # one thread: the same pieces on every machine
                minloglevel=2,
            )
        except RuntimeError as e:
            # e.g. "Vocabulary size too high (50000). Please set it to a value <= 27239."
            reason = str(e).split("] ")[-1]
            raise ConfigError(f"--vocab_size {vocab_size}: sentencepiece cannot train on this corpus: {reason}") from e
        return load_model_proto(Path(tmp) / "new.model")


@dataclass(frozen=True)
class MergeCounts:
    added: int
    duplicates: int


def append_pieces(base: sp_pb2.ModelProto, new: sp_pb2.ModelProto) -> MergeCounts:
    """Append `new`'s normal pieces that `base` lacks (in `new`'s order) to `base`, in place.

    Chinese-LLaMA-Alpaca gives every appended piece the score 0. Sentencepiece applies BPE merges by score, so that
    would make them outrank the base's merges, while transformers (converting `tokenizer.model`) ranks merges by id,
    where they come last: the two would tokenize differently. Scores below the base's lowest, decreasing in id
    order, make both apply merges in the same order: the base's first, then the new ones in the order they were
    learned.
    """
    have = {piece.piece for piece in base.pieces}
    score = min(piece.score for piece in base.pieces)
    added = duplicates = 0
    for piece in new.pieces:
        if piece.type != Piece.NORMAL:  # <unk>, <s>, </s>, byte pieces: the base has its own
            continue
        if piece.piece in have:
            duplicates += 1
            continue
        score -= 1.0
        base.pieces.append(Piece(piece=piece.piece, score=score, type=Piece.NORMAL))
        have.add(piece.piece)
        added += 1
    return MergeCounts(added, duplicates)


def append_symbols(base: sp_pb2.ModelProto, symbols: list[str]) -> MergeCounts:
    """Append `symbols` as user-defined pieces, which sentencepiece and transformers always keep as one token."""
    have = {piece.piece for piece in base.pieces}
    added = duplicates = 0
    for symbol in symbols:
        if symbol in have:
            duplicates += 1
            continue
        base.pieces.append(Piece(piece=symbol, score=0.0, type=Piece.USER_DEFINED))
        have.add(symbol)
        added += 1
    return MergeCounts(added, duplicates)


def append_added_tokens(base: sp_pb2.ModelProto, tokens: list[tuple[int, str, bool]], where: str) -> None:
    """Make the base HF tokenizer's added tokens (`(id, content, special)`, ids past the sentencepiece model, e.g. a
    `<pad>` at 32000) pieces at the same ids, so that appended pieces do not take their ids."""
    for token_id, content, special in sorted(tokens):
        if token_id != len(base.pieces):
            raise ModelError(
                f"--base_tokenizer '{where}': added token {content!r} has id {token_id}, but the next free id after "
                f"the sentencepiece model is {len(base.pieces)}; only tokens that follow it without gaps can be kept"
            )
        base.pieces.append(Piece(piece=content, score=0.0, type=Piece.CONTROL if special else Piece.USER_DEFINED))


def read_symbols(path: str) -> list[str]:
    """The user-defined symbols of a JSON file holding a list of strings, each without whitespace, or LLMBox's
    `user_defined_symbols.json` layout, `{"list": [...]}`."""
    file = Path(path)
    if not file.is_file():
        what = "a directory, not the JSON file of symbols" if file.is_dir() else "no such file"
        raise ConfigError(f"--user_symbols '{path}': {what}")
    example = 'expected a JSON list of strings, e.g. ["<tool>", "深度学习"], or {"list": [...]} as LLMBox writes it'
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f"{path}:{e.lineno}" if isinstance(e, json.JSONDecodeError) else path
        raise ConfigError(f"--user_symbols {where}: not valid JSON ({e}); {example}") from e
    if isinstance(value, dict) and set(value) == {"list"}:
        value = value["list"]
    if not isinstance(value, list):
        raise ConfigError(f"--user_symbols '{path}': holds a {type(value).__name__}; {example}")
    for index, symbol in enumerate(value):
        if not isinstance(symbol, str) or not symbol:
            raise ConfigError(
                f"--user_symbols '{path}': entry {index} ({json.dumps(symbol)}) is not a non-empty string; {example}"
            )
        # Sentencepiece turns spaces into "▁" before matching symbols: one with whitespace would never match.
        if any(ch.isspace() for ch in symbol):
            raise ConfigError(
                f"--user_symbols '{path}': entry {index} ({json.dumps(symbol, ensure_ascii=False)}) "
                "contains whitespace, which a user-defined symbol cannot match"
            )
    return value
