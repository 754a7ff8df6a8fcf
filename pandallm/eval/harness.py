"""Benchmarks through lm-evaluation-harness (`lm_eval`), on any model pandallm loads, offline where the data is local.

A task is one of:
- a file of questions (`.json`, `.jsonl`, compressed, `.parquet`): each record `{"question", "choices", "answer"}`
  is a multiple-choice question (`answer`: the index of the right choice, or its text), scored by the harness's
  log-likelihood of each choice after the question (`acc`, `acc_norm`); a record `{"question", "answer"}` without
  choices is answered by greedy generation and scored by exact match (`exact_match`). One layout per file.
- a harness task YAML file (or a directory of them, with `include_path`), whose data the user has;
- a harness task name (`hellaswag`, `gsm8k`, ...): its data is downloaded by `datasets`, so it needs the network or a
  filled Hugging Face cache.

The question files become harness task configs here (`question_task`): the harness does the prompting, the requests,
the batching and the metrics, as for any of its own tasks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pandallm.data.records import iter_values
from pandallm.errors import ConfigError, DataFormatError

QUESTION_SUFFIXES = (".json", ".jsonl", ".gz", ".zst", ".parquet")
# What a question is prompted with, and what separates the prompt from the answer (the harness puts the target
# delimiter, a space, between them).
QUESTION_PROMPT = "Question: {{question}}\nAnswer:"


@dataclass(frozen=True)
class QuestionFile:
    path: Path
    multiple_choice: bool
    count: int


def task_name(path: Path) -> str:
    """A harness task name for a file: its stem, letters, digits and underscores only."""
    stem = path.name.split(".")[0]
    return "".join(c if c.isalnum() else "_" for c in stem) or "questions"


def _answer_index(record: dict[str, Any], path: Path, line: int) -> int:
    choices, answer = record["choices"], record["answer"]
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise DataFormatError(path, line, "choices", "a list of at least two non-empty strings")
    if isinstance(answer, bool) or not isinstance(answer, int | str):
        raise DataFormatError(path, line, "answer", "the index of the right choice, or its text")
    if isinstance(answer, str):
        if answer not in choices:
            raise DataFormatError(path, line, "answer", f"'{answer}' is not one of the choices")
        return choices.index(answer)
    if not 0 <= answer < len(choices):
        raise DataFormatError(path, line, "answer", f"{answer} is not an index of the {len(choices)} choices")
    return answer


def read_questions(path: Path) -> tuple[QuestionFile, list[dict[str, Any]]]:
    """The questions of a file, checked (file:line:field errors), as the task's documents: `question`, `answer`
    (an index for multiple choice, the text otherwise) and `choices`."""
    documents: list[dict[str, Any]] = []
    multiple_choice: bool | None = None
    for line, record in iter_values(path):
        if not isinstance(record, dict):
            raise DataFormatError(path, line, None, "a question is an object with 'question' and 'answer'")
        for name in ("question", "answer"):
            if name not in record:
                raise DataFormatError(path, line, name, "missing")
        if not isinstance(record["question"], str) or not record["question"].strip():
            raise DataFormatError(path, line, "question", "a non-empty string")
        has_choices = "choices" in record
        if multiple_choice is None:
            multiple_choice = has_choices
        elif has_choices != multiple_choice:
            first = "have choices" if multiple_choice else "have no choices"
            raise DataFormatError(path, line, None, f"the file's first questions {first}; one layout per file")
        if has_choices:
            documents.append(
                {
                    "question": record["question"],
                    "choices": record["choices"],
                    "answer": _answer_index(record, path, line),
                }
            )
        else:
            if not isinstance(record["answer"], str | int | float) or isinstance(record["answer"], bool):
                raise DataFormatError(path, line, "answer", "the answer's text")
            documents.append({"question": record["question"], "answer": str(record["answer"]), "choices": []})
    if not documents:
        raise DataFormatError(path, None, None, "holds no questions")
    return QuestionFile(path, bool(multiple_choice), len(documents)), documents


def question_task(path: Path, workdir: Path, max_new_tokens: int) -> dict[str, Any]:
    """A harness task config for a question file. The checked documents are written to `workdir` as JSON Lines (the
    harness reads them with `datasets`' json builder: no network)."""
    import json

    questions, documents = read_questions(path)
    data = workdir / f"{task_name(path)}.jsonl"
    data.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in documents), encoding="utf-8")
    config: dict[str, Any] = {
        "task": task_name(path),
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "doc_to_text": QUESTION_PROMPT,
        "doc_to_target": "{{answer}}",
    }
    if questions.multiple_choice:
        metrics = [{"metric": name, "aggregation": "mean", "higher_is_better": True} for name in ("acc", "acc_norm")]
        return config | {"output_type": "multiple_choice", "doc_to_choice": "{{choices}}", "metric_list": metrics}
    return config | {
        "output_type": "generate_until",
        # Greedy, up to the end of the line: an answer is one line.
        "generation_kwargs": {"until": ["\n"], "do_sample": False, "max_gen_toks": max_new_tokens},
        "metric_list": [
            {
                "metric": "exact_match",
                "aggregation": "mean",
                "higher_is_better": True,
                "ignore_case": True,
                "ignore_punctuation": False,
            }
        ],  # fmt: skip
        "filter_list": [{"name": "strip", "filter": [{"function": "remove_whitespace"}, {"function": "take_first"}]}],
    }


def is_question_file(spec: str) -> bool:
    path = Path(spec)
    return path.is_file() and path.name.lower().endswith(QUESTION_SUFFIXES)


def resolve_tasks(specs: list[str], workdir: Path, max_new_tokens: int) -> tuple[list[str | dict], list[str]]:
    """The harness tasks `specs` name (question files become configs) and the directories of task YAML files to
    include."""
    tasks: list[str | dict] = []
    include: list[str] = []
    for spec in specs:
        path = Path(spec)
        if is_question_file(spec):
            tasks.append(question_task(path, workdir, max_new_tokens))
        elif path.is_dir():
            include.append(str(path))  # its tasks are named in `specs` too, or all of it is given by name
        elif path.suffix in (".yaml", ".yml"):
            if not path.is_file():
                raise ConfigError(f"--tasks: no such task file '{spec}'")
            include.append(str(path.parent))
            tasks.append(_yaml_task_name(path))
        elif path.name.lower().endswith(QUESTION_SUFFIXES) and not path.exists():
            raise ConfigError(f"--tasks: no such question file '{spec}'")
        elif path.suffix or "/" in spec:
            raise ConfigError(
                f"--tasks: '{spec}' is not a question file (.json, .jsonl, .parquet), a task .yaml or a directory"
            )
        else:
            tasks.append(spec)
    if not tasks:
        raise ConfigError("--tasks: name at least one task, question file or task .yaml")
    return tasks, include


def _yaml_task_name(path: Path) -> str:
    import yaml

    try:
        # The harness's own loader reads `!function` tags; only the name is needed here, plain YAML reads it.
        text = "\n".join(line for line in path.read_text(encoding="utf-8").splitlines() if "!function" not in line)
        config = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"--tasks: {path}: not YAML ({' '.join(str(error).split())[:200]})") from error
    if not isinstance(config, dict) or not isinstance(config.get("task"), str):
        raise ConfigError(f"--tasks: {path}: a harness task file names its task (`task: NAME`)")
    return config["task"]
