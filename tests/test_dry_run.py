"""`pandallm fit --dry_run` reads and checks the data, counts on the meta device, prints the run's figures, and
trains nothing."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from pandallm.cli import cli
from pandallm.errors import DataFormatError
from pandallm.tools.estimate import estimate_memory
from tests.conftest import DOCUMENTS, tiny_fit_args, write_jsonl


def test_a_dry_run_prints_steps_tokens_parameters_and_memory_and_trains_nothing(tmp_path: Path, capsys) -> None:
    args = ["fit", *tiny_fit_args(tmp_path), "--trainer.max_epochs=2", "--data.val_files=[]", "--dry_run"]
    run = cli(args)
    shown = capsys.readouterr().out
    rows = run.datamodule.datasets["train"]["input_ids"]  # 16 records, 4 per batch: 4 steps per epoch
    tokens_per_row = sum(len(ids) for ids in rows) / len(rows)
    parameters = run.model.num_parameters()
    assert "  optimizer steps: 8; 4 per epoch\n" in shown
    assert f"  tokens per optimizer step: about {4 * tokens_per_row:,.0f} (4 rows of 4 x 1 device(s)" in shown
    assert f"  parameters: {parameters:,}, trainable: {parameters:,} (100.00%)\n" in shown
    # The memory per device is `pandallm estimate`'s count of the same run (tests/model/test_memory.py checks it).
    estimate = estimate_memory(run.config.fit, devices=1)
    assert textwrap.indent(estimate.report(), "  ") in shown
    # fp32 AdamW: weights and gradients 4 bytes each, two moments of 4 bytes
    assert estimate.parts["weights"] == estimate.parts["gradients"] == estimate.parts["optimizer state"] / 2
    assert estimate.parts["weights"] == 4 * parameters
    assert run.model.model is None  # never built for real, nothing trained or written
    assert not list(tmp_path.rglob("*.ckpt")) and not (tmp_path / "t").exists()


def test_a_dry_run_counts_the_lora_parameters_the_run_would_train(tmp_path: Path, capsys) -> None:
    lora = ["--model.use_lora=true", "--model.lora_r=4", "--model.modules_to_save=[lm_head]"]
    run = cli(["fit", *tiny_fit_args(tmp_path), "--trainer.max_steps=3", *lora, "--dry_run"])
    shown = capsys.readouterr().out
    run.model.configure_model()  # the real model, as training builds it
    trainable = sum(p.numel() for p in run.model.model.parameters() if p.requires_grad)
    assert f"trainable: {trainable:,} (" in shown and "optimizer steps: 3;" in shown


def test_a_dry_run_fails_on_bad_data_as_the_run_would(tmp_path: Path) -> None:
    args = tiny_fit_args(tmp_path)
    (tmp_path / "it" / "a.jsonl").write_text('{"input": "x"}\n')
    with pytest.raises(DataFormatError, match=r"a.jsonl:1"):
        cli(["fit", *args, "--dry_run"])


def test_a_streaming_dry_run_does_not_claim_to_have_checked_the_records(tmp_path: Path, capsys) -> None:
    # It said "the data ... check out" over a corpus it never read: a malformed last line passed the dry run.
    write_jsonl(tmp_path / "pt" / "a.jsonl", [*DOCUMENTS, {"text": 5}])
    stream = ["--data.instruction_tuning_data_dir=null", f"--data.pretraining_data_dir={tmp_path / 'pt'}"]
    stream += ["--data.streaming=true", "--data.val_files=[]", "--trainer.max_steps=2"]
    cli(["fit", *tiny_fit_args(tmp_path), *stream, "--dry_run"])
    shown = capsys.readouterr().out
    assert "the config, the data and the model check out" not in shown
    assert "their records are read only as training reaches them (`pandallm data check DIR`" in shown


def test_an_online_rl_dry_run_counts_the_completions_and_the_steps_per_rollout(tmp_path: Path, capsys) -> None:
    write_jsonl(tmp_path / "rl" / "a.jsonl", [{"prompt": f"Say {word}."} for word in ["good", "water", "one", "two"]])
    ppo = [
        "--model.objective=PPO",
        '--model.objective.rewards=[{function: "pandallm.rewards:ends_with"}]',
        "--model.objective.ppo_epochs=3",
        "--model.objective.num_generations=2",
        "--model.objective.max_new_tokens=5",
        f"--data.instruction_tuning_data_dir={tmp_path / 'rl'}",
        "--data.val_files=[]",
        "--data.per_device_train_batch_size=2",
        "--trainer.max_epochs=1",
    ]
    run = cli(["fit", *tiny_fit_args(tmp_path), *ppo, "--dry_run"])
    shown = capsys.readouterr().out
    prompts = run.datamodule.datasets["train"]["input_ids"]
    tokens = 2 * 2 * (sum(len(ids) for ids in prompts) / len(prompts) + 5)  # 2 prompts x 2 completions per step
    # 4 prompts, 2 per step, each step's rows read 3 times: 6 optimizer steps.
    assert "  optimizer steps: 6; 6 per epoch; 3 per rollout\n" in shown
    assert f"  tokens per optimizer step: at most about {tokens:,.0f} (2 prompts of 2 x 1 device(s)" in shown
    run.model.configure_model()  # the real model, value head included
    assert f"trainable: {sum(p.numel() for p in run.model.parameters() if p.requires_grad):,} (" in shown
