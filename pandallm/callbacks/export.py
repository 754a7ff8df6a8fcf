"""Exporting the trained model in Hugging Face format when `fit` ends."""

from __future__ import annotations

import logging
from contextlib import ExitStack
from pathlib import Path
from typing import Literal

import lightning as L

from pandallm.checkpoint.sharded import gather_full_state_dict, hf_weights, plain_model
from pandallm.errors import ConfigError
from pandallm.model.export import check_export_target, save_hf
from pandallm.model.parallel import shards_parameters
from pandallm.model.zero import allow_export, consolidated_weights, is_zero3

log = logging.getLogger(__name__)


class HFExport(L.Callback):
    def __init__(
        self,
        enabled: bool = True,
        dirpath: str | None = None,
        adapter_save_type: Literal["adapter_only", "merge"] = "adapter_only",
    ) -> None:
        """
        Args:
            enabled: Export the final weights and the tokenizer when `fit` finishes.
            dirpath: Where; default `hf/` inside the run directory (the logger's directory).
            adapter_save_type: For LoRA runs: `adapter_only` writes a PEFT adapter directory (adapters, and the
                `modules_to_save`), `merge` a plain Hugging Face checkpoint with the adapters merged in.
        """
        self.enabled = enabled
        self.dirpath = dirpath
        self.adapter_save_type = adapter_save_type

    def directory(self, trainer: L.Trainer) -> Path:
        return Path(self.dirpath) if self.dirpath else Path(trainer.log_dir or trainer.default_root_dir) / "hf"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.enabled and stage == "fit":
            allow_export(trainer.strategy)  # before DeepSpeed's engine reads its config
            # Refused before training, not after it: a directory that is not an earlier export, or one the run
            # itself fills (its log or checkpoint directory, or a parent of one).
            directory = self.directory(trainer).resolve()
            run_dirs = [
                Path(trainer.default_root_dir),
                *(Path(c.dirpath) for c in trainer.checkpoint_callbacks if c.dirpath),
            ]
            if trainer.log_dir:
                run_dirs.append(Path(trainer.log_dir))
            for run_dir in run_dirs:
                if directory == run_dir.resolve() or directory in run_dir.resolve().parents:
                    raise ConfigError(
                        f"export.dirpath '{directory}': the run writes there ({run_dir}), and the export replaces the "
                        "directory; give a directory of its own"
                    )
            check_export_target(directory)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled:
            return
        strategy = trainer.strategy
        directory = self.directory(trainer)  # on every rank: `trainer.log_dir` is a collective under DDP
        # Decided on rank 0 and shared, so that every rank stops together rather than wait at the barrier below.
        problem = None
        if trainer.is_global_zero:
            try:
                check_export_target(directory)
            except ConfigError as error:
                problem = str(error)
        problem = strategy.broadcast(problem)
        if problem:
            raise ConfigError(
                f"{problem} (the trained weights are in the run's checkpoints: export one with "
                "`pandallm export --ckpt_path`)"
            )
        if shards_parameters(strategy) and pl_module.is_adapter_run:
            # Adapters of a sharded run are exported from its checkpoint, where they are whole.
            log.warning(
                "pandallm: no Hugging Face export at the end of a sharded LoRA run; export its checkpoint with "
                "`pandallm export --ckpt_path <checkpoint> --output <dir>`"
            )
            return
        # The Jinja template the run trained with, for `apply_chat_template` on the export (None: the tokenizer's).
        template = getattr(getattr(trainer, "datamodule", None), "chat_template", None)
        source = template.source if template is not None else None
        # Callbacks that choose the exported weights (`ema`, `best_checkpoint`) put them in place for the export.
        with ExitStack() as weights:
            for callback in trainer.callbacks:
                if hasattr(callback, "export_weights"):
                    weights.enter_context(callback.export_weights(trainer, pl_module))
            self._export(trainer, pl_module, directory, source)

    def _export(self, trainer: L.Trainer, pl_module: L.LightningModule, directory: Path, source: str | None) -> None:
        strategy = trainer.strategy
        if shards_parameters(strategy):
            # Every rank holds a shard: all of them take part in gathering the whole tensors onto rank 0's CPU.
            weights = consolidated_weights(strategy) if is_zero3(strategy) else gather_full_state_dict(strategy.model)
            if trainer.is_global_zero:
                model = plain_model(pl_module.config, hf_weights(weights), pl_module.objective.head)
                save_hf(model, pl_module.tokenizer, directory, source)
        elif trainer.is_global_zero:
            pl_module.export_hf(directory, self.adapter_save_type, source)
        if trainer.is_global_zero:
            log.info("pandallm: exported the model in Hugging Face format to %s", directory)
        strategy.barrier("hf_export")
