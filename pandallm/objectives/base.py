"""What a training objective is: the rows it trains on, a loss over a batch of them, and its metrics.

Everything else (building the model, LoRA and quantization, optimizers and schedules, strategies, gradient
accumulation, non-finite steps, resume, signals, export) belongs to `PandaLLM` and is shared by every objective.
A new objective is a subclass of `Objective` in this package, chosen in the YAML:

    model:
      objective:
        class_path: pandallm.objectives.DPO
        init_args: {beta: 0.1}

An objective's loss is a sum over *units* (target tokens for SFT, pairs for DPO) with the number of units, rather
than a mean: `PandaLLM` divides by the units of the whole accumulated batch of every rank, so the update and the
logged loss are the same whatever the micro-batching (see `PandaLLM.on_before_optimizer_step`). Metrics are sums
over the same units, logged as means.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch

from pandallm.data.formats import RowKind
from pandallm.errors import ModelError

if TYPE_CHECKING:
    from pandallm.model.module import PandaLLM

Stage = Literal["train", "val", "test"]


@dataclass
class Terms:
    """A batch's loss as a sum over units and their number, and metrics as sums over the same units."""

    loss_sum: torch.Tensor
    count: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


class Objective:
    """A training objective (subclasses: `SFT`, `DPO`, `SimPO`, `ORPO`, `RewardModel`, ...).

    `metric_names` fixes the order in which metric sums are reduced across ranks: every rank must send the same
    list. An objective holds settings only; the model and its state live in `PandaLLM`.
    """

    rows: ClassVar[RowKind] = "sequences"
    metric_names: ClassVar[tuple[str, ...]] = ()
    # A metric averaged over another count than the loss's units: metric -> the metric that sums that count (KTO's
    # rewards of desirable completions, over the desirable ones). Counts are not logged themselves.
    metric_counts: ClassVar[dict[str, str]] = {}
    # Whether a stopped run needs this objective's reference log-probabilities from the checkpoint (`reference`).
    uses_reference: ClassVar[bool] = False
    # The option counting the optimizer steps taken over each rollout (online RL: `ppo_epochs`), linked to
    # `data.rollout_passes`, which repeats the rows for them; None: every batch is trained on once.
    passes_option: ClassVar[str | None] = None

    @property
    def passes(self) -> int:
        return 1 if self.passes_option is None else int(getattr(self, self.passes_option))

    def trained_modules(self, config: Any) -> dict[str, torch.nn.Module]:
        """Modules the objective trains beside the model, built once the model is (PPO's value head), by name; they
        live in `PandaLLM.heads`, are optimized and checkpointed with the model, and are not exported with it."""
        return {}

    def terms(self, module: PandaLLM, batch: dict[str, Any], stage: Stage) -> Terms:
        raise NotImplementedError

    # What the model ends in (`pandallm.model.build.MODEL_CLASSES`): the language-model head, or a score (reward).
    head: ClassVar[str] = "causal_lm"

    def config_updates(self, tokenizer: Any) -> dict[str, Any]:
        """`LlamaConfig` fields the objective needs (applied after `model.config_overrides`)."""
        return {}

    def means(self, units: Any, totals: list) -> dict[str, Any]:
        """The logged metrics from their totals (in `metric_names` order) over a window or an evaluation: each over
        the loss's units, or over its own count (`metric_counts`)."""
        by_name = dict(zip(self.metric_names, totals, strict=True))
        means = {}
        for name, total in by_name.items():
            if name in self.metric_counts.values():
                continue
            count = by_name[self.metric_counts[name]] if name in self.metric_counts else units
            means[name] = total / max(count, 1)  # a window without such units logs 0, not a division by zero
        return means

    def evaluation_logs(self, loss: float, metrics: dict[str, float]) -> dict[str, float]:
        """What validation and testing log besides `loss` and the metrics (perplexity, for SFT)."""
        return {}

    def on_window(self, module: PandaLLM, totals: dict[str, torch.Tensor]) -> None:
        """Before each optimizer step, with the metric sums of its accumulated batch over every rank (the same on every
        rank): what an objective adapts between steps (PPO's adaptive KL coefficient)."""

    def configure(self, module: PandaLLM) -> None:
        """Called once the model is built (`configure_model`): e.g. a reward model's checks."""

    # ---- settings ------------------------------------------------------------------------------------------

    def settings(self) -> dict[str, Any]:
        """The objective as jsonargparse writes it (`class_path`, `init_args`), plain values only: what checkpoints
        record, and what `--ckpt_path <file>` gives back as the `model.objective` default."""
        accepted = inspect.signature(type(self).__init__).parameters
        init_args = {name: getattr(self, name) for name in accepted if name != "self" and hasattr(self, name)}
        return {"class_path": f"{type(self).__module__}.{type(self).__qualname__}", "init_args": init_args}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.settings()["init_args"].items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.settings() == self.settings()

    __hash__ = None


def _known() -> dict[str, type[Objective]]:
    """Every objective class defined so far, by name (jsonargparse's `lazy_instance` subclasses left out)."""
    found: dict[str, type[Objective]] = {}
    pending = list(Objective.__subclasses__())
    while pending:
        cls = pending.pop()
        if not cls.__name__.startswith("LazyInstance_"):
            found[cls.__name__] = cls
        pending += cls.__subclasses__()
    return found


def objective_class(class_path: str, where: str) -> type[Objective]:
    """The objective class `class_path` names (`DPO`, `pandallm.objectives.DPO` or its module's path), among
    pandallm's: never imported from a name a checkpoint holds (importing a module runs its code)."""
    import pandallm.objectives  # noqa: F401 (defines them all)

    known = _known()
    prefix, _, name = class_path.rpartition(".")
    cls = known.get(name)
    if cls is None or prefix not in ("", "pandallm.objectives", cls.__module__):
        raise ModelError(f"{where}: unknown objective '{class_path}'; the objectives are {', '.join(sorted(known))}")
    return cls


def objective_from(settings: Objective | dict[str, Any], where: str = "model.objective") -> Objective:
    """An objective from its `settings()` (a checkpoint's record, a parsed config), or itself."""
    if isinstance(settings, Objective):
        return settings
    return objective_class(settings["class_path"], where)(**(settings.get("init_args") or {}))
