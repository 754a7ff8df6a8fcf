"""Exact resume: a run killed with SIGKILL and resumed equals the uninterrupted run, loss by loss and bit by bit.

Each case trains a tiny model (with dropout, so that RNG state matters) in subprocesses: once uninterrupted, once
killed at a step that is not a checkpoint step, then resumed with `--ckpt_path last`.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import DOCUMENTS, INSTRUCTIONS, REPO, TOKENIZER_DIR, write_jsonl

pytestmark = pytest.mark.integration


def fit(
    root: Path, name: str, data: dict[str, str], *extra: str, expect_code: int = 0, launcher: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    """`pandallm fit` in a process of its own, or under `launcher` (a `torchrun ... -m` command line)."""
    args = [
        *(launcher or (sys.executable, "-m")),
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
    process = subprocess.Popen(
        args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        # The whole session: the ranks Lightning started and their data-loader workers, not the first process only.
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"timed out after 600 s:\n{stderr[-3000:]}")
    done = subprocess.CompletedProcess(args, process.returncode, stdout, stderr)
    assert done.returncode == expect_code, done.stderr[-3000:]
    return done


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
    fit(root, "resumed", data, *extra, *kill, expect_code=-9)
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


# Covered in the default run by the signal test's single-process case and the kill during a checkpoint write, which
# resume instruction data mid-epoch just as exactly.
@pytest.mark.slow
def test_resume_instruction_data_mid_epoch(tmp_path: Path) -> None:
    assert_resume_is_exact(tmp_path, instruction_data(tmp_path), kill_step=5)


@pytest.mark.slow  # by default, the reloaded-loaders test below resumes from a checkpoint at an epoch's last batch
def test_resume_from_the_last_batch_of_an_epoch(tmp_path: Path) -> None:
    # 8 batches per epoch: killed after step 9, resumed from the step-8 checkpoint, the epoch's last batch.
    assert_resume_is_exact(tmp_path, instruction_data(tmp_path), kill_step=9)


def test_resume_from_a_checkpoint_saved_by_validation_at_an_epochs_end_with_reloaded_loaders(tmp_path: Path) -> None:
    # Saved once per epoch, at the validation after its last batch; killed in the second epoch; the loaders are
    # built again every epoch. Lightning then creates a training iterator it never uses: the order must not move.
    write_jsonl(tmp_path / "val.jsonl", INSTRUCTIONS)
    data = instruction_data(tmp_path) | {"val_files": f"[{tmp_path / 'val.jsonl'}]"}
    per_epoch = ["--trainer.callbacks.every_n_train_steps=0", "--trainer.callbacks.every_n_epochs=1"]
    # Three epochs: the resumed run creates its validation iterator later than the uninterrupted one did, and the
    # epoch after that validation must not see its dropout masks shifted by it.
    reload = ["--trainer.reload_dataloaders_every_n_epochs=1", "--trainer.max_epochs=3"]
    assert_resume_is_exact(tmp_path, data, 11, *per_epoch, *reload)


@pytest.mark.slow  # packed documents resume in the default run within the mixture test and the DDP signal test
def test_resume_pretraining_data_mid_epoch(tmp_path: Path) -> None:
    assert_resume_is_exact(tmp_path, pretraining_data(tmp_path), kill_step=5)


def test_resume_with_gradient_accumulation(tmp_path: Path) -> None:
    # 14 batches per epoch: windows of 3 end in a ragged one (step 5), which Lightning steps on at the epoch's end;
    # the run resumed from step 2 goes through it.
    assert_resume_is_exact(tmp_path, instruction_data(tmp_path, 10), 4, "--trainer.accumulate_grad_batches=3")


def both_kinds(root: Path) -> dict[str, str]:
    return {**instruction_data(root), **{k: v for k, v in pretraining_data(root).items() if v != "null"}}


@pytest.mark.slow  # DDP resume on both kinds of data is also what the ddp-sigusr1 case below checks, from a signal
def test_resume_two_process_ddp(tmp_path: Path) -> None:
    assert_resume_is_exact(tmp_path, both_kinds(tmp_path), 3, "--trainer.strategy=ddp", "--trainer.devices=2")


@pytest.fixture(scope="module")
def uninterrupted_instruction_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default run on `instruction_data`, uninterrupted ("straight" under the returned root): once for the tests
    that stop the same run in other ways (each worker of `-n` that runs one builds its own)."""
    root = tmp_path_factory.mktemp("uninterrupted")
    fit(root, "straight", instruction_data(root))
    return root


@pytest.mark.parametrize("ddp", [False, True], ids=["single-sigterm", "ddp-sigusr1"])
def test_stop_signal_saves_once_at_a_batch_boundary_and_resumes_exactly(
    tmp_path: Path, ddp: bool, request: pytest.FixtureRequest
) -> None:
    data = both_kinds(tmp_path) if ddp else instruction_data(tmp_path)
    extra = ["--trainer.strategy=ddp", "--trainer.devices=2"] if ddp else []
    if ddp:
        fit(tmp_path, "straight", data, *extra)
        straight = tmp_path
    else:
        straight = request.getfixturevalue("uninterrupted_instruction_run")
    # SIGUSR1 to rank 1 only, under DDP: one save, every rank stops after the same step. SIGTERM to the whole process
    # group otherwise, its two data-loader workers included, as SLURM signals a job step: they must not die of it.
    # (A second signal would stop at once, without saving: tests/test_stop.py.)
    signal_args = [
        "--trainer.callbacks+=tests.helpers.SignalAtStep",
        "--trainer.callbacks.step=3",
        *(
            [f"--trainer.callbacks.signum={int(signal.SIGUSR1)}", "--trainer.callbacks.rank=1"]
            if ddp
            else ["--trainer.callbacks.group=true"]
        ),
    ]
    stopped = fit(tmp_path, "resumed", data, *extra, *signal_args, expect_code=143)
    assert stopped.stderr.count("pandallm: stopping on") == 1
    assert "after step 3" in stopped.stderr
    assert not list((tmp_path / "resumed").glob("version_*/hf"))  # a stopped run does not export as if finished
    fit(tmp_path, "resumed", data, *extra, "--ckpt_path=last")
    assert losses(tmp_path, "resumed") == losses(straight, "straight")
    a, b = final_weights(straight, "straight"), final_weights(tmp_path, "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_kill_while_a_checkpoint_is_written_leaves_the_previous_one_to_resume_from(
    tmp_path: Path, uninterrupted_instruction_run: Path
) -> None:
    data = instruction_data(tmp_path)
    killer = ["--trainer.callbacks+=tests.helpers.KillDuringCheckpointWrite", "--trainer.callbacks.step=4"]
    fit(tmp_path, "resumed", data, *killer, expect_code=-9)
    checkpoints = tmp_path / "resumed" / "checkpoints"
    # The half-written file never got a checkpoint's name; the complete step-2 checkpoints are all there.
    assert sorted(p.name for p in checkpoints.glob("*.ckpt")) == ["epoch=0-step=2.ckpt", "last.ckpt"]
    assert [p.name for p in checkpoints.glob(".*.tmp-*")]
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 2
    fit(tmp_path, "resumed", data, "--ckpt_path=last")
    straight = uninterrupted_instruction_run
    assert losses(tmp_path, "resumed") == losses(straight, "straight")
    a, b = final_weights(straight, "straight"), final_weights(tmp_path, "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_a_mixture_mid_epoch_continues_the_same_mixture(tmp_path: Path) -> None:
    # Two sources weighed 3:1 over 16 rows per epoch: the instructions are upsampled, the documents read in turns.
    instructions = instruction_data(tmp_path, repeat=1)["instruction_tuning_data_dir"]
    data = pretraining_data(tmp_path) | {"instruction_tuning_data_dir": instructions}
    ratios = f"{{{data['instruction_tuning_data_dir']}: 3, {data['pretraining_data_dir']}: 1}}"
    data |= {"mix_ratios": ratios, "epoch_rows": "16"}
    assert_resume_is_exact(tmp_path, data, kill_step=7)  # in the second epoch (6 batches of 3 per epoch)


def test_resume_a_streamed_corpus_with_three_workers(tmp_path: Path) -> None:
    data = pretraining_data(tmp_path) | {"streaming": "true", "num_workers": "3"}  # resumed at step 4: worker 1 next
    assert_resume_is_exact(tmp_path, data, 5, "--trainer.max_steps=12")
