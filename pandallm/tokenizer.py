"""Loading the tokenizer that the data module and the model share."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from transformers import AutoTokenizer, LlamaTokenizer, PreTrainedTokenizerBase

from pandallm.errors import ModelError


@lru_cache(maxsize=4)
def _gguf_tokenizer(path: str, mtime_ns: int) -> PreTrainedTokenizerBase:
    # Converting a GGUF vocabulary takes seconds, and the model and the data module both read it: convert once.
    # `mtime_ns` is part of the key, so a replaced file is read again.
    return AutoTokenizer.from_pretrained(str(Path(path).parent), gguf_file=Path(path).name)


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """A Hugging Face tokenizer from a directory, a hub id, a bare sentencepiece `.model` file, or a `.gguf` file
    (GGUF files carry their tokenizer and chat template).

    A directory holding only a sentencepiece `tokenizer.model` (the original LLaMA release) is loaded as
    `LlamaTokenizer`, which reproduces sentencepiece exactly; `AutoTokenizer` alone would guess a generic
    tokenizer there that splits words differently.
    """
    path = Path(name_or_path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"tokenizer '{name_or_path}': no such GGUF file")
        return _gguf_tokenizer(str(path.resolve()), path.stat().st_mtime_ns)
    if path.suffix == ".model":
        if not path.is_file():
            raise ModelError(f"tokenizer '{name_or_path}': no such file")
        return LlamaTokenizer.from_pretrained(str(path.parent), vocab_file=str(path))
    if path.is_dir():
        if (path / "tokenizer.model").is_file() and not (path / "tokenizer_config.json").is_file():
            return LlamaTokenizer.from_pretrained(str(path))
        if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
            raise ModelError(
                f"tokenizer '{name_or_path}': the directory holds no tokenizer "
                "(tokenizer.json, tokenizer_config.json or tokenizer.model)"
            )
    elif name_or_path.startswith((".", "/")) or path.exists():
        raise ModelError(f"tokenizer '{name_or_path}': no such directory")
    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except OSError as e:
        raise ModelError(f"tokenizer '{name_or_path}' could not be loaded: {e}") from e
