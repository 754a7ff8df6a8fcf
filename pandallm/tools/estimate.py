"""`pandallm estimate`: the memory per device of a run as configured, before it runs (LLMBox's gpu_calculator).

    pandallm estimate --config recipes/llama7b.yaml --gpu_memory_gib 80
    pandallm estimate --config recipes/llama65b_qlora.yaml --architecture llama-65b --gpu_memory_gib 80

The config is parsed as `pandallm fit` parses it (any `--model.*`, `--data.*`, `--trainer.*` after it apply), but
nothing is instantiated or loaded except the model's `config.json` (or, for a preset, the tokenizer's size). The
counting is `pandallm.model.memory`'s. `estimate_memory` takes a parsed fit config, for `fit --dry_run`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pandallm.errors import ConfigError
from pandallm.model.memory import PROJECTIONS, Estimate, Run, Shape, estimate
from pandallm.model.presets import PRESETS


def _get(namespace: Any, key: str, default: Any = None) -> Any:
    value = namespace.get(key, default) if hasattr(namespace, "get") else getattr(namespace, key, default)
    return default if value is None else value


def _shape(model: Any, architecture: str | None) -> Shape:
    from pandallm.model.build import is_preset, model_config
    from pandallm.tokenizer import load_tokenizer

    name = architecture or _get(model, "model_name_or_path")
    overrides = dict(_get(model, "config_overrides", {}) or {})
    if is_preset(name):
        tokenizer = _get(model, "tokenizer")
        vocab = len(load_tokenizer(tokenizer, _get(model, "special_tokens"))) if tokenizer else 32000
        return Shape.of(model_config(name, vocab, overrides))
    return Shape.of(model_config(name, 0, overrides))


def _deepspeed(init_args: Any) -> dict[str, Any]:
    """Stage and offloading of a `DeepSpeedStrategy`, from its `config` (a JSON file or a dict) or its arguments."""
    config = _get(init_args, "config")
    if isinstance(config, (str, Path)):
        try:
            config = json.loads(Path(config).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            where = f"trainer.strategy.init_args.config '{config}'"
            raise ConfigError(f"{where}: cannot read the DeepSpeed JSON ({e})") from e
    zero = dict((config or {}).get("zero_optimization", {})) if config else {}
    stage = int(zero.get("stage", _get(init_args, "stage", 2)))
    offload_optimizer = (
        zero.get("offload_optimizer", {}).get("device", "none") != "none"
        if zero
        else bool(_get(init_args, "offload_optimizer", False))
    )
    offload_parameters = (
        zero.get("offload_param", {}).get("device", "none") != "none"
        if zero
        else bool(_get(init_args, "offload_parameters", False))
    )
    return {
        "sharding": f"zero{stage}" if stage else "ddp",
        "deepspeed": True,
        "offload_optimizer": offload_optimizer,
        "offload_parameters": offload_parameters,
    }


def _strategy(strategy: Any, world_size: int) -> dict[str, Any]:
    """The `Run` fields of `trainer.strategy`."""
    plain = "ddp" if world_size > 1 else "none"
    if strategy is None or isinstance(strategy, str):
        name = (strategy or "auto").lower()
        if name.startswith("deepspeed_stage_"):
            stage = int(name.split("_")[2])
            offload = name.endswith("_offload")
            return {
                "sharding": f"zero{stage}",
                "deepspeed": True,
                "offload_optimizer": offload,
                "offload_parameters": offload and stage == 3,
            }
        if name.startswith("fsdp"):
            return {"sharding": "fsdp_full", "half_compute": True}
        if name in ("auto", "single_device") or name.startswith("ddp"):
            return {"sharding": plain}
        raise ConfigError(f"trainer.strategy '{strategy}': pandallm estimate knows ddp, deepspeed_stage_N, fsdp")
    class_path = str(_get(strategy, "class_path", ""))
    init_args = _get(strategy, "init_args", {})
    kind = class_path.rsplit(".", 1)[-1]
    if kind == "DeepSpeedStrategy":
        return _deepspeed(init_args)
    if kind == "FSDPStrategy":
        sharding = str(_get(init_args, "sharding_strategy", "FULL_SHARD")).upper()
        offload = bool(_get(init_args, "cpu_offload", False))
        return {
            "sharding": {"SHARD_GRAD_OP": "fsdp_grad_op", "NO_SHARD": plain}.get(sharding, "fsdp_full"),
            "half_compute": True,  # Lightning's FSDP precision runs each unit in half precision, without autocast
            "offload_optimizer": offload,
            "offload_parameters": offload,
            "gradient_checkpointing": bool(_get(init_args, "activation_checkpointing_policy")),
        }
    if kind == "ModelParallelStrategy":
        return {"sharding": "fsdp_full"}
    if kind in ("DDPStrategy", "SingleDeviceStrategy"):
        return {"sharding": plain}
    raise ConfigError(f"trainer.strategy '{class_path}': pandallm estimate knows DDP, DeepSpeed, FSDP and FSDP2")


def _world_size(trainer: Any, devices: int | None) -> int:
    if devices is not None:
        return devices * int(_get(trainer, "num_nodes", 1))
    given = _get(trainer, "devices", "auto")
    count = len(given) if isinstance(given, (list, tuple)) else given
    if isinstance(count, str):
        count = int(count) if count.isdigit() else 1  # "auto" / "-1": as many as the machine has; say --devices
    return max(int(count), 1) * int(_get(trainer, "num_nodes", 1))


def _loss_chunk_tokens(model: Any, strategy_fields: dict[str, Any], vocab: int) -> int | None:
    """Tokens per chunk of the loss the run computes (`model.loss_impl`), None for the full logits: also where
    pandallm falls back to them (pandallm.model.head: LoRA on lm_head, Lightning's FSDP, DeepSpeed ZeRO-3)."""
    from pandallm.model.chunked_loss import chunk_tokens_for

    falls_back = (
        "lm_head" in (_get(model, "lora_target_modules", ()) or ())
        or strategy_fields.get("sharding") == "zero3"
        or (str(strategy_fields.get("sharding", "")).startswith("fsdp") and strategy_fields.get("half_compute"))
    )
    if str(_get(model, "loss_impl", "auto")) == "full" or falls_back:
        return None
    return chunk_tokens_for(vocab, _get(model, "loss_chunk_tokens", None))


def run_of(config: Any, architecture: str | None = None, devices: int | None = None) -> Run:
    """The `Run` a parsed `pandallm fit` config describes."""
    model, data, trainer = config["model"], config["data"], config["trainer"]
    world_size = _world_size(trainer, devices)
    fields = _strategy(_get(trainer, "strategy"), world_size)
    by_strategy = fields.pop("gradient_checkpointing", False)
    checkpointing = bool(_get(model, "gradient_checkpointing", False)) or by_strategy
    use_lora = bool(_get(model, "use_lora", False))
    shape = _shape(model, architecture)
    return Run(
        loss_chunk_tokens=_loss_chunk_tokens(model, fields, shape.vocab),
        shape=shape,
        micro_batch=int(_get(data, "per_device_train_batch_size", 1)),
        seq_len=int(_get(data, "max_seq_length", 2048)),
        precision=str(_get(trainer, "precision", "32-true")),
        lora_r=int(_get(model, "lora_r", 64)) if use_lora else None,
        lora_targets=tuple(_get(model, "lora_target_modules", PROJECTIONS)),
        lora_dropout=float(_get(model, "lora_dropout", 0.0)),
        modules_to_save=tuple(_get(model, "modules_to_save", ())),
        quant_bits=int(_get(model, "bit_training", 4)) if use_lora and _get(model, "use_quant", False) else None,
        gradient_checkpointing=checkpointing,
        optimizer=str(_get(model, "optimizer", "adamw")),
        world_size=world_size,
        device="cpu" if str(_get(trainer, "accelerator", "auto")) == "cpu" else "cuda",
        **fields,
    )


def estimate_memory(config: Any, architecture: str | None = None, devices: int | None = None) -> Estimate:
    """The memory per device of the run a parsed `pandallm fit` config (with `model`, `data`, `trainer`) describes."""
    return estimate(run_of(config, architecture, devices))


def _parsed_fit_config(args: list[str]) -> Any:
    """`pandallm fit`'s config from `args`, parsed and linked, with nothing instantiated."""
    from pandallm.lightning_cli import PandaCLI, cli

    class ParseOnly(PandaCLI):
        def init_parser(self, **kwargs: Any) -> Any:
            return super().init_parser(**{**kwargs, "prog": "pandallm estimate"})  # errors name this command

        def instantiate_classes(self) -> None:
            pass

    return cli(args, run=False, cli_class=ParseOnly).config  # run=False: no subcommand, fit's options


def main(argv: list[str] | None = None) -> Estimate:
    parser = argparse.ArgumentParser(
        prog="pandallm estimate",
        description="Memory per device of a run as configured; the other options are pandallm fit's.",
    )
    parser.add_argument("--gpu_memory_gib", type=float, default=None, help="memory of each GPU: say whether it fits")
    parser.add_argument(
        "--architecture", default=None, help=f"a preset's shape instead of the checkpoint's: {list(PRESETS)}"
    )
    parser.add_argument("--devices", type=int, default=None, help="devices per node, where trainer.devices is auto")
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        help="a recipe or config piece, as pandallm fit takes it (repeatable); pandallm fit's other options "
        "(--model.*, --data.*, --trainer.*) apply too",
    )
    options, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    rest = [arg for config in options.config for arg in ("--config", config)] + rest
    if options.gpu_memory_gib is not None and options.gpu_memory_gib <= 0:
        raise ConfigError(f"--gpu_memory_gib {options.gpu_memory_gib:g}: give the memory of one GPU in GiB, above 0")
    if options.devices is not None and options.devices < 1:  # 0 or -2 printed "over -2 rank(s)" and a wrong total
        raise ConfigError(f"--devices {options.devices}: give the number of devices per node, at least 1")
    if options.architecture is not None and options.architecture not in PRESETS:
        raise ConfigError(f"--architecture '{options.architecture}': expected one of {list(PRESETS)}")
    run = run_of(_parsed_fit_config(rest), options.architecture, options.devices)
    result = estimate(run)
    s = run.shape
    print(
        f"pandallm estimate: {s.parameters / 1e9:.2f}B parameters ({s.layers} layers, hidden {s.hidden}), "
        f"{'LoRA r=' + str(run.lora_r) if run.lora_r else 'full training'}"
        f"{f', {run.quant_bits}-bit base' if run.quant_bits else ''}, batch {run.micro_batch} x {run.seq_len} tokens, "
        f"{run.precision}, {run.sharding} over {run.world_size} rank(s)"
        f"{', gradient checkpointing' if run.gradient_checkpointing else ''}"
    )
    print(result.report(options.gpu_memory_gib))
    return result


if __name__ == "__main__":
    main()
