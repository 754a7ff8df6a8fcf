"""`pandallm export`: a Hugging Face model directory from any pandallm checkpoint, sharded or not.

    pandallm export --checkpoint runs/llama33b/checkpoints/last.ckpt --output runs/llama33b/hf-step-5000

A sharded run (FSDP2, Lightning FSDP with `state_dict_type: sharded`) saves each checkpoint as a directory of
torch.distributed.checkpoint shards; its weights are read here in one process, without GPUs or a process group,
and without reading the optimizer state. A DeepSpeed checkpoint directory is consolidated with Lightning's
`convert_zero_checkpoint_to_fp32_state_dict` (needs the `deepspeed` package). A `.ckpt` file is read as it is.
The model's architecture and tokenizer come from the hyper-parameters the checkpoint was saved with.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from jsonargparse import auto_cli

from pandallm.checkpoint.sharded import (
    hf_weights,
    is_sharded_checkpoint,
    module_arguments,
    plain_model,
    read_metadata,
    read_sharded_weights,
)
from pandallm.errors import ModelError
from pandallm.model.export import save_hf
from pandallm.model.module import PandaLLM


def is_deepspeed_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / "checkpoint").is_dir()


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """`(PandaLLM state dict, everything else)` of a checkpoint file or directory."""
    if is_sharded_checkpoint(path):
        return read_sharded_weights(path), read_metadata(path)
    if is_deepspeed_checkpoint(path):
        try:
            from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict
        except ImportError as e:  # pragma: no cover (needs deepspeed)
            raise ModelError(f"{path} is a DeepSpeed checkpoint; converting it needs the deepspeed package") from e
        with tempfile.TemporaryDirectory() as tmp:
            convert_zero_checkpoint_to_fp32_state_dict(str(path), str(Path(tmp) / "full.ckpt"))
            checkpoint = torch.load(Path(tmp) / "full.ckpt", map_location="cpu", weights_only=False)
    elif path.is_file():
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    else:
        raise ModelError(f"--checkpoint {path}: no such checkpoint file or directory")
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ModelError(f"--checkpoint {path}: not a Lightning checkpoint (no 'state_dict')")
    return checkpoint.pop("state_dict"), checkpoint


def export(*, checkpoint: str, output: str, tokenizer: str | None = None) -> Path:
    """Write the weights of a pandallm checkpoint as a Hugging Face model directory (safetensors + tokenizer).

    Args:
        checkpoint: A `.ckpt` file, or the directory of a sharded (FSDP2, FSDP) or DeepSpeed checkpoint.
        output: Directory to write; replaced as one step if it exists.
        tokenizer: Tokenizer to save with the model; default the run's (`model.tokenizer`, else the checkpoint's
            `model_name_or_path`), as recorded in the checkpoint; set it when that path is not valid here.
    """
    path = Path(checkpoint)
    state_dict, metadata = read_checkpoint(path)
    if "pandallm" not in metadata or "hyper_parameters" not in metadata:
        raise ModelError(f"--checkpoint {path}: not a pandallm checkpoint (it has no 'pandallm' record)")
    arguments = module_arguments(PandaLLM, metadata["hyper_parameters"])
    if tokenizer is not None:
        arguments["tokenizer"] = tokenizer
    module = PandaLLM(**arguments)
    return save_hf(plain_model(module.config, hf_weights(state_dict)), module.tokenizer, output)


def main(args: list[str] | None = None) -> None:
    auto_cli(export, args=args)
