"""Rollouts kept for the optimizer steps that train on them: PPO's `ppo_epochs`, GRPO's `num_iterations`.

With `passes` optimizer steps per rollout, the data module reads each optimizer step's rows `passes` times in a row
(`data.rollout_passes`, pandallm.data.sampling). The first pass samples the completions, scores them and records
what the later passes need (the rows, the old policy's log-probabilities, the advantages...); the later passes take
them from here, micro-batch by micro-batch, and check that they are given the same prompts.

The buffer is part of the training state: a run stopped between two passes of a rollout saves it in its checkpoint,
every rank's (gathered: only rank 0 writes the file), and the resumed run trains the remaining passes on the very same
rollout. Every entry is a tensor, so the checkpoint still loads weights-only.
"""

from __future__ import annotations

from typing import Any

import torch

from pandallm.errors import ConfigError, ModelError

Entry = dict[str, torch.Tensor]


class RolloutBuffer:
    """This rank's rollouts of the current optimizer step's micro-batches (slots 0, 1, ... in the order they come), and
    what online RL adapts from rollout to rollout."""

    def __init__(self) -> None:
        self.entries: dict[int, Entry] = {}
        # PPO's adaptive KL coefficient as adapted so far (None: the configured one), saved in checkpoints beside.
        self.kl_coef: float | None = None
        self._step: int | None = None  # the optimizer step whose micro-batches are being counted
        self._slot = 0

    def next_slot(self, step: int) -> int:
        """The slot of the next micro-batch of optimizer step `step` (0 for its first)."""
        if step != self._step:
            self._step, self._slot = step, 0
        slot, self._slot = self._slot, self._slot + 1
        return slot

    def put(self, slot: int, index: torch.Tensor, entry: Entry) -> None:
        """Keep a micro-batch's rollout; slot 0 begins a new rollout, and the old one's entries are dropped."""
        if slot == 0:
            self.entries = {}
        self.entries[slot] = {"index": index.detach().cpu(), **{k: v.detach() for k, v in entry.items()}}

    def get(self, slot: int, index: torch.Tensor, step: int) -> Entry:
        """The rollout of micro-batch `slot`, which must be for the same prompts (`index`: their row numbers)."""
        entry = self.entries.get(slot)
        if entry is None or not torch.equal(entry["index"], index.detach().cpu()):
            raise ModelError(
                f"step {step}: this batch's prompts are not those of the rollout it trains on again; the data must "
                "repeat each optimizer step's rows (data.rollout_passes, linked from model.objective by the CLI; set "
                "it to the objective's ppo_epochs / num_iterations when building the modules yourself), and "
                "trainer.limit_train_batches must not cut a rollout short"
            )
        return {k: v for k, v in entry.items() if k != "index"}

    # ---- checkpoints -------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {slot: {k: v.cpu() for k, v in entry.items()} for slot, entry in self.entries.items()}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        self.entries = {int(slot): {k: v.to(device) for k, v in entry.items()} for slot, entry in state.items()}
        self._step, self._slot = None, 0


def gathered_state(module: Any) -> dict[int, dict[str, Any]]:
    """Every rank's buffer, by rank (a collective: every rank calls it while saving a checkpoint)."""
    from pandallm.distributed import gather_from_ranks

    return dict(enumerate(gather_from_ranks(module.rollouts.state_dict())))


def restore(module: Any, saved: dict[int, dict[str, Any]], where: str) -> None:
    """This rank's buffer from a checkpoint's; a run resumed between two passes of a rollout must have as many ranks."""
    if not any(saved.values()):
        module.rollouts.load_state_dict({}, module.device)
        return
    world_size = module.trainer.world_size if module._trainer is not None else 1
    if len(saved) != world_size:
        raise ConfigError(
            f"{where} was saved between two optimizer steps of one rollout by {len(saved)} ranks; resume it with "
            f"{len(saved)} (this run: {world_size}), or from a checkpoint at the start of a rollout"
        )
    module.rollouts.load_state_dict(saved[module.global_rank], module.device)
