"""Sweeps: a YAML list of override sets, one run per entry; a SLURM job array runs one entry per task.

    # sweep.yaml: each entry overrides keys of the run's config, in dotted or nested form
    - {model.learning_rate: 1.0e-3}
    - {model.learning_rate: 3.0e-3, data.per_device_train_batch_size: 16}
    - model: {learning_rate: 1.0e-2}

    pandallm fit --config recipes/llama7b.yaml --sweep sweep.yaml --sweep_index 1
    sbatch --array=0-2 recipes/slurm/sweep.sbatch recipes/llama7b.yaml sweep.yaml   # index = SLURM_ARRAY_TASK_ID

The selected entry is applied after everything else on the command line. Each entry's run gets its own directory,
`<save_dir>/<name>/<run name>/` (logger versions and `checkpoints/` inside), where the run name is
`<ARRAYJOBID>_<TASKID>` in a job array (`<JOBID>_<index>` in another SLURM job, `sweep_<index>` outside SLURM): a
requeued task finds its own `last.ckpt` there and no two tasks share a checkpoint.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint

from pandallm import slurm
from pandallm.errors import ConfigError


def load_points(path: str | Path) -> list[dict[str, Any]]:
    """The entries of a sweep file, each as a nested dict of overrides."""
    path = Path(path)
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"--sweep {path}: cannot read the sweep file: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"--sweep {path}: not valid YAML: {e}") from e
    if not isinstance(loaded, list) or not loaded:
        raise ConfigError(f"--sweep {path}: expected a non-empty YAML list of override sets, got {_kind(loaded)}")
    points = []
    for number, entry in enumerate(loaded):
        if not isinstance(entry, dict):
            raise ConfigError(
                f"--sweep {path}: entry {number}: expected a mapping of config keys to values, got {_kind(entry)}"
            )
        points.append(nested(entry, f"--sweep {path}: entry {number}"))
    return points


def _kind(value: Any) -> str:
    return "nothing" if value is None else type(value).__name__


def nested(entry: Mapping[str, Any], where: str) -> dict[str, Any]:
    """`{"model.learning_rate": x}` -> `{"model": {"learning_rate": x}}`; nested parts are merged key by key."""
    result: dict[str, Any] = {}
    for key, value in entry.items():
        if not isinstance(key, str) or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"{where}: {key!r} is not a config key such as model.learning_rate")
        *parents, leaf = key.split(".")
        node = result
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{where}: key {key!r} conflicts with a value set for {part!r}")
        if isinstance(value, dict):
            value = nested(value, where)
            if isinstance(node.get(leaf), dict):
                value = _merge(node[leaf], value, f"{where}: key {key!r}")
        elif leaf in node:
            raise ConfigError(f"{where}: key {key!r} is set twice")
        node[leaf] = value
    return result


def _merge(a: dict[str, Any], b: dict[str, Any], where: str) -> dict[str, Any]:
    merged = dict(a)
    for key, value in b.items():
        if isinstance(merged.get(key), dict) and isinstance(value, dict):
            merged[key] = _merge(merged[key], value, where)
        elif key in merged:
            raise ConfigError(f"{where}: {key!r} is set twice")
        else:
            merged[key] = value
    return merged


def select(points: list[dict[str, Any]], index: int, path: str | Path) -> dict[str, Any]:
    if not 0 <= index < len(points):
        raise ConfigError(
            f"--sweep {path}: index {index} is out of range; the file has {len(points)} entries (0 to "
            f"{len(points) - 1}); submit with --array=0-{len(points) - 1}"
        )
    return points[index]


def resolve_index(sweep_index: int | None, env: Mapping[str, str] = os.environ) -> int:
    """`--sweep_index` when given, else the SLURM array task id."""
    if sweep_index is not None:
        return sweep_index
    task = slurm.array_task(env)
    if task is None:
        raise ConfigError("--sweep needs --sweep_index, or a SLURM job array to take SLURM_ARRAY_TASK_ID from")
    return task[1]


def run_name(index: int, env: Mapping[str, str] = os.environ) -> str:
    """The name of one sweep point's run directory; stable across requeues of the same task."""
    task = slurm.array_task(env)
    if task is not None and task[1] == index:
        return f"{task[0]}_{task[1]}"
    if slurm.in_job(env):
        return f"{(task or (env['SLURM_JOB_ID'],))[0]}_{index}"
    return f"sweep_{index}"


def as_config(point: dict[str, Any]) -> str:
    """The entry as a YAML document, for jsonargparse's `--config`: values are type-checked like any config."""
    return yaml.safe_dump(point, default_flow_style=True, sort_keys=False).strip()


def describe(point: dict[str, Any], prefix: str = "") -> str:
    """`model.learning_rate=0.001, ...`, for the log."""
    parts = []
    for key, value in point.items():
        if isinstance(value, dict) and value:
            parts.append(describe(value, f"{prefix}{key}."))
        else:
            parts.append(f"{prefix}{key}={value!r}")
    return ", ".join(parts)


def _is_subclass(class_path: str, base: type) -> bool:
    module_name, _, name = class_path.rpartition(".")
    try:
        found = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError):
        return False
    return isinstance(found, type) and issubclass(found, base)


def _entries(value: Any) -> list[Namespace]:
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, Namespace) and "init_args" in v]


def pin_run_directory(config: Namespace, name: str) -> Path:
    """Point the run's loggers and checkpoints at `<save_dir>/<logger name>/<name>/` in a parsed `fit` config.

    Loggers keep their save_dir and name one level up and get a version per (re)start below the run directory;
    every `ModelCheckpoint` writes to `<run directory>/checkpoints`, where `--ckpt_path last` looks on a requeue.
    """
    trainer = config.trainer
    loggers = [entry for entry in _entries(trainer.logger) if "save_dir" in entry.init_args]
    if loggers:
        first = loggers[0].init_args
        parent = Path(first.save_dir or ".") / (first.get("name") or "")
    else:
        parent = Path(trainer.default_root_dir or ".")
    directory = parent / name
    for entry in loggers:
        args = entry.init_args
        args.save_dir = str(Path(args.save_dir or ".") / (args.get("name") or ""))
        if "name" in args:
            args.name = name
    checkpoints = [entry for entry in _entries(trainer.callbacks) if _is_subclass(entry.class_path, ModelCheckpoint)]
    if not checkpoints:
        raise ConfigError(
            "--sweep: the run has no ModelCheckpoint in trainer.callbacks; a sweep task resumes from its own "
            "checkpoint directory, so configure one (the recipes do)"
        )
    for entry in checkpoints:
        entry.init_args.dirpath = str(directory / "checkpoints")
    return directory
