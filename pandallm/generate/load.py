"""A model to generate with, from anything pandallm can load: a run's `hf/` export (or any Hugging Face LLaMA
directory), a PEFT adapter directory (on its base), a Lightning checkpoint (a `.ckpt` file, a sharded or DeepSpeed
directory), a GGUF file, or a hub id. A checkpoint also says how its prompts were rendered (`data.template`, ...)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
from huggingface_hub.utils import HFValidationError, validate_repo_id

from pandallm.checkpoint.sharded import is_sharded_checkpoint
from pandallm.data.template import RENDERING_SETTINGS
from pandallm.errors import ModelError
from pandallm.model.module import PandaLLM


@dataclass
class Loaded:
    module: PandaLLM
    # The rendering settings the checkpoint records (`template`, `template_dir`, `max_seq_length`); {}: none.
    rendering: dict[str, Any] = field(default_factory=dict)


def is_checkpoint(path: Path) -> bool:
    from pandallm.tools.export import is_deepspeed_checkpoint

    return (path.is_file() and path.suffix != ".gguf") or is_sharded_checkpoint(path) or is_deepspeed_checkpoint(path)


def is_hub_id(name: str) -> bool:
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def load_for_generation(model: str, option: str = "--model", base: str | None = None, tokenizer: str | None = None):
    """The model `model` names, built on the CPU in eval mode, with its tokenizer (`tokenizer` overrides)."""
    path = Path(model)
    if path.exists() and is_checkpoint(path):
        return _from_checkpoint(model, option, tokenizer)
    if path.is_dir() and (path / "adapter_config.json").is_file():
        recorded = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        base = base or recorded
        if base is None:
            raise ModelError(f"{option} '{model}': a PEFT adapter that names no base model; give --base")
        # The export saves the tokenizer beside the adapters: the one the run trained with.
        own = (path / "tokenizer_config.json").is_file()
        module = PandaLLM(base, tokenizer or (model if own else None), use_lora=True, lora_adapter=model)
    elif path.exists() or is_hub_id(model):
        module = PandaLLM(model, tokenizer)
    else:
        raise ModelError(
            f"{option} '{model}': no such directory or file, and not a hub id (owner/name); give a run's hf/ "
            "export, a PEFT adapter directory, a Lightning checkpoint, a .gguf file or a hub id"
        )
    try:
        module.configure_model()
    except OSError as error:  # transformers: nothing loadable there, or a hub id that cannot be reached
        raise ModelError(
            f"{option} '{model}': cannot load a model from it ({' '.join(str(error).split())[:300]})"
        ) from error
    return Loaded(module.eval())


def _from_checkpoint(model: str, option: str, tokenizer: str | None) -> Loaded:
    from pandallm.tools.export import load_checkpoint

    checkpoint = load_checkpoint(model)
    if "pandallm" not in checkpoint or "hyper_parameters" not in checkpoint:
        raise ModelError(f"{option} '{model}': not a pandallm checkpoint (it has no 'pandallm' record)")
    arguments = PandaLLM.recorded_arguments(checkpoint["hyper_parameters"])
    if tokenizer is not None:
        arguments["tokenizer"] = tokenizer
    module = PandaLLM.from_arguments(arguments)
    L.seed_everything(42, verbose=False)  # a preset's frozen LoRA base is random: rebuilt as the run built it
    module.configure_model()
    module.on_load_checkpoint(checkpoint, where=f"{option} '{model}'")
    module.load_state_dict(checkpoint["state_dict"], strict=module.strict_loading)
    recorded = (checkpoint.get("pandallm") or {}).get("data") or {}
    return Loaded(module.eval(), {key: recorded[key] for key in RENDERING_SETTINGS if key in recorded})
