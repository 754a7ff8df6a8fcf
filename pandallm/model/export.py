"""Exporting a trained model in Hugging Face format."""

from __future__ import annotations

import copy
import logging
import shutil
from collections.abc import Callable
from fnmatch import fnmatch
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from pandallm.checkpoint.atomic import swap_in
from pandallm.console import no_progress_bars
from pandallm.data.template import tokenizer_template
from pandallm.errors import ConfigError

if TYPE_CHECKING:
    from peft import PeftModel

log = logging.getLogger(__name__)

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
    "quantization.json",  # `pandallm quantize`'s report, and llm-compressor's recipe beside its weights
    "recipe.yaml",
)


# Put first into the temporary directory `replace_directory` writes, taken out before it is swapped in: a directory
# at the temporary name that holds it is a write a kill interrupted, which may be removed. Anything else there (a
# user's file or directory) is not pandallm's to delete.
PARTIAL_MARK = ".pandallm-partial-export"


def _temporary_name(directory: Path) -> Path:
    """Where `replace_directory` writes the new `directory` before swapping it in."""
    return directory.with_name(directory.name + ".tmp")


def check_export_target(directory: str | Path) -> None:
    """Refuse an export target that replacing would destroy: a file, or a directory with anything but an earlier
    export in it (a run directory, a checkpoint directory); or, at its temporary name, anything but a write a kill
    interrupted."""
    directory = Path(directory)
    if directory.is_file():
        raise ConfigError(f"export to '{directory}': a file is there; give a directory for the Hugging Face model")
    _check_temporary(_temporary_name(directory), directory)
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


def _check_temporary(tmp: Path, directory: Path) -> None:
    if not (tmp.exists() or tmp.is_symlink()):
        return
    if tmp.is_dir() and not tmp.is_symlink() and ((tmp / PARTIAL_MARK).is_file() or not any(tmp.iterdir())):
        return  # an interrupted write, or an empty directory: nothing is lost when it is removed
    raise ConfigError(
        f"export to '{directory}': '{tmp}' is in the way (the export is written there first) and is not an "
        "interrupted export (a file, a link, or a directory pandallm did not write); move or remove it"
    )


def inference_tokenizer(
    tokenizer: PreTrainedTokenizerBase, chat_template: str | None = None
) -> PreTrainedTokenizerBase:
    """`tokenizer` as the export saves it: `tokenizer(text)` encodes as pandallm's training rows begin, with BOS
    (when the tokenizer has one) and no EOS; and `apply_chat_template` renders with `chat_template`, the Jinja
    template the run trained with (`data.template`), when it is not the tokenizer's own.

    pandallm writes the special tokens of its rows itself and tokenizes text without them (`data.tokenize`), so the
    tokenizer it trains with may add none: the demo tokenizer's does not, nor do transformers' LLaMA tokenizers
    built from `tokenizer.model`. Saved as it is, a user of the export who calls `tokenizer(prompt)` and
    `generate` would prompt without the BOS that every training row starts with. A copy is changed, not
    `tokenizer`: pandallm's own tokenizer, and its digest in checkpoints and caches, stay as they are. Chat
    templates are unaffected: `apply_chat_template` adds no special token, as pandallm does not for templated rows.
    """
    bos_id = tokenizer.bos_token_id
    probe = tokenizer("a")["input_ids"]
    adds_bos = bos_id is None or (probe[:1] == [bos_id] and probe[-1:] != [tokenizer.eos_token_id])
    other_template = chat_template is not None and chat_template != tokenizer_template(tokenizer)
    if adds_bos and not other_template:
        return tokenizer
    exported = copy.deepcopy(tokenizer)
    if other_template:
        exported.chat_template = chat_template
    if adds_bos:
        return exported
    # transformers' tokenizers-backed classes rebuild their post-processor (written to tokenizer.json) from these.
    exported.add_bos_token = True
    exported.add_eos_token = False
    if exported("a")["input_ids"][:1] != [bos_id]:
        log.warning(
            "pandallm: the exported %s does not add BOS by itself; prepend it (id %d) to prompts, as training did",
            type(tokenizer).__name__,
            bos_id,
        )
    return exported


def save_hf(
    model: PreTrainedModel | PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    directory: str | Path,
    chat_template: str | None = None,
    **kwargs: Any,
) -> Path:
    """`save_pretrained` of model (safetensors; a PeftModel saves its adapters) and tokenizer into `directory`,
    replacing it (an earlier export, never anything else: `check_export_target`) as one step; `kwargs` go to the
    model's `save_pretrained`.

    The export is written under a temporary name and renamed last, so a kill mid-write leaves the previous
    export intact rather than a directory of half-written shards. The tokenizer is saved as `inference_tokenizer`
    gives it: `tokenizer(prompt)` in plain transformers starts with BOS, as every training row does, and its chat
    template is `chat_template` (the one the run trained with) when given.
    """

    def write(tmp: Path) -> None:
        with no_progress_bars():  # "Writing model shards", for one shard
            model.save_pretrained(tmp, **kwargs)
        inference_tokenizer(tokenizer, chat_template).save_pretrained(tmp)

    return replace_directory(Path(directory), write)


def replace_directory(directory: Path, write: Callable[[Path], None]) -> Path:
    """Fill a directory with `write(tmp)` under a temporary name beside it, then swap it in for `directory` (an
    earlier export at most, never anything else: `check_export_target`) as one step: a kill mid-write leaves the
    previous export intact rather than a directory of half-written shards. Exports and quantized models alike.
    `write` is given an existing, empty directory (but for `PARTIAL_MARK`)."""
    check_export_target(directory)  # and that what is at the temporary name is a write a kill interrupted, if any
    tmp = _temporary_name(directory)
    if tmp.is_dir():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    (tmp / PARTIAL_MARK).touch()
    write(tmp)
    (tmp / PARTIAL_MARK).unlink()
    swap_in(tmp, directory)
    return directory
