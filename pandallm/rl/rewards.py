"""Rewards of completions: Python functions named by import path, and reward models, weighted and summed.

`model.objective.init_args.rewards` is a list; each entry is one of

    {function: "package.module:name", weight: 1.0, kwargs: {...}}   # a callable
    {model: "runs/rm/version_0/hf", weight: 1.0}                      # a sequence-classification checkpoint

A function is called as TRL calls its reward functions, `f(prompts=[...], completions=[...], **fields)`, once per
batch: `prompts` the prompt texts, `completions` the completions' texts, and every field of the records (a list per
field, one value per completion, None where a record lacks it; `prompt` and `completion` left out, as TRL leaves
them), with `reference` (the record's own reply, or None) and the entry's `kwargs` (which win over a record field of
the same name). It returns one number per completion.
A model is any Hugging Face `AutoModelForSequenceClassification` directory with one label: the `hf/` export of a
pandallm `RewardModel` run, or another LLaMA reward model.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch

from pandallm.errors import ConfigError, RewardError

OPTION = "model.objective.init_args.rewards"
KEYS = {"function", "model", "weight", "kwargs", "name"}


def import_function(path: str, where: str) -> Callable[..., Any]:
    """The callable `path` names, `module:function` (or `module.function`)."""
    module_name, sep, name = path.partition(":") if ":" in path else path.rpartition(".")
    if not module_name or not name:
        raise ConfigError(f"{where}: '{path}' is not an import path; write it as 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(f"{where}: cannot import module '{module_name}' of '{path}': {error}") from error
    function = getattr(module, name, None)
    if function is None or not callable(function):
        raise ConfigError(f"{where}: module '{module_name}' has no function '{name}' (from '{path}')")
    return function


@dataclass
class Reward:
    """One entry of the rewards: its name (for the logs), weight, and a function or a reward model directory."""

    name: str
    weight: float
    function: Callable[..., Any] | None = None
    model: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)


def parse_rewards(entries: Sequence[dict[str, Any]]) -> list[Reward]:
    """The rewards of the option, checked, their functions imported (so that a bad path fails when the config is
    read, before any model is built)."""
    if not entries:
        raise ConfigError(f"{OPTION} is empty: give at least one {{function: module:name}} or {{model: directory}}")
    rewards, names = [], set()
    for index, entry in enumerate(entries):
        where = f"{OPTION}[{index}]"
        if not isinstance(entry, dict) or set(entry) - KEYS or ("function" in entry) == ("model" in entry):
            raise ConfigError(
                f"{where}: expected {{function: 'module:name', weight, kwargs}} or {{model: directory, weight}}, got "
                f"{entry!r}"
            )
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
            raise ConfigError(f"{where}.weight must be a finite number, got {weight!r}")
        kwargs = entry.get("kwargs") or {}
        if not isinstance(kwargs, dict):
            raise ConfigError(f"{where}.kwargs must be a mapping of keyword arguments, got {kwargs!r}")
        if "function" in entry:
            path = str(entry["function"])
            function = import_function(path, f"{where}.function")
            name = entry.get("name") or path.replace(":", ".").rsplit(".", 1)[-1]
            reward = Reward(name, float(weight), function=function, kwargs=kwargs)
        else:
            name = entry.get("name") or "reward_model"
            reward = Reward(name, float(weight), model=str(entry["model"]))
        if name in names:
            raise ConfigError(f"{where}: a second reward named '{name}'; give one of them a `name`")
        names.add(name)
        rewards.append(reward)
    return rewards


def checked_values(values: Any, name: str, count: int, where: Sequence[str]) -> list[float]:
    """A reward function's result as floats, or a `RewardError` naming the function and the record at fault."""
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    try:
        values = list(values)
    except TypeError:
        raise RewardError(
            f"reward function '{name}' returned {type(values).__name__}, not a list of {count} numbers"
        ) from None
    if len(values) != count:
        raise RewardError(f"reward function '{name}' returned {len(values)} values for {count} completions")
    floats = []
    for i, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise RewardError(
                f"reward function '{name}' returned {value!r} for the completion of the prompt at {where[i]}; "
                "every value must be a finite float"
            )
        floats.append(float(value))
    return floats


class RewardModelScorer:
    """A sequence-classification reward model, loaded on first use, beside the policy."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    @cached_property
    def model(self) -> torch.nn.Module:
        from transformers import AutoModelForSequenceClassification

        try:
            model = AutoModelForSequenceClassification.from_pretrained(self.directory)
        except (OSError, ValueError) as error:
            raise ConfigError(
                f"{OPTION}: cannot load the reward model '{self.directory}' as a sequence-classification model "
                f"({' '.join(str(error).split())[:300]})"
            ) from error
        if model.config.num_labels != 1:
            raise ConfigError(
                f"{OPTION}: the reward model '{self.directory}' has {model.config.num_labels} labels, not 1"
            )
        return model.eval().requires_grad_(False)

    @torch.no_grad()
    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, vocab_size: int) -> list[float]:
        """Scores of right-padded rows of the policy's ids (prompt + completion)."""
        model = self.model.to(input_ids.device)
        if model.config.vocab_size < vocab_size:
            raise ConfigError(
                f"{OPTION}: the reward model '{self.directory}' has {model.config.vocab_size} token rows, fewer "
                f"than the policy's tokenizer ({vocab_size}): it must read the policy's token ids (the same tokenizer)"
            )
        # The last token that is not the model's padding id is scored (transformers' rule): pad the rows with it.
        pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
        ids = input_ids.masked_fill(attention_mask == 0, pad)
        return model(input_ids=ids, attention_mask=attention_mask).logits[:, 0].float().tolist()


class Rewards:
    """The weighted rewards of a batch of completions."""

    def __init__(self, entries: Sequence[dict[str, Any]]) -> None:
        self.rewards = parse_rewards(entries)
        self.scorers = {r.name: RewardModelScorer(r.model) for r in self.rewards if r.model is not None}

    @property
    def names(self) -> list[str]:
        return [reward.name for reward in self.rewards]

    def score(
        self,
        prompts: list[str],
        completions: list[str],
        fields: dict[str, list[Any]],
        where: list[str],
        rows: dict[str, torch.Tensor],
        vocab_size: int,
    ) -> torch.Tensor:
        """(completions, rewards): each reward's value per completion (unweighted); `rows` are the ids scored by
        reward models."""
        columns = []
        for reward in self.rewards:
            if reward.function is not None:
                # The entry's own `kwargs` win over a record field of the same name (a `target` of pandallm records).
                values = reward.function(prompts=prompts, completions=completions, **{**fields, **reward.kwargs})
                columns.append(checked_values(values, reward.name, len(completions), where))
            else:
                columns.append(self.scorers[reward.name].score(rows["input_ids"], rows["attention_mask"], vocab_size))
        return torch.tensor(columns, dtype=torch.float64).T

    def weights(self) -> torch.Tensor:
        return torch.tensor([reward.weight for reward in self.rewards], dtype=torch.float64)


def record_fields(records: list[dict[str, Any]], references: list[str | None], repeat: int) -> dict[str, list[Any]]:
    """Every field of the records as a list (None where a record lacks it), each value repeated for the `repeat`
    completions of its prompt, with `reference`. `prompts` and `completions` are the call's own, and as TRL does, a
    record's `prompt` and `completion` fields are not passed again (the completion, if any, is the `reference`)."""
    names = sorted({key for record in records for key in record} - {"prompts", "completions", "prompt", "completion"})
    fields = {name: [record.get(name) for record in records] for name in names}
    fields["reference"] = list(references)
    return {name: [value for value in values for _ in range(repeat)] for name, values in fields.items()}
