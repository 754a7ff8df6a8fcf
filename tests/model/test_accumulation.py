"""Gradient accumulation trains on the token mean of the whole accumulated batch (transformers #34191)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from pandallm.cli import cli
from pandallm.data.collate import collate_rows
from tests.conftest import TOKENIZER_DIR, write_jsonl

# Micro-batches of very different target lengths: a mean of per-micro-batch means would weight them equally.
RECORDS = [
    {"input": "Q", "target": "A short one."},
    {"input": "Q", "target": "Yes."},
    {"input": "Q", "target": "A much longer answer that goes on for quite a few more tokens than the others do."},
    {"input": "Q", "target": "Another long answer, with many words in it, so that this micro-batch is heavy."},
]


def weights_after_one_step(root: Path, batch_size: int, accumulate: int) -> dict[str, torch.Tensor]:
    write_jsonl(root / "it" / "a.jsonl", RECORDS)
    run = cli(
        [
            "--trainer.accelerator=cpu",
            "--trainer.max_steps=1",
            f"--trainer.accumulate_grad_batches={accumulate}",
            "--trainer.enable_progress_bar=false",
            "--trainer.logger=false",
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
    # In file order, so that both runs see the same rows in the same micro-batches.
    dm.train_dataloader = lambda: DataLoader(
        dm.datasets["train"], batch_size=batch_size, shuffle=False, collate_fn=partial(collate_rows, pad_id=dm.pad_id)
    )
    run.trainer.fit(run.model, dm)
    return {k: v.clone() for k, v in run.model.state_dict().items()}


def test_accumulated_update_equals_the_update_of_the_whole_batch(tmp_path: Path) -> None:
    whole = weights_after_one_step(tmp_path / "whole", batch_size=4, accumulate=1)
    accumulated = weights_after_one_step(tmp_path / "acc", batch_size=2, accumulate=2)
    for name in whole:
        torch.testing.assert_close(accumulated[name], whole[name], atol=2e-6, rtol=1e-5)


def test_the_check_above_would_catch_a_mean_of_micro_batch_means(tmp_path: Path, monkeypatch) -> None:
    from pandallm.model.module import PandaLLM

    whole = weights_after_one_step(tmp_path / "whole", batch_size=4, accumulate=1)
    monkeypatch.setattr(PandaLLM, "_token_weighted", property(lambda self: False))
    mean_of_means = weights_after_one_step(tmp_path / "acc", batch_size=2, accumulate=2)
    assert any(not torch.allclose(mean_of_means[n], whole[n], atol=2e-6, rtol=1e-5) for n in whole)
