"""Generation metrics in `validate`, `test` and during `fit`: the model answers the prompts of the validation (or
test) records, and its answers are scored against the records' own replies (`pandallm.eval.metrics`).

The loss and perplexity of those records come from `PandaLLM.validation_step`, as before; this callback only
generates and scores, at the end of each validation (not in Lightning's sanity check). With `fast_validation_n`,
validations during `fit` generate for the first `fast_validation_n` records only, and every
`fast_validation_step_interval`-th validation for all of them; `validate` and `test` always score all of them.
Each validation's outputs are saved beside the run's metrics, one JSON line per record.
"""

from __future__ import annotations

import json
import logging
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from pandallm.data.collate import collate_prompts
from pandallm.data.records import read_records
from pandallm.data.sharding import rank_positions
from pandallm.distributed import gather_from_ranks
from pandallm.errors import ConfigError
from pandallm.eval.metrics import check_names, score
from pandallm.generate.options import SEED_STRIDE, decode, generate

log = logging.getLogger(__name__)


class GenerationMetrics(L.Callback):
    def __init__(
        self,
        metrics: list[str] | None = None,
        fast_validation_n: int | None = None,
        fast_validation_step_interval: int = 1,
        save_predictions: bool = True,
    ) -> None:
        """
        Args:
            metrics: Metrics of the generated answers: `bleu`, `chrf`, `rouge` (ROUGE-1/2/L), `meteor`,
                `edit_distance`, `exact_match`; `ppl` is accepted and always logged by validation itself. They are
                computed on the instruction records of `data.val_files` (`test`: `data.test_files`), answered with
                the `generation.*` options and `model.max_new_tokens`, and logged as `val/<name>` (`test/<name>`).
            fast_validation_n: During `fit`, generate for the first N validation records only (the loss still
                covers all of them); null: all of them at every validation.
            fast_validation_step_interval: With `fast_validation_n`, every this many validations of `fit` one
                generates for all the records.
            save_predictions: Write each validation's answers to `generations/<stage>_step<N>.jsonl` in the run
                directory: `{"input" | "prompt", "output", "reference"}` per record.
        """
        self.metrics = check_names(metrics or [], "evaluation.metrics")
        if fast_validation_n is not None and fast_validation_n < 1:
            raise ConfigError(f"evaluation.fast_validation_n must be at least 1 (or null), got {fast_validation_n}")
        if fast_validation_step_interval < 1:
            raise ConfigError(
                f"evaluation.fast_validation_step_interval must be at least 1, got {fast_validation_step_interval}"
            )
        self.fast_validation_n = fast_validation_n
        self.fast_validation_step_interval = fast_validation_step_interval
        self.save_predictions = save_predictions
        self.validations = 0  # validations of `fit` so far, across resumes
        self._rows: dict[str, list[dict]] = {}

    @property
    def enabled(self) -> bool:
        return any(name != "ppl" for name in self.metrics)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self.enabled or stage == "predict":
            return
        datamodule = trainer.datamodule
        split, option = ("test", "data.test_files") if stage == "test" else ("val", "data.val_files")
        files = [f for f in getattr(datamodule, f"{split}_files", []) if read_records(f)[0] == "instruction"]
        rows = [row for row in datamodule.prompts(files) if row["reference"] is not None] if files else []
        if not rows:
            raise ConfigError(
                f"evaluation.metrics {self.metrics}: no instruction records with replies to score in {option} "
                f"({getattr(datamodule, f'{split}_files', [])}); generation metrics need them (records held out by "
                "data.val_fraction are scored by loss and perplexity only)"
            )
        if self.fast_validation_n is not None and self.fast_validation_n > len(rows) and split == "val":
            raise ConfigError(
                f"evaluation.fast_validation_n={self.fast_validation_n} is larger than the validation set: {option} "
                f"holds {len(rows)} records with replies"
            )
        self._rows[split] = rows

    def _is_fast(self, trainer: L.Trainer) -> bool:
        if self.fast_validation_n is None or trainer.state.fn != "fit":
            return False
        return self.validations % self.fast_validation_step_interval != 0

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled or trainer.sanity_checking:
            return
        fitting = trainer.state.fn == "fit"
        if fitting:
            self.validations += 1
        rows = self._rows["val"]
        if self._is_fast(trainer):
            rows = rows[: self.fast_validation_n]
        self._evaluate(trainer, pl_module, "val", rows)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.enabled:
            self._evaluate(trainer, pl_module, "test", self._rows["test"])

    @torch.no_grad()
    def _evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str, rows: list[dict]) -> None:
        outputs = self._generate(trainer, pl_module, rows)
        scores = score(self.metrics, outputs, [row["reference"] for row in rows])
        for name, value in scores.items():
            # The same value on every rank (computed from the gathered outputs): no reduction needed.
            pl_module.log(f"{stage}/{name}", value)
        if self.save_predictions and trainer.is_global_zero:
            directory = Path(trainer.log_dir or trainer.default_root_dir) / "generations"
            directory.mkdir(parents=True, exist_ok=True)
            path = directory / f"{stage}_step{trainer.global_step}.jsonl"
            with path.open("w", encoding="utf-8") as f:
                for row, output in zip(rows, outputs, strict=True):
                    f.write(json.dumps({**row["prompt"], "output": output, "reference": row["reference"]}) + "\n")
        log.info("pandallm: %s generation metrics on %d records: %s", stage, len(rows), scores)

    def _generate(self, trainer: L.Trainer, pl_module: L.LightningModule, rows: list[dict]) -> list[str]:
        """Every row's answer, in order. Each rank answers a strided share; the shares are of equal length (the
        shortest repeat a row), so that under sharded weights every rank takes part in every forward pass."""
        from pandallm.callbacks.export import shards_parameters

        rank, world_size = trainer.global_rank, trainer.world_size
        mine = rank_positions(np.arange(len(rows)), rank, world_size, pad=True).tolist()
        datamodule = trainer.datamodule
        collate = partial(collate_prompts, pad_id=datamodule.pad_id)
        size = datamodule.eval_batch_size
        synced = {"synced_gpus": True} if world_size > 1 and shards_parameters(trainer.strategy) else {}
        answers: dict[int, str] = {}
        was_training = pl_module.model.training
        pl_module.model.eval()
        for b, start in enumerate(range(0, len(mine), size)):
            indices = mine[start : start + size]
            batch = collate([rows[i] for i in indices])
            new_tokens = generate(
                pl_module.model,
                pl_module.tokenizer,
                batch["input_ids"].to(pl_module.device),
                batch["attention_mask"].to(pl_module.device),
                pl_module.generation,
                pl_module.hparams.max_new_tokens,
                stream=rank * SEED_STRIDE + b,
                **synced,
            )
            answers.update(zip(indices, decode(pl_module.tokenizer, new_tokens), strict=True))
        pl_module.model.train(was_training)
        for gathered in gather_from_ranks(answers):
            answers.update(gathered)
        return [answers[i] for i in range(len(rows))]

    def state_dict(self) -> dict[str, Any]:
        return {"validations": self.validations} if self.enabled else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.validations = int(state_dict.get("validations", 0))
