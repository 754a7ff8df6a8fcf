"""What pandallm needs to know about the SLURM job it runs in, and how it requeues that job.

Ranks, world size and the master address come from Lightning's `SLURMEnvironment`, which reads `SLURM_PROCID`,
`SLURM_NTASKS` and `SLURM_NODELIST` when the run is started with `srun`. This module adds the job's identity
(for run directories and for requeueing) and the requeue itself.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from collections.abc import Mapping

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment

log = logging.getLogger(__name__)


def in_job(env: Mapping[str, str] = os.environ) -> bool:
    return bool(env.get("SLURM_JOB_ID"))


def array_task(env: Mapping[str, str] = os.environ) -> tuple[str, int] | None:
    """`(array job id, task id)` when this is a task of a job array, else None."""
    job, task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    return (job, int(task)) if job and task else None


def requeue_id(env: Mapping[str, str] = os.environ) -> str | None:
    """The id `scontrol requeue` takes for this job: `ARRAYJOBID_TASKID` for an array task (its own
    `SLURM_JOB_ID` would do too, but is not what `squeue` shows), else `SLURM_JOB_ID`; None outside SLURM."""
    task = array_task(env)
    if task is not None:
        return f"{task[0]}_{task[1]}"
    return env.get("SLURM_JOB_ID") or None


def restart_count(env: Mapping[str, str] = os.environ) -> int:
    """How many times SLURM has requeued this job (`SLURM_RESTART_COUNT`; 0 on the first run)."""
    return int(env.get("SLURM_RESTART_COUNT") or 0)


def requeue(job_id: str) -> bool:
    """`scontrol requeue JOB_ID`: SLURM ends the running job and queues it again. True if SLURM accepted it."""
    if not re.fullmatch(r"[0-9]+(_[0-9]+)?", job_id):
        raise ValueError(f"not a SLURM job id: {job_id!r}")
    try:
        done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("pandallm: could not requeue SLURM job %s: %s", job_id, e)
        return False
    if done.returncode != 0:
        # E.g. a job submitted with --no-requeue, or a cluster with JobRequeue=0.
        log.warning("pandallm: `scontrol requeue %s` failed: %s", job_id, (done.stderr or done.stdout).strip())
        return False
    log.warning("pandallm: requeued SLURM job %s; it resumes from its last checkpoint", job_id)
    return True


def disable_lightning_requeue(trainer: L.Trainer) -> None:
    """Turn off Lightning's own SLURM auto-requeue, which pandallm's `GracefulStop` replaces.

    Lightning's handler saves an `hpc_ckpt_N.ckpt` inside the signal handler, which can deadlock in a collective
    (Lightning #21406), and resumes from it only with `ckpt_path="hpc"`, which fails on a first run (#20347).
    The environment lives on the accelerator connector (single-device runs have no `strategy.cluster_environment`);
    it must be switched off before `fit` registers its signal handlers, i.e. in a `setup` hook at the latest.
    """
    environment = getattr(trainer._accelerator_connector, "cluster_environment", None)
    if isinstance(environment, SLURMEnvironment):
        environment.auto_requeue = False
