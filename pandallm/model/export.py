"""Exporting a trained model in Hugging Face format."""

from __future__ import annotations

import shutil
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from pandallm.errors import ConfigError

# What `save_pretrained` of a model, a peft adapter and a tokenizer writes: a directory holding only these is an
# earlier export, which a new one may replace. Anything else in it (checkpoints, logs, a user's notes) is not ours.
EXPORT_FILES = (
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model.bin.index.json",
    "adapter_config.json",
    "adapter_model.*",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "README.md",  # peft's model card
)


def check_export_target(directory: str | Path) -> None:
    """Refuse an export target that replacing would destroy: a file, or a directory with anything but an earlier
    export in it (a run directory, a checkpoint directory)."""
    directory = Path(directory)
    if directory.is_file():
        raise ConfigError(f"export to '{directory}': a file is there; give a directory for the Hugging Face model")
    if not directory.is_dir():
        return
    foreign = sorted(
        entry.name + ("/" if entry.is_dir() else "")
        for entry in directory.iterdir()
        if entry.is_dir() or not any(fnmatch(entry.name, pattern) for pattern in EXPORT_FILES)
    )
    if foreign:
        raise ConfigError(
            f"export to '{directory}': the directory holds more than an earlier export ({', '.join(foreign[:5])}"
            f"{', ...' if len(foreign) > 5 else ''}), which replacing it would delete; give a new or empty directory"
        )


def save_hf(
    model: PreTrainedModel | PeftModel, tokenizer: PreTrainedTokenizerBase, directory: str | Path, **kwargs: Any
) -> Path:
    """`save_pretrained` of model (safetensors; a PeftModel saves its adapters) and tokenizer into `directory`,
    replacing it (an earlier export, never anything else: `check_export_target`) as one step; `kwargs` go to the
    model's `save_pretrained`.

    The export is written under a temporary name and renamed last, so a kill mid-write leaves the previous
    export intact rather than a directory of half-written shards.
    """
    directory = Path(directory)
    check_export_target(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    old = directory.with_name(directory.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, **kwargs)
    tokenizer.save_pretrained(tmp)
    if directory.exists():
        shutil.rmtree(old, ignore_errors=True)
        directory.rename(old)
        tmp.rename(directory)
        shutil.rmtree(old)
    else:
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(directory)
    return directory
