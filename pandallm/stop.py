"""The stop signals of a pandallm process (SIGTERM, SIGUSR1) and what each phase of a run does on one.

Kept free of Lightning and torch: `pandallm.cli.main` installs the handler first thing, before it knows whether the
command needs them (a tool command or `--help` does not).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
from collections.abc import Iterable
from typing import Any

# 128 + SIGTERM, the status a process killed by SIGTERM reports: the run did not finish.
EXIT_CODE_STOPPED = 143
NOTHING_TRAINED = "stopping now; nothing was trained since the run started, so there is nothing to save"
SECOND = "a second signal stops at once, without saving"
AT_THE_NEXT_STEP = f"saving last.ckpt after the current optimizer step, then stopping; {SECOND}"
AFTER_THE_VALIDATION = f"saving last.ckpt after the optimizer step that follows it, then stopping; {SECOND}"
AFTER_THE_EXPORT = f"stopping when the export is complete, with last.ckpt holding the last step; {SECOND}"


class StoppedBySignal(SystemExit):
    """Raised where a stop signal ends the run; exits with `EXIT_CODE_STOPPED`."""

    def __init__(self) -> None:
        super().__init__(EXIT_CODE_STOPPED)


def _say(message: str) -> None:
    # Straight to the file descriptor: the handler runs between two bytecodes of the main thread, which may be in the
    # middle of writing to `sys.stderr` (a second write into a buffered stream from there raises).
    with contextlib.suppress(OSError):  # stderr closed: stopping matters more than saying so
        os.write(2, f"{message}\n".encode())


def rank_zero_by_environment() -> bool:
    """Before the trainer knows the ranks: what srun, torchrun and Lightning's launcher set for the other ranks."""
    return all(os.environ.get(name, "0") == "0" for name in ("SLURM_PROCID", "RANK", "LOCAL_RANK"))


class StopSignals:
    """The stop signals this process received, and its handler for them; one per process, `STOP`.

    `pandallm.cli.main` installs it first thing, so that no phase of a run is left to Python's default (which
    kills without a word) or to Lightning's handler (which raises a `SystemExit` without a code, status 0, at
    its next check, and saves nothing). What a signal does depends on the phase the run is in (`enter`):

    - while there is nothing to save (start-up, data preparation, the sanity check; validate, test, predict), the
      handler raises `StoppedBySignal` where the main thread is, as Ctrl-C raises KeyboardInterrupt;
    - from the start of training on, the handler only records the signal, and `GracefulStop` acts on it where the
      state is consistent: the next optimizer-step boundary, the end of training, the end of the export. Saving
      inside the handler could deadlock (a collective or a lock held by the interrupted code; Lightning #21406).

    A second signal ends the process at once, with the data-loader workers and the ranks it started (a stuck data
    loader never reaches the step boundary the first one waits for), unless the stop checkpoint is being written:
    then the process ends as soon as it is complete.
    """

    def __init__(self) -> None:
        self.signals: tuple[int, ...] = ()
        self.requeue_signals: tuple[int, ...] = ()
        self._previous: dict[int, Any] = {}
        self._reset()

    def _reset(self) -> None:
        self.received: int | None = None
        self.phase = "start-up"
        self.consequence = NOTHING_TRAINED
        self.at_once = True  # False: the handler only records the signal
        self.saving = False  # the stop checkpoint is being written
        self.requeued = False
        self.is_global_zero: bool | None = None  # None until a trainer says
        self.rank_label = ""  # " (rank N)" in messages, once a trainer says there are several
        self.launcher: Any = None  # Lightning's launcher, whose `procs` are the ranks this process started

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "a stop signal"

    def install(self, signals: Iterable[int], requeue_signals: Iterable[int] = ()) -> bool:
        """Handle `signals` from now on (and only those of the ones handled so far). True if nothing was installed
        before, the state is then fresh: the caller restores the previous handlers when it is done."""
        fresh = not self.installed
        if fresh:
            self._reset()
        self.signals, self.requeue_signals = tuple(signals), tuple(requeue_signals)
        for signum in [s for s in self._previous if s not in self.signals]:
            signal.signal(signum, self._previous.pop(signum))
        for signum in self.signals:
            previous = signal.signal(signum, self._handle)
            self._previous.setdefault(signum, previous)
        return fresh

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
        self._reset()

    def enter(self, phase: str, consequence: str = NOTHING_TRAINED, at_once: bool = True) -> None:
        """From now on a stop signal lands in `phase`, and `consequence` says what follows: it stops the run at once,
        or without `at_once`, it is recorded for `GracefulStop` to act on."""
        self.phase, self.consequence, self.at_once = phase, consequence, at_once

    def check(self) -> None:
        """Stop now if a signal asked to while the run could stop at once (the raise in the handler can be lost:
        Python prints and drops an exception raised inside a `__del__` or a callback from C)."""
        if self.received is not None and self.at_once:
            raise StoppedBySignal()

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = signum
            _say(f"pandallm: {name} received during {self.phase}{self.rank_label}: {self.consequence}")
            if self.at_once:
                raise StoppedBySignal()
            return
        if self.saving:
            _say(f"pandallm: {name} received again while the stop checkpoint is written: stopping once it is complete")
            return
        _say(f"pandallm: {name} received again during {self.phase}{self.rank_label}: stopping at once, without saving")
        self._end_now()

    def _end_now(self) -> None:
        for child in multiprocessing.active_children():  # data-loader workers, perhaps the part that is stuck
            child.kill()
        for rank in getattr(self.launcher, "procs", []):
            rank.kill()
        os._exit(EXIT_CODE_STOPPED)

    def stop_launched_ranks(self) -> None:
        """Pass the stop on to the ranks this process started (Lightning's launcher, without srun or torchrun):
        a signal to the main process alone would leave them running, waiting for it in a collective."""
        for rank in getattr(self.launcher, "procs", []):
            if rank.poll() is None:
                rank.send_signal(signal.SIGTERM)

    def requeue_if_asked(self) -> None:
        """Requeue the SLURM job if a requeue signal stopped it and nothing has requeued it yet (before training
        starts, there is nothing to save first)."""
        is_global_zero = self.is_global_zero if self.is_global_zero is not None else rank_zero_by_environment()
        if self.received not in self.requeue_signals or self.requeued or not is_global_zero:
            return
        from pandallm import slurm  # imports Lightning; only a requeue needs it

        if slurm.in_job():
            self.requeued = True
            slurm.requeue(slurm.requeue_id())


STOP = StopSignals()
