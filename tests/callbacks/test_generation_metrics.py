"""Generation metrics chosen in the config, in `fit` (with fast validation), `validate` and `test`; choosing the
model by them (early stopping, the best checkpoint); and the errors of bad settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pandallm.callbacks.generation_metrics import GenerationMetrics
from pandallm.checkpoint.load import safe_load
from pandallm.cli import cli
from pandallm.errors import ConfigError
from pandallm.eval.metrics import score
from tests.conftest import metric_column, tiny_fit_args

pytestmark = pytest.mark.integration

METRICS = "--evaluation.metrics=[ppl, bleu, rouge, edit_distance, exact_match]"
EVERY_STEP = ("--trainer.val_check_interval=1", "--trainer.num_sanity_val_steps=0", "--model.max_new_tokens=4")


def test_fast_validation_scores_n_records_and_every_kth_validation_all(tmp_path: Path) -> None:
    fit = cli(
        [
            "fit",
            *tiny_fit_args(tmp_path, *EVERY_STEP, METRICS),
            "--trainer.max_steps=4",
            "--evaluation.fast_validation_n=2",
            "--evaluation.fast_validation_step_interval=2",
            "--export.enabled=false",
        ]
    )
    run_dir = Path(fit.trainer.log_dir)
    saved = {
        step: [
            json.loads(line) for line in (run_dir / "generations" / f"val_step{step}.jsonl").read_text().splitlines()
        ]
        for step in (1, 2, 3, 4)
    }
    # Validations 1 and 3 are fast (the first 2 records), 2 and 4 full (all 4 of val.jsonl).
    assert {step: len(lines) for step, lines in saved.items()} == {1: 2, 2: 4, 3: 2, 4: 4}
    assert [line["input"] for line in saved[2]][:2] == [line["input"] for line in saved[1]]
    assert saved[2][0]["reference"] == "Paris." and isinstance(saved[2][0]["output"], str)
    # What was logged is the score of what was saved.
    bleu, rouge_l = metric_column(run_dir, "val/bleu"), metric_column(run_dir, "val/rougeL")
    assert len(bleu) == 4 and len(metric_column(run_dir, "val/ppl")) == 4
    for step, lines in saved.items():
        expected = score(["bleu", "rouge"], [x["output"] for x in lines], [x["reference"] for x in lines])
        assert bleu[step - 1] == pytest.approx(expected["bleu"]) and rouge_l[step - 1] == pytest.approx(
            expected["rougeL"]
        )
    # The count of validations is saved, so that a resumed run keeps the same fast / full pattern.
    checkpoint = safe_load(next((run_dir / "checkpoints").glob("*.ckpt")))
    assert {"validations": 4} in checkpoint["callbacks"].values()


def test_validate_and_test_score_every_record(tmp_path: Path) -> None:
    fit = cli(["fit", *tiny_fit_args(tmp_path), "--trainer.max_steps=1", "--export.enabled=false"])
    checkpoint = next((Path(fit.trainer.log_dir) / "checkpoints").glob("*.ckpt"))
    common = [
        f"--ckpt_path={checkpoint}",
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path / 'eval'}",
        f"--trainer.logger.save_dir={tmp_path / 'eval'}",
        f"--data.val_files=[{tmp_path / 'val.jsonl'}]",
        f"--data.test_files=[{tmp_path / 'val.jsonl'}]",
        "--data.instruction_tuning_data_dir=null",
        "--data.num_workers=0",
        "--model.max_new_tokens=3",
        "--evaluation.metrics=[exact_match, chrf]",
        "--evaluation.fast_validation_n=1",  # fit only: validate and test score all the records
    ]
    for command, stage in (("validate", "val"), ("test", "test")):
        run = cli([command, *common])
        results = run.trainer.callback_metrics
        assert {f"{stage}/exact_match", f"{stage}/chrf", f"{stage}/ppl"} <= set(results)
        lines = (Path(run.trainer.log_dir) / "generations" / f"{stage}_step0.jsonl").read_text().splitlines()
        assert len(lines) == 4


def test_early_stopping_and_the_best_checkpoint_by_a_validation_metric(tmp_path: Path) -> None:
    fit = cli(
        [
            "fit",
            *tiny_fit_args(tmp_path, *EVERY_STEP, "--evaluation.metrics=[edit_distance]"),
            "--trainer.max_steps=20",
            "--early_stopping.monitor=val/loss",
            "--early_stopping.mode=max",  # the loss falls: it never improves by this measure
            "--early_stopping.patience=2",
            "--best_checkpoint.monitor=val/loss",
            "--best_checkpoint.mode=max",  # the worst validation loss: the first
            "--best_checkpoint.load_model_type=best",
        ]
    )
    run_dir = Path(fit.trainer.log_dir)
    losses = metric_column(run_dir, "val/loss")
    assert fit.trainer.global_step == 3 and len(losses) == 3  # the first, then 2 without improvement
    assert len(metric_column(run_dir, "val/edit_distance")) == 3
    best = safe_load(run_dir / "checkpoints" / "best.ckpt")
    assert best["global_step"] == 1 + losses.index(max(losses))
    exported = load_file(run_dir / "hf" / "model.safetensors")
    weights = {k.removeprefix("model."): v for k, v in best["state_dict"].items()}
    assert all(torch.equal(exported[k], weights[k]) for k in exported)
    last = {k.removeprefix("model."): v for k, v in fit.model.state_dict().items()}
    assert all(torch.equal(last[k], weights[k]) for k in exported)  # `best`: the model fit leaves is the best


def test_bad_settings_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown metric\(s\) \['blue'\]; the metrics are \['ppl', 'bleu'"):
        GenerationMetrics(metrics=["bleu", "blue"])
    with pytest.raises(ConfigError) as error:
        cli(["fit", *tiny_fit_args(tmp_path, METRICS, "--evaluation.fast_validation_n=5"), "--trainer.max_steps=1"])
    assert str(error.value) == (
        "evaluation.fast_validation_n=5 is larger than the validation set: data.val_files holds 4 records with replies"
    )
    with pytest.raises(ConfigError, match=r"early_stopping.monitor 'val/blue' is not logged at validation; the "):
        cli(
            ["fit", *tiny_fit_args(tmp_path, *EVERY_STEP, "--early_stopping.monitor=val/blue"), "--trainer.max_steps=2"]
        )
