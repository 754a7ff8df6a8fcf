"""`pandallm chat`: talk to a model in the terminal.

    pandallm chat --model runs/tiny/version_0/hf
    pandallm chat --model runs/x/checkpoints/last.ckpt --system "You are concise." --generation.do_sample true
    pandallm chat --model runs/lora/version_0/hf --base HuggingFaceTB/SmolLM2-135M-Instruct   # a PEFT adapter

The conversation is rendered as training rendered chat records (`pandallm.data.tokenize.prompt_rows`, the same
template decision: a checkpoint's recorded `data.template`, else the tokenizer's chat template, else PandaLLM's
plain layout; `--template` chooses another), with the whole history each turn. The reply is streamed as it is
generated. `/reset` starts the conversation again (the system prompt stays), `/exit` or end of input (Ctrl-D) ends it.
"""

from __future__ import annotations

import sys

import torch
from jsonargparse import ArgumentParser
from transformers import TextStreamer

from pandallm.data.formats import Turn
from pandallm.data.records import PromptRecord
from pandallm.data.template import render_record, resolve_template
from pandallm.data.tokenize import prompt_rows
from pandallm.generate.arguments import add_device_argument, add_model_arguments, resolve_device
from pandallm.generate.load import load_for_generation
from pandallm.generate.options import GenerationOptions, decode, generate

USER, ASSISTANT = "user> ", "assistant> "


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="pandallm chat", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    add_model_arguments(parser)
    parser.add_argument(
        "--template",
        type=str | None,
        default=None,
        help="As data.template (auto, none, tokenizer, alpaca, llama-2, chatml, a file); default: the checkpoint's "
        "recorded one, else auto.",
    )
    parser.add_argument("--template_dir", type=str | None, default=None, help="As data.template_dir.")
    parser.add_argument("--system", type=str | None, default=None, help="A system prompt, first in every prompt.")
    parser.add_argument("--max_new_tokens", type=int, default=256, help="Tokens generated per reply at most.")
    parser.add_argument(
        "--max_seq_length", type=int | None, default=None, help="Prompt tokens kept (oldest cut); default: trained."
    )
    add_device_argument(parser)
    parser.add_argument("--show_prompt", type=bool, default=False, help="Print each rendered prompt before the reply.")
    parser.add_class_arguments(GenerationOptions, "generation")
    return parser


def chat(args: list[str]) -> None:
    parser = build_parser()
    cfg = parser.parse_args(args)
    options = parser.instantiate_classes(cfg).generation
    loaded = load_for_generation(cfg.model, "--model", cfg.base, cfg.tokenizer)
    module, tokenizer = loaded.module, loaded.module.tokenizer
    spec = cfg.template or loaded.rendering.get("template", "auto")
    chosen = resolve_template(spec, tokenizer, cfg.template_dir or loaded.rendering.get("template_dir"))
    max_seq_length = cfg.max_seq_length or loaded.rendering.get("max_seq_length", 2048)
    device = resolve_device(cfg.device)
    model = module.model.to(device)
    start = (Turn("system", cfg.system),) if cfg.system else ()
    turns = start
    print(f"pandallm chat: {cfg.model} (template {spec}, {device}); /reset clears the conversation, /exit ends it")
    for number in range(1, sys.maxsize):
        try:
            text = input(USER).strip()
        except EOFError:
            print()
            return
        if text == "/exit":
            return
        if text == "/reset":
            turns = start
            print("(conversation cleared)")
            continue
        if not text:
            continue
        turns = (*turns, Turn("user", text))
        # A chat record (`openai` format) before its reply: rendered and tokenized as a training row of it begins.
        record = PromptRecord("<chat>", number, "openai", turns)
        [row] = prompt_rows([record], chosen, tokenizer, max_seq_length)
        if cfg.show_prompt:
            print(f"[prompt]\n{''.join(render_record(record, chosen, tokenizer).texts)}\n[/prompt]")
        ids = torch.tensor([row["input_ids"]], device=device)
        print(ASSISTANT, end="", flush=True)
        # transformers streams with one beam only; beam search prints the reply once it is complete.
        streamer = (
            TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if options.num_beams == 1 else None
        )
        with torch.no_grad():
            new = generate(
                model, tokenizer, ids, torch.ones_like(ids), options, cfg.max_new_tokens, number, streamer=streamer
            )
        reply = decode(tokenizer, new)[0]
        if streamer is None:
            print(reply)
        turns = (*turns, Turn("assistant", reply.strip()))


def main(args: list[str] | None = None) -> None:
    chat(list(args or []))
