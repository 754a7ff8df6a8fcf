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


@pytest.mark.slow  # the dry run of the loss paths below runs the same script and its dry-run machinery by default
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


@pytest.mark.slow  # its two sides (benchmarks.preference_sides) run by default in tests/objectives/test_trl_parity.py
def test_dpo_vs_trl_tiny(tmp_path: Path) -> None:
    pytest.importorskip("trl", reason="TRL is the other side of this benchmark")
    args = ["--models=llama-tiny", "--steps=3", "--warmup=1", "--rounds=1", "--pairs=32", "--in-process"]
    run_module("benchmarks.dpo_vs_trl", *args, "--batch=4", "--seq=64", f"--results-dir={tmp_path}")
    result = json.loads((tmp_path / "dpo_vs_trl.json").read_text())["models"]["llama-tiny"]
    assert len(result["losses"]["pandallm"]) == len(result["losses"]["trl"]) == 3
    assert set(result["tokens_per_second_median"]) == {"pandallm", "trl"}


@pytest.mark.slow  # three processes that each import torch, transformers and Lightning: over a minute on two cores
def test_loss_memory_and_longest_sequence_run_on_a_tiny_vocabulary(tmp_path: Path) -> None:
    args = ["--vocab=512", "--seq=64", "--steps=1", "--rounds=1"]
    run_module("benchmarks.loss_memory", *args, f"--results-dir={tmp_path}")
    result = json.loads((tmp_path / "loss_memory_v512_s64.json").read_text())
    assert result["summary"]["full"]["first_loss"] == pytest.approx(result["summary"]["chunked"]["first_loss"])
    args = ["--vocab=512", "--start=64", "--max-seq=64", "--settings", "chunked_checkpointing"]
    run_module("benchmarks.longest_sequence", *args, f"--results-dir={tmp_path}")
    result = json.loads((tmp_path / "longest_sequence_cpu_8gib.json").read_text())["results"]
    assert result["chunked_checkpointing"]["longest_within_budget"] == 64
    assert result["chunked_checkpointing"]["search_capped_at_max_seq"]


def test_gpu_benchmark_dry_run_of_the_loss_paths(tmp_path: Path) -> None:
    runs = ["--runs", "loss", "memory_7b", "longest_1b"]
    run_module("benchmarks.gpu", "--dry-run", *runs, f"--workdir={tmp_path}", f"--results-dir={tmp_path}")
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert result["loss_1b"]["chunked"]["tokens_per_second"] > 0 and result["loss_1b"]["full"]["mfu"] > 0
    assert "Triton GPU kernels" in result["loss_1b"]["liger_ce"]["skipped"]
    assert result["memory_7b"]["lora_chunked"]["peak_memory_mib"] > 0
    assert "nothing to offload" in result["memory_7b"]["lora_chunked_checkpointing_offload"]["skipped"]
    assert result["longest_1b"]["full_checkpointing"]["longest"] == 256
