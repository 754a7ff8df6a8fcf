"""Smoke tests of the benchmark scripts: they run end to end on a tiny model and write their JSON. Speed itself
is never checked here (issue 6): the figures are only printed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.common import CHILD_ENV
from tests.conftest import REPO

pytestmark = pytest.mark.integration


def run_module(module: str, *args: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO, env=CHILD_ENV, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_gpu_benchmark_dry_run(tmp_path: Path) -> None:
    run_module("benchmarks.gpu", "--dry-run", f"--workdir={tmp_path}", f"--results-dir={tmp_path}")
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert result["mfu_1b"]["tokens_per_second"] > 0 and result["mfu_1b"]["mfu"] > 0
    assert {"pandallm", "hf"} <= set(result["lora_7b"])


def test_vs_hf_trainer_tiny(tmp_path: Path) -> None:
    # With gradient accumulation: both the update and the logged loss must be the token mean over each whole
    # accumulated batch for the per-step losses of the two trainers to agree (transformers #34191).
    args = ["--models=llama-tiny", "--steps=3", "--warmup=1", "--rounds=1", "--records=64", "--in-process"]
    run_module("benchmarks.vs_hf_trainer", *args, "--batch=4", "--accumulate=2", f"--results-dir={tmp_path}")
    result = json.loads((tmp_path / "vs_hf_trainer.json").read_text())["models"]["llama-tiny"]
    assert len(result["losses"]["pandallm"]) == len(result["losses"]["hf_trainer"]) == 3
    assert result["loss_parity_max_abs_diff"] < 1e-4  # the external check that pandallm trains right
    assert set(result["tokens_per_second_median"]) == {"pandallm", "hf", "pandallm_packed"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_benchmark_tiny_on_gpu(tmp_path: Path) -> None:
    run_module("benchmarks.gpu", "--tiny", f"--workdir={tmp_path}", f"--results-dir={tmp_path}")
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert {"mfu_1b", "lora_7b", "qlora_7b"} <= set(result)
    assert result["qlora_7b"]["hf"]["peak_memory_mib"] > 0


def test_dpo_vs_trl_tiny(tmp_path: Path) -> None:
    pytest.importorskip("trl", reason="TRL is the other side of this benchmark")
    args = ["--models=llama-tiny", "--steps=3", "--warmup=1", "--rounds=1", "--pairs=32", "--in-process"]
    run_module("benchmarks.dpo_vs_trl", *args, "--batch=4", "--seq=64", f"--results-dir={tmp_path}")
    result = json.loads((tmp_path / "dpo_vs_trl.json").read_text())["models"]["llama-tiny"]
    assert len(result["losses"]["pandallm"]) == len(result["losses"]["trl"]) == 3
    assert set(result["tokens_per_second_median"]) == {"pandallm", "trl"}
