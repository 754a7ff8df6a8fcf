"""The LightningModule: a Hugging Face `LlamaForCausalLM`, its loss, optimizer, schedule and metrics."""

from __future__ import annotations

import logging
import math
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch.optim.lr_scheduler import LambdaLR
from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

from pandallm.checkpoint import compat
from pandallm.data.cache import tokenizer_digest
from pandallm.errors import ModelError
from pandallm.model.build import build_model, is_preset, model_config, num_parameters
from pandallm.model.export import save_hf
from pandallm.model.loss import causal_lm_loss_sum
from pandallm.model.parallel import apply_fsdp2
from pandallm.optim.schedules import Schedule, ScheduleName, total_optimizer_steps, warmup_steps
from pandallm.tokenizer import load_tokenizer

log = logging.getLogger(__name__)


class PandaLLM(L.LightningModule):
    def __init__(
        self,
        model_name_or_path: str = "llama-tiny",
        tokenizer: str | None = None,
        config_overrides: dict[str, Any] | None = None,
        attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa",
        gradient_checkpointing: bool = False,
        learning_rate: float = 1e-3,
        adam_betas: tuple[float, float] = (0.9, 0.99),
        adam_epsilon: float = 1e-6,
        weight_decay: float = 0.0,
        lr_scheduler: ScheduleName = "linear",
        warmup_steps: int = 50,
        warmup_proportion: float | None = None,
        min_lr_ratio: float = 0.0,
        poly_power: float = 1.0,
        max_new_tokens: int = 128,
        nonfinite: Literal["error", "skip"] = "error",
    ) -> None:
        """
        Args:
            model_name_or_path: A preset (llama-7b, llama-13b, llama-33b, llama-65b, llama-mini, llama-tiny),
                trained from scratch, or a Hugging Face LLaMA checkpoint: a local directory or a hub id.
            tokenizer: Tokenizer directory, hub id or sentencepiece `.model` file; default: the checkpoint's own.
            config_overrides: `LlamaConfig` fields to replace, e.g. `{num_hidden_layers: 2}`.
            attn_implementation: Attention kernel; `flash_attention_2` needs the flash-attn package and a GPU.
            gradient_checkpointing: Recompute activations in the backward pass (non-reentrant) to save memory.
            learning_rate: Peak AdamW learning rate.
            adam_betas: AdamW betas.
            adam_epsilon: AdamW epsilon.
            weight_decay: AdamW weight decay, applied to matrices only (not norms).
            lr_scheduler: `linear`, `cosine`, `poly` (warmup, then decay to `min_lr_ratio`), `warmup` (warmup,
                then constant) or `constant` (no warmup).
            warmup_steps: Warmup length in optimizer steps.
            warmup_proportion: Warmup length as a share of all optimizer steps; replaces `warmup_steps` when set.
            min_lr_ratio: Learning rate at the end of a decay, as a share of the peak.
            poly_power: Exponent of the `poly` decay.
            max_new_tokens: Tokens `pandallm predict` generates per prompt.
            nonfinite: A NaN or infinite loss or gradient norm: `error` stops every rank with an error naming the
                step; `skip` drops that step's update (weights and optimizer state unchanged) and counts it.
        """
        super().__init__()
        self.save_hyperparameters()
        if tokenizer is None and is_preset(model_name_or_path):
            raise ModelError(f"model.tokenizer must be set: preset '{model_name_or_path}' comes without a tokenizer")
        self.tokenizer_name = tokenizer or model_name_or_path
        # Built in `configure_model`, inside the strategy's context (meta device, sharding), never here: parsing
        # or instantiating a 65B recipe allocates nothing.
        self.model: LlamaForCausalLM | None = None
        self._eval_sums: torch.Tensor | None = None
        self._last_loss: torch.Tensor | None = None
        self.skipped_steps = 0

    @cached_property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return load_tokenizer(self.tokenizer_name)

    @property
    def config(self):
        """The model's `LlamaConfig`, available before the weights exist."""
        if self.model is not None:
            return self.model.config
        h = self.hparams
        return model_config(h.model_name_or_path, len(self.tokenizer), h.config_overrides)

    def num_parameters(self) -> int:
        return num_parameters(self.config)

    def configure_model(self) -> None:
        if self.model is not None:  # Lightning may call this more than once (fit, then validate)
            return
        h = self.hparams
        self.model = build_model(h.model_name_or_path, len(self.tokenizer), h.config_overrides, h.attn_implementation)
        if h.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.device_mesh is not None:  # Lightning's ModelParallelStrategy: FSDP2, one unit per decoder layer
            apply_fsdp2(self.model, self.device_mesh)

    # ---- steps -----------------------------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        # No attention mask on purpose. Rows are right-padded and attention is causal, so real tokens never see
        # padding; and with no mask, transformers reads document boundaries from `position_ids` (a restart at 0)
        # and keeps attention inside each document, on sdpa, eager and flash-attention alike. `use_cache=False`:
        # with a cache, transformers would not look for those boundaries.
        return self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits

    def _loss_sum(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return causal_lm_loss_sum(self(batch["input_ids"], batch["position_ids"]), batch["labels"])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss_sum, count = self._loss_sum(batch)
        loss = loss_sum / count.clamp(min=1)
        self._last_loss = loss.detach()
        # Logged as the mean over ranks (one all-reduce of a scalar): the loss of the global batch, when ranks hold
        # equal numbers of target tokens.
        self.log(
            "train/loss", loss, on_step=True, prog_bar=True, batch_size=batch["input_ids"].shape[0], sync_dist=True
        )
        self.log("train/lr", self.lr_schedulers().get_last_lr()[0], on_step=True)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.trainer.precision == "16-mixed":
            return  # fp16's GradScaler skips overflowing steps itself, by design
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if not grads:
            return
        # Under DDP the gradients are already averaged over ranks here, so a NaN on any rank reaches every rank
        # and all of them take the same decision below: no rank waits for another in a collective.
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach().float()) for g in grads]))
        self.log("train/grad_norm", norm, on_step=True)
        if torch.isfinite(norm):
            return
        loss = float(self._last_loss) if self._last_loss is not None else float("nan")
        message = (
            f"step {self.trainer.global_step}: gradient norm {norm.item()} (loss on rank {self.global_rank}: {loss})"
        )
        if self.hparams.nonfinite == "error":
            raise FloatingPointError(f"{message}; set model.nonfinite: skip to skip such steps instead")
        for p in self.parameters():
            p.grad = None  # AdamW leaves parameters without gradients untouched: no update, no moment change
        self.skipped_steps += 1
        if self.global_rank == 0:
            log.warning("pandallm: %s; update skipped (%d skipped so far)", message, self.skipped_steps)
        self.log("train/skipped_steps", float(self.skipped_steps), on_step=True)

    # ---- checkpoints -----------------------------------------------------------------------------------------

    def _run_record(self) -> dict:
        trainer = self._trainer
        datamodule = getattr(trainer, "datamodule", None) if trainer else None
        run = {}
        if trainer is not None:
            run = {"world_size": trainer.world_size, "accumulate_grad_batches": trainer.accumulate_grad_batches}
        return compat.record(
            self.config,
            tokenizer_digest(self.tokenizer),
            dict(self.hparams),
            dict(getattr(datamodule, "hparams", {}) or {}),
            run,
        )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["pandallm"] = {**self._run_record(), "skipped_steps": self.skipped_steps}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        path = str(self.trainer.ckpt_path) if self._trainer is not None else "the checkpoint"
        shapes = {k: tuple(v.shape) for k, v in self.state_dict().items()}
        changed = compat.check(path, checkpoint, self._run_record(), shapes)
        if changed and self._trainer is not None and self.trainer.state.fn == "fit" and self.global_rank == 0:
            log.warning(
                "pandallm: resuming from %s with changed settings; the run will not continue exactly as the "
                "uninterrupted one would:\n  %s",
                path,
                "\n  ".join(changed),
            )
        self.skipped_steps = checkpoint["pandallm"].get("skipped_steps", 0)

    def on_validation_epoch_start(self) -> None:
        self._eval_sums = torch.zeros(2, dtype=torch.float64, device=self.device)

    on_test_epoch_start = on_validation_epoch_start

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss_sum, count = self._loss_sum(batch)
        self._eval_sums += torch.stack([loss_sum.detach().double(), count.double()])

    test_step = validation_step

    def _log_eval(self, stage: str) -> None:
        # Token-weighted over the whole set and all ranks, so that the perplexity is exp of the true mean loss.
        loss_sum, count = self.trainer.strategy.reduce(self._eval_sums, reduce_op="sum").tolist()
        if count == 0:
            return
        loss = loss_sum / count
        self.log(f"{stage}/loss", loss, prog_bar=True)
        self.log(f"{stage}/ppl", math.exp(min(loss, 700.0)))

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    @torch.no_grad()
    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        prompt_length = batch["input_ids"].shape[1]
        generated = self.model.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            max_new_tokens=self.hparams.max_new_tokens,
            do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
        )
        outputs = self.tokenizer.batch_decode(generated[:, prompt_length:], skip_special_tokens=True)
        return [{"input": text, "output": out} for text, out in zip(batch["input"], outputs, strict=True)]

    # ---- optimization ----------------------------------------------------------------------------------------

    def total_steps(self) -> int:
        trainer = self.trainer
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "num_train_batches"):
            raise ModelError("PandaLLM computes its schedule from a PandaDataModule; pass one to the trainer")
        batches = datamodule.num_train_batches(trainer.world_size)
        limit = trainer.limit_train_batches
        batches = min(batches, limit) if isinstance(limit, int) else max(int(batches * limit), 1)
        return total_optimizer_steps(batches, trainer.accumulate_grad_batches, trainer.max_epochs, trainer.max_steps)

    def configure_optimizers(self) -> dict:
        h = self.hparams
        trainable = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": h.weight_decay},
            {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},  # norms
        ]
        optimizer = torch.optim.AdamW(
            groups, lr=h.learning_rate, betas=tuple(h.adam_betas), eps=h.adam_epsilon, fused=self.device.type == "cuda"
        )
        total = self.total_steps()
        schedule = Schedule(
            h.lr_scheduler,
            total,
            warmup_steps(total, h.warmup_steps, h.warmup_proportion),
            h.min_lr_ratio,
            h.poly_power,
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": LambdaLR(optimizer, schedule), "interval": "step"},
        }

    # ---- export ----------------------------------------------------------------------------------------------

    def export_hf(self, directory: str | Path) -> Path:
        """Save the model and tokenizer in Hugging Face format (safetensors), loadable without pandallm."""
        return save_hf(self.model, self.tokenizer, directory)
