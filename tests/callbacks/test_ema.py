"""`ema.enabled`: the moving average is what the export holds, equal to the average computed independently from
every step's weights, and a run killed with SIGKILL resumes to a bit-identical average."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pandallm.callbacks.ema import EMA
from pandallm.errors import ConfigError
from tests.test_resume import assert_resume_is_exact, final_weights, fit, instruction_data

pytestmark = pytest.mark.integration

EMA_OPTIONS = ("--ema.enabled=true", "--ema.decay=0.5")


def test_the_export_holds_the_moving_average_of_every_steps_weights(tmp_path: Path) -> None:
    steps = tmp_path / "steps"
    record = ["--trainer.callbacks+=tests.helpers.SaveTrainedWeights", f"--trainer.callbacks.dirpath={steps}"]
    fit(tmp_path, "run", instruction_data(tmp_path), "--trainer.max_epochs=1", *EMA_OPTIONS, *record)
    saved = sorted(steps.glob("step*.safetensors"), key=lambda p: int(p.stem.removeprefix("step")))
    assert len(saved) == 9  # the start, then 8 optimizer steps
    average = {k: v.float() for k, v in load_file(saved[0]).items()}
    for path in saved[1:]:
        for name, weight in load_file(path).items():
            average[name] = 0.5 * average[name] + 0.5 * weight.float()
    exported = final_weights(tmp_path, "run")
    last = load_file(saved[-1])
    assert set(exported) <= set(average)
    assert all(torch.equal(exported[k], average[k]) for k in exported)
    assert not all(torch.equal(exported[k], last[k]) for k in exported)  # the average, not the last weights


@pytest.mark.slow
def test_a_run_with_ema_resumes_bit_identically_after_sigkill(tmp_path: Path) -> None:
    # The final export is the average: equal bit for bit to the uninterrupted run's.
    assert_resume_is_exact(tmp_path, instruction_data(tmp_path), 5, *EMA_OPTIONS)


def test_bad_decay_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"ema.decay must be in \(0, 1\), got 1.0"):
        EMA(enabled=True, decay=1.0)
