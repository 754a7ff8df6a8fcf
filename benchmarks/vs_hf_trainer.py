"""pandallm against the Hugging Face Trainer on the same model, data order, batch and optimizer (CPU fp32).

    python benchmarks/vs_hf_trainer.py [--steps 30] [--rounds 3]

Reports (1) per-step loss parity with packing off: the external check that pandallm trains what the HF Trainer
trains; (2) tokens/s of both, run alternately `rounds` times so that machine noise cancels in the ratio; (3)
pandallm with packing on against the HF Trainer padded, on the same records.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import SequentialSampler
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from benchmarks.common import prepare_in_order, write_result
from pandallm.cli import cli
from pandallm.data.collate import collate_rows
from pandallm.model.presets import llama_tiny

REPO = Path(__file__).resolve().parents[1]
LR, BATCH, SEQ = 1e-3, 8, 256


def pandallm_run(work: Path, init: Path, steps: int, packing: bool) -> tuple[list[float], float, int]:
    """Per-step losses, seconds of training, tokens trained on."""
    run = cli(
        [
            "--trainer.accelerator=cpu",
            f"--trainer.max_steps={steps}",
            "--trainer.enable_progress_bar=false",
            "--trainer.logger=false",
            "--trainer.enable_checkpointing=false",
            "--trainer.num_sanity_val_steps=0",
            "--trainer.gradient_clip_val=1.0",
            "--export.enabled=false",
            f"--model.model_name_or_path={init}",
            "--model.lr_scheduler=constant",
            "--model.warmup_steps=0",
            f"--model.learning_rate={LR}",
            "--data.pretraining_data_dir=null",
            f"--data.max_seq_length={SEQ}",
            f"--data.per_device_train_batch_size={BATCH}",
            "--data.num_workers=0",
            f"--data.packing={packing}",
            f"--data.cache_dir={work / 'cache'}",
        ],
        run=False,
    )
    dm = prepare_in_order(run.datamodule, BATCH)  # the HF Trainer's order: the data set's, unshuffled
    losses: list[float] = []
    tokens = 0

    module = run.model
    original = module.training_step

    def training_step(batch, batch_idx):
        nonlocal tokens
        tokens += int(batch["attention_mask"].sum())
        out = original(batch, batch_idx)
        losses.append(float(module._last_loss))
        return out

    module.training_step = training_step
    start = time.perf_counter()
    run.trainer.fit(module, dm)
    return losses, time.perf_counter() - start, tokens


def hf_run(work: Path, init: Path, steps: int, rows) -> tuple[list[float], float, int]:
    model = LlamaForCausalLM.from_pretrained(init, attn_implementation="sdpa")
    args = TrainingArguments(
        output_dir=str(work / "hf"),
        per_device_train_batch_size=BATCH,
        max_steps=steps,
        learning_rate=LR,
        adam_beta1=0.9,
        adam_beta2=0.99,
        adam_epsilon=1e-6,
        weight_decay=0.0,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=1.0,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
    )

    def collate(features):
        batch = collate_rows(features, pad_id=0)
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": batch["labels"]}

    class InOrder(Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    trainer = InOrder(model=model, args=args, train_dataset=rows, data_collator=collate)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    tokens = sum(len(rows[i]["input_ids"]) for i in range(min(steps * BATCH, len(rows))))
    return losses, seconds, tokens


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pandallm-bench-"))
    try:
        torch.manual_seed(0)
        init = work / "init"
        from pandallm.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(str(REPO / "dataset" / "tokenizer"))
        LlamaForCausalLM(LlamaConfig(**llama_tiny(), vocab_size=len(tokenizer))).save_pretrained(init)
        tokenizer.save_pretrained(init)
        parity, _, _ = pandallm_run(work, init, options.steps, packing=False)
        run = cli(
            [
                f"--model.model_name_or_path={init}",
                "--data.pretraining_data_dir=null",
                f"--data.max_seq_length={SEQ}",
                f"--data.cache_dir={work / 'cache'}",
                "--data.num_workers=0",
            ],
            run=False,
        )
        run.datamodule.prepare_data()
        run.datamodule.setup("fit")
        hf_losses, _, _ = hf_run(work, init, options.steps, run.datamodule.datasets["train"])
        worst = max(abs(a - b) for a, b in zip(parity, hf_losses, strict=False))
        rates: dict[str, list[float]] = {"pandallm": [], "hf_trainer": [], "pandallm_packed": []}
        for _ in range(options.rounds):  # alternating, so that machine noise cancels in the ratios
            _, seconds, tokens = pandallm_run(work, init, options.steps, packing=False)
            rates["pandallm"].append(tokens / seconds)
            _, seconds, tokens = hf_run(work, init, options.steps, run.datamodule.datasets["train"])
            rates["hf_trainer"].append(tokens / seconds)
            _, seconds, tokens = pandallm_run(work, init, options.steps, packing=True)
            rates["pandallm_packed"].append(tokens / seconds)
        median = {name: statistics.median(values) for name, values in rates.items()}
        result = {
            "model": "llama-tiny (random init, shared by both), CPU fp32, batch 8, max_seq_length 256",
            "steps": options.steps,
            "loss_parity_max_abs_diff": worst,
            "losses": {"pandallm": parity, "hf_trainer": hf_losses},
            "tokens_per_second_median": median,
            "ratio_unpacked_vs_hf": median["pandallm"] / median["hf_trainer"],
            "ratio_packed_vs_hf_padded": median["pandallm_packed"] / median["hf_trainer"],
        }
        print(f"loss parity over {options.steps} steps: max |pandallm - HF Trainer| = {worst:.2e}")
        print(f"{'run':<18}{'tokens/s (median)':>20}")
        for name, value in median.items():
            print(f"{name:<18}{value:>20.0f}")
        print(
            f"ratio unpacked/HF: {result['ratio_unpacked_vs_hf']:.2f}   packed/HF padded: "
            f"{result['ratio_packed_vs_hf_padded']:.2f}"
        )
        print("written:", write_result("vs_hf_trainer", result))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
