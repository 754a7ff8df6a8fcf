"""Exporting a trained model in Hugging Face format."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase


def save_hf(
    model: PreTrainedModel | PeftModel, tokenizer: PreTrainedTokenizerBase, directory: str | Path, **kwargs: Any
) -> Path:
    """`save_pretrained` of model (safetensors; a PeftModel saves its adapters) and tokenizer into `directory`,
    replacing it as one step; `kwargs` go to the model's `save_pretrained`.

    The export is written under a temporary name and renamed last, so a kill mid-write leaves the previous
    export intact rather than a directory of half-written shards.
    """
    directory = Path(directory)
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
