"""`pandallm predict` prompts: read through the format detection of training files, rendered by the template
decision of training rows, and tokenized exactly as a training row of the same record begins.

Golden ids are spelled with the word tokenizer of `tests/data/word_tokenizer.py` (one id per word)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pandallm.data import PandaDataModule
from pandallm.data.collate import collate_prompts
from pandallm.errors import DataFormatError
from pandallm.model import PandaLLM
from tests.conftest import TOKENIZER_DIR, write_jsonl
from tests.data.test_template import CHATML
from tests.data.word_tokenizer import (
    ASSISTANT,
    BOS,
    CAPITAL,
    EOS,
    HELLO,
    HI,
    IM_END,
    IM_START,
    USER,
    save_word_tokenizer,
)

ALPACA = {"instruction": "Hi", "input": "", "output": "Hello"}  # most Alpaca records have an empty input
ALPACA_WITH_INPUT = {"instruction": "Hi", "input": "Capital?", "output": "Paris"}
CHAT = {
    "conversations": [
        {"from": "human", "value": "Hi"},
        {"from": "gpt", "value": "Hello"},
        {"from": "human", "value": "Capital?"},
        {"from": "gpt", "value": "Paris"},
    ]
}


def datamodule(tmp_path: Path, tokenizer: str, records: list[dict], **settings) -> PandaDataModule:
    """A data module that trains on `records` and predicts from the same records."""
    write_jsonl(tmp_path / "it" / "a.jsonl", records)
    return PandaDataModule(
        tokenizer=tokenizer,
        instruction_tuning_data_dir=str(tmp_path / "it"),
        pretraining_data_dir=None,
        predict_files=[str(tmp_path / "it" / "a.jsonl")],
        cache_dir=str(tmp_path / "cache"),
        shuffle=False,
        per_device_train_batch_size=1,
        num_workers=0,
        **settings,
    )


def training_prompts(dm: PandaDataModule) -> list[list[int]]:
    """Each training row up to its last reply: what the model saw before the reply it learned last."""
    dm.prepare_data()
    dm.setup("fit")
    prompts = []
    for row in dm.datasets["train"]:
        labels = row["labels"]
        last = max(i for i in range(len(labels)) if labels[i] != -100 and (i == 0 or labels[i - 1] == -100))
        prompts.append(row["input_ids"][:last])
    return prompts


@pytest.fixture
def words(tmp_path: Path) -> str:
    return save_word_tokenizer(tmp_path / "words")


@pytest.fixture
def words_with_chatml(tmp_path: Path) -> str:
    return save_word_tokenizer(tmp_path / "chat_words", chat_template=CHATML)


def test_an_alpaca_prompt_is_its_instruction_and_input_with_the_output_as_reference(tmp_path: Path, words) -> None:
    dm = datamodule(tmp_path, words, [ALPACA, ALPACA_WITH_INPUT], template="none")
    rows = dm.prompts()
    # [BOS] instruction (an empty input adds nothing), not [BOS] "" (the empty `input` field).
    assert [row["input_ids"] for row in rows] == [[BOS, HI], [BOS, HI, CAPITAL]]
    assert [row["input_ids"] for row in rows] == training_prompts(dm)
    assert rows[0]["prompt"] == {"prompt": [{"role": "user", "content": "Hi"}]}
    assert rows[1]["prompt"] == {"prompt": [{"role": "user", "content": "Hi\n\nCapital?"}]}
    assert [row["reference"] for row in rows] == ["Hello", "Paris"]


def test_under_auto_a_format_trained_with_the_tokenizers_template_is_prompted_with_it(
    tmp_path: Path, words_with_chatml: str
) -> None:
    # Training renders Alpaca and chat records with the tokenizer's chat template under `auto`, and pandallm
    # records in the plain layout: predicting must make the same choice per record format.
    chat_prompt = [BOS, IM_START, USER, HI, IM_END, IM_START, ASSISTANT]
    dm = datamodule(tmp_path / "alpaca", words_with_chatml, [ALPACA])
    assert dm.prompts()[0]["input_ids"] == chat_prompt == training_prompts(dm)[0]
    dm = datamodule(tmp_path / "pandallm", words_with_chatml, [{"input": "Hi", "target": "Hello"}])
    assert dm.prompts()[0]["input_ids"] == [BOS, HI] == training_prompts(dm)[0]
    assert dm.prompts()[0]["prompt"] == {"input": "Hi"}  # the existing key of `{"input"}` records
    # A multi-turn conversation: the turns before its last reply, earlier replies as training wrote them.
    for template in ("auto", "none", "llama-2"):
        dm = datamodule(tmp_path / template, words_with_chatml, [CHAT], template=template)
        (row,) = dm.prompts()
        assert row["input_ids"] == training_prompts(dm)[0]
        assert row["reference"] == "Paris"
    assert row["prompt"]["prompt"][-1] == {"role": "user", "content": "Capital?"}
    (plain,) = datamodule(tmp_path / "plain", words_with_chatml, [CHAT], template="none").prompts()
    assert plain["input_ids"] == [BOS, HI, HELLO, EOS, CAPITAL]


def test_prompts_without_their_reply(tmp_path: Path, words_with_chatml: str) -> None:
    records = [{"input": "Hi"}]  # the pandallm prompt file, as before formats were detected
    write_jsonl(tmp_path / "pandallm.jsonl", records)
    write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "Hi", "input": ""}])
    ends_with_user = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    ends_with_user["messages"].append({"role": "user", "content": "Capital?"})
    write_jsonl(tmp_path / "chat.jsonl", [ends_with_user])
    dm = PandaDataModule(
        tokenizer=words_with_chatml,
        predict_files=[str(tmp_path / name) for name in ("pandallm.jsonl", "alpaca.jsonl", "chat.jsonl")],
    )
    rows = dm.prompts()
    assert [row["input_ids"] for row in rows] == [
        [BOS, HI],
        [BOS, IM_START, USER, HI, IM_END, IM_START, ASSISTANT],
        [BOS, IM_START, USER, HI, IM_END, IM_START, ASSISTANT, HELLO, IM_END, IM_START, USER, CAPITAL, IM_END]
        + [IM_START, ASSISTANT],  # the reply to its last user turn is what is predicted
    ]
    assert [row["reference"] for row in rows] == [None, None, None]
    assert [row["index"] for row in rows] == [0, 1, 2]


def test_records_that_are_not_prompts_name_file_line_and_what_they_are(tmp_path: Path, words: str) -> None:
    def refused(records: list[dict]) -> str:
        path = write_jsonl(tmp_path / "p.jsonl", records)
        with pytest.raises(DataFormatError) as error:
            PandaDataModule(tokenizer=words, predict_files=[str(path)]).prompts()
        return str(error.value).removeprefix(f"{path}:")

    assert (
        refused([{"text": "Once upon a time"}])
        == "1: a pretraining record (text) where instruction records are expected"
    )
    assert refused([{"question": "Hi"}]).startswith("1: cannot tell the record kind: found fields ['question']")
    assert refused([{"question": "Hi"}]).endswith("(to predict from, the reply may be left out)")
    assert refused([{"input": "Hi"}, {"instruction": "Hi", "output": "Hello"}]).startswith(
        "2: a alpaca record ['instruction', 'input', 'output'] in a file of pandallm records (detected from line 1)"
    )
    assert refused([{"input": " ", "target": "Hello"}]) == (
        "1: the prompt of this pandallm record is empty: nothing to reply to"
    )
    assert refused([{"messages": [{"role": "system", "content": "Be brief"}]}]) == (
        "1: field 'messages': has no user turn to reply to"
    )


def test_predictions_show_the_prompt_the_output_and_the_reference(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "p.jsonl", [{"input": "Hi"}, {"input": "Hi", "target": "Hello"}])
    write_jsonl(tmp_path / "a.jsonl", [ALPACA])
    dm = PandaDataModule(
        tokenizer=str(TOKENIZER_DIR), predict_files=[str(tmp_path / "p.jsonl"), str(tmp_path / "a.jsonl")]
    )
    model = PandaLLM(model_name_or_path="llama-tiny", tokenizer=str(TOKENIZER_DIR), max_new_tokens=2)
    model.configure_model()
    predictions = model.predict_step(collate_prompts(dm.prompts(), dm.pad_id), 0)
    assert [sorted(p) for p in predictions] == [
        ["input", "output"],
        ["input", "output", "reference"],
        ["output", "prompt", "reference"],
    ]
    assert predictions[1]["reference"] == "Hello" and predictions[2]["reference"] == "Hello"
    assert predictions[2]["prompt"] == [{"role": "user", "content": "Hi"}]
    assert all(isinstance(p["output"], str) for p in predictions)
