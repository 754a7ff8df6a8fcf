"""Record formats: which fields a JSON record has, and how it becomes a conversation or a document.

Every format normalizes into one of two shapes, so that the rest of the pipeline has one path for each:

- a conversation, a tuple of `Turn(role, content)` with roles `system` / `user` / `assistant` (instruction tuning:
  every assistant turn is trained, every other turn is masked);
- a document, one text (pretraining).

Formats are told apart by their fields, never by a file's name. `detect` picks the format of one record; a file
is read in the format of its first record, and a later record of another format is an error (see `records.py`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pandallm.errors import DataFormatError

RecordKind = Literal["instruction", "pretraining"]
Role = Literal["system", "user", "assistant"]

# Names a `from` (ShareGPT) or `role` (OpenAI) value may take, by the role it means. ShareGPT dumps use
# human/gpt; Belle's train_3.5M_CN uses human/assistant; others mix in user/assistant.
ROLE_NAMES: dict[str, Role] = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
}


@dataclass(frozen=True)
class Turn:
    role: Role
    content: str


@dataclass(frozen=True)
class Format:
    """One record format: its name, the kind of record it gives, the fields that identify it, and its parser."""

    name: str
    kind: RecordKind
    fields: tuple[str, ...]  # as documented; the ones `matches` looks for
    matches: Callable[[dict], bool]
    # value, path, line -> a conversation (instruction formats) or a document text (pretraining formats)
    parse: Callable[[dict, Path, int], tuple[Turn, ...] | str]


def _string(value: dict, field: str, path: Path, line: int, *, required: bool = True) -> str:
    # null is missing: saved datasets and pandas exports write null where a record has no such field.
    if value.get(field) is None:
        if not required:
            return ""
        raise DataFormatError(path, line, field, "missing")
    if not isinstance(value[field], str):
        raise DataFormatError(path, line, field, f"expected a string, got {type(value[field]).__name__}")
    return value[field]


def _nonempty(text: str, field: str, path: Path, line: int) -> str:
    # A record with nothing to learn from is almost always a bug upstream (an export that lost a column).
    if not text.strip():
        raise DataFormatError(path, line, field, "is empty")
    return text


def _join(instruction: str, extra: str) -> str:
    """A user turn from an instruction and its optional input / context, as Alpaca joins them."""
    return f"{instruction}\n\n{extra}" if extra.strip() else instruction


def _single_turn(user: str, assistant: str) -> tuple[Turn, ...]:
    return (Turn("user", user), Turn("assistant", assistant))


def _parse_pandallm(value: dict, path: Path, line: int) -> tuple[Turn, ...]:
    prompt = _string(value, "input", path, line)
    return _single_turn(prompt, _nonempty(_string(value, "target", path, line), "target", path, line))


def _parse_alpaca(value: dict, path: Path, line: int) -> tuple[Turn, ...]:
    instruction = _string(value, "instruction", path, line)
    extra = _string(value, "input", path, line, required=False)
    output = _nonempty(_string(value, "output", path, line), "output", path, line)
    return _single_turn(_join(instruction, extra), output)


def _parse_dolly(value: dict, path: Path, line: int) -> tuple[Turn, ...]:
    instruction = _string(value, "instruction", path, line)
    context = _string(value, "context", path, line, required=False)
    response = _nonempty(_string(value, "response", path, line), "response", path, line)
    return _single_turn(_join(instruction, context), response)


# Belle's multiturn_chat_0.8M keeps the whole dialogue in `instruction`: "Human: ...\nAssistant: ...\nHuman: ...
# \nAssistant:", with the last reply in `output`.
_BELLE_SPEAKER = re.compile(r"(?:^|\n)\s*(Human|Assistant):")


def _is_belle_transcript(value: dict) -> bool:
    instruction = value.get("instruction")
    return (
        isinstance(instruction, str) and instruction.lstrip().startswith("Human:") and _ends_with_assistant(instruction)
    )


def _ends_with_assistant(text: str) -> bool:
    return text.rstrip().endswith("Assistant:")


def _parse_belle(value: dict, path: Path, line: int) -> tuple[Turn, ...]:
    instruction = _string(value, "instruction", path, line)
    output = _nonempty(_string(value, "output", path, line), "output", path, line)
    if not (instruction.lstrip().startswith("Human:") and _ends_with_assistant(instruction)):
        raise DataFormatError(
            path, line, "instruction", "expected a Belle dialogue 'Human: ... Assistant:' that ends with 'Assistant:'"
        )
    pieces = _BELLE_SPEAKER.split(instruction)  # [before, speaker, text, speaker, text, ...]
    turns = [
        Turn("user" if speaker == "Human" else "assistant", text.strip())
        for speaker, text in zip(pieces[1::2], pieces[2::2], strict=True)
    ]
    return (*turns[:-1], Turn("assistant", output))  # the last speaker is the empty "Assistant:"


def _conversation_list(value: dict, field: str, path: Path, line: int) -> list:
    if field not in value:
        raise DataFormatError(path, line, field, "missing")
    turns = value[field]
    if not isinstance(turns, list) or not turns:
        raise DataFormatError(path, line, field, "expected a non-empty list of turns")
    return turns


def _turns(value: dict, field: str, role_key: str, text_key: str, path: Path, line: int) -> tuple[Turn, ...]:
    turns: list[Turn] = []
    system = value.get("system")  # ShareGPT dumps sometimes keep the system prompt beside the turns
    if isinstance(system, str) and system.strip():
        turns.append(Turn("system", system))
    for i, turn in enumerate(_conversation_list(value, field, path, line)):
        where = f"{field}[{i}]"
        if not isinstance(turn, dict):
            raise DataFormatError(path, line, where, f"expected an object, got {type(turn).__name__}")
        name, text = turn.get(role_key), turn.get(text_key)
        if name not in ROLE_NAMES:
            raise DataFormatError(
                path, line, f"{where}.{role_key}", f"expected one of {sorted(ROLE_NAMES)}, got {name!r}"
            )
        if not isinstance(text, str):
            raise DataFormatError(path, line, f"{where}.{text_key}", f"expected a string, got {type(text).__name__}")
        role = ROLE_NAMES[name]
        if role == "system" and turns:
            raise DataFormatError(path, line, f"{where}.{role_key}", "a system turn may only come first")
        turns.append(Turn(role, text))
    # Turns after the last reply would only be masked: they teach nothing, so they are left out.
    last_reply = max((i for i, t in enumerate(turns) if t.role == "assistant" and t.content.strip()), default=None)
    if last_reply is None:
        raise DataFormatError(path, line, field, "has no non-empty assistant turn to train on")
    return tuple(turns[: last_reply + 1])


def _has_turns(field: str, role_key: str, text_key: str) -> Callable[[dict], bool]:
    def matches(value: dict) -> bool:
        turns = value.get(field)
        return isinstance(turns, list) and bool(turns) and isinstance(turns[0], dict) and role_key in turns[0]

    return matches


def _has(*fields: str) -> Callable[[dict], bool]:
    return lambda value: all(value.get(field) is not None for field in fields)


# Fields of instruction and chat layouts, of the formats above and of layouts pandallm does not read (yet). A record
# holding one is a conversation, or one turn of one, whatever else it holds: read as a document, its prompt would be
# trained unmasked (and an OpenAssistant message without the messages it answers). Weaker fields (`prompt`, `chosen`)
# count only together with their partner, as below: `prompt` alone is metadata in some corpora (Cosmopedia).
CHAT_FIELDS = frozenset(
    {"instruction", "input", "output", "target", "response", "conversations", "messages"}
    | {"role", "message_id", "parent_id", "message_tree_id", "replies"}
)
# Layouts pandallm does not read, by the fields that give them away: what a record of each is, and what to do.
UNSUPPORTED_LAYOUTS = (
    (
        ("message_id", "parent_id"),
        "an OpenAssistant message row (oasst1 / oasst2 'messages'): one turn of a message tree",
        "rebuild each conversation from its parent_id chain into an openai-format record, "
        '{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]} '
        "(role 'prompter' is 'user')",
    ),
    (
        ("message_tree_id",),
        "an OpenAssistant message tree",
        'flatten each path of the tree into an openai-format record, {"messages": [...]}',
    ),
    (
        ("chosen", "rejected"),
        "a preference pair (DPO or reward-model data)",
        "pandallm trains on demonstrations: keep the prompt and the chosen reply as an instruction record",
    ),
    (
        ("prompt", "completion"),
        "a prompt / completion pair",
        "rename the fields to input / target (the pandallm format)",
    ),
)


def _chat_fields(value: dict) -> list[str]:
    paired = {field for fields, _, _ in UNSUPPORTED_LAYOUTS if all(f in value for f in fields) for field in fields}
    return sorted(CHAT_FIELDS.intersection(value) | paired)


def unsupported_layout(value: dict) -> str | None:
    """Why a record with fields of an instruction or chat layout that no format reads is neither a conversation nor
    a document; None if it has no such fields."""
    found = _chat_fields(value)
    if not found:
        return None
    role = f", role {value['role']!r}" if isinstance(value.get("role"), (str, int)) else ""
    for fields, what, advice in UNSUPPORTED_LAYOUTS:
        if all(field in value for field in fields):
            return (
                f"this record looks like {what} (fields {found}{role}). It is not plain text, and pandallm does not "
                f"read this layout: {advice}"
            )
    return (
        f"this record has fields of an instruction or chat layout ({found}{role}) that no pandallm format reads. It "
        f"is not read as plain text: convert it to one of {describe(formats_of('instruction'))}, or, if it is a "
        "document, remove those fields"
    )


def _document(value: dict, path: Path, line: int) -> None:
    """Refuse a record with chat fields as a document, also where a format was named rather than detected."""
    chat = next((fmt for fmt in formats_of("instruction") if fmt.matches(value)), None)
    if chat is not None:
        raise DataFormatError(path, line, None, f"a {chat.name} record {list(chat.fields)}: not plain text")
    problem = unsupported_layout(value)
    if problem is not None:
        raise DataFormatError(path, line, None, problem)


def _is_document(*fields: str) -> Callable[[dict], bool]:
    return lambda value: all(value.get(field) is not None for field in fields) and not _chat_fields(value)


def _parse_title_content(value: dict, path: Path, line: int) -> str:
    _document(value, path, line)
    title = _string(value, "title", path, line, required=False).strip()  # an empty or null title: the content alone
    content = _nonempty(_string(value, "content", path, line), "content", path, line)
    return f"{title}\n{content}" if title else content


def _parse_text(value: dict, path: Path, line: int) -> str:
    _document(value, path, line)
    return _nonempty(_string(value, "text", path, line), "text", path, line)


# In detection order: the first format whose fields a record has is its format. More specific formats come
# before the ones they overlap (Dolly and Belle before Alpaca; OpenAI-style `conversations` before ShareGPT's).
FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("pandallm", "instruction", ("input", "target"), _has("input", "target"), _parse_pandallm),
        Format(
            "sharegpt",
            "instruction",
            ("conversations[].from", "conversations[].value"),
            _has_turns("conversations", "from", "value"),
            lambda v, p, n: _turns(v, "conversations", "from", "value", p, n),
        ),
        Format(
            "openai",
            "instruction",
            ("messages[].role", "messages[].content"),
            lambda v: _has_turns("messages", "role", "content")(v) or _has_turns("conversations", "role", "content")(v),
            lambda v, p, n: _turns(
                v,
                "conversations" if "messages" not in v and "conversations" in v else "messages",
                "role",
                "content",
                p,
                n,
            ),
        ),
        Format(
            "dolly",
            "instruction",
            ("instruction", "context", "response"),
            _has("instruction", "response"),
            _parse_dolly,
        ),
        Format(
            "belle",
            "instruction",
            ("instruction: 'Human: ... Assistant:'", "output"),
            lambda v: _has("instruction", "output")(v) and _is_belle_transcript(v),
            _parse_belle,
        ),
        Format(
            "alpaca", "instruction", ("instruction", "input", "output"), _has("instruction", "output"), _parse_alpaca
        ),
        Format(
            "pretraining",
            "pretraining",
            ("title", "content"),
            lambda v: "title" in v and _is_document("content")(v),  # a null title is a document without one
            _parse_title_content,
        ),
        Format("text", "pretraining", ("text",), _is_document("text"), _parse_text),
    )
}
FormatName = Literal["auto", "pandallm", "sharegpt", "openai", "dolly", "belle", "alpaca", "pretraining", "text"]


def formats_of(kind: RecordKind | None) -> list[Format]:
    return [f for f in FORMATS.values() if kind is None or f.kind == kind]


def describe(formats: list[Format]) -> str:
    return ", ".join(f"{f.name} {list(f.fields)}" for f in formats)


def detect(value: object, path: Path, line: int, kind: RecordKind | None = None) -> Format:
    """The format of one record, from its fields; `kind` limits the candidates (an instruction-tuning directory
    holds no pretraining records)."""
    candidates = formats_of(kind)
    if isinstance(value, dict):
        for fmt in candidates:
            if fmt.matches(value):
                return fmt
        other = next((f for f in formats_of(None) if f not in candidates and f.matches(value)), None)
        if other is not None:
            raise DataFormatError(
                path, line, None, f"a {other.kind} record ({other.name}) where {kind} records are expected"
            )
        unsupported = unsupported_layout(value)
        if unsupported is not None:
            raise DataFormatError(path, line, None, unsupported)
        found = sorted(value)
    else:
        found = type(value).__name__
    raise DataFormatError(
        path,
        line,
        None,
        f"cannot tell the record kind: found fields {found}; expected the fields of {describe(candidates)}",
    )


def parse(fmt: Format, value: object, path: Path, line: int) -> tuple[Turn, ...] | str:
    """Validate one decoded value as `fmt` and normalize it."""
    if not isinstance(value, dict):
        raise DataFormatError(
            path, line, None, f"expected an object with fields {list(fmt.fields)}, got {type(value).__name__}"
        )
    try:
        return fmt.parse(value, path, line)
    except DataFormatError as error:
        if error.problem != "missing":
            raise
        # Say what the record has: a missing field is most often a record of another format.
        raise DataFormatError(
            path,
            line,
            error.field,
            f"missing (found fields {sorted(value)}; a {fmt.name} record has {list(fmt.fields)})",
        ) from None
