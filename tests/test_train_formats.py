"""Training end to end on chat data: the shipped ShareGPT and Alpaca samples under the llama-2 template."""

from __future__ import annotations

from pathlib import Path

import pytest

from pandallm.cli import cli
from tests.conftest import REPO, metric_column, tiny_fit_args

pytestmark = pytest.mark.integration


def test_fit_on_sharegpt_and_alpaca_files_with_a_template(tmp_path: Path) -> None:
    samples = REPO / "dataset" / "formats"
    fit = cli(
        [
            "fit",
            *tiny_fit_args(
                tmp_path,
                f"--data.instruction_tuning_data_dir={samples}",
                f"--data.val_files=[{samples / 'sharegpt_en_zh.jsonl'}]",
                "--data.template=llama-2",
                "--data.max_seq_length=96",
                "--trainer.max_steps=12",
            ),
        ]
    )
    dm = fit.datamodule
    assert len(dm.datasets["train"]) == 14  # 8 conversations + 6 Alpaca records
    alpaca = dm.datasets["train"][0]  # files in name order: alpaca_en_zh.json first, one exchange per record
    assert alpaca["input_ids"][0] == dm.tokenizer.bos_token_id
    assert alpaca["input_ids"].count(dm.tokenizer.bos_token_id) == 1
    losses = metric_column(Path(fit.trainer.log_dir), "train/loss")
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3  # it learns
    assert metric_column(Path(fit.trainer.log_dir), "val/loss")
