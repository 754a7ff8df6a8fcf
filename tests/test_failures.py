"""Runs that go wrong: non-finite steps, resuming with other settings or another model, unsafe checkpoints,
directories that cannot be written, a full disk."""

from __future__ import annotations

import errno
import importlib.util
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets.arrow_writer import ArrowWriter

import pandallm.checkpoint.atomic as atomic
from pandallm.checkpoint.atomic import AtomicCheckpointIO
from pandallm.cli import cli
from pandallm.data import PandaDataModule
from pandallm.errors import ConfigError, ModelError, StorageError
from pandallm.tools.export import export
from tests.conftest import DOCUMENTS, INSTRUCTIONS, REPO, TOKENIZER_DIR, metric_column, write_jsonl
from tests.helpers import NaNForwardAtStep, NaNGradientAtStep

pytestmark = pytest.mark.integration


def args(root: Path, *extra: str) -> list[str]:
    write_jsonl(root / "it" / "a.jsonl", INSTRUCTIONS * 4)
    return [
        "--trainer.accelerator=cpu",
        "--trainer.max_steps=6",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false",
        f"--trainer.logger.save_dir={root}",
        "--trainer.logger.name=r",
        f"--trainer.default_root_dir={root}",
        "--export.enabled=false",
        "--model.model_name_or_path=llama-tiny",
        f"--model.tokenizer={TOKENIZER_DIR}",
        f"--data.instruction_tuning_data_dir={root / 'it'}",
        "--data.pretraining_data_dir=null",
        "--data.max_seq_length=32",
        "--data.per_device_train_batch_size=4",
        "--data.num_workers=0",
        f"--data.cache_dir={root / 'cache'}",
        *extra,
    ]


class SnapshotWeights(NaNForwardAtStep):
    """Records the weights before and after the poisoned step."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            self.before = {k: v.clone() for k, v in pl_module.state_dict().items()}
            self.optimizer_before = {k: v.clone() for k, v in trainer.optimizers[0].state_dict()["state"][0].items()}
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._hook is not None:
            self.after = {k: v.clone() for k, v in pl_module.state_dict().items()}
            self.optimizer_after = {k: v.clone() for k, v in trainer.optimizers[0].state_dict()["state"][0].items()}
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


def test_nonfinite_loss_stops_with_the_step_named(tmp_path: Path) -> None:
    run = cli(args(tmp_path), run=False)
    run.trainer.callbacks.append(NaNForwardAtStep(step=3))
    with pytest.raises(FloatingPointError, match=r"step 3: gradient norm nan \(loss on rank 0: nan\)"):
        run.trainer.fit(run.model, run.datamodule)


def test_nonfinite_gradients_under_a_finite_loss_stop_with_the_step_named(tmp_path: Path) -> None:
    run = cli(args(tmp_path), run=False)
    run.trainer.callbacks.append(NaNGradientAtStep(step=3))
    with pytest.raises(FloatingPointError, match=r"step 3: gradient norm nan \(loss on rank 0: \d+\.\d+\)"):
        run.trainer.fit(run.model, run.datamodule)


def test_nonfinite_step_is_skipped_and_counted(tmp_path: Path) -> None:
    run = cli(args(tmp_path, "--model.nonfinite=skip"), run=False)
    snapshot = SnapshotWeights(step=3)
    run.trainer.callbacks.append(snapshot)
    run.trainer.fit(run.model, run.datamodule)
    assert run.model.skipped_steps == 1 and run.trainer.global_step == 6
    assert all(torch.equal(snapshot.before[k], snapshot.after[k]) for k in snapshot.before)
    assert all(
        torch.equal(snapshot.optimizer_before[k], snapshot.optimizer_after[k]) for k in snapshot.optimizer_before
    )
    assert all(torch.isfinite(v).all() for v in run.model.state_dict().values())


def test_nonfinite_on_one_ddp_rank_stops_both_without_a_hang(tmp_path: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "pandallm",
        "fit",
        *args(tmp_path, "--trainer.strategy=ddp", "--trainer.devices=2"),
        "--trainer.callbacks+=tests.helpers.NaNForwardAtStep",
        "--trainer.callbacks.step=2",
        "--trainer.callbacks.rank=1",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, start_new_session=True
    )
    assert done.returncode != 0
    assert "FloatingPointError: step 2: gradient norm nan (loss on rank 1: nan)" in done.stderr
    assert "FloatingPointError: step 2: gradient norm nan (loss on rank 0:" in done.stderr


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    run = cli(args(tmp_path), run=False)
    run.trainer.fit(run.model, run.datamodule)
    path = tmp_path / "done.ckpt"
    run.trainer.save_checkpoint(path)
    return path


def test_resuming_with_other_settings_names_each_difference(tmp_path: Path, checkpoint: Path, caplog) -> None:
    run = cli(
        args(tmp_path, "--trainer.max_steps=8", "--model.learning_rate=5e-4", "--data.per_device_train_batch_size=2"),
        run=False,
    )
    run.trainer.fit(run.model, run.datamodule, ckpt_path=checkpoint)
    warning = next(r.getMessage() for r in caplog.records if "changed settings" in r.getMessage())
    assert "model.learning_rate: 0.001 -> 0.0005" in warning
    assert "data.per_device_train_batch_size: 4 -> 2" in warning


def test_changed_optimizer_settings_are_applied_on_resume(tmp_path: Path, checkpoint: Path, caplog) -> None:
    """Given on the command line with an explicit checkpoint file, as users resume: named, and in force."""
    changed = ["--model.learning_rate=5e-4", "--model.lr_scheduler=constant", "--model.weight_decay=0.1"]
    run = cli(["fit", *args(tmp_path, "--trainer.max_steps=8", *changed), f"--ckpt_path={checkpoint}"])
    warning = next(r.getMessage() for r in caplog.records if "changed settings" in r.getMessage())
    assert "model.learning_rate: 0.001 -> 0.0005" in warning
    [optimizer] = run.trainer.optimizers
    assert [g["lr"] for g in optimizer.param_groups] == [5e-4, 5e-4]  # constant: the new peak, at once
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    [version] = sorted((tmp_path / "r").glob("version_*"))[-1:]
    assert metric_column(version, "train/lr")[-2:] == pytest.approx([5e-4, 5e-4])  # logged as float32


def test_resuming_after_max_steps_says_the_rest_of_the_epoch_is_skipped(tmp_path: Path, caplog) -> None:
    run = cli(args(tmp_path, "--trainer.max_steps=2"), run=False)
    run.trainer.fit(run.model, run.datamodule)
    run.trainer.save_checkpoint(tmp_path / "short.ckpt")
    run = cli(args(tmp_path, "--trainer.max_steps=3"), run=False)
    run.trainer.fit(run.model, run.datamodule, ckpt_path=tmp_path / "short.ckpt")
    assert any(
        "stopped at trainer.max_steps after 2 of the 4 batches of epoch 0" in r.getMessage() for r in caplog.records
    )


def test_a_checkpoint_of_another_model_shape_is_refused(tmp_path: Path, checkpoint: Path) -> None:
    run = cli(args(tmp_path, "--model.config_overrides={num_hidden_layers: 3, hidden_size: 32}"), run=False)
    with pytest.raises(
        ValueError,
        match=r"cannot load .*done.ckpt'?:\n  model shape: head_dim: 16 -> 8\n  model shape: hidden_size: 64 -> 32",
    ) as error:
        run.trainer.fit(run.model, run.datamodule, ckpt_path=checkpoint)
    assert "with the changed settings:\n    model.config_overrides:" in str(error.value)


def test_a_checkpoint_from_elsewhere_is_refused(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"weight": torch.zeros(2)}, "epoch": 0, "global_step": 0}, foreign)
    run = cli(args(tmp_path), run=False)
    with pytest.raises(ValueError, match="foreign.ckpt is not a pandallm checkpoint"):
        run.trainer.fit(run.model, run.datamodule, ckpt_path=foreign)


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {EXPLOITED}",))


EXPLOITED = Path("/tmp/pandallm-test-exploited")


def test_checkpoints_load_without_running_pickled_code(tmp_path: Path) -> None:
    EXPLOITED.unlink(missing_ok=True)
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": Exploit()}, evil)
    run = cli(args(tmp_path), run=False)
    with pytest.raises(ModelError, match=r"evil.ckpt: not loadable as weights only.*GLOBAL posix.system"):
        run.trainer.fit(run.model, run.datamodule, ckpt_path=evil)
    with pytest.raises(ModelError, match="evil.ckpt: not loadable as weights only"):
        export([f"--ckpt_path={evil}", f"--output={tmp_path / 'hf'}"])
    evil.write_bytes(pickle.dumps({"state_dict": {}, "payload": Exploit()}))  # a bare pickle, not torch.save's zip
    with pytest.raises(ModelError, match="evil.ckpt: not a torch checkpoint file"):
        export([f"--ckpt_path={evil}", f"--output={tmp_path / 'hf'}"])
    assert not EXPLOITED.exists()


def test_files_that_are_not_checkpoints_are_named(tmp_path: Path) -> None:
    noise = tmp_path / "noise.ckpt"
    noise.write_bytes(bytes(range(256)) * 20)
    (tmp_path / "a_directory").mkdir()
    for path, problem in ((noise, "not a torch checkpoint file"), (tmp_path / "a_directory", "a directory")):
        run = cli(args(tmp_path), run=False)
        with pytest.raises(ModelError, match=f"{path}: {problem}"):
            run.trainer.fit(run.model, run.datamodule, ckpt_path=path)
    with pytest.raises(ModelError, match=f"{noise}: not a torch checkpoint file"):
        export([f"--ckpt_path={noise}", f"--output={tmp_path / 'hf'}"])


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is not None, reason="deepspeed is installed")
def test_exporting_a_deepspeed_checkpoint_without_deepspeed_says_what_to_install(tmp_path: Path) -> None:
    (tmp_path / "last.ckpt" / "checkpoint").mkdir(parents=True)  # DeepSpeed's layout
    with pytest.raises(
        ModelError, match=r"last.ckpt is a DeepSpeed checkpoint directory .* needs the deepspeed package"
    ):
        export([f"--ckpt_path={tmp_path / 'last.ckpt'}", f"--output={tmp_path / 'hf'}"])


def test_export_replaces_an_earlier_export_and_nothing_else(tmp_path: Path, checkpoint: Path) -> None:
    """A run or checkpoint directory given as the export's output is refused, with everything in it kept."""
    (tmp_path / "notes.txt").write_text("mine")
    kept = sorted(p.name for p in tmp_path.iterdir())
    for output in (tmp_path, checkpoint):
        with pytest.raises(ConfigError, match="export to"):
            export([f"--ckpt_path={checkpoint}", f"--output={output}"])
    assert sorted(p.name for p in tmp_path.iterdir()) == kept and checkpoint.is_file()
    out = tmp_path / "hf"
    export([f"--ckpt_path={checkpoint}", f"--output={out}"])
    export([f"--ckpt_path={checkpoint}", f"--output={out}"])  # an earlier export is replaced
    assert (out / "model.safetensors").is_file()
    with pytest.raises(ConfigError, match="the run writes there"):  # at the start of fit, not after training
        run = cli(args(tmp_path, "--export.enabled=true", f"--export.dirpath={tmp_path}"), run=False)
        run.trainer.fit(run.model, run.datamodule)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*kept, "hf"])
    fresh = [f"--trainer.logger.save_dir={tmp_path / 'fresh'}", f"--export.dirpath={tmp_path / 'fresh'}"]
    with pytest.raises(ConfigError, match="the run writes there"):  # empty now, but the run's own directory
        run = cli(args(tmp_path, "--export.enabled=true", *fresh), run=False)
        run.trainer.fit(run.model, run.datamodule)


@pytest.mark.parametrize(
    ("option", "given", "named"),
    [
        (
            "checkpoints",
            ["--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.dirpath={}"],
            "trainer.callbacks (ModelCheckpoint dirpath)",
        ),
        ("logs", ["--trainer.logger.save_dir={}"], "trainer.logger (CSVLogger save_dir/name)"),
        ("export", ["--export.enabled=true", "--export.dirpath={}"], "export.dirpath"),
        ("cache", ["--data.cache_dir={}"], "data.cache_dir"),
    ],
)
def test_a_directory_the_run_cannot_write_is_refused_before_it_starts(
    tmp_path: Path, option: str, given: list[str], named: str
) -> None:
    # Under a regular file: no directory can be created there, whoever runs (chmod does not stop root).
    (tmp_path / "a_file").write_text("")
    directory = tmp_path / "a_file" / option
    # The logger's directory is `save_dir/name`.
    refused = rf"{re.escape(named)} '{directory}(/r)?': cannot be created, '.*a_file' is a file; give a directory"
    with pytest.raises(ConfigError, match=refused):
        cli(args(tmp_path, *[a.format(directory) for a in given]), run=False)  # not after training, at the first save


@pytest.fixture
def read_only_dir(tmp_path: Path):
    """A read-only file system (a tmpfs mounted `ro`), where the machine allows mounting one."""
    directory = tmp_path / "read-only"
    directory.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(directory)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {mounted.stderr.decode().strip()}")
    yield directory
    subprocess.run(["umount", str(directory)], check=True)


def test_a_checkpoint_directory_on_a_read_only_file_system_is_refused_before_the_run_starts(
    tmp_path: Path, read_only_dir: Path
) -> None:
    checkpoints = ["--trainer.callbacks+=ModelCheckpoint", f"--trainer.callbacks.dirpath={read_only_dir / 'ckpt'}"]
    with pytest.raises(ConfigError, match=f"dirpath.* '{read_only_dir / 'ckpt'}': cannot be written .*Read-only"):
        cli(args(tmp_path, *checkpoints), run=False)


def test_a_full_disk_names_the_checkpoint_and_its_size_and_keeps_the_previous_one(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 1}, path)

    def disk_fills(file, data) -> None:
        file.write(bytes(data[:100]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(atomic, "_write_bytes", disk_fills)
    with pytest.raises(
        StorageError, match=rf"checkpoint '{path}': no space left on the device \(\d+\.\d KiB to write, "
    ):
        AtomicCheckpointIO().save_checkpoint({"global_step": 2, "weights": torch.zeros(1000)}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # the temporary file is gone
    assert torch.load(path, weights_only=True)["global_step"] == 1


def test_a_full_disk_while_caching_the_tokenized_data_names_the_cache_and_keeps_earlier_entries(
    tmp_path: Path, monkeypatch
) -> None:
    write_jsonl(tmp_path / "pt" / "a.jsonl", DOCUMENTS * 3)
    cache = tmp_path / "cache"
    settings = {
        "tokenizer": str(TOKENIZER_DIR),
        "instruction_tuning_data_dir": None,
        "pretraining_data_dir": str(tmp_path / "pt"),
        "num_workers": 0,
        "cache_dir": str(cache),
    }
    earlier = PandaDataModule(**settings, max_seq_length=32)
    earlier.setup("fit")
    [entry] = cache.iterdir()
    write_table = ArrowWriter.write_table

    def disk_fills(writer: ArrowWriter, *args, **kwargs) -> None:
        write_table(writer, *args, **kwargs)
        if writer._path:  # a file, not the in-memory buffer of a `map`
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ArrowWriter, "write_table", disk_fills)
    # `datasets` wraps the OSError in `DatasetGenerationError: An error occurred while generating the dataset`.
    with pytest.raises(StorageError, match=rf"data.cache_dir '{cache}': no space left on the device \(.* free there\)"):
        PandaDataModule(**settings, max_seq_length=48).setup("fit")  # another key: a new entry to write
    assert list(cache.iterdir()) == [entry]  # no half-written entry; the earlier one is kept
    monkeypatch.undo()
    again = PandaDataModule(**settings, max_seq_length=32)
    again.setup("fit")  # and still loads
    assert again.datasets["train"]["input_ids"] == earlier.datasets["train"]["input_ids"]
    assert list(cache.iterdir()) == [entry]
