"""Instruction layouts of the systems pandallm replaces (LLMBox, universal-llm-trainer), each a `Format` of
`pandallm.data.formats`:

- `oasst`: OpenAssistant message trees (`2023-04-12_oasst_ready.trees.jsonl`), one conversation per path from the
  root to each leaf; `oasst_best`: the one path that follows the best-ranked reply at every turn;
- `lima`: `{"conversations": [str, str, ...]}`, turns alternating from the user's (LIMA; LLMBox's own conversion of
  OASST writes this too);
- `flan`: `{"inputs", "targets"}` (the Flan collection);
- `self_instruct`: `{"instruction", "instances": [{"input", "output"}, ...]}` (Self-Instruct's seed tasks and its
  generated tasks), one conversation per instance;
- `prompt_completion`: `{"prompt", "completion"}`, each a string or a list of `{"role", "content"}` messages (TRL's
  prompt-completion layout). A record with a boolean `label` is KTO's, not this.

A record of `oasst` or `self_instruct` holds several conversations: its parser returns `Several`, and each becomes a
record of its own, with the record's line.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal

from pandallm.data.formats import Turn, _all_turns, _join, _nonempty, _string
from pandallm.errors import DataFormatError

Conversation = tuple[Turn, ...]
OasstPaths = Literal["all", "best"]
# OpenAssistant's roles.
OASST_ROLES = {"prompter": "user", "assistant": "assistant"}


class Several(tuple):
    """The conversations of one record that holds more than one (a message tree, a task with several instances)."""


def _required(value: dict, field: str, kind: type, expected: str, path: Path, line: int):
    """`value[field]`, of type `kind`. A record of another layout (a stray line in a file whose first record fixed
    the format, or a file read with a format named in the config) lacks the field: that is a `missing` error, which
    the reader turns into what the record is instead, never a bare KeyError; a string where a list belongs would
    otherwise be read a character at a time."""
    if value.get(field) is None:
        raise DataFormatError(path, line, field, "missing")
    if not isinstance(value[field], kind):
        raise DataFormatError(path, line, field, f"expected {expected}, got {type(value[field]).__name__}")
    return value[field]


def _through_last_reply(turns: list[Turn]) -> Conversation | None:
    """The turns up to the last non-empty assistant reply (the turns after it train nothing); None if there is none."""
    last = max((i for i, t in enumerate(turns) if t.role == "assistant" and t.content.strip()), default=None)
    return None if last is None else tuple(turns[: last + 1])


# OpenAssistant trees ---------------------------------------------------------------------------------------------


def is_oasst_tree(value: dict) -> bool:
    return "message_tree_id" in value and isinstance(value.get("prompt"), dict)


def _message(node: object, where: str, path: Path, line: int) -> Turn:
    if not isinstance(node, dict):
        raise DataFormatError(path, line, where, f"expected a message object, got {type(node).__name__}")
    role = node.get("role")
    if role not in OASST_ROLES:
        raise DataFormatError(path, line, f"{where}.role", f"expected 'prompter' or 'assistant', got {role!r}")
    text = node.get("text")
    if not isinstance(text, str):
        raise DataFormatError(path, line, f"{where}.text", f"expected a string, got {type(text).__name__}")
    return Turn(OASST_ROLES[role], text)


def _replies(node: dict, where: str, path: Path, line: int) -> list[tuple[str, dict]]:
    """The replies to a message that were not deleted, each with where it is in the record."""
    replies = node.get("replies") or []
    if not isinstance(replies, list):
        raise DataFormatError(path, line, f"{where}.replies", f"expected a list, got {type(replies).__name__}")
    kept = [(i, r) for i, r in enumerate(replies) if not (isinstance(r, dict) and r.get("deleted"))]
    return [(f"{where}.replies[{i}]", r) for i, r in kept]


def _rank(node: dict) -> tuple[int, float]:
    # Rank 0 is the best reply among its siblings; an unranked reply (null) comes after every ranked one.
    rank = node.get("rank")
    return (0, rank) if isinstance(rank, (int, float)) else (1, 0)


def oasst_paths(policy: OasstPaths) -> Callable[[dict, Path, int], Several]:
    """The parser of a tree: `all` paths from the root to each leaf, or the `best`-ranked one. Each path is cut after
    its last assistant reply (a leaf may be a prompter's message); a path that holds no reply, and a path equal to
    one already taken, is left out."""

    def parse(value: dict, path: Path, line: int) -> Several:
        conversations: list[Conversation] = []
        # The paths taken, to leave out equal ones: looked up in `conversations`, a tree with thousands of replies to
        # one message took seconds, each path compared with every one before it.
        taken: set[Conversation] = set()
        pending = [("prompt", _required(value, "prompt", dict, "a message object", path, line), [])]
        while pending:
            where, node, before = pending.pop()
            turns = [*before, _message(node, where, path, line)]
            replies = _replies(node, where, path, line)
            if policy == "best" and replies:
                replies = [min(replies, key=lambda reply: _rank(reply[1]))]
            if not replies:
                conversation = _through_last_reply(turns)
                if conversation is not None and conversation not in taken:
                    taken.add(conversation)
                    conversations.append(conversation)
            pending += [(w, reply, turns) for w, reply in reversed(replies)]  # depth first, in the file's order
        if not conversations:
            raise DataFormatError(path, line, "prompt", "the tree holds no assistant reply to train on")
        return Several(conversations)

    return parse


def no_single_prompt(value: dict, path: Path, line: int) -> tuple[Conversation, str | None]:
    """A tree or a task of several instances is not one prompt: refused in a predict file, saying why."""
    raise DataFormatError(
        path,
        line,
        None,
        "this record holds several conversations (an OpenAssistant tree, a Self-Instruct task): a predict file holds "
        'one prompt per record; write the prompts as openai-format records, {"messages": [...]}',
    )


# LIMA ------------------------------------------------------------------------------------------------------------


def is_lima(value: dict) -> bool:
    turns = value.get("conversations")
    return isinstance(turns, list) and bool(turns) and isinstance(turns[0], str)


def _lima_turns(value: dict, path: Path, line: int) -> list[Turn]:
    turns = []
    for i, text in enumerate(_required(value, "conversations", list, "a list of strings", path, line)):
        if not isinstance(text, str):
            raise DataFormatError(path, line, f"conversations[{i}]", f"expected a string, got {type(text).__name__}")
        turns.append(Turn("user" if i % 2 == 0 else "assistant", text))
    return turns


def parse_lima(value: dict, path: Path, line: int) -> Conversation:
    conversation = _through_last_reply(_lima_turns(value, path, line))
    if conversation is None:
        raise DataFormatError(path, line, "conversations", "has no non-empty reply (every second turn) to train on")
    return conversation


def lima_prompt(value: dict, path: Path, line: int) -> tuple[Conversation, str | None]:
    turns = _lima_turns(value, path, line)
    reference = turns.pop().content or None if turns[-1].role == "assistant" else None
    return tuple(turns), reference


# Flan ------------------------------------------------------------------------------------------------------------


def flan_prompt_turns(value: dict, path: Path, line: int) -> Conversation:
    return (Turn("user", _string(value, "inputs", path, line)),)


# Self-Instruct ---------------------------------------------------------------------------------------------------


def is_self_instruct(value: dict) -> bool:
    return isinstance(value.get("instruction"), str) and isinstance(value.get("instances"), list)


def parse_self_instruct(value: dict, path: Path, line: int) -> Several:
    instruction = _nonempty(_string(value, "instruction", path, line), "instruction", path, line)
    instances = _required(value, "instances", list, "a list of {input, output} objects", path, line)
    if not instances:
        raise DataFormatError(path, line, "instances", "is empty: a task needs at least one {input, output}")
    conversations = []
    for i, instance in enumerate(instances):
        where = f"instances[{i}]"
        if not isinstance(instance, dict):
            raise DataFormatError(path, line, where, f"expected an object, got {type(instance).__name__}")
        try:
            extra = _string(instance, "input", path, line, required=False)
            output = _string(instance, "output", path, line)
        except DataFormatError as error:
            # Named inside its instance: "field 'output': missing (found fields ['instances', 'instruction'])" sent
            # the reader to the record's top level.
            problem = "missing (each instance has an output)" if error.problem == "missing" else error.problem
            raise DataFormatError(path, line, f"{where}.{error.field}", problem) from None
        output = _nonempty(output, f"{where}.output", path, line)
        conversations.append((Turn("user", _join(instruction, extra)), Turn("assistant", output)))
    return Several(conversations)


# Prompt / completion ---------------------------------------------------------------------------------------------


def is_prompt_completion(value: dict) -> bool:
    # KTO's records are prompt / completion with a boolean label: those are judged continuations, not demonstrations.
    return (
        _is_text_or_messages(value.get("prompt"))
        and _is_text_or_messages(value.get("completion"))
        and not (isinstance(value.get("label"), bool))
    )


def is_completion_prompt(value: dict) -> bool:
    return _is_text_or_messages(value.get("prompt")) and not isinstance(value.get("label"), bool)


def _is_text_or_messages(field: object) -> bool:
    return isinstance(field, str) or (isinstance(field, list) and bool(field) and isinstance(field[0], dict))


def _side(value: dict, field: str, role: str, path: Path, line: int) -> list[Turn]:
    if isinstance(value.get(field), list):
        return _all_turns({field: value[field]}, field, "role", "content", path, line)
    return [Turn(role, _string(value, field, path, line))]  # type: ignore[arg-type]


def prompt_completion_turns(value: dict, path: Path, line: int) -> Conversation:
    turns = _side(value, "prompt", "user", path, line)
    if not any(turn.role == "user" and turn.content.strip() for turn in turns):
        raise DataFormatError(path, line, "prompt", "has no user turn: nothing to reply to")
    return tuple(turns)


def parse_prompt_completion(value: dict, path: Path, line: int) -> Conversation:
    completion = _side(value, "completion", "assistant", path, line)
    if any(turn.role == "system" for turn in completion):
        raise DataFormatError(path, line, "completion", "a system turn may only come first, in the prompt")
    if completion[-1].role != "assistant" or not completion[-1].content.strip():
        raise DataFormatError(path, line, "completion", "must end with a non-empty assistant reply")
    return (*prompt_completion_turns(value, path, line), *completion)


def prompt_completion_prompt(value: dict, path: Path, line: int) -> tuple[Conversation, str | None]:
    turns = prompt_completion_turns(value, path, line)
    if value.get("completion") is None:
        return turns, None
    completion = _side(value, "completion", "assistant", path, line)
    reply = completion[-1].content if len(completion) == 1 and completion[0].role == "assistant" else None
    return turns, reply or None
