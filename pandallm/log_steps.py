"""Whether the loggers write at this step (`trainer.log_every_n_steps`)."""

from __future__ import annotations

import lightning as L


def logs_this_step(trainer: L.Trainer) -> bool:
    """True when the loggers write the metrics of the current training step.

    Each `self.log` costs about a millisecond of Python on the step's critical path, and Lightning keeps only the last
    value of an `on_step` metric between writes, so metrics that are not on the progress bar are logged only on the
    steps that write them. Lightning's own decision is read (it counts optimizer steps, and writes at the end of a run
    too) rather than re-derived from `log_every_n_steps`.
    """
    return trainer._logger_connector.should_update_logs
