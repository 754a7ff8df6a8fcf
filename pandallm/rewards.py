"""Ready-made reward functions for `GRPO` (`model.objective.init_args.rewards`), called as every reward function is:
`f(prompts=..., completions=..., reference=..., <record fields>..., <kwargs>...)`, one float per completion.

    rewards:
      - {function: pandallm.rewards:answer_match, weight: 1.0}
      - {function: pandallm.rewards:format_match, weight: 0.2, kwargs: {pattern: '#### -?\\d+\\s*$'}}
"""

from __future__ import annotations

import re
from typing import Any

# A number as GSM8K writes its answers: optional sign, thousands separators, decimals.
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_answer(text: str | None) -> str | None:
    """The final answer of a text: what follows its last `####` (GSM8K's marker), else its last number; numbers lose
    their thousands separators and trailing zeros of decimals (`1,000.50` -> `1000.5`)."""
    if not text:
        return None
    if "####" in text:
        text = text.rsplit("####", 1)[1]
        numbers = _NUMBER.findall(text)
        if not numbers:
            answer = text.strip()
            return answer or None
        text = numbers[0]
    numbers = _NUMBER.findall(text)
    if not numbers:
        return None
    number = numbers[-1].replace(",", "")
    if "." in number:
        number = number.rstrip("0").rstrip(".")
    return number


def answer_match(completions: list[str], reference: list[str | None], **_: Any) -> list[float]:
    """1.0 where the completion's final answer (`final_answer`) equals the reference's, else 0.0 (also where the
    record has no reference)."""
    rewards = []
    for completion, answer in zip(completions, reference, strict=True):
        expected = final_answer(answer)
        rewards.append(float(expected is not None and final_answer(completion) == expected))
    return rewards


def format_match(completions: list[str], pattern: str = r"#### -?\d", **_: Any) -> list[float]:
    """1.0 where the regular expression `pattern` matches somewhere in the completion (`re.search`, multi-line,
    `.` matching newlines), else 0.0: e.g. `'^<think>.*</think>'` or `'#### -?\\d+\\s*$'`."""
    compiled = re.compile(pattern, re.MULTILINE | re.DOTALL)
    return [float(compiled.search(completion) is not None) for completion in completions]


def length(completions: list[str], chars: int = 200, **_: Any) -> list[float]:
    """1.0 for a completion of `chars` characters, falling linearly to 0.0 at 0 and at twice `chars`: a pull toward a
    length (too short and too long both cost)."""
    return [max(0.0, 1.0 - abs(len(completion) - chars) / chars) for completion in completions]


def ends_with(completions: list[str], word: str = "indeed", **_: Any) -> list[float]:
    """1.0 where the completion's last word (punctuation aside) is `word`, case-insensitive: a toy task to check
    that a model learns from a reward."""
    rewards = []
    for completion in completions:
        words = re.findall(r"\w+", completion.lower())
        rewards.append(float(bool(words) and words[-1] == word.lower()))
    return rewards
