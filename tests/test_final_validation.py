"""A run that `trainer.max_steps` ends inside an epoch validates its last step (`FinalValidation`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pandallm.cli import cli
from tests.conftest import metric_column, tiny_fit_args

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("max_steps", [3, 4])  # 4 batches per epoch: mid-epoch, and at the epoch's end
def test_the_last_step_is_validated_once(tmp_path: Path, max_steps: int) -> None:
    run = cli(["fit", *tiny_fit_args(tmp_path), f"--trainer.max_steps={max_steps}", "--export.enabled=false"])
    run_dir = Path(run.trainer.log_dir)
    assert len(metric_column(run_dir, "val/loss")) == 1
    assert run.trainer.global_step == max_steps
    assert "val/loss" in run.trainer.callback_metrics
