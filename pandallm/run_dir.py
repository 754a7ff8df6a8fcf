"""One run, one directory: every logger of a run writes under the same `save_dir/name/version_N`.

Lightning numbers each logger's versions on its own, so a run with CSV and TensorBoard logs (the recipe plus
`configs/loggers/tensorboard.yaml`) wrote its metrics and `hf/` to `runs/tiny/version_4` and its events to
`runs/tiny/version_5`. Here the first logger with numbered versions decides the directory, and the others are pointed
at it before anything is written: TensorBoard's events, the CSV metrics and Weights & Biases' files (`wandb/` inside
it) all land in `trainer.log_dir`.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


def _numbered(logger: Any) -> bool:
    """CSVLogger and TensorBoardLogger (Lightning's and Fabric's): `save_dir/name/version_N`."""
    return all(hasattr(logger, attribute) for attribute in ("_root_dir", "_name", "_version"))


def align_loggers(loggers: list[Any]) -> str | None:
    """Point every logger at the run directory of the first numbered one; returns that directory (None: no logger
    with numbered versions, nothing to align)."""
    reference = next((logger for logger in loggers if _numbered(logger)), None)
    if reference is None:
        return None
    save_dir, name, version = reference.save_dir, reference.name, reference.version  # `version`: decided now
    for logger in loggers:
        if logger is reference:
            continue
        if _numbered(logger):
            logger._root_dir, logger._name, logger._version = save_dir, name, version
            if hasattr(logger, "_save_dir"):  # Lightning's CSVLogger keeps both
                logger._save_dir = save_dir
        elif hasattr(logger, "_wandb_init") and getattr(logger, "_experiment", None) is None:
            logger._wandb_init["dir"] = logger._save_dir = reference.log_dir
    for logger in loggers:
        init = getattr(logger, "_wandb_init", None)
        if isinstance(init, dict) and init.get("anonymous") is None:
            # Lightning passes `anonymous=None`, and wandb warns that the setting has no effect on every run.
            init.pop("anonymous", None)
    return reference.log_dir
