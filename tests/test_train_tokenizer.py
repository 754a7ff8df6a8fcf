"""`pandallm train-tokenizer` rebuilds a tokenizer like the shipped one."""

from __future__ import annotations

from pandallm.cli import main
from pandallm.tokenizer import load_tokenizer
from tests.conftest import DOCUMENTS, INSTRUCTIONS, write_jsonl


def test_train_tokenizer_command(tmp_path) -> None:
    write_jsonl(tmp_path / "data" / "it.jsonl", INSTRUCTIONS * 20)
    write_jsonl(tmp_path / "data" / "pt.jsonl", DOCUMENTS * 20)
    out = tmp_path / "tok"
    main(["train-tokenizer", f"--inputs=[{tmp_path / 'data'}]", f"--output={out}", "--vocab_size=400"])
    tokenizer = load_tokenizer(str(out))
    assert len(tokenizer) == 400
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (1, 2, 0)
    ids = tokenizer("长城 river ☃", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == "长城 river ☃"  # byte fallback: nothing becomes <unk>
    assert (out / "tokenizer.model").is_file() and (out / "tokenizer_config.json").is_file()


def test_trained_tokenizer_encodes_alike_in_sentencepiece_and_transformers(tmp_path) -> None:
    """Full-width punctuation, full-width digits and doubled spaces: the text a normalizing tokenizer would change
    in sentencepiece and not in transformers."""
    import sentencepiece as spm

    text = "你好，世界！（测试）１２３ ＡＢＣ  two  spaces。"
    write_jsonl(tmp_path / "data" / "it.jsonl", [{"input": text, "target": text}] * 50 + INSTRUCTIONS * 20)
    out = tmp_path / "tok"
    main(["train-tokenizer", f"--inputs=[{tmp_path / 'data'}]", f"--output={out}", "--vocab_size=400"])
    ids = load_tokenizer(str(out))(text, add_special_tokens=False)["input_ids"]
    assert ids == spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model")).encode(text)
    assert load_tokenizer(str(out)).decode(ids) == text
    assert len(ids) < len(text.encode())  # the full-width pieces were learned, not spelled out in bytes
