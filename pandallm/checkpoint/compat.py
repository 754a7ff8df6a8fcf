"""What a checkpoint was trained with, and whether a run may resume from it.

Every pandallm checkpoint carries a `pandallm` record: the model's shape, a digest of the tokenizer, the module's
and data module's settings, and the run's parallel layout. Resuming compares it with the run at hand: changes
that cannot work (another model shape, another tokenizer, tensors that do not fit) are refused with the
differences named; changes that work but break exact continuation (batch size, data, learning rate) are listed
in a warning.
"""

from __future__ import annotations

from typing import Any

from pandallm.errors import ModelError

FORMAT = 1
# LlamaConfig fields that decide tensor shapes.
SHAPE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "tie_word_embeddings",
)


def record(config: Any, tokenizer_digest: str, hparams: dict, data_hparams: dict, run: dict) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "shape": {field: getattr(config, field, None) for field in SHAPE_FIELDS},
        "tokenizer": tokenizer_digest,
        "model": _plain(hparams),
        "data": _plain(data_hparams),
        "run": run,
    }


def _plain(settings: dict) -> dict:
    return {
        key: value if isinstance(value, (int, float, str, bool, type(None))) else repr(value)
        for key, value in settings.items()
    }


def _differences(saved: dict, current: dict, prefix: str) -> list[str]:
    keys = sorted(set(saved) | set(current))
    return [f"{prefix}{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]


def check(path: str, checkpoint: dict, current: dict, state_shapes: dict[str, tuple]) -> list[str]:
    """Raise `ModelError` if `checkpoint` cannot be resumed by the run described by `current`; else return the
    differences that make the resumed run differ from an uninterrupted one."""
    saved = checkpoint.get("pandallm")
    if saved is None:
        raise ModelError(
            f"{path} is not a pandallm checkpoint (it has no 'pandallm' record); to start from a Hugging Face "
            "model, set model.model_name_or_path instead of --ckpt_path"
        )
    problems = _differences(saved["shape"], current["shape"], "model shape: ")
    if saved["tokenizer"] != current["tokenizer"]:
        problems.append("tokenizer: the checkpoint was trained with another vocabulary")
    # A sharded checkpoint (FSDP2, FSDP) comes without "state_dict": the strategy has loaded the shards into the
    # model itself, strictly, before this check, so there is nothing left to compare here.
    saved_shapes = {k: tuple(v.shape) for k, v in checkpoint.get("state_dict", {}).items()}
    if "state_dict" not in checkpoint:
        state_shapes = {}
    mismatched = [
        f"{k}: checkpoint {saved_shapes[k]} vs model {state_shapes[k]}"
        for k in saved_shapes.keys() & state_shapes.keys()
        if saved_shapes[k] != state_shapes[k]
    ]
    missing = sorted(state_shapes.keys() - saved_shapes.keys())
    if mismatched:
        problems.append("tensor shapes differ: " + "; ".join(mismatched[:5]))
    if missing:
        problems.append(f"{len(missing)} trainable tensors are missing from the checkpoint, e.g. {missing[:3]}")
    changed = (
        _differences(saved["model"], current["model"], "model.")
        + _differences(saved["data"], current["data"], "data.")
        + _differences(saved["run"], current["run"], "trainer.")
    )
    if problems:
        # The changed settings say why (e.g. `model.use_lora: True -> False` behind missing tensors).
        settings = [c for c in changed if c.startswith("model.")]
        because = "\n  with the changed settings:\n    " + "\n    ".join(settings) if settings else ""
        raise ModelError(f"cannot load {path}:\n  " + "\n  ".join(problems) + because)
    return changed
