"""The reference model of DPO-style objectives: its log-probabilities of each pair's two sides.

The reference is the model training starts from. Under LoRA it is always at hand, for free: the base with the
adapters disabled. For full training it is the starting weights, which training overwrites; two ways to keep it:

- `precompute` (the default): before the first step, when the policy still is the reference, every training and
  validation pair is scored once (no gradients, eval mode, sharded over the ranks and gathered), and the
  log-probabilities are kept by pair index, in checkpoints too, so that a resumed run uses the same ones. No second
  model, and no reference forward per step.
- `live`: each batch is scored as it trains, by the LoRA base or by a frozen copy of the starting model.

Validating or testing later (`pandallm validate --ckpt_path`) scores unseen pairs with the LoRA base, or with the
starting model loaded again from `model.model_name_or_path`.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from typing import TYPE_CHECKING, Any

import torch

from pandallm.errors import ConfigError, ModelError
from pandallm.model.chunked_loss import chunked_token_logps
from pandallm.model.head import head_bypassed
from pandallm.model.parallel import shards_parameters
from pandallm.objectives.logps import token_logps

if TYPE_CHECKING:
    from pandallm.model.module import PandaLLM

log = logging.getLogger(__name__)

SPLITS = {"train": "train", "val": "validation", "test": "test"}


class ReferenceScores:
    """Reference log-probabilities of the pairs of each data split, `(pairs, 2)` [chosen, rejected], by index."""

    def __init__(self) -> None:
        self.scores: dict[str, torch.Tensor] = {}
        self.model: torch.nn.Module | None = None  # the starting model, when it must be scored apart from the policy
        self.scoring_seconds = 0.0  # spent scoring before training (precompute), for benchmarks and logs

    # ---- scoring -----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def score(self, module: PandaLLM, batch: dict[str, Any]) -> torch.Tensor:
        """The reference's summed log-probabilities of a batch's 2B sequences."""
        return self.token_scores(module, batch).sum(-1)

    @torch.no_grad()
    def token_scores(self, module: PandaLLM, batch: dict[str, Any], temperature: float = 1.0) -> torch.Tensor:
        """The reference's log-probability of each trained token of a batch's rows, (rows, seq; 0 elsewhere), its
        logits divided by `temperature` (online RL), along `model.loss_impl` as the policy's are: from the full logits,
        or a chunk of tokens at a time, the hidden states scaled instead of the logits."""
        inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
        with self._as_reference(module) as forward:
            if module.loss_path == "full":
                logits = forward(**inputs).logits
                return token_logps(logits / temperature if temperature != 1.0 else logits, batch["labels"])[0]
            with head_bypassed(forward) as head:
                forward(**inputs)
        hidden = head.hidden / temperature if temperature != 1.0 else head.hidden
        return chunked_token_logps(hidden, head.weight, batch["labels"], module.hparams.loss_chunk_tokens)

    @contextlib.contextmanager
    def _as_reference(self, module: PandaLLM):
        model = module.model
        if module.is_adapter_run:
            # peft's switch: the base's own weights, exactly (also those of a quantized base).
            with model.disable_adapter():
                yield model
        elif self.model is not None:
            yield self.model
        else:
            # Full training before its first step: the policy is the reference (in eval mode: no dropout).
            training = model.training
            model.eval()
            try:
                yield model
            finally:
                model.train(training)

    def prepare(self, module: PandaLLM, split: str) -> None:
        """Before the first batch of `split`: the reference at hand (`live`), or its scores of the split's pairs."""
        # Before the first step of a new run, the policy is the reference.
        fresh = module.trainer.state.fn == "fit" and module.trainer.global_step == 0
        if module.objective.reference == "live":
            self._reference_model(module, fresh)
            return
        rows = module.trainer.datamodule.datasets[split]
        if self.has(split, len(rows)):
            return  # scored before, or restored from the checkpoint
        if not fresh:  # validating or testing from a checkpoint, or other data on resume
            if split in self.scores and module.global_rank == 0:
                log.warning("pandallm: the %s pairs changed since the checkpoint; scoring them again", split)
            self._reference_model(module, fresh)
        self.precompute(module, split)

    def _reference_model(self, module: PandaLLM, fresh: bool) -> None:
        """For full training, the starting model beside the trained one: a frozen copy of the policy before its first
        step, else loaded again from `model.model_name_or_path`."""
        if module.is_adapter_run or self.model is not None:
            return
        if fresh:
            if shards_parameters(module.trainer.strategy):
                raise ConfigError(
                    "model.objective.init_args.reference: live keeps a frozen copy of the model beside it, which "
                    "FSDP and DeepSpeed do not shard; use reference: precompute (no copy at all)"
                )
            self.model = copy.deepcopy(module.model).eval().requires_grad_(False)
            return
        h = module.hparams
        if module.is_preset_run:
            raise ModelError(
                f"model.objective: the reference of a run trained from the preset '{h.model_name_or_path}' is its "
                "random initial model, which cannot be loaded again to score pairs it has not scored before training "
                "(validation pairs other than the run's data.val_files, test pairs, or reference: live); start from "
                "a checkpoint, or give such pairs as data.val_files of the run"
            )
        log.info("pandallm: loading the reference model %s beside the trained one", h.model_name_or_path)
        self.model = module.build_starting_model().eval().requires_grad_(False).to(module.device)

    # ---- precomputed ---------------------------------------------------------------------------------------------

    def lookup(self, stage: str, index: torch.Tensor) -> torch.Tensor:
        split = SPLITS[stage]
        if split not in self.scores:
            raise ModelError(f"no reference log-probabilities for the {split} pairs (an internal error: report it)")
        chosen, rejected = self.scores[split].to(index.device)[index].unbind(-1)
        return torch.cat([chosen, rejected])

    def has(self, split: str, num_pairs: int) -> bool:
        return split in self.scores and len(self.scores[split]) == num_pairs

    @torch.no_grad()
    def precompute(self, module: PandaLLM, split: str) -> None:
        """Score every pair of `split` (each rank a strided share, gathered to every rank)."""
        datamodule = module.trainer.datamodule
        rows = datamodule.datasets[split]
        if len(rows) == 0:
            return
        start = time.perf_counter()
        scores = torch.zeros(len(rows), 2, dtype=torch.float64)
        found = []
        for batch in datamodule.scoring_loader(split):
            batch = module.transfer_batch_to_device(batch, module.device, 0)
            chosen, rejected = self.score(module, batch).double().chunk(2)
            found.append(torch.stack([batch["index"].double(), chosen, rejected], dim=-1))
        # Every rank scored as many rows (shares are padded to the same length): gather them all.
        local = torch.cat(found) if found else torch.zeros(0, 3, dtype=torch.float64, device=module.device)
        gathered = module.all_gather(local).reshape(-1, 3).cpu()
        scores[gathered[:, 0].long()] = gathered[:, 1:]
        self.scores[split] = scores
        self.scoring_seconds += time.perf_counter() - start
        if module.global_rank == 0:
            log.info("pandallm: scored the %d %s pairs with the reference model", len(rows), split)

    # ---- checkpoints ---------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.scores)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.scores = {split: tensor.double() for split, tensor in state.items()}
