"""Gradient accumulation trains on the token mean of the whole accumulated batch (transformers #34191)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from lightning.pytorch import Callback
from torch.utils.data import DataLoader

from pandallm.cli import cli
from pandallm.data.collate import collate_rows
from tests.conftest import TOKENIZER_DIR, metric_column, write_jsonl

# Micro-batches of very different target lengths: a mean of per-micro-batch means would weight them equally.
RECORDS = [
    {"input": "Q", "target": "A short one."},
    {"input": "Q", "target": "Yes."},
    {"input": "Q", "target": "A much longer answer that goes on for quite a few more tokens than the others do."},
    {"input": "Q", "target": "Another long answer, with many words in it, so that this micro-batch is heavy."},
]


def in_file_order(root: Path, batch_size: int, accumulate: int, steps: int = 1, records: int = 1):
    """A tiny run over `records` x RECORDS, in file order, so that every run sees the same rows in the same
    micro-batches whatever its batch size; with a CSV logger under `root`."""
    write_jsonl(root / "it" / "a.jsonl", RECORDS * records)
    run = cli(
        [
            "--trainer.accelerator=cpu",
            f"--trainer.max_steps={steps}",
            f"--trainer.accumulate_grad_batches={accumulate}",
            "--trainer.enable_progress_bar=false",
            f"--trainer.logger.save_dir={root}",
            "--trainer.log_every_n_steps=1",
            "--trainer.enable_checkpointing=false",
            "--export.enabled=false",
            "--model.model_name_or_path=llama-tiny",
            f"--model.tokenizer={TOKENIZER_DIR}",
            "--model.warmup_steps=0",
            "--model.lr_scheduler=constant",
            f"--data.instruction_tuning_data_dir={root / 'it'}",
            "--data.pretraining_data_dir=null",
            f"--data.per_device_train_batch_size={batch_size}",
            "--data.num_workers=0",
            f"--data.cache_dir={root / 'c'}",
        ],
        run=False,
    )
    dm = run.datamodule
    dm.train_dataloader = lambda: DataLoader(
        dm.datasets["train"], batch_size=batch_size, shuffle=False, collate_fn=partial(collate_rows, pad_id=dm.pad_id)
    )
    return run


def gradients_of_one_step(root: Path, batch_size: int, accumulate: int) -> dict[str, torch.Tensor]:
    run = in_file_order(root, batch_size, accumulate)
    gradients: dict[str, torch.Tensor] = {}

    class GradientsOfTheStep(Callback):
        """The gradients the optimizer stepped with, as it stepped (Lightning drops them before `fit` returns)."""

        def on_train_start(self, trainer, pl_module) -> None:
            def keep(optimizer, args, kwargs) -> None:
                gradients.update({name: p.grad.clone() for name, p in pl_module.named_parameters()})

            trainer.optimizers[0].register_step_post_hook(keep)

    run.trainer.callbacks.append(GradientsOfTheStep())
    run.trainer.fit(run.model, run.datamodule)
    return gradients


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to fp32 summation order: the two runs add the same terms in another order, which moves an element
    by about 1e-6 of its tensor's largest (measured); a mean of micro-batch means is off by percents. Gradients are
    compared, not weights after the step: Adam's first step (about lr * g / (|g| + eps)) multiplies a rounding
    difference of a gradient element near zero by lr / eps = 1000."""
    return torch.allclose(a, b, rtol=0, atol=1e-5 * b.abs().max().item())


def test_accumulated_update_equals_the_update_of_the_whole_batch(tmp_path: Path) -> None:
    whole = gradients_of_one_step(tmp_path / "whole", batch_size=4, accumulate=1)
    accumulated = gradients_of_one_step(tmp_path / "acc", batch_size=2, accumulate=2)
    assert [name for name in whole if not close(accumulated[name], whole[name])] == []


def test_the_check_above_would_catch_a_mean_of_micro_batch_means(tmp_path: Path, monkeypatch) -> None:
    from pandallm.model.module import PandaLLM

    whole = gradients_of_one_step(tmp_path / "whole", batch_size=4, accumulate=1)
    monkeypatch.setattr(PandaLLM, "_unit_weighted", property(lambda self: False))
    mean_of_means = gradients_of_one_step(tmp_path / "acc", batch_size=2, accumulate=2)
    assert all(not close(mean_of_means[name], whole[name]) for name in whole)


def test_the_logged_loss_is_the_loss_of_the_whole_accumulated_batch(tmp_path: Path) -> None:
    def logged(name: str, batch_size: int, accumulate: int) -> list[float]:
        run = in_file_order(tmp_path / name, batch_size, accumulate, steps=3, records=3)
        run.trainer.fit(run.model, run.datamodule)
        return metric_column(Path(run.trainer.log_dir), "train/loss")

    whole = logged("whole", batch_size=4, accumulate=1)
    # Three steps on the same rows: the same curve, whatever the split into micro-batches. The last micro-batch's
    # mean (what was logged before) is 4e-3 off at the first step already, where every loss is near ln(3000).
    assert len(whole) == 3
    torch.testing.assert_close(logged("acc", batch_size=2, accumulate=2), whole, rtol=0, atol=1e-5)
