"""The SLURM job's identity, the requeue command, and GracefulStop requeueing a job on SLURM's warning signal.

These run without a cluster: a fake `scontrol` on PATH records what it is asked. tests/slurm/ runs the same on a
real cluster.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning as L
import pytest
from lightning.fabric.plugins.environments import SLURMEnvironment

from pandallm import slurm
from pandallm.callbacks.graceful_stop import EXIT_CODE_STOPPED
from pandallm.cli import cli
from tests.conftest import INSTRUCTIONS, TOKENIZER_DIR, write_jsonl

ARRAY_TASK = {"SLURM_JOB_ID": "108", "SLURM_ARRAY_JOB_ID": "100", "SLURM_ARRAY_TASK_ID": "2"}
# What `srun` sets for a job of one task, so that Lightning picks its SLURMEnvironment.
ONE_TASK = {"SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_JOB_NAME": "t"}


def test_requeue_id_is_the_array_task_or_the_job() -> None:
    assert slurm.requeue_id(ARRAY_TASK) == "100_2"
    assert slurm.requeue_id({"SLURM_JOB_ID": "7"}) == "7"
    assert slurm.requeue_id({}) is None
    assert slurm.restart_count({"SLURM_RESTART_COUNT": "1"}) == 1 and slurm.restart_count({}) == 0


@pytest.fixture
def fake_scontrol(tmp_path: Path, monkeypatch) -> Path:
    """An `scontrol` that appends its arguments to a file and succeeds."""
    calls = tmp_path / "scontrol-calls"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return calls


def test_requeue_runs_scontrol_and_refuses_what_is_not_a_job_id(fake_scontrol: Path) -> None:
    assert slurm.requeue("100_2")
    assert fake_scontrol.read_text() == "requeue 100_2\n"
    with pytest.raises(ValueError, match="not a SLURM job id"):
        slurm.requeue("100; rm -rf /")


def test_lightning_requeue_is_switched_off(monkeypatch) -> None:
    for key, value in {**ONE_TASK, "SLURM_JOB_ID": "7"}.items():
        monkeypatch.setenv(key, value)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False)
    environment = trainer._accelerator_connector.cluster_environment
    assert isinstance(environment, SLURMEnvironment) and environment.auto_requeue
    slurm.disable_lightning_requeue(trainer)
    assert not environment.auto_requeue


def fit_until_signal(tmp_path: Path, signum: int) -> int:
    write_jsonl(tmp_path / "it" / "a.jsonl", INSTRUCTIONS * 3)
    with pytest.raises(SystemExit) as exit_:
        cli(
            [
                "fit",
                "--trainer.accelerator=cpu",
                "--trainer.max_steps=6",
                "--trainer.enable_progress_bar=false",
                f"--trainer.default_root_dir={tmp_path}",
                f"--trainer.logger.save_dir={tmp_path}",
                "--trainer.callbacks+=tests.helpers.SignalAtStep",
                "--trainer.callbacks.step=2",
                f"--trainer.callbacks.signum={signum}",
                "--model.model_name_or_path=llama-tiny",
                f"--model.tokenizer={TOKENIZER_DIR}",
                f"--data.instruction_tuning_data_dir={tmp_path / 'it'}",
                "--data.pretraining_data_dir=null",
                "--data.max_seq_length=32",
                "--data.num_workers=0",
                f"--data.cache_dir={tmp_path / 'cache'}",
            ]
        )
    return exit_.value.code


@pytest.mark.integration
def test_warning_signal_saves_then_requeues_the_array_task(tmp_path, fake_scontrol, monkeypatch) -> None:
    for key, value in {**ONE_TASK, **ARRAY_TASK}.items():
        monkeypatch.setenv(key, value)
    assert fit_until_signal(tmp_path, int(signal.SIGUSR1)) == EXIT_CODE_STOPPED
    assert fake_scontrol.read_text() == "requeue 100_2\n"  # once, by the one rank, with the array task's id
    assert [p.name for p in tmp_path.rglob("last.ckpt")] == ["last.ckpt"]
    assert not list(tmp_path.rglob("hpc_ckpt_*"))  # Lightning's own requeue did not run


@pytest.mark.integration
def test_sigterm_stops_without_requeueing(tmp_path, fake_scontrol, monkeypatch) -> None:
    # scancel, or SLURM preempting a job it requeues by itself: stop, do not requeue.
    for key, value in {**ONE_TASK, **ARRAY_TASK}.items():
        monkeypatch.setenv(key, value)
    assert fit_until_signal(tmp_path, int(signal.SIGTERM)) == EXIT_CODE_STOPPED
    assert not fake_scontrol.exists()
    assert [p.name for p in tmp_path.rglob("last.ckpt")] == ["last.ckpt"]
