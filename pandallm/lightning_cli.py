"""`pandallm fit / validate / test / predict`: the LightningCLI subclass. `pandallm.cli` dispatches to it (and imports
it, Lightning with it, only for these four commands)."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import Any, NoReturn

from jsonargparse import ActionYesNo, Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger

from pandallm import sweep
from pandallm.callbacks.ema import EMA
from pandallm.callbacks.export import HFExport
from pandallm.callbacks.final_validation import FinalValidation
from pandallm.callbacks.generation_metrics import GenerationMetrics
from pandallm.callbacks.graceful_stop import GracefulStop
from pandallm.callbacks.predictions import PredictionWriter
from pandallm.callbacks.rng import RNGState
from pandallm.callbacks.selection import BestCheckpoint, EarlyStop
from pandallm.callbacks.throughput import TokensPerSecond
from pandallm.checkpoint.atomic import AtomicCheckpoints, recover_swaps
from pandallm.checkpoint.load import safe_load
from pandallm.checkpoint.sharded import model_defaults, module_arguments
from pandallm.cli import TOOLS
from pandallm.data.datamodule import PandaDataModule
from pandallm.data.template import trained_rendering
from pandallm.generate.options import GenerationOptions
from pandallm.model.module import PandaLLM
from pandallm.objectives.base import objective_class
from pandallm.run_dir import align_loggers
from pandallm.stop import STOP
from pandallm.suggest import explain
from pandallm.writable import check_run_directories


def resolve_tokenizer(model_name_or_path: str, tokenizer: str | None) -> str:
    """The data module tokenizes with the model's tokenizer: `model.tokenizer`, else the checkpoint's own."""
    return tokenizer or model_name_or_path


def recorded_data(checkpoint: dict) -> dict:
    """The data settings a pandallm checkpoint records (`pandallm.checkpoint.compat`), as `data.*` parser defaults."""
    recorded = (checkpoint.get("pandallm") or {}).get("data") or {}
    arguments = module_arguments(PandaDataModule, recorded)
    return {f"data.{name}": value for name, value in arguments.items() if name != "tokenizer"}  # linked from the model


def objective_rows(objective: Namespace) -> str:
    return objective_class(objective.class_path, "model.objective").rows


def objective_passes(objective: Namespace) -> int:
    """Optimizer steps per rollout of an online RL objective (its `passes_option`), 1 for every other objective."""
    cls = objective_class(objective.class_path, "model.objective")
    if cls.passes_option is None:
        return 1
    init_args = objective.get("init_args") or {}
    value = init_args.get(cls.passes_option) if hasattr(init_args, "get") else None
    if value is None:
        value = inspect.signature(cls.__init__).parameters[cls.passes_option].default
    return int(value)


class PandaParser(LightningArgumentParser):
    """A parse error as `pandallm fit: error: MESSAGE`, with the valid keys nearest to a misspelled one, instead of
    argparse's usage (a hundred lines of options) before the message."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:  # jsonargparse parsing inside a parse: it handles the error
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        keys = [action.dest for action in parser._actions if action.option_strings and action.dest != "help"]
        print(f"{prog}: error: {explain(message, keys)}", file=sys.stderr)
        print(f"({prog} --help lists the options; --print_config shows them resolved)", file=sys.stderr)
        sys.exit(2)


class PandaCLI(LightningCLI):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Only the named subcommand's parser is built: each costs jsonargparse's introspection of every class of the
        # run (0.7 s of a command's start, times four). All four when the command line starts with another word
        # (`pandallm --help`), so that the choices and their help stay complete.
        argv = kwargs.get("args")
        argv = sys.argv[1:] if argv is None else argv
        first = argv[0] if isinstance(argv, list | tuple) and argv else None
        self._only_subcommand = first if first in LightningCLI.subcommands() else None
        super().__init__(*args, **kwargs)

    def subcommands(self) -> dict[str, set[str]]:  # a staticmethod in LightningCLI, always called on the instance
        everything = LightningCLI.subcommands()
        only = getattr(self, "_only_subcommand", None)
        return {only: everything[only]} if only else everything

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments(
            ("model.model_name_or_path", "model.tokenizer"), "data.tokenizer", compute_fn=resolve_tokenizer
        )
        parser.link_arguments("model.special_tokens", "data.special_tokens")
        # The rows the data module builds are the ones the objective trains on.
        parser.link_arguments("model.objective", "data.rows", compute_fn=objective_rows)
        parser.link_arguments("model.objective", "data.rollout_passes", compute_fn=objective_passes)
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

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand == "fit":
            parser.add_argument(
                "--dry_run",
                action=ActionYesNo,  # `--dry_run` alone, as a flag
                default=False,
                help="Resolve the config, read and check the data, build the model on the meta device, print the "
                "optimizer steps, tokens per step, trainable parameters and memory estimate; train nothing",
            )
        if subcommand == "predict":
            parser.add_argument(
                "--output",
                type=str | None,
                default=None,
                help="The predictions file (predictions.path); default predictions.jsonl beside the checkpoint's run",
            )
        return parser

    def fit(self, model: PandaLLM, datamodule: PandaDataModule, **kwargs: Any) -> None:
        """`trainer.fit`, or with `--dry_run` the figures of the run (`pandallm.dry_run`) and no training."""
        if not self.config.fit.get("dry_run"):
            self.trainer.fit(model, datamodule, **kwargs)
            return
        from pandallm import dry_run

        result = dry_run.plan(self.trainer, model, datamodule, self.config.fit)
        print(dry_run.report(result, self.trainer, model, datamodule))

    def before_instantiate_classes(self) -> None:
        config = self._subcommand_config()
        if self.config.get("subcommand") == "predict" and config.get("output"):
            config.predictions.path = config.output

    def _parse_ckpt_path(self) -> None:
        """Lightning's version loads an explicit `--ckpt_path` file's hyper-parameters over the parsed `model`
        options, so every `--model.*` a user passed was silently dropped (and `--ckpt_path last` behaved otherwise).
        pandallm makes them the defaults instead (`_checkpoint_defaults`), under the config and options given."""

    def _checkpoint_defaults(self) -> bool:
        """An explicit `--ckpt_path` file's recorded model settings become the `model.*` defaults: `validate`,
        `test` and `predict` need no config to rebuild the model, and a `--config` or `--model.*` given still wins
        (the checkpoint's record is then compared with the result as it loads: `pandallm.checkpoint.compat`). So do
        its data settings that decide how records become ids (`data.template`, ...): prompts are rendered as the
        model was trained. `validate`, `test` and `predict` take all the run's data settings as defaults (its
        `data.val_files`, `data.test_files`, ...): a checkpoint alone evaluates on the data its run held out."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self._subcommand_config().get("ckpt_path") if subcommand else None
        if not ckpt_path or not Path(ckpt_path).is_file():
            return False  # `last`, or a sharded directory: resolved by Lightning later
        checkpoint = safe_load(ckpt_path)
        recorded = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
        if not recorded:
            return False  # not a pandallm checkpoint: refused with that message when it loads
        data = {} if subcommand == "fit" else recorded_data(checkpoint)
        self._parser(subcommand).set_defaults(
            {**model_defaults(PandaLLM.recorded_arguments(recorded)), **data, **trained_rendering(checkpoint)}
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
        align_loggers(self.trainer.loggers)  # one run directory for every logger, before anything is written
        # Before data preparation and the first step, not at the first save after hours of training.
        check_run_directories(self.trainer, self.config.get("subcommand"), getattr(self.datamodule, "cache_dir", None))
        # Before Lightning resolves `--ckpt_path last`, which happens before any callback hook runs.
        for callback in self.trainer.checkpoint_callbacks:
            if getattr(callback, "dirpath", None):
                recover_swaps(callback.dirpath)

    def _subcommand_config(self) -> Namespace:
        subcommand = self.config.get("subcommand")
        return self.config[subcommand] if subcommand else self.config


def cli(args: list[str] | None = None, run: bool = True, cli_class: type[PandaCLI] = PandaCLI) -> PandaCLI:
    return cli_class(
        PandaLLM,
        PandaDataModule,
        args=args,
        run=run,
        seed_everything_default=42,
        trainer_defaults={
            "logger": {"class_path": CSVLogger.__module__ + ".CSVLogger", "init_args": {"save_dir": "runs"}},
            "callbacks": [TokensPerSecond(), RNGState(), GracefulStop(), AtomicCheckpoints(), FinalValidation()],
            "use_distributed_sampler": False,  # PandaDataModule shards the data across ranks itself
        },
        parser_class=PandaParser,
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
