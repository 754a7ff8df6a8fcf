"""Checkpoints of LoRA runs hold the adapters and their optimizer state, not the base, and resume exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pandallm.cli import cli
from pandallm.errors import ModelError
from pandallm.model import PandaLLM
from pandallm.model.trainable_state import check_restorable
from tests.conftest import TOKENIZER_DIR, metric_column, tiny_fit_args

pytestmark = pytest.mark.integration

LORA = ["--model.use_lora=true", "--model.lora_r=4", "--model.lora_dropout=0.0", "--export.enabled=false"]


def checkpoint_of(run_dir: Path) -> Path:
    [checkpoint] = (run_dir / "checkpoints").glob("*.ckpt")
    return checkpoint


def adapters(module: PandaLLM) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}


def test_a_lora_run_resumed_mid_epoch_matches_the_uninterrupted_run(tmp_path) -> None:
    every_other_step = [
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        "--trainer.callbacks.save_top_k=-1",
        "--trainer.callbacks.every_n_train_steps=2",
        "--trainer.callbacks.filename={step}",
    ]
    whole = cli(["fit", *tiny_fit_args(tmp_path / "whole", *LORA, *every_other_step, "--trainer.max_epochs=3")])
    checkpoint = Path(whole.trainer.log_dir) / "checkpoints" / "step=2.ckpt"  # mid-way through the first epoch
    resumed = cli(
        ["fit", *tiny_fit_args(tmp_path / "resumed", *LORA, "--trainer.max_epochs=3", f"--ckpt_path={checkpoint}")]
    )
    losses = metric_column(Path(whole.trainer.log_dir), "train/loss")
    assert len(losses) == 12  # 16 records, batches of 4, 3 epochs
    assert metric_column(Path(resumed.trainer.log_dir), "train/loss") == losses[2:]
    ours, theirs = adapters(resumed.model), adapters(whole.model)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)

    saved = torch.load(checkpoint, weights_only=False)
    assert set(saved["state_dict"]) == set(ours)  # the adapters, not the frozen base
    [state] = saved["optimizer_states"]
    assert len(state["state"]) == len(ours)  # AdamW moments of the adapters
    base_bytes = sum(p.numel() * 4 for p in whole.model.parameters() if not p.requires_grad)
    assert checkpoint.stat().st_size < base_bytes / 4  # measured: 150 kB for a 1.9 MB base


def test_a_checkpoint_from_another_base_or_other_settings_is_refused(tmp_path) -> None:
    first = cli(["fit", *tiny_fit_args(tmp_path, *LORA, "--trainer.max_steps=2")])
    checkpoint = torch.load(checkpoint_of(Path(first.trainer.log_dir)), weights_only=False)

    def lora_module(seed: int, **settings) -> PandaLLM:
        torch.manual_seed(seed)
        module = PandaLLM(model_name_or_path="llama-tiny", tokenizer=str(TOKENIZER_DIR), use_lora=True, **settings)
        module.configure_model()
        return module

    with pytest.raises(ModelError, match="holds adapters trained on another base model"):
        check_restorable(checkpoint, lora_module(seed=7, lora_r=4), "ckpt")  # same shapes, other weights
    with pytest.raises(ModelError, match=r"adapters of other shapes .*lora_A.default.weight \[4, 64\] in the"):
        check_restorable(checkpoint, lora_module(seed=42, lora_r=8), "ckpt")
    with pytest.raises(ModelError, match="1 missing .* Was it saved by a run with other settings"):
        check_restorable(checkpoint, lora_module(seed=42, lora_r=4, modules_to_save=["lm_head"]), "ckpt")
