"""A run resumed for longer than it was first planned follows a schedule over its new length, and says so."""

from __future__ import annotations

from pathlib import Path

import pytest

from pandallm.cli import cli
from pandallm.optim.schedules import Schedule
from tests.conftest import metric_column
from tests.test_failures import args

pytestmark = pytest.mark.integration


def test_a_finished_run_resumed_with_more_epochs_trains_on_a_stretched_schedule(tmp_path: Path, caplog) -> None:
    # 16 records in batches of 4: 4 steps an epoch. Two epochs of cosine decay end at learning rate 0.
    common = ["--trainer.max_steps=-1", "--model.lr_scheduler=cosine", "--model.warmup_steps=0"]
    first = cli(args(tmp_path, *common, "--trainer.max_epochs=2"), run=False)
    first.trainer.fit(first.model, first.datamodule)
    first.trainer.save_checkpoint(tmp_path / "done.ckpt")
    assert first.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)

    more = cli(args(tmp_path, *common, "--trainer.max_epochs=3"), run=False)
    more.trainer.fit(more.model, more.datamodule, ckpt_path=tmp_path / "done.ckpt")
    assert any("the schedule's length, 8 -> 12 optimizer steps" in r.getMessage() for r in caplog.records)
    # Steps 8 to 11 follow the cosine over 12 steps, from where it stands at step 8 (not from 0, not restarted).
    expected = [1e-3 * Schedule("cosine", 12)(step) for step in range(8, 12)]
    [version] = sorted((tmp_path / "r").glob("version_*"))[-1:]
    assert metric_column(version, "train/lr")[-4:] == pytest.approx(expected, rel=1e-6)
    assert min(expected) > 0
