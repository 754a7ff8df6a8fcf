"""`pandallm chat` in a real pseudo-terminal (pexpect): two turns, the second prompt holding the first exchange as
the template renders it, `/reset`, `/exit`; and the errors of a model that cannot be found."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pexpect
import pytest

from pandallm.data.formats import Turn
from pandallm.data.template import ChatTemplate, render
from pandallm.errors import ModelError
from pandallm.generate.load import load_for_generation
from pandallm.model import PandaLLM
from tests.conftest import REPO, TOKENIZER_DIR

pytestmark = pytest.mark.integration

CHATML = (REPO / "pandallm" / "data" / "chat_templates" / "chatml.jinja").read_text()
PROMPT = re.compile(r"\[prompt\]\r\n(.*?)\r\n\[/prompt\]\r\nassistant> (.*?)\r\nuser> ", re.S)


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random model's Hugging Face export, its tokenizer carrying the ChatML template."""
    module = PandaLLM(model_name_or_path="llama-tiny", tokenizer=str(TOKENIZER_DIR))
    module.configure_model()
    return module.export_hf(tmp_path_factory.mktemp("chat") / "hf", chat_template=CHATML)


def test_two_turns_reset_and_exit_in_a_terminal(export: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    args = ["-m", "pandallm", "chat", "--model", str(export), "--max_new_tokens=4", "--show_prompt=true"]
    child = pexpect.spawn(sys.executable, args, cwd=str(REPO), env=env, encoding="utf-8", timeout=120)
    try:
        child.expect("/exit ends it\r\nuser> ")
        child.sendline("Name a colour.")
        child.expect(PROMPT)
        # The terminal writes every newline as \r\n.
        first_prompt, first_reply = (child.match.group(i).replace("\r\n", "\n") for i in (1, 2))
        child.sendline("And another one?")
        child.expect(PROMPT)
        second_prompt = child.match.group(1).replace("\r\n", "\n")
        child.sendline("/reset")
        child.expect(r"\(conversation cleared\)\r\nuser> ")
        child.sendline("Hello")
        child.expect(PROMPT)
        after_reset = child.match.group(1).replace("\r\n", "\n")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    tokenizer = PandaLLM(model_name_or_path=str(export)).tokenizer
    chatml = ChatTemplate("tokenizer", CHATML)

    def rendered(*turns: Turn) -> str:
        return "".join(text for text, _ in render(chatml, turns, tokenizer, generation_prompt=True))

    assert first_prompt == rendered(Turn("user", "Name a colour."))
    # The second answer is conditioned on the first exchange: its prompt holds both turns and the first reply.
    assert second_prompt == rendered(
        Turn("user", "Name a colour."), Turn("assistant", first_reply.strip()), Turn("user", "And another one?")
    )
    assert "<|im_start|>assistant\n" in second_prompt and second_prompt.count("<|im_start|>user") == 2
    assert after_reset == rendered(Turn("user", "Hello"))


def test_a_model_that_is_neither_a_directory_a_file_nor_an_id_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "runs" / "x" / "hf"
    with pytest.raises(ModelError) as error:
        load_for_generation(str(missing))
    assert str(error.value) == (
        f"--model '{missing}': no such directory or file, and not a hub id (owner/name); give a run's hf/ export, a "
        "PEFT adapter directory, a Lightning checkpoint, a .gguf file or a hub id"
    )
