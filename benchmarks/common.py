"""Shared pieces of the benchmarks: the machine description, the JSON result file, peak memory, the GGUF
checkpoint exported once, and a synthetic instruction set with Alpaca-like lengths."""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
from functools import partial
from pathlib import Path

import lightning
import numpy as np
import torch
import transformers
from torch.utils.data import DataLoader

from pandallm.data.collate import collate_rows


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
    side of a comparison sees the same batches."""
    datamodule.prepare_data()
    datamodule.setup("fit")
    datamodule.train_dataloader = lambda: DataLoader(
        datamodule.datasets["train"],
        batch_size=batch_size,
        shuffle=False,
        collate_fn=partial(collate_rows, pad_id=datamodule.pad_id),
    )
    return datamodule


REPO = Path(__file__).resolve().parents[1]
# This checkout's pandallm, for the processes that the benchmarks start, whatever else is installed.
CHILD_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


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
