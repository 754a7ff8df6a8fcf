"""An exponential moving average of the trained weights (`ema.enabled`, universal-llm-trainer's `ema_updating`).

After every optimizer step, `average = decay * average + (1 - decay) * weights`, over the trained parameters (the
adapters of a LoRA run), in float32, starting from the weights the run starts from. The average is saved with
every checkpoint (this callback's state), restored on resume, so that a resumed run's average is bit-identical to
the uninterrupted run's, and it is what the Hugging Face export at the end of `fit` holds: the weights are swapped
for the average while `HFExport` writes them, then swapped back.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch

from pandallm.errors import ConfigError


def trained_parameters(pl_module: L.LightningModule) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in pl_module.named_parameters() if p.requires_grad}


class EMA(L.Callback):
    def __init__(self, enabled: bool = False, decay: float = 0.999) -> None:
        """
        Args:
            enabled: Keep an exponential moving average of the trained weights, save it in checkpoints and export
                it at the end of `fit` instead of the last weights.
            decay: Weight of the average so far at each optimizer step (0.999: an average over about the last
                1000 steps).
        """
        if not 0.0 < decay < 1.0:
            raise ConfigError(f"ema.decay must be in (0, 1), got {decay}")
        self.enabled = enabled
        self.decay = decay
        self.average: dict[str, torch.Tensor] = {}
        self._step = -1  # the optimizer step the average includes

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self.enabled or stage != "fit":
            return
        from pandallm.callbacks.export import shards_parameters

        if shards_parameters(trainer.strategy):
            raise ConfigError(
                "ema.enabled: the moving average needs whole weights on every rank; it works with one device and "
                "DDP (and DeepSpeed ZeRO-1/2), not with FSDP or ZeRO-3"
            )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled or self.average:
            return  # restored from a checkpoint
        self.average = {n: p.detach().float().clone() for n, p in trained_parameters(pl_module).items()}
        self._step = trainer.global_step

    @torch.no_grad()
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        # Once per optimizer step (not per micro-batch under accumulation), before the step's checkpoint is written.
        if not self.enabled or trainer.global_step == self._step:
            return
        self._step = trainer.global_step
        for name, p in trained_parameters(pl_module).items():
            self.average[name].mul_(self.decay).add_(p.detach().float(), alpha=1.0 - self.decay)

    @contextmanager
    def export_weights(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Iterator[None]:
        """The average in place of the weights, for the export (`HFExport`); the weights come back after it."""
        if not self.enabled or not self.average:
            yield
            return
        parameters = trained_parameters(pl_module)
        kept = {name: p.detach().clone() for name, p in parameters.items()}
        with torch.no_grad():
            for name, p in parameters.items():
                p.copy_(self.average[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in parameters.items():
                    p.copy_(kept[name])

    def state_dict(self) -> dict[str, Any]:
        if not self.enabled or not self.average:
            return {}
        return {"decay": self.decay, "step": self._step, "average": {n: t.cpu() for n, t in self.average.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not self.enabled or not state_dict:
            return
        self._step = int(state_dict["step"])
        # Moved to the parameters' device before the first update (`on_train_batch_start`).
        self.average = dict(state_dict["average"])

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx) -> None:
        if self.enabled and self.average:
            device = next(iter(trained_parameters(pl_module).values())).device
            if next(iter(self.average.values())).device != device:
                self.average = {n: t.to(device) for n, t in self.average.items()}
