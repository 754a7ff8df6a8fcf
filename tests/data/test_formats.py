"""Record formats: detection by fields, normalization, and errors that name the file, the line and the field."""

from __future__ import annotations

from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict

from pandallm.data.formats import Turn
from pandallm.data.records import find_data_files, read_records
from pandallm.errors import DataFormatError, DatasetError
from tests.conftest import write_jsonl

U, A, S = "user", "assistant", "system"


def turns(*pairs: tuple[str, str]) -> tuple[Turn, ...]:
    return tuple(Turn(role, content) for role, content in pairs)


@pytest.mark.parametrize(
    ("record", "fmt", "expected"),
    [
        ({"input": "Q", "target": "A"}, "pandallm", turns((U, "Q"), (A, "A"))),
        ({"instruction": "Q", "input": "ctx", "output": "A"}, "alpaca", turns((U, "Q\n\nctx"), (A, "A"))),
        # Belle's single-turn sets (train_0.5M_CN, ...) have Alpaca's fields, often without `input`.
        ({"instruction": "问", "output": "答"}, "alpaca", turns((U, "问"), (A, "答"))),
        (
            {"instruction": "Q", "context": "ctx", "response": "A", "category": "qa"},
            "dolly",
            turns((U, "Q\n\nctx"), (A, "A")),
        ),
        # Belle's multiturn_chat_0.8M: the dialogue so far in `instruction`, the last reply in `output`.
        (
            {
                "instruction": "Human: 你好\nAssistant: 你好！\nHuman: 北京？\nAssistant:",
                "input": "",
                "output": "首都。",
            },
            "belle",
            turns((U, "你好"), (A, "你好！"), (U, "北京？"), (A, "首都。")),
        ),
        (
            {
                "id": "x",
                "conversations": [
                    {"from": "human", "value": "Q1"},
                    {"from": "gpt", "value": "A1"},
                    {"from": "human", "value": "Q2"},
                    {"from": "gpt", "value": "A2"},
                ],
            },
            "sharegpt",
            turns((U, "Q1"), (A, "A1"), (U, "Q2"), (A, "A2")),
        ),
        # Belle's train_3.5M_CN: ShareGPT's fields, with human / assistant; a system prompt beside the turns.
        (
            {
                "system": "Be kind",
                "conversations": [{"from": "human", "value": "Q"}, {"from": "assistant", "value": "A"}],
            },
            "sharegpt",
            turns((S, "Be kind"), (U, "Q"), (A, "A")),
        ),
        (
            {
                "messages": [
                    {"role": "system", "content": "Be kind"},
                    {"role": "user", "content": "Q"},
                    {"role": "assistant", "content": "A"},
                    {"role": "user", "content": "trailing, nothing to learn"},
                ]
            },
            "openai",
            turns((S, "Be kind"), (U, "Q"), (A, "A")),
        ),
        ({"conversations": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}, "openai", None),
    ],
)
def test_each_instruction_format_is_detected_and_normalized(tmp_path: Path, record, fmt, expected) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [record, record])
    kind, records = read_records(path, "instruction")
    assert kind == "instruction"
    assert [(r.format, r.line) for r in records] == [(fmt, 1), (fmt, 2)]
    if expected is not None:
        assert records[0].turns == expected


@pytest.mark.parametrize(
    ("record", "fmt", "text"),
    [
        ({"title": "T", "content": "body"}, "pretraining", "T\nbody"),
        ({"title": "", "content": "body"}, "pretraining", "body"),
        ({"title": None, "content": "body"}, "pretraining", "body"),  # a null title, as pandas exports write it
        ({"text": "body", "meta": {"source": "web"}}, "text", "body"),
    ],
)
def test_each_pretraining_format_is_detected(tmp_path: Path, record, fmt, text) -> None:
    kind, records = read_records(write_jsonl(tmp_path / "d.jsonl", [record]), "pretraining")
    assert (kind, records[0].format, records[0].text) == ("pretraining", fmt, text)


def test_undetectable_record_lists_found_fields_and_the_formats(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataFormatError) as error:
        read_records(path, "instruction")
    message = str(error.value)
    assert message.startswith(f"{path}:1: cannot tell the record kind: found fields ['answer', 'question']")
    for expected in ("pandallm ['input', 'target']", "alpaca ['instruction', 'input', 'output']", "sharegpt", "openai"):
        assert expected in message


def test_a_record_of_the_wrong_kind_is_named(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"title": "T", "content": "c"}])
    with pytest.raises(DataFormatError, match=r"d.jsonl:1: a pretraining record \(pretraining\) where instruction"):
        read_records(path, "instruction")
    with pytest.raises(DatasetError, match=r"a .txt file holds pretraining text"):
        (tmp_path / "t.txt").write_text("text")
        read_records(tmp_path / "t.txt", "instruction")


def test_a_file_of_mixed_formats_is_an_error(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"instruction": "Q", "output": "A"},
            {"instruction": "Q", "output": "A"},
            {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
        ],
    )
    with pytest.raises(
        DataFormatError,
        match=r"d.jsonl:3: a sharegpt record .* in a file of alpaca records \(detected "
        r"from line 1\); a file holds one format",
    ):
        read_records(path)


def test_explicit_format_overrides_detection_and_says_what_was_found(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Q", "context": "", "response": "A"}])
    assert read_records(path)[1][0].format == "dolly"
    with pytest.raises(DataFormatError) as error:
        read_records(path, format="alpaca")
    assert (error.value.line, error.value.field) == (1, "output")
    assert "found fields ['context', 'instruction', 'response']" in str(error.value)
    with pytest.raises(DatasetError, match="format 'text' holds pretraining records"):
        read_records(path, "instruction", format="text")


@pytest.mark.parametrize(
    ("record", "field", "problem"),
    [
        (
            {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": 7}]},
            "conversations[1].value",
            "expected a string",
        ),
        (
            {"conversations": [{"from": "human", "value": "Q"}, {"from": "bot", "value": "A"}]},
            "conversations[1].from",
            "got 'bot'",
        ),
        ({"conversations": [{"from": "human", "value": "Q"}]}, "conversations", "no non-empty assistant turn"),
        (
            {
                "messages": [
                    {"role": "user", "content": "Q"},
                    {"role": "system", "content": "S"},
                    {"role": "assistant", "content": "A"},
                ]
            },
            "messages[1].role",
            "may only come first",
        ),
        ({"instruction": "Q", "output": ""}, "output", "is empty"),
        ({"instruction": "Q", "context": "c", "response": ["A"]}, "response", "expected a string, got list"),
    ],
)
def test_malformed_records_of_every_format_name_file_line_and_field(tmp_path: Path, record, field, problem) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [record])
    with pytest.raises(DataFormatError) as error:
        read_records(path)
    assert (error.value.path, error.value.line, error.value.field) == (str(path), 1, field)
    assert problem in str(error.value)


def test_skip_mode_collects_errors_of_any_format(tmp_path: Path) -> None:
    good = {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}
    bad = {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": None}]}
    path = write_jsonl(tmp_path / "d.jsonl", [good, bad, good, {"input": "x", "target": "y"}])
    skipped: list[DataFormatError] = []
    _, records = read_records(path, skipped=skipped)
    assert [r.line for r in records] == [1, 3]
    assert [(e.line, e.field) for e in skipped] == [(2, "conversations[1].value"), (4, None)]
    assert "a pandallm record" in str(skipped[1])


def test_txt_files_are_one_document_or_one_per_paragraph(tmp_path: Path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text("First paragraph,\nstill first.\n\n\nSecond.\n  \nThird\n", encoding="utf-8")
    _, whole = read_records(path, "pretraining")
    assert [(r.line, r.text) for r in whole] == [(1, "First paragraph,\nstill first.\n\n\nSecond.\n  \nThird")]
    _, paragraphs = read_records(path, "pretraining", txt_split="paragraph")
    assert [(r.line, r.text, r.format) for r in paragraphs] == [
        (1, "First paragraph,\nstill first.", "text"),
        (5, "Second.", "text"),
        (7, "Third", "text"),
    ]
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(DataFormatError, match=r"empty.txt:1: is empty"):
        read_records(tmp_path / "empty.txt")


def test_saved_datasets_are_sources_and_rows_are_lines(tmp_path: Path) -> None:
    chats = [
        {"conversations": [{"from": "human", "value": f"Q{i}"}, {"from": "gpt", "value": f"A{i}"}]} for i in range(3)
    ]
    Dataset.from_list(chats).save_to_disk(str(tmp_path / "it" / "saved"))
    write_jsonl(tmp_path / "it" / "more.jsonl", chats[:1])
    (tmp_path / "it" / "notes.txt").write_text("not instruction data")  # .txt is read only for pretraining
    sources = find_data_files(tmp_path / "it", "instruction_tuning_data_dir")
    # The saved dataset is one source: its own .json files (state.json, dataset_info.json) are not records.
    assert sources == [tmp_path / "it" / "more.jsonl", tmp_path / "it" / "saved"]
    kind, records = read_records(tmp_path / "it" / "saved", "instruction")
    assert kind == "instruction" and [r.line for r in records] == [1, 2, 3]
    assert records[2].turns == turns((U, "Q2"), (A, "A2"))
    Dataset.from_list(
        [{"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": ""}]}]
    ).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(DataFormatError, match=r"bad:1: field 'conversations'"):
        read_records(tmp_path / "bad")


def test_a_saved_dataset_dict_is_one_source_read_from_its_train_split(tmp_path: Path) -> None:
    # Each split directory of a DatasetDict looks like a saved Dataset of its own: its validation rows must not
    # become training rows, nor its training rows be read twice.
    split = {
        "train": Dataset.from_list([{"input": f"train {i}", "target": "t"} for i in range(4)]),
        "validation": Dataset.from_list([{"input": "held out", "target": "v"}]),
    }
    DatasetDict(split).save_to_disk(str(tmp_path / "it" / "dd"))
    assert find_data_files(tmp_path / "it", "instruction_tuning_data_dir") == [tmp_path / "it" / "dd"]
    _, records = read_records(tmp_path / "it" / "dd")
    assert [r.turns[0].content for r in records] == [f"train {i}" for i in range(4)]


def test_null_fields_count_as_missing(tmp_path: Path) -> None:
    # As saved datasets and pandas exports write them: an Alpaca record with a null input, and a null `response`
    # column that must not make the file look like Dolly.
    record = {"instruction": "Hi", "input": None, "output": "Hello", "response": None}
    kind, (read,) = read_records(write_jsonl(tmp_path / "a.jsonl", [record]))
    assert (kind, read.format) == ("instruction", "alpaca")
    assert [turn.content for turn in read.turns] == ["Hi", "Hello"]


OASST_ROW = {
    "message_id": "6ab24d72",
    "parent_id": None,
    "user_id": "c3fe8c76",
    "text": "Can you write a short introduction about the relevance of the term monopsony?",
    "role": "prompter",
    "lang": "en",
}


@pytest.mark.parametrize(
    ("kind", "fmt"), [(None, "auto"), ("pretraining", "auto"), ("instruction", "auto"), (None, "text")]
)
def test_an_openassistant_message_row_is_never_read_as_text(tmp_path: Path, kind, fmt) -> None:
    # It has `text`, but it is one turn of a conversation tree: as a document, its prompt would be trained unmasked.
    path = write_jsonl(tmp_path / "oasst.jsonl", [OASST_ROW])
    with pytest.raises(DataFormatError) as error:
        read_records(path, kind, format=fmt)
    assert str(error.value) == (
        f"{path}:1: this record looks like an OpenAssistant message row (oasst1 / oasst2 'messages'): one turn of a "
        "message tree (fields ['message_id', 'parent_id', 'role'], role 'prompter'). It is not plain text, and "
        "pandallm does not read this layout: read the trees file of the same release instead "
        "(2023-04-12_oasst_ready.trees.jsonl.gz: format oasst), or rebuild each conversation from its parent_id "
        "chain into an "
        'openai-format record, {"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": '
        "...}]} (role 'prompter' is 'user')"
    )


def test_data_check_refuses_chat_fields_beside_text_and_keeps_metadata(tmp_path: Path, capsys) -> None:
    from pandallm.tools.data import check

    path = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            OASST_ROW,
            {"text": "Q: hi", "output": "A: hello"},
            {"text": "Hi.", "role": "user"},
            {"text": "Translate: hi", "inputs": "Translate: hi"},  # half a Flan record: its targets missing
        ],
    )
    errors = check([str(path)])
    assert [(e.line, str(e).split(": ", 1)[1][:38]) for e in errors] == [
        (1, "this record looks like an OpenAssistan"),
        (2, "this record has fields of an instructi"),
        (3, "this record has fields of an instructi"),
        (4, "this record has fields of an instructi"),
    ]
    assert "(['output'])" in str(errors[1]) and "(['role'], role 'user')" in str(errors[2])
    # Corpora keep metadata beside the text (Cosmopedia its generation `prompt`): still documents.
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": "A story.", "prompt": "Write a story", "url": "u"}])
    assert check([str(corpus)]) == []
    assert read_records(corpus)[1][0].text == "A story."


def test_an_instruction_record_read_as_text_by_name_says_what_it_is(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Q", "input": "", "output": "A", "text": "Q A"}])
    with pytest.raises(DataFormatError, match=r"d.jsonl:1: a alpaca record \['instruction', 'input', 'output'\]: not"):
        read_records(path, format="text")
