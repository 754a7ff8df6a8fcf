"""LoRA and DoRA adapters through peft: settings, checking them against the model, applying, loading, merging.

peft is imported where adapters are used: importing it imports bitsandbytes too (about a second and a half of
every start-up), which a run without adapters or quantization does not need.
"""

from __future__ import annotations

import copy
import json
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from pandallm.checkpoint.load import load_error
from pandallm.errors import ModelError
from pandallm.model.quantize import dequantize, is_quantized

if TYPE_CHECKING:
    from peft import LoraConfig, PeftModel
    from transformers import PreTrainedModel

# Every linear projection of a LLaMA decoder layer (attention and MLP), as QLoRA trains them.
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraSettings:
    """What `PandaLLM`'s `lora_*` options describe; see its docstring."""

    r: int = 64
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    modules_to_save: tuple[str, ...] = ()
    use_dora: bool = False
    # peft's task: `SEQ_CLS` trains and saves a reward model's score head whole, beside the adapters.
    task_type: str = "CAUSAL_LM"

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ModelError(f"model.lora_r must be a positive rank, got {self.r}")
        if self.alpha <= 0:
            raise ModelError(f"model.lora_alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ModelError(f"model.lora_dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ModelError("model.lora_target_modules is empty; name at least one module, e.g. q_proj")

    def peft_config(self) -> LoraConfig:
        from peft import LoraConfig

        return LoraConfig(
            task_type=self.task_type,
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            modules_to_save=list(self.modules_to_save) or None,
            use_dora=self.use_dora,
        )


def is_peft_model(model: Any) -> bool:
    """Whether `model` is a `PeftModel` (without importing peft: none is, if nothing imported it)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def _matches(module_name: str, wanted: str) -> bool:
    # peft's rule for a list of names: the full module name, or its last dotted components.
    return module_name == wanted or module_name.endswith("." + wanted)


def check_module_names(model: nn.Module, names: tuple[str, ...], key: str, linear_only: bool) -> None:
    """Raise a ModelError naming each entry of `names` that matches no module of `model` (or no linear layer)."""
    modules = [
        (name, module)
        for name, module in model.named_modules()
        if name and (isinstance(module, nn.Linear) or not linear_only)
    ]
    unknown = [wanted for wanted in names if not any(_matches(name, wanted) for name, _ in modules)]
    if unknown:
        kinds = "linear layers" if linear_only else "modules"
        valid = sorted({name.rsplit(".", 1)[-1] for name, module in modules if not list(module.children())})
        raise ModelError(
            f"{key}: {', '.join(repr(u) for u in unknown)} matches none of the model's {kinds}; "
            f"valid names: {', '.join(valid)}"
        )


def apply_lora(model: PreTrainedModel, settings: LoraSettings) -> PeftModel:
    """Wrap `model` (already resized and, if quantized, prepared) with fresh adapters; only they train."""
    check_module_names(model, settings.target_modules, "model.lora_target_modules", linear_only=True)
    check_module_names(model, settings.modules_to_save, "model.modules_to_save", linear_only=False)
    from peft import get_peft_model

    return get_peft_model(model, settings.peft_config())


def load_adapter(model: PreTrainedModel, path: str) -> PeftModel:
    """Wrap `model` with a saved PEFT adapter directory, trainable, refusing an adapter made for another model."""
    config_file = Path(path) / "adapter_config.json"
    if not config_file.is_file():
        raise ModelError(f"model.lora_adapter '{path}': not a PEFT adapter directory (no adapter_config.json)")
    trained_on = json.loads(config_file.read_text()).get("base_model_name_or_path")
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, path, is_trainable=True)
    except pickle.UnpicklingError as e:
        # peft reads an `adapter_model.bin` with `weights_only=True`: what it refused did not run.
        raise load_error(f"model.lora_adapter '{path}'", e) from e
    except (RuntimeError, ValueError, KeyError) as e:
        base = f" '{model.name_or_path}'" if model.name_or_path else ""
        origin = f"; it was trained on '{trained_on}'" if trained_on else ""
        detail = " ".join(str(e).split())
        raise ModelError(
            f"model.lora_adapter '{path}' does not fit the base model{base}{origin} ({detail[:600]})"
        ) from e


def trains_both_embeddings(model: PeftModel) -> bool:
    """Whether the input and output embeddings are both `modules_to_save`: trained whole, saved with the adapters."""
    from peft.utils import ModulesToSaveWrapper

    base = model.get_base_model()
    return all(isinstance(m, ModulesToSaveWrapper) for m in (base.get_input_embeddings(), base.get_output_embeddings()))


def merged_copy(model: PeftModel) -> PreTrainedModel:
    """The adapters merged into a copy of the base, as a plain transformers model; `model` is left as it is.

    A quantized base cannot hold a merged weight without quantizing it again (which would change the logits), so
    the copy is dequantized first: the merged model computes what the trained one does, in dense weights.
    """
    if not is_quantized(model):
        return copy.deepcopy(model).merge_and_unload()
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    config = copy.deepcopy(model.peft_config[model.active_adapter])
    adapter = get_peft_model_state_dict(model, save_embedding_layers=False)  # the copy keeps its embeddings
    dense = dequantize(copy.deepcopy(model).unload())
    rebuilt = get_peft_model(dense, config)
    set_peft_model_state_dict(rebuilt, adapter)
    return rebuilt.merge_and_unload()
