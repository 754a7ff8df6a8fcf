"""Whole models out of sharded ones: gathering a sharded model's weights, and reading a sharded checkpoint.

Under FSDP2 (`ModelParallelStrategy`) and Lightning's `FSDPStrategy` no rank holds the whole model, and their
checkpoints are directories of torch.distributed.checkpoint (DCP) shards plus Lightning's `meta.pt`. A Hugging Face
export needs whole tensors: at the end of `fit` they are gathered from the ranks (`gather_full_state_dict`); from
a checkpoint directory they are read without any process group (`read_sharded_weights`).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from transformers import LlamaConfig, PreTrainedModel

from pandallm.checkpoint.load import DCP_METADATA_FILE, METADATA_FILE, WeightsOnlyReader, load_weights_only, safe_load
from pandallm.errors import ModelError

# Where the LightningModule's state dict sits in the DCP keys: `ModelParallelStrategy` saves it as "state_dict",
# `FSDPStrategy` as "model"; PandaLLM keeps the Hugging Face model in its attribute `model`.
DCP_MODULE_KEYS = ("state_dict", "model")
HF_PREFIX = "model."


def gather_full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict of a sharded `module` (FSDP, FSDP2, DDP or plain), on CPU, on global rank 0.

    A collective: every rank must call it. Other ranks get an empty dict. Keys are the LightningModule's
    (`model.model.layers...`), without wrapper prefixes.
    """
    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def hf_weights(lightning_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PandaLLM's state dict -> the Hugging Face model's (the `model.` attribute prefix removed)."""
    return {k[len(HF_PREFIX) :]: v for k, v in lightning_state.items() if k.startswith(HF_PREFIX)}


def plain_model(config: LlamaConfig, weights: dict[str, torch.Tensor], head: str = "causal_lm") -> PreTrainedModel:
    """The model (`head`: `pandallm.model.build.MODEL_CLASSES`) holding `weights`, to save: built on the meta device
    and given the tensors themselves, so that no second copy is allocated. Its RoPE buffers (not in state dicts) stay
    on the meta device."""
    from pandallm.model.build import MODEL_CLASSES  # here: pandallm.model imports this module

    with torch.device("meta"):
        model = MODEL_CLASSES[head](config)
    missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
    if config.tie_word_embeddings:
        missing = [k for k in missing if k != "lm_head.weight"]
        model.tie_weights()
    if missing or unexpected:
        raise ModelError(f"the weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def is_sharded_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / DCP_METADATA_FILE).is_file() and (path / METADATA_FILE).is_file()


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Lightning's `meta.pt`: hyper-parameters, loop state, pandallm's record."""
    return safe_load(Path(path) / METADATA_FILE)


def read_sharded_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The whole model weights of a sharded checkpoint directory, in PandaLLM's keys, on CPU; the optimizer
    state in the same directory is not read. Nothing in the directory is unpickled without restriction."""
    path = Path(path)
    if not is_sharded_checkpoint(path):
        raise ModelError(f"{path} is not a sharded checkpoint (a directory with .metadata and {METADATA_FILE})")
    stored = WeightsOnlyReader(path).read_metadata().state_dict_metadata
    for top in DCP_MODULE_KEYS:
        prefix = top + "."
        tensors = {k: meta for k, meta in stored.items() if k.startswith(prefix) and hasattr(meta, "size")}
        if tensors:
            break
    else:
        raise ModelError(f"{path}: no model weights found (looked for keys under {', '.join(DCP_MODULE_KEYS)})")
    # This process alone reads every shard of every requested tensor (no process group needed).
    weights = {k: torch.empty(meta.size, dtype=meta.properties.dtype) for k, meta in tensors.items()}
    load_weights_only(path, weights)
    return {k[len(prefix) :]: tensor for k, tensor in weights.items()}


def module_arguments(cls: type, hyper_parameters: dict[str, Any]) -> dict[str, Any]:
    """The saved hyper-parameters that `cls.__init__` takes (Lightning adds private ones such as `_instantiator`)."""
    accepted = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in hyper_parameters.items() if k in accepted and k != "self"}


def model_defaults(arguments: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's recorded settings (`PandaLLM.recorded_arguments`) as the `model.*` defaults of a parser, under
    which a `--config` and `--model.*` options given still win."""
    return {f"model.{name}": value for name, value in arguments.items()}
