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
from typing import Any, Literal, TypeVar

from pandallm.errors import DataFormatError

T = TypeVar("T")
# What a record trains: an instruction / chat conversation, a pretraining document, a preference pair (DPO and
# the reward model), or one continuation judged desirable or not (KTO).
RecordKind = Literal["instruction", "pretraining", "preference", "unpaired"]
# The rows an objective trains on, which the data module builds from records (`data.rows`, linked from
# `model.objective`): `sequences` from instruction records and documents (`input_ids`, `labels`, `position_ids`),
# `pairs` from preference pairs (two sequences each), `unpaired` from judged continuations (KTO), `prompts` from
# instruction records or `{"prompt"}` records, read as prompts to generate from (online RL: `pandallm.data.prompts`).
RowKind = Literal["sequences", "pairs", "unpaired", "prompts"]
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


# A record to generate a reply to (`pandallm predict`): the turns before the reply, and the reply the record holds,
# its reference (None when it has none).
Prompt = tuple[tuple[Turn, ...], str | None]


@dataclass(frozen=True)
class Format:
    """One record format: its name, the kind of record it gives, the fields that identify it, and its parser.

    Instruction formats also read a record as a prompt (`prompt`), where the reply may be left out: `prompt_matches`
    tells such a record of this format by the fields of its prompt.
    """

    name: str
    kind: RecordKind
    fields: tuple[str, ...]  # as documented; the ones `matches` looks for
    matches: Callable[[dict], bool]
    # value, path, line -> a conversation (instruction formats) or a document text (pretraining formats)
    parse: Callable[[dict, Path, int], tuple[Turn, ...] | str]
    prompt_matches: Callable[[dict], bool] | None = None
    prompt: Callable[[dict, Path, int], Prompt] | None = None

    def is_prompt(self, value: dict) -> bool:
        return self.prompt_matches is not None and self.prompt_matches(value)


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


PromptParser = Callable[[dict, Path, int], tuple[Turn, ...]]


def _with_reply(prompt_of: PromptParser, reply: str) -> Callable[[dict, Path, int], tuple[Turn, ...]]:
    """The parser of a format whose record is a prompt (`prompt_of`) and a reply in the field `reply`."""

    def parse(value: dict, path: Path, line: int) -> tuple[Turn, ...]:
        turns = prompt_of(value, path, line)
        return (*turns, Turn("assistant", _nonempty(_string(value, reply, path, line), reply, path, line)))

    return parse


def _reply_optional(prompt_of: PromptParser, reply: str) -> Callable[[dict, Path, int], Prompt]:
    """The same format read as a prompt: the reply, if the record has one, is its reference."""

    def prompt(value: dict, path: Path, line: int) -> Prompt:
        turns = prompt_of(value, path, line)
        reference = _string(value, reply, path, line, required=False)
        return turns, reference if reference.strip() else None

    return prompt


def _pandallm_prompt(value: dict, path: Path, line: int) -> tuple[Turn, ...]:
    return (Turn("user", _string(value, "input", path, line)),)


def _alpaca_prompt(value: dict, path: Path, line: int) -> tuple[Turn, ...]:
    instruction = _string(value, "instruction", path, line)
    return (Turn("user", _join(instruction, _string(value, "input", path, line, required=False))),)


def _dolly_prompt(value: dict, path: Path, line: int) -> tuple[Turn, ...]:
    instruction = _string(value, "instruction", path, line)
    return (Turn("user", _join(instruction, _string(value, "context", path, line, required=False))),)


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


def _belle_prompt(value: dict, path: Path, line: int) -> tuple[Turn, ...]:
    instruction = _string(value, "instruction", path, line)
    if not (instruction.lstrip().startswith("Human:") and _ends_with_assistant(instruction)):
        raise DataFormatError(
            path, line, "instruction", "expected a Belle dialogue 'Human: ... Assistant:' that ends with 'Assistant:'"
        )
    pieces = _BELLE_SPEAKER.split(instruction)  # [before, speaker, text, speaker, text, ...]
    turns = [
        Turn("user" if speaker == "Human" else "assistant", text.strip())
        for speaker, text in zip(pieces[1::2], pieces[2::2], strict=True)
    ]
    return tuple(turns[:-1])  # the last speaker is the empty "Assistant:", whose reply is `output`


def _conversation_list(value: dict, field: str, path: Path, line: int) -> list:
    if field not in value:
        raise DataFormatError(path, line, field, "missing")
    turns = value[field]
    if not isinstance(turns, list) or not turns:
        raise DataFormatError(path, line, field, "expected a non-empty list of turns")
    return turns


def _all_turns(value: dict, field: str, role_key: str, text_key: str, path: Path, line: int) -> list[Turn]:
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
    return turns


def _turns(value: dict, field: str, role_key: str, text_key: str, path: Path, line: int) -> tuple[Turn, ...]:
    turns = _all_turns(value, field, role_key, text_key, path, line)
    # Turns after the last reply would only be masked: they teach nothing, so they are left out.
    last_reply = max((i for i, t in enumerate(turns) if t.role == "assistant" and t.content.strip()), default=None)
    if last_reply is None:
        raise DataFormatError(path, line, field, "has no non-empty assistant turn to train on")
    return tuple(turns[: last_reply + 1])


def _turns_prompt(value: dict, field: str, role_key: str, text_key: str, path: Path, line: int) -> Prompt:
    """A conversation as a prompt: one that ends with a reply is the turns before it, with the reply as reference;
    one that ends with a user turn (or an empty reply) is a prompt as it is, with no reference."""
    turns = _all_turns(value, field, role_key, text_key, path, line)
    reference = None
    if turns[-1].role == "assistant":
        reference = turns.pop().content or None
    if not any(turn.role == "user" for turn in turns):
        raise DataFormatError(path, line, field, "has no user turn to reply to")
    return tuple(turns), reference


def _turn_list(role_key: str, text_key: str, *fields: str) -> dict:
    """The matching and parsing of a turn-list format: the first of `fields` that a record has holds
    `[{role_key: ..., text_key: ...}, ...]`."""

    def matches(value: dict) -> bool:
        return any(_has_turns(field, role_key, text_key)(value) for field in fields)

    def field(value: dict) -> str:
        return next((f for f in fields if f in value), fields[0])

    return {
        "matches": matches,
        "parse": lambda v, p, n: _turns(v, field(v), role_key, text_key, p, n),
        "prompt_matches": matches,
        "prompt": lambda v, p, n: _turns_prompt(v, field(v), role_key, text_key, p, n),
    }


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
    | {"inputs", "targets", "instances"}  # Flan, Self-Instruct: a record with one of them alone is no document either
)
# Layouts pandallm does not read, by the fields that give them away: what a record of each is, and what to do.
UNSUPPORTED_LAYOUTS = (
    (
        ("message_id", "parent_id"),
        "an OpenAssistant message row (oasst1 / oasst2 'messages'): one turn of a message tree",
        "read the trees file of the same release instead (2023-04-12_oasst_ready.trees.jsonl.gz: format oasst), or "
        "rebuild each conversation from its parent_id chain into an openai-format record, "
        '{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]} '
        "(role 'prompter' is 'user')",
    ),
    (
        ("chosen", "rejected"),
        "a preference pair, in no layout pandallm reads",
        "give the prompt, chosen and rejected as strings or message lists (README, 'Preference tuning')",
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


def _preference_formats() -> tuple[Format, ...]:
    from pandallm.data import preference_formats as p

    return (
        Format(
            "preference_chat", "preference", ("chosen[]", "rejected[]", "prompt?"), p.is_chat_pair, p.parse_chat_pair
        ),
        Format("hh_rlhf", "preference", ("chosen: 'Human: ...'", "rejected"), p.is_hh_pair, p.parse_hh_pair),
        Format("preference", "preference", ("prompt", "chosen", "rejected"), p.is_text_pair, p.parse_text_pair),
        Format("kto", "unpaired", ("prompt", "completion", "label"), p.is_judged, p.parse_judged),
    )


OASST_FIELDS = ("message_tree_id", "prompt: {text, role, replies: [...]}")


def _seed_formats() -> tuple[Format, ...]:
    from pandallm.data import seed_formats as s

    return (
        Format("oasst", "instruction", OASST_FIELDS, s.is_oasst_tree, s.oasst_paths("all"), None, s.no_single_prompt),
        # Never detected (`oasst`, before it, matches the same trees): chosen by `data.oasst_paths: best` or named. It
        # matches trees so that a malformed tree's own error is reported, not "an oasst record in an oasst_best file".
        Format("oasst_best", "instruction", OASST_FIELDS, s.is_oasst_tree, s.oasst_paths("best")),
        Format("lima", "instruction", ("conversations[str]",), s.is_lima, s.parse_lima, s.is_lima, s.lima_prompt),
        Format(
            "flan",
            "instruction",
            ("inputs", "targets"),
            _has("inputs", "targets"),
            _with_reply(s.flan_prompt_turns, "targets"),
            _has("inputs"),
            _reply_optional(s.flan_prompt_turns, "targets"),
        ),
        Format(
            "self_instruct",
            "instruction",
            ("instruction", "instances[].input", "instances[].output"),
            s.is_self_instruct,
            s.parse_self_instruct,
            None,
            s.no_single_prompt,
        ),
        Format(
            "prompt_completion",
            "instruction",
            ("prompt", "completion"),
            s.is_prompt_completion,
            s.parse_prompt_completion,
            s.is_completion_prompt,
            s.prompt_completion_prompt,
        ),
    )


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
        # Preference layouts first: their fields are their own. Defined in `preference_formats`, which imports this
        # module's field readers (imported here, once those exist).
        *_preference_formats(),
        # The seed systems' instruction layouts (`seed_formats`): each by fields no format below has.
        *_seed_formats(),
        Format(
            "pandallm",
            "instruction",
            ("input", "target"),
            _has("input", "target"),
            _with_reply(_pandallm_prompt, "target"),
            lambda v: _has("input")(v) and "instruction" not in v,  # Alpaca's records have an `input` too
            _reply_optional(_pandallm_prompt, "target"),
        ),
        Format(
            "sharegpt",
            "instruction",
            ("conversations[].from", "conversations[].value"),
            **_turn_list("from", "value", "conversations"),
        ),
        # OpenAI's chat fine-tuning layout; some exports keep the same turns under `conversations`.
        Format(
            "openai",
            "instruction",
            ("messages[].role", "messages[].content"),
            **_turn_list("role", "content", "messages", "conversations"),
        ),
        Format(
            "dolly",
            "instruction",
            ("instruction", "context", "response"),
            _has("instruction", "response"),
            _with_reply(_dolly_prompt, "response"),
            lambda v: _has("instruction")(v) and "context" in v,
            _reply_optional(_dolly_prompt, "response"),
        ),
        Format(
            "belle",
            "instruction",
            ("instruction: 'Human: ... Assistant:'", "output"),
            lambda v: _has("instruction", "output")(v) and _is_belle_transcript(v),
            _with_reply(_belle_prompt, "output"),
            _is_belle_transcript,
            _reply_optional(_belle_prompt, "output"),
        ),
        Format(
            "alpaca",
            "instruction",
            ("instruction", "input", "output"),
            _has("instruction", "output"),
            _with_reply(_alpaca_prompt, "output"),
            _has("instruction"),
            _reply_optional(_alpaca_prompt, "output"),
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


def formats_of(kind: RecordKind | None) -> list[Format]:
    return [f for f in FORMATS.values() if kind is None or f.kind == kind]


def format_option(kind: RecordKind) -> Any:
    """The type of an option that names a format of `kind`: `Literal` of "auto" and those formats' names, derived
    from `FORMATS`, so that a new format is added in one place and the options cannot drift from it."""
    return Literal[("auto", *(f.name for f in formats_of(kind)))]


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
            found = f"{_article(other.kind)} {other.kind} record ({other.name})"
            raise DataFormatError(
                path, line, None, f"{found} where {kind} records are expected{_hint(other.kind, kind)}"
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


# What trains on which records, for errors where a record is not of the kind expected.
OBJECTIVE_HINTS: dict[str, str] = {
    "instruction": "instruction and pretraining records train with model.objective SFT (the default)",
    "pretraining": "instruction and pretraining records train with model.objective SFT (the default)",
    "preference": "preference pairs train with model.objective DPO, SimPO, ORPO or RewardModel",
    "unpaired": "judged completions (label true / false) train with model.objective KTO",
}


def _hint(found: RecordKind, expected: RecordKind | None) -> str:
    """Which objective trains on the record found, where it matters (a pair among conversations, or the reverse)."""
    other_rows = {"preference", "unpaired"}
    return f" ({OBJECTIVE_HINTS[found]})" if found in other_rows or expected in other_rows else ""


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def detect_prompt(value: object, path: Path, line: int) -> Format:
    """The format of a record to predict from: the instruction format `detect` finds, or for a record without its
    reply, the format whose prompt fields it has (`{"input"}` is a pandallm prompt, `{"instruction", "input"}` an
    Alpaca one)."""
    if isinstance(value, dict):
        candidates = formats_of("instruction")
        whole = next((fmt for fmt in candidates if fmt.matches(value)), None)
        found = whole or next((fmt for fmt in candidates if fmt.is_prompt(value)), None)
        if found is not None:
            return found
    try:
        detect(value, path, line, "instruction")  # raises, saying what the record is instead
    except DataFormatError as error:
        if not error.problem.startswith("cannot tell"):
            raise
        problem = f"{error.problem} (to predict from, the reply may be left out)"
        raise DataFormatError(path, line, None, problem) from None
    raise AssertionError("unreachable: detect found an instruction format that no matcher matched")


def parse(fmt: Format, value: object, path: Path, line: int) -> tuple[Turn, ...] | str:
    """Validate one decoded value as `fmt` and normalize it."""
    return _parsed(fmt, value, path, line, fmt.parse)


def parse_prompt(fmt: Format, value: object, path: Path, line: int) -> Prompt:
    """Validate one decoded value as a prompt of the instruction format `fmt`: its turns before the reply, and the
    reply it holds, if any."""
    assert fmt.prompt is not None, f"{fmt.name} records are not prompts"
    turns, reference = _parsed(fmt, value, path, line, fmt.prompt)
    # Generating from nothing is never what a prompt file meant (an export that lost the prompt's column).
    if not any(turn.content.strip() for turn in turns if turn.role == "user"):
        raise DataFormatError(path, line, None, f"the prompt of this {fmt.name} record is empty: nothing to reply to")
    return turns, reference


def _parsed(fmt: Format, value: object, path: Path, line: int, parser: Callable[[dict, Path, int], T]) -> T:
    if not isinstance(value, dict):
        raise DataFormatError(
            path, line, None, f"expected an object with fields {list(fmt.fields)}, got {type(value).__name__}"
        )
    try:
        return parser(value, path, line)
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
