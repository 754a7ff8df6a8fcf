"""`pandallm lm-eval`: question files run through lm-evaluation-harness offline, and its scores are the ones a direct
computation with plain transformers gives."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from pandallm.cli import main
from pandallm.errors import ConfigError, DataFormatError
from pandallm.eval.harness import QUESTION_PROMPT, read_questions
from pandallm.model.presets import llama_tiny
from pandallm.tokenizer import load_tokenizer
from pandallm.tools.lm_eval import main as lm_eval
from tests.conftest import REPO, TOKENIZER_DIR, write_jsonl

pytest.importorskip("lm_eval", reason="needs lm-evaluation-harness (pip install 'pandallm[eval]')")

QUESTIONS = REPO / "dataset" / "eval" / "questions.jsonl"


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    """A tiny random LLaMA with the demo tokenizer, saved as a run's `hf/` export."""
    root = tmp_path_factory.mktemp("hf")
    tokenizer = load_tokenizer(str(TOKENIZER_DIR))
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**llama_tiny(), vocab_size=len(tokenizer))).save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


def prompt(question: str) -> str:
    return QUESTION_PROMPT.replace("{{question}}", question)


def continuation_logp(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context), the context's tokens as the tokenizer encodes it alone (BOS first) and the
    continuation's as the rest of the whole string's: the split the harness documents for loglikelihood requests."""
    whole = tokenizer(context + continuation).input_ids
    context_ids = tokenizer(context).input_ids
    ids = torch.tensor([whole])
    with torch.no_grad():
        logps = model(ids).logits.log_softmax(-1)[0]
    return sum(logps[i - 1, whole[i]].item() for i in range(len(context_ids), len(whole)))


def test_multiple_choice_accuracy_equals_the_argmax_of_each_choices_likelihood(export: Path, tmp_path: Path) -> None:
    output = tmp_path / "results.json"
    results = lm_eval(["--model", str(export), "--tasks", f"[{QUESTIONS}]", "--output", str(output)])
    _, documents = read_questions(QUESTIONS)
    model = LlamaForCausalLM.from_pretrained(export).eval()
    tokenizer = AutoTokenizer.from_pretrained(export)
    right = 0
    samples = {s["doc_id"]: s for s in json.loads(output.read_text())["samples"]["questions"]}
    for doc_id, doc in enumerate(documents):
        logps = [continuation_logp(model, tokenizer, prompt(doc["question"]), " " + c) for c in doc["choices"]]
        # The harness's per-choice log-likelihoods are ours, and so is its choice.
        theirs = [float(r[0][0]) for r in samples[doc_id]["resps"]]
        assert theirs == pytest.approx(logps, abs=1e-4)
        right += max(range(len(logps)), key=logps.__getitem__) == doc["answer"]
    assert results["results"]["questions"]["acc,none"] == pytest.approx(right / len(documents))


def test_short_answers_are_scored_by_exact_match_of_the_greedy_answer(export: Path, tmp_path: Path) -> None:
    model = LlamaForCausalLM.from_pretrained(export).eval()
    tokenizer = AutoTokenizer.from_pretrained(export)
    questions = ["What is 3 + 4?", "How many legs does a spider have?"]

    def greedy(question: str) -> str:
        ids = tokenizer(prompt(question), return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=8, do_sample=False, num_beams=1, pad_token_id=tokenizer.pad_token_id)
        return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).split("\n")[0].strip()

    # The first answer is what the model says: right; the second is not.
    answers = [greedy(questions[0]), "not the answer " + greedy(questions[1])]
    assert answers[0]  # a random model still says something on that line
    path = write_jsonl(
        tmp_path / "short.jsonl", [{"question": q, "answer": a} for q, a in zip(questions, answers, strict=True)]
    )
    results = lm_eval(["--model", str(export), "--tasks", f"[{path}]", "--max_new_tokens", "8"])
    assert results["results"]["short"]["exact_match,strip"] == pytest.approx(0.5)


def test_bad_questions_and_unknown_tasks_are_named(export: Path, tmp_path: Path) -> None:
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "a?", "choices": ["x", "y"], "answer": 2}])
    with pytest.raises(DataFormatError, match=r"bad.jsonl:1: field 'answer': 2 is not an index of the 2 choices"):
        main(["lm-eval", "--model", str(export), "--tasks", f"[{bad}]"])
    layouts = [{"question": "a?", "answer": "x"}, {"question": "b?", "choices": ["x", "y"], "answer": 0}]
    mixed = write_jsonl(tmp_path / "mixed.jsonl", layouts)
    with pytest.raises(DataFormatError, match=r"mixed.jsonl:2: .*one layout per file"):
        main(["lm-eval", "--model", str(export), "--tasks", f"[{mixed}]"])
    with pytest.raises(ConfigError, match=r"no harness task named 'no_such_task'"):
        main(["lm-eval", "--model", str(export), "--tasks", "[no_such_task]"])
    with pytest.raises(ConfigError, match=r"no such question file 'missing.jsonl'"):
        main(["lm-eval", "--model", str(export), "--tasks", "[missing.jsonl]"])
    with pytest.raises(ConfigError, match=r"'notes.txt' is not a question file"):
        main(["lm-eval", "--model", str(export), "--tasks", "[notes.txt]"])


def test_a_harness_task_file_runs_from_its_path(export: Path, tmp_path: Path) -> None:
    (tmp_path / "tasks").mkdir()
    task = tmp_path / "tasks" / "arith.yaml"
    task.write_text(
        "task: my_arith\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {QUESTIONS}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n"
    )
    # --limit 1: the first question alone (the harness takes `answer` as the index it is there, not a text).
    results = lm_eval(["--model", str(export), "--tasks", f"[{task}]", "--limit", "1"])
    assert set(results["results"]) == {"my_arith"} and 0 <= results["results"]["my_arith"]["acc,none"] <= 1
    assert results["n-samples"]["my_arith"]["effective"] == 1
