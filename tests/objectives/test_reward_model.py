"""A reward model learns a toy preference, and its export scores pairs in plain transformers as training did."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from pandallm.cli import cli
from pandallm.data.pairs import collate_pairs
from tests.conftest import TOKENIZER_DIR, metric_column, write_jsonl
from tests.objectives.test_preference_training import toy_pairs

pytestmark = pytest.mark.integration


def reward_fit(root: Path, *extra: str):
    write_jsonl(root / "train" / "a.jsonl", toy_pairs(48))
    write_jsonl(root / "val.jsonl", toy_pairs(16, offset=100))
    return cli(
        [
            "fit",
            "--trainer.accelerator=cpu",
            "--trainer.log_every_n_steps=1",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            f"--trainer.default_root_dir={root}",
            f"--trainer.logger.save_dir={root}",
            "--model.model_name_or_path=llama-tiny",
            f"--model.tokenizer={TOKENIZER_DIR}",
            "--model.learning_rate=3e-3",
            "--model.warmup_steps=0",
            "--model.objective=RewardModel",
            f"--data.instruction_tuning_data_dir={root / 'train'}",
            "--data.pretraining_data_dir=null",
            f"--data.val_files=[{root / 'val.jsonl'}]",
            "--data.per_device_train_batch_size=8",
            "--data.num_workers=0",
            f"--data.cache_dir={root / 'cache'}",
            *extra,
        ]
    )


def exported_rewards(run) -> tuple[torch.Tensor, torch.Tensor]:
    """The validation pairs' rewards as the trained module computes them and as the export computes them."""
    rows = run.datamodule.datasets["validation"]
    batch = collate_pairs([rows[i] for i in range(len(rows))], pad_id=run.datamodule.pad_id)
    module = run.model.eval()
    with torch.no_grad():
        trained = module(batch["input_ids"], batch["position_ids"]).squeeze(-1)
        exported = AutoModelForSequenceClassification.from_pretrained(Path(run.trainer.log_dir) / "hf").eval()
        plain = exported(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
    return trained, plain


def test_a_reward_model_learns_a_toy_preference_and_exports_as_a_sequence_classifier(tmp_path: Path) -> None:
    run = reward_fit(tmp_path, "--trainer.max_epochs=3")
    assert metric_column(Path(run.trainer.log_dir), "val/rewards/accuracies")[-1] > 0.9
    trained, plain = exported_rewards(run)
    torch.testing.assert_close(plain, trained, rtol=0, atol=1e-5)
    chosen, rejected = plain.chunk(2)
    assert (chosen > rejected).float().mean() > 0.9


def test_a_lora_reward_model_merges_into_a_plain_sequence_classifier(tmp_path: Path) -> None:
    extra = ["--trainer.max_steps=3", "--model.use_lora=true", "--model.lora_r=4", "--export.adapter_save_type=merge"]
    run = reward_fit(tmp_path, *extra)
    trained, plain = exported_rewards(run)  # the score head was trained whole and merged with the adapters
    torch.testing.assert_close(plain, trained, rtol=0, atol=1e-5)
