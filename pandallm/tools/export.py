"""`pandallm export`: a Hugging Face export of a finished run's checkpoint (or of a starting point), no training.

    pandallm export --config recipes/smollm2_lora.yaml --ckpt_path runs/smollm2_lora/checkpoints/last.ckpt \\
        --output runs/smollm2_lora/merged --adapter_save_type merge

The model is built as the config's `model` section (and any `--model.*` option after it) describes it, on the
CPU; the checkpoint's weights are restored into it (a LoRA run's adapters onto the base rebuilt from its source),
and it is saved as a PEFT adapter directory (`adapter_only`) or with the adapters merged into a plain Hugging
Face checkpoint (`merge`). A run directory's `config.yaml` works as `--config` too. Without `--config`, the model
settings saved in the checkpoint are used. Without `--ckpt_path`, the starting point itself is exported: a GGUF
file or delta weights become a plain checkpoint, and `--model.lora_adapter DIR --adapter_save_type merge` merges
a saved adapter into its base.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from jsonargparse import ActionConfigFile, ArgumentParser

from pandallm.callbacks.export import HFExport
from pandallm.errors import ModelError
from pandallm.model.module import PandaLLM

log = logging.getLogger(__name__)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="pandallm export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action=ActionConfigFile, help="A recipe or a run's config.yaml.")
    parser.add_argument("--ckpt_path", type=str | None, default=None, help="Lightning checkpoint (.ckpt) to export.")
    parser.add_argument("--output", type=str, required=True, help="Directory to write.")
    parser.add_argument(
        "--adapter_save_type",
        type=Literal["adapter_only", "merge"] | None,
        default=None,
        help="For LoRA runs; default: the config's export.adapter_save_type.",
    )
    parser.add_class_arguments(PandaLLM, "model")
    parser.add_class_arguments(HFExport, "export")
    # The rest of a recipe or run config is read and ignored: exporting needs no trainer and no data.
    for section in ("trainer", "data", "predictions"):
        parser.add_argument(f"--{section}", type=dict[str, Any] | None, default=None)
    parser.add_argument("--seed_everything", type=int | bool | None, default=None)
    parser.add_argument("--weights_only", type=bool | None, default=None)
    return parser


def load_checkpoint(path: str) -> dict[str, Any]:
    file = Path(path)
    if file.is_dir():
        raise ModelError(
            f"--ckpt_path '{path}' is a sharded (DeepSpeed / FSDP) checkpoint directory; convert it to a single file "
            "first (Lightning's convert_zero_checkpoint_to_fp32_state_dict)"
        )
    if not file.is_file():
        raise ModelError(f"--ckpt_path '{path}': no such file")
    return torch.load(file, map_location="cpu", weights_only=False)


def restore(model: PandaLLM, checkpoint: dict[str, Any], path: str) -> None:
    """The checkpoint's weights into the configured `model`, checked as `fit --ckpt_path` checks them."""
    model.on_load_checkpoint(checkpoint, where=f"checkpoint '{path}'")
    model.load_state_dict(checkpoint["state_dict"], strict=model.strict_loading)


def export(args: list[str]) -> Path:
    parser = build_parser()
    cfg = parser.parse_args(args)
    checkpoint = load_checkpoint(cfg.ckpt_path) if cfg.ckpt_path else None
    configured = any(a == "--config" or a.startswith(("--config=", "--model")) for a in args)
    if configured or checkpoint is None:
        model = parser.instantiate_classes(cfg).model
    else:
        accepted = inspect.signature(PandaLLM.__init__).parameters
        model = PandaLLM(**{k: v for k, v in checkpoint["hyper_parameters"].items() if k in accepted})
    # A preset's frozen base is random: rebuilt from the run's seed (pandallm's default, 42, unless configured).
    seed = cfg.seed_everything
    L.seed_everything(42 if seed in (None, True) else int(seed), verbose=False)
    model.configure_model()
    if checkpoint is not None:
        restore(model, checkpoint, cfg.ckpt_path)
    model.eval()
    save_type = cfg.adapter_save_type or cfg.export.adapter_save_type
    directory = model.export_hf(cfg.output, save_type)
    log.info("pandallm: exported to %s", directory)
    return directory


def main(args: list[str] | None = None) -> None:
    print(export(list(args or [])))
