"""Optimizer settings and run length changed on resume: applied, not only reported.

Lightning restores the optimizer's parameter groups (learning rate, betas, epsilon, weight decay) and the LR
scheduler (its base rates and its `Schedule`, length included) from the checkpoint, after the module has built them
from the new config, so a user who resumes with a lower learning rate would train on with the old one, and one who
resumes a finished run with more epochs would train every added step at the end of the old decay (learning rate 0
under `cosine` or `linear`). These are put back to the config's values and the run's length once the checkpoint is
restored; the moments and the step count stay the checkpoint's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch.optim.lr_scheduler import LambdaLR

from pandallm.optim.schedules import Schedule, schedule_from

SETTINGS = (
    "learning_rate",
    "adam_betas",
    "adam_epsilon",
    "weight_decay",
    "lr_scheduler",
    "warmup_steps",
    "warmup_proportion",
    "min_lr_ratio",
    "poly_power",
)


def changed_settings(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """The optimizer and schedule settings that differ between a checkpoint's hyper-parameters and the config."""
    return [name for name in SETTINGS if name in saved and _plain(saved[name]) != _plain(current.get(name))]


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple | list) else value  # YAML gives lists where the code has tuples


def restored_length(scheduler: LambdaLR) -> int | None:
    """The number of steps a restored `scheduler`'s schedule was made for (None: not a pandallm `Schedule`)."""
    schedule = scheduler.lr_lambdas[0]
    return schedule.total_steps if isinstance(schedule, Schedule) else None


def apply_settings(optimizer: Any, scheduler: LambdaLR, h: Mapping[str, Any], total_steps: int) -> None:
    """Put the config's optimizer and schedule settings, over `total_steps` (this run's length), into a restored
    `optimizer` and `scheduler`."""
    groups = optimizer.param_groups
    for index, group in enumerate(groups):
        if "betas" in group:
            group["betas"] = tuple(h["adam_betas"])
        if "eps" in group:
            group["eps"] = h["adam_epsilon"]
        # `decay_groups`' layout: matrices, then norms and biases (never decayed). Under DeepSpeed an empty group is
        # left out: the one left is the matrices' (a LoRA run trains no norms; every run trains some matrix).
        group["weight_decay"] = h["weight_decay"] if index == 0 else 0.0
        group["initial_lr"] = h["learning_rate"]
    schedule = schedule_from(h, total_steps)
    scheduler.lr_lambdas = [schedule] * len(groups)
    scheduler.base_lrs = [h["learning_rate"]] * len(groups)
    # The rate of the step about to run, as LambdaLR computes it.
    for group, base in zip(groups, scheduler.base_lrs, strict=True):
        group["lr"] = base * schedule(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in groups]
