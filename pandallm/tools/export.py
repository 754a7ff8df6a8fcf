"""`pandallm export`: a Hugging Face export of a finished run's checkpoint (or of a starting point), no training.

    pandallm export --ckpt_path runs/llama33b/checkpoints/last.ckpt --output runs/llama33b/hf-last
    pandallm export --config recipes/smollm2_lora.yaml --ckpt_path runs/smollm2_lora/checkpoints/last.ckpt \\
        --output runs/smollm2_lora/merged --adapter_save_type merge

`--ckpt_path` takes a `.ckpt` file, the directory of a sharded checkpoint (FSDP2, Lightning FSDP with
`state_dict_type: sharded`: torch.distributed.checkpoint shards, read here in one process without GPUs or a process
group, and without the optimizer state), or a DeepSpeed checkpoint directory (consolidated with Lightning's
`convert_zero_checkpoint_to_fp32_state_dict`, which needs the `deepspeed` package).

Without `--config`, the model settings saved in the checkpoint are used. With `--config` (a recipe, or a run
directory's `config.yaml`) and any `--model.*` option, the model is built as they describe, on the CPU, and the
checkpoint is checked against it as `fit --ckpt_path` checks it. A LoRA run is saved as a PEFT adapter directory
(`adapter_only`) or with the adapters merged into a plain Hugging Face checkpoint (`merge`). Without
`--ckpt_path`, the starting point itself is exported: a GGUF file or delta weights become a plain checkpoint, and
`--model.lora_adapter DIR --adapter_save_type merge` merges a saved adapter into its base.
"""

from __future__ import annotations

import importlib.util
import logging
import tempfile
from pathlib import Path
from typing import Any, Literal

import lightning as L
from jsonargparse import ActionConfigFile, ArgumentParser

from pandallm.callbacks.export import HFExport
from pandallm.checkpoint.load import safe_load
from pandallm.checkpoint.sharded import (
    hf_weights,
    is_sharded_checkpoint,
    model_defaults,
    module_arguments,
    plain_model,
    read_metadata,
    read_sharded_weights,
)
from pandallm.cli import RUN_OPTIONS, RUN_SECTIONS
from pandallm.data.template import resolve_template
from pandallm.errors import ConfigError, ModelError
from pandallm.model.export import check_export_target, save_hf
from pandallm.model.module import PandaLLM

log = logging.getLogger(__name__)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="pandallm export", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--config", action=ActionConfigFile, help="A recipe or a run's config.yaml.")
    parser.add_argument(
        "--ckpt_path", type=str | None, default=None, help="Checkpoint to export: a .ckpt file or a sharded directory."
    )
    parser.add_argument("--output", type=str, required=True, help="Directory to write; replaced as one step.")
    parser.add_argument(
        "--adapter_save_type",
        type=Literal["adapter_only", "merge"] | None,
        default=None,
        help="For LoRA runs; default: the config's export.adapter_save_type.",
    )
    parser.add_argument(
        "--tokenizer",
        type=str | None,
        default=None,
        help="Tokenizer to save with the model, when the one recorded in the checkpoint is not valid here.",
    )
    parser.add_class_arguments(PandaLLM, "model")
    parser.add_class_arguments(HFExport, "export")
    # The rest of a recipe or run config is read and ignored: exporting needs no trainer and no data.
    for section in RUN_SECTIONS:
        parser.add_argument(f"--{section}", type=dict[str, Any] | None, default=None)
    for option in RUN_OPTIONS:
        parser.add_argument(f"--{option}", type=Any, default=None)
    return parser


def is_deepspeed_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / "checkpoint").is_dir()


def load_checkpoint(path: str) -> dict[str, Any]:
    """A checkpoint file or directory as one dict in Lightning's layout (`state_dict`, `hyper_parameters`, ...)."""
    file = Path(path)
    if is_sharded_checkpoint(file):
        return {**read_metadata(file), "state_dict": read_sharded_weights(file)}
    if is_deepspeed_checkpoint(file):
        # Lightning's converter imports deepspeed only when it runs, as a bare ModuleNotFoundError.
        if importlib.util.find_spec("deepspeed") is None:
            raise ModelError(
                f"--ckpt_path {path} is a DeepSpeed checkpoint directory (it holds checkpoint/); converting it needs "
                "the deepspeed package: pip install -e '.[gpu]' (or pip install deepspeed)"
            )
        from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

        with tempfile.TemporaryDirectory() as tmp:
            # DeepSpeed's own loader unpickles its files (it offers no other way: the documented exception). What
            # it read is used as returned; the file the converter also writes is never unpickled a second time.
            checkpoint = convert_zero_checkpoint_to_fp32_state_dict(str(file), str(Path(tmp) / "full.ckpt"))
    elif file.is_file():
        # Weights only: a checkpoint from elsewhere cannot run pickled code here, as it cannot in `fit`.
        checkpoint = safe_load(file)
    elif file.is_dir():
        raise ModelError(f"--ckpt_path {path}: a directory, but neither a sharded nor a DeepSpeed checkpoint")
    else:
        raise ModelError(f"--ckpt_path {path}: no such checkpoint file or directory")
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ModelError(f"--ckpt_path {path}: not a Lightning checkpoint (no 'state_dict')")
    return checkpoint


def export_full_weights(
    checkpoint: dict[str, Any], arguments: dict[str, Any], output: str, data: dict[str, Any]
) -> Path:
    """A full-training checkpoint, exported without building a second copy of the model: the checkpoint's own
    tensors are given to a model built on the meta device (a 33B export needs the memory of one copy, not two)."""
    module = PandaLLM.from_arguments(arguments)
    weights = hf_weights(checkpoint["state_dict"])
    model = plain_model(module.config, weights, module.objective.head)
    return save_hf(model, module.tokenizer, output, trained_template(data, module))


def trained_template(data: dict[str, Any], module: PandaLLM) -> str | None:
    """The Jinja template the run trained with (`data.template` of the config given, else of the checkpoint's
    record), for the export's tokenizer; None: the tokenizer's own. A template file that is not on this machine
    any more is warned about, not fatal: the weights are still worth exporting."""
    try:
        template = resolve_template(data.get("template", "auto"), module.tokenizer, data.get("template_dir"))
    except ConfigError as error:
        log.warning("pandallm export: the export's tokenizer keeps its own chat template: %s", error)
        return None
    return template.source if template is not None else None


def export(args: list[str]) -> Path:
    parser = build_parser()
    cfg = parser.parse_args(args)
    check_export_target(cfg.output)  # before reading a checkpoint of many GB
    checkpoint = load_checkpoint(cfg.ckpt_path) if cfg.ckpt_path else None
    if checkpoint is not None and ("pandallm" not in checkpoint or "hyper_parameters" not in checkpoint):
        raise ModelError(f"--ckpt_path {cfg.ckpt_path}: not a pandallm checkpoint (it has no 'pandallm' record)")
    recorded: dict[str, Any] = {}
    if checkpoint is not None:
        # The run's own settings are the defaults; a --config and --model.* options given here change them.
        recorded = PandaLLM.recorded_arguments(checkpoint["hyper_parameters"])
        parser.set_defaults(model_defaults(recorded))
        cfg = parser.parse_args(args)
    arguments = module_arguments(PandaLLM, cfg.model.as_dict())
    if cfg.tokenizer is not None:
        arguments["tokenizer"] = cfg.tokenizer
    # The rendering settings: the checkpoint's record, under those of a --config given.
    data = {**((checkpoint or {}).get("pandallm") or {}).get("data", {}), **(cfg.data or {})}
    same_as_recorded = arguments == {**recorded, **_tokenizer(cfg)}
    if checkpoint is not None and not arguments["use_lora"] and same_as_recorded:
        directory = export_full_weights(checkpoint, arguments, cfg.output, data)
        log.info("pandallm: exported to %s", directory)
        return directory
    model = PandaLLM.from_arguments(arguments)
    # A preset's frozen base is random: rebuilt from the run's seed (pandallm's default, 42, unless configured).
    seed = cfg.seed_everything
    L.seed_everything(42 if seed in (None, True) else int(seed), verbose=False)
    model.configure_model()
    if checkpoint is not None:
        # Other settings than the run's: the checkpoint's record is compared with them (shapes, tokenizer).
        model.on_load_checkpoint(checkpoint, where=f"checkpoint '{cfg.ckpt_path}'")
        model.load_state_dict(checkpoint["state_dict"], strict=model.strict_loading)
    model.eval()
    save_type = cfg.adapter_save_type or cfg.export.adapter_save_type
    directory = model.export_hf(cfg.output, save_type, trained_template(data, model))
    log.info("pandallm: exported to %s", directory)
    return directory


def _tokenizer(cfg) -> dict[str, str]:
    return {} if cfg.tokenizer is None else {"tokenizer": cfg.tokenizer}


def main(args: list[str] | None = None) -> None:
    print(export(list(args or [])))
