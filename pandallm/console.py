"""What a command prints: pandallm's own log lines, and not the libraries' notices that ask nothing of the user.

Light on purpose (logging and warnings only): `pandallm.cli` calls it before it imports Lightning or transformers,
so that the filters are in place when those libraries print their notices at import.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import warnings
from collections.abc import Iterator

from pandallm.stop import rank_zero_by_environment

# Warnings that tell a pandallm user nothing to act on, as (message regex, why it is dropped).
NOISE = [
    # Lightning, for every run on a machine where SLURM is installed but the run was not started with srun.
    (r"The `srun` command is available on your system but is not used", "not a SLURM run: nothing is wrong"),
    # torch's deprecation of an API Lightning calls; nothing the user can change.
    (r".*isinstance\(treespec, LeafSpec\)", "Lightning's use of a torch API"),
    # The recipes write checkpoints to a fixed directory so that `--ckpt_path last` finds them.
    (r"Checkpoint directory .* exists and is not empty", "the recipes' fixed checkpoint directory"),
    # pandallm passes explicit arguments from `main` (after taking `--traceback` out).
    (r"LightningCLI's args parameter is intended to run from within Python", "pandallm.cli passes them"),
]
# Only where a checkpoint is read to evaluate it: the training callbacks it names are not needed there.
NOISE_OUTSIDE_FIT = [(r"Be aware that when using `ckpt_path`, callbacks used to create the checkpoint", "")]
# Log records of other libraries, by logger name: (logger, message regex).
LOG_NOISE = [
    # bitsandbytes, at import (peft imports it): an optional faster CPU kernel it may not download.
    ("bitsandbytes.backends.cpu.ops", r"Failed to load CPU gemm_4bit_forward"),
    # Lightning's advertisements for its cloud services.
    ("lightning.pytorch.utilities.rank_zero", r"💡 Tip"),
    ("lightning.fabric.utilities.rank_zero", r"💡 Tip"),
]


class _DropMatching(logging.Filter):
    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


def quiet(command: str) -> None:
    """Drop the libraries' notices in `NOISE` and `LOG_NOISE` for the rest of the process."""
    for pattern, _ in NOISE + (NOISE_OUTSIDE_FIT if command != "fit" else []):
        warnings.filterwarnings("ignore", message=pattern)
    for name, pattern in LOG_NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMatching) and f.pattern.pattern == pattern for f in logger.filters):
            logger.addFilter(_DropMatching(pattern))


class _ConsoleHandler(logging.StreamHandler):
    """pandallm's log lines on stderr: INFO and up on rank 0 (what the data became, where things were written),
    warnings only on the other ranks, which would repeat them."""

    @property  # `sys.stderr` when the line is written, not when the handler was made: it may have been replaced since
    def stream(self):  # (a test's capture, closed by now)
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def show_pandallm_logs() -> None:
    logger = logging.getLogger("pandallm")
    if any(isinstance(h, _ConsoleHandler) for h in logger.handlers):
        return
    handler = _ConsoleHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.setLevel(logging.INFO if rank_zero_by_environment() else logging.WARNING)
    logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)


@contextlib.contextmanager
def no_progress_bars() -> Iterator[None]:
    """`datasets` and transformers without their progress bars, for steps whose bar says nothing (saving a cache
    entry, packing into blocks, writing the one shard of an export); the tokenizing bars stay."""
    import datasets
    from transformers.utils import logging as transformers_logging

    enabled = datasets.is_progress_bar_enabled(), transformers_logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled[0]:
            datasets.enable_progress_bars()
        if enabled[1]:
            transformers_logging.enable_progress_bar()
