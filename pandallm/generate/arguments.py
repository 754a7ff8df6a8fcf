"""The options every command that loads a model to generate with takes (`pandallm chat`, `pandallm lm-eval`): which
model, and on which device. Light on purpose: a command's `--help` imports nothing heavy."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def add_model_arguments(parser: Any) -> None:
    """`--model`, `--base`, `--tokenizer`: what `pandallm.generate.load.load_for_generation` takes."""
    parser.add_argument(
        "--model", type=str, required=True, help="hf/ export, adapter dir, checkpoint, .gguf or hub id."
    )
    parser.add_argument("--base", type=str | None, default=None, help="Base of a PEFT adapter; default: its record.")
    parser.add_argument("--tokenizer", type=str | None, default=None, help="Tokenizer; default: the model's.")


def add_device_argument(parser: Any) -> None:
    parser.add_argument("--device", type=str, default="auto", help="auto (a GPU if there is one), cpu, cuda, cuda:1.")


def resolve_device(spec: str) -> torch.device:
    """`--device`: `auto` is a GPU if there is one, else the CPU."""
    import torch

    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if spec == "auto" else spec)
