"""The exported tokenizer encodes prompts as training rows start: plain `transformers` users get the BOS (or the
chat template's text) that the model was trained with."""

from __future__ import annotations

import shutil
from pathlib import Path

from transformers import AutoTokenizer

from pandallm.data import PandaDataModule
from pandallm.data.cache import tokenizer_digest
from pandallm.model import PandaLLM
from tests.conftest import TOKENIZER_DIR, write_jsonl

CHATML = (Path(__file__).parents[2] / "pandallm" / "data" / "chat_templates" / "chatml.jinja").read_text()
PROMPT = "What is the capital of France?"


def prompt_of_training_row(tmp_path: Path, tokenizer: str, record: dict, template: str = "auto") -> list[int]:
    """The masked start of the row training builds from `record`: its prompt, as the model saw it."""
    write_jsonl(tmp_path / "it" / "a.jsonl", [record])
    dm = PandaDataModule(
        tokenizer=tokenizer,
        template=template,
        instruction_tuning_data_dir=str(tmp_path / "it"),
        pretraining_data_dir=None,
        cache_dir=str(tmp_path / "cache"),
        per_device_train_batch_size=1,
        num_workers=0,
    )
    dm.prepare_data()
    dm.setup("fit")
    row = dm.datasets["train"][0]
    first_trained = next(i for i, label in enumerate(row["labels"]) if label != -100)
    return row["input_ids"][:first_trained]


def export(tmp_path: Path, tokenizer: str) -> Path:
    module = PandaLLM(model_name_or_path="llama-tiny", tokenizer=tokenizer)
    module.configure_model()
    digest = tokenizer_digest(module.tokenizer)
    directory = module.export_hf(tmp_path / "hf")  # what the export callback and `pandallm export` call
    assert tokenizer_digest(module.tokenizer) == digest  # pandallm's own tokenizer is not changed by exporting
    return directory


def test_the_exported_tokenizer_starts_a_prompt_with_bos_like_a_training_row(tmp_path: Path) -> None:
    trained = prompt_of_training_row(tmp_path, str(TOKENIZER_DIR), {"input": PROMPT, "target": "Paris."})
    assert trained[0] == 1  # [BOS] input
    exported = AutoTokenizer.from_pretrained(export(tmp_path, str(TOKENIZER_DIR)))
    assert exported(PROMPT).input_ids == trained
    assert exported([PROMPT, "Hi"]).input_ids[1][0] == 1  # batches too
    assert exported(PROMPT, add_special_tokens=False).input_ids == trained[1:]


def test_the_exported_chat_template_renders_a_prompt_like_a_training_row(tmp_path: Path) -> None:
    # A tokenizer with a chat template that writes BOS itself: apply_chat_template must not add a second one.
    tokenizer = tmp_path / "tok"
    shutil.copytree(TOKENIZER_DIR, tokenizer)
    (tokenizer / "chat_template.jinja").write_text(CHATML)
    record = {"messages": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": "Paris."}]}
    trained = prompt_of_training_row(tmp_path, str(tokenizer), record)  # `auto`: the tokenizer's template
    exported = AutoTokenizer.from_pretrained(export(tmp_path, str(tokenizer)))
    rendered = exported.apply_chat_template(record["messages"][:1], add_generation_prompt=True)
    assert rendered["input_ids"] == trained
    assert trained[0] == 1 and trained.count(1) == 1  # the template's BOS, once


def test_a_sentencepiece_model_file_exports_with_bos_too(tmp_path: Path) -> None:
    exported = AutoTokenizer.from_pretrained(export(tmp_path, str(TOKENIZER_DIR / "tokenizer.model")))
    assert exported(PROMPT).input_ids[:1] == [1]
    assert exported(PROMPT).input_ids[-1] != 2  # no EOS after a prompt


def test_the_export_carries_the_template_the_run_trained_with(tmp_path: Path) -> None:
    """The demo tokenizer has no chat template; a run trained with `data.template: chatml` exports one, so that
    `apply_chat_template` on `hf/` prompts as training did, from `fit` and from `pandallm export` alike."""
    from pandallm.cli import cli
    from pandallm.tools.export import export as export_command
    from tests.conftest import tiny_fit_args

    fit = cli(["fit", *tiny_fit_args(tmp_path, "--data.template=chatml"), "--trainer.max_steps=1"])
    record = {"messages": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": "Paris."}]}
    trained = prompt_of_training_row(tmp_path / "rows", str(TOKENIZER_DIR), record, "chatml")
    checkpoint = next((Path(fit.trainer.log_dir) / "checkpoints").glob("*.ckpt"))
    exported = export_command([f"--ckpt_path={checkpoint}", f"--output={tmp_path / 'exported'}"])
    for directory in (Path(fit.trainer.log_dir) / "hf", exported):
        tokenizer = AutoTokenizer.from_pretrained(directory)
        assert tokenizer.chat_template == CHATML
        assert tokenizer.apply_chat_template(record["messages"][:1], add_generation_prompt=True)["input_ids"] == trained
