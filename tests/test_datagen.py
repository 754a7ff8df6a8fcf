"""`pandallm self-instruct` and `pandallm evol-instruct`: the papers' filters on fixed strings, the parsing of a
model's answer, exact resume, and both commands end to end with a tiny local model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pandallm.cli import main as pandallm
from pandallm.data.records import read_records
from pandallm.errors import ConfigError, DataFormatError
from pandallm.tools import datagen
from pandallm.tools.datagen import ResumableOutput, Similarity, Task, read_tasks
from pandallm.tools.evol_instruct import elimination, evolution_prompt, evolved_text
from pandallm.tools.self_instruct import build_prompt, parse_tasks, rejection
from tests.conftest import TOKENIZER_DIR, write_jsonl

SEEDS = [
    {
        "id": "seed_task_0",
        "instruction": "Give three tips for staying healthy.",
        "instances": [{"input": "", "output": "Eat well, sleep enough and move every day."}],
    },
    {
        "id": "seed_task_1",
        "instruction": "Classify the sentiment of the sentence.",
        "instances": [{"input": "I love this film.", "output": "Positive"}],
    },
    {"instruction": "把这句话翻译成英文。", "input": "今天天气很好。", "output": "The weather is nice today."},
]


@pytest.mark.parametrize(
    ("instruction", "output", "reason"),
    [
        ("Describe the picture of a cat on the table.", "A cat.", "keyword 'picture'"),
        ("Draw a flowchart of the sorting process.", "...", "keyword 'draw'"),
        ("Write a program that sorts a list of numbers.", "def f(): ...", "'write a program'"),
        ("Sort them.", "Done.", "length (2 words"),
        ("- List three fruits that are red.", "Apple, cherry, strawberry.", "starts with punctuation"),
        ("List three fruits that are red in colour.", "Apple.", "ROUGE-L"),
        ("列出三种红色的水果吧。", "苹果、樱桃、草莓。", "ROUGE-L"),  # characters are tokens: Chinese is compared too
        ("Name the largest planet of the solar system.", " ", "no output"),
        ("Name the largest planet of the solar system.", "Jupiter.", None),
        ("用一句话解释什么是光合作用。", "植物用阳光把二氧化碳和水变成糖。", None),
    ],
)
def test_self_instruct_filters(instruction: str, output: str, reason: str | None) -> None:
    pool = Similarity(["List three fruits that are red.", "列出三种红色的水果。"])
    found = rejection(Task(instruction, "", output), pool, threshold=0.7)
    assert found == reason if reason is None else found.startswith(reason)


def test_the_papers_english_only_rule_is_an_option() -> None:
    task = Task("用一句话解释什么是光合作用。", "", "植物用阳光制造养分。")
    assert rejection(task, Similarity(), 0.7, english_only=True) == "starts with a non-ASCII character"


def test_a_continuation_is_parsed_into_tasks_and_a_cut_last_one_is_dropped() -> None:
    prompt = build_prompt([Task("Give three tips for staying healthy.", "", "Eat well.")])
    assert prompt.endswith("###\n1. Instruction: Give three tips for staying healthy.\n1. Input:\n<noinput>\n"
                           "1. Output:\nEat well.\n###\n2. Instruction:")  # fmt: skip
    response = (
        " Summarize the paragraph in one sentence.\n2. Input:\nThe river floods every spring.\n2. Output:\n"
        "The river floods yearly.\n###\n3. Instruction: Name a prime number larger than ten.\n3. Input:\n<noinput>\n"
        "3. Output:\nEleven.\n###\n4. Instruction: Explain why the sky"
    )
    tasks = parse_tasks(response, 2, finished=False)
    assert tasks == [
        Task("Summarize the paragraph in one sentence.", "The river floods every spring.", "The river floods yearly."),
        Task("Name a prime number larger than ten.", "", "Eleven."),
    ]
    complete = response.replace("Explain why the sky", "Add 2 and 2.\n4. Input:\n<noinput>\n4. Output:\n4")
    assert parse_tasks(complete, 2, finished=True)[-1] == Task("Add 2 and 2.", "", "4")


@pytest.mark.parametrize(
    ("evolved", "reply", "reason"),
    [
        ("give three tips for  staying healthy.", "Eat.", "no information gain (the same"),
        ("Give three tips for staying healthy today.", "Eat well.", "no information gain (ROUGE-L"),
        ("Rewrite the given prompt with more detail about sleep.", "Sleep.", "copies the evolving prompt's words"),
        ("Give three tips for staying healthy while working night shifts.", "Sorry, I cannot help.", "the reply is an"),
        ("Give three tips for staying healthy while working night shifts.", "Yes. No, the ... !", "the reply is only"),
        ("Give three tips for staying healthy while working night shifts.", "Keep a fixed sleep window.", None),
    ],
)
def test_evol_instruct_elimination_rules(evolved: str, reply: str, reason: str | None) -> None:
    found = elimination("Give three tips for staying healthy.", evolved, reply, Similarity())
    assert found == reason if reason is None else found.startswith(reason)


def test_an_evolution_prompt_and_its_answer() -> None:
    prompt = evolution_prompt("constraints", "Explain gravity.")
    assert "add one more constraint or requirement." in prompt and prompt.endswith(
        "Explain gravity.\n\n#Rewritten Prompt#:\n"
    )
    assert "rarer" in evolution_prompt("breadth", "Explain gravity.")
    assert evolved_text("Explain gravity to a child, in two sentences.\n\n#Explanation#: it is harder") == (
        "Explain gravity to a child, in two sentences."
    )
    assert (
        evolved_text("#Rewritten Prompt#: Explain gravity using one example.") == "Explain gravity using one example."
    )


def test_seed_tasks_in_both_layouts_and_a_bad_one_named(tmp_path: Path) -> None:
    tasks = read_tasks(str(write_jsonl(tmp_path / "seed_tasks.jsonl", SEEDS)))
    assert tasks[1] == Task("Classify the sentiment of the sentence.", "I love this film.", "Positive")
    assert tasks[2] == Task("把这句话翻译成英文。", "今天天气很好。", "The weather is nice today.")
    with pytest.raises(DataFormatError, match=r"bad.jsonl:2: field 'instruction': expected a task"):
        read_tasks(str(write_jsonl(tmp_path / "bad.jsonl", [SEEDS[0], {"prompt": "x"}])))
    # A list where a string belongs was shown to the model as its Python repr.
    listed = {"instruction": "Sort these.", "instances": [{"input": [3, 1, 2], "output": "1 2 3"}]}
    with pytest.raises(
        DataFormatError, match=r"list.jsonl:1: field 'instances\[0\].input': expected a string, got list"
    ):
        read_tasks(str(write_jsonl(tmp_path / "list.jsonl", [listed])))


def test_a_stop_between_the_records_and_the_state_is_resumed_exactly(tmp_path: Path) -> None:
    store = ResumableOutput(str(tmp_path / "out.jsonl"))
    store.append(0, [{"instruction": "a"}, {"instruction": "b"}])
    store.append(1, [])
    with store.path.open("a") as f:  # request 2's records written, the state not yet; then a torn line
        f.write(json.dumps({"instruction": "c", "request": 2}) + '\n{"instruction": "d", "req')
    records, done = store.load()
    assert (done, [r["instruction"] for r in records]) == (2, ["a", "b"])
    assert store.path.read_text().count("\n") == 2  # cut back to the requests the state counts


def test_an_output_that_is_not_a_generators_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", SEEDS)  # the user's data (or the seed tasks) given as --output
    before = data.read_bytes()
    with pytest.raises(ConfigError, match=r"train.jsonl' exists and is not the output of an earlier run"):
        ResumableOutput(str(data)).load()
    data.with_name("train.jsonl.state.json").write_text('{"requests_done": 1}')  # a state beside foreign lines
    with pytest.raises(DataFormatError, match=r"train.jsonl:1: field 'request': not a record of this generator"):
        ResumableOutput(str(data)).load()
    assert data.read_bytes() == before
    with pytest.raises(ConfigError, match="is a directory"):
        ResumableOutput(str(tmp_path)).load()
    (tmp_path / "taken").write_text("a file")  # where the output's directory would be created
    with pytest.raises(ConfigError, match=r"--output's directory '.*taken/sub': cannot be created"):
        ResumableOutput(str(tmp_path / "taken" / "sub" / "out.jsonl")).load()
    store = ResumableOutput(str(tmp_path / "out.jsonl"))
    store.append(0, [{"instruction": "a"}])
    store.state.write_text("{")  # a damaged state: named, not a bare JSONDecodeError
    with pytest.raises(ConfigError, match=r"out.jsonl.state.json: not a state file"):
        store.load()


def test_a_stop_before_the_first_state_update_is_resumed(tmp_path: Path) -> None:
    store = ResumableOutput(str(tmp_path / "out.jsonl"))
    store.append(0, [{"instruction": "a"}])
    store.state.write_text('{"requests_done": 0}')  # as a stop after request 0's records, before its state, leaves it
    assert store.load() == ([], 0)
    assert store.path.read_text() == ""


def canned(prompts: list[str], seed: int, special: bool = True) -> list[tuple[str, bool]]:
    """A model that answers every self-instruct request with two new tasks, named by the request's seed."""
    topic = TOPICS[seed % 1_000_003 % len(TOPICS)]
    return [
        (
            f" Explain {topic}.\n4. Input:\n<noinput>\n4. Output:\nIt is well understood.\n###\n"
            f"5. Instruction: Describe the picture of {topic}.\n5. Input:\n<noinput>\n5. Output:\nNo.\n###",
            True,
        )
    ]


TOPICS = ["how ocean tides rise", "why volcanoes erupt", "what makes rainbows appear", "where comets come from"]


def test_self_instruct_keeps_filtered_tasks_resumes_and_writes_a_training_file(tmp_path: Path, monkeypatch) -> None:
    seeds = write_jsonl(tmp_path / "seed_tasks.jsonl", SEEDS)
    monkeypatch.setattr(datagen.Generator, "complete", lambda self, *a, **k: canned(*a, **k))
    common = ["--model=llama-tiny", f"--tokenizer={TOKENIZER_DIR}", f"--seed_tasks={seeds}", "--num_instructions=4"]
    straight = tmp_path / "straight.jsonl"
    pandallm(["self-instruct", *common, f"--output={straight}"])
    resumed = tmp_path / "resumed.jsonl"
    pandallm(["self-instruct", *common, f"--output={resumed}", "--max_requests=1"])  # stopped after one request
    pandallm(["self-instruct", *common, f"--output={resumed}"])
    assert resumed.read_text() == straight.read_text()
    kind, records = read_records(straight)  # trains as it is: Alpaca records
    assert (kind, {r.format for r in records}) == ("instruction", {"alpaca"})
    instructions = [r.turns[0].content for r in records]
    # The picture tasks are filtered out; request n's first task, on topic n, is new each time.
    assert instructions == [f"Explain {topic}." for topic in TOPICS]


def test_a_resume_with_other_settings_is_refused(tmp_path: Path, monkeypatch) -> None:
    # Request N's prompt and sampling follow from the settings: resumed with another --seed (or other seed tasks),
    # the file silently mixed the requests of two different runs.
    seeds = write_jsonl(tmp_path / "seed_tasks.jsonl", SEEDS)
    monkeypatch.setattr(datagen.Generator, "complete", lambda self, *a, **k: canned(*a, **k))
    out = tmp_path / "out.jsonl"
    common = ["--model=llama-tiny", f"--tokenizer={TOKENIZER_DIR}", f"--output={out}", "--num_instructions=4"]
    pandallm(["self-instruct", *common, f"--seed_tasks={seeds}", "--max_requests=1"])
    with pytest.raises(ConfigError, match=r"out.jsonl' was written with --seed 42; resuming with other settings"):
        pandallm(["self-instruct", *common, f"--seed_tasks={seeds}", "--seed=7"])
    other = write_jsonl(tmp_path / "other.jsonl", SEEDS[:2])
    with pytest.raises(ConfigError, match=r"was written with --seed_tasks '[0-9a-f]{16}'"):
        pandallm(["self-instruct", *common, f"--seed_tasks={other}"])
    moved = tmp_path / "moved.jsonl"
    moved.write_bytes(seeds.read_bytes())  # the same tasks elsewhere, and more instructions asked for: resumed
    pandallm(["self-instruct", *common, f"--seed_tasks={moved}", "--num_instructions=5"])
    # The tokenizer by another spelling of its path is the same one: resumed, not refused.
    common[1] = f"--tokenizer={TOKENIZER_DIR}/../{TOKENIZER_DIR.name}"
    pandallm(["self-instruct", *common, f"--seed_tasks={seeds}", "--num_instructions=6"])


def test_self_instruct_and_evol_instruct_run_end_to_end_with_a_tiny_model(tmp_path: Path) -> None:
    seeds = write_jsonl(tmp_path / "seed_tasks.jsonl", SEEDS[:2])
    model = ["--model=llama-tiny", f"--tokenizer={TOKENIZER_DIR}", f"--seed_tasks={seeds}", "--max_new_tokens=8"]
    out = tmp_path / "si.jsonl"
    pandallm(["self-instruct", *model, f"--output={out}", "--max_requests=2"])
    assert json.loads(out.with_name("si.jsonl.state.json").read_text())["requests_done"] == 2
    out = tmp_path / "evol.jsonl"
    pandallm(["evol-instruct", *model, f"--output={out}", "--rounds=2", "--max_requests=1"])
    pandallm(["evol-instruct", *model, f"--output={out}", "--rounds=1"])  # resumed: the one request left
    assert json.loads(out.with_name("evol.jsonl.state.json").read_text())["requests_done"] == 2
    with pytest.raises(ConfigError, match="--rounds 0: at least 1"):
        pandallm(["evol-instruct", *model, f"--output={out}", "--rounds=0"])


def test_evol_instruct_evolves_the_evolved_instructions_round_after_round(tmp_path: Path, monkeypatch) -> None:
    def model(self, prompts: list[str], seed: int, special: bool = True) -> list[tuple[str, bool]]:
        if "#The Given Prompt#" in prompts[0]:
            given = prompts[0].split("#The Given Prompt#:\n")[1].split("\n\n#")[0]
            return [(f"{given} Answer in {seed % 1_000_003 + 2} numbered steps.", True)]
        return [("1. Plan the work. 2. Do it. 3. Check it.", True)]

    monkeypatch.setattr(datagen.Generator, "complete", model)
    seeds = write_jsonl(tmp_path / "seed_tasks.jsonl", SEEDS[:2])
    out = tmp_path / "evol.jsonl"
    pandallm(["evol-instruct", "--model=llama-tiny", f"--tokenizer={TOKENIZER_DIR}", f"--seed_tasks={seeds}",
              f"--output={out}", "--rounds=2"])  # fmt: skip
    kind, records = read_records(out)
    assert (kind, len(records)) == ("instruction", 4)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["round"], r["instruction"]) for r in lines] == [
        (1, "Give three tips for staying healthy. Answer in 2 numbered steps."),
        (1, "Classify the sentiment of the sentence.\n\nI love this film. Answer in 3 numbered steps."),
        (2, "Give three tips for staying healthy. Answer in 2 numbered steps. Answer in 4 numbered steps."),
        (2, "Classify the sentiment of the sentence.\n\nI love this film. Answer in 3 numbered steps. Answer in 5 "
            "numbered steps."),
    ]  # fmt: skip
