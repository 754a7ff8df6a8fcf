"""A config error as one message, with the valid keys nearest to a misspelled one ("did you mean ...?").

jsonargparse names an unknown key in one of a few phrasings (an unrecognized command-line option, an option a
config file gives that the subcommand does not accept); the key is read back from its message and compared with
every option the parser has.
"""

from __future__ import annotations

import difflib
import re

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


def explain(message: str, valid: list[str]) -> str:
    """`message`, and for each unknown key in it the nearest valid keys."""
    hints = []
    for key in unknown_keys(message):
        close = nearest(key, valid)
        if close:
            hints.append(f"'{key}': did you mean {' or '.join(f'`{c}`' for c in close)}?")
        else:
            hints.append(f"'{key}' is no option, and none is close to it")
    return "\n".join([message.strip(), *hints])
