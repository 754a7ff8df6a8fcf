"""Prompt templates: how a conversation becomes text, and which spans of that text are trained.

`data.template` chooses one for every conversation:

- `auto` (the default): PandaLLM `input/target` records keep PandaLLM's own layout, `[BOS] input target [EOS]`
  (the input is the whole prompt, as the user wrote it); records of the other formats use the tokenizer's chat
  template when it has one, else the same plain layout.
- `none`: the plain layout for every record: `[BOS] turn turn ...`, each assistant turn followed by EOS.
- `tokenizer`: the tokenizer's own chat template, for every record.
- `alpaca`, `llama-2`, `chatml`: the built-in templates in `chat_templates/`.
- a name found as `NAME.jinja` in `data.template_dir`, or a path to a Jinja file, or to a directory holding
  `chat_template.jinja` (a Hugging Face tokenizer or model directory) or a single `.jinja` file.

Jinja templates are rendered by transformers' chat-template machinery (`apply_chat_template(tokenize=False)`:
`messages`, `bos_token`, `eos_token`, `add_generation_prompt` and `raise_exception` are available to them). The
trained span of assistant turn i is found by rendering prefixes of the conversation: it is the text between
`render(turns[:i], add_generation_prompt=True)` and `render(turns[:i + 1])`, without trailing whitespace (so ChatML's
`<|im_end|>` is trained, the newline after it is not). Every rendering must be a prefix of the whole conversation's;
a template that rewrites earlier turns is refused.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2

from pandallm.data.formats import Turn
from pandallm.data.records import PromptRecord, Record
from pandallm.errors import ConfigError, DataFormatError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

BUILTIN_DIR = Path(__file__).parent / "chat_templates"
BUILTINS = tuple(sorted(p.stem for p in BUILTIN_DIR.glob("*.jinja")))
SPECIAL = ("auto", "none", "tokenizer")


@dataclass(frozen=True)
class ChatTemplate:
    """A Jinja chat template (`source`), or PandaLLM's plain layout (`source is None`)."""

    name: str
    source: str | None = None


PLAIN = ChatTemplate("none")


@dataclass(frozen=True)
class Rendered:
    """A conversation as text segments `(text, trained)` and how they become ids: `templated` segments are the
    pieces of one Jinja rendering; plain ones are PandaLLM's layout (see `encode_segments`)."""

    texts: list[str]
    trained: list[bool]
    templated: bool


class TemplateError(ValueError):
    """A conversation that a template cannot render (the caller adds the file and line)."""


# The data settings that decide how a conversation becomes ids: `validate`, `test` and `predict` from a checkpoint
# take them from what the checkpoint records (`trained_rendering`), so that a model is prompted as it was trained.
RENDERING_SETTINGS = ("template", "template_dir", "max_seq_length")


def trained_rendering(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The rendering settings a pandallm checkpoint records (its `pandallm` record, `pandallm.checkpoint.compat`),
    as `data.*` parser defaults, under which a `--config` or `--data.*` option given still wins."""
    recorded = (checkpoint.get("pandallm") or {}).get("data") or {}
    return {f"data.{key}": recorded[key] for key in RENDERING_SETTINGS if key in recorded}


def tokenizer_template(tokenizer: PreTrainedTokenizerBase) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: the default one is the chat template
        template = template.get("default")
    return template or None


def _read_template(path: Path) -> str:
    if path.is_dir():
        candidates = [path / "chat_template.jinja"] if (path / "chat_template.jinja").is_file() else []
        candidates = candidates or sorted(path.glob("*.jinja"))
        if len(candidates) != 1:
            raise ConfigError(
                f"data.template '{path}': a directory must hold chat_template.jinja or exactly one .jinja file, "
                f"found {[p.name for p in candidates]}"
            )
        path = candidates[0]
    return path.read_text(encoding="utf-8")


def resolve_template(
    spec: str, tokenizer: PreTrainedTokenizerBase, template_dir: str | None = None
) -> ChatTemplate | None:
    """The template `data.template` names; None for `auto` (chosen per record format by `template_for`)."""
    if spec == "auto":
        return None
    if spec == "none":
        return PLAIN
    if spec == "tokenizer":
        source = tokenizer_template(tokenizer)
        if source is None:
            raise ConfigError(
                f"data.template 'tokenizer': the tokenizer ({type(tokenizer).__name__}) has no chat template; "
                f"choose one of {list(BUILTINS)} or a Jinja file"
            )
        return _checked(ChatTemplate("tokenizer", source), tokenizer)
    if template_dir is not None and (Path(template_dir) / f"{spec}.jinja").is_file():
        return _checked(ChatTemplate(spec, _read_template(Path(template_dir) / f"{spec}.jinja")), tokenizer)
    if spec in BUILTINS:
        return _checked(ChatTemplate(spec, (BUILTIN_DIR / f"{spec}.jinja").read_text(encoding="utf-8")), tokenizer)
    if Path(spec).exists():
        return _checked(ChatTemplate(spec, _read_template(Path(spec))), tokenizer)
    where = f", a NAME.jinja in data.template_dir '{template_dir}'" if template_dir else ""
    raise ConfigError(
        f"data.template '{spec}': expected one of {[*SPECIAL, *BUILTINS]}{where}, or a Jinja file or directory"
    )


def _checked(template: ChatTemplate, tokenizer: PreTrainedTokenizerBase) -> ChatTemplate:
    """Fail at start-up on a template that does not compile or that no conversation could be trained with."""
    sample = (Turn("user", "U1"), Turn("assistant", "A1"), Turn("user", "U2"), Turn("assistant", "A2"))
    try:
        render(template, sample, tokenizer)
    except (TemplateError, jinja2.TemplateError) as e:
        raise ConfigError(f"data.template '{template.name}': {e}") from e
    return template


def template_for(chosen: ChatTemplate | None, record_format: str, tokenizer: PreTrainedTokenizerBase) -> ChatTemplate:
    """The template of one record: `chosen`, or with `auto` (None) the rule in this module's docstring. Training
    rows and predict prompts both take theirs from here, so that a model is prompted as its records were rendered."""
    if chosen is not None:
        return chosen
    own = tokenizer_template(tokenizer)
    if record_format == "pandallm" or own is None:
        return PLAIN
    return ChatTemplate("tokenizer", own)


def render(
    template: ChatTemplate,
    turns: tuple[Turn, ...],
    tokenizer: PreTrainedTokenizerBase,
    generation_prompt: bool = False,
) -> list[tuple[str, bool]]:
    """The conversation as text segments `(text, trained)`, in order; their concatenation is the whole text.

    The plain layout returns one segment per turn (tokenized one by one, EOS added after each trained one, by
    `pandallm.data.tokenize`); a Jinja template returns the spans between assistant replies. With
    `generation_prompt` (the turns before a reply, to predict it), a Jinja template's text ends with its generation
    prompt; the plain layout has none (a reply follows the prompt directly).
    """
    if template.source is None:
        return [(turn.content, turn.role == "assistant") for turn in turns]
    messages = [{"role": turn.role, "content": turn.content} for turn in turns]

    def text(upto: int, generation_prompt: bool = False) -> str:
        try:
            return tokenizer.apply_chat_template(
                messages[:upto],
                chat_template=template.source,
                tokenize=False,
                add_generation_prompt=generation_prompt,
            )
        except jinja2.TemplateError as e:
            raise TemplateError(f"template '{template.name}': {e}") from e

    whole = text(len(messages), generation_prompt)
    segments: list[tuple[str, bool]] = []
    done = 0  # characters of `whole` already in `segments`
    for i, turn in enumerate(turns):
        if turn.role != "assistant":
            continue
        if i == 0:
            raise TemplateError(f"template '{template.name}': a conversation cannot start with an assistant turn")
        prompt, upto = text(i, generation_prompt=True), text(i + 1)
        if not (upto.startswith(prompt) and whole.startswith(upto) and len(prompt) >= done):
            raise TemplateError(
                f"template '{template.name}' renders turn {i} differently once later turns follow, so its reply "
                "cannot be located exactly; use a template whose rendering of a conversation extends the rendering "
                "of its beginning"
            )
        reply = upto[len(prompt) :].rstrip()
        segments += [(whole[done : len(prompt)], False), (reply, True)]
        done = len(prompt) + len(reply)
    segments.append((whole[done:], False))
    return [(piece, trained) for piece, trained in segments if piece]


@functools.cache
def _warn_unmarked_turns(path: str) -> None:
    # The plain layout writes turns one after the other with nothing that tells who speaks: fine for one exchange,
    # not for a conversation.
    log.warning(
        "pandallm data: %s holds multi-turn conversations, the tokenizer has no chat template, and data.template is "
        "auto: turns are joined without role markers. Choose a template (data.template: chatml, llama-2, alpaca, "
        "or your own)",
        path,
    )


def render_record(
    record: Record | PromptRecord, chosen: ChatTemplate | None, tokenizer: PreTrainedTokenizerBase
) -> Rendered:
    """One conversation record, rendered by its template (`template_for`); errors name the file and line. A
    `PromptRecord` (the turns before a reply) is rendered as a training row's beginning, with the template's
    generation prompt."""
    template = template_for(chosen, record.format, tokenizer)
    if chosen is None and template is PLAIN and len(record.turns) > 2:
        _warn_unmarked_turns(record.path)
    try:
        segments = render(template, record.turns, tokenizer, generation_prompt=isinstance(record, PromptRecord))
    except TemplateError as e:
        raise DataFormatError(record.path, record.line, None, str(e)) from e
    return Rendered([text for text, _ in segments], [trained for _, trained in segments], template.source is not None)
