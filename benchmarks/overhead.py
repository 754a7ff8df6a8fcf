"""Per-step overhead of pandallm (Lightning loop, callbacks, logging) against a raw PyTorch loop running the same
model, batches and optimizer. Median step times, measured alternately over `rounds`.

    python benchmarks/overhead.py [--steps 40] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

from benchmarks.common import prepare_in_order, write_result
from pandallm.cli import cli
from pandallm.model.loss import causal_lm_loss_sum
from pandallm.optim.optimizers import build_optimizer

REPO = Path(__file__).resolve().parents[1]


class StepTimer(L.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        self.times.append(time.perf_counter() - self._start)


def build(work: Path, steps: int):
    run = cli(
        [
            "--trainer.accelerator=cpu",
            f"--trainer.max_steps={steps}",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_checkpointing=false",
            "--trainer.num_sanity_val_steps=0",
            "--trainer.logger=false",
            "--export.enabled=false",
            "--model.model_name_or_path=llama-mini",
            f"--model.tokenizer={REPO / 'dataset' / 'tokenizer'}",
            "--data.pretraining_data_dir=null",
            "--data.max_seq_length=256",
            "--data.per_device_train_batch_size=8",
            "--data.num_workers=0",
            f"--data.cache_dir={work / 'cache'}",
        ],
        run=False,
    )
    return run, prepare_in_order(run.datamodule, batch_size=8)


def pandallm_steps(work: Path, steps: int) -> list[float]:
    torch.manual_seed(0)
    run, dm = build(work, steps)
    timer = StepTimer()
    run.trainer.callbacks.append(timer)
    run.trainer.fit(run.model, dm)
    return timer.times[5:]  # past warm-up


def raw_steps(work: Path, steps: int) -> list[float]:
    torch.manual_seed(0)
    run, dm = build(work, steps)
    module = run.model
    module.configure_model()
    model = module.model.train()
    # The optimizer pandallm's run uses (AdamW with the recipe defaults, fused on this device).
    optimizer = build_optimizer("adamw", [{"params": list(model.parameters())}], 1e-3, (0.9, 0.99), 1e-6, module.device)
    times = []
    for step, batch in enumerate(dm.train_dataloader()):
        if step == steps:
            break
        start = time.perf_counter()
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        loss_sum, count = causal_lm_loss_sum(logits, batch["labels"])
        (loss_sum / count).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times[5:]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pandallm-overhead-"))
    medians: dict[str, list[float]] = {"pandallm": [], "raw": []}
    for _ in range(options.rounds):
        medians["pandallm"].append(statistics.median(pandallm_steps(work, options.steps)))
        medians["raw"].append(statistics.median(raw_steps(work, options.steps)))
    pandallm_s, raw_s = statistics.median(medians["pandallm"]), statistics.median(medians["raw"])
    result = {
        "model": "llama-mini preset, CPU fp32, batch 8 x <=256 tokens (shipped instruction data, in order)",
        "median_step_s": {"pandallm": pandallm_s, "raw_pytorch": raw_s},
        "overhead_ms_per_step": (pandallm_s - raw_s) * 1000,
        "overhead_ratio": pandallm_s / raw_s - 1,
    }
    print(
        f"median step: pandallm {pandallm_s * 1000:.1f} ms, raw loop {raw_s * 1000:.1f} ms, "
        f"overhead {result['overhead_ms_per_step']:.1f} ms ({result['overhead_ratio']:.1%})"
    )
    print("written:", write_result("overhead", result))


if __name__ == "__main__":
    main()
