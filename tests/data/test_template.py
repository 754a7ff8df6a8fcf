"""Prompt templates: exact labels of multi-turn conversations, BOS from one place only, user templates.

The golden ids are spelled with the word tokenizer of `tests/data/word_tokenizer.py` (one id per word), from
the text each template is documented to write.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pandallm.data import PandaDataModule
from pandallm.data.template import Rendered, resolve_template
from pandallm.data.tokenize import encode_segments
from pandallm.errors import ConfigError, DataFormatError
from pandallm.tokenizer import load_tokenizer
from tests.conftest import TOKENIZER_DIR, write_jsonl
from tests.data.word_tokenizer import (
    ASSISTANT,
    ASSISTANT_,
    BE,
    BOS,
    BRIEF,
    CAPITAL,
    END_INST,
    END_SYS,
    EOS,
    HELLO,
    HI,
    IM_END,
    IM_START,
    INST,
    PARIS,
    SYS,
    SYSTEM,
    USER,
    USER_,
    save_word_tokenizer,
)

M = -100
SHAREGPT = {
    "conversations": [
        {"from": "system", "value": "Be brief"},
        {"from": "human", "value": "Hi"},
        {"from": "gpt", "value": "Hello"},
        {"from": "human", "value": "Capital?"},
        {"from": "gpt", "value": "Paris"},
    ]
}
CHATML = (Path(__file__).parents[2] / "pandallm" / "data" / "chat_templates" / "chatml.jinja").read_text()
# A user's template: "ROLE: content" lines, each reply closed by EOS; the generation prompt is "ASSISTANT:".
USER_TEMPLATE = (
    "{%- for m in messages -%}{{ m['role'] | upper }}: {{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}ASSISTANT:{%- endif -%}"
)


def rows(tmp_path: Path, records: list[dict], tokenizer: str, **settings) -> list[dict]:
    write_jsonl(tmp_path / "it" / "chat.jsonl", records)
    defaults = {"max_seq_length": 64, "num_workers": 0, "per_device_train_batch_size": 1}
    dm = PandaDataModule(
        tokenizer=tokenizer,
        instruction_tuning_data_dir=str(tmp_path / "it"),
        pretraining_data_dir=None,
        cache_dir=str(tmp_path / "cache"),
        **{**defaults, **settings},
    )
    dm.prepare_data()
    dm.setup("fit")
    return list(dm.datasets["train"])


@pytest.fixture
def words(tmp_path: Path) -> str:
    return save_word_tokenizer(tmp_path / "words")


def test_sharegpt_multi_turn_labels_under_llama_2(tmp_path: Path, words: str) -> None:
    # <s>[INST] <<SYS>>\nBe brief\n<</SYS>>\n\nHi [/INST] Hello </s><s>[INST] Capital? [/INST] Paris </s>
    # The template writes both BOS itself; the tokenizer's own BOS is not added: no double BOS.
    (row,) = rows(tmp_path, [SHAREGPT], words, template="llama-2")
    first = [BOS, INST, SYS, BE, BRIEF, END_SYS, HI, END_INST]
    second = [BOS, INST, CAPITAL, END_INST]
    assert row["input_ids"] == [*first, HELLO, EOS, *second, PARIS, EOS]
    assert row["labels"] == [*[M] * len(first), HELLO, EOS, *[M] * len(second), PARIS, EOS]


def test_a_prompt_cut_from_the_left_keeps_the_bos_the_template_wrote(tmp_path: Path, words: str) -> None:
    # The first exchange alone is 10 tokens under llama-2; in 7 the prompt is cut from the left, after the BOS.
    (row,) = rows(tmp_path, [SHAREGPT], words, template="llama-2", max_seq_length=7)
    assert row["input_ids"] == [BOS, BRIEF, END_SYS, HI, END_INST, HELLO, EOS]
    assert row["labels"] == [M, M, M, M, M, HELLO, EOS]


def test_sharegpt_multi_turn_labels_under_chatml(tmp_path: Path, words: str) -> None:
    # <s><|im_start|>system\nBe brief<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n
    # Hello<|im_end|>\n<|im_start|>user\nCapital?<|im_end|>\n<|im_start|>assistant\nParis<|im_end|>\n
    (row,) = rows(tmp_path, [SHAREGPT], words, template="chatml")
    first = [BOS, IM_START, SYSTEM, BE, BRIEF, IM_END, IM_START, USER, HI, IM_END, IM_START, ASSISTANT]
    second = [IM_START, USER, CAPITAL, IM_END, IM_START, ASSISTANT]
    assert row["input_ids"] == [*first, HELLO, IM_END, *second, PARIS, IM_END]
    assert row["labels"] == [*[M] * len(first), HELLO, IM_END, *[M] * len(second), PARIS, IM_END]


def test_plain_layout_trains_every_reply_and_its_eos(tmp_path: Path, words: str) -> None:
    # `none`: [BOS] then each turn tokenized on its own, EOS after every reply.
    (row,) = rows(tmp_path, [SHAREGPT], words, template="none")
    assert row["input_ids"] == [BOS, BE, BRIEF, HI, HELLO, EOS, CAPITAL, PARIS, EOS]
    assert row["labels"] == [M, M, M, M, HELLO, EOS, M, PARIS, EOS]


def test_auto_uses_the_tokenizers_template_except_for_pandallm_records(tmp_path: Path) -> None:
    tokenizer = save_word_tokenizer(tmp_path / "words", chat_template=CHATML)
    (chat,) = rows(tmp_path / "a", [SHAREGPT], tokenizer)
    assert chat["input_ids"][:3] == [BOS, IM_START, SYSTEM]
    (pandallm,) = rows(tmp_path / "b", [{"input": "Hi", "target": "Hello"}], tokenizer)
    assert pandallm["input_ids"] == [BOS, HI, HELLO, EOS]  # today's `[BOS] input target [EOS]`
    assert pandallm["labels"] == [M, M, HELLO, EOS]
    (explicit,) = rows(tmp_path / "c", [{"input": "Hi", "target": "Hello"}], tokenizer, template="tokenizer")
    assert explicit["input_ids"] == [BOS, IM_START, USER, HI, IM_END, IM_START, ASSISTANT, HELLO, IM_END]


def test_single_turn_formats_become_a_user_and_an_assistant_turn(tmp_path: Path, words: str) -> None:
    alpaca = [{"instruction": "Hi", "input": "Capital?", "output": "Paris"}]
    (row,) = rows(tmp_path, alpaca, words, template="chatml")
    # The input follows the instruction, after a blank line, in the one user turn.
    assert row["input_ids"] == [BOS, IM_START, USER, HI, CAPITAL, IM_END, IM_START, ASSISTANT, PARIS, IM_END]


def test_no_double_bos_with_the_shipped_sentencepiece_tokenizer(tmp_path: Path) -> None:
    tokenizer = load_tokenizer(str(TOKENIZER_DIR))
    for template in ("llama-2", "alpaca", "chatml"):
        (row,) = rows(tmp_path / template, [SHAREGPT], str(TOKENIZER_DIR), template=template, max_seq_length=512)
        assert row["input_ids"][0] == tokenizer.bos_token_id != row["input_ids"][1]
        trained = [t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != M]
        assert trained == [label for label in row["labels"] if label != M]
        text = tokenizer.decode(trained)
        assert "Hello" in text and "Paris" in text and "Capital" not in text and "Be brief" not in text


def test_user_jinja_file_directory_and_template_dir(tmp_path: Path, words: str) -> None:
    file = tmp_path / "templates" / "mine.jinja"
    file.parent.mkdir()
    file.write_text(USER_TEMPLATE)
    record = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}]
    # USER: Hi\nASSISTANT: Hello</s>\n  -- the template writes no BOS, so the row has none.
    expected = [USER_, HI, ASSISTANT_, HELLO, EOS]
    for i, settings in enumerate(
        [
            {"template": str(file)},
            {"template": str(file.parent)},  # a directory with a single .jinja file
            {"template": "mine", "template_dir": str(file.parent)},
        ]
    ):
        (row,) = rows(tmp_path / str(i), record, words, **settings)
        assert row["input_ids"] == expected
        assert row["labels"] == [M, M, M, HELLO, EOS]


def test_templates_that_cannot_be_used_are_refused_at_start(tmp_path: Path, words: str) -> None:
    tokenizer = load_tokenizer(words)
    with pytest.raises(ConfigError, match="expected one of .*'llama-2'"):
        resolve_template("vicuna", tokenizer)
    with pytest.raises(ConfigError, match="has no chat template"):
        resolve_template("tokenizer", tokenizer)
    last_only = tmp_path / "last.jinja"
    last_only.write_text("{{ messages[-1]['content'] }}")  # rewrites earlier turns: no exact reply spans
    with pytest.raises(ConfigError, match="cannot be located exactly"):
        resolve_template(str(last_only), tokenizer)


def test_a_conversation_the_template_refuses_names_file_and_line(tmp_path: Path, words: str) -> None:
    two_users = {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
        ]
    }
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    with pytest.raises(DataFormatError, match=r"chat.jsonl:2: template 'llama-2': .*alternate"):
        rows(tmp_path / "a", [good, two_users], words, template="llama-2")
    kept = rows(tmp_path / "b", [good] * 199 + [two_users], words, template="llama-2", bad_records="skip")
    assert len(kept) == 199


def test_a_token_across_a_boundary_goes_to_the_reply_and_is_counted(words: str) -> None:
    tokenizer = load_tokenizer(words)
    # "Hi Hel" + "lo": the whole text is the words Hi Hello; the prefix alone tokenizes as Hi <unk>.
    (encoded,) = encode_segments([Rendered(["Hi Hel", "lo"], [False, True], templated=True)], tokenizer)
    assert encoded == ([], [([HI], False), ([HELLO], True)], 1)
    # The other way round: the reply "Hel" ends inside the token Hello; it keeps it, rather than lose its only token.
    (encoded,) = encode_segments([Rendered(["Hi ", "Hel", "lo"], [False, True, False], templated=True)], tokenizer)
    assert encoded == ([], [([HI], False), ([HELLO], True), ([], False)], 1)


def test_predict_prompts_end_with_the_templates_generation_prompt(tmp_path: Path, words: str) -> None:
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"input": "Hi"}])
    write_jsonl(tmp_path / "it" / "a.jsonl", [{"input": "Hi", "target": "Hello"}])

    def prompt_ids(**settings) -> list[int]:
        dm = PandaDataModule(
            tokenizer=words,
            instruction_tuning_data_dir=str(tmp_path / "it"),
            pretraining_data_dir=None,
            predict_files=[str(prompts)],
            **settings,
        )
        return dm.prompts()[0]["input_ids"]

    assert prompt_ids() == [BOS, HI]  # as before templates: [BOS] input
    assert prompt_ids(template="chatml") == [BOS, IM_START, USER, HI, IM_END, IM_START, ASSISTANT]
    assert prompt_ids(template="llama-2") == [BOS, INST, HI, END_INST]
    # Too long: cut from the left after the template's BOS, as training cuts an over-long prompt.
    assert prompt_ids(template="llama-2", max_seq_length=3) == [BOS, HI, END_INST]
