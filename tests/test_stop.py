"""Stop signals in every phase of `pandallm fit`: never status 0, and on disk what the phase allows.

Each run is a `pandallm fit` subprocess that `tests.helpers.HoldIn` holds in a phase, after writing a marker file;
the test signals it from outside once the marker is there, as a scheduler would.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import pandallm.data.datamodule as datamodule_module
from pandallm.callbacks.graceful_stop import EXIT_CODE_STOPPED
from pandallm.data import PandaDataModule
from pandallm.data.collate import collate_rows
from tests.conftest import INSTRUCTIONS, REPO, TOKENIZER_DIR, tiny_fit_args, write_jsonl

pytestmark = pytest.mark.integration


class Run:
    """A `pandallm fit` subprocess held in `phase` by `HoldIn`; its stderr goes to a file the test can read."""

    def __init__(self, root: Path, phase: str, *extra: str) -> None:
        self.root, self.marker, self.log = root, root / "held.json", root / "stderr.txt"
        hold = [
            "--trainer.callbacks+=tests.helpers.HoldIn",
            f"--trainer.callbacks.phase={phase}",
            f"--trainer.callbacks.marker={self.marker}",
        ]
        fit = tiny_fit_args(root, "--trainer.max_steps=3")
        command = [sys.executable, "-m", "pandallm", "fit", *fit, *hold, *extra]
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        with open(self.log, "w") as stderr:
            self.process = subprocess.Popen(
                command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True
            )

    def stderr(self) -> str:
        return self.log.read_text()

    def wait_for(self, condition: Callable[[], bool], what: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.process.poll() is not None:
                pytest.fail(f"exited with {self.process.returncode} before {what}:\n{self.stderr()[-3000:]}")
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"no {what} after {timeout} s:\n{self.stderr()[-3000:]}")
            time.sleep(0.05)

    def held(self) -> dict:
        self.wait_for(self.marker.is_file, "the marker of the held phase")
        return json.loads(self.marker.read_text())

    def exit_code(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"still running {timeout} s after the signal:\n{self.stderr()[-3000:]}")

    def kill(self) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")  # a zombie nobody has reaped yet is dead


def test_sigterm_during_the_sanity_check_exits_143_with_nothing_saved(tmp_path: Path) -> None:
    run = Run(tmp_path, "sanity_check")
    run.held()
    os.kill(run.process.pid, signal.SIGTERM)
    assert run.exit_code(timeout=120) == EXIT_CODE_STOPPED, run.stderr()[-3000:]
    assert "SIGTERM received during the sanity check: stopping now; nothing was trained" in run.stderr()
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob("hf"))


def test_sigterm_during_the_export_exits_143_with_the_last_step_saved(tmp_path: Path) -> None:
    run = Run(tmp_path, "export")
    run.held()
    os.kill(run.process.pid, signal.SIGTERM)
    assert run.exit_code(timeout=120) == EXIT_CODE_STOPPED, run.stderr()[-3000:]
    assert "SIGTERM received during the end of fit (the export)" in run.stderr()
    [last] = tmp_path.rglob("last.ckpt")  # the checkpoint callback of this run saves no `last.ckpt` of its own
    assert f"stopping on SIGTERM at the end of fit, after the export (step 3); saved {last}" in run.stderr()
    assert torch.load(last, weights_only=True)["global_step"] == 3  # `--ckpt_path last` resumes at the end


def test_a_second_signal_ends_a_run_whose_stop_waits_for_a_step_that_never_comes(tmp_path: Path) -> None:
    # Held before step 1's batch, as by a data loader that never delivers: the first signal waits for a step boundary
    # that does not come; the second ends the process, with its data-loader workers.
    run = Run(tmp_path, "training", "--trainer.callbacks.stuck=true", "--data.num_workers=1")
    workers = run.held()["children"]
    assert workers  # the persistent workers of the training and validation loaders
    os.kill(run.process.pid, signal.SIGTERM)
    run.wait_for(lambda: "SIGTERM received during training" in run.stderr(), "the notice of the first signal")
    os.kill(run.process.pid, signal.SIGTERM)
    assert run.exit_code(timeout=60) == EXIT_CODE_STOPPED, run.stderr()[-3000:]
    assert "SIGTERM received again during training: stopping at once, without saving" in run.stderr()
    assert not list(tmp_path.rglob("*.ckpt"))
    deadline = time.monotonic() + 10  # their parent reaps them, or init does
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in workers if alive(pid)]


HELD = threading.Lock()


def collate_under_the_lock(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    with HELD:
        return collate_rows(rows, pad_id)


def test_loader_workers_do_not_inherit_the_locks_other_threads_of_the_training_process_hold(
    tmp_path: Path, monkeypatch
) -> None:
    """A forked worker starts with every lock as it was in the training process at the fork: one that another thread
    (gloo's, tqdm's, a queue feeder) held then is held forever in the worker, which never delivers a batch."""
    write_jsonl(tmp_path / "it" / "a.jsonl", INSTRUCTIONS * 2)
    monkeypatch.setattr(datamodule_module, "collate_rows", collate_under_the_lock)
    data = PandaDataModule(
        tokenizer=str(TOKENIZER_DIR),
        instruction_tuning_data_dir=str(tmp_path / "it"),
        pretraining_data_dir=None,
        max_seq_length=32,
        per_device_train_batch_size=2,
        num_workers=1,
        cache_dir=str(tmp_path / "cache"),
    )
    data.prepare_data()
    data.setup("fit")
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with HELD:
            holding.set()
            release.wait()

    threading.Thread(target=hold, daemon=True).start()
    holding.wait()
    loader = data.train_dataloader()
    batches: list = []
    fetch = threading.Thread(target=lambda: batches.append(next(iter(loader))), daemon=True)
    try:
        fetch.start()  # the workers start while the lock is held
        fetch.join(timeout=120)
        assert batches, "the data-loader worker delivered no batch"
        assert batches[0]["input_ids"].shape[0] == 2
    finally:
        release.set()
        for child in multiprocessing.active_children():
            child.kill()
