"""Every logger of a run writes under one run directory (`pandallm.run_dir`)."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

from pandallm.run_dir import align_loggers


def test_csv_tensorboard_and_wandb_write_under_the_first_loggers_version(tmp_path: Path) -> None:
    # TensorBoard's own numbering would give version_1 here: runs/tiny/version_0 already holds its events.
    (tmp_path / "tiny" / "version_0").mkdir(parents=True)
    (tmp_path / "tiny" / "version_0" / "events.out.tfevents.1").write_text("")
    csv = CSVLogger(save_dir=tmp_path, name="tiny", version=None)
    (tmp_path / "lightning_logs" / "version_0").mkdir(parents=True)  # the TB config names no run: lightning_logs
    tensorboard = TensorBoardLogger(save_dir=tmp_path)
    wandb = WandbLogger(save_dir=str(tmp_path), offline=True, project="p")
    directory = align_loggers([csv, tensorboard, wandb])
    assert directory == csv.log_dir == tensorboard.log_dir == str(tmp_path / "tiny" / "version_1")
    assert wandb.save_dir == wandb._wandb_init["dir"] == directory
    assert "anonymous" not in wandb._wandb_init  # wandb warns on every run that the setting has no effect


def test_a_single_logger_is_left_as_it_is(tmp_path: Path) -> None:
    csv = CSVLogger(save_dir=tmp_path, name="run", version="mine")
    assert align_loggers([csv]) == str(tmp_path / "run" / "mine")
    assert align_loggers([]) is None
