"""LoRA on a real pretrained checkpoint: SmolLM2-135M-Instruct, loaded from its GGUF file, learns the sample data."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest

from pandallm.cli import cli
from tests.conftest import REPO

pytestmark = pytest.mark.integration


def test_lora_on_smollm2_lowers_the_validation_loss(smollm2_gguf: Path, tmp_path: Path) -> None:
    # Kept small (a LoRA step on 4 x 48 tokens takes about two seconds on two cores): the English records,
    # 5 steps, 12 validation records.
    (tmp_path / "it").mkdir()
    shutil.copy(REPO / "dataset" / "instruction_tuning" / "alpaca_style_en.jsonl", tmp_path / "it")
    validation = (REPO / "dataset" / "validation" / "instruction_val.jsonl").read_text().splitlines()[:12]
    (tmp_path / "val.jsonl").write_text("\n".join(validation) + "\n")
    args = [
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.accelerator=cpu",
        "--trainer.max_steps=5",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_checkpointing=false",
        f"--trainer.logger.save_dir={tmp_path}",
        f"--model.model_name_or_path={smollm2_gguf}",  # the tokenizer comes from the GGUF file too
        "--model.use_lora=true",
        "--model.lora_r=16",
        "--model.lora_alpha=32",
        "--model.lora_dropout=0.0",
        "--model.learning_rate=2e-3",
        "--model.lr_scheduler=constant",
        f"--data.instruction_tuning_data_dir={tmp_path / 'it'}",
        "--data.pretraining_data_dir=null",
        f"--data.val_files=[{tmp_path / 'val.jsonl'}]",
        "--data.max_seq_length=48",
        "--data.per_device_train_batch_size=4",
        "--data.per_device_eval_batch_size=12",
        "--data.num_workers=0",
        f"--data.cache_dir={tmp_path / 'cache'}",
        "--export.enabled=false",
    ]
    built = cli(args, run=False)
    module, trainer = built.model, built.trainer
    module.configure_model()
    assert module.config.num_hidden_layers == 30 and len(module.tokenizer) == 49152  # the real checkpoint
    before = trainer.validate(module, built.datamodule)[0]["val/loss"]
    trainer.fit(module, built.datamodule)
    after = trainer.validate(module, built.datamodule)[0]["val/loss"]
    assert before < 0.4 * math.log(49152)  # pretrained: far below a uniform guess (10.8); measured 3.24
    assert after < before - 0.2  # measured: 3.24 -> 2.69
