"""A word-level tokenizer whose ids can be read off by hand: one id per whitespace-separated word.

It adds BOS by default (as LLaMA's does), so that tests can tell a BOS the template wrote from one the tokenizer
would add. Control strings of the built-in templates are added tokens, so they split out of running text.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

CONTROL = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "<|im_start|>", "<|im_end|>"]
WORDS = ["user", "assistant", "system", "Hi", "Hello", "Capital?", "Paris", "Be", "brief", "<<SYS>>", "<</SYS>>"]
WORDS += ["USER:", "ASSISTANT:", "SYSTEM:", "Thanks", "Welcome"]
VOCAB = {word: i for i, word in enumerate(CONTROL + WORDS)}
# The ids the tests spell out, named so that a golden list reads as text.
UNK, BOS, EOS, INST, END_INST, IM_START, IM_END = range(7)
USER, ASSISTANT, SYSTEM, HI, HELLO, CAPITAL, PARIS, BE, BRIEF, SYS, END_SYS = range(7, 18)
USER_, ASSISTANT_, SYSTEM_, THANKS, WELCOME = range(18, 23)


def save_word_tokenizer(directory: Path, chat_template: str | None = None) -> str:
    backend = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens([AddedToken(token, special=True) for token in CONTROL])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(str(directory))
    return str(directory)
