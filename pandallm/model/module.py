"""The LightningModule: a Hugging Face `LlamaForCausalLM` (with LoRA adapters, on a quantized base if asked), its
loss, optimizer, schedule and metrics.
"""

from __future__ import annotations

import logging
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import lightning as L
import torch
from jsonargparse import lazy_instance
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import FSDPStrategy
from torch.optim.lr_scheduler import LambdaLR
from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

from pandallm.checkpoint import compat
from pandallm.checkpoint.sharded import module_arguments
from pandallm.data.cache import tokenizer_digest
from pandallm.data.position import epoch_cut_short
from pandallm.errors import ConfigError, ModelError
from pandallm.generate.options import SEED_STRIDE, GenerationOptions, decode, generate
from pandallm.log_steps import logs_this_step
from pandallm.model import zero
from pandallm.model.build import (
    gguf_location,
    grow_embeddings,
    is_gguf,
    is_preset,
    load_model,
    model_config,
    num_parameters,
)
from pandallm.model.compile import compile_decoder_layers
from pandallm.model.delta import DEFAULT_REPLACED
from pandallm.model.export import save_hf
from pandallm.model.head import LossImpl, head_bypassed, resolve_loss_impl
from pandallm.model.liger import apply_liger_kernels
from pandallm.model.offload import offload_activations, offloads
from pandallm.model.parallel import apply_fsdp2, fsdp_norm, fsdp_replicas
from pandallm.model.peft import (
    DEFAULT_TARGET_MODULES,
    LoraSettings,
    apply_lora,
    is_peft_model,
    load_adapter,
    merged_copy,
    trains_both_embeddings,
)
from pandallm.model.quantize import QuantBits, prepare_quantized
from pandallm.model.trainable_state import check_restorable, keep_trainable
from pandallm.objectives import SFT, Objective, Terms
from pandallm.objectives.base import objective_class, objective_from
from pandallm.objectives.reference import ReferenceScores
from pandallm.optim.optimizers import OptimizerName, build_optimizer, decay_groups
from pandallm.optim.resume import apply_settings, changed_settings, restored_length
from pandallm.optim.schedules import ScheduleName, run_steps, schedule_from
from pandallm.rl import buffer as rollout_buffer
from pandallm.rl.buffer import RolloutBuffer
from pandallm.special_tokens import SpecialTokens, carry_special_ids
from pandallm.tokenizer import check_fits, load_tokenizer

if TYPE_CHECKING:
    from peft import PeftModel

log = logging.getLogger(__name__)

AdapterSaveType = Literal["adapter_only", "merge"]
# Settings only (no state), so one instance can be every module's default; jsonargparse prints it as a class_path.
DEFAULT_OBJECTIVE = lazy_instance(SFT)


class PandaLLM(L.LightningModule):
    # How `predict` and the generation metrics sample: the CLI's `generation.*` options (not hyper-parameters: they
    # change nothing of the trained model, and a checkpoint resumes under any of them).
    generation: GenerationOptions = GenerationOptions()

    def __init__(
        self,
        model_name_or_path: str = "llama-tiny",
        tokenizer: str | None = None,
        special_tokens: SpecialTokens | None = None,
        config_overrides: dict[str, Any] | None = None,
        attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa",
        gradient_checkpointing: bool = False,
        activation_offloading: bool = False,
        compile: bool = False,
        loss_impl: LossImpl = "auto",
        loss_chunk_tokens: int | None = None,
        liger_kernels: bool = False,
        delta_from: str | None = None,
        delta_replaces: list[str] = list(DEFAULT_REPLACED),  # noqa: B006 (jsonargparse reads it)
        use_lora: bool = False,
        lora_r: int = 64,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.05,
        lora_target_modules: list[str] = list(DEFAULT_TARGET_MODULES),  # noqa: B006
        modules_to_save: list[str] | None = None,
        use_dora: bool = False,
        lora_adapter: str | None = None,
        use_quant: bool = False,
        bit_training: QuantBits = 4,
        optimizer: OptimizerName = "adamw",
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
        objective: Objective = lazy_instance(SFT),  # noqa: B008 (jsonargparse reads it, as it does for `delta_replaces`)
    ) -> None:
        """
        Args:
            model_name_or_path: A preset (llama-7b, llama-13b, llama-33b, llama-65b, llama-mini, llama-tiny),
                trained from scratch; a Hugging Face LLaMA checkpoint: a local directory or a hub id; or a `.gguf`
                file (dequantized on load; needs the `gguf` package).
            tokenizer: Tokenizer directory, hub id, sentencepiece `.model` or `.gguf` file; default: the checkpoint's.
            special_tokens: Special-token overrides, `{pad|bos|eos|unk|sep|cls: id, token string or add}`; `add`
                makes a new token `<role>` and grows the embeddings (pandallm.special_tokens). Linked to the data's.
            config_overrides: `LlamaConfig` fields to replace, e.g. `{num_hidden_layers: 2}`.
            attn_implementation: Attention kernel; `flash_attention_2` needs the flash-attn package and a GPU.
            gradient_checkpointing: Recompute activations in the backward pass (non-reentrant) to save memory.
            activation_offloading: Keep the activations saved for the backward pass in CPU memory (with
                `gradient_checkpointing`: each layer's input) instead of GPU memory (pandallm.model.offload); GPU
                only: on the CPU it has no effect and is ignored with a warning.
            compile: torch.compile each decoder layer (pandallm.model.compile); the first steps are slower while it
                compiles.
            loss_impl: How the loss is computed from the decoder's output (pandallm.model.head): `chunked` projects
                a chunk of trained tokens at a time and never builds the batch x seq x vocab logits, `full` builds
                them, `liger` uses Liger's fused linear cross-entropy (CUDA), `auto` liger where it runs, else
                chunked (else full, with the reason logged).
            loss_chunk_tokens: Tokens per chunk of the chunked loss; default: as many as keep a chunk's fp32 logits
                within 128 MiB (256 tokens of a 128k vocabulary).
            liger_kernels: Liger's fused RMSNorm, RoPE and SwiGLU kernels in the decoder layers (CUDA,
                `pip install pandallm[liger]`).
            delta_from: Base checkpoint that `model_name_or_path` holds delta weights of (PandaLLM's released
                models): the weights trained from are base + delta.
            delta_replaces: Tensors that the delta stores whole rather than as a difference (PandaLLM's extended
                vocabularies); `[]` for deltas that add every tensor (FastChat / Vicuna).
            use_lora: Train LoRA adapters (peft) on a frozen base instead of every weight.
            lora_r: LoRA rank.
            lora_alpha: LoRA scaling numerator (the update is scaled by alpha / r).
            lora_dropout: Dropout on the adapters' input.
            lora_target_modules: Layers that get adapters, by name; default: every linear projection of the decoder.
            modules_to_save: Modules trained fully and saved with the adapters, e.g. `[embed_tokens, lm_head]` when
                the tokenizer adds tokens (Chinese-LLaMA-Alpaca).
            use_dora: Weight-decomposed LoRA (DoRA): adapters learn a direction, plus a magnitude per output.
            lora_adapter: Start from this saved PEFT adapter directory (its own LoRA settings apply) instead of
                fresh adapters.
            use_quant: Load the frozen base quantized with bitsandbytes (needs `use_lora`).
            bit_training: Bits of the quantized base: 4 (NF4, double quantization, bf16 compute: QLoRA) or 8
                (LLM.int8()).
            optimizer: `adamw`, `adamw_8bit`, `paged_adamw`, `paged_adamw_8bit` (bitsandbytes), `lamb`
                (pytorch-optimizer) or `nvlamb` (NVIDIA's LAMB); see README, "Optimizers".
            learning_rate: Peak learning rate.
            adam_betas: Betas of the moment estimates (all optimizers).
            adam_epsilon: Epsilon of the optimizer's denominator.
            weight_decay: Weight decay, applied to matrices only (not norms).
            lr_scheduler: `linear`, `cosine`, `poly` (warmup, then decay to `min_lr_ratio`), `warmup` (warmup,
                then constant) or `constant` (no warmup).
            warmup_steps: Warmup length in optimizer steps.
            warmup_proportion: Warmup length as a share of all optimizer steps; replaces `warmup_steps` when set.
            min_lr_ratio: Learning rate at the end of a decay, as a share of the peak.
            poly_power: Exponent of the `poly` decay.
            max_new_tokens: Tokens generated per prompt, by `pandallm predict` and the generation metrics (the
                sampling options are `generation.*`: `pandallm.generate.options`).
            nonfinite: A NaN or infinite loss or gradient norm: `error` stops every rank with an error naming the
                step; `skip` drops that step's update (weights and optimizer state unchanged) and counts it.
            objective: What is trained (pandallm.objectives): `SFT` (instruction tuning and pretraining, the
                default), `DPO`, `SimPO`, `ORPO`, `KTO`, `RewardModel`, `GRPO` or `PPO` (online RL from rewards), with
                their options under `init_args`.
        """
        super().__init__()
        # The objective is recorded as its settings (plain values), not as an object: checkpoints load weights-only.
        self.save_hyperparameters(ignore=["objective"])
        self.hparams["objective"] = objective.settings()
        self.objective = objective
        if tokenizer is None and is_preset(model_name_or_path):
            raise ModelError(f"model.tokenizer must be set: preset '{model_name_or_path}' comes without a tokenizer")
        if is_gguf(model_name_or_path):
            gguf_location(model_name_or_path)  # a missing file fails here, at parse time
        if use_quant and not use_lora:
            raise ModelError(
                "model.use_quant: a quantized base cannot be trained itself; set model.use_lora: true to train "
                "adapters on it"
            )
        if lora_adapter is not None and not use_lora:
            raise ModelError("model.lora_adapter is set, but model.use_lora is false; set model.use_lora: true")
        self.lora = (
            LoraSettings(
                r=lora_r,
                alpha=lora_alpha,
                dropout=lora_dropout,
                target_modules=tuple(lora_target_modules),
                modules_to_save=tuple(modules_to_save or ()),
                use_dora=use_dora,
                task_type="SEQ_CLS" if objective.head == "score" else "CAUSAL_LM",
            )
            if use_lora
            else None
        )
        # Lightning restores a LoRA run's checkpoint (trainable weights only) into a freshly built base.
        self.strict_loading = not use_lora
        self.tokenizer_name = tokenizer or model_name_or_path
        # Built in `configure_model`, inside the strategy's context (meta device, sharding), never here: parsing
        # or instantiating a 65B recipe allocates nothing.
        self.model: LlamaForCausalLM | PeftModel | None = None
        self._added_tokens = 0
        self._eval_sums: torch.Tensor | None = None
        self._last_loss: torch.Tensor | None = None
        self._window_sums: torch.Tensor | int = 0  # `_sums` of the accumulation window so far
        self.step_loss: torch.Tensor | None = None  # of the last optimizer step: over its window and every rank
        self.step_metrics: dict[str, torch.Tensor] = {}  # the objective's metrics of the last optimizer step, likewise
        self._zero3_config: object | None = None  # see pandallm.model.zero.tell_transformers_zero3
        self.loss_path = "full"  # `loss_impl` as resolved for the built model and strategy (`configure_model`)
        self._offloads = False
        self.skipped_steps = 0
        self._changed_optimizer_settings: list[str] = []
        self.reference_scores = ReferenceScores()
        # Online RL: the rollouts that the next optimizer steps train on again (PPO's `ppo_epochs`).
        self.rollouts = RolloutBuffer()
        # Modules the objective trains beside the model (PPO's value head), built with it in `configure_model`.
        self.heads = torch.nn.ModuleDict()

    @classmethod
    def from_arguments(cls, arguments: dict[str, Any]) -> PandaLLM:
        """A module from its arguments as parsers and checkpoints give them (the objective as its settings)."""
        if isinstance(arguments.get("objective"), dict):
            arguments = {**arguments, "objective": objective_from(arguments["objective"])}
        return cls(**arguments)

    @staticmethod
    def recorded_arguments(hyper_parameters: dict[str, Any]) -> dict[str, Any]:
        """A checkpoint's hyper-parameters that `__init__` takes, its objective checked to be one of pandallm's
        (its class path is otherwise imported by whoever instantiates it)."""
        arguments = module_arguments(PandaLLM, hyper_parameters)
        if isinstance(arguments.get("objective"), dict):
            settings = arguments["objective"]
            cls = objective_class(settings.get("class_path", ""), "the checkpoint's model.objective")
            arguments["objective"] = {**settings, "class_path": f"{cls.__module__}.{cls.__qualname__}"}
        return arguments

    @cached_property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return load_tokenizer(self.tokenizer_name, self.hparams.special_tokens)

    @property
    def config(self):
        """The model's `LlamaConfig`, available before the weights exist."""
        if self.model is not None:
            return self.model.config
        h = self.hparams
        return model_config(h.model_name_or_path, len(self.tokenizer), self._config_overrides)

    @property
    def _config_overrides(self) -> dict[str, Any]:
        """`model.config_overrides`, and what the objective needs of the config (a reward model's one label)."""
        return {**(self.hparams.config_overrides or {}), **self.objective.config_updates(self.tokenizer)}

    def num_parameters(self) -> int:
        return num_parameters(self.config, self.objective.head)

    def configure_model(self) -> None:
        if self.model is not None:  # Lightning may call this more than once (fit, then validate)
            return
        h = self.hparams
        if not is_preset(h.model_name_or_path):  # a preset is sized by the tokenizer
            # Before any weight is read: another model's tokenizer (32000 pieces for a 128256-row Llama 3) would
            # train on ids that mean other pieces.
            check_fits(self.tokenizer, self.tokenizer_name, self.config.vocab_size, f"model '{h.model_name_or_path}'")
        self._zero3_config = zero.tell_transformers_zero3(self._trainer.strategy if self._trainer else None)
        model = self.build_starting_model(quant_bits=h.bit_training if h.use_quant else None)
        added = self._added_tokens
        if h.use_quant:
            model = prepare_quantized(model, h.gradient_checkpointing)
        elif h.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if h.use_lora:
            model = load_adapter(model, h.lora_adapter) if h.lora_adapter else apply_lora(model, self.lora)
            trains_embeddings = any("embed_tokens" in n for n, p in model.named_parameters() if p.requires_grad)
            if added and not trains_embeddings:
                log.warning(
                    "pandallm: the tokenizer added %d tokens, but LoRA leaves the embeddings frozen: the new rows "
                    "stay at their initial mean. List embed_tokens and lm_head in model.modules_to_save to train them",
                    added,
                )
        if h.liger_kernels:
            apply_liger_kernels(model, self._device_of_run())
        if self.device_mesh is not None:  # Lightning's ModelParallelStrategy: FSDP2, one unit per decoder layer
            if h.use_lora or h.use_quant:
                raise ModelError("FSDP2 (ModelParallelStrategy) trains full models only; use DDP or DeepSpeed for LoRA")
            apply_fsdp2(model, self.device_mesh)
        if h.compile:  # last: the compiled layers are the ones that LoRA, k-bit preparation and FSDP2 left
            log.info("pandallm: compiling %d decoder layers", compile_decoder_layers(model))
        # from_pretrained returns a model in eval mode, where transformers skips activation checkpointing; the
        # trainer switches to eval and back for validation itself.
        self.model = model.train()
        self.heads.update(self.objective.trained_modules(model.config))
        self._choose_loss_path()
        self._offloads = offloads(h.activation_offloading, self._device_of_run(), h.gradient_checkpointing)

    def _device_of_run(self) -> torch.device:
        """The device the model trains on (the strategy's), before the weights are moved there."""
        trainer = self._trainer
        return trainer.strategy.root_device if trainer is not None else self.device

    def _choose_loss_path(self) -> None:
        if self.objective.head != "causal_lm":
            return  # a score head: no vocabulary, the loss is the objective's own
        strategy = self._trainer.strategy if self._trainer is not None else None
        self.loss_path, reason = resolve_loss_impl(self.hparams.loss_impl, self.model, strategy, self._device_of_run())
        if reason is not None and self.global_rank == 0:
            log.warning("pandallm: model.loss_impl %s: %s", self.hparams.loss_impl, reason)

    def build_starting_model(self, quant_bits: QuantBits | None = None) -> LlamaForCausalLM:
        """The model training starts from (a preset's random init, a checkpoint, base + delta, optionally
        quantized), with its embeddings grown to the tokenizer; also the reference of preference objectives."""
        h = self.hparams
        vocab_size = len(self.tokenizer)
        model = load_model(
            h.model_name_or_path,
            vocab_size,
            self._config_overrides,
            h.attn_implementation,
            quant_bits=quant_bits,
            delta_from=h.delta_from,
            delta_replaces=tuple(h.delta_replaces),
            device=self._quantization_device() if quant_bits else None,
            head=self.objective.head,
        )
        # Before LoRA wraps the model: rows added later would be neither trained nor saved (LLMBox; peft #1457).
        self._added_tokens = grow_embeddings(model, vocab_size)
        if self.hparams.special_tokens:
            carry_special_ids(model, self.tokenizer)
        return model

    @property
    def is_preset_run(self) -> bool:
        return is_preset(self.hparams.model_name_or_path)

    def _quantization_device(self) -> torch.device | None:
        """The GPU to quantize the base on (bitsandbytes quantizes while loading); None: the CPU."""
        trainer = self._trainer
        device = trainer.strategy.root_device if trainer is not None else None
        return device if device is not None and device.type == "cuda" else None

    @property
    def is_adapter_run(self) -> bool:
        return is_peft_model(self.model)

    # ---- steps -----------------------------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        # No attention mask on purpose. Rows are right-padded and attention is causal, so real tokens never see
        # padding; and with no mask, transformers reads document boundaries from `position_ids` (a restart at 0)
        # and keeps attention inside each document, on sdpa, eager and flash-attention alike. `use_cache=False`:
        # with a cache, transformers would not look for those boundaries.
        with offload_activations(self._offloads and self.training):
            return self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits

    def head_input(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder's final (normed) hidden states (batch, seq, hidden) and the output head's weight (vocab,
        hidden), the logits never built: what the chunked and fused losses project themselves (`loss_path`)."""
        with head_bypassed(self.model) as head:
            self.forward(input_ids, position_ids)
        return head.hidden, head.weight

    # ---- the reference model of preference objectives (pandallm.objectives.reference) -----------------------------

    def reference_logps(self, batch: dict[str, Any], stage: str) -> torch.Tensor:
        """The reference model's summed log-probabilities of a batch's sequences (pairs: 2B)."""
        if getattr(self.objective, "reference", "precompute") == "live":
            return self.reference_scores.score(self, batch)
        return self.reference_scores.lookup(stage, batch["index"])

    def _prepare_reference(self, split: str) -> None:
        if self.objective.uses_reference:
            self.reference_scores.prepare(self, split)

    def on_fit_start(self) -> None:
        passes = self.objective.passes
        data_passes = getattr(self.trainer.datamodule, "rollout_passes", passes)
        if data_passes != passes:
            raise ConfigError(
                f"model.objective {type(self.objective).__name__} takes {self.objective.passes_option}={passes} "
                f"optimizer steps per rollout, but data.rollout_passes is {data_passes}: the data must repeat each "
                "step's rows as many times (the CLI links them; set it yourself when building the modules)"
            )

    def on_train_start(self) -> None:
        self._prepare_reference("train")
        self._apply_resumed_settings()

    def on_validation_start(self) -> None:
        self._prepare_reference("validation")

    def on_test_start(self) -> None:
        self._prepare_reference("test")

    def _sums(self, terms: Terms) -> torch.Tensor:
        """[loss sum, units, *metric sums] in fp64, in `metric_names` order: what windows and evaluations add up."""
        metrics = [terms.metrics[name].detach().double() for name in self.objective.metric_names]
        return torch.stack([terms.loss_sum.detach().double(), terms.count.double(), *metrics])

    @property
    def _unit_weighted(self) -> bool:
        """Whether the gradients are rescaled to the mean over the units (target tokens, pairs: the objective's) of
        the window once it is complete.

        Not needed when one micro-batch on one process is the whole window: its own mean is the update's, and
        returning it spares a pass over every gradient per step. Not possible under DeepSpeed, which keeps
        gradients in its own partitioned buffers, out of reach of `_normalize_gradients`.
        """
        trainer = self.trainer
        if trainer.accumulate_grad_batches == 1 and trainer.world_size == 1:
            return False
        return not zero.is_deepspeed(trainer.strategy)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        terms = self.objective.terms(self, batch, "train")
        loss = terms.loss_sum / terms.count.clamp(min=1)
        self._last_loss = loss.detach()
        # The window's summed loss, units and metrics: the logged `train/loss` is their ratio over every micro-batch
        # of the update and every rank (`_window_totals`), the loss the update follows, not this micro-batch's mean.
        self._window_sums = self._window_sums + self._sums(terms)
        if logs_this_step(self.trainer):
            self.log("train/lr", self.lr_schedulers().get_last_lr()[0], on_step=True, prog_bar=True)
        if not self._unit_weighted:
            return loss
        # The update must follow the mean over every unit (target token, pair) of the accumulated batch of all
        # ranks, not the mean of per-micro-batch means, which over-weights the tokens of short micro-batches
        # (transformers #34191). That count is known only once the window is complete, so the summed loss is
        # back-propagated here and the gradients are divided by it in `_normalize_gradients`.
        return terms.loss_sum

    def _window_totals(self) -> torch.Tensor:
        """The accumulation window's [loss sum, units, *metric sums], summed over ranks (one all-reduce of a few
        numbers per optimizer step), in fp64; the window starts again empty."""
        sums = torch.as_tensor(self._window_sums, dtype=torch.float64, device=self.device)
        self._window_sums = 0
        if self.trainer.world_size > 1:
            sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        return sums

    def _normalize_gradients(self, units: torch.Tensor) -> None:
        # Lightning divided each micro-batch loss by `accumulate_grad_batches`, and DDP / FSDP average over ranks.
        scale = self.trainer.accumulate_grad_batches * self.trainer.world_size / units.clamp(min=1)
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        # One fused multiply per device and dtype (what torch's own optimizers use), not one kernel per parameter.
        torch._foreach_mul_(grads, scale.item())

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        loss_sum, units, *metrics = self._window_totals()
        # The loss of this update: comparable across batch sizes, accumulation and ranks, and with the HF Trainer's.
        self.step_loss = (loss_sum / units.clamp(min=1)).float()
        self.log("train/loss", self.step_loss, on_step=True, prog_bar=True)
        # The objective's metrics of this update, as tensors (no device sync until read).
        self.step_metrics = {name: value.float() for name, value in self.objective.means(units, metrics).items()}
        self.objective.on_window(self, dict(zip(self.objective.metric_names, metrics, strict=True)))
        if logs_this_step(self.trainer):
            for name, value in self.step_metrics.items():
                self.log(f"train/{name}", value, on_step=True)
        if self._unit_weighted:
            self._normalize_gradients(units)
        if self.trainer.precision == "16-mixed":
            return  # fp16's GradScaler skips overflowing steps itself, by design
        if zero.is_deepspeed(self.trainer.strategy):
            zero.check_finite_loss(self)  # the gradients live in DeepSpeed's buffers
            return
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        # Under DDP the gradients are already averaged over ranks here, so a NaN on any rank reaches every rank
        # and all of them take the same decision below: no rank waits for another in a collective. FSDP2's DTensor
        # gradients give the whole norm by themselves; FSDP's are plain local shards (`fsdp_norm`).
        replicas = fsdp_replicas(self.trainer)
        if not grads and replicas is None:
            return
        norm = torch.nn.utils.get_total_norm(grads, foreach=True) if grads else torch.zeros((), device=self.device)
        if replicas is not None:
            norm = fsdp_norm(self.trainer, norm, replicas)
        if logs_this_step(self.trainer):
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

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if zero.is_deepspeed(self.trainer.strategy) and self.trainer.precision != "16-mixed":
            # After DeepSpeed's step and before any callback's `on_train_batch_end`: a checkpoint never holds it.
            norm = zero.check_finite_grad_norm(self)
            if norm is not None and logs_this_step(self.trainer):
                self.log("train/grad_norm", norm, on_step=True)

    def teardown(self, stage: str) -> None:
        zero.forget_transformers_zero3(self._zero3_config)
        self._zero3_config = None

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        # Lightning's FSDP precision plugin cannot clip by norm: FSDP's root module computes the norm over all the
        # shards itself (every GPU recipe clips, so FSDP runs stopped at their first step without this).
        fsdp_root = self.trainer.model
        if (
            isinstance(self.trainer.strategy, FSDPStrategy)
            and gradient_clip_val
            and hasattr(fsdp_root, "clip_grad_norm_")
        ):
            if gradient_clip_algorithm not in (None, "norm"):
                raise ConfigError("trainer.gradient_clip_algorithm: FSDP clips by norm only; set it to norm")
            fsdp_root.clip_grad_norm_(gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

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

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["pandallm"] = {**self._run_record(), "skipped_steps": self.skipped_steps}
        if self.reference_scores.scores:
            checkpoint["pandallm"]["reference_scores"] = self.reference_scores.state_dict()
        if self.rollouts.kl_coef is not None:
            checkpoint["pandallm"]["kl_coef"] = list(self.rollouts.kl_coef)
        if self.objective.passes > 1 and self._trainer is not None:
            # Wherever the run stands in a rollout, the rest of it trains on the kept one (every rank's).
            checkpoint["pandallm"]["rollouts"] = rollout_buffer.gathered_state(self)
        if self.hparams.use_lora:
            keep_trainable(checkpoint, self)

    def on_load_checkpoint(self, checkpoint: dict[str, Any], where: str | None = None) -> None:
        path = getattr(self._trainer, "ckpt_path", None)
        where = where or (f"checkpoint '{path}'" if path else "the checkpoint")
        if self.hparams.use_lora:
            # Adapter checkpoints hold the trainable weights only; they must fit, and on the same frozen base.
            check_restorable(checkpoint, self, where)
            shapes = {name: tuple(p.shape) for name, p in self.named_parameters() if p.requires_grad}
        else:
            shapes = {name: tuple(v.shape) for name, v in self.state_dict().items()}
        changed = compat.check(where, checkpoint, self._run_record(), shapes)
        self.skipped_steps = checkpoint["pandallm"].get("skipped_steps", 0)
        self.reference_scores.load_state_dict(checkpoint["pandallm"].get("reference_scores", {}))
        # What follows concerns a resumed `fit` only (not `validate`, `test`, `predict` or `pandallm export`).
        fitting = self._trainer is not None and self.trainer.state.fn == "fit"
        if fitting:
            rollout_buffer.restore(self, checkpoint["pandallm"].get("rollouts", {}), where)
            adapted = checkpoint["pandallm"].get("kl_coef")  # [configured, adapted]
            self.rollouts.kl_coef = list(adapted) if isinstance(adapted, list | tuple) and len(adapted) == 2 else None
        # Applied in `on_train_start`, once Lightning has restored the optimizer and the scheduler over them.
        saved = checkpoint.get("hyper_parameters", {})
        self._changed_optimizer_settings = changed_settings(saved, self.hparams) if fitting else []
        if not fitting or self.global_rank != 0:
            return
        if changed:
            log.warning(
                "pandallm: resuming from %s with changed settings; the run will not continue exactly as the "
                "uninterrupted one would:\n  %s",
                where,
                "\n  ".join(changed),
            )
        cut = epoch_cut_short(checkpoint)
        if cut:
            log.warning(
                "pandallm: %s was saved when fit stopped at trainer.max_steps after %d of the %d batches of epoch %d; "
                "Lightning counts that epoch as done, so this run starts epoch %d and the rest of epoch %d is not "
                "trained",
                where,
                cut[1],
                cut[2],
                cut[0],
                cut[0] + 1,
                cut[0],
            )

    def _apply_resumed_settings(self) -> None:
        # Here Lightning has restored a resumed run's optimizer and scheduler over the ones built from the config.
        [config] = self.trainer.lr_scheduler_configs
        optimizer = self.trainer.optimizers[0]
        length, restored = self.total_steps(), restored_length(config.scheduler)
        resized = restored is not None and restored != length
        if self._changed_optimizer_settings or resized:
            before = optimizer.param_groups[0]["lr"]
            apply_settings(optimizer, config.scheduler, self.hparams, length)
            if self.global_rank == 0:
                changes = list(self._changed_optimizer_settings)
                if resized:
                    # e.g. a finished run resumed with more epochs: the old schedule had decayed to its end.
                    changes.append(f"the schedule's length, {restored} -> {length} optimizer steps")
                log.warning(
                    "pandallm: resumed with a changed %s; the learning rate at step %d is now %g (the checkpoint's "
                    "schedule gave %g)",
                    "; ".join(changes),
                    self.trainer.global_step,
                    optimizer.param_groups[0]["lr"],
                    before,
                )
        self._changed_optimizer_settings = []
        if optimizer.param_groups[0]["lr"] == 0.0 and self.trainer.global_step < length and self.global_rank == 0:
            log.warning(
                "pandallm: the learning rate is 0 at step %d of %d: the steps that follow do not train",
                self.trainer.global_step,
                length,
            )

    def on_validation_epoch_start(self) -> None:
        self._eval_sums = torch.zeros(2 + len(self.objective.metric_names), dtype=torch.float64, device=self.device)

    on_test_epoch_start = on_validation_epoch_start

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_sums += self._sums(self.objective.terms(self, batch, "val"))

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_sums += self._sums(self.objective.terms(self, batch, "test"))

    def _log_eval(self, stage: str) -> None:
        # Unit-weighted over the whole set and all ranks (SFT: tokens, so the perplexity is exp of the true mean).
        loss_sum, units, *totals = self.trainer.strategy.reduce(self._eval_sums, reduce_op="sum").tolist()
        if units == 0:
            return
        loss = loss_sum / units
        metrics = {name: float(value) for name, value in self.objective.means(units, totals).items()}
        self.log(f"{stage}/loss", loss, prog_bar=True)
        for name, value in {**metrics, **self.objective.evaluation_logs(loss, metrics)}.items():
            self.log(f"{stage}/{name}", value)

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    @torch.no_grad()
    def on_predict_start(self) -> None:
        if self.objective.head != "causal_lm":
            raise ConfigError(
                f"pandallm predict generates text; this model ({type(self.objective).__name__}) scores sequences, it "
                "does not generate: score pairs with `pandallm validate` or load its export with "
                "AutoModelForSequenceClassification"
            )

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        # Left-padded rows (`collate_prompts`); batch `batch_idx` of this rank samples from its own seeded stream.
        new_tokens = generate(
            self.model,
            self.tokenizer,
            batch["input_ids"],
            batch["attention_mask"],
            self.generation,
            self.hparams.max_new_tokens,
            stream=self.global_rank * SEED_STRIDE + batch_idx,
        )
        outputs = decode(self.tokenizer, new_tokens)
        # `{"input" | "prompt", "output", "reference"}`: the prompt as its record gave it (`PromptRecord.shown`), the
        # completion, and the record's own reply to compare it with, if it has one.
        predictions = []
        for prompt, output, reference in zip(batch["prompt"], outputs, batch["reference"], strict=True):
            reply = {} if reference is None else {"reference": reference}
            predictions.append({**prompt, "output": output, **reply})
        return predictions

    # ---- optimization ----------------------------------------------------------------------------------------

    def total_steps(self) -> int:
        datamodule = self.trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "num_train_batches"):
            raise ModelError("PandaLLM computes its schedule from a PandaDataModule; pass one to the trainer")
        return run_steps(self.trainer, datamodule)

    def configure_optimizers(self) -> dict:
        h = self.hparams
        trainer = self.trainer
        zero.refuse_skipping(trainer.strategy, h.nonfinite)
        zero.checkpoint_trainable_only(trainer.strategy, self.is_adapter_run)
        # Clipping needs gradients that are not scaled any more: a fused AdamW unscales fp16 gradients inside its
        # own step, after clipping, and Lightning's mixed-precision plugin refuses to clip its gradients at all
        # (bf16 too). The foreach AdamW is the same update in a few more kernels.
        plugin = trainer.precision_plugin
        scaled = isinstance(plugin, MixedPrecision) or getattr(plugin, "scaler", None) is not None
        clips_scaled = scaled and bool(trainer.gradient_clip_val)
        optimizer = build_optimizer(
            h.optimizer,
            # DeepSpeed drops an empty group, which would leave the LR schedule a group too many; elsewhere both
            # groups stay, so that checkpoints keep the same optimizer layout whatever is trained.
            decay_groups(self.named_parameters(), h.weight_decay, keep_empty=not zero.is_deepspeed(trainer.strategy)),
            h.learning_rate,
            h.adam_betas,
            h.adam_epsilon,
            self.device,
            cpu_offload=zero.offloads_optimizer(trainer.strategy),
            fused=not clips_scaled,
        )
        schedule = schedule_from(h, self.total_steps())
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": LambdaLR(optimizer, schedule), "interval": "step"},
        }

    # ---- export ----------------------------------------------------------------------------------------------

    def export_hf(
        self,
        directory: str | Path,
        adapter_save_type: AdapterSaveType = "adapter_only",
        chat_template: str | None = None,
    ) -> Path:
        """Save the model and tokenizer in Hugging Face format (safetensors), loadable without pandallm; the
        tokenizer with `chat_template`, the Jinja template the run trained with, when given.

        A LoRA run saves either its adapters (`adapter_only`: a PEFT adapter directory, which
        `PeftModel.from_pretrained(base, directory)` loads) or the adapters merged into a copy of the base
        (`merge`: a plain transformers checkpoint; a quantized base is dequantized for it).
        """
        if not self.is_adapter_run:
            return save_hf(self.model, self.tokenizer, directory, chat_template)
        if adapter_save_type == "merge":
            return save_hf(merged_copy(self.model), self.tokenizer, directory, chat_template)
        if adapter_save_type != "adapter_only":
            raise ModelError(f"adapter_save_type must be 'adapter_only' or 'merge', got '{adapter_save_type}'")
        # Embedding rows that grew with the tokenizer are part of the trained model: saved with the adapters (and
        # peft then does not look the base's vocabulary up on the hub to find out). When both embeddings are
        # `modules_to_save`, the adapters hold them already; peft's `save_embedding_layers` would add two more copies
        # of each (the frozen original and the base's), tripling the largest tensors of the export.
        grown = self._added_tokens > 0 and not trains_both_embeddings(self.model)
        return save_hf(self.model, self.tokenizer, directory, chat_template, save_embedding_layers=grown)
