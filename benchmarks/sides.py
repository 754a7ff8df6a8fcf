"""The two sides of a pandallm-vs-HF-Trainer comparison, each run in a process of its own so that its peak memory
is its own: `pandallm` (`pandallm fit`'s CLI, LightningModule and Trainer) and `hf` (a `transformers.Trainer`
script, with peft for LoRA), on the same checkpoint, token rows, order, batch, precision and optimizer.

A side reports the wall-clock time and the non-pad tokens of every optimizer step, its per-step losses and its
peak memory; `steady_tokens_per_second` turns that into a throughput past start-up and warm-up.

    python -m benchmarks.sides {pandallm,hf} '<Setup as JSON>'    # what `run_side` starts
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.common import (
    rss_mib,
    run_side_in_child,
    seeded_adapters,
    seeded_peft_model,
    trainer_args,
)


@dataclass(frozen=True)
class Setup:
    init: str  # checkpoint directory holding the model and its tokenizer
    cache_dir: str  # pandallm's tokenized-data cache, shared by every run
    rows_file: str  # the unpacked rows as pandallm tokenized them (JSON), which the HF side trains on
    batch: int
    seq: int
    steps: int
    accumulate: int = 1  # micro-batches per optimizer step (`batch` rows each)
    instruction_dir: str | None = None
    pretraining_dir: str | None = None  # full `seq`-token blocks instead (the GPU MFU run; pandallm side only)
    packing: bool = False  # pandallm side only: the HF side always trains padded rows
    lr: float = 1e-3
    lora_r: int = 0  # 0: full training
    lora_alpha: float = 32.0
    quant_bits: int = 0  # 4 (NF4, QLoRA) or 8: a bitsandbytes base under the adapters
    device: str = "cpu"
    precision: str = "32-true"  # Lightning's names; bf16-mixed is the HF Trainer's bf16=True
    compile: bool = False
    gradient_checkpointing: bool = False
    strategy: str | None = None  # pandallm side only: `--trainer.strategy`, as a class name or JSON
    loss_impl: str = "auto"  # pandallm side only: `model.loss_impl` (full, chunked, liger, auto)
    liger_kernels: bool = False  # pandallm side only: Liger's RMSNorm, RoPE and SwiGLU (CUDA)
    activation_offloading: bool = False  # pandallm side only (CUDA)


def cli_args(s: Setup, packing: bool) -> list[str]:
    """`pandallm fit` options for `s`: constant LR, no warmup, clipping at 1.0, nothing saved or logged."""
    args = [
        *trainer_args(s.device, s.steps, s.init, s.lr),
        f"--trainer.precision={s.precision}",
        f"--trainer.accumulate_grad_batches={s.accumulate}",
        f"--model.gradient_checkpointing={s.gradient_checkpointing}",
        f"--model.compile={s.compile}",  # each decoder layer; the HF side compiles its whole model (torch_compile)
        f"--model.loss_impl={s.loss_impl}",
        f"--model.liger_kernels={s.liger_kernels}",
        f"--model.activation_offloading={s.activation_offloading}",
        f"--data.instruction_tuning_data_dir={s.instruction_dir or 'null'}",
        f"--data.pretraining_data_dir={s.pretraining_dir or 'null'}",
        f"--data.max_seq_length={s.seq}",
        f"--data.per_device_train_batch_size={s.batch}",
        "--data.num_workers=0",
        f"--data.packing={packing}",
        f"--data.cache_dir={s.cache_dir}",
    ]
    if s.strategy:
        args.append(f"--trainer.strategy={s.strategy}")
    if s.lora_r:
        args += ["--model.use_lora=true", f"--model.lora_r={s.lora_r}", f"--model.lora_alpha={s.lora_alpha}"]
        args += ["--model.lora_dropout=0.0"]  # no dropout: the losses of both sides must be comparable step by step
    if s.quant_bits:
        args += ["--model.use_quant=true", f"--model.bit_training={s.quant_bits}"]
    return args


def prepare_rows(s: Setup) -> list[dict]:
    """Tokenize (and pack) the data once into the shared cache, before any timed run, and write the unpacked rows
    for the HF side. Returns those rows."""
    from benchmarks.common import prepare_in_order
    from pandallm.cli import cli

    rows: list[dict] = []
    for packing in (True, False):
        dm = prepare_in_order(cli(cli_args(s, packing), run=False).datamodule, s.batch)
        if not packing:
            train = dm.datasets["train"]
            rows = [{k: list(train[i][k]) for k in ("input_ids", "labels")} for i in range(len(train))]
    Path(s.rows_file).write_text(json.dumps(rows))
    return rows


def _report(times: list[float], tokens: list[int], losses: list[float], device: str, cpu: list[float]) -> dict:
    report = {"step_end_s": times, "step_tokens": tokens, "losses": losses, "peak_rss_mib": round(rss_mib("VmHWM"))}
    report["step_end_cpu_s"] = cpu  # this process's CPU time (every thread) at each step's end
    if device == "cuda":
        report["gpu_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
    return report


def pandallm_side(s: Setup) -> dict:
    import lightning as L

    from benchmarks.common import prepare_in_order
    from pandallm.cli import cli

    run = cli(cli_args(s, s.packing), run=False)
    dm = prepare_in_order(run.datamodule, s.batch)  # the HF Trainer's order: the data set's, unshuffled
    module = run.model

    class Recorder(L.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.cpu: list[float] = []
            self.tokens: list[int] = []
            self.losses: list[float] = []
            self.window_tokens = 0

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.window_tokens += int(batch["attention_mask"].sum())
            if trainer.global_step == len(self.times):
                return  # inside an accumulation window: no optimizer step yet
            # After the optimizer step: the loss it logged, over the whole window. Reading it waits for the device,
            # as the HF Trainer's logging does.
            self.losses.append(float(pl_module.step_loss))
            self.tokens.append(self.window_tokens)
            self.times.append(time.perf_counter())
            self.cpu.append(time.process_time())
            self.window_tokens = 0

    recorder = Recorder()
    run.trainer.callbacks.append(recorder)
    with seeded_adapters():
        run.trainer.fit(module, dm)
    return _report(recorder.times, recorder.tokens, recorder.losses, s.device, recorder.cpu)


def hf_side(s: Setup) -> dict:
    from peft import prepare_model_for_kbit_training
    from torch.utils.data import SequentialSampler
    from transformers import (
        BitsAndBytesConfig,
        LlamaForCausalLM,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from pandallm.data.collate import collate_rows

    rows = json.loads(Path(s.rows_file).read_text())
    for row in rows:
        row["position_ids"] = list(range(len(row["input_ids"])))
    quantization = None
    if s.quant_bits == 4:
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    elif s.quant_bits == 8:
        quantization = BitsAndBytesConfig(load_in_8bit=True)
    model = LlamaForCausalLM.from_pretrained(
        s.init,
        attn_implementation="sdpa",
        # As pandallm holds it: fp32 master weights, or a bf16 base under bf16-true and under a quantized base.
        dtype=torch.bfloat16 if s.quant_bits or s.precision == "bf16-true" else torch.float32,
        quantization_config=quantization,
        device_map={"": 0} if s.quant_bits else None,
    )
    if s.quant_bits:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=s.gradient_checkpointing)
    elif s.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if s.lora_r:
        model = seeded_peft_model(model, s.lora_r, s.lora_alpha)
    args = TrainingArguments(
        output_dir=str(Path(s.cache_dir) / "hf"),
        per_device_train_batch_size=s.batch,
        gradient_accumulation_steps=s.accumulate,
        max_steps=s.steps,
        learning_rate=s.lr,
        adam_beta1=0.9,  # pandallm's AdamW defaults
        adam_beta2=0.99,
        adam_epsilon=1e-6,
        weight_decay=0.0,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=1.0,
        logging_steps=1,
        report_to=[],
        use_cpu=s.device == "cpu",
        bf16=s.precision.startswith("bf16"),
        torch_compile=s.compile,
        save_strategy="no",
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
    )

    def collate(features: list[dict]) -> dict[str, torch.Tensor]:
        batch = collate_rows(features, pad_id=0)  # padding is masked out of attention and labels
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": batch["labels"]}

    class InOrder(Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    class Recorder(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.cpu: list[float] = []

        def on_step_end(self, args, state, control, **kwargs) -> None:
            self.times.append(time.perf_counter())
            self.cpu.append(time.process_time())

    recorder = Recorder()
    trainer = InOrder(model=model, args=args, train_dataset=rows, data_collator=collate, callbacks=[recorder])
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    # Step i trains rows [i * n, (i + 1) * n), n = batch x accumulate: the sequential sampler's order.
    n = s.batch * s.accumulate
    tokens = [sum(len(r["input_ids"]) for r in rows[i * n : (i + 1) * n]) for i in range(s.steps)]
    return _report(recorder.times, tokens[: len(recorder.times)], losses, s.device, recorder.cpu)


def run_side(side: str, s: Setup, in_process: bool = False) -> dict:
    """Run one side in a fresh process (its report's peak memory is then its own); `in_process`: here, which
    saves a process start-up (the smoke tests) but reports this process's peak."""
    if in_process:
        return pandallm_side(s) if side == "pandallm" else hf_side(s)
    return run_side_in_child("benchmarks.sides", side, s)


def steady_tokens_per_second(report: dict, warmup: int, clock: str = "step_end_s") -> float:
    """Non-pad tokens per second from the end of step `warmup` to the end of the last step: start-up (imports,
    loading, data set-up) and the first, slower steps (allocator growth, lazy init) are left out. `clock`:
    `step_end_s` (wall time) or `step_end_cpu_s` (the process's CPU time: what other work on a shared machine
    disturbs least)."""
    times, tokens = report[clock], report["step_tokens"]
    if not 1 <= warmup < len(times):
        raise ValueError(f"warm-up of {warmup} steps leaves nothing to time in {len(times)} steps")
    return sum(tokens[warmup:]) / (times[-1] - times[warmup - 1])


if __name__ == "__main__":
    print(json.dumps(run_side(sys.argv[1], Setup(**json.loads(sys.argv[2])), in_process=True)))
