"""On a real SLURM cluster: the sbatch templates in recipes/slurm/ run a sweep as a job array, DDP across two
`srun` tasks, and a preempted array task that requeues itself and ends with the uninterrupted run's weights.

The cluster is the one-node cluster that tests/slurm/start_cluster.sh starts on this machine (.ci/run does); the
tests skip when no cluster answers. Jobs run tiny models on CPU: the templates' GPU settings are overridden on the
sbatch command line, which takes precedence over #SBATCH lines.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import INSTRUCTIONS, REPO, TOKENIZER_DIR, write_jsonl

pytestmark = [pytest.mark.integration, pytest.mark.slurm]

FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL"}
# The templates ask for 8 GPUs and 8 CPUs per task; this node has no GPU and 2 CPUs.
ON_THIS_NODE = ["--gpus-per-node=0", "--cpus-per-task=1", "--time=15", f"--chdir={REPO}"]
TIMEOUT = 600


def slurm_unavailable() -> str | None:
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return "SLURM is not installed; start a one-node cluster with tests/slurm/start_cluster.sh (as root)"
    try:
        states = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"sinfo failed: {e}"
    if states.returncode != 0:
        return f"no SLURM controller answers (sinfo: {states.stderr.strip()}); run tests/slurm/start_cluster.sh"
    if not any(s.strip("*~#") in ("idle", "mixed", "allocated") for s in states.stdout.split()):
        return f"no SLURM node is up (sinfo: {states.stdout.strip()!r})"
    return None


@pytest.fixture(scope="module")
def cluster():
    reason = slurm_unavailable()
    if reason:
        pytest.skip(reason)
    submitted: list[str] = []
    yield submitted
    for job in submitted:  # whatever a failed test left queued or running
        subprocess.run(["scancel", job], capture_output=True)


def submit(cluster: list[str], *args: str) -> str:
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    job = done.stdout.strip().split(";")[0]
    cluster.append(job)
    return job


def jobs(job: str) -> list[dict[str, str]]:
    """`scontrol show job` of `job` (every task of an array), one dict per record."""
    shown = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=60)
    records = []
    for line in shown.stdout.splitlines():
        fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
        if "JobId" in fields:
            records.append(fields)
    return records


def wait_until(condition: Callable[[], bool], what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        if time.monotonic() > deadline:
            tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
            raise AssertionError(f"timed out after {TIMEOUT} s waiting for {what}\n{tail}")
        time.sleep(0.5)


def finished(job: str, tasks: int = 1) -> bool:
    records = jobs(job)
    return len(records) == tasks and all(r["JobState"] in FINISHED for r in records)


def assert_completed(job: str, logs: list[Path]) -> list[dict[str, str]]:
    records = jobs(job)
    failed = [r for r in records if r["JobState"] != "COMPLETED"]
    tails = "\n".join(f"--- {p}\n{p.read_text()[-4000:]}" for p in logs if p.exists())
    assert not failed, f"{[(r['JobId'], r['JobState'], r.get('ExitCode')) for r in failed]}\n{tails}"
    return records


def write_recipe(root: Path, name: str, *, steps: int) -> Path:
    """A tiny CPU recipe: instruction data in `root`, checkpoints every 2 steps and `last.ckpt`."""
    write_jsonl(root / "it" / "a.jsonl", INSTRUCTIONS * 6)
    recipe = root / f"recipe-{name}.yaml"
    recipe.write_text(
        f"""
seed_everything: 42
trainer:
  accelerator: cpu
  max_steps: {steps}
  log_every_n_steps: 1
  enable_progress_bar: false
  num_sanity_val_steps: 0
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args: {{save_dir: {root / "runs"}, name: {name}, flush_logs_every_n_steps: 1}}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: {root / "runs" / name / "checkpoints"}, every_n_train_steps: 2, save_last: true}}
model:
  model_name_or_path: llama-tiny
  tokenizer: {TOKENIZER_DIR}
  config_overrides: {{attention_dropout: 0.1}}
  warmup_steps: 2
data:
  instruction_tuning_data_dir: {root / "it"}
  pretraining_data_dir: null
  max_seq_length: 32
  per_device_train_batch_size: 3
  num_workers: 0
  cache_dir: {root / "cache"}
"""
    )
    return recipe


def final_losses(run_dir: Path) -> dict[int, float]:
    found: dict[int, float] = {}
    for version in sorted(run_dir.glob("version_*"), key=lambda p: int(p.name.split("_")[1])):
        with open(version / "metrics.csv") as f:
            found.update({int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")})
    return found


def exported(run_dir: Path) -> dict[str, torch.Tensor]:
    [export] = sorted(run_dir.glob("version_*/hf/model.safetensors"))
    return load_file(export)


def test_job_array_runs_each_sweep_point_in_its_own_run_directory(cluster, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, "sweep", steps=6)
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        "- {model.learning_rate: 1.0e-3}\n- {model.learning_rate: 3.0e-3}\n- model: {learning_rate: 1.0e-2}\n"
    )
    array = submit(
        cluster,
        *ON_THIS_NODE,
        "--array=0-2",
        "--ntasks-per-node=1",
        f"--output={tmp_path}/%x-%A_%a.out",
        "recipes/slurm/sweep.sbatch",
        str(recipe),
        str(sweep),
    )
    logs = [tmp_path / f"pandallm-sweep-{array}_{task}.out" for task in range(3)]
    wait_until(lambda: finished(array, tasks=3), f"array job {array}", logs[0])
    assert_completed(array, logs)
    run_dirs = sorted((tmp_path / "runs" / "sweep").glob(f"{array}_*"))
    assert [p.name for p in run_dirs] == [f"{array}_{task}" for task in range(3)]
    results = []
    for task, run_dir in enumerate(run_dirs):
        assert "last.ckpt" in {p.name for p in (run_dir / "checkpoints").iterdir()}
        config = (run_dir / "version_0" / "config.yaml").read_text()
        assert f"learning_rate: {[0.001, 0.003, 0.01][task]}" in config
        losses = final_losses(run_dir)
        assert sorted(losses) == list(range(6))
        results.append((losses[5], exported(run_dir)["lm_head.weight"]))
    # Three learning rates, three different trainings (same data, same initial weights).
    assert len({round(loss, 6) for loss, _ in results}) == 3
    assert not torch.equal(results[0][1], results[1][1]) and not torch.equal(results[1][1], results[2][1])
    assert results[2][0] < results[0][0]  # the largest learning rate went furthest in 6 steps


def test_srun_two_tasks_train_with_ddp(cluster, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, "ddp", steps=4)
    job = submit(
        cluster,
        *ON_THIS_NODE,
        "--nodes=1",
        "--ntasks-per-node=2",
        f"--output={tmp_path}/%x-%j.out",
        "recipes/slurm/multinode.sbatch",
        str(recipe),
        "--trainer.strategy=ddp",
    )
    log = tmp_path / f"pandallm-{job}.out"
    wait_until(lambda: finished(job), f"job {job}", log)
    assert_completed(job, [log])
    text = log.read_text()
    # Two processes, started by srun (Lightning launched none itself), formed one gloo group of two.
    assert "MEMBER: 1/2" in text and "MEMBER: 2/2" in text
    assert "is available on your system but is not used" not in text  # Lightning's hint when srun was bypassed
    checkpoint = torch.load(tmp_path / "runs" / "ddp" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["pandallm"]["run"]["world_size"] == 2
    assert checkpoint["global_step"] == 4
    assert exported(tmp_path / "runs" / "ddp")


def test_preempted_array_task_requeues_itself_and_ends_with_the_uninterrupted_weights(cluster, tmp_path) -> None:
    recipe = write_recipe(tmp_path, "preempt", steps=10)
    sweep = tmp_path / "twins.yaml"
    sweep.write_text("- {model.learning_rate: 3.0e-3}\n- {model.learning_rate: 3.0e-3}\n")  # task 1 is preempted
    array = submit(
        cluster,
        *ON_THIS_NODE,
        "--array=0-1",
        "--ntasks-per-node=1",
        f"--output={tmp_path}/%x-%A_%a.out",
        "recipes/slurm/sweep.sbatch",
        str(recipe),
        str(sweep),
        "--trainer.callbacks+=tests.helpers.SlowSteps",
        "--trainer.callbacks.seconds=0.5",
    )
    task = f"{array}_1"
    logs = [tmp_path / f"pandallm-sweep-{array}_{n}.out" for n in range(2)]
    run_dir = tmp_path / "runs" / "preempt" / task
    wait_until(lambda: (run_dir / "checkpoints" / "epoch=0-step=2.ckpt").exists(), f"step 2 of {task}", logs[1])
    # SLURM's time-limit warning, as `#SBATCH --signal=USR1@90` sends it: to the tasks of the job's steps.
    subprocess.run(["scancel", "--signal=USR1", task], check=True, timeout=60)

    def requeued() -> bool:
        [record] = jobs(task)
        return record["JobState"] == "PENDING" and record.get("Restarts") == "1"

    wait_until(requeued, f"{task} to requeue itself", logs[1])
    # SLURM holds a requeued job for about two minutes (BeginTime) and starts it then, as on a real cluster. Releasing
    # it earlier (`scontrol update StartTime=now`) failed about one run in eight on 22.05: the new run was launched
    # while the node still held the stopped run's job, and the task ended FAILED 1:0 without starting.
    wait_until(lambda: finished(array, tasks=2), f"array job {array}", logs[1])
    records = assert_completed(array, logs)
    assert [r.get("Restarts") for r in sorted(records, key=lambda r: r["ArrayTaskId"])] == ["0", "1"]

    text = logs[1].read_text()
    assert "stopping on SIGUSR1" in text and f"requeued SLURM job {task}" in text
    assert "restart 1" in text  # the requeued run saw SLURM_RESTART_COUNT=1 and appended to the same log
    assert not list(tmp_path.rglob("hpc_ckpt_*.ckpt"))  # Lightning's own requeue stayed off
    # The stopped run and the resumed run logged into their own versions of the task's run directory.
    assert sorted(p.name for p in run_dir.glob("version_*")) == ["version_0", "version_1"]
    twin = tmp_path / "runs" / "preempt" / f"{array}_0"
    assert final_losses(run_dir) == final_losses(twin)
    a, b = exported(twin), exported(run_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
