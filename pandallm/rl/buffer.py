"""Rollouts kept for the optimizer steps that train on them: PPO's `ppo_epochs`, GRPO's `num_iterations`.

With `passes` optimizer steps per rollout, the data module reads each optimizer step's rows `passes` times in a row
(`data.rollout_passes`, pandallm.data.sampling), from the start of every epoch. So the position of a micro-batch in
its epoch says where it is: batch b of an epoch with `accumulate` micro-batches per step is micro-batch (slot)
`b % accumulate` of pass `(b // accumulate) % passes` of its rollout (`position`). The first pass samples the
completions, scores them and records what the later passes need (the rows, the old policy's log-probabilities, the
advantages...); the later passes take them from here, slot by slot, and check that they are given the same prompts.

The buffer is part of the training state: every checkpoint of such a run holds it, every rank's (gathered: only rank
0 writes the file), so that a run stopped anywhere in a rollout, also between two micro-batches of its first step,
trains the rest of it on the very same completions. Every entry is a tensor: the checkpoint still loads
weights-only.
"""

from __future__ import annotations

from typing import Any

import torch

from pandallm.errors import ConfigError, ModelError

Entry = dict[str, torch.Tensor]


def position(trainer: Any, passes: int) -> tuple[int, int]:
    """`(pass, slot)` of the micro-batch being trained (see the module docstring)."""
    window, slot = divmod(trainer.fit_loop.epoch_loop.batch_idx, trainer.accumulate_grad_batches)
    return window % passes, slot


class RolloutBuffer:
    """This rank's rollout of the current optimizer steps, by slot, and what online RL adapts from rollout to rollout
    (PPO's KL weight)."""

    def __init__(self) -> None:
        self.entries: dict[int, Entry] = {}
        # PPO's adaptive KL weight: [the configured initial weight, the weight adapted so far], or None.
        self.kl_coef: list[float] | None = None
        # Why the checkpoint's rollout could not be taken back (another number of ranks), said if it is needed.
        self.lost: str | None = None

    def put(self, slot: int, index: torch.Tensor, entry: Entry) -> None:
        """Keep a micro-batch's rollout; slot 0 begins a new rollout, and the old one's entries are dropped."""
        if slot == 0:
            self.entries, self.lost = {}, None
        self.entries[slot] = {"index": index.detach().cpu(), **{k: v.detach() for k, v in entry.items()}}

    def get(self, slot: int, index: torch.Tensor, step: int) -> Entry:
        """The rollout of micro-batch `slot`, which must be for the same prompts (`index`: their row numbers), on their
        device (a checkpoint's is restored before the model moves to its device)."""
        entry = self.entries.get(slot)
        if entry is None and self.lost is not None:
            raise ConfigError(self.lost)
        if entry is None or not torch.equal(entry["index"], index.detach().cpu()):
            raise ModelError(
                f"step {step}: this batch's prompts are not those of the rollout it trains on again; the data must "
                "repeat each optimizer step's rows (data.rollout_passes, linked from model.objective by the CLI; set "
                "it to the objective's ppo_epochs / num_iterations when building the modules yourself)"
            )
        return {k: v.to(index.device) for k, v in entry.items() if k != "index"}

    # ---- checkpoints -------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {slot: {k: v.cpu() for k, v in entry.items()} for slot, entry in self.entries.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.entries = {int(slot): dict(entry) for slot, entry in state.items()}
        self.lost = None


def gathered_state(module: Any) -> dict[int, dict[str, Any]]:
    """Every rank's buffer, by rank (a collective: every rank calls it while saving a checkpoint)."""
    from pandallm.distributed import gather_from_ranks

    return dict(enumerate(gather_from_ranks(module.rollouts.state_dict())))


def restore(module: Any, saved: dict[int, dict[str, Any]], where: str) -> None:
    """This rank's buffer from a checkpoint's. Under another number of ranks the ranks' rollouts do not map to this
    run's: none is restored, and a later pass that needs one stops with the reason (a resume at a rollout's start
    needs none)."""
    world_size = module.trainer.world_size if module._trainer is not None else 1
    if not saved or len(saved) == world_size:
        module.rollouts.load_state_dict(saved.get(module.global_rank, {}) if saved else {})
        return
    module.rollouts.load_state_dict({})
    module.rollouts.lost = (
        f"{where} was saved in the middle of a rollout by {len(saved)} ranks; resume it with {len(saved)} (this run: "
        f"{world_size}), or from a checkpoint at the start of a rollout"
    )
