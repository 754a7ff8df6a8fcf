"""Test-only callbacks, loaded into `pandallm fit` subprocesses with `--trainer.callbacks+=tests.helpers.X`."""

from __future__ import annotations

import os
import signal

import lightning as L


class KillAtStep(L.Callback):
    """SIGKILLs the whole process group right after optimizer step `step`, before that step's checkpoint is
    written (Lightning runs ModelCheckpoint after other callbacks): a node dying at an arbitrary point."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.killpg(os.getpgid(0), signal.SIGKILL)


class SignalAtStep(L.Callback):
    """Sends `signum` to this process (all ranks, or only `rank`: each rank signals itself) after optimizer step
    `step`; with `group`, to its whole process group, data-loader workers included, as SLURM signals every process
    of a job step."""

    def __init__(self, step: int, signum: int = int(signal.SIGTERM), rank: int | None = None, group: bool = False):
        self.step, self.signum, self.rank, self.group = step, signum, rank, group

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and self.rank in (None, trainer.global_rank):
            if self.group:
                os.killpg(os.getpgid(0), self.signum)
            else:
                os.kill(os.getpid(), self.signum)


class KillDuringCheckpointWrite(L.Callback):
    """At optimizer step `step`, makes the next checkpoint write stop halfway and SIGKILL the process group:
    a node dying while a checkpoint file is being written."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self.step:
            return
        import pandallm.checkpoint.atomic as atomic

        def write_half_then_die(file, data) -> None:
            file.write(bytes(data[: len(data) // 2]))
            file.flush()
            os.killpg(os.getpgid(0), signal.SIGKILL)

        atomic._write_bytes = write_half_then_die


class NaNForwardAtStep(L.Callback):
    """Makes the model's output NaN for the batch of optimizer step `step` (on `rank` only, if given), once."""

    def __init__(self, step: int, rank: int | None = None) -> None:
        self.step, self.rank = step, rank
        self._hook = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and self.rank in (None, trainer.global_rank) and self._hook is None:
            embeddings = pl_module.model.get_input_embeddings()
            self._hook = embeddings.register_forward_hook(self.poison)

    @staticmethod
    def poison(module, args, output):
        return output * float("nan")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
            self.step = -1


class NaNGradientAtStep(NaNForwardAtStep):
    """Keeps the loss of optimizer step `step` finite but makes its gradients NaN: an overflow in the backward pass,
    which a check of the loss alone misses."""

    @staticmethod
    def poison(module, args, output):
        output.register_hook(lambda grad: grad * float("nan"))


class KillDuringShardedSave(L.Callback):
    """At optimizer step `step`, SIGKILLs the process group when global rank 0 is about to write the metadata of
    a sharded `last.ckpt` (after every rank has written its shard): a node dying in the middle of a sharded save."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self.step or trainer.global_rank != 0:
            return
        import torch

        save = torch.save

        def save_or_die(obj, f, *args, **kwargs):
            if str(f).endswith("meta.pt") and "last.ckpt" in str(f):
                os.killpg(os.getpgid(0), signal.SIGKILL)
            return save(obj, f, *args, **kwargs)

        torch.save = save_or_die


class SlowSteps(L.Callback):
    """Sleeps `seconds` after every training batch: a tiny model trained slowly enough for a test to act on it
    while it runs (send a signal, requeue its job)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        import time

        time.sleep(self.seconds)


class HoldIn(L.Callback):
    """Holds the run in `phase` after writing `marker` (JSON: this process's pid and its child processes'), for a test
    to signal it there from outside: "sanity_check" (its first batch), "export" (inside the Hugging Face export), or
    "training" (before the batch of optimizer step `step`). The hold ends when a stop signal has been received, or
    with `stuck`, never (a data loader that never delivers): at `seconds` at the latest."""

    def __init__(self, phase: str, marker: str, step: int = 1, stuck: bool = False, seconds: float = 300.0) -> None:
        self.phase, self.marker, self.step, self.stuck, self.seconds = phase, marker, step, stuck, seconds

    def _hold(self) -> None:
        import json
        import multiprocessing
        import time

        from pandallm.callbacks.graceful_stop import STOP

        children = [child.pid for child in multiprocessing.active_children()]
        with open(self.marker + ".tmp", "w") as f:
            json.dump({"pid": os.getpid(), "children": children}, f)
        os.replace(self.marker + ".tmp", self.marker)
        deadline = time.monotonic() + self.seconds
        while time.monotonic() < deadline and (self.stuck or STOP.received is None):
            time.sleep(0.05)

    def setup(self, trainer, pl_module, stage) -> None:
        if self.phase == "export":
            export = pl_module.export_hf

            def held_export(*args, **kwargs):
                self._hold()
                return export(*args, **kwargs)

            pl_module.export_hf = held_export

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if self.phase == "sanity_check" and trainer.sanity_checking and batch_idx == 0:
            self._hold()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.phase == "training" and trainer.global_step == self.step:
            self._hold()


class SaveTrainedWeights(L.Callback):
    """Saves the trained parameters (Hugging Face names) as `<dirpath>/step<N>.safetensors` when training starts
    (N = the starting step) and after every optimizer step: what an independent moving average is computed from."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = dirpath

    def _save(self, trainer, pl_module) -> None:
        from pathlib import Path

        from safetensors.torch import save_file

        weights = {
            name.removeprefix("model."): p.detach().clone().contiguous()
            for name, p in pl_module.named_parameters()
            if p.requires_grad
        }
        Path(self.dirpath).mkdir(parents=True, exist_ok=True)
        save_file(weights, f"{self.dirpath}/step{trainer.global_step}.safetensors")

    def on_train_start(self, trainer, pl_module) -> None:
        self._save(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._save(trainer, pl_module)
