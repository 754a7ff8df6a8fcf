"""Shared pieces of the benchmarks: the machine description, the JSON result file, peak memory, the GGUF
checkpoint exported once, and a synthetic instruction set with Alpaca-like lengths."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Any

import lightning
import numpy as np
import torch
import transformers
from torch.utils.data import DataLoader


def environment() -> dict:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.processor() or platform.platform()}",
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "lightning": lightning.__version__,
            "transformers": transformers.__version__,
        },
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        # Other work on the machine skews wall times: the 1-minute load average when the result is written.
        "load_average_at_end": round(os.getloadavg()[0], 2),
    }


def write_result(name: str, result: dict, directory: str | Path | None = None) -> Path:
    """`result` with the environment, as `<directory>/<name>.json` (default: benchmarks/results)."""
    out = Path(directory or Path(__file__).parent / "results") / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**environment(), **result}, indent=2, ensure_ascii=False) + "\n")
    return out


def prepare_in_order(datamodule, batch_size: int):
    """Set `datamodule` up for fit and make it serve the training rows in file order, unshuffled, so that every
    side of a comparison sees the same batches (its own collate function: rows, or pairs)."""
    datamodule.prepare_data()
    datamodule.setup("fit")
    datamodule.train_dataloader = lambda: DataLoader(
        datamodule.datasets["train"],
        batch_size=batch_size,
        shuffle=False,
        collate_fn=partial(datamodule._collate, pad_id=datamodule.pad_id),
    )
    return datamodule


# Drawn right before peft creates the adapters, on both sides of a comparison: the same LoRA init whatever ran before.
ADAPTER_SEED = 1234


@contextlib.contextmanager
def seeded_adapters():
    """pandallm's adapters created right after `torch.manual_seed(ADAPTER_SEED)`, as the other side seeds its own;
    put back on exit, so that a run in-process leaves the module as it was."""
    import pandallm.model.module as module_file

    apply_lora = module_file.apply_lora

    def seeded(model, settings):
        torch.manual_seed(ADAPTER_SEED)
        return apply_lora(model, settings)

    module_file.apply_lora = seeded
    try:
        yield
    finally:
        module_file.apply_lora = apply_lora


def seeded_peft_model(model, r: int, alpha: float):
    """The other side's LoRA adapters, as pandallm's (`seeded_adapters`): every decoder projection, no dropout."""
    from peft import LoraConfig, get_peft_model

    from pandallm.model.peft import DEFAULT_TARGET_MODULES

    torch.manual_seed(ADAPTER_SEED)
    config = LoraConfig(
        task_type="CAUSAL_LM", r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(DEFAULT_TARGET_MODULES)
    )
    return get_peft_model(model, config)


def tiny_checkpoint(directory: Path):
    """A random `llama-tiny` model with the demo tokenizer, saved in `directory` (seed 0); returns the tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pandallm.model.presets import llama_tiny
    from pandallm.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(REPO / "dataset" / "tokenizer"))
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**llama_tiny(), vocab_size=len(tokenizer))).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return tokenizer


def trainer_args(device: str, steps: int, init: str, learning_rate: float) -> list[str]:
    """The `pandallm fit` options every comparison shares: one device, constant LR without warmup, clipping at 1.0
    (the HF Trainer's default), nothing saved or logged."""
    return [
        f"--trainer.accelerator={'gpu' if device == 'cuda' else 'cpu'}",
        "--trainer.devices=1",
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
        f"--model.learning_rate={learning_rate}",
    ]


REPO = Path(__file__).resolve().parents[1]
# This checkout's pandallm, for the processes that the benchmarks start, whatever else is installed.
CHILD_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def run_side_in_child(module: str, side: str, setup: Any) -> dict:
    """`python -m module side '<setup as JSON>'` in a fresh process (its peak memory is then its own): the report it
    prints last, as a dict."""
    command = [sys.executable, "-m", module, side, json.dumps(dataclasses.asdict(setup))]
    done = subprocess.run(command, cwd=REPO, env=CHILD_ENV, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark side {side} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def rss_mib(field: str = "VmHWM") -> float:
    """VmRSS (now) or VmHWM (high-water mark) of this process, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: the peak, in KiB


def reset_peak_rss() -> None:
    with contextlib.suppress(OSError):  # glibc keeps freed heap (the loader's temporaries) resident: hand it back
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM to the current RSS


def smollm2_gguf() -> Path:
    """The GGUF file the tests fetch (`$PANDALLM_TEST_CACHE`, else ~/.cache/pandallm-test), fetched if absent."""
    from pandallm.tools.smollm2 import fetch_smollm2

    cache = Path(os.environ.get("PANDALLM_TEST_CACHE", Path.home() / ".cache" / "pandallm-test"))
    return fetch_smollm2(str(cache))


def prepare_model(model: str, workdir: Path) -> str:
    """A GGUF file becomes a plain checkpoint once (dequantized), so that every run loads the same weights
    rather than paying the dequantization in its start-up."""
    if not model.endswith(".gguf"):
        return model
    target = workdir / (Path(model).stem + "-hf")
    if not (target / "config.json").is_file():
        command = [sys.executable, "-m", "pandallm", "export", f"--model.model_name_or_path={model}"]
        subprocess.run([*command, f"--output={target}"], check=True, env=CHILD_ENV)
    return str(target)


# Token lengths of Alpaca-like records, as log-normal distributions: (median, sigma of the log). ASSUMED, not
# measured on Alpaca (no length statistics were found in the reference corpora): instruction + input median
# about 25 tokens; output median about 65 with a long tail (sigma 0.9 puts the 99th percentile near 530 tokens).
PROMPT_LENGTHS = (25.0, 0.6)
RESPONSE_LENGTHS = (65.0, 0.9)


def alpaca_like_records(tokenizer, num_records: int, seed: int = 0) -> list[dict]:
    """`num_records` PandaLLM `{input, target}` records whose token lengths (in `tokenizer`'s tokens) follow the
    Alpaca-like distributions above. The text is cut from the shipped English sample data, so that it is real
    text that the tokenizer splits as it would split instructions."""
    sources = [
        REPO / "dataset/pretraining/encyclopedia_en.jsonl",
        REPO / "dataset/instruction_tuning/alpaca_style_en.jsonl",
    ]
    lines = [json.loads(line) for path in sources for line in path.open()]
    text = " ".join(r.get("text") or r.get("content") or f"{r.get('input', '')} {r.get('target', '')}" for r in lines)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    rng = np.random.default_rng(seed)

    def cut(median: float, sigma: float, low: int, high: int) -> str:
        length = int(np.clip(round(rng.lognormal(np.log(median), sigma)), low, min(high, len(ids) - 1)))
        start = int(rng.integers(0, len(ids) - length))
        # Decoding a slice and encoding it again gives back about `length` tokens (a few merge at the edges).
        return tokenizer.decode(ids[start : start + length]).strip()

    return [
        {"input": cut(*PROMPT_LENGTHS, 3, 256), "target": cut(*RESPONSE_LENGTHS, 1, 1024)} for _ in range(num_records)
    ]
