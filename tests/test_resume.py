"""Exact resume: a run killed with SIGKILL and resumed equals the uninterrupted run, loss by loss and bit by bit.

Each case trains a tiny model (with dropout, so that RNG state matters) in subprocesses: once uninterrupted, once
killed at a step that is not a checkpoint step, then resumed with `--ckpt_path last`.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import DOCUMENTS, INSTRUCTIONS, REPO, TOKENIZER_DIR, write_jsonl

pytestmark = pytest.mark.integration


def fit(root: Path, name: str, data: dict[str, str], *extra: str, expect_killed: bool = False) -> None:
    args = [
        sys.executable,
        "-m",
        "pandallm",
        "fit",
        "--trainer.accelerator=cpu",
        "--trainer.max_epochs=2",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.num_sanity_val_steps=0",
        f"--trainer.logger.save_dir={root}",
        f"--trainer.logger.name={name}",
        "--trainer.logger.flush_logs_every_n_steps=1",
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        f"--trainer.callbacks.dirpath={root / name / 'checkpoints'}",
        "--trainer.callbacks.every_n_train_steps=2",
        "--trainer.callbacks.save_last=true",
        "--model.model_name_or_path=llama-tiny",
        f"--model.tokenizer={TOKENIZER_DIR}",
        "--model.config_overrides={attention_dropout: 0.1}",
        "--model.warmup_steps=2",
        "--data.max_seq_length=32",
        "--data.per_device_train_batch_size=3",
        f"--data.cache_dir={root / 'cache'}",
        *[f"--data.{key}={value}" for key, value in data.items()],
        *extra,
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, start_new_session=True, timeout=600)
    if expect_killed:
        assert done.returncode == -9, done.stderr[-3000:]
    else:
        assert done.returncode == 0, done.stderr[-3000:]


def losses(root: Path, name: str) -> dict[int, str]:
    """Per-step training loss of every version of run `name` (later versions override earlier ones)."""
    found: dict[int, str] = {}
    for version in sorted((root / name).glob("version_*"), key=lambda p: int(p.name.split("_")[1])):
        with open(version / "metrics.csv") as f:
            found.update({int(r["step"]): r["train/loss"] for r in csv.DictReader(f) if r.get("train/loss")})
    return found


def final_weights(root: Path, name: str) -> dict[str, torch.Tensor]:
    [export] = sorted((root / name).glob("version_*/hf"))
    return load_file(export / "model.safetensors")


def assert_resume_is_exact(root: Path, data: dict[str, str], kill_step: int, *extra: str) -> None:
    fit(root, "straight", data, *extra)
    kill = ["--trainer.callbacks+=tests.helpers.KillAtStep", f"--trainer.callbacks.step={kill_step}"]
    fit(root, "resumed", data, *extra, *kill, expect_killed=True)
    assert not list((root / "resumed").glob("version_*/hf"))  # it really died before the end
    fit(root, "resumed", data, *extra, "--ckpt_path=last")
    straight, resumed = losses(root, "straight"), losses(root, "resumed")
    assert kill_step in resumed and max(straight) > kill_step + 2
    assert resumed == straight  # every step's loss, as logged text: bit-exact floats
    a, b = final_weights(root, "straight"), final_weights(root, "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def instruction_data(root: Path, repeat: int = 6) -> dict[str, str]:
    write_jsonl(root / "it" / "a.jsonl", INSTRUCTIONS * repeat)
    return {"instruction_tuning_data_dir": str(root / "it"), "pretraining_data_dir": "null"}


def pretraining_data(root: Path) -> dict[str, str]:
    write_jsonl(root / "pt" / "a.jsonl", DOCUMENTS * 3)
    return {"instruction_tuning_data_dir": "null", "pretraining_data_dir": str(root / "pt")}


def test_resume_instruction_data_mid_epoch(tmp_path: Path) -> None:
    assert_resume_is_exact(tmp_path, instruction_data(tmp_path), kill_step=5)


def test_resume_pretraining_data_mid_epoch(tmp_path: Path) -> None:
    assert_resume_is_exact(tmp_path, pretraining_data(tmp_path), kill_step=5)


def test_resume_with_gradient_accumulation(tmp_path: Path) -> None:
    # 34 batches per epoch: windows of 3 end in a ragged one, which Lightning steps on at the epoch's end.
    assert_resume_is_exact(tmp_path, instruction_data(tmp_path, 25), 4, "--trainer.accumulate_grad_batches=3")


def test_resume_two_process_ddp(tmp_path: Path) -> None:
    data = {**instruction_data(tmp_path), **{k: v for k, v in pretraining_data(tmp_path).items() if v != "null"}}
    assert_resume_is_exact(tmp_path, data, 3, "--trainer.strategy=ddp", "--trainer.devices=2")
