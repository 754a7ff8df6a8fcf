"""What pandallm does differently under DeepSpeed ZeRO (Lightning's DeepSpeedStrategy).

DeepSpeed keeps gradients in its own partitioned buffers and steps through its engine, so four things that
pandallm does on parameters directly under DDP and FSDP go through DeepSpeed instead:

- the optimizer, when ZeRO-Offload moves it to CPU memory (`offloads_optimizer`);
- the check for a non-finite step, which reads the loss before the engine's step and the engine's gradient norm
  after it (`check_finite_loss`, `check_finite_grad_norm`);
- the Hugging Face export of a ZeRO-3 run, whose weights no rank holds whole (`consolidated_weights`);
- LoRA checkpoints without the frozen base, which DeepSpeed writes itself (`checkpoint_trainable_only`).

And one thing transformers must be told: that ZeRO-3 is on (`tell_transformers_zero3`), or `from_pretrained`
would load a checkpoint into parameters that Lightning's `deepspeed.zero.Init` has already partitioned away.
"""

from __future__ import annotations

import logging
import math

import lightning as L
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy

from pandallm.errors import ConfigError

log = logging.getLogger(__name__)

# Lightning's wrapper around the LightningModule, which DeepSpeed's engine holds as its module.
_WRAPPER_PREFIX = "_forward_module."


def is_deepspeed(strategy: L.pytorch.strategies.Strategy | None) -> bool:
    return isinstance(strategy, DeepSpeedStrategy)


def is_zero3(strategy: L.pytorch.strategies.Strategy | None) -> bool:
    """Whether DeepSpeed partitions the weights themselves (ZeRO stage 3): no rank holds the whole model."""
    return is_deepspeed(strategy) and strategy.zero_stage_3


def offloads_optimizer(strategy: L.pytorch.strategies.Strategy | None) -> bool:
    """Whether the DeepSpeed config moves the optimizer state to CPU memory or NVMe (ZeRO-Offload)."""
    if not is_deepspeed(strategy):
        return False
    offload = strategy.config.get("zero_optimization", {}).get("offload_optimizer") or {}
    return offload.get("device", "none") in ("cpu", "nvme")


def tell_transformers_zero3(strategy: L.pytorch.strategies.Strategy | None) -> object | None:
    """Under ZeRO-3, make transformers load checkpoints the ZeRO-3 way (global rank 0 reads the weights, DeepSpeed
    scatters them into the partitions) and resize embeddings with the partitions gathered.

    Returns the `HfDeepSpeedConfig` that turns this on, which the caller must keep (transformers holds only a weak
    reference to it) and hand to `forget_transformers_zero3` when the run ends. None when ZeRO-3 is off.
    """
    if not is_zero3(strategy):
        return None
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(strategy.config)


def forget_transformers_zero3(config: object | None) -> None:
    """Undo `tell_transformers_zero3`: later `from_pretrained` calls in this process load normally again."""
    if config is not None:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()


def checkpoint_trainable_only(strategy: L.pytorch.strategies.Strategy | None, adapter_run: bool) -> None:
    """A LoRA run's DeepSpeed checkpoints hold the adapters and their optimizer state, not the frozen base: the same
    contract as its single-file checkpoints (`pandallm.model.trainable_state`). Loading them back is non-strict
    (`PandaLLM.strict_loading` is off for LoRA runs), the base coming from `model.model_name_or_path` again."""
    if is_deepspeed(strategy) and adapter_run:
        strategy.exclude_frozen_parameters = True


def refuse_skipping(strategy: L.pytorch.strategies.Strategy | None, nonfinite: str) -> None:
    if is_deepspeed(strategy) and nonfinite == "skip":
        # The engine steps on its own partitioned gradients; Lightning cannot skip a DeepSpeed step either.
        raise ConfigError(
            "model.nonfinite: skip is not possible under DeepSpeed, which applies every step itself; use "
            "model.nonfinite: error (the default), or DDP / FSDP"
        )


def check_finite_loss(module: L.LightningModule) -> None:
    """Before DeepSpeed's step: stop every rank, naming the step, if any rank's loss is not finite.

    Under DeepSpeed the gradients are out of reach before the engine's step (`p.grad` is None under ZeRO), so the
    loss is checked here, and the gradient norm after the step (`check_finite_grad_norm`). The flag is all-reduced
    first so that every rank raises together rather than one rank leaving the others waiting in a collective.
    """
    loss = module._last_loss
    bad = torch.zeros((), device=module.device) if loss is None else (~torch.isfinite(loss)).float()
    if module.trainer.world_size > 1:
        bad = module.trainer.strategy.reduce(bad, reduce_op="sum")
    if bad.item():
        raise FloatingPointError(
            f"step {module.trainer.global_step}: non-finite loss on {int(bad.item())} rank(s) (rank "
            f"{module.global_rank}: {float(loss) if loss is not None else 'none'})"
        )


def check_finite_grad_norm(module: L.LightningModule) -> float | None:
    """After DeepSpeed's step: the global gradient norm the engine computed (the same on every rank, so every rank
    decides alike without a collective); raises if it is not finite, before any callback can checkpoint the step.

    A finite loss can still give non-finite gradients (an overflow in the backward pass). DeepSpeed has applied the
    step by then: the error says so, and the last checkpoint is the one to resume from.
    """
    norm = module.trainer.strategy.deepspeed_engine.get_global_grad_norm()
    if norm is None:
        return None
    norm = float(norm)
    if not math.isfinite(norm):
        raise FloatingPointError(
            f"step {module.trainer.global_step}: gradient norm {norm} under DeepSpeed, which has already applied "
            "the step; resume from the last checkpoint (--ckpt_path last)"
        )
    return norm


def allow_export(strategy: L.pytorch.strategies.Strategy | None) -> None:
    """Before the engine is built: let a ZeRO-3 run gather its 16-bit weights for the export at the end of `fit`
    (`stage3_gather_16bit_weights_on_model_save`, which Lightning's built-in `deepspeed_stage_3` configs leave off;
    it changes nothing in training)."""
    if not is_zero3(strategy):
        return
    zero_config = strategy.config.setdefault("zero_optimization", {})
    if not zero_config.get("stage3_gather_16bit_weights_on_model_save"):
        log.info("pandallm: stage3_gather_16bit_weights_on_model_save set, for the Hugging Face export at the end")
        zero_config["stage3_gather_16bit_weights_on_model_save"] = True


def consolidated_weights(strategy: DeepSpeedStrategy) -> dict[str, torch.Tensor]:
    """The whole state dict of a ZeRO-3 model on global rank 0 (CPU tensors, the LightningModule's keys); an empty
    dict on other ranks. A collective: every rank must call it.

    DeepSpeed gathers the partitions one module at a time onto rank 0, never the whole model on every GPU: the
    gathering of `engine.save_16bit_model`, called directly so that rank 0 does not write the whole model to disk
    and read it back (Accelerate calls it so too). The weights come in the engine's dtype: bf16 under bf16-mixed,
    where DeepSpeed holds the model in bf16 and the fp32 master copy in the optimizer.
    """
    weights = strategy.deepspeed_engine._zero3_consolidated_16bit_state_dict() or {}
    return {k.removeprefix(_WRAPPER_PREFIX): v.cpu() for k, v in weights.items()}
