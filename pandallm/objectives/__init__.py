"""Training objectives: one unit each (its rows, loss and metrics) on the machinery `PandaLLM` shares.

Where a new objective goes: a subclass of `pandallm.objectives.base.Objective` in a file of its own here, exported
below; `model.objective: {class_path: pandallm.objectives.NAME}` (or `--model.objective NAME`) selects it.
"""

from pandallm.objectives.base import Objective, Terms
from pandallm.objectives.grpo import GRPO
from pandallm.objectives.kto import KTO
from pandallm.objectives.ppo import PPO
from pandallm.objectives.preference import DPO, ORPO, SimPO
from pandallm.objectives.reward import RewardModel
from pandallm.objectives.sft import SFT

__all__ = ["DPO", "GRPO", "KTO", "ORPO", "PPO", "SFT", "Objective", "RewardModel", "SimPO", "Terms"]
