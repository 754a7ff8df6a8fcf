"""Special-token overrides (universal-llm-trainer's `pad/bos/eos/unk/sep/cls`): `model.special_tokens`, linked to
the data module's, so that rows are built and the model is sized with the same tokenizer.

Each role is given as an id of the tokenizer, a token string of its vocabulary, or `add`: a new token `<role>`
(`<pad>`, `<sep>`, ...), which grows the vocabulary by one; the model's embeddings then grow with it, the new rows at
the mean of the old ones, as vocabulary extension grows them (`pandallm.model.build.grow_embeddings`). The tokenizer
with its overrides is what checkpoints digest and what the export saves, and the exported `config.json` and
`generation_config.json` carry its ids.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Literal

from pandallm.errors import ModelError

if TYPE_CHECKING:  # not imported at run time: `pandallm train-tokenizer --help` starts without transformers
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

SpecialRole = Literal["pad", "bos", "eos", "unk", "sep", "cls"]
SpecialTokens = dict[SpecialRole, int | str]
ROLES: tuple[str, ...] = ("pad", "bos", "eos", "unk", "sep", "cls")
ADD = "add"
OPTION = "model.special_tokens"


def _token(tokenizer: PreTrainedTokenizerBase, role: str, value: int | str, vocabulary: dict[str, int]) -> str:
    """The token string `value` names for `role`, checked against the tokenizer."""
    where = f"{OPTION}.{role}"
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ModelError(f"{where}: {value!r} is neither a token id, a token string nor '{ADD}'")
    if isinstance(value, int):
        if not 0 <= value < len(tokenizer):
            last = len(tokenizer) - 1
            raise ModelError(f"{where}: id {value} is not in the tokenizer's vocabulary (ids 0 to {last})")
        return tokenizer.convert_ids_to_tokens(value)
    if value == ADD:
        new = f"<{role}>"
        if new in vocabulary:
            raise ModelError(
                f"{where}: '{ADD}' makes a new token {new}, but the vocabulary has it already (id {vocabulary[new]}); "
                f"give it as {role}: '{new}' (or its id) to use it"
            )
        return new
    if value not in vocabulary:
        raise ModelError(
            f"{where}: {value!r} is not a token of the tokenizer; give a token it has, an id, or '{ADD}' for a new one"
        )
    return value


def apply_special_tokens(
    tokenizer: PreTrainedTokenizerBase, overrides: SpecialTokens | None
) -> PreTrainedTokenizerBase:
    """A copy of `tokenizer` with the special tokens of `overrides` (`tokenizer` itself when there are none)."""
    if not overrides:
        return tokenizer
    unknown = sorted(set(overrides) - set(ROLES))
    if unknown:
        raise ModelError(f"{OPTION}: unknown role(s) {unknown}; the roles are {', '.join(ROLES)}")
    vocabulary = tokenizer.get_vocab()
    tokens = {f"{role}_token": _token(tokenizer, role, value, vocabulary) for role, value in overrides.items()}
    changed = copy.deepcopy(tokenizer)  # a cached tokenizer (GGUF) is shared: never changed in place
    changed.add_special_tokens(tokens)
    return changed


def carry_special_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """The model's config and generation config name the tokenizer's pad / bos / eos ids, so that `generate` on the
    export pads and stops as training did."""
    for role in ("pad", "bos", "eos"):
        token_id = getattr(tokenizer, f"{role}_token_id")
        if token_id is None:
            continue
        setattr(model.config, f"{role}_token_id", token_id)
        if getattr(model, "generation_config", None) is not None:
            setattr(model.generation_config, f"{role}_token_id", token_id)
