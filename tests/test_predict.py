"""`pandallm predict` from a checkpoint alone renders prompts as the model was trained, and writes each output beside
its prompt and reference."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from pandallm.cli import cli
from pandallm.data.formats import Turn
from pandallm.data.template import ChatTemplate, render
from tests.conftest import REPO, tiny_fit_args, write_jsonl

pytestmark = pytest.mark.integration


def test_predict_from_a_checkpoint_uses_the_template_it_was_trained_with(tmp_path: Path) -> None:
    fit_args = tiny_fit_args(tmp_path, "--data.template=chatml")
    fit = cli(["fit", *fit_args, "--trainer.max_steps=2", "--export.enabled=false"])
    checkpoint = next((Path(fit.trainer.log_dir) / "checkpoints").glob("*.ckpt"))
    prompts = write_jsonl(
        tmp_path / "prompts.jsonl", [{"instruction": "Name a colour.", "input": "", "output": "Red."}]
    )
    out = tmp_path / "predictions.jsonl"
    # No --config and no template: the checkpoint's model settings and its data.template.
    common = [
        f"--ckpt_path={checkpoint}",
        f"--data.predict_files=[{prompts}]",
        f"--predictions.path={out}",
        "--model.max_new_tokens=3",
        "--trainer.accelerator=cpu",
        "--trainer.logger=false",
        f"--trainer.default_root_dir={tmp_path / 'predict'}",
        "--trainer.enable_progress_bar=false",
        "--data.num_workers=0",
    ]
    predicted = cli(["predict", *common])
    assert predicted.datamodule.template == "chatml"
    tokenizer = predicted.datamodule.tokenizer
    chatml = ChatTemplate("chatml", (REPO / "pandallm" / "data" / "chat_templates" / "chatml.jinja").read_text())
    (text,) = [t for t, _ in render(chatml, (Turn("user", "Name a colour."),), tokenizer, generation_prompt=True)]
    assert text.startswith("<s><|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n")
    expected = tokenizer(text, add_special_tokens=False)["input_ids"]
    # Cut from the left after its BOS to the trained data.max_seq_length (32), as training cuts a prompt.
    assert predicted.datamodule.max_seq_length == 32
    assert predicted.datamodule.prompts()[0]["input_ids"] == expected[:1] + expected[-31:]
    (line,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert line["prompt"] == [{"role": "user", "content": "Name a colour."}]
    assert line["reference"] == "Red." and isinstance(line["output"], str)
    # An option given still wins over the checkpoint's.
    assert cli(["predict", *common, "--data.template=none"]).datamodule.template == "none"


def test_a_checkpoint_alone_validates_on_its_runs_data_and_predicts_beside_its_run(tmp_path: Path, caplog) -> None:
    fit = cli(["fit", *tiny_fit_args(tmp_path), "--trainer.max_steps=2", "--export.enabled=false"])
    checkpoint = next((Path(fit.trainer.log_dir) / "checkpoints").glob("*.ckpt"))
    elsewhere = [
        f"--ckpt_path={checkpoint}",
        "--trainer.accelerator=cpu",
        "--trainer.logger=false",
        f"--trainer.default_root_dir={tmp_path / 'elsewhere'}",
        "--trainer.enable_progress_bar=false",
    ]
    caplog.set_level(logging.INFO, logger="pandallm")
    # No --config and no data option: the run's recorded data settings, its validation file among them.
    validated = cli(["validate", *elsewhere])
    assert validated.datamodule.val_files == [str(tmp_path / "val.jsonl")]
    assert "val/loss" in validated.trainer.callback_metrics
    assert not [r for r in caplog.records if "the resumed epoch's order" in r.getMessage()]  # fit's concern only
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"input": "Name a colour."}])
    predicting = [*elsewhere, f"--data.predict_files=[{prompts}]", "--model.max_new_tokens=2"]
    cli(["predict", *predicting])
    beside = Path(fit.trainer.log_dir) / "predictions.jsonl"  # the checkpoint is in <run>/checkpoints/
    assert [json.loads(line)["input"] for line in beside.read_text().splitlines()] == ["Name a colour."]
    assert any(f"1 predictions written to {beside}" in r.getMessage() for r in caplog.records)
    cli(["predict", *predicting, f"--output={tmp_path / 'out.jsonl'}"])
    assert (tmp_path / "out.jsonl").read_text().count("\n") == 1
