"""The `pandallm` command: LightningCLI's fit / validate / test / predict, plus tool commands."""

from __future__ import annotations

import sys

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger

from pandallm.callbacks.export import HFExport
from pandallm.callbacks.graceful_stop import GracefulStop
from pandallm.callbacks.predictions import PredictionWriter
from pandallm.callbacks.rng import RNGState
from pandallm.callbacks.throughput import TokensPerSecond
from pandallm.checkpoint.atomic import AtomicCheckpoints, recover_swaps
from pandallm.data.datamodule import PandaDataModule
from pandallm.model.module import PandaLLM

# Tool commands, dispatched before LightningCLI: name -> "module:function" (imported only when used).
TOOLS = {
    "train-tokenizer": "pandallm.tools.train_tokenizer:main",
    "export": "pandallm.tools.export:main",
}


def resolve_tokenizer(model_name_or_path: str, tokenizer: str | None) -> str:
    """The data module tokenizes with the model's tokenizer: `model.tokenizer`, else the checkpoint's own."""
    return tokenizer or model_name_or_path


class PandaCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments(
            ("model.model_name_or_path", "model.tokenizer"), "data.tokenizer", compute_fn=resolve_tokenizer
        )
        parser.add_lightning_class_args(HFExport, "export")
        parser.add_lightning_class_args(PredictionWriter, "predictions")

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        # Before Lightning resolves `--ckpt_path last`, which happens before any callback hook runs.
        for callback in self.trainer.checkpoint_callbacks:
            if getattr(callback, "dirpath", None):
                recover_swaps(callback.dirpath)


def cli(args: list[str] | None = None, run: bool = True) -> PandaCLI:
    return PandaCLI(
        PandaLLM,
        PandaDataModule,
        args=args,
        run=run,
        seed_everything_default=42,
        trainer_defaults={
            "logger": {"class_path": CSVLogger.__module__ + ".CSVLogger", "init_args": {"save_dir": "runs"}},
            "callbacks": [TokensPerSecond(), RNGState(), GracefulStop(), AtomicCheckpoints()],
            "use_distributed_sampler": False,  # PandaDataModule shards the data across ranks itself
        },
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,  # PandaLLM.configure_optimizers owns the optimizer and schedule
        parser_kwargs={"description": "pandallm: train LLaMA-family models (instruction tuning, pretraining)"},
    )


def main(args: list[str] | None = None) -> None:
    argv = sys.argv[1:] if args is None else args
    if argv and argv[0] in TOOLS:
        module_name, function = TOOLS[argv[0]].split(":")
        getattr(__import__(module_name, fromlist=[function]), function)(argv[1:])
        return
    cli(args)


if __name__ == "__main__":
    main()
