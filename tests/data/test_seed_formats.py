"""The seed systems' instruction layouts: OpenAssistant trees (both path policies), LIMA, Flan, Self-Instruct and
prompt / completion records become exactly the conversations they hold, with file:line:field errors."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest

from pandallm.data import PandaDataModule
from pandallm.data.formats import FORMATS, Turn
from pandallm.data.records import read_prompts, read_records
from pandallm.errors import DataFormatError
from tests.conftest import TOKENIZER_DIR, write_jsonl


def msg(role: str, text: str, rank: int | None = None, replies: list | None = None, **extra) -> dict:
    """An OpenAssistant message as the trees file writes it (fields pandallm does not read left out)."""
    return {
        "message_id": text,
        "role": role,
        "text": text,
        "rank": rank,
        "lang": "en",
        "replies": replies or [],
        **extra,
    }


# The root question has three replies: A1 (rank 1) is followed up twice, A0 (rank 0) is a leaf, and a deleted one.
TREE = {
    "message_tree_id": "t1",
    "tree_state": "ready_for_export",
    "prompt": msg(
        "prompter",
        "Q",
        replies=[
            msg(
                "assistant", "A1", 1, [msg("prompter", "Q2", None, [msg("assistant", "A2", 0)]), msg("prompter", "Q3")]
            ),
            msg("assistant", "A0", 0),
            msg("assistant", "spam", None, deleted=True),
        ],
    ),
}


def user(text: str) -> Turn:
    return Turn("user", text)


def bot(text: str) -> Turn:
    return Turn("assistant", text)


def test_an_oasst_tree_gives_one_conversation_per_path_to_each_leaf(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "2023-04-12_oasst_ready.trees.jsonl", [TREE, TREE])
    kind, records = read_records(path)
    assert kind == "instruction"
    # Q3's path ends with the prompter's question: it is cut after A1, its last reply. The deleted reply is left out.
    paths = [(user("Q"), bot("A1"), user("Q2"), bot("A2")), (user("Q"), bot("A1")), (user("Q"), bot("A0"))]
    assert [(r.line, r.format, r.turns) for r in records] == [(1, "oasst", p) for p in paths] + [
        (2, "oasst", p) for p in paths
    ]


def test_paths_equal_to_one_taken_already_are_left_out_in_the_order_first_seen(tmp_path: Path) -> None:
    # A1 is followed up by Q2 (then A2), Q3 and Q4: Q3's and Q4's paths are both cut to (Q, A1). A second A1 and A0,
    # word for word the first ones, give the same paths again.
    tree = json.loads(json.dumps(TREE))
    replies = tree["prompt"]["replies"]
    replies[0]["replies"].append(msg("prompter", "Q4"))
    replies += [
        msg("assistant", "A1", 2, [msg("prompter", "Q2", None, [msg("assistant", "A2", 0)])]),
        msg("assistant", "A0"),
    ]
    path = write_jsonl(tmp_path / "trees.jsonl", [tree])
    paths = [(user("Q"), bot("A1"), user("Q2"), bot("A2")), (user("Q"), bot("A1")), (user("Q"), bot("A0"))]
    assert [r.turns for r in read_records(path)[1]] == paths


def test_a_wide_tree_is_read_in_linear_time(monkeypatch) -> None:
    # Each path was looked for in the list of those taken: 20,000 replies to one prompt took 11 s (now 0.3 s), and
    # compared turns 10^8 times. Counted rather than timed: a path is compared with the few of equal hash only.
    compared = 0
    equal = Turn.__eq__

    def counted(self: Turn, other: object) -> bool:
        nonlocal compared
        compared += 1
        assert compared <= 100_000, "each path compared with every path taken before it"
        return equal(self, other)

    monkeypatch.setattr(Turn, "__eq__", counted)
    replies = [msg("assistant", f"A{i % 10_000}") for i in range(20_000)]  # every reply twice
    tree = {"message_tree_id": "wide", "prompt": msg("prompter", "Q", replies=replies)}
    conversations = FORMATS["oasst"].parse(tree, Path("trees.jsonl"), 1)
    monkeypatch.undo()
    assert list(conversations) == [(user("Q"), bot(f"A{i}")) for i in range(10_000)]


def test_the_best_path_policy_follows_the_best_ranked_reply_at_every_turn(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "trees.jsonl", [TREE])
    assert [r.turns for r in read_records(path, oasst_paths="best")[1]] == [(user("Q"), bot("A0"))]
    deeper = json.loads(json.dumps(TREE))
    deeper["prompt"]["replies"][1]["rank"] = 2  # now A1 is the best reply, and A2 the best after Q2
    path = write_jsonl(tmp_path / "deeper.jsonl", [deeper])
    assert [r.turns for r in read_records(path, format="oasst_best")[1]] == [
        (user("Q"), bot("A1"), user("Q2"), bot("A2"))
    ]


def test_the_data_module_reads_the_shipped_gzipped_trees_with_either_policy(tmp_path: Path) -> None:
    (tmp_path / "it").mkdir()
    (tmp_path / "it" / "2023-04-12_oasst_ready.trees.jsonl.gz").write_bytes(gzip.compress(json.dumps(TREE).encode()))

    def rows(policy: str) -> int:
        dm = PandaDataModule(
            tokenizer=str(TOKENIZER_DIR),
            instruction_tuning_data_dir=str(tmp_path / "it"),
            pretraining_data_dir=None,
            oasst_paths=policy,
            template="chatml",
            num_workers=0,
            max_seq_length=64,
            cache_dir=str(tmp_path / "cache"),
        )
        dm.prepare_data()
        dm.setup("fit")
        return len(dm.datasets["train"])

    assert (rows("all"), rows("best")) == (3, 1)  # a cache entry of its own for each policy


@pytest.mark.parametrize(
    ("tree", "field", "problem"),
    [
        ({"prompt": msg("bot", "Q")}, "prompt.role", "expected 'prompter' or 'assistant', got 'bot'"),
        ({"prompt": msg("prompter", "Q", replies=[msg("assistant", 3)])}, "prompt.replies[0].text", "expected a str"),
        ({"prompt": msg("prompter", "Q")}, "prompt", "the tree holds no assistant reply to train on"),
    ],
)
@pytest.mark.parametrize("policy", ["all", "best"])
def test_a_malformed_tree_names_the_message(tmp_path: Path, tree: dict, field: str, problem: str, policy) -> None:
    # Under `best` the error was "an oasst record in a file of oasst_best records", hiding the field at fault.
    path = write_jsonl(tmp_path / "trees.jsonl", [TREE, {"message_tree_id": "t2", **tree}])
    with pytest.raises(DataFormatError, match=re.escape(f"trees.jsonl:2: field '{field}': {problem}")):
        read_records(path, oasst_paths=policy)


ALPACA = {"instruction": "Say hi.", "input": "", "output": "Hi."}


@pytest.mark.parametrize(
    ("first", "format", "message"),
    [
        # A stray record of another layout after the first (which fixed the format): a bare KeyError before.
        (TREE, "auto", "mixed.jsonl:2: a alpaca record"),
        ({"instruction": "Say hi.", "instances": [{"input": "", "output": "Hi."}]}, "auto", "mixed.jsonl:2: a alpaca"),
        # A format named in the config that the file's records are not in.
        (ALPACA, "oasst", "mixed.jsonl:1: field 'prompt': missing (found fields ['input', 'instruction', 'output']"),
        (ALPACA, "oasst_best", "mixed.jsonl:1: field 'prompt': missing"),
        (ALPACA, "lima", "mixed.jsonl:1: field 'conversations': missing"),
        (ALPACA, "self_instruct", "mixed.jsonl:1: field 'instances': missing"),
        # A string where a list belongs: LIMA's was read a character per turn.
        (
            {"conversations": "Q?A."},
            "lima",
            "mixed.jsonl:1: field 'conversations': expected a list of strings, got str",
        ),
        ({"instruction": "Say hi.", "instances": 3}, "self_instruct", "field 'instances': expected a list of {input"),
        # A field of an instance, named inside it (it was "field 'output': missing (found fields ['instances', ...").
        (
            {"instruction": "Say hi.", "instances": [{"input": "", "output": "Hi."}, {"input": ""}]},
            "auto",
            "mixed.jsonl:1: field 'instances[1].output': missing (each instance has an output)",
        ),
        (
            {"instruction": "Say hi.", "instances": [{"input": 3, "output": "Hi."}]},
            "auto",
            "mixed.jsonl:1: field 'instances[0].input': expected a string, got int",
        ),
    ],
)
def test_a_record_not_of_the_files_seed_format_is_named(tmp_path: Path, first: dict, format: str, message: str) -> None:
    path = write_jsonl(tmp_path / "mixed.jsonl", [first, ALPACA])
    with pytest.raises(DataFormatError, match=re.escape(message)):
        read_records(path, format=format)


def test_lima_conversations_alternate_from_the_user(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "lima.jsonl", [{"conversations": ["Q", "A", "Q2", "A2"], "source": "stackexchange"}])
    (record,) = read_records(path)[1]
    assert (record.format, record.turns) == ("lima", (user("Q"), bot("A"), user("Q2"), bot("A2")))
    path = write_jsonl(tmp_path / "test.jsonl", [{"conversations": ["Q", "A", "Q2"]}])
    assert read_records(path)[1][0].turns == (user("Q"), bot("A"))  # a last question trains nothing
    (prompt,) = read_prompts(path)
    assert (prompt.turns, prompt.reference) == ((user("Q"), bot("A"), user("Q2")), None)
    path = write_jsonl(tmp_path / "bad.jsonl", [{"conversations": ["Q", "A"]}, {"conversations": ["Q", 7]}])
    with pytest.raises(DataFormatError, match=r"bad.jsonl:2: field 'conversations\[1\]': expected a string, got int"):
        read_records(path)
    path = write_jsonl(tmp_path / "noreply.jsonl", [{"conversations": ["Q"]}])
    with pytest.raises(DataFormatError, match=r"noreply.jsonl:1: field 'conversations': has no non-empty reply"):
        read_records(path)


def test_flan_inputs_and_targets(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "flan.jsonl", [{"inputs": "Translate: chat", "targets": "cat", "task": "wmt"}])
    (record,) = read_records(path)[1]
    assert (record.format, record.turns) == ("flan", (user("Translate: chat"), bot("cat")))
    (prompt,) = read_prompts(path)
    assert (prompt.turns, prompt.reference) == ((user("Translate: chat"),), "cat")
    path = write_jsonl(tmp_path / "bad.jsonl", [{"inputs": "x", "targets": "y"}, {"inputs": "x", "targets": ""}])
    with pytest.raises(DataFormatError, match=r"bad.jsonl:2: field 'targets': is empty"):
        read_records(path)


def test_a_self_instruct_task_gives_one_conversation_per_instance(tmp_path: Path) -> None:
    task = {
        "id": "seed_task_0",
        "instruction": "Is the number even?",
        "instances": [{"input": "4", "output": "Yes"}, {"input": "", "output": "Give me a number."}],
        "is_classification": True,
    }
    path = write_jsonl(tmp_path / "seed_tasks.jsonl", [task])
    records = read_records(path)[1]
    assert [(r.line, r.format, r.turns) for r in records] == [
        (1, "self_instruct", (user("Is the number even?\n\n4"), bot("Yes"))),
        (1, "self_instruct", (user("Is the number even?"), bot("Give me a number."))),
    ]
    task["instances"][1]["output"] = None
    with pytest.raises(DataFormatError, match=r"seed_tasks.jsonl:1: field 'instances\[1\].output': missing"):
        read_records(write_jsonl(path, [task]))


def test_prompt_completion_records_as_strings_or_messages(tmp_path: Path) -> None:
    records = [
        {"prompt": "The sky is", "completion": " blue."},
        {
            "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sky colour?"}],
            "completion": [{"role": "assistant", "content": "Blue."}],
        },
    ]
    read = read_records(write_jsonl(tmp_path / "pc.jsonl", records))[1]
    assert [(r.format, r.turns) for r in read] == [
        ("prompt_completion", (user("The sky is"), bot(" blue."))),
        ("prompt_completion", (Turn("system", "Be brief."), user("Sky colour?"), bot("Blue."))),
    ]
    (prompt, _) = read_prompts(tmp_path / "pc.jsonl")
    assert (prompt.turns, prompt.reference) == ((user("The sky is"),), " blue.")
    bad = write_jsonl(tmp_path / "bad.jsonl", [records[0], {"prompt": "x", "completion": [{"role": "user"}]}])
    with pytest.raises(DataFormatError, match=r"bad.jsonl:2: field 'completion\[0\].content': expected a string"):
        read_records(bad)


def test_a_prompt_completion_record_with_a_boolean_label_is_kto_not_a_demonstration(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "kto.jsonl", [{"prompt": "Hi", "completion": "Go away.", "label": False}])
    kind, (record,) = read_records(path)
    assert (kind, record.format, record.desirable) == ("unpaired", "kto", False)
    with pytest.raises(DataFormatError, match="an unpaired record"):
        read_records(path, "instruction")


def test_a_document_with_prompt_and_completion_is_never_read_as_text(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "The sky is blue.", "prompt": "The sky is", "completion": "b"}])
    assert read_records(path)[1][0].format == "prompt_completion"  # detected: a demonstration, its prompt masked
    for kind, fmt in (("pretraining", "auto"), (None, "text")):
        with pytest.raises(DataFormatError, match=r"d.jsonl:1: .*prompt_completion"):
            read_records(path, kind, format=fmt)


def test_a_record_of_several_conversations_is_refused_as_a_prompt(tmp_path: Path) -> None:
    for name, record in (
        ("trees.jsonl", TREE),
        ("tasks.jsonl", {"instruction": "Add.", "instances": [{"output": "2"}]}),
    ):
        with pytest.raises(DataFormatError, match=rf"{name}:1: this record holds several conversations"):
            read_prompts(write_jsonl(tmp_path / name, [record]))
