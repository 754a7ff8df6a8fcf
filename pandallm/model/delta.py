"""Delta weights: a released model published as its difference from a base model (base + delta = released).

PandaLLM released its models this way (`chitanda/llama-panda-zh-7b-delta` on top of LLaMA-7B), since LLaMA's
license kept the weights themselves from being redistributed. Its `apply_delta.py` adds every tensor of the delta
to the base's, except `embed_tokens` and `lm_head`: those are stored whole in the delta, because the released
model's vocabulary (Chinese tokens added) is larger than the base's. FastChat-style deltas (Vicuna) add every
tensor; set `model.delta_replaces: []` for those.
"""

from __future__ import annotations

import pickle

import torch
from transformers import LlamaForCausalLM

from pandallm.checkpoint.load import load_error
from pandallm.errors import ModelError

DEFAULT_REPLACED = ("embed_tokens", "lm_head")


def _base_parameters(base_path: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    try:
        base = LlamaForCausalLM.from_pretrained(base_path, dtype=dtype)
    except pickle.UnpicklingError as e:
        # transformers reads `.bin` weights with `weights_only=True`: what it refused did not run.
        raise load_error(f"model.delta_from '{base_path}'", e) from e
    except (OSError, ValueError) as e:
        raise ModelError(f"model.delta_from '{base_path}' could not be loaded as a LLaMA checkpoint: {e}") from e
    return {name: p.detach() for name, p in base.named_parameters()}


@torch.no_grad()
def apply_delta(
    delta: LlamaForCausalLM, base_path: str, delta_path: str, replaced: tuple[str, ...] | list[str] = DEFAULT_REPLACED
) -> LlamaForCausalLM:
    """Turn `delta` (loaded from `delta_path`) into the released model, in place: each parameter += the base's.

    Parameters whose name contains one of `replaced` are kept as the delta stores them. Every other parameter
    must exist in the base with the same shape; the error names each one that does not.
    """
    base = _base_parameters(base_path, next(delta.parameters()).dtype)
    mismatched, missing = [], []
    # named_parameters() lists a tied weight (embed_tokens = lm_head) once, so nothing is added twice.
    additions = []
    for name, param in delta.named_parameters():
        if any(part in name for part in replaced):
            continue
        if name not in base:
            missing.append(name)
        elif base[name].shape != param.shape:
            mismatched.append(f"{name} {list(param.shape)} in the delta vs {list(base[name].shape)} in the base")
        else:
            additions.append((param, base[name]))
    if missing or mismatched:
        problems = [f"not in the base: {name}" for name in missing[:5]] + mismatched[:5]
        extra = len(missing) + len(mismatched) - len(problems)
        raise ModelError(
            f"model.delta_from '{base_path}' is not the base that the delta weights '{delta_path}' were made from: "
            + "; ".join(problems)
            + (f" (and {extra} more)" if extra else "")
        )
    for param, base_param in additions:
        param.add_(base_param.to(param.device))
    return delta
