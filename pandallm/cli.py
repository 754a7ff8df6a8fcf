"""The `pandallm` command: LightningCLI's fit / validate / test / predict, plus tool commands."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger

from pandallm import sweep
from pandallm.callbacks.ema import EMA
from pandallm.callbacks.export import HFExport
from pandallm.callbacks.generation_metrics import GenerationMetrics
from pandallm.callbacks.graceful_stop import STOP, GracefulStop, StoppedBySignal
from pandallm.callbacks.predictions import PredictionWriter
from pandallm.callbacks.rng import RNGState
from pandallm.callbacks.selection import BestCheckpoint, EarlyStop
from pandallm.callbacks.throughput import TokensPerSecond
from pandallm.checkpoint.atomic import AtomicCheckpoints, recover_swaps
from pandallm.checkpoint.load import safe_load
from pandallm.checkpoint.sharded import model_defaults
from pandallm.data.datamodule import PandaDataModule
from pandallm.data.template import trained_rendering
from pandallm.errors import PandaError
from pandallm.generate.options import GenerationOptions
from pandallm.model.module import PandaLLM
from pandallm.objectives.base import objective_class
from pandallm.writable import check_run_directories

SUBCOMMANDS = ("fit", "validate", "test", "predict")  # LightningCLI's
ALIASES = {"generate": "predict"}
# Tool commands, dispatched before LightningCLI: name -> "module:function" (imported only when used).
TOOLS = {
    "train-tokenizer": "pandallm.tools.train_tokenizer:main",
    "extend-vocab": "pandallm.tools.extend_vocab:main",
    "export": "pandallm.tools.export:main",
    "fetch-smollm2": "pandallm.tools.smollm2:main",
    "data": "pandallm.tools.data:main",
    "chat": "pandallm.tools.chat:main",
}


def resolve_tokenizer(model_name_or_path: str, tokenizer: str | None) -> str:
    """The data module tokenizes with the model's tokenizer: `model.tokenizer`, else the checkpoint's own."""
    return tokenizer or model_name_or_path


def objective_rows(objective: Namespace) -> str:
    return objective_class(objective.class_path, "model.objective").rows


class PandaCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments(
            ("model.model_name_or_path", "model.tokenizer"), "data.tokenizer", compute_fn=resolve_tokenizer
        )
        # The rows the data module builds are the ones the objective trains on.
        parser.link_arguments("model.objective", "data.rows", compute_fn=objective_rows)
        parser.add_lightning_class_args(HFExport, "export")
        parser.add_lightning_class_args(PredictionWriter, "predictions")
        # Generation, its metrics, and choosing the model by them: pandallm.generate, pandallm.callbacks.
        parser.add_class_arguments(GenerationOptions, "generation")
        parser.add_lightning_class_args(GenerationMetrics, "evaluation")
        parser.add_lightning_class_args(EMA, "ema")
        parser.add_lightning_class_args(EarlyStop, "early_stopping")
        parser.add_lightning_class_args(BestCheckpoint, "best_checkpoint")
        parser.add_argument(
            "--sweep",
            type=str | None,
            default=None,
            help="Sweep file: a YAML list of override sets; the selected one is applied last (pandallm.sweep)",
        )
        parser.add_argument(
            "--sweep_index",
            type=int | None,
            default=None,
            help="Entry of the sweep file to run; default SLURM_ARRAY_TASK_ID",
        )

    def _parse_ckpt_path(self) -> None:
        """Lightning's version loads an explicit `--ckpt_path` file's hyper-parameters over the parsed `model`
        options, so every `--model.*` a user passed was silently dropped (and `--ckpt_path last` behaved otherwise).
        pandallm makes them the defaults instead (`_checkpoint_defaults`), under the config and options given."""

    def _checkpoint_defaults(self) -> bool:
        """An explicit `--ckpt_path` file's recorded model settings become the `model.*` defaults: `validate`,
        `test` and `predict` need no config to rebuild the model, and a `--config` or `--model.*` given still wins
        (the checkpoint's record is then compared with the result as it loads: `pandallm.checkpoint.compat`). So do
        its data settings that decide how records become ids (`data.template`, ...): prompts are rendered as the
        model was trained."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self._subcommand_config().get("ckpt_path") if subcommand else None
        if not ckpt_path or not Path(ckpt_path).is_file():
            return False  # `last`, or a sharded directory: resolved by Lightning later
        checkpoint = safe_load(ckpt_path)
        recorded = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
        if not recorded:
            return False  # not a pandallm checkpoint: refused with that message when it loads
        self._parser(subcommand).set_defaults(
            {**model_defaults(PandaLLM.recorded_arguments(recorded)), **trained_rendering(checkpoint)}
        )
        return True

    def parse_arguments(self, parser: LightningArgumentParser, args: list[str] | None) -> None:
        argv = list(sys.argv[1:] if args is None else args)
        # jsonargparse prints the config and exits while parsing; with a sweep, printing waits for the sweep.
        printing = any(a.startswith("--print_config") for a in argv)
        argv_to_run = [a for a in argv if not a.startswith("--print_config")]
        self.config = parser.parse_args(argv_to_run)
        if self._checkpoint_defaults():
            self.config = parser.parse_args(argv_to_run)
        config = self._subcommand_config()
        if not config.get("sweep"):
            if printing:
                parser.parse_args(argv)
            return
        points = sweep.load_points(config.sweep)
        index = sweep.resolve_index(config.sweep_index)
        point = sweep.select(points, index, config.sweep)
        print(f"pandallm: sweep {config.sweep}, entry {index}: {sweep.describe(point)}", file=sys.stderr)
        self.config = parser.parse_args([*argv_to_run, "--config", sweep.as_config(point)])
        directory = sweep.pin_run_directory(self._subcommand_config(), sweep.run_name(index))
        print(f"pandallm: sweep run directory {directory}", file=sys.stderr)
        if printing:
            print(self._parser(self.config.get("subcommand")).dump(self._subcommand_config(), skip_none=False), end="")
            sys.exit(0)

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        self.model.generation = self._get(self.config_init, "generation")
        STOP.check()
        # Before data preparation and the first step, not at the first save after hours of training.
        check_run_directories(self.trainer, self.config.get("subcommand"), getattr(self.datamodule, "cache_dir", None))
        # Before Lightning resolves `--ckpt_path last`, which happens before any callback hook runs.
        for callback in self.trainer.checkpoint_callbacks:
            if getattr(callback, "dirpath", None):
                recover_swaps(callback.dirpath)

    def _subcommand_config(self) -> Namespace:
        subcommand = self.config.get("subcommand")
        return self.config[subcommand] if subcommand else self.config


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
        # No abbreviated option names: `--trainer.max_step` must be an error, not a silent `--trainer.max_steps`.
        parser_kwargs={
            "prog": "pandallm",
            "description": "pandallm: train LLaMA-family models (instruction tuning, pretraining)",
            "epilog": "tool commands (each with --help): " + ", ".join(TOOLS),
            "allow_abbrev": False,
        },
    )


def main(args: list[str] | None = None) -> None:
    # First thing: a stop signal from here to the exit ends with status 143 (`StopSignals`), in whatever phase.
    fresh = STOP.install([signal.SIGTERM, signal.SIGUSR1], [signal.SIGUSR1])
    try:
        _run_command(args)
        STOP.check()  # a signal after the last hook that could act on it
    except StoppedBySignal:
        STOP.requeue_if_asked()
        STOP.stop_launched_ranks()
        raise
    finally:
        if fresh and args is not None:  # called from Python: the caller's handlers come back
            STOP.restore()


def _run_command(args: list[str] | None) -> None:
    argv = sys.argv[1:] if args is None else args
    if argv and argv[0] in TOOLS:
        module_name, function = TOOLS[argv[0]].split(":")
        STOP.enter(f"pandallm {argv[0]}", "stopping now")
        try:
            getattr(__import__(module_name, fromlist=[function]), function)(argv[1:])
        except PandaError as error:
            if args is not None:  # called from Python: the caller handles it
                raise
            # From the shell: the message names the file, line or option; a traceback would bury it.
            print(f"pandallm {argv[0]}: error: {error}", file=sys.stderr)
            sys.exit(2)
        return
    if argv and argv[0] in ALIASES:
        argv = [ALIASES[argv[0]], *argv[1:]]
        if args is None:
            sys.argv[1] = argv[0]  # LightningCLI reads the shell's arguments from sys.argv
        else:
            args = argv
    if argv and not argv[0].startswith("-") and argv[0] not in SUBCOMMANDS:
        # LightningCLI would answer with its four subcommands only, as if the tools did not exist.
        print(
            f"pandallm: error: unknown command '{argv[0]}'; the commands are "
            f"{', '.join([*SUBCOMMANDS, *TOOLS, *ALIASES])}",
            file=sys.stderr,
        )
        sys.exit(2)
    cli(args)


if __name__ == "__main__":
    main()
