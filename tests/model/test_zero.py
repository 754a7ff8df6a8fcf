"""pandallm's DeepSpeed decisions that depend on the config alone (DeepSpeed itself runs in tests/test_gpu.py)."""

from __future__ import annotations

import json

import pytest
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

from pandallm.errors import ConfigError
from pandallm.model import zero
from tests.conftest import REPO


def deepspeed(config_name: str) -> DeepSpeedStrategy:
    """A DeepSpeedStrategy holding a shipped config, without its __init__ (which needs deepspeed installed)."""
    strategy = DeepSpeedStrategy.__new__(DeepSpeedStrategy)
    strategy.config = json.loads((REPO / "configs" / "deepspeed" / f"{config_name}.json").read_text())
    return strategy


def test_only_the_offload_config_moves_the_optimizer_to_the_cpu() -> None:
    assert zero.offloads_optimizer(deepspeed("zero3_offload"))
    assert not zero.offloads_optimizer(deepspeed("zero2")) and not zero.offloads_optimizer(deepspeed("zero3"))
    assert not zero.offloads_optimizer(DDPStrategy())


def test_a_zero3_config_without_the_16bit_gather_gets_it_for_the_export() -> None:
    strategy = deepspeed("zero3")
    del strategy.config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]  # as Lightning's built-in
    zero.allow_export(strategy)
    assert strategy.config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    stage2 = deepspeed("zero2")
    zero.allow_export(stage2)
    assert "stage3_gather_16bit_weights_on_model_save" not in stage2.config["zero_optimization"]


def test_skipping_nonfinite_steps_is_refused_under_deepspeed_only() -> None:
    with pytest.raises(ConfigError, match="model.nonfinite: skip is not possible under DeepSpeed"):
        zero.refuse_skipping(deepspeed("zero2"), "skip")
    zero.refuse_skipping(deepspeed("zero2"), "error")
    zero.refuse_skipping(DDPStrategy(), "skip")


def test_lora_checkpoints_leave_the_frozen_base_out_under_deepspeed() -> None:
    strategy = deepspeed("zero2")
    strategy.exclude_frozen_parameters = False
    zero.checkpoint_trainable_only(strategy, adapter_run=False)
    assert not strategy.exclude_frozen_parameters
    zero.checkpoint_trainable_only(strategy, adapter_run=True)
    assert strategy.exclude_frozen_parameters


def test_optimizers_other_than_adamw_are_refused_under_optimizer_offload() -> None:
    import torch

    from pandallm.optim.optimizers import build_optimizer

    weight = torch.nn.Parameter(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="'lamb' cannot run under DeepSpeed's optimizer offload"):
        build_optimizer("lamb", [{"params": [weight]}], 1e-3, (0.9, 0.99), 1e-6, torch.device("cpu"), cpu_offload=True)
