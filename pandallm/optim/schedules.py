"""Learning-rate schedules as pure functions of the optimizer step.

A schedule returns the multiplier of the base learning rate. Being a function of the step alone, it resumes
exactly: restoring the scheduler's step count restores the learning rate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

ScheduleName = Literal["linear", "cosine", "constant", "poly", "warmup"]


@dataclass(frozen=True)
class Schedule:
    """`name`: `constant` keeps the base rate (no warmup); `warmup` ramps up linearly over `warmup_steps`, then
    stays; `linear`, `cosine` and `poly` ramp up, then decay to `min_ratio` of the base rate at `total_steps`.
    """

    name: ScheduleName
    total_steps: int
    warmup_steps: int = 0
    min_ratio: float = 0.0
    power: float = 1.0

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise ValueError(f"a schedule needs at least one step, got total_steps={self.total_steps}")
        if not self.warmup_steps >= 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")

    def __call__(self, step: int) -> float:
        if self.name == "constant":
            return 1.0
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.name == "warmup":
            return 1.0
        decay_steps = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / decay_steps, 1.0)
        if self.name == "linear":
            remaining = 1.0 - progress
        elif self.name == "cosine":
            remaining = 0.5 * (1.0 + math.cos(math.pi * progress))
        elif self.name == "poly":
            remaining = (1.0 - progress) ** self.power
        else:
            raise ValueError(f"unknown schedule '{self.name}'")
        return self.min_ratio + (1.0 - self.min_ratio) * remaining


def warmup_steps(total_steps: int, steps: int, proportion: float | None) -> int:
    """`proportion` of `total_steps` when given, else `steps`."""
    if proportion is None:
        return steps
    if not 0.0 <= proportion <= 1.0:
        raise ValueError(f"warmup_proportion must be in [0, 1], got {proportion}")
    return round(proportion * total_steps)


def schedule_from(settings: Mapping[str, Any], total_steps: int) -> Schedule:
    """The schedule a module's settings (`lr_scheduler`, `warmup_steps`, `warmup_proportion`, `min_lr_ratio`,
    `poly_power`) describe, over `total_steps`."""
    return Schedule(
        settings["lr_scheduler"],
        total_steps,
        warmup_steps(total_steps, settings["warmup_steps"], settings["warmup_proportion"]),
        settings["min_lr_ratio"],
        settings["poly_power"],
    )


def run_steps(trainer: Any, datamodule: Any) -> int:
    """Optimizer steps of a `fit` of `trainer` (its epochs, `max_steps`, accumulation, `limit_train_batches`) over
    `datamodule` (a `PandaDataModule` set up for `fit`)."""
    batches = datamodule.num_train_batches(trainer.world_size)
    limit = trainer.limit_train_batches
    if math.isinf(batches):  # an endless stream: the run is `max_steps` long
        return total_optimizer_steps(1, 1, None, trainer.max_steps)
    batches = min(batches, limit) if isinstance(limit, int) else max(int(batches * limit), 1)
    return total_optimizer_steps(batches, trainer.accumulate_grad_batches, trainer.max_epochs, trainer.max_steps)


def total_optimizer_steps(
    batches_per_epoch: int, accumulate_grad_batches: int, max_epochs: int | None, max_steps: int
) -> int:
    """Optimizer steps in the run, computed from the data rather than `trainer.estimated_stepping_batches`.

    Reading `estimated_stepping_batches` makes Lightning build the train dataloader early, after which a
    stateful dataloader's restored position is silently dropped (Lightning #20550). Lightning steps on the last
    batch of an epoch even when the accumulation window is incomplete, hence the ceil.
    """
    steps_per_epoch = math.ceil(batches_per_epoch / accumulate_grad_batches)
    candidates = []
    if max_epochs is not None and max_epochs >= 0:
        candidates.append(steps_per_epoch * max_epochs)
    if max_steps is not None and max_steps >= 0:
        candidates.append(max_steps)
    if not candidates:
        raise ValueError("set trainer.max_epochs or trainer.max_steps: the schedule needs the run's length")
    return max(min(candidates), 1)
