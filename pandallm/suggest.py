"""A config error as one message, with the valid keys nearest to a misspelled one ("did you mean ...?").

jsonargparse names an unknown key in one of a few phrasings (an unrecognized command-line option, an option a
config file gives that the subcommand does not accept); the key is read back from its message and compared with
every option the parser has.
"""

from __future__ import annotations

import difflib
import re
import sys
from collections.abc import Callable
from typing import Any, NoReturn

_UNKNOWN = [
    re.compile(r"unrecognized arguments: (?P<keys>.+)$", re.MULTILINE),
    re.compile(r"does not accept options? '?(?P<keys>[^'\n]+)'?"),
    re.compile(r'Key "(?P<keys>[^"]+)" is not'),
]


def unknown_keys(message: str) -> list[str]:
    """The keys an error message names as unknown, without dashes and values: `--trainer.max_step=5` ->
    `trainer.max_step`."""
    keys: list[str] = []
    for pattern in _UNKNOWN:
        for match in pattern.finditer(message):
            for word in re.split(r"[\s,]+", match.group("keys")):
                if word.startswith("-") or pattern is not _UNKNOWN[0]:
                    key = word.lstrip("-").split("=", 1)[0].strip("'\".")
                    if key and key not in keys:
                        keys.append(key)
    return keys


def nearest(key: str, valid: list[str], n: int = 3) -> list[str]:
    """The valid keys closest to `key` (the best, and any about as close): by the whole dotted key, else by its last
    part (`--max_steps` -> `trainer.max_steps`)."""
    close = _closest(key, valid, n)
    if close:
        return close
    by_last: dict[str, list[str]] = {}
    for name in valid:
        by_last.setdefault(name.rsplit(".", 1)[-1], []).append(name)
    return [name for part in _closest(key.rsplit(".", 1)[-1], list(by_last), n) for name in by_last[part]][:n]


def _closest(word: str, candidates: list[str], n: int) -> list[str]:
    scored = sorted(((difflib.SequenceMatcher(None, word, c).ratio(), c) for c in candidates), reverse=True)
    scored = [(score, c) for score, c in scored[:n] if score >= 0.75]
    return [c for score, c in scored if score >= scored[0][0] - 0.03]


def explain(message: str, valid: list[str], prefix: str = "") -> str:
    """`message`, and for each unknown key in it the nearest valid keys, written with `prefix` (`--` for a tool's
    options, which have no config file to be keys of)."""
    hints = []
    for key in unknown_keys(message):
        close = nearest(key, valid)
        if close:
            hints.append(f"'{prefix}{key}': did you mean {' or '.join(f'`{prefix}{c}`' for c in close)}?")
        else:
            hints.append(f"'{prefix}{key}' is no option, and none is close to it")
    return "\n".join([message.strip(), *hints])


def tool_cli(function: Callable[..., Any], args: list[str] | None, prog: str, **kwargs: Any) -> Any:
    """jsonargparse's `auto_cli` for a tool command, whose parse errors read as `fit`'s do: `pandallm TOOL: error:
    MESSAGE` with the nearest valid options, instead of the whole usage under the name `__main__.py`."""
    from jsonargparse import ArgumentParser, auto_cli  # here: `pandallm --help` starts without it

    class ToolParser(ArgumentParser):
        def error(self, message: str, ex: Exception | None = None) -> NoReturn:
            if not self.exit_on_error:  # jsonargparse parsing inside a parse: it handles the error
                super().error(message, ex)
            keys = [action.dest for action in self._actions if action.option_strings and action.dest != "help"]
            print(f"{prog}: error: {explain(message, keys, '--')}", file=sys.stderr)
            print(f"({prog} --help lists the options)", file=sys.stderr)
            sys.exit(2)

    return auto_cli(function, args=args, parser_class=ToolParser, prog=prog, allow_abbrev=False, **kwargs)
