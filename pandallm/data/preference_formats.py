"""Preference records: a prompt with a chosen and a rejected continuation (DPO, SimPO, ORPO, reward models), or with
one continuation judged desirable or not (KTO).

Every layout normalizes into a `Pair` (or a `Judged`) of conversations: the prompt's turns, then the turns of each
continuation, which end with an assistant reply. Training renders `prompt + continuation` with the same templates as
instruction tuning, so each side trains exactly the tokens the model would produce at inference after the prompt.

Layouts, told apart by their fields:
- `preference`: `{"prompt": str, "chosen": str, "rejected": str}` (Dahoas/synthetic-instruct-gptj-pairwise,
  LLMBox's default; extra fields such as `response` are ignored);
- `preference_chat`: `chosen` and `rejected` as message lists, with an optional shared `prompt` (a message list or a
  string); without one, the prompt is the messages the two lists begin with in common (TRL's implicit prompt);
- `hh_rlhf`: Anthropic's `{"chosen": str, "rejected": str}` transcripts of "\\n\\nHuman: ..." / "\\n\\nAssistant: ..."
  turns that share everything but their end: the shared turns are the prompt;
- `kto`: `{"prompt", "completion", "label": bool}` (strings or message lists): one continuation, desirable or not.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from pandallm.data.formats import ROLE_NAMES, Turn, _nonempty, _string
from pandallm.errors import DataFormatError

Conversation = tuple[Turn, ...]


@dataclass(frozen=True)
class Pair:
    """A prompt and two continuations of it; `chosen` is preferred to `rejected`."""

    prompt: Conversation
    chosen: Conversation
    rejected: Conversation


@dataclass(frozen=True)
class Judged:
    """A prompt and one continuation, `desirable` or not (KTO's unpaired data)."""

    prompt: Conversation
    completion: Conversation
    desirable: bool


def _messages(value: object, field: str, path: Path, line: int) -> list[Turn]:
    if not isinstance(value, list) or not value:
        raise DataFormatError(path, line, field, "expected a non-empty list of messages")
    turns = []
    for i, message in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(message, dict):
            raise DataFormatError(path, line, where, f"expected an object, got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLE_NAMES:
            raise DataFormatError(path, line, f"{where}.role", f"expected one of {sorted(ROLE_NAMES)}, got {role!r}")
        if not isinstance(content, str):
            raise DataFormatError(path, line, f"{where}.content", f"expected a string, got {type(content).__name__}")
        turns.append(Turn(ROLE_NAMES[role], content))
    return turns


def _prompt_turns(value: dict, field: str, path: Path, line: int) -> Conversation:
    """A prompt given as a string (one user turn) or as messages; it must hold a user turn."""
    prompt = value.get(field)
    if isinstance(prompt, list):
        turns = tuple(_messages(prompt, field, path, line))
    else:
        turns = (Turn("user", _nonempty(_string(value, field, path, line), field, path, line)),)
    if not any(turn.role == "user" and turn.content.strip() for turn in turns):
        raise DataFormatError(path, line, field, "has no user turn: nothing to reply to")
    return turns


def _continuation(turns: list[Turn] | tuple[Turn, ...], field: str, path: Path, line: int) -> Conversation:
    """The turns after the prompt: they start and end with a non-empty assistant reply."""
    if not turns:
        raise DataFormatError(path, line, field, "adds nothing to the prompt (it is the prompt itself)")
    if turns[0].role != "assistant" or turns[-1].role != "assistant":
        raise DataFormatError(path, line, field, "must continue the prompt with an assistant reply and end with one")
    if not turns[-1].content.strip():
        raise DataFormatError(path, line, field, "is empty")
    return tuple(turns)


def _reply(value: dict, field: str, path: Path, line: int) -> Conversation:
    """A continuation given as a string (one assistant reply) or as messages."""
    if isinstance(value.get(field), list):
        return _continuation(_messages(value[field], field, path, line), field, path, line)
    return (Turn("assistant", _nonempty(_string(value, field, path, line), field, path, line)),)


def parse_text_pair(value: dict, path: Path, line: int) -> Pair:
    return Pair(
        _prompt_turns(value, "prompt", path, line),
        _reply(value, "chosen", path, line),
        _reply(value, "rejected", path, line),
    )


def parse_chat_pair(value: dict, path: Path, line: int) -> Pair:
    chosen = _messages(value.get("chosen"), "chosen", path, line)
    rejected = _messages(value.get("rejected"), "rejected", path, line)
    if value.get("prompt") is not None:
        prompt = _prompt_turns(value, "prompt", path, line)
        return Pair(
            prompt, _continuation(chosen, "chosen", path, line), _continuation(rejected, "rejected", path, line)
        )
    shared = _common_turns(chosen, rejected)
    prompt = tuple(chosen[:shared])
    if not any(turn.role == "user" for turn in prompt):
        raise DataFormatError(
            path, line, "chosen", "chosen and rejected share no prompt (no user turn in common): give a 'prompt' field"
        )
    return Pair(
        prompt,
        _continuation(chosen[shared:], "chosen", path, line),
        _continuation(rejected[shared:], "rejected", path, line),
    )


def _common_turns(a: list[Turn], b: list[Turn]) -> int:
    """How many turns `a` and `b` begin with in common, up to the last user turn before they differ: a continuation
    starts with the assistant's reply."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    while n > 0 and a[n - 1].role == "assistant":  # an identical start of the reply is part of the reply
        n -= 1
    return n


# Anthropic's hh-rlhf transcripts: "\n\nHuman: ...\n\nAssistant: ..." repeated.
_HH_SPEAKER = re.compile(r"\n\n(Human|Assistant): ?")


def is_hh_transcript(text: object) -> bool:
    return isinstance(text, str) and text.startswith(("\n\nHuman:", "Human:")) and "\n\nAssistant:" in text


def _hh_turns(value: dict, field: str, path: Path, line: int) -> list[Turn]:
    text = _string(value, field, path, line)
    if not is_hh_transcript(text):
        raise DataFormatError(
            path, line, field, "expected an hh-rlhf transcript '\\n\\nHuman: ...\\n\\nAssistant: ...'"
        )
    pieces = _HH_SPEAKER.split(text if text.startswith("\n\n") else "\n\n" + text)
    return [
        Turn("user" if speaker == "Human" else "assistant", content.strip())
        for speaker, content in zip(pieces[1::2], pieces[2::2], strict=True)
    ]


def parse_hh_pair(value: dict, path: Path, line: int) -> Pair:
    chosen, rejected = _hh_turns(value, "chosen", path, line), _hh_turns(value, "rejected", path, line)
    shared = _common_turns(chosen, rejected)
    if shared == 0:
        raise DataFormatError(path, line, "chosen", "chosen and rejected share no prompt (no Human turn in common)")
    return Pair(
        tuple(chosen[:shared]),
        _continuation(chosen[shared:], "chosen", path, line),
        _continuation(rejected[shared:], "rejected", path, line),
    )


def parse_judged(value: dict, path: Path, line: int) -> Judged:
    label = value.get("label")
    if not isinstance(label, bool):
        raise DataFormatError(path, line, "label", f"expected true (desirable) or false (undesirable), got {label!r}")
    return Judged(_prompt_turns(value, "prompt", path, line), _reply(value, "completion", path, line), label)


def is_chat_pair(value: dict) -> bool:
    return isinstance(value.get("chosen"), list) and isinstance(value.get("rejected"), list)


def is_hh_pair(value: dict) -> bool:
    return "prompt" not in value and is_hh_transcript(value.get("chosen")) and isinstance(value.get("rejected"), str)


def is_text_pair(value: dict) -> bool:
    return all(value.get(field) is not None for field in ("prompt", "chosen", "rejected")) and not is_chat_pair(value)


def is_judged(value: dict) -> bool:
    return all(field in value for field in ("prompt", "completion", "label"))
