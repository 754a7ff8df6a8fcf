"""Loading the tokenizer that the data module and the model share."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from pandallm.errors import ModelError
from pandallm.special_tokens import SpecialTokens, apply_special_tokens

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# The files a LLaMA-family tokenizer keeps its vocabulary in: `tokenizer.json` (tokenizers) or `tokenizer.model`
# (sentencepiece). `tokenizer_config.json` alone holds none: transformers then builds a tokenizer of the special
# tokens only, which encodes every text as nothing.
VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model")
# Text any tokenizer fit to train on encodes into some ids.
ORDINARY_TEXT = "The quick brown fox jumps over the lazy dog."


@lru_cache(maxsize=4)
def _gguf_tokenizer(path: str, mtime_ns: int) -> PreTrainedTokenizerBase:
    # Converting a GGUF vocabulary takes seconds, and the model and the data module both read it: convert once.
    # `mtime_ns` is part of the key, so a replaced file is read again.
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(Path(path).parent), gguf_file=Path(path).name, trust_remote_code=False)


def load_tokenizer(name_or_path: str, special_tokens: SpecialTokens | None = None) -> PreTrainedTokenizerBase:
    """`_load_tokenizer`'s tokenizer, with the special-token overrides of `special_tokens` (`model.special_tokens`)."""
    return apply_special_tokens(_load_tokenizer(name_or_path), special_tokens)


def _load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """A Hugging Face tokenizer from a directory, a hub id, a bare sentencepiece `.model` file, or a `.gguf` file
    (GGUF files carry their tokenizer and chat template).

    A directory holding only a sentencepiece `tokenizer.model` (the original LLaMA release) is loaded as
    `LlamaTokenizer`, which reproduces sentencepiece exactly; `AutoTokenizer` alone would guess a generic
    tokenizer there that splits words differently.

    A tokenizer that cannot encode text (`check_usable`), or a model directory's tokenizer far smaller than its
    model (`check_fits`), is refused here, before anything is tokenized or built with it.
    """
    # Imported here: the tool commands that import this module answer `--help` without transformers.
    from transformers import AutoTokenizer, LlamaTokenizer

    path = Path(name_or_path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"tokenizer '{name_or_path}': no such GGUF file")
        return check_usable(_gguf_tokenizer(str(path.resolve()), path.stat().st_mtime_ns), name_or_path)
    if path.suffix == ".model":
        if not path.is_file():
            raise ModelError(f"tokenizer '{name_or_path}': no such file")
        return check_usable(LlamaTokenizer.from_pretrained(str(path.parent), vocab_file=str(path)), name_or_path)
    if path.is_dir():
        if (path / "tokenizer.model").is_file() and not (path / "tokenizer_config.json").is_file():
            return check_usable(LlamaTokenizer.from_pretrained(str(path)), name_or_path)
        if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
            raise ModelError(
                f"tokenizer '{name_or_path}': the directory holds no tokenizer "
                "(tokenizer.json, tokenizer_config.json or tokenizer.model)"
            )
    elif name_or_path.startswith((".", "/")) or path.exists():
        raise ModelError(f"tokenizer '{name_or_path}': no such directory")
    try:
        # Never the code a tokenizer directory or hub repository ships (`auto_map`): transformers would otherwise ask
        # on the terminal whether to run it, and a "y" would run it.
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise ModelError(f"tokenizer '{name_or_path}' could not be loaded: {e}") from e
    check_usable(tokenizer, name_or_path)
    if path.is_dir() and (path / "config.json").is_file():  # a model directory: its tokenizer must fit its model
        vocab_size = json.loads((path / "config.json").read_text(encoding="utf-8")).get("vocab_size")
        if isinstance(vocab_size, int):
            check_fits(tokenizer, name_or_path, vocab_size, f"model '{name_or_path}'")
    return tokenizer


def _missing_vocabulary(name_or_path: str) -> str:
    path = Path(name_or_path)
    if not path.is_dir():
        return ""
    held = sorted(p.name for p in path.iterdir() if p.is_file() and p.name.startswith(("tokenizer", "special")))
    missing = [name for name in VOCABULARY_FILES if not (path / name).is_file()]
    return f": the directory holds {held} but not {' or '.join(missing)}, the file that holds the vocabulary"


def padding_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id rows are padded with. Any id works for training (padding is masked out of the loss by the labels, not
    by this id); a reward model reads its score at the last token that is not this id, as transformers does."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def check_usable(tokenizer: PreTrainedTokenizerBase, name_or_path: str) -> PreTrainedTokenizerBase:
    """`tokenizer`, if it can encode ordinary text: a vocabulary beyond its special tokens, and some ids for a
    plain English sentence. Training with one that cannot would turn every row into special tokens alone."""
    ordinary = len(tokenizer) - len(tokenizer.added_tokens_decoder)
    ids = tokenizer(ORDINARY_TEXT, add_special_tokens=False)["input_ids"]
    if ordinary > 0 and ids:
        return tokenizer
    raise ModelError(
        f"tokenizer '{name_or_path}' cannot encode text (its {len(tokenizer)} tokens are all special: "
        f"{', '.join(map(str, tokenizer.all_special_tokens))}; {ORDINARY_TEXT!r} encodes as {ids})"
        f"{_missing_vocabulary(name_or_path)}; give a tokenizer directory with its vocabulary "
        f"({' or '.join(VOCABULARY_FILES)}), a sentencepiece .model file or a .gguf file"
    )


def check_fits(tokenizer: PreTrainedTokenizerBase, name_or_path: str, vocab_size: int, model: str) -> None:
    """Refuse a tokenizer far smaller than the model's vocabulary: it is another model's tokenizer (or a broken
    one), and the model's ids would mean other pieces. A tokenizer somewhat smaller is normal (checkpoints pad their
    embeddings to a multiple of 64 or 128); a larger one grows the embeddings."""
    if len(tokenizer) * 2 < vocab_size:
        raise ModelError(
            f"tokenizer '{name_or_path}' has {len(tokenizer)} tokens, far fewer than the {vocab_size} of {model}: it "
            "is not that model's tokenizer; set model.tokenizer to the tokenizer the model was trained with"
        )
