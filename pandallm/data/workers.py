"""How data-loader worker processes start: forked by a fork server, never forked from the training process.

By the time a loader starts its workers, the training process runs threads: gloo's under DDP, tqdm's monitor, the
other loaders' queue feeders. `os.fork()` copies the calling thread and every lock as it was; a child that inherits
a lock another thread held deadlocks before it runs a line of the worker (seen under DDP with `num_workers: 2`:
`PyOS_AfterFork_Child -> _PyEval_ReInitThreads -> PyThread_acquire_lock`). The fork server is a fresh interpreter
(fork + exec), single-threaded, that forks the workers. It imports what the workers need once, so that a worker
starts as a fork of an interpreter that has it instead of importing it itself (`spawn`: several seconds more per
worker on two cores). Workers then receive their dataset and collate function pickled; the loaders keep them
(persistent).

Workers ignore the stop signals. SLURM signals every process of a job step, workers included, and SIGUSR1 (its
warning) or SIGTERM would kill them, failing the run in the loader instead of letting the training process save and
stop (`pandallm.callbacks.graceful_stop`). They end with the training process: it shuts them down, kills them when it
stops at once, and a worker whose parent is gone exits by itself (PyTorch's watchdog).
"""

from __future__ import annotations

import multiprocessing
import signal
from multiprocessing.context import BaseContext

# What a worker needs to unpickle its dataset (Arrow tables, or a `DocumentStream`, which tokenizes) and its
# collate and init functions; not the data module, which imports Lightning.
PRELOAD = ["datasets", "pandallm.data.collate", "pandallm.data.streaming", "pandallm.data.workers"]


def worker_context() -> BaseContext:
    context = multiprocessing.get_context("forkserver")
    # Read when the fork server starts, at the first worker of the process; a server already running keeps its own.
    context.set_forkserver_preload(PRELOAD)
    return context


def ignore_stop_signals(worker_id: int) -> None:
    """The loaders' `worker_init_fn`."""
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)
