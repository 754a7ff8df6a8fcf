"""Special-token overrides (`model.special_tokens`): an id, a token string or `add`; rows are built with them, the
embeddings grow for added ones, and the checkpoint and the export carry them."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from pandallm.data import PandaDataModule
from pandallm.errors import ModelError
from pandallm.special_tokens import apply_special_tokens
from pandallm.tokenizer import load_tokenizer
from tests.conftest import TOKENIZER_DIR, tiny_fit_args, write_jsonl

BASE = load_tokenizer(str(TOKENIZER_DIR))  # 3000 tokens: <unk> 0, <s> 1, </s> 2


def test_each_role_as_an_id_a_token_string_or_a_new_token() -> None:
    period = BASE.convert_tokens_to_ids(".")
    tokenizer = load_tokenizer(str(TOKENIZER_DIR), {"pad": "add", "eos": period, "sep": "</s>", "cls": "add"})
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<pad>", 3000)
    assert (tokenizer.cls_token, tokenizer.cls_token_id) == ("<cls>", 3001)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == (".", period)
    assert (tokenizer.sep_token, tokenizer.sep_token_id) == ("</s>", 2)
    assert len(tokenizer) == len(BASE) + 2 and len(BASE) == 3000  # the shared tokenizer is not changed
    assert tokenizer("a <pad> b", add_special_tokens=False)["input_ids"].count(3000) == 1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"pad": 3000}, r"model.special_tokens.pad: id 3000 is not in the tokenizer's vocabulary \(ids 0 to 2999\)"),
        ({"eos": "<|im_end|>"}, r"model.special_tokens.eos: '<\|im_end\|>' is not a token of the tokenizer; .* 'add'"),
        ({"unk": "add"}, r"model.special_tokens.unk: 'add' makes a new token <unk>, but the vocabulary has it already"),
        ({"mask": "add"}, r"model.special_tokens: unknown role\(s\) \['mask'\]; the roles are pad, bos, eos"),
        ({"pad": 1.5}, r"model.special_tokens.pad: 1.5 is neither a token id"),
    ],
)
def test_a_bad_override_names_the_option_and_what_is_valid(overrides: dict, message: str) -> None:
    with pytest.raises(ModelError, match=message):
        apply_special_tokens(BASE, overrides)


def test_rows_end_with_the_overridden_eos(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "it" / "a.jsonl", [{"input": "Hi", "target": "Hello"}])
    period = BASE.convert_tokens_to_ids(".")

    def last_label(special_tokens: dict | None) -> int:
        dm = PandaDataModule(
            tokenizer=str(TOKENIZER_DIR),
            special_tokens=special_tokens,
            instruction_tuning_data_dir=str(tmp_path / "it"),
            pretraining_data_dir=None,
            num_workers=0,
            cache_dir=str(tmp_path / "cache"),
        )
        dm.prepare_data()
        dm.setup("fit")
        return dm.datasets["train"][0]["labels"][-1]

    assert (last_label(None), last_label({"eos": period})) == (2, period)


@pytest.mark.integration
def test_the_checkpoint_and_the_export_carry_added_special_tokens(tmp_path: Path) -> None:
    from pandallm.cli import cli
    from pandallm.tools.export import export as export_command

    fit = cli(["fit", *tiny_fit_args(tmp_path, "--model.special_tokens={pad: add, sep: add}"), "--trainer.max_steps=1"])
    checkpoint = next((Path(fit.trainer.log_dir) / "checkpoints").glob("*.ckpt"))
    # From the checkpoint alone: its recorded settings rebuild the tokenizer with the added tokens.
    exported = export_command([f"--ckpt_path={checkpoint}", f"--output={tmp_path / 'exported'}"])
    for directory in (Path(fit.trainer.log_dir) / "hf", exported):
        tokenizer = AutoTokenizer.from_pretrained(directory)
        model = AutoModelForCausalLM.from_pretrained(directory)
        assert (tokenizer.pad_token, tokenizer.pad_token_id, tokenizer.sep_token_id) == ("<pad>", 3000, 3001)
        assert model.get_input_embeddings().num_embeddings == len(tokenizer) == 3002
        assert (model.config.pad_token_id, model.generation_config.pad_token_id) == (3000, 3000)
