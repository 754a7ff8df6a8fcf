"""Two processes on gloo, DDP and FSDP2, against one process on the same global batches; FSDP2's sharded
checkpoints: an atomic save, an exact resume, and an export to one Hugging Face model.

Comparing like with like: with `data.shuffle: false`, step k of W ranks with batch B reads rows [kWB, (k+1)WB),
the rows of step k of one process with batch WB (pandallm.data.sharding). The data are pretraining blocks, all of
the same length, so every rank holds the same number of target tokens and the mean of the ranks' losses is the
loss of the global batch. The only differences left are float32 reduction orders.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from pandallm.checkpoint.sharded import is_sharded_checkpoint, read_metadata
from pandallm.tools.export import export
from tests.test_resume import final_weights, fit, losses, pretraining_data

pytestmark = pytest.mark.integration

SAME_BATCHES = [
    "--trainer.max_steps=6",  # 24 of the 30 blocks: the short last block of the corpus stays out
    "--data.shuffle=false",
    "--model.config_overrides={attention_dropout: 0.0}",  # no per-rank dropout masks
]
FSDP2 = [
    "--trainer.strategy=lightning.pytorch.strategies.ModelParallelStrategy",
    "--trainer.strategy.data_parallel_size=2",
    "--trainer.strategy.tensor_parallel_size=1",
    "--trainer.devices=2",
]
TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}  # float32, another reduction order


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("parallel")
    data = pretraining_data(root)
    fit(root, "single", data, *SAME_BATCHES, "--data.per_device_train_batch_size=4")
    return root, data


def assert_same_training(root: Path, name: str, reference: Path, tolerance: dict = TOLERANCE) -> None:
    """Run `name` logged the losses and exported the weights of the run "single" under `reference`, to `tolerance`."""
    ours, theirs = losses(root, name), losses(reference, "single")
    assert sorted(ours) == sorted(theirs) == list(range(6))
    torch.testing.assert_close(
        torch.tensor([float(ours[k]) for k in sorted(ours)]),
        torch.tensor([float(theirs[k]) for k in sorted(theirs)]),
        **tolerance,
    )
    a, b = final_weights(root, name), final_weights(reference, "single")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], **tolerance)


def test_two_process_ddp_matches_one_process(one_process, tmp_path: Path) -> None:
    reference, data = one_process
    ddp = ["--trainer.strategy=ddp", "--trainer.devices=2", "--data.per_device_train_batch_size=2"]
    fit(tmp_path, "ddp", data, *SAME_BATCHES, *ddp)
    assert_same_training(tmp_path, "ddp", reference)


@pytest.mark.slow  # 30 s on two cores: a third two-process run in this file
def test_torchrun_launches_two_ranks_that_match_one_process(one_process, tmp_path: Path) -> None:
    """Chinese-LLaMA-Alpaca's multi-node recipe, on one node: torchrun starts the ranks and Lightning takes them from
    its environment (TorchElasticEnvironment), as it takes them from SLURM's."""
    reference, data = one_process
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--node_rank=0", "--nproc_per_node=2")
    launcher = (*torchrun, "--master_addr=127.0.0.1", f"--master_port={port}", "-m")
    ddp = ["--trainer.strategy=ddp", "--trainer.devices=2", "--data.per_device_train_batch_size=2"]
    done = fit(tmp_path, "torchrun", data, *SAME_BATCHES, *ddp, launcher=launcher)
    assert "GLOBAL_RANK: 1" in done.stderr + done.stdout  # two ranks
    assert_same_training(tmp_path, "torchrun", reference)


def test_two_process_fsdp2_matches_one_process_and_its_sharded_checkpoints_resume_and_export(
    one_process, tmp_path: Path
) -> None:
    reference, data = one_process
    fsdp2 = [*SAME_BATCHES, *FSDP2, "--data.per_device_train_batch_size=2"]
    fit(tmp_path, "fsdp2", data, *fsdp2)
    assert_same_training(tmp_path, "fsdp2", reference)  # gathered from the shards into one export at the end

    # The checkpoints are directories of shards; `pandallm export` makes the same model out of one, in one process.
    last = tmp_path / "fsdp2" / "checkpoints" / "last.ckpt"
    assert is_sharded_checkpoint(last) and len(list(last.glob("*.distcp"))) == 2
    export([f"--ckpt_path={last}", f"--output={tmp_path / 'exported'}"])
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exported").state_dict()
    at_fit_end = final_weights(tmp_path, "fsdp2")
    assert all(torch.equal(exported[k], at_fit_end[k]) for k in at_fit_end)

    # Killed while a sharded last.ckpt is being written: the previous one (step 2) is still whole, and resuming
    # from it ends exactly where the uninterrupted run ended.
    killer = ["--trainer.callbacks+=tests.helpers.KillDuringShardedSave", "--trainer.callbacks.step=4"]
    fit(tmp_path, "resumed", data, *fsdp2, *killer, expect_code=-9)
    assert read_metadata(tmp_path / "resumed" / "checkpoints" / "last.ckpt")["global_step"] == 2
    fit(tmp_path, "resumed", data, *fsdp2, "--ckpt_path=last")
    assert losses(tmp_path, "resumed") == losses(tmp_path, "fsdp2")
    a, b = final_weights(tmp_path, "fsdp2"), final_weights(tmp_path, "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
