"""The two sides of a pandallm-vs-TRL preference comparison: `pandallm` (`pandallm fit` with a preference objective)
and `trl` (TRL's `DPOTrainer`, or its `CPOTrainer` for SimPO), on the same checkpoint, pair tokens, order, batch and
optimizer. Each reports its per-step losses and rewards, the wall-clock time and non-pad tokens of every step, and its
peak memory.

Both sides train on pandallm's own rows: TRL's tokenization is bypassed (`InOrderDPO._prepare_dataset`,
`InOrderCPO.tokenize_row`) and given each pair's prompt, chosen and rejected ids as pandallm built them, so that a
difference can only come from the training itself.

    python -m benchmarks.preference_sides {pandallm,trl} '<PairSetup as JSON>'
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.common import (
    prepare_in_order,
    rss_mib,
    run_side_in_child,
    seeded_adapters,
    seeded_peft_model,
    trainer_args,
)

# The loss types compared: pandallm's objective (class, init_args) and TRL's trainer and loss type for each.
LOSSES = {
    "sigmoid": ("DPO", {"loss_type": "sigmoid"}),
    "ipo": ("DPO", {"loss_type": "ipo"}),
    "simpo": ("SimPO", {"gamma": 0.5}),
}
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")


@dataclass(frozen=True)
class PairSetup:
    init: str  # checkpoint directory holding the model and its tokenizer
    pairs_dir: str  # preference records
    cache_dir: str  # pandallm's tokenized-data cache
    rows_file: str  # the pairs as pandallm tokenized them: prompt_ids, chosen_ids, rejected_ids (JSON)
    batch: int
    seq: int
    steps: int
    loss: str = "sigmoid"
    beta: float = 0.1
    lr: float = 1e-3
    lora_r: int = 0
    lora_alpha: float = 32.0
    reference: str = "precompute"
    device: str = "cpu"


def cli_args(s: PairSetup) -> list[str]:
    objective, init_args = LOSSES[s.loss]
    args = [
        *trainer_args(s.device, s.steps, s.init, s.lr),
        f"--model.objective={objective}",
        f"--model.objective.beta={s.beta}",
        *(f"--model.objective.{key}={value}" for key, value in init_args.items()),
        f"--data.instruction_tuning_data_dir={s.pairs_dir}",
        "--data.pretraining_data_dir=null",
        f"--data.max_seq_length={s.seq}",
        f"--data.per_device_train_batch_size={s.batch}",
        f"--data.per_device_eval_batch_size={s.batch}",  # the reference is scored in batches of this size
        "--data.num_workers=0",
        f"--data.cache_dir={s.cache_dir}",
    ]
    if objective == "DPO":
        args.append(f"--model.objective.reference={s.reference}")
    if s.lora_r:
        args += ["--model.use_lora=true", f"--model.lora_r={s.lora_r}", f"--model.lora_alpha={s.lora_alpha}"]
        args += ["--model.lora_dropout=0.0"]
    return args


def prepare_rows(s: PairSetup) -> list[dict]:
    """Tokenize the pairs once into the cache, and write them as TRL's columns for the TRL side."""
    from pandallm.cli import cli

    train = prepare_in_order(cli(cli_args(s), run=False).datamodule, s.batch).datasets["train"]
    rows = []
    for i in range(len(train)):
        row = train[i]
        sides = {}
        for side in ("chosen", "rejected"):
            ids, labels = row[f"{side}_input_ids"], row[f"{side}_labels"]
            start = next(k for k, label in enumerate(labels) if label != -100)
            sides[side] = (ids[:start], ids[start:])
        assert sides["chosen"][0] == sides["rejected"][0], "the two sides of a pair share their prompt"
        rows.append(
            {"prompt_ids": sides["chosen"][0], "chosen_ids": sides["chosen"][1], "rejected_ids": sides["rejected"][1]}
        )
    Path(s.rows_file).write_text(json.dumps(rows))
    return rows


def _report(times: list[float], tokens: list[int], losses: list[float], metrics: dict, device: str) -> dict:
    report = {
        "step_end_s": times,
        "step_tokens": tokens,
        "losses": losses,
        "metrics": metrics,
        "peak_rss_mib": round(rss_mib("VmHWM")),
    }
    if device == "cuda":
        report["gpu_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
    return report


def pandallm_side(s: PairSetup) -> dict:
    import lightning as L

    from pandallm.cli import cli

    run = cli(cli_args(s), run=False)
    datamodule = prepare_in_order(run.datamodule, s.batch)

    class Recorder(L.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.tokens: list[int] = []
            self.losses: list[float] = []
            self.metrics: dict[str, list[float]] = {name: [] for name in METRICS}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.losses.append(float(pl_module.step_loss))
            self.metrics.setdefault("grad_norm", []).append(
                float(trainer.callback_metrics.get("train/grad_norm", float("nan")))
            )
            for name in METRICS:
                self.metrics[name].append(float(pl_module.step_metrics[name]))
            self.tokens.append(int(batch["attention_mask"].sum()))
            self.times.append(time.perf_counter())

    recorder = Recorder()
    run.trainer.callbacks.append(recorder)
    with seeded_adapters():
        run.trainer.fit(run.model, datamodule)
    report = _report(recorder.times, recorder.tokens, recorder.losses, recorder.metrics, s.device)
    return {**report, "reference_scoring_s": run.model.reference_scores.scoring_seconds}


def trl_side(s: PairSetup) -> dict:
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoTokenizer, LlamaForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    rows = json.loads(Path(s.rows_file).read_text())
    tokenizer = AutoTokenizer.from_pretrained(s.init)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out of attention and labels on both sides
    model = LlamaForCausalLM.from_pretrained(s.init, attn_implementation="sdpa", dtype=torch.float32)
    if s.lora_r:
        # The adapters made here, as pandallm's are (TRL would make them from a `peft_config`, after other draws from
        # the RNG); TRL scores its reference with them disabled, as pandallm does.
        model = seeded_peft_model(model, s.lora_r, s.lora_alpha)
    common = {
        "output_dir": str(Path(s.cache_dir) / "trl"),
        "per_device_train_batch_size": s.batch,
        "max_steps": s.steps,
        "learning_rate": s.lr,
        "adam_beta1": 0.9,  # pandallm's AdamW defaults
        "adam_beta2": 0.99,
        "adam_epsilon": 1e-6,
        "weight_decay": 0.0,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "max_grad_norm": 1.0,
        "logging_steps": 1,
        "report_to": [],
        "use_cpu": s.device == "cpu",
        "save_strategy": "no",
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
        "seed": 0,
        "beta": s.beta,
    }

    class Recorder(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_end(self, args, state, control, **kwargs) -> None:
            self.times.append(time.perf_counter())

    recorder = Recorder()
    if s.loss == "simpo":
        trainer = _cpo(CPOTrainer, CPOConfig, model, tokenizer, rows, common, recorder)
    else:

        class InOrderDPO(DPOTrainer):
            def _prepare_dataset(self, dataset, *args, **kwargs):
                return dataset  # pandallm's ids, as they are

            def _get_train_sampler(self, *args, **kwargs):
                return SequentialSampler(self.train_dataset)

        config = DPOConfig(**common, loss_type=[s.loss], max_length=None, precompute_ref_log_probs=False)
        trainer = InOrderDPO(
            model=model,
            args=config,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            callbacks=[recorder],
        )
    trainer.train()
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    metrics = {name: [entry[name] for entry in history] for name in (*METRICS, "grad_norm")}
    per_step = s.batch
    tokens = [
        sum(
            len(r["prompt_ids"]) * 2 + len(r["chosen_ids"]) + len(r["rejected_ids"])
            for r in rows[i * per_step : (i + 1) * per_step]
        )
        for i in range(s.steps)
    ]
    return _report(recorder.times, tokens[: len(recorder.times)], [e["loss"] for e in history], metrics, s.device)


def _cpo(trainer_cls, config_cls, model, tokenizer, rows, common, recorder):
    """TRL's CPOTrainer as SimPO (loss_type simpo, no SFT term), on pandallm's ids."""
    from datasets import Dataset
    from torch.utils.data import SequentialSampler

    class InOrderCPO(trainer_cls):
        def tokenize_row(self, feature, model=None) -> dict:
            prompt = feature["prompt_ids"]
            out = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
            for side in ("chosen", "rejected"):
                ids = prompt + feature[f"{side}_ids"]
                out[f"{side}_input_ids"] = ids
                out[f"{side}_attention_mask"] = [1] * len(ids)
                out[f"{side}_labels"] = [-100] * len(prompt) + feature[f"{side}_ids"]
            return out

        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    text = {"prompt": "", "chosen": "", "rejected": ""}  # the columns TRL's dataset maps expect; not read
    config = config_cls(
        **common, loss_type="simpo", simpo_gamma=0.5, cpo_alpha=0.0, max_length=10**6, remove_unused_columns=False
    )
    return InOrderCPO(
        model=model,
        args=config,
        train_dataset=Dataset.from_list([{**text, **row} for row in rows]),
        processing_class=tokenizer,
        callbacks=[recorder],
    )


def run_side(side: str, s: PairSetup, in_process: bool = False) -> dict:
    """Run one side in a fresh process (its peak memory is then its own); `in_process`: here."""
    if in_process:
        return pandallm_side(s) if side == "pandallm" else trl_side(s)
    return run_side_in_child("benchmarks.preference_sides", side, s)


if __name__ == "__main__":
    print(json.dumps(run_side(sys.argv[1], PairSetup(**json.loads(sys.argv[2])), in_process=True)))
