"""What `pandallm self-instruct` and `pandallm evol-instruct` share: a local model that completes prompts, the seed
tasks, the ROUGE-L similarity of the papers' filters, and an output file that a stopped run resumes.

Nothing leaves the machine: the model is one pandallm loads (a checkpoint directory, a GGUF file, a preset), and
generation is transformers' `generate` on it.

Resuming. Request i (one prompt to the model and what is kept of its answer) draws its examples and its sampling
from `seed` and i alone, so a resumed run makes the requests the stopped one would have made. The output is JSON
Lines of Alpaca records (`{"instruction", "input", "output"}`, with `request` and the generator's own fields), which
`pandallm fit` trains on directly; the requests done are in `<output>.state.json`, replaced in one step after each
request's records are appended and synced. A record of a request the state does not count (a stop between the two
writes), and a torn last line, are cut off on resume, and that request is made again. The state is written before
the first record, so an existing `--output` without one is not this generator's (a data file, the seed tasks) and is
refused, never cut.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from pandallm.errors import ConfigError, DataFormatError, DatasetError

# Latin words and numbers are tokens; each CJK character is one (rouge-score's default tokenizer drops them, and
# two Chinese instructions would always score 0).
_TOKEN = re.compile(r"[a-z0-9]+|[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]")


class _Tokens:
    def tokenize(self, text: str) -> list[str]:
        return _TOKEN.findall(text.lower())


def rouge_scorer():
    try:
        from rouge_score import rouge_scorer as rouge
    except ImportError as e:
        raise ConfigError("the ROUGE-L filter needs the rouge-score package: pip install 'pandallm[datagen]'") from e
    return rouge.RougeScorer(["rougeL"], tokenizer=_Tokens())


class Similarity:
    """ROUGE-L F1 of a text against a pool of texts (Self-Instruct's novelty filter), with rouge-score."""

    def __init__(self, pool: Iterable[str] = ()) -> None:
        self.scorer = rouge_scorer()
        self.pool = list(pool)

    def closest(self, text: str) -> tuple[float, str | None]:
        best = (0.0, None)
        for other in self.pool:
            score = self.scorer.score(other, text)["rougeL"].fmeasure
            if score > best[0]:
                best = (score, other)
        return best

    def add(self, text: str) -> None:
        self.pool.append(text)


def word_count(text: str) -> int:
    return len(_Tokens().tokenize(text))


@dataclass(frozen=True)
class Task:
    """A seed or generated task: an instruction, an optional input, an output."""

    instruction: str
    input: str = ""
    output: str = ""

    def record(self, **extra) -> dict:
        return {"instruction": self.instruction, "input": self.input, "output": self.output, **extra}


def located(name: str | None) -> str | None:
    """A model or tokenizer as the resume check compares it: a local path resolved (`./m` and `m` are one model),
    a preset or hub id as given."""
    return str(Path(name).resolve()) if name is not None and Path(name).exists() else name


def tasks_digest(tasks: list[Task]) -> str:
    """The seed tasks' content, for the resume check: the same tasks moved to another path still resume."""
    text = json.dumps([[t.instruction, t.input, t.output] for t in tasks], ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_tasks(path: str, option: str = "--seed_tasks") -> list[Task]:
    """Self-Instruct's `seed_tasks.jsonl` (`instruction`, `instances: [{input, output}]`: the first instance) or
    Alpaca records (`instruction`, `input`, `output`), in any file pandallm reads."""
    from pandallm.data.records import iter_values

    source = Path(path)
    if not source.exists():
        raise DatasetError(f"{option} '{path}': no such file")
    tasks = []
    for line, value in iter_values(source):
        if not isinstance(value, dict) or not isinstance(value.get("instruction"), str):
            raise DataFormatError(source, line, "instruction", "expected a task with an 'instruction' string")
        instances = value.get("instances")
        first = instances[0] if isinstance(instances, list) and instances and isinstance(instances[0], dict) else value
        where = "instances[0]." if first is not value else ""
        fields = []
        for field in ("input", "output"):
            # `str()` of a list or an object would show the model its Python repr as a task's text.
            text = first.get(field)
            if text is not None and not isinstance(text, str):
                raise DataFormatError(source, line, where + field, f"expected a string, got {type(text).__name__}")
            fields.append(text or "")
        tasks.append(Task(value["instruction"].strip(), *fields))
    if not tasks:
        raise DatasetError(f"{option} '{path}': holds no tasks")
    return tasks


class Generator:
    """Completions of text prompts by a model pandallm loads, sampled from a seed per call."""

    def __init__(
        self, model: str, tokenizer: str | None, max_new_tokens: int, temperature: float, top_p: float
    ) -> None:
        from pandallm.model.build import build_model, is_preset
        from pandallm.tokenizer import load_tokenizer

        if is_preset(model) and tokenizer is None:
            raise ConfigError(f"--model '{model}' is a preset: give --tokenizer too")
        self.tokenizer = load_tokenizer(tokenizer or model)
        self.model = build_model(model, len(self.tokenizer)).eval()
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p

    @torch.no_grad()
    def complete(self, prompts: list[str], seed: int, special: bool = True) -> list[tuple[str, bool]]:
        """Each prompt's continuation, and whether the model ended it (EOS) rather than the token limit. `special`:
        the tokenizer adds its special tokens (BOS); a chat template's text holds its own."""
        torch.manual_seed(seed)
        tokenizer = self.tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        encoded = [tokenizer(p, add_special_tokens=special)["input_ids"] for p in prompts]
        width = max(map(len, encoded))
        ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded])  # left padding: generation continues
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
        sampling = {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p}
        out = self.model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=self.max_new_tokens,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
            **(sampling if self.temperature > 0 else {"do_sample": False}),
        )[:, width:]
        texts = tokenizer.batch_decode(out, skip_special_tokens=True)
        return [(text, bool((row == tokenizer.eos_token_id).any())) for text, row in zip(texts, out, strict=True)]

    def reply(self, instruction: str, seed: int) -> str:
        """The model's answer to an instruction: through the tokenizer's chat template where it has one (an
        instruction-tuned model), else in Alpaca's layout."""
        templated = bool(self.tokenizer.chat_template)
        if templated:
            messages = [{"role": "user", "content": instruction}]
            prompt = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            prompt = f"### Instruction:\n{instruction}\n\n### Response:\n"
        ((text, _),) = self.complete([prompt], seed, special=not templated)
        return text.split("### Instruction:")[0].strip()


class ResumableOutput:
    """The output JSON Lines file and its state (see the module docstring)."""

    def __init__(self, path: str, settings: dict | None = None) -> None:
        """`settings`: what decides each request's prompt and sampling (JSON values). They are kept in the state, and
        a resume with other ones is refused: its requests would not be the ones the stopped run would have made, and
        the file would mix two runs without a word."""
        self.path = Path(path)
        self.state = self.path.with_name(self.path.name + ".state.json")
        self.settings = json.loads(json.dumps(settings or {}))  # as read back: tuples become lists

    def load(self) -> tuple[list[dict], int]:
        """The records of the requests done, and their number; what a stop left beyond them is cut off.

        Only a file this class wrote is cut: one without its state file (the user's data, the seed tasks given
        as `--output` too) or with lines that are not its records is refused, never truncated."""
        if self.path.is_dir():
            raise ConfigError(f"--output '{self.path}' is a directory: give the JSON Lines file to write")
        from pandallm.writable import check_writable

        # Before the model is loaded and the first request made: a read-only place was a bare PermissionError then.
        check_writable(self.path.parent, "--output's directory")
        done = self._requests_done()
        if not self.path.is_file():
            return [], 0
        if not self.state.is_file() and self.path.stat().st_size > 0:
            raise ConfigError(
                f"--output '{self.path}' exists and is not the output of an earlier run (it has no "
                f"{self.state.name}, which a run writes beside it): give a new file, or move this one away"
            )
        kept, size = [], 0
        with self.path.open("rb") as f:
            for line, raw in enumerate(f, start=1):
                try:
                    record = json.loads(raw)
                except json.JSONDecodeError:
                    if raw.endswith(b"\n"):  # a whole line that is not JSON: not a torn write of ours
                        raise DataFormatError(self.path, line, None, "not a record of this generator") from None
                    break  # a torn last line
                if not isinstance(record, dict) or not isinstance(record.get("request"), int):
                    raise DataFormatError(self.path, line, "request", "not a record of this generator (no request)")
                if not raw.endswith(b"\n") or record["request"] >= done:
                    break
                kept.append(record)
                size += len(raw)
        if size != self.path.stat().st_size:
            with self.path.open("r+b") as f:
                f.truncate(size)
        return kept, done

    def _requests_done(self) -> int:
        if not self.state.is_file():
            return 0
        try:
            state = json.loads(self.state.read_text())
            done = state["requests_done"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise ConfigError(f"{self.state}: not a state file of this generator ({e}): remove it and --output") from e
        if not isinstance(done, int) or done < 0:
            raise ConfigError(f"{self.state}: requests_done is {done!r}, not a count of requests")
        recorded = state.get("settings", self.settings)
        changed = sorted(key for key in {*recorded, *self.settings} if recorded.get(key) != self.settings.get(key))
        if changed:
            was = ", ".join(f"--{key} {recorded.get(key)!r}" for key in changed)
            raise ConfigError(
                f"--output '{self.path}' was written with {was}; resuming with other settings would mix two runs in "
                "one file: give them as they were, or a new --output"
            )
        return done

    def append(self, request: int, records: list[dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.state.is_file():
            # The state comes first, so that an output without one is known not to be this generator's (`load`).
            self._write_state(request)
        lines = "".join(json.dumps({**r, "request": request}, ensure_ascii=False) + "\n" for r in records)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(lines)
            f.flush()
            os.fsync(f.fileno())
        self._write_state(request + 1)

    def _write_state(self, requests_done: int) -> None:
        from pandallm.checkpoint.atomic import swap_in

        tmp = self.state.with_name(self.state.name + ".tmp")
        tmp.write_text(json.dumps({"requests_done": requests_done, "settings": self.settings}))
        swap_in(tmp, self.state)
